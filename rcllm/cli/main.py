"""The ``rcllm`` command: thin wrappers that parse flags, call the library and print."""

from __future__ import annotations

import json
import os
import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="rcllm: reuse the KV cache of any prompt block (history, items) for fast LLM recommendation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Manage models (the embedded default and your own).", no_args_is_help=True)
app.add_typer(model_app, name="model")

console = Console()
err = Console(stderr=True)

MODEL_HELP = "Model: the embedded 'smollm2-135m', a local folder, or a Hugging Face id."
POLICY_HELP = "Correction policy: none | boundary:K | deviation:R | full."


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


@model_app.command("pull")
def model_pull(name: str = typer.Argument("smollm2-135m", help="Embedded model to convert to a safetensors folder.")) -> None:
    """Convert an embedded model once into the user cache and print its folder."""
    from rcllm.engine.models import EMBEDDED_MODELS, pull_embedded

    if name not in EMBEDDED_MODELS:
        _fail(f"unknown embedded model {name!r}; embedded: {', '.join(EMBEDDED_MODELS)}")
    try:
        path = pull_embedded(name)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    print(path)


@app.command()
def check(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    policy: str = typer.Option("boundary:4", help=POLICY_HELP),
    prompts: int = typer.Option(20, min=1, help="Number of sample ranking prompts."),
    history: int = typer.Option(20, min=0, help="History items per prompt."),
    candidates: int = typer.Option(20, min=2, max=26, help="Candidates per prompt."),
    calibration: str = typer.Option("contextual", help="Label-bias correction: contextual | none."),
    min_top1: float = typer.Option(0.9, help="Fail below this top-1 agreement with full prefill."),
    min_tau: float = typer.Option(0.9, help="Fail below this mean Kendall tau with full prefill."),
    max_kl: float = typer.Option(0.05, help="Fail above this mean KL(full || policy) of label distributions."),
    max_logit_diff: float = typer.Option(1e-3, help="Fail if full prefill (or policy full) differs by more."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16."),
    seed: int = typer.Option(0, help="Seed for prompt sampling and shuffles."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: torch's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Correctness gate: a policy's fidelity to full prefill on sample ml-100k ranking prompts."""
    from rcllm.data.movielens import load_ml100k_recbole
    from rcllm.engine import open_ranker
    from rcllm.engine.check import run_check, sample_cases
    from rcllm.engine.models import UnsupportedModelError

    _set_threads(threads)
    try:
        ranker = open_ranker(model, device=device, dtype=dtype, calibration=calibration)
        cases = sample_cases(load_ml100k_recbole(), prompts, history, candidates, seed)
        report = run_check(
            ranker, cases, policy, model, seed=seed, min_top1=min_top1, min_tau=min_tau,
            max_kl=max_kl, max_full_diff=max_logit_diff,
        )
    except (UnsupportedModelError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    data = report.to_json()
    if as_json:
        print(json.dumps(data))
    else:
        table = Table(title=f"rcllm check: {model}, policy {report.policy}, {report.prompts} prompts")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for key, value in data.items():
            if key in ("model", "policy", "prompts", "failures"):
                continue
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)
        if report.content_blind:
            console.print(
                "[yellow]warning:[/] the model's answer follows the label, not the candidates "
                f"(best label kept on shuffle {report.top1_label_stable:.0%}, best item {report.top1_item_stable:.0%}): "
                "agreement figures on it say nothing about fidelity. Fine-tune it (rcllm finetune) first."
            )
        for failure in report.failures:
            console.print(f"[red]FAIL[/] {failure}")
        if not report.failures:
            console.print("[green]PASS[/]")
    if report.failures:
        raise typer.Exit(1)


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    users: int = typer.Option(6, min=1, help="Sampled ml-100k users, one ranking request each."),
    policy: str = typer.Option("boundary:4", help=POLICY_HELP),
    threads: int = typer.Option(2, help="Torch CPU threads (0: torch's default)."),
    seed: int = typer.Option(0, help="Seed for user and negative sampling."),
) -> None:
    """Rank ml-100k users on the embedded model: plain prefill vs cached blocks."""
    from rich.progress import Progress

    from rcllm.demo import run_demo
    from rcllm.engine import open_ranker

    _set_threads(threads)
    try:
        ranker = open_ranker(model)
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("precompute blocks, then rank", total=2 * users)
            result = run_demo(ranker, users=users, policy=policy, seed=seed, progress=lambda: progress.advance(task))
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    items = result.dataset.items
    for req, ranking in list(zip(result.requests, result.reused))[:3]:
        console.print(f"\n[bold]user {req.user_id}[/] recently chose: " + "; ".join(items[i]["title"] for i in req.history[-5:]))
        for place, slot in enumerate(ranking.order[:5], start=1):
            item_id = req.candidates[slot]
            mark = "  [green]<- held-out next item[/]" if item_id == req.positive else ""
            console.print(f"  {place}. {items[item_id]['title']}  [dim]({ranking.scores[slot]:.3f})[/]{mark}")
    table = Table(title=f"time to first token (= ranking latency), {users} requests, CPU x{threads}")
    table.add_column("system")
    table.add_column("mean ms", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("speed-up", justify="right")
    base = result.timings["full"]["mean"]
    for name, t in result.timings.items():
        table.add_row(name, f"{t['mean']:.1f}", f"{t['p50']:.1f}", f"{base / t['mean']:.2f}x")
    console.print(table)
    f = result.fidelity
    console.print(
        f"blocks precomputed in {result.precompute_s:.1f}s ({result.cache_bytes / 2**20:.1f} MiB of KV); "
        f"recomputed {f['recomputed_fraction']:.0%} of token-layers; vs full prefill: top-1 agreement "
        f"{f['top1_agree']:.2f}, Kendall tau {f['kendall_tau']:.2f} (bias-corrected scores)."
    )
    console.print(
        "[dim]The embedded 135M model does not rank zero-shot; its ranking is near chance. "
        "See README: rcllm check reports whether a model's ranking depends on the candidates.[/]"
    )


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
