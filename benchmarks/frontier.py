"""The fidelity/speed frontier of two models side by side (e.g. before and after training for reuse).

Each input is the JSON that ``rcllm check --sweep --json`` prints. Per model, every policy is a
point: recomputed share (cost) against top-1 agreement with full prefill and the change of the
headline hit rate (fidelity); the Pareto front is joined, the gate's thresholds drawn.

    rcllm check --model causal --sweep --dataset synthetic --candidates 5 --history 5 --json > before.json
    rcllm check --model reuse  --sweep --dataset synthetic --candidates 5 --history 5 --json > after.json
    python benchmarks/frontier.py before.json after.json --labels causal,reuse-trained --out frontier.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    if "frontier" not in data:
        raise SystemExit(f"{path}: not the output of rcllm check --sweep --json (no 'frontier')")
    return data


def _speedup(row: dict) -> str:
    """The row's speed-up over full, or ``-`` where the sweep left it out (timed on a busy machine)."""
    return "-" if row.get("speedup") is None else f"{row['speedup']:.1f}x"


def print_table(label: str, data: dict) -> None:
    k = data["headline"]
    print(f"\n{label}: {data['model']} on {data['dataset']}, {data['requests']} requests, C = {data['candidates']}")
    print(f"{'policy':<16} {k:>6} {'d' + k:>8} {'top-1':>6} {'tau':>6} {'KL':>7} {'recomp':>7} {'speed-up':>8}  front")
    for r in data["frontier"]:
        hr = r["hr_at_10"] if k == "hr@10" else r["hr_at_1"]
        delta = r["hr_at_10_delta"] if k == "hr@10" else r["hr_at_1_delta"]
        print(f"{r['policy']:<16} {hr:>6.3f} {delta:>+8.3f} {r['top1_agree']:>6.2f} {r['kendall_tau']:>6.2f} "
              f"{r['kl']:>7.3f} {r['recomputed_fraction']:>7.1%} {_speedup(r):>8}  {'*' if r['pareto'] else ''}")
    print(f"gate: {data['chosen'] or 'refused'}" + (f" ({data['refusal']})" if data.get("refusal") else ""))


def plot(runs: list[tuple[str, dict]], out: Path, min_top1: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2), sharey=True, squeeze=False)
    for ax, (label, data) in zip(axes[0], runs):
        rows = sorted(data["frontier"], key=lambda r: r["recomputed_fraction"])
        xs = [100 * r["recomputed_fraction"] for r in rows]
        ax.scatter(xs, [r["top1_agree"] for r in rows], color="tab:blue", zorder=3)
        for r, x in zip(rows, xs):
            ax.annotate(f"{r['policy']} ({_speedup(r)})", (x, r["top1_agree"]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
        front = [(x, r["top1_agree"]) for r, x in zip(rows, xs) if r["pareto"]]
        if front:
            ax.plot(*zip(*front), color="tab:blue", lw=1, alpha=0.6, label="Pareto front")
        ax.axhline(min_top1, color="tab:green", ls="--", lw=1, label=f"gate: top-1 >= {min_top1}")
        ax.axhline(1.0 / data["candidates"], color="tab:red", ls=":", lw=1, label="chance")
        ax.set_title(f"{label}: gate {data['chosen'] or 'refused'}", fontsize=10)
        ax.set_xlabel("recomputed share of token-layers (%)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("top-1 agreement with full prefill")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nplot: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path, help="JSON files of rcllm check --sweep --json")
    parser.add_argument("--labels", default="", help="comma-separated names, one per file")
    parser.add_argument("--out", type=Path, default=Path("frontier.png"))
    parser.add_argument("--min-top1", type=float, default=0.9)
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels else [p.stem for p in args.sweeps]
    if len(labels) != len(args.sweeps):
        raise SystemExit(f"{len(labels)} labels for {len(args.sweeps)} files")
    runs = [(label, load(path)) for label, path in zip(labels, args.sweeps)]
    for label, data in runs:
        print_table(label, data)
    plot(runs, args.out, args.min_top1)


if __name__ == "__main__":
    main()
