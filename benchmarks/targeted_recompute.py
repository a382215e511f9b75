"""Where does reuse lose the prefill's top choice? Recompute chosen item blocks in full and see.

For each of ``--requests`` held-out requests (seed ``--seed``) of a dataset, the model's label
log-scores under a plain prefill and under ``--policy``; then under the policy again with some item
blocks recomputed in full (their tokens fresh, so they attend to the history and every item before
them): the policy's own top 2, 5 and 10 items, and an oracle pair (the prefill's top item and the
policy's), which no server could know in advance. Printed: top-1 agreement with the prefill,
top-10 overlap and recomputed share for each, and what a second pass would buy if only requests
whose policy margin (top-1 minus top-2 log-score) is below a threshold recomputed their top 2.

If recomputing the two items in contention restores the top choice, the loss sits in those
blocks and a targeted second pass could serve it; if even the top 10 do not, every stale block
shares it and only training removes it.

    python benchmarks/targeted_recompute.py --model examples/ml100k-ranker --dataset ml-100k --candidates 20 \\
        --history 10 --requests 200 --seed 2 --rows rows.json     # ~25 min on 2 cores
    python benchmarks/targeted_recompute.py --from-rows rows.json  # the analysis again, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

VARIANTS = {"top2": 2, "top5": 5, "top10": 10, "oracle": None}  # None: the prefill's top item and the policy's
MARGINS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def freshen(segments: list, slots: list[int]) -> list:
    """The prompt with the item blocks of candidate ``slots`` recomputed in full (fresh tokens)."""
    from rcllm.engine.blocks import Segment

    items = [i for i, s in enumerate(segments) if s.name == "item"]
    out = list(segments)
    for slot in slots:
        s = segments[items[slot]]
        out[items[slot]] = Segment.fresh(s.token_ids, s.name)
    return out


def collect(model: str, dataset: str, n: int, seed: int, history: int, candidates: int, policy: str,
            variants: dict[str, int | None] = VARIANTS) -> list[dict]:  # fmt: skip
    """Per request: the calibrated label log-scores (candidate order) of a plain prefill, of
    ``policy``, and of ``policy`` with each variant's item blocks recomputed; each variant's
    recomputed share; the held-out item's slot."""
    from rcllm.data.loaders import load_dataset
    from rcllm.engine import MemoryBlockCache, open_ranker
    from rcllm.engine.blocks import uncached
    from rcllm.eval.check import sample_cases
    from rcllm.eval.gate import log_scores

    ranker = open_ranker(model, label_offsets=False)  # the policy's own scores, whatever a gate fitted
    cases = sample_cases(load_dataset(dataset), n, history, candidates, seed, text=ranker.builder.item_text)
    source = MemoryBlockCache(ranker.engine, ranker.builder)

    def scores(segments, name) -> tuple[list[float], float]:
        """The label log-scores the gate judges (its rankings'), and the recomputed share."""
        result = ranker.engine.forward(segments, name, logit_ids=ranker.logit_ids)
        ranking = ranker.make_ranking(result, sum(s.name == "item" for s in segments), name, result.prefill_ms)
        return log_scores([ranking])[0].tolist(), result.recomputed_fraction

    rows = []
    for case in cases:
        segments = ranker.segments(case.history, case.candidates, source)[0]
        full, _ = scores(uncached(segments), "full")
        reuse, share = scores(segments, policy)
        row = {"positive": case.positive, "full": full, "policy": reuse, "recomputed": {"policy": share}}
        order = sorted(range(len(reuse)), key=lambda i: -reuse[i])
        for name, k in variants.items():
            slots = sorted({_argmax(full), order[0]}) if k is None else order[:k]
            row[name], row["recomputed"][name] = scores(freshen(segments, slots), policy)
        rows.append(row)
    return rows


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


def _top(xs: list[float], k: int) -> set[int]:
    return set(sorted(range(len(xs)), key=lambda i: -xs[i])[:k])


def analyse(rows: list[dict]) -> dict:
    """Per variant: top-1 agreement, top-10 overlap, recomputed share, HR@10 change; and the
    escalation table (second pass on the policy's top 2 below each margin)."""
    if not rows:
        raise ValueError("no requests to analyse")
    names = ["policy"] + [n for n in rows[0] if n in VARIANTS]
    k = min(10, len(rows[0]["full"]))
    hr_full = statistics.fmean(r["positive"] in _top(r["full"], k) for r in rows)

    def measure(chosen: list[list[float]]) -> dict:  # one score list per request
        return {
            "top1": statistics.fmean(_argmax(s) == _argmax(r["full"]) for s, r in zip(chosen, rows)),
            "overlap": statistics.fmean(len(_top(s, k) & _top(r["full"], k)) / k for s, r in zip(chosen, rows)),
            "hr_delta": statistics.fmean(r["positive"] in _top(s, k) for s, r in zip(chosen, rows)) - hr_full,
        }

    variants = {name: {**measure([r[name] for r in rows]),
                       "recomputed": statistics.fmean(r["recomputed"][name] for r in rows)} for name in names}  # fmt: skip
    escalation = []
    if "top2" in names:
        margins = [a - b for a, b in (sorted(r["policy"], reverse=True)[:2] for r in rows)]
        for m in MARGINS:
            row = measure([r["top2"] if g < m else r["policy"] for r, g in zip(rows, margins)])
            row["margin"], row["escalated"] = m, statistics.fmean(g < m for g in margins)
            escalation.append(row)
    return {"k": k, "variants": variants, "escalation": escalation}


def report(result: dict, n: int) -> None:
    k = result["k"]
    print(f"{n} requests; item blocks recomputed in full on top of the policy:")
    print(f"{'variant':8s} {'top-1':>6s} {'top-' + str(k) + ' overlap':>15s} {'dHR@' + str(k):>8s} {'recomputed':>11s}")
    for name, v in result["variants"].items():
        print(f"{name:8s} {v['top1']:6.3f} {v['overlap']:15.3f} {v['hr_delta']:+8.3f} {v['recomputed']:11.1%}")
    if result["escalation"]:
        print("a second pass on the policy's top 2, only below a margin (nats):")
        for e in result["escalation"]:
            print(f"  margin < {e['margin']:<4g} escalated {e['escalated']:5.1%}  top-1 {e['top1']:.3f}  "
                  f"dHR@{k} {e['hr_delta']:+.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--policy", default="tail:2")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=Path, help="write the collected log-scores here (JSON)")
    parser.add_argument("--from-rows", type=Path, help="analyse log-scores collected before instead of a model")
    args = parser.parse_args(argv)
    if args.from_rows:
        data = json.loads(args.from_rows.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise SystemExit(f"{args.from_rows}: not written by --rows (no 'rows')")
    elif args.model:
        torch.set_num_threads(args.threads)
        rows = collect(args.model, args.dataset, args.requests, args.seed, args.history, args.candidates, args.policy)
        data = {"model": args.model, "dataset": args.dataset, "policy": args.policy, "seed": args.seed, "rows": rows}
        if args.rows:
            args.rows.write_text(json.dumps(data))
    else:
        parser.error("pass --model (to collect) or --from-rows")
    try:
        result = analyse(data["rows"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"cannot analyse these rows: {exc}") from None
    report(result, len(data["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
