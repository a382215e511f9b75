"""The coordinator alone: routing decision time and requests/s on one core, 1M-item placement.

    .venv/bin/python benchmarks/coordinator.py [--items 1000000] [--candidates 100]
        [--concurrency 32] [--seconds 10] [--routing affinity]

Writes a cache folder that holds only what the coordinator reads (manifest, placement of
``--items`` items in 3,000 clusters on 3 nodes, item ids and keys; no model, no KV), starts three
stub nodes that answer every call at once with a canned response (one process, on the second
core), then ``rcllm coordinator`` pinned to the first core, and drives it from this process (also
on the second core) with ``--candidates``-item requests whose items come mostly from a few
clusters, as a user's candidates do. Reports:

- routing decision time per request, in process: parse + validate + the routing query + the
  affinity order over 3 nodes (the work the coordinator does before forwarding), 10,000 requests;
- the same as the running coordinator measured it (its ``rcllm_routing_decision_ms`` histogram);
- requests/s through the coordinator over HTTP, with its CPU use (1.0 = one core saturated).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_NODES = 3
CLUSTERS = 3000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(cpu: int) -> None:
    """Run on one core (of all the machine's, whatever this process inherited)."""
    cpus = os.cpu_count() or 1
    if cpus > 1:
        os.sched_setaffinity(0, {cpu % cpus})


# -- the fake cache ---------------------------------------------------------------------------


def write_cache(root: Path, n_items: int, ports: list[int], seed: int) -> list[list[str]]:
    """A cache folder with the coordinator's inputs; returns the item ids of each cluster."""
    from rcllm.store import Manifest, placement_dir
    from rcllm.store.layout import ITEM_IDS, ITEM_KEYS
    from rcllm.store.placement import Placement, save_placement

    rng = np.random.default_rng(seed)
    ids = [f"i{n}" for n in range(n_items)]
    keys = [hashlib.blake2b(i.encode(), digest_size=20).hexdigest() for i in ids]
    item_cluster = rng.integers(0, CLUSTERS, n_items)
    cluster_node = np.arange(CLUSTERS) % N_NODES
    folder = placement_dir(root)
    save_placement(Placement(
        centroids=rng.standard_normal((CLUSTERS, 16)).astype(np.float32),
        item_cluster=item_cluster.astype(np.int64), cluster_node=cluster_node.astype(np.int64),
        item_tokens=rng.integers(15, 60, n_items).astype(np.int64), n_nodes=N_NODES,
    ), folder)
    (folder / ITEM_IDS).write_text(json.dumps(ids))
    (folder / ITEM_KEYS).write_text(json.dumps(keys))
    manifest = Manifest(
        model={"name": "stub", "n_layers": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},  # Llama-3-8B's KV
        nodes=[{"node": k, "host": "127.0.0.1", "port": p} for k, p in enumerate(ports)],
        placement={"n_clusters": CLUSTERS, "n_nodes": N_NODES}, items={"count": n_items}, users={"count": 0, "history": 20},
    )
    manifest.save(root)
    members: list[list[str]] = [[] for _ in range(CLUSTERS)]
    for item_id, c in zip(ids, item_cluster.tolist()):
        members[c].append(item_id)
    return members


def make_bodies(members: list[list[str]], n_items: int, n: int, candidates: int, seed: int) -> list[bytes]:
    """Requests with a history of 10 items and ``candidates`` items, 80% from the user's 3 clusters."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(n):
        tastes = [members[rng.randrange(CLUSTERS)] for _ in range(3)]
        picked: set[str] = set()
        while len(picked) < candidates:
            picked.add(rng.choice(rng.choice(tastes)) if rng.random() < 0.8 else f"i{rng.randrange(n_items)}")
        history = [rng.choice(rng.choice(tastes)) for _ in range(10)]
        bodies.append(json.dumps({"user_id": f"u{rng.randrange(100_000)}", "history": history,
                                  "candidates": sorted(picked)}).encode())
    return bodies


# -- the stub nodes ---------------------------------------------------------------------------


def run_stubs(ports: list[int]) -> None:
    """Three nodes that answer at once: a canned ranking, an idle state."""
    from aiohttp import web

    async def main() -> None:
        runners = []
        for k, port in enumerate(ports):
            answer = json.dumps({"ranking": [{"item_id": "i0", "score": 1.0}], "ttft_ms": 0.1, "node": k,
                                 "cache": {"user_hit": True, "item_hits": 100, "item_misses": 0, "recomputed_tokens": 0,
                                           "prompt_tokens": 1}, "text": ""}).encode()
            state = {"node": k, "queue_depth": 0, "service_ms": 20.0, "replicas": [], "misses": {}, "hot": {"budget": 0},
                     "costs": {"bytes_per_token": 131072, "rtt_ms": 0.5, "bytes_per_ms": 1.25e6, "compute_ms_per_token": 0.1}}

            async def recommend(request, answer=answer):
                await request.read()
                return web.Response(body=answer, content_type="application/json")

            async def get_state(request, state=state):
                return web.json_response(state)

            app = web.Application()
            app.router.add_post("/v1/recommend", recommend)
            app.router.add_get("/v1/state", get_state)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
        await asyncio.Event().wait()

    pin(1)
    asyncio.run(main())


# -- measurements -----------------------------------------------------------------------------


def routing_in_process(cache: Path, bodies: list[bytes], routing: str, n: int = 10_000) -> list[float]:
    """Per-request time of parse, validate, query and order, as the coordinator's handler does them."""
    from rcllm.serve.coordinator import Coordinator
    from rcllm.serve.schema import check_known, parse_request

    coord = Coordinator.from_cache(cache, strategy=routing)
    for link in coord.links:
        link.view.up = True
    times = []
    for i in range(n):
        body = bodies[i % len(bodies)]
        t = time.perf_counter()
        req = parse_request(body)
        check_known(req, coord.directory.row.__contains__, coord.histories.__contains__)
        query, _ = coord.query(req)
        coord.route(query)
        times.append((time.perf_counter() - t) * 1000.0)
    return times


async def drive(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> tuple[int, int, float]:
    import aiohttp

    ok = failed = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker(w: int) -> None:
            nonlocal ok, failed
            i = w
            while time.monotonic() < deadline:
                async with session.post(url + "/v1/recommend", data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    ok, failed = (ok + 1, failed) if resp.status == 200 else (ok, failed + 1)
                i += concurrency

        started = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return ok, failed, time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_ready(url: str, timeout: float = 120.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200 and (await resp.json())["nodes_up"] == N_NODES:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"the coordinator at {url} did not see {N_NODES} nodes up in {timeout:.0f} s")


async def routing_histogram(url: str) -> tuple[float, int]:
    import aiohttp

    from rcllm.serve.metrics import parse_text

    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as resp:
            values = parse_text(await resp.text())
    return values["rcllm_routing_decision_ms_sum"], int(values["rcllm_routing_decision_ms_count"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--routing", default="affinity")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stubs", help=argparse.SUPPRESS)  # internal: run the stub nodes on these ports
    args = ap.parse_args()
    if args.stubs:
        run_stubs([int(p) for p in args.stubs.split(",")])
        return

    ports = [free_port() for _ in range(N_NODES)]
    with tempfile.TemporaryDirectory(prefix="rcllm-coordinator-bench-") as tmp:
        cache = Path(tmp) / "cache"
        t = time.perf_counter()
        members = write_cache(cache, args.items, ports, args.seed)
        bodies = make_bodies(members, args.items, 2000, args.candidates, args.seed)
        print(f"placement of {args.items:,} items in {CLUSTERS} clusters on {N_NODES} nodes written in "
              f"{time.perf_counter() - t:.1f} s; {args.candidates}-candidate requests ({len(bodies[0])} bytes)")

        pin(0)
        times = routing_in_process(cache, bodies, args.routing)
        ordered = sorted(times)
        print(f"routing decision in process ({args.routing}, one core): mean {statistics.fmean(times) * 1000:.0f} µs, "
              f"p50 {ordered[len(ordered) // 2] * 1000:.0f} µs, p99 {ordered[int(0.99 * len(ordered))] * 1000:.0f} µs "
              f"-> {1000 / statistics.fmean(times):,.0f} decisions/s")

        procs = []
        try:
            procs.append(subprocess.Popen([sys.executable, __file__, "--stubs", ",".join(map(str, ports))]))
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "rcllm.cli.serve", "coordinator", "--cache", str(cache), "--port", str(port),
                 "--routing", args.routing, "--log-level", "warning"],
                preexec_fn=lambda: pin(0),
            ))
            url = f"http://127.0.0.1:{port}"
            pin(1)
            asyncio.run(wait_ready(url))
            asyncio.run(drive(url, bodies, args.concurrency, 1.0))  # warm up connections
            before_sum, before_count = asyncio.run(routing_histogram(url))
            cpu0 = cpu_seconds(procs[1].pid)
            ok, failed, seconds = asyncio.run(drive(url, bodies, args.concurrency, args.seconds))
            cpu = (cpu_seconds(procs[1].pid) - cpu0) / seconds
            after_sum, after_count = asyncio.run(routing_histogram(url))
            served = max(after_count - before_count, 1)
            print(f"through the coordinator over HTTP (concurrency {args.concurrency}, {seconds:.1f} s): "
                  f"{ok / seconds:,.0f} requests/s ({ok} answered, {failed} failed); coordinator CPU {cpu:.2f} cores; "
                  f"its routing decision: mean {(after_sum - before_sum) / served * 1000:.0f} µs over {served} requests")
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    main()
