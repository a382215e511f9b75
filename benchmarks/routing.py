"""Routing strategies on one request stream: item hit ratio and TTFT of affinity, round-robin, user-hash.

    .venv/bin/python benchmarks/routing.py [--model smollm2-135m] [--threads 2] [--items 600]
        [--users 100] [--requests-per-user 2] [--candidates 20] [--hot-share 0.05]

A synthetic catalog (categories of items, users with one or two favourite categories) is built
into a 3-node cache (MiniLM placement keeps a category's items together). Each request has the
user's next item and negatives drawn as a retrieval stage around the user's interests would:
a ``--local`` share from the user's ``--tastes`` most frequent categories, the rest
popularity-weighted from the whole catalog. The stream is routed by
each strategy (:mod:`rcllm.serve.routing`, the coordinator's code) to three in-process nodes
(:class:`rcllm.serve.runner.NodeRunner`, the nodes' code), each with a fresh hot tier of
``--hot-share`` of the catalog's item KV bytes. A block a node lacks is fetched from its owner's
store over a simulated network (``--rtt-ms``, ``--gbps``; its time is added to TTFT) or
recomputed, whichever the node's cost model prefers. Requests run one at a time, so queueing
plays no part: the table isolates affinity (the nodes' request shares show the load it causes).

Item hit ratio: candidate blocks found on the chosen node (hot tier or its own disk store). The
last line compares it with what the placement allows: each request on the node that stores most
of its candidates (only hot-tier copies can do better).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from rcllm.build.pipeline import BuildOptions, build_cache
from rcllm.data.catalog import write_catalog
from rcllm.data.formats import write_histories, write_interactions
from rcllm.data.sampling import DEFAULT_CANDIDATES
from rcllm.data.synthetic import make_synthetic
from rcllm.engine import open_ranker
from rcllm.engine.models import DEFAULT_MODEL
from rcllm.serve.costs import kv_bytes_per_token
from rcllm.serve.routing import STRATEGIES, NodeView, RouteQuery, Router
from rcllm.serve.runner import NodeData, NodeRunner
from rcllm.serve.schema import parse_request
from rcllm.store import BlockStore, block_from_bytes, node_dir, users_dir

N_NODES = 3


def make_requests(dataset, users: int, per_user: int, candidates: int, local: float, tastes: int, seed: int) -> list[dict]:
    """Leave-one-out requests of known users (history omitted: the cache holds it), interleaved.
    Negatives: a ``local`` share from the user's ``tastes`` most frequent categories (a retrieval
    stage around the user's interests), the rest popularity-weighted from the whole catalog."""
    rng = random.Random(seed)
    sequences = dataset.user_sequences()
    by_category: dict[str, list[str]] = {}
    for item_id, item in dataset.items.items():
        by_category.setdefault(item["categories"][0], []).append(item_id)
    popularity = dataset.popularity(exclude_last=1)
    pool = sorted(dataset.items)
    weights = [popularity.get(i, 0) + 1 for i in pool]
    requests = []
    for user in sorted(sequences, key=lambda u: int(u[1:]))[:users]:
        seq = sequences[user]
        seen = set(seq)
        liked = Counter(dataset.items[i]["categories"][0] for i in seq[:-1]).most_common(tastes)
        near = sorted(i for c, _ in liked for i in by_category[c] if i not in seen)
        for _ in range(per_user):
            negatives = set(rng.sample(near, min(len(near), round(local * (candidates - 1)))))
            while len(negatives) < candidates - 1:
                pick = rng.choices(pool, weights)[0]
                if pick not in seen:
                    negatives.add(pick)
            cands = sorted(negatives) + [seq[-1]]
            rng.shuffle(cands)
            requests.append({"user_id": user, "candidates": cands})
    rng.shuffle(requests)
    return requests


def build(args, ranker, root: Path):
    dataset = make_synthetic(n_items=args.items, n_users=args.users, seed=args.seed)
    sequences = dataset.user_sequences()
    write_catalog(dataset.items.values(), root / "catalog.jsonl")
    # the cache holds each user's history up to (not including) the item the requests hide
    write_histories({u: s[:-1] for u, s in sequences.items()}, root / "histories.jsonl")
    write_interactions(dataset.interactions, root / "interactions.jsonl")
    out = root / "cache"
    t = time.perf_counter()
    build_cache(root / "catalog.jsonl", BuildOptions(out=out, nodes=N_NODES, model=args.model, users=root / "histories.jsonl",
                                                     interactions=root / "interactions.jsonl", history=args.history), ranker=ranker)
    print(f"built a {N_NODES}-node cache of {args.items} items and {args.users} user histories in {time.perf_counter() - t:.0f} s")
    return dataset, out


def run_strategy(strategy: str, requests, ranker, data: NodeData, stores, users_store, args) -> dict:
    directory = data.directory
    runners = [NodeRunner(ranker, k, data, [stores[k], users_store], hot_bytes=args.hot_bytes) for k in range(N_NODES)]
    bytes_per_ms = args.gbps * 1e9 / 8 / 1000
    for runner in runners:  # the simulated network; compute cost is measured
        runner.costs.rtt_ms, runner.costs.bytes_per_ms = args.rtt_ms, bytes_per_ms
    router = Router(strategy, directory.owner, directory.tokens, range(N_NODES))
    row_by_key = directory.row_by_key
    rows: list[tuple] = []
    for turn, body in enumerate(requests):
        req = parse_request(body)
        query = RouteQuery(req.user_id, [directory.row[c.id] for c in req.candidates])
        views = []
        for k, runner in enumerate(runners):
            held = {r for key in runner.source.hot if (r := row_by_key.get(key)) is not None and directory.owner[r] != k}
            views.append(NodeView(k, runner.costs, service_ms=runner.service_ms or 20.0, held=held))
        node = router.order(query, views, turn)[0]
        runner = runners[node]
        job = runner.prepare(req)
        fetched, nbytes = {}, 0
        for owner, owned in runner.plan_fetch(runner.lacking(job), lambda peer: True).items():
            for r in owned:
                data_bytes = stores[owner].get_bytes(directory.keys[r])
                fetched[directory.keys[r]] = block_from_bytes(data_bytes)
                nbytes += len(data_bytes)
        fetch_ms = args.rtt_ms + nbytes / bytes_per_ms if fetched else 0.0  # parallel fetches share the link
        job.fetched, job.fetch_ms = fetched, fetch_ms
        response = runner.run(job)
        rows.append((node, response.cache.item_hits, response.cache.item_misses, response.ttft_ms, len(fetched)))
    hits = sum(r[1] for r in rows)
    # no router beats the node holding most of each request's candidates, but for hot-tier copies
    best = statistics.fmean(
        max(Counter(directory.owner[directory.row[c]] for c in body["candidates"]).values()) / len(body["candidates"])
        for body in requests
    )
    lookups = hits + sum(r[2] for r in rows)
    ttft = sorted(r[3] for r in rows)
    share = [sum(r[0] == k for r in rows) / len(rows) for k in range(N_NODES)]
    return {
        "hit_ratio": hits / lookups, "placement_best": best, "ttft_mean": statistics.fmean(ttft), "ttft_p50": ttft[len(ttft) // 2],
        "ttft_p99": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
        "fetched": sum(r[4] for r in rows), "recomputed": sum(r[2] - r[4] for r in rows), "share": share,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--items", type=int, default=600)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--requests-per-user", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES)
    ap.add_argument("--history", type=int, default=10, help="items in a user's history block")
    ap.add_argument("--local", type=float, default=0.8, help="share of negatives from the user's favourite categories")
    ap.add_argument("--tastes", type=int, default=1, help="how many of the user's most frequent categories are its favourites")
    ap.add_argument("--hot-share", type=float, default=0.05, help="hot tier per node, as a share of all item KV bytes")
    ap.add_argument("--rtt-ms", type=float, default=0.5)
    ap.add_argument("--gbps", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None, help="build into (or reuse) this folder; default: a temporary one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ranker = open_ranker(args.model)
    with tempfile.TemporaryDirectory(prefix="rcllm-routing-") as tmp:
        root = args.cache or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        dataset, cache = build(args, ranker, root)
        data = NodeData.load(cache)
        stores = [BlockStore.open_readonly(node_dir(cache, k)) for k in range(N_NODES)]
        users_store = BlockStore.open_readonly(users_dir(cache))
        item_kv = sum(data.directory.tokens) * kv_bytes_per_token(data.manifest.model)
        args.hot_bytes = int(args.hot_share * item_kv)
        requests = make_requests(dataset, args.users, args.requests_per_user, args.candidates, args.local, args.tastes,
                                 args.seed)
        print(f"model {args.model}; CPU {platform.machine()}, {args.threads} threads; {len(requests)} requests of "
              f"{args.candidates} candidates; hot tier {args.hot_bytes / 2**20:.1f} MiB per node "
              f"({args.hot_share:.0%} of {item_kv / 2**20:.0f} MiB item KV); network {args.rtt_ms} ms RTT, {args.gbps} Gbit/s")
        warm = NodeRunner(ranker, 0, data, [stores[0], users_store], hot_bytes=args.hot_bytes)
        for body in requests[:10]:  # label priors, allocator, lazy inits: paid before any strategy is timed
            warm.run(warm.prepare(parse_request(body)))
        results = {}
        for strategy in STRATEGIES:
            results[strategy] = run_strategy(strategy, requests, ranker, data, stores, users_store, args)
            r = results[strategy]
            print(f"{strategy:12} item hit ratio {r['hit_ratio']:.3f}  TTFT mean {r['ttft_mean']:7.1f} ms  "
                  f"p50 {r['ttft_p50']:7.1f}  p99 {r['ttft_p99']:7.1f}  fetched {r['fetched']:5d}  "
                  f"recomputed {r['recomputed']:5d}  request share {' / '.join(f'{s:.2f}' for s in r['share'])}")
        gain = results["affinity"]["hit_ratio"] / max(results["round-robin"]["hit_ratio"], 1e-9)
        print(f"affinity / round-robin item hit ratio: {gain:.2f}x (goal: >= 2x); the static placement allows "
              f"{results['affinity']['placement_best']:.3f} (each request on the node holding most of its candidates)")


if __name__ == "__main__":
    main()
