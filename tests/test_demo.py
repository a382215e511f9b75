"""``rcllm demo`` end to end, and interrupting it (or a server) leaves no process and no corrupt cache.

The demo runs as the user runs it: a child ``rcllm demo`` process that itself starts node and
coordinator processes. Its ``cluster.json`` (written once the children are started, removed at
exit) gives the test their pids.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from test_serve import ScriptedNode, until

from rcllm.build.pipeline import BuildOptions, build_cache
from rcllm.data.loaders import bookshop_dir, prepare
from rcllm.data.synthetic import make_synthetic
from rcllm.demo import DEMO_ADAPTER, STATE_FILE, default_demo_model
from rcllm.serve.client import RecommendClient, ServiceError
from rcllm.serve.cluster import LocalCluster
from rcllm.serve.runner import NodeData
from rcllm.serve.schema import RecommendResponse
from rcllm.store import Manifest, StoreNotBuiltError, require_built, store_states

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


def start_demo(out: Path, *args: str, code: str | None = None) -> subprocess.Popen:
    """``rcllm demo --out OUT ARGS`` as a child process; ``code``: a script that runs the CLI
    instead of ``-m rcllm.cli.main`` (with a hook the test controls)."""
    log = open(out.parent / f"{out.name}.log", "ab")
    runner = ["-c", code] if code else ["-m", "rcllm.cli.main"]
    proc = subprocess.Popen(
        [sys.executable, *runner, "demo", "--out", str(out), *args],
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
    from rcllm.engine.model_policy import default_policy

    assert default_demo_model() == str(DEMO_ADAPTER)  # the shipped reuse-trained adapter, not the bare model
    gated = default_policy(DEMO_ADAPTER)
    assert gated.gated, gated.reason  # its gate's policy file ships with it
    out = tmp_path / "demo"
    proc = start_demo(out, "--requests", "4")
    assert proc.wait(timeout=900) == 0, demo_log(out)
    log = demo_log(out)
    for text in ("full prefill", "prefix caching", f"rcllm:{gated.policy}", "top-1 agreement", "cache hits",
                 "requests per node", "the item each reader chose next", f"cache: {out / 'cache'}", "logs:"):
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
    assert all(s.built for s in store_states(out / "cache", Manifest.load(out / "cache")))  # built before the cluster

    rerun = start_demo(out, "--dataset", str(big_data), "--model", model, "--requests", "3")
    assert rerun.wait(timeout=300) == 0, demo_log(out)


# The demo CLI, held inside its build right after the first block KV is stored (planned, blocks
# being written, no store recorded built) until the test's Ctrl-C arrives: the interruption lands
# there on every machine, however fast.
HELD_BUILD = """
import signal, sys
from rcllm.store import BlockStore
put = BlockStore.put

def put_then_hold(self, key, block):
    put(self, key, block)
    print("holding the build", flush=True)
    signal.pause()

BlockStore.put = put_then_hold
from rcllm.cli.main import main
sys.exit(main())
"""


@pytest.mark.slow
def test_ctrl_c_during_the_build_then_a_rerun_completes(tiny_models, big_data, tmp_path):
    out = tmp_path / "demo"
    model = str(tiny_models["llama"])
    proc = start_demo(out, "--dataset", str(big_data), "--model", model, "--requests", "300", code=HELD_BUILD)
    log = out.parent / f"{out.name}.log"
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a measure
        while "holding the build" not in log.read_text(errors="replace"):
            assert proc.poll() is None, demo_log(out)
            assert time.monotonic() < deadline, demo_log(out)
            time.sleep(0.05)
        assert not any(s.built for s in store_states(out / "cache", Manifest.load(out / "cache")))
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 130, demo_log(out)
    assert "interrupted" in demo_log(out)
    assert not (out / STATE_FILE).exists()  # no cluster was started
    with pytest.raises(StoreNotBuiltError):  # an interrupted build is never servable
        require_built(out / "cache", Manifest.load(out / "cache"), ["node-0", "node-1", "users"])
    rerun = start_demo(out, "--dataset", str(big_data), "--model", model, "--requests", "3")
    assert rerun.wait(timeout=300) == 0, demo_log(out)
    assert all(s.built for s in store_states(out / "cache", Manifest.load(out / "cache")))


@pytest.mark.slow
def test_ctrl_c_makes_a_node_and_the_coordinator_finish_their_requests_and_exit_cleanly(tiny_models, tmp_path):
    """SIGINT (Ctrl-C) with requests in flight: node 0 answers what it admitted, the coordinator
    forwards the answers it was waiting for, both exit 0; node 1 is unaffected and the cache stays
    servable. The coordinator's requests are held by scripted nodes until it is shutting down, so
    they are certainly in flight; the node's are slow continuations (its drain itself is proven
    deterministically in test_serve)."""
    cache = tmp_path / "cache"
    folder = bookshop_dir()
    build_cache(folder / "catalog.jsonl", BuildOptions(out=cache, nodes=2, model=str(tiny_models["llama"]),
                                                        users=folder / "histories.jsonl"))
    data = NodeData.load(cache)
    user, items = sorted(data.histories)[0], sorted(data.catalog)
    requests = [{"user_id": user, "candidates": items[i : i + 5], "max_new_tokens": 40} for i in range(0, 30, 5)]

    def log_has(cluster: LocalCluster, name: str, event: str) -> bool:
        return f'"event": "{event}"' in cluster.log_path(name).read_text(errors="replace")

    with LocalCluster(cache, tmp_path / "logs", nodes=2, env={"OMP_NUM_THREADS": "1"}) as cluster:
        cluster.start()
        pids = [p.pid for p in cluster.procs.values()]

        async def node_0_interrupted():
            async with RecommendClient(cluster.node_url(0)) as client:
                sent = [asyncio.ensure_future(client.recommend(r)) for r in requests]
                while True:  # every request admitted, some still waiting: then the signal
                    depth = (await client.get_json("/v1/state"))["queue_depth"]
                    answered = sum(f.done() for f in sent)
                    assert answered < len(sent), "every request was answered before the signal"
                    if depth + answered == len(sent):
                        break
                cluster.signal("node0", signal.SIGINT)
                return await asyncio.gather(*sent, return_exceptions=True)

        answers = asyncio.run(node_0_interrupted())
        assert all(isinstance(a, RecommendResponse) and a.node == 0 for a in answers), answers
        assert cluster.procs["node0"].wait(timeout=60) == 0, cluster.log_tail("node0")
        assert log_has(cluster, "node0", "shutting down: draining in-flight requests")
        cluster.check_alive()  # node 1 and the coordinator are unaffected

    async def coordinator_interrupted():
        """A coordinator process of the same cache in front of two scripted nodes that hold every request."""
        nodes = [ScriptedNode(k, recommend=("hang",)) for k in range(2)]
        servers = [TestServer(n.app(), host="127.0.0.1") for n in nodes]
        for server in servers:
            await server.start_server()
        front = LocalCluster(cache, tmp_path / "logs-front", nodes=2, node_ports=[s.port for s in servers],
                             env={"OMP_NUM_THREADS": "1"})
        try:
            front.start_coordinator()
            async with RecommendClient(front.url) as client:
                async def up() -> int:
                    try:
                        return (await client.get_json("/v1/cluster"))["up"]
                    except (OSError, ServiceError):
                        return 0

                while await up() < 2:
                    front.check_alive()
                    await asyncio.sleep(0.1)
                sent = [asyncio.ensure_future(client.recommend({**r, "max_new_tokens": 0})) for r in requests[:3]]
                await until(lambda: sum(n.calls["recommend"] for n in nodes) == 3, "3 requests at the scripted nodes")
                front.signal("coordinator", signal.SIGINT)
                await until(lambda: log_has(front, "coordinator", "shutting down: draining in-flight requests"),
                            "the coordinator shutting down")
                held = [not f.done() for f in sent]
                for n in nodes:
                    n.release.set()
                answers = await asyncio.gather(*sent, return_exceptions=True)
            return held, answers, await asyncio.to_thread(front.procs["coordinator"].wait, 60), front
        finally:
            front.stop()
            for n in nodes:
                n.release.set()
            for server in servers:
                await server.close()

    held, answers, code, front = asyncio.run(coordinator_interrupted())
    assert held == [True] * 3  # in flight when the coordinator began shutting down
    assert all(isinstance(a, RecommendResponse) for a in answers), answers
    assert code == 0 and log_has(front, "coordinator", "stopped"), front.log_tail("coordinator")
    assert wait_gone(pids) == []
    Manifest.load(cache)
