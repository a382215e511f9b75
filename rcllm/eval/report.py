"""How an eval result is shown: a rich table, and a PNG of latency and quality per system."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from rcllm.data.metrics import headline_hit_rate
from rcllm.files import fill_file


def result_tables(result: dict) -> tuple[Table, Table]:
    """Latency and cache behaviour per system; then quality, fidelity and the model-free baselines."""
    where = (
        f"via {result['endpoint']} at concurrency {result['concurrency']}" if "endpoint" in result
        else f"{result['model']} on {result['device']}"
    )
    title = (
        f"rcllm eval: {result['dataset']}, {result['n_requests']} requests from {result['n_users']} users, "
        f"{result['candidates']} candidates, {where}"
    )
    systems = result["systems"]
    base = systems["full"]["ttft_ms"]["mean"] if "full" in systems else None
    served = any("latency_ms" in s for s in systems.values())  # --endpoint: client-side figures too
    latency = Table(title=title)
    columns = ["system", "TTFT mean ms", "p50", "p90", "p99", "vs full", "user hit", "item hit", "recomputed"]
    if served:
        columns += ["end-to-end mean ms", "e2e p99", "req/s", "errors"]
    for column in columns:
        latency.add_column(column, justify="left" if column == "system" else "right")
    for name, s in systems.items():
        t = s["ttft_ms"]
        row = [
            name, f"{t['mean']:.1f}", f"{t['p50']:.1f}", f"{t['p90']:.1f}", f"{t['p99']:.1f}",
            f"{base / t['mean']:.2f}x" if base else "-",
            f"{s['hit_ratio']['user']:.2f}", f"{s['hit_ratio']['item']:.2f}", f"{s['recomputed_fraction']:.0%}",
        ]
        if served:
            e2e = s.get("latency_ms")
            row += [f"{e2e['mean']:.1f}", f"{e2e['p99']:.1f}", f"{s['throughput_rps']:.2f}", str(s["errors"])] if e2e \
                else ["-"] * 4
        latency.add_row(*row)
    quality = Table(title=f"quality and fidelity to full prefill (label-bias correction: {result['calibration']})")
    k = headline_hit_rate(result["candidates"])  # the change of HR@10 says nothing when C <= 10
    for column in ("system", "HR@1", "HR@5", "HR@10", "NDCG@10", "MRR", "top-1 agree", "tau", "KL", f"d{k.upper()}"):
        quality.add_column(column, justify="left" if column == "system" else "right")
    for name, s in systems.items():
        f = s.get("fidelity")
        quality.add_row(
            name, f"{s['hr@1']:.3f}", f"{s['hr@5']:.3f}", f"{s['hr@10']:.3f}", f"{s['ndcg@10']:.3f}", f"{s['mrr']:.3f}",
            *([f"{f['top1_agree']:.3f}", f"{f['kendall_tau']:.3f}", f"{f['kl']:.4f}", f"{f[k + '_delta']:+.3f}"]
              if f else ["-"] * 4),
        )
    for name, b in result["baselines"].items():
        quality.add_row(f"[dim]{name} ({'expected' if name == 'random' else 'no model'})[/]", f"{b['hr@1']:.3f}", f"{b['hr@5']:.3f}", f"{b['hr@10']:.3f}",
                        f"{b['ndcg@10']:.3f}", f"{b['mrr']:.3f}", "", "", "", "")
    return latency, quality


def print_result(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    for table in result_tables(result):
        console.print(table)


def plot_result(result: dict, path: str | Path) -> Path:
    """TTFT per system and HR@10 (HR@1 when every candidate fits in the top 10) per system, with
    the random and popularity lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    systems = result["systems"]
    names = list(systems)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    means = [systems[n]["ttft_ms"]["mean"] for n in names]
    p50 = [systems[n]["ttft_ms"]["p50"] for n in names]
    p99 = [systems[n]["ttft_ms"]["p99"] for n in names]
    x = range(len(names))
    ax1.bar(x, means, color="#4c72b0", label="mean")
    ax1.errorbar(x, p50, yerr=[[0] * len(names), [b - a for a, b in zip(p50, p99)]], fmt="o", color="black",
                 capsize=4, label="p50 to p99")
    if all("latency_ms" in systems[n] for n in names):  # --endpoint: what the client waited, queueing included
        ax1.plot(list(x), [systems[n]["latency_ms"]["mean"] for n in names], "x", color="#c44e52", markersize=9,
                 label="end-to-end mean")
    ax1.set_xticks(list(x), names, rotation=20, ha="right")
    ax1.set_ylabel("time to first token (ms)")
    ax1.set_title("latency")
    ax1.legend()
    k = headline_hit_rate(result["candidates"])
    ax2.bar(x, [systems[n][k] for n in names], color="#55a868")
    for base, style in (("random", ":"), ("popularity", "--")):
        ax2.axhline(result["baselines"][base][k], linestyle=style, color="gray", label=base)
    ax2.set_xticks(list(x), names, rotation=20, ha="right")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel(k.upper())
    ax2.set_title(f"quality ({result['dataset']}, {result['candidates']} candidates)")
    ax2.legend()
    fig.tight_layout()
    try:
        fill_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # tmp ends in .tmp, not .png
    finally:
        plt.close(fig)
    return path
