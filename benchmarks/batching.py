"""Batched ranking on one node: B concurrent requests one at a time vs as one batched forward.

    .venv/bin/python benchmarks/batching.py [--model smollm2-135m] [--threads 2] [--batches 1,4,8]
        [--policy boundary:2] [--runs 3] [--device cpu|cuda]

B different ml-100k leave-one-out requests (history of 20 titles, 20 candidates, every block
cached in memory) are ranked with ``--policy`` first one after another (``BlockEngine.forward``
per request), then together (``BlockEngine.forward_batch``: the recomputed tokens of all B
prompts share each layer's projections and MLP; attention stays per prompt). Prints, per B,
the median wall time of all B, requests per second, and the largest logit difference between
the batched and the one-at-a-time results.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from rcllm.data.movielens import load_ml100k_recbole
from rcllm.data.sampling import sample_requests
from rcllm.engine import MemoryBlockCache, open_ranker
from rcllm.engine.model_policy import FALLBACK_POLICY
from rcllm.engine.models import DEFAULT_MODEL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--policy", default=FALLBACK_POLICY)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batches.split(",")]

    ranker = open_ranker(args.model, device=args.device)
    engine, builder = ranker.engine, ranker.builder
    data = load_ml100k_recbole()
    requests = sample_requests(data, max(sizes), seed=args.seed)
    source = MemoryBlockCache(engine, builder)
    prompts = []
    for req in requests:
        segs, _ = ranker.segments([builder.item_text(data.items[i]) for i in req.history],
                                  [builder.item_text(data.items[i]) for i in req.candidates], source)  # fmt: skip
        prompts.append((segs, args.policy))

    def sync() -> None:
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()
        sync()
        samples = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append((time.perf_counter() - t0) * 1000)
        return statistics.median(samples)

    print(f"{args.model}, policy {args.policy}, {engine.device} ({platform.machine()}, {args.threads} threads), "
          f"prompts of {statistics.fmean(sum(s.n_tokens for s in p[0]) for p in prompts):.0f} tokens")  # fmt: skip
    print(f"{'B':>3} {'one at a time ms':>17} {'batched ms':>11} {'req/s one':>10} {'req/s batched':>14} "
          f"{'speed-up':>9} {'max dlogit':>11}")
    for b in sizes:
        batch = prompts[:b]
        alone = timed(lambda: [engine.forward(segs, policy) for segs, policy in batch])
        together = timed(lambda: engine.forward_batch(batch))
        ref = [engine.forward(segs, policy).logits for segs, policy in batch]
        got = [r.logits for r in engine.forward_batch(batch)]
        dlogit = max(float((a - g).abs().max()) for a, g in zip(ref, got))
        print(f"{b:>3} {alone:>17.1f} {together:>11.1f} {1000 * b / alone:>10.2f} {1000 * b / together:>14.2f} "
              f"{alone / together:>8.2f}x {dlogit:>11.2e}")


if __name__ == "__main__":
    main()
