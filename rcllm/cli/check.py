"""``rcllm check``: one policy's fidelity to full prefill, or (``--sweep``) the gate that writes a
model's default policy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from rcllm.cli import (
    DATA_DIR_HELP,
    DATASET_HELP,
    DEFAULT_CANDIDATES,
    DEFAULT_HISTORY,
    DEFAULT_MODEL,
    GATED_POLICY_HELP,
    MODEL_HELP,
    POLICY_HELP,
)
from rcllm.cli.common import console, err, fail, set_threads


def check(
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    policy: Optional[str] = typer.Option(
        None, help=POLICY_HELP + GATED_POLICY_HELP
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
        "reference. Default: none and a few boundary:K, tail:K and deviation:R (rcllm.eval.check.DEFAULT_SWEEP)."
    ),
    prompts: int = typer.Option(20, min=1, help="Number of sample ranking prompts (held-out requests)."),
    fit_offsets: int = typer.Option(
        0, min=0, help="With --sweep: first fit one offset per label position for each policy (its own preference for "
        "some labels as its top choice, which plain prefill does not share) on this many requests of other users "
        "(those that follow the gate's in its seeded order); the offsets then choose each policy's first place (the "
        "rest keep its order), the gate measures the policies so, the policy file keeps them, and serve, eval and "
        "demo apply them to prompts of --candidates candidates. 0: no offsets.",
    ),
    history: int = typer.Option(DEFAULT_HISTORY, min=0, help="History items per prompt."),
    candidates: int = typer.Option(DEFAULT_CANDIDATES, min=2, max=26, help="Candidates per prompt."),
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
            fail("--policy names one policy to check; --sweep measures the grid given by --policies")
        _check_sweep(model, dataset, data_dir, policies, prompts, history, candidates, calibration, max_hr_delta,
                     min_top1, device, dtype, seed, threads, as_json, fit_offsets)
        return
    if fit_offsets:
        fail("--fit-offsets fits offsets for the gate: use it with --sweep")
    set_threads(threads)
    try:
        ranker = open_ranker(model, device=device, dtype=dtype, calibration=calibration)
        chosen = default_policy(ranker.engine.lm.path, ranker.engine.lm.fingerprint) if policy is None else None
        cases = sample_cases(
            load_dataset(dataset, data_dir=data_dir), prompts, history, candidates, seed, text=ranker.builder.item_text
        )
        report = run_check(
            ranker, cases, policy or chosen.policy, model, seed=seed, min_top1=min_top1, min_tau=min_tau,
            max_kl=max_kl, max_full_diff=max_logit_diff,
        )
    except (UnsupportedModelError, FileNotFoundError, ValueError) as e:
        fail(str(e))
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
                 min_top1, device, dtype, seed, threads, as_json, fit_offsets=0) -> None:
    """``rcllm check --sweep``: refuse what cannot be written before anything is measured."""
    from rich.progress import Progress

    from rcllm.data.loaders import load_dataset
    from rcllm.engine import open_ranker
    from rcllm.engine.model_policy import model_folder
    from rcllm.engine.models import UnsupportedModelError
    from rcllm.eval.check import DEFAULT_SWEEP, Thresholds
    from rcllm.eval.gate import GateSettings, run_gate

    from rcllm.engine.policy import parse_policy

    folder = model_folder(model)
    if folder is None:
        fail(
            f"--sweep writes the chosen policy into the model's folder, and {model!r} is not a local folder: "
            f"download it into one first (e.g. `huggingface-cli download {model} --local-dir DIR`) and pass --model DIR"
        )
    if max_hr_delta < 0 or not 0 <= min_top1 <= 1:
        fail("--max-hr-delta must be >= 0 and --min-top1 between 0 and 1")
    try:
        grid = DEFAULT_SWEEP if policies is None else tuple(str(parse_policy(p)) for p in policies.split(",") if p.strip())
    except ValueError as e:
        fail(f"--policies: {e}")
    if not any(p != "full" for p in grid):
        fail("--policies names no policy besides full, the reference: nothing to choose from")
    settings = GateSettings(
        dataset=dataset, prompts=prompts, history=history, candidates=candidates, seed=seed, policies=grid,
        thresholds=Thresholds(max_hr_delta=max_hr_delta, min_top1=min_top1), offset_requests=fit_offsets,
    )
    set_threads(threads)
    try:
        # the gate fits its own offsets or measures none: an earlier file's are not read (nor need it be readable)
        ranker = open_ranker(model, device=device, dtype=dtype, calibration=calibration, label_offsets=False)
        data = load_dataset(dataset, data_dir=data_dir)
        if folder.exists() and not os.access(folder, os.W_OK):
            raise ValueError(f"{folder} is not writable: the chosen policy could not be written there")
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task(f"sweeping {len(settings.policies)} policies + full", total=None)
            outcome = run_gate(ranker, data, settings, model, folder,
                               progress=lambda done, total: progress.update(task, completed=done, total=total),
                               stage=lambda name: progress.update(task, description=name, completed=0, total=None))
    except (UnsupportedModelError, FileNotFoundError, ValueError) as e:
        fail(str(e))
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
            "label_offsets": outcome.offsets.to_json() if outcome.offsets else None,
            "undecided": _undecided(outcome, settings),
        }))
    else:
        _print_sweep(outcome, settings, model, data.name, folder)
    if not outcome.passed:
        raise typer.Exit(1)


def _undecided(outcome, settings) -> dict | None:
    """The judged policy (the choice, else the closest miss) and the thresholds its verdict sits
    too near for these requests to settle (95% intervals); None when there is no such policy."""
    from rcllm.eval.check import undecided

    row = outcome.choice.chosen or outcome.choice.closest
    if row is None or outcome.sweep.content_blind:
        return None
    return {"policy": row.policy, "thresholds": undecided(row, settings.thresholds, outcome.sweep.headline)}


def _print_sweep(outcome, settings, model: str, dataset: str, folder: Path) -> None:
    from rcllm.engine.model_policy import FALLBACK_POLICY, POLICY_FILE
    from rcllm.eval.check import gate_failures

    sweep, t = outcome.sweep, settings.thresholds
    k = sweep.headline
    table = Table(title=f"rcllm check --sweep: {model}, {sweep.prompts} held-out requests of {dataset}, "
                        f"{sweep.candidates} candidates (label-bias correction: {sweep.calibration}"
                        f"{', with fitted label offsets' if outcome.offsets else ''})")
    for column in ("policy", "HR@1", "HR@10", f"d{k.upper()}", "top-1 agree", "tau", "KL", "recomputed",
                   "prefill ms", "vs full", "front", "gate"):
        table.add_column(column, justify="left" if column in ("policy", "gate") else "right")
    chosen = outcome.choice.chosen.policy if outcome.choice.chosen else None
    for r in sweep.rows:
        failures = gate_failures(r, t, k)
        verdict = "reference" if r.policy == "full" else ("pass" if not failures else "; ".join(failures))
        name = f"[bold green]{r.policy}[/] *" if r.policy == chosen and outcome.passed else r.policy
        reuse = r.policy != "full"  # the reference's own intervals are zero
        table.add_row(
            name, f"{r.hr_at_1:.3f}", f"{r.hr_at_10:.3f}", _pm(r.delta(k), r.delta_ci(k) if reuse else None, "+.3f"),
            _pm(r.top1_agree, r.top1_agree_ci if reuse else None, ".3f"),
            f"{r.kendall_tau:.3f}", f"{r.kl:.4f}", f"{r.recomputed_fraction:.0%}", f"{r.prefill_ms:.1f}",
            f"{r.speedup:.2f}x", "yes" if r.pareto else "", verdict,
        )
    console.print(table)
    console.print(
        f"[dim]thresholds: |d{k.upper()}| <= {t.max_hr_delta:g}, top-1 agreement >= {t.min_top1:g}; front: no other "
        "policy is as faithful (top-1, dHR, KL) for less recomputed; content probe: after rotating the candidates the best "
        f"item stayed on top in {sweep.top1_item_stable:.0%} of requests, the best label in {sweep.top1_label_stable:.0%}; "
        "+/-: half-width of the 95% interval over the requests[/]"
    )
    if outcome.offsets is not None:
        fit = outcome.offsets
        console.print(
            f"[dim]label offsets fitted on {fit.requests} requests of other users (prompts of {fit.candidates} "
            "candidates); top-1 agreement there without -> with them: "
            + ", ".join(f"{p} {fit.top1_before[p]:.3f} -> {fit.top1_after[p]:.3f}" for p in fit.offsets) + "[/]"
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
    judged = _undecided(outcome, settings)
    if judged and judged["thresholds"]:
        console.print(
            f"[yellow]not settled:[/] {sweep.prompts} requests do not decide {judged['policy']}'s verdict at 95%: "
            + "; ".join(judged["thresholds"]) + ". Another draw (--seed) may judge it the other way; more requests "
            "(--prompts) narrow the interval"
        )


def _pm(value: float, half_width: float | None, spec: str) -> str:
    """``value`` and, when there is one, the half-width of its 95% interval."""
    return f"{value:{spec}}" if half_width is None else f"{value:{spec}} +/-{half_width:.3f}"


def register(app: typer.Typer) -> None:
    """Add the ``check`` command to the ``rcllm`` app."""
    app.command()(check)
