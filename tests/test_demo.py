"""``rcllm demo`` end to end, and interrupting it (or a server) leaves no process and no corrupt cache.

The demo runs as the user runs it: a child ``rcllm demo`` process that itself starts node and
coordinator processes. Its ``cluster.json`` (written once the children are started, removed at
exit) gives the test their pids.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rcllm.data.loaders import prepare
from rcllm.data.synthetic import make_synthetic
from rcllm.demo import STATE_FILE
from rcllm.store import Manifest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] not in ("Z", "X")


def wait_gone(pids, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if running(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if running(p)]


def _default_sigint() -> None:  # in the child before exec: Ctrl-C as in a terminal
    # A test run started in the background (CI, `cmd &`) inherits SIGINT ignored, and Python
    # keeps an inherited ignore: the demo would never see the test's Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_demo(out: Path, *args: str) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rcllm.cli.main", "demo", "--out", str(out), *args],
        cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_default_sigint,
    )
    log.close()
    return proc


def demo_log(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text(errors="replace")[-3000:]


def wait_for_cluster(proc: subprocess.Popen, out: Path, timeout: float = 240.0) -> dict:
    """The demo's cluster.json once every node answers (the stream is then under way)."""
    state = out / STATE_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the demo ended early:\n{demo_log(out)}"
        if state.exists() and "sending" in demo_log(out):
            return json.loads(state.read_text())
        time.sleep(0.2)
    pytest.fail(f"the demo's cluster did not start in time:\n{demo_log(out)}")


@pytest.fixture(scope="module")
def big_data(tmp_path_factory) -> Path:
    """Enough items that the build takes seconds and enough users that the stream does too, so an
    interruption lands where the test means it to even with the tiny model."""
    folder = tmp_path_factory.mktemp("demo-data")
    prepare(make_synthetic(n_items=1500, n_users=300, n_interactions_per_user=(4, 8), seed=0), folder)
    return folder


@pytest.mark.slow
def test_demo_runs_to_completion_on_the_embedded_defaults(tmp_path):
    """What the README's first command runs (fewer requests)."""
    out = tmp_path / "demo"
    proc = start_demo(out, "--requests", "4")
    assert proc.wait(timeout=900) == 0, demo_log(out)
    log = demo_log(out)
    for text in ("full prefill", "prefix caching", "rcllm:boundary:2", "top-1 agreement", "cache hits",
                 "requests per node", f"cache: {out / 'cache'}", "logs:"):
        assert text in log, (text, log)
    assert "coordinator exit 0" in log and "node0 exit 0" in log and "node1 exit 0" in log
    assert not (out / STATE_FILE).exists()
    assert len(Manifest.load(out / "cache").nodes) == 2


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupting_the_demo_mid_stream_leaves_no_server_running(sig, tiny_models, big_data, tmp_path):
    """Ctrl-C: the demo stops its children and exits 130. SIGKILL: the children notice their
    parent died and stop. Either way the cache stays whole and a rerun completes."""
    out = tmp_path / "demo"
    model = str(tiny_models["llama"])
    proc = start_demo(out, "--dataset", str(big_data), "--model", model, "--requests", "300", "--concurrency", "1")
    try:
        state = wait_for_cluster(proc, out)
        pids = list(state["pids"].values())
        assert all(running(p) for p in pids)
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL), demo_log(out)
    assert wait_gone(pids) == [], f"still running after the demo stopped: {pids}"
    if sig == signal.SIGINT:
        assert "interrupted" in demo_log(out)
        assert not (out / STATE_FILE).exists()
    Manifest.load(out / "cache")  # the build had finished before the cluster started: still whole

    rerun = start_demo(out, "--dataset", str(big_data), "--model", model, "--requests", "3")
    assert rerun.wait(timeout=300) == 0, demo_log(out)


@pytest.mark.slow
def test_ctrl_c_during_the_build_then_a_rerun_completes(tiny_models, big_data, tmp_path):
    out = tmp_path / "demo"
    model = str(tiny_models["llama"])
    proc = start_demo(out, "--dataset", str(big_data), "--model", model, "--requests", "300")
    try:
        deadline = time.monotonic() + 120
        while "building the block cache" not in demo_log(out):
            assert proc.poll() is None, demo_log(out)
            assert time.monotonic() < deadline, demo_log(out)
            time.sleep(0.02)
        time.sleep(1.0)  # into the build: validation, embedding, placement, blocks
        assert not (out / "cache" / "manifest.json").exists(), "the build ended before the interruption"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code != 0
    assert not (out / STATE_FILE).exists()  # no cluster was started
    with pytest.raises(FileNotFoundError):
        Manifest.load(out / "cache")  # an interrupted build is never servable
    rerun = start_demo(out, "--dataset", str(big_data), "--model", model, "--requests", "3")
    assert rerun.wait(timeout=300) == 0, demo_log(out)
    Manifest.load(out / "cache")


@pytest.mark.slow
def test_ctrl_c_stops_a_node_and_the_coordinator_cleanly(tiny_models, tmp_path):
    """SIGINT (Ctrl-C) makes a node and the coordinator drain and exit 0; the cache stays servable."""
    from rcllm.build.pipeline import BuildOptions, build_cache
    from rcllm.data.loaders import bookshop_dir
    from rcllm.serve.cluster import LocalCluster

    cache = tmp_path / "cache"
    folder = bookshop_dir()
    build_cache(folder / "catalog.jsonl", BuildOptions(out=cache, nodes=2, model=str(tiny_models["llama"]),
                                                        users=folder / "histories.jsonl"))
    with LocalCluster(cache, tmp_path / "logs", nodes=2, env={"OMP_NUM_THREADS": "1"}) as cluster:
        cluster.start()
        pids = [p.pid for p in cluster.procs.values()]
        for name in ("node0", "coordinator"):
            cluster.signal(name, signal.SIGINT)
            assert cluster.procs[name].wait(timeout=30) == 0, cluster.log_tail(name)
        cluster.check_alive()  # node1 is unaffected
    assert wait_gone(pids) == []
    Manifest.load(cache)
