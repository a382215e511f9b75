"""The examples in examples/ run as documented (on the tiny model, to stay quick)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            held = []
            for port in range(base, base + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no run of free ports")


def test_python_api_example_ranks_with_every_policy(tiny_models):
    result = subprocess.run([sys.executable, "examples/python_api.py", "--model", str(tiny_models["llama"])],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("reader-01 read: ")
    for policy in ("full", "boundary:2", "none"):
        assert any(line.strip().startswith(f"{policy}: TTFT") for line in lines), result.stdout
    assert "recomputed 100%, same top-1 as full: True" in result.stdout
    assert lines[-1].startswith("held-out next book: ")


def test_the_readme_python_snippet_runs(tiny_models):
    """The README's Python API block, run as written but on a tiny model (the names it calls are
    the library's: a renamed argument fails here)."""
    text = (REPO / "README.md").read_text()
    blocks = text.split("```python\n")[1:]
    assert blocks, "the README has a Python block"
    code = blocks[0].split("```")[0].replace('open_ranker("smollm2-135m")', f'open_ranker({str(tiny_models["llama"])!r})')
    assert str(tiny_models["llama"]) in code
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the snippet prints the ranking"


@pytest.mark.slow
def test_walkthrough_runs_the_four_commands_against_each_other(tiny_models, tmp_path):
    env = {**ENV, "MODEL": str(tiny_models["llama"]), "WORK": str(tmp_path / "work"), "PORT": str(free_port_run(3)),
           "RCLLM": str(Path(sys.executable).parent / "rcllm"), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "examples/walkthrough.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "2 nodes up" in out
    assert '"ranking": [{"item_id": ' in out and "user block hit True" in out  # the HTTP client example
    assert "rcllm:boundary:2" in out and "req/s" in out  # eval --endpoint's table
    logs = tmp_path / "work" / "logs"
    for name in ("node0", "node1", "coordinator"):
        assert (logs / f"{name}.log").exists()
    # the script stopped its servers: nothing listens on its ports any more
    for port in range(int(env["PORT"]), int(env["PORT"]) + 3):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"


SHIPPED_ADAPTERS = ["reuse-ranker", "ml100k-ranker"]


@pytest.mark.parametrize("name", SHIPPED_ADAPTERS)
def test_a_shipped_adapter_names_the_embedded_base_and_carries_its_gate(name):
    """Both files that name the base say the embedded model (not a folder on the machine that
    trained it), and the gate's policy file ships beside the weights."""
    from rcllm.engine.model_policy import POLICY_FILE, read_policy_file
    from rcllm.engine.models import DEFAULT_MODEL, read_adapter

    folder = REPO / "examples" / name
    peft_config = json.loads((folder / "adapter_config.json").read_text())
    assert read_adapter(folder).base == peft_config["base_model_name_or_path"] == DEFAULT_MODEL
    record = read_policy_file(folder / POLICY_FILE)
    thresholds = record["thresholds"]  # the goals: HR@1 within 0.02 at C <= 10, HR@10 within 0.01 above
    assert thresholds["min_top1"] >= 0.9
    assert thresholds["max_hr_delta"] <= {"hr@1": 0.02, "hr@10": 0.01}[thresholds["headline"]]


@pytest.mark.slow
def test_the_ml100k_ranker_is_served_with_the_policy_its_gate_measured_on_these_weights():
    """examples/ml100k-ranker's gate ran on 500 ml-100k requests; the file counts only if its
    fingerprint is that of the weights the adapter loads to here (else serving falls back)."""
    from rcllm.engine import open_ranker
    from rcllm.engine.model_policy import default_policy, read_policy_file

    folder = REPO / "examples" / "ml100k-ranker"
    ranker = open_ranker(str(folder))
    chosen = default_policy(ranker.engine.lm.path, ranker.engine.lm.fingerprint)
    assert chosen.gated, chosen.reason
    assert chosen.policy == "tail:2"
    record = read_policy_file(folder / "rcllm-policy.json")
    assert (record["dataset"], record["requests"], record["candidates"]) == ("ml-100k", 500, 20)
    row = next(r for r in record["frontier"] if r["policy"] == "tail:2")
    assert row["top1_agree"] >= 0.9 and abs(row["hr_at_10_delta"]) <= 0.01 and row["speedup"] >= 5
