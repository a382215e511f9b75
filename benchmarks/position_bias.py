"""Is reuse's lost top choice a label-position bias? A per-position offset, fitted and held out.

For each of ``--fit`` requests (seed ``--fit-seed``) and ``--eval`` others (``--eval-seed``) of a
dataset, the model's label log-scores under a plain prefill and under ``--policy``; then one
additive offset per label position on the policy's log-scores, fitted to the prefill's
distributions (KL) on the fit requests, and the top-1 agreement it gives on the held-out ones;
then the same over ``--splits`` random halves of all requests. A gain that holds on held-out
requests means part of what the policy loses is a systematic preference for some label
positions, which an offset corrects at no serving cost. The top-K overlap with the prefill (K = 10,
or half the candidates when fewer) shows what the offsets do below the top: added to every score,
as first fitted, or choosing only the first place, as the ranker serves them
(:func:`rcllm.engine.ranker.offset_order`).

    python benchmarks/position_bias.py --model examples/ml100k-ranker --dataset ml-100k --candidates 20 \\
        --history 10 --fit 300 --eval 200 --rows rows.json       # ~30 min on 2 cores
    python benchmarks/position_bias.py --from-rows rows.json      # the analysis again, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch


def collect(model: str, dataset: str, n: int, seed: int, history: int, candidates: int, policy: str) -> list[dict]:
    """Per request, the label log-scores (in candidate order) of a plain prefill and of ``policy``:
    the rankings the gate's sweep (``rcllm check --sweep``) computes and judges."""
    from rcllm.data.loaders import load_dataset
    from rcllm.engine import open_ranker
    from rcllm.engine.policy import parse_policy
    from rcllm.eval.check import run_sweep, sample_cases

    ranker = open_ranker(model, label_offsets=False)  # the policy's own scores, whatever a gate fitted
    cases = sample_cases(load_dataset(dataset), n, history, candidates, seed, text=ranker.builder.item_text)
    rankings = run_sweep(ranker, cases, [policy], seed=seed).rankings
    def logs(ranking) -> list[float]:
        return [math.log(max(s, 1e-30)) for s in ranking.scores]

    return [{"full": logs(f), "policy": logs(p)}
            for f, p in zip(rankings["full"], rankings[str(parse_policy(policy))], strict=True)]  # fmt: skip


def _scores(rows: list[dict], key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in rows], dtype=torch.float32)


def fit_offsets(rows: list[dict], steps: int = 500, lr: float = 0.02) -> torch.Tensor:
    """One offset per label position that brings the policy's label distributions closest (KL) to
    the prefill's: what `rcllm check --sweep --fit-offsets` fits."""
    from rcllm.eval.gate import fit_label_offsets

    return fit_label_offsets(_scores(rows, "full"), _scores(rows, "policy"), steps=steps, lr=lr)


def top1_agreement(rows: list[dict], offsets: torch.Tensor | None = None) -> float:
    policy = _scores(rows, "policy") + (0 if offsets is None else offsets)
    return (_scores(rows, "full").argmax(-1) == policy.argmax(-1)).float().mean().item()


def top_overlap(rows: list[dict], offsets: torch.Tensor | None = None, first_only: bool = True) -> float:
    """Mean share of the prefill's top K that the policy's ranking also puts in its top K, with
    ``offsets`` choosing its first place (``first_only``) or added to every score."""
    from rcllm.engine.ranker import offset_order

    full, policy = _scores(rows, "full"), _scores(rows, "policy")
    k = min(10, full.shape[1] // 2)
    shares = []
    for f, p in zip(full, policy):
        if offsets is None or first_only:
            order = offset_order(torch.softmax(p, -1), offsets)
        else:
            order = offset_order(torch.softmax(p + offsets, -1))
        shares.append(len(set(order[:k]) & set(offset_order(torch.softmax(f, -1))[:k])) / k)
    return sum(shares) / len(shares)


def analyse(fit: list[dict], held_out: list[dict], splits: int, seed: int = 0) -> dict:
    """Held-out top-1 agreement without and with fitted offsets, on the given split and on random halves."""
    if not fit or not held_out or len({len(r["full"]) for r in fit + held_out}) != 1:
        raise ValueError("fit and held-out requests must be non-empty and share one candidate count")
    offsets = fit_offsets(fit)
    every = fit + held_out
    shuffled, halves = random.Random(seed), []
    for _ in range(splits):
        order = list(every)
        shuffled.shuffle(order)
        a, b = order[: len(order) // 2], order[len(order) // 2 :]
        halves.append((top1_agreement(b), top1_agreement(b, fit_offsets(a))))
    positions = len(every[0]["full"])
    return {
        "offsets": [round(x, 4) for x in offsets.tolist()],
        "fit": (top1_agreement(fit), top1_agreement(fit, offsets)),
        "held_out": (top1_agreement(held_out), top1_agreement(held_out, offsets)),
        "halves": halves,
        "held_out_overlap": {"none": top_overlap(held_out), "every score": top_overlap(held_out, offsets, False),
                             "first place": top_overlap(held_out, offsets)},  # fmt: skip
        "top_by_position": {
            key: torch.bincount(_scores(every, key).argmax(-1), minlength=positions).tolist() for key in ("full", "policy")
        },
    }


def report(result: dict, n_fit: int, n_held: int) -> None:
    print(f"offsets per label position: {' '.join(f'{x:+.2f}' for x in result['offsets'])}")
    print(f"top-1 agreement, {n_fit} fit requests:      {result['fit'][0]:.3f} -> {result['fit'][1]:.3f}")
    print(f"top-1 agreement, {n_held} held-out requests: {result['held_out'][0]:.3f} -> {result['held_out'][1]:.3f}")
    k = min(10, len(result["offsets"]) // 2)
    print(f"top-{k} overlap with the prefill, {n_held} held-out requests: "
          + ", ".join(f"{name} {v:.3f}" for name, v in result["held_out_overlap"].items())
          + " (offsets: none; added to every score; choosing the first place, as served)")
    if result["halves"]:
        gains = [after - before for before, after in result["halves"]]
        print(f"random halves ({len(gains)}), held-out gain: mean {sum(gains) / len(gains):+.3f}, "
              f"min {min(gains):+.3f}, max {max(gains):+.3f}")  # fmt: skip
    print("top choice by label position, prefill:", result["top_by_position"]["full"])
    print("top choice by label position, policy: ", result["top_by_position"]["policy"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--policy", default="tail:2")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--fit", type=int, default=300)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--fit-seed", type=int, default=3)
    parser.add_argument("--eval-seed", type=int, default=2)
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=Path, help="write the collected log-scores here (JSON)")
    parser.add_argument("--from-rows", type=Path, help="analyse log-scores collected before instead of a model")
    args = parser.parse_args(argv)
    if args.from_rows:
        data = json.loads(args.from_rows.read_text())
        if not {"fit", "held_out"} <= data.keys():
            raise SystemExit(f"{args.from_rows}: not written by --rows (no 'fit' and 'held_out')")
    elif args.model:
        torch.set_num_threads(args.threads)
        collected = [collect(args.model, args.dataset, n, seed, args.history, args.candidates, args.policy)
                     for n, seed in ((args.fit, args.fit_seed), (args.eval, args.eval_seed))]  # fmt: skip
        data = {"model": args.model, "dataset": args.dataset, "policy": args.policy, "fit": collected[0],
                "held_out": collected[1]}  # fmt: skip
        if args.rows:
            args.rows.write_text(json.dumps(data))
    else:
        parser.error("pass --model (to collect) or --from-rows")
    try:
        result = analyse(data["fit"], data["held_out"], args.splits)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    report(result, len(data["fit"]), len(data["held_out"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
