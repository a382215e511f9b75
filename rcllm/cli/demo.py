"""``rcllm demo``: build a cache, run a cluster, send requests, compare, shut down."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from rcllm.cli import DEFAULT_MODEL, GATED_POLICY_HELP, MODEL_HELP, POLICY_HELP
from rcllm.cli.common import RichReporter, console, err, fail


def demo(
    dataset: str = typer.Option(
        "bookshop", help="bookshop (48 example books, 24 readers; seconds to build) | ml-100k (1,682 movies; "
        "the first build takes ~10 min on 2 CPU cores) | a folder with catalog.jsonl and interactions.jsonl."
    ),
    out: Optional[Path] = typer.Option(
        None, help="Folder for the demo's inputs, cache and logs (default: ~/.cache/rcllm/demo/DATASET; reused)."
    ),
    nodes: int = typer.Option(2, min=1, max=8, help="Nodes to shard the item blocks over (one process each)."),
    requests: int = typer.Option(24, min=1, help="Ranking requests, one per sampled user (leave-one-out)."),
    candidates: int = typer.Option(
        5, min=2, max=26, help="Candidates per request: the held-out item + negatives (the bundled adapter was gated at 5)."
    ),
    history: int = typer.Option(5, min=0, help="History items per request (the bundled adapter was gated at 5)."),
    policy: Optional[str] = typer.Option(
        None, help=POLICY_HELP + GATED_POLICY_HELP
    ),
    model: Optional[str] = typer.Option(
        None, help=MODEL_HELP + " Default: examples/reuse-ranker, a LoRA adapter of the embedded model trained to rank "
        "and to keep its ranking under reuse (the embedded model alone ranks at chance)."
    ),
    concurrency: int = typer.Option(2, min=1, help="Requests in flight at once."),
    show: int = typer.Option(3, min=0, help="Users whose history and top-5 are printed."),
    seed: int = typer.Option(0, help="Seed for users, negatives and request order."),
) -> None:
    """Build a cache, start a cluster (nodes + coordinator), send a request stream, compare with
    full prefill and prefix caching, and shut everything down."""
    from rich.progress import Progress

    from rcllm.demo import DemoSettings, run_demo
    from rcllm.serve.cluster import ClusterError
    from rcllm.store import IncompatibleCacheError

    settings = DemoSettings(dataset=dataset, out=out, nodes=nodes, requests=requests, candidates=candidates,
                            history=history, policy=policy, model=model, concurrency=concurrency, seed=seed)
    try:
        with Progress(console=err, transient=True) as progress:
            result = run_demo(settings, reporter=RichReporter(progress), log=lambda m: progress.console.print(f"[dim]{m}[/]"))
    except KeyboardInterrupt:
        err.print("interrupted: the cluster is stopped and the cache is intact (a rerun resumes the build)")
        raise typer.Exit(130)
    except (FileNotFoundError, ValueError, IncompatibleCacheError, ClusterError, RuntimeError) as e:
        fail(str(e))
    _print_demo(result, settings, show)


def _print_demo(result, settings, show: int) -> None:
    items = result.dataset.items
    served = result.systems[f"rcllm:{result.policy}"]
    for req, ranking in list(zip(result.requests, served.rankings))[:show]:
        console.print(f"\n[bold]user {req.user_id}[/] recently chose: " + "; ".join(items[i]["title"] for i in req.history[-5:]))
        for place, item_id in enumerate(ranking[:5], start=1):
            mark = "  [green]<- the item they chose next[/]" if item_id == req.positive else ""
            console.print(f"  {place}. {items[item_id]['title']}{mark}")
    n = len(result.requests)
    table = Table(title=f"time to first token (= ranking latency), {n} requests, {settings.candidates} candidates")
    for column in ("system", "where", "mean ms", "p50 ms", "p90 ms", "speed-up", "end-to-end mean ms"):
        table.add_column(column, justify="left" if column in ("system", "where") else "right")
    base = result.systems["full"].stats(result.systems["full"].ttft_ms)["mean"]
    for name, run in result.systems.items():
        t = run.stats(run.ttft_ms)
        e2e = f"{run.stats(run.latency_ms)['mean']:.1f}" if run.latency_ms else "-"
        label = {"full": "full prefill", "prefix": "prefix caching"}.get(name, name)
        table.add_row(label, run.where, f"{t['mean']:.1f}", f"{t['p50']:.1f}", f"{t['p90']:.1f}",
                      f"{base / t['mean']:.2f}x", e2e)
    console.print(table)
    f, h = result.fidelity, result.hit_ratio
    console.print(f"rcllm's policy {result.policy}: {result.policy_reason}")
    console.print(
        f"rcllm vs full prefill: top-1 agreement {f['top1_agree']:.2f}, Kendall tau {f['kendall_tau']:.2f}; "
        f"recomputed {f['recomputed_fraction']:.0%} of prompt tokens."
    )
    routed = ", ".join(f"node {k}: {v}" for k, v in result.per_node.items())
    console.print(f"cache hits: user blocks {h['user']:.0%}, item blocks {h['item']:.0%} (a miss is fetched from the "
                  f"peer holding it or recomputed); requests per node: {routed}.")
    rates = {name: result.hit_rates[name] for name in ("full", f"rcllm:{result.policy}")}
    ks = sorted(next(iter(rates.values())))
    shown = " / ".join(f"top {k}" for k in ks)
    console.print(
        f"the item each reader chose next, ranked in the {shown}: "
        + "; ".join(f"{'full prefill' if n == 'full' else n} " + " / ".join(f"{r[k]:.2f}" for k in ks) for n, r in rates.items())
        + "; random " + " / ".join(f"{min(1.0, k / settings.candidates):.2f}" for k in ks) + "."
    )
    if settings.model == DEFAULT_MODEL:
        console.print(
            "[dim]The embedded 135M model does not rank zero-shot (its ranking is near chance); a model fine-tuned with "
            "`rcllm finetune` does. Agreement figures on a content-blind model say little: see `rcllm check`.[/]"
        )
    console.print(f"cache: {result.cache}  (built in {result.build_seconds:.1f} s; `rcllm cache info {result.cache}`)")
    console.print(f"logs:  {result.logs}  (cluster stopped: {', '.join(f'{k} exit {v}' for k, v in result.exit_codes.items())})")


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to the ``rcllm`` app."""
    app.command()(demo)
