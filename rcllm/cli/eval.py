"""``rcllm eval``: TTFT, HR@K and fidelity of full prefill, prefix caching and rcllm, in-process or
against a running coordinator (``--endpoint``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from rcllm.cli import (
    DATA_DIR_HELP,
    DATASET_HELP,
    DEFAULT_CANDIDATES,
    DEFAULT_HISTORY,
    DEFAULT_MODEL,
    FALLBACK_POLICY,
    MODEL_HELP,
)
from rcllm.cli.common import console, err, fail, set_threads
from rcllm.files import write_file


def eval_command(
    dataset: str = typer.Option("ml-100k", help=DATASET_HELP),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    users: int = typer.Option(200, min=1, help="Sampled test users."),
    requests_per_user: int = typer.Option(3, min=1, help="Requests per user (fresh negatives each), interleaved."),
    candidates: int = typer.Option(DEFAULT_CANDIDATES, min=2, help="Candidates per request: the positive plus C-1 negatives."),
    history: int = typer.Option(DEFAULT_HISTORY, min=0, help="History items per request (most recent)."),
    negatives: str = typer.Option("popularity", help="Negative sampling: popularity | uniform."),
    systems: Optional[str] = typer.Option(
        None, help="Systems to compare, comma-separated: full, prefix, rcllm:POLICY. Default: full, prefix, rcllm "
        f"with the model's gated policy (its rcllm-policy.json, else {FALLBACK_POLICY}), rcllm:deviation:0.15, rcllm:none.",
    ),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    cache: Optional[Path] = typer.Option(
        None, help="A cache built by `rcllm build-cache` to read blocks from (never written), or a folder for eval's "
        "own blocks. Eval computes only the blocks its requests read that no cache holds, into that folder or "
        "(default) one under the user cache, after saying how many, how much disk and time they take.",
    ),
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
    from rcllm.store import StoreBusyError

    set_threads(threads)
    settings = EvalSettings(
        users=users, requests_per_user=requests_per_user, candidates=candidates, history=history,
        negatives=negatives, seed=seed, hot_tier_bytes=hot_tier_mb << 20,
    )
    if endpoint is not None:
        if systems is None:
            fail("with --endpoint, name the systems to run (--systems): the servers' model and its policy are theirs")
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
                blocks = progress.add_task("blocks", total=None)
                source = prepare_block_source(
                    ranker, data, settings, cache, requests=requests, note=lambda message: err.print(message, markup=False),
                    progress=lambda done, total: progress.update(blocks, completed=done, total=total),
                )
                task = progress.add_task("ranking", total=None)
                result = run_eval(
                    ranker, data, systems, settings, source, model_name=model, device=device, requests=requests,
                    progress=lambda name: progress.update(task, advance=1, description=f"ranking ({name})"),
                )
        except (FileNotFoundError, ValueError, StoreBusyError) as e:
            fail(str(e))
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
        fail(str(e))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, json.dumps(data, indent=2))


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to the ``rcllm`` app."""
    app.command("eval")(eval_command)
