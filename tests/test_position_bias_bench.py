"""benchmarks/position_bias.py: a per-label-position offset on a policy's log-scores, fitted and held out."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "position_bias.py"
_spec = importlib.util.spec_from_file_location("position_bias", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _rows(n: int, bias: torch.Tensor, seed: int) -> list[dict]:
    """Prefill log-scores with near-ties, and a policy that reads them with a position bias and noise."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, len(bias), generator=g) * 0.3
    policy = full + bias + torch.randn(n, len(bias), generator=g) * 0.02
    return [{"full": f.tolist(), "policy": p.tolist()} for f, p in zip(full, policy)]


def test_a_position_bias_is_found_and_its_correction_holds_on_held_out_requests():
    bias = torch.tensor([0.3, 0.2, 0.0, -0.1, -0.2, -0.2])
    result = bench.analyse(_rows(300, bias, 0), _rows(200, bias, 1), splits=3)
    before, after = result["held_out"]
    assert before < 0.6 and after > 0.9  # the bias costs the top choice; the fitted offsets give it back
    assert torch.allclose(torch.tensor(result["offsets"]), -(bias - bias.mean()), atol=0.05)
    assert all(a > b for b, a in result["halves"])
    overlap = result["held_out_overlap"]  # the bias shifts every position: added to every score, they help too
    assert overlap["every score"] > overlap["none"]


def test_offsets_choosing_the_first_place_leave_the_top_k_alone_where_the_bias_is_only_at_the_top():
    g = torch.Generator().manual_seed(0)
    def rows(n):
        full = torch.randn(n, 12, generator=g)
        policy = full + torch.randn(n, 12, generator=g) * 0.05
        top = full.argmax(-1)
        # the policy's only bias: the prefill's top label, when at a late position, lost to the next best
        late = top >= 8
        policy[late, top[late]] = policy[late].kthvalue(11, -1).values[:] - 0.05
        return [{"full": f.tolist(), "policy": p.tolist()} for f, p in zip(full, policy)]
    result = bench.analyse(rows(400), rows(300), splits=0)
    overlap = result["held_out_overlap"]
    assert result["held_out"][1] > result["held_out"][0] + 0.05  # the offsets win top choices back
    assert abs(overlap["first place"] - overlap["none"]) < 0.01  # and leave the top 6 as it was
    assert overlap["every score"] < overlap["none"] - 0.005  # added to every score, they move it


def test_without_a_bias_the_offsets_stay_near_zero_and_change_little():
    unbiased = torch.zeros(6)
    result = bench.analyse(_rows(300, unbiased, 0), _rows(200, unbiased, 1), splits=0)
    assert max(abs(x) for x in result["offsets"]) < 0.02
    assert abs(result["held_out"][1] - result["held_out"][0]) <= 0.02


def test_the_script_reads_rows_written_before_and_refuses_other_files(tmp_path):
    bias = torch.tensor([0.3, 0.0, -0.3, 0.0])
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({"fit": _rows(60, bias, 0), "held_out": _rows(40, bias, 1)}))
    done = subprocess.run([sys.executable, str(SCRIPT), "--from-rows", str(rows), "--splits", "2"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "40 held-out requests" in done.stdout and "random halves (2)" in done.stdout
    assert "top-2 overlap with the prefill" in done.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"frontier": []}))
    done = subprocess.run([sys.executable, str(SCRIPT), "--from-rows", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "not written by --rows" in done.stderr


def test_collect_reads_a_model_under_full_and_the_policy(tiny_models, tmp_path):
    rows = bench.collect(str(tiny_models["llama"]), "synthetic", 3, 0, history=2, candidates=4, policy="none")
    assert len(rows) == 3 and all(len(r["full"]) == len(r["policy"]) == 4 for r in rows)
    assert any(r["full"] != r["policy"] for r in rows)  # cached blocks never saw the history: the scores move
    out = tmp_path / "rows.json"
    assert bench.main(["--model", str(tiny_models["llama"]), "--dataset", "synthetic", "--candidates", "4",
                       "--history", "2", "--fit", "3", "--eval", "3", "--splits", "1", "--rows", str(out)]) == 0  # fmt: skip
    assert set(json.loads(out.read_text())) >= {"fit", "held_out", "policy"}
