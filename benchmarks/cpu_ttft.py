"""CPU time to first token of one ranking prompt: plain prefill vs prefix reuse vs rcllm policies.

    .venv/bin/python benchmarks/cpu_ttft.py [--model smollm2-135m] [--threads 2] [--runs 10]

The prompt is an ml-100k leave-one-out request (history of 20 titles, 20 candidates). Every
system runs on the same token ids. ``prefix`` is exact prefix-cache reuse: system prompt and
history block cached at their own positions, everything after them recomputed. ``rcllm:*``
reuse the system, history and every item block, re-rotated to where they sit. Prints the
median of ``--runs`` timed runs after one warm-up, and each system's ratio to ``full``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from rcllm.data.movielens import load_ml100k_recbole
from rcllm.data.sampling import DEFAULT_CANDIDATES, DEFAULT_HISTORY, sample_requests
from rcllm.engine import MemoryBlockCache, Segment, open_ranker, uncached
from rcllm.engine.models import DEFAULT_MODEL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES)
    ap.add_argument("--history", type=int, default=DEFAULT_HISTORY)
    ap.add_argument("--policies", default="none,boundary:2,boundary:4,deviation:0.15")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ranker = open_ranker(args.model)
    engine, builder = ranker.engine, ranker.builder
    data = load_ml100k_recbole()
    req = sample_requests(data, 1, history=args.history, candidates=args.candidates, seed=args.seed)[0]
    history = [builder.item_text(data.items[i]) for i in req.history]
    candidates = [builder.item_text(data.items[i]) for i in req.candidates]
    source = MemoryBlockCache(engine, builder)
    segs, _ = ranker.segments(history, candidates, source)
    plain = uncached(segs)
    prefix = segs[:2] + plain[2:]  # system and history at their own positions: exact prefix reuse
    ids = torch.cat([s.token_ids for s in plain])[None]

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000)
        return statistics.median(samples)

    rows = []
    with torch.inference_mode():
        rows.append(("stock transformers forward", timed(lambda: engine.lm.model(input_ids=ids)), 1.0))
    full = engine.forward(plain, "full")
    rows.append(("full", timed(lambda: engine.forward(plain, "full")), 1.0))
    fr = engine.forward(prefix, "none")
    rows.append(("prefix (system+history cached)", timed(lambda: engine.forward(prefix, "none")), fr.recomputed_fraction))
    results = {}
    for policy in args.policies.split(","):
        r = engine.forward(segs, policy)
        results[policy] = r
        rows.append((f"rcllm:{policy}", timed(lambda: engine.forward(segs, policy)), r.recomputed_fraction))

    print(f"model {args.model}; prompt {ids.shape[1]} tokens ({args.candidates} candidates, {args.history} history items); "
          f"CPU {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"median of {args.runs} runs")
    base = rows[1][1]
    print(f"{'system':34} {'TTFT ms':>9} {'vs full':>8} {'recomputed':>11} {'max|dlogit|':>12}")
    for name, ms, frac in rows:
        key = name.removeprefix("rcllm:")
        diff = float((results[key].logits - full.logits).abs().max()) if key in results else 0.0
        if name.startswith("prefix"):
            diff = float((fr.logits - full.logits).abs().max())
        print(f"{name:34} {ms:9.1f} {base / ms:7.2f}x {frac:10.0%} {diff:12.2e}")


if __name__ == "__main__":
    main()
