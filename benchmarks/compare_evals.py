"""Side by side: what the same reuse policies do on different models (e.g. before and after
block-aware fine-tuning), from the JSON files of ``rcllm eval`` runs on the same request stream.

    rcllm eval --dataset synthetic --model syn-full --candidates 8 --history 8 --users 60 \\
        --requests-per-user 1 --json off.json
    rcllm eval ... --model syn-mix --json mix.json
    .venv/bin/python benchmarks/compare_evals.py off.json mix.json --labels "block-aware off,mix"

For every system the evaluations share, one row: its hit rate (HR@1 when C <= 10, else HR@10)
and MRR in each file, and for the reuse systems their fidelity to ``full`` in that file (top-1
agreement, Kendall tau on bias-corrected scores, the change of the hit rate). The files must
come from the same dataset, candidate count, seed and users, or the comparison is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rcllm.data.metrics import headline_hit_rate

SAME = ("dataset", "candidates", "seed", "n_users", "n_requests", "calibration")


def load(paths: list[Path]) -> list[dict]:
    results = [json.loads(p.read_text()) for p in paths]
    for key in SAME:
        values = {json.dumps(r.get(key)) for r in results}
        if len(values) > 1:
            raise SystemExit(f"the evaluations differ in {key} ({', '.join(sorted(values))}): not comparable")
    return results


def table(results: list[dict], labels: list[str]) -> Table:
    k = headline_hit_rate(results[0]["candidates"])
    t = Table(title=f"{results[0]['dataset']}, {results[0]['n_requests']} requests, C = {results[0]['candidates']}")
    t.add_column("system")
    for label in labels:
        for column in (k.upper(), "MRR", "top-1", "tau", f"d{k.upper()}"):
            t.add_column(f"{label}\n{column}", justify="right")
    names = [n for n in results[0]["systems"] if all(n in r["systems"] for r in results)]
    rows = [(n, [r["systems"][n] for r in results]) for n in names]
    rows += [(f"{n} (baseline)", [r["baselines"][n] for r in results]) for n in results[0]["baselines"]]
    for name, summaries in rows:
        cells = []
        for s, r in zip(summaries, results):
            f, full = s.get("fidelity"), r["systems"].get("full")
            cells += [f"{s[k]:.3f}", f"{s['mrr']:.3f}"]
            if f and full:  # the change of the hit rate against full on the same requests
                cells += [f"{f['top1_agree']:.2f}", f"{f['kendall_tau']:.2f}", f"{s[k] - full[k]:+.3f}"]
            else:
                cells += ["-"] * 3
        t.add_row(name, *cells)
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="eval JSON files (rcllm eval --json)")
    parser.add_argument("--labels", default="", help="comma-separated column labels (default: the model names)")
    args = parser.parse_args(argv)
    results = load(args.results)
    labels = args.labels.split(",") if args.labels else [Path(r["model"]).name for r in results]
    if len(labels) != len(results):
        parser.error(f"{len(labels)} labels for {len(results)} files")
    Console(width=max(120, 22 + 48 * len(results))).print(table(results, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
