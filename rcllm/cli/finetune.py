"""``rcllm finetune``: parse flags, call :func:`rcllm.train.train`, show progress and the result."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)

DATASET_HELP = "ml-1m | ml-100k | synthetic | a folder with catalog.jsonl and interactions.jsonl."
from rcllm.cli import DATA_DIR_HELP, DEFAULT_CANDIDATES, DEFAULT_HISTORY, DEFAULT_MODEL
from rcllm.data.metrics import headline_hit_rate

MODEL_HELP = f"Model to start from: the embedded '{DEFAULT_MODEL}', a local folder, or a Hugging Face id."


def finetune(
    dataset: str = typer.Option("ml-100k", help=DATASET_HELP),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    out: Path = typer.Option(
        Path("rcllm-model"), help="Output model folder (written whole at the end; a checkpoint goes to OUT.ckpt)."
    ),
    method: str = typer.Option("lora", help="lora (adapter, merged into the saved weights) | full."),
    steps: int = typer.Option(300, min=0, help="Optimizer steps (0: evaluate and save the model as it is)."),
    batch: int = typer.Option(8, min=1, help="Training prompts per step."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: 2e-4 for lora, 2e-5 for full)."),
    history: int = typer.Option(DEFAULT_HISTORY, min=0, help="History items per prompt (most recent)."),
    candidates: int = typer.Option(DEFAULT_CANDIDATES, min=2, max=26, help="Candidates per prompt: the positive plus C-1 negatives."),
    block_aware: str = typer.Option(
        "mix", help="Attention of cached reuse while training: on | mix (every other step) | off (plain causal)."
    ),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    seed: int = typer.Option(0, help="Seed for examples, negatives, validation users and initialisation."),
    eval_every: int = typer.Option(
        50, min=1, help="Validate every this many steps (and before the first, after the last)."
    ),
    val_users: int = typer.Option(100, min=1, help="Validation users (their second-to-last item is the target)."),
    lora_rank: int = typer.Option(16, min=1, help="LoRA rank (alpha is twice the rank)."),
    adapter_only: bool = typer.Option(
        False, help="With --method lora: write the adapter alone (a few MB) instead of merged weights. Opening the "
        "folder loads the base model (--model) and merges the adapter into it; the base must not change.",
    ),
    amp: str = typer.Option(
        "auto",
        help="bf16 autocast of the training forward (weights and optimizer stay fp32): auto (on for CUDA with bf16 "
        "and for CPUs with AVX512-BF16/AMX, where it is ~2x faster) | bf16 | off.",
    ),
    schedule: str = typer.Option(
        "cosine", help="Learning rate after a warm-up over the first tenth of the steps: cosine | linear (both decay "
        "towards 0 at the last step) | constant."
    ),
    train_layers: int = typer.Option(
        0, min=0, help="Train only the top N decoder layers (0: all). The backward pass stops at the first trained "
        "layer, so on a CPU a small N makes each step several times cheaper.",
    ),
    recent: int = typer.Option(
        10, min=0, help="Train on each user's N latest training interactions, users drawn uniformly (what eval "
        "asks: every user's latest item); 0: every interaction, users weighted by how many they have."
    ),
    link_tokens: Optional[int] = typer.Option(
        None, min=0, max=16, help="Fresh link tokens after each item block, recomputed at serve time like the label: "
        "where a model trained for reuse compares each item with the history (default: the start model's template, "
        "else 0). Recorded in the model folder; caches and serving follow it.",
    ),
    instruction: Optional[str] = typer.Option(
        None, help="The text after the last candidate, which the answer letter follows (\\n: a newline). It is "
        "recomputed for every request, so a short one (e.g. '\\nAnswer:') leaves less to recompute (default: the "
        "start model's template's, else the built-in one). Recorded in the model folder; serving follows it.",
    ),
    categories_last: Optional[bool] = typer.Option(
        None, "--categories-last/--categories-inline", help="Item text as 'title; description; categories', so each "
        "item block ends with its categories and `tail:K` recomputes them (inline: 'title; categories; description'). "
        "Default: the start model's template's, else inline. Recorded in the model folder; caches and serving follow it.",
    ),
    teacher: Optional[str] = typer.Option(
        None, help="Distil block-aware steps from this model's plain prefill of the same prompt (e.g. a causal "
        "fine-tune): KL of the label distributions plus the hidden states of the fresh tokens. 'self': the model being "
        "trained, read with a plain prefill at each step (no gradient): reuse learns to follow the very prefill the "
        "gate compares it with. 'mutual': the plain prefill trains too (its own cross-entropy) and the KL runs both "
        "ways, so the prefill also learns to rank from what reuse can see. Default: no teacher.",
    ),
    distill_weight: float = typer.Option(1.0, min=0.0, help="Weight of the KL term (with --teacher)."),
    hidden_weight: float = typer.Option(1.0, min=0.0, help="Weight of the hidden-state term (with --teacher; 0: off)."),
    temperature: float = typer.Option(2.0, min=0.01, help="Softening temperature of the KL term (with --teacher)."),
    agree_weight: float = typer.Option(
        0.0, min=0.0, help="Weight of the cross-entropy of reuse's label distribution against the teacher's top "
        "choice (with --teacher): top-1 agreement, trained directly, near-ties included, where the KL barely sees "
        "a swap. 0: off.",
    ),
    agree_margin: float = typer.Option(
        0.0, min=0.0, help="With --agree-weight: make the agreement term a hinge, so reuse's logit of the teacher's "
        "top label must lead its best other label by this many nats and is left alone once it does (no sharpening of "
        "the rest). 0: cross-entropy.",
    ),
    match_weight: float = typer.Option(
        0.0, min=0.0, help="Weight of the match loss: at every label token, logit(yes) - logit(no) ranks the candidates "
        "(cross-entropy of the positive), so the comparison of item and history is learnt where reuse recomputes it. 0: off.",
    ),
    curriculum: int = typer.Option(
        0, min=0, help="Steps over which the recomputed tail of every item block shrinks from the whole "
        "item (a plain prefill) to nothing (reuse without correction), linearly; later steps train reuse as served. "
        "0: no curriculum.",
    ),
    tail_floor: int = typer.Option(
        0, min=0, help="Block-aware steps always recompute at least the last K tokens of every item block: the "
        "curriculum stops there and later steps train the `tail:K` policy as served. 0: down to nothing.",
    ),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    threads: int = typer.Option(0, help="Torch CPU threads (0: torch's default)."),
    resume: bool = typer.Option(False, help="Continue the interrupted run whose checkpoint is in OUT.ckpt."),
    checkpoint_minutes: float = typer.Option(
        10.0, min=0, help="Save a checkpoint in OUT.ckpt this often while training, so a run whose machine dies "
        "loses at most this much (--resume continues it). 0: only when the run is stopped (Ctrl-C, out of memory).",
    ),
    minutes: float = typer.Option(
        0.0, min=0, help="A budget of training time (validation not counted): the learning-rate schedule follows "
        "--steps or the minutes spent, whichever is further along, and the run ends, validates and writes the "
        "model when either runs out (training.json's stopped_by says which). 0: --steps alone.",
    ),
) -> None:
    """Fine-tune a ranker on the prompts it serves (time split; LoRA or full; block-aware attention)."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rcllm.engine.models import UnsupportedModelError
    from rcllm.train import TrainingInterrupted, TrainSettings, train
    from rcllm.train.report import mean_by_attention

    if threads > 0:
        torch.set_num_threads(threads)
    settings = TrainSettings(
        out=out, dataset=dataset, model=model, method=method, steps=steps, batch=batch, lr=lr, history=history,
        candidates=candidates, block_aware=block_aware, device=device, seed=seed, eval_every=eval_every,
        val_users=val_users, lora_rank=lora_rank, adapter_only=adapter_only, amp=amp, schedule=schedule, train_layers=train_layers, recent=recent,
        link_tokens=link_tokens, instruction=None if instruction is None else instruction.replace("\\n", "\n"),
        categories_last=categories_last, teacher=teacher, distill_weight=distill_weight, hidden_weight=hidden_weight,
        temperature=temperature, agree_weight=agree_weight, agree_margin=agree_margin, match_weight=match_weight, curriculum=curriculum, tail_floor=tail_floor, data_dir=data_dir, resume=resume,
        checkpoint_minutes=checkpoint_minutes, minutes=minutes,
    )
    k = headline_hit_rate(candidates)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    started = time.monotonic()
    try:
        with Progress(*columns, console=err) as progress:
            task = progress.add_task("fine-tuning", total=max(steps, 1), loss="-")
            # a log file gets no live bar: a plain line every twentieth of the run stands in for it
            every = 0 if err.is_terminal else max(1, steps // 20)
            window: list[tuple[float, bool]] = []  # (loss, block-aware step) since the last line
            extra: list[dict] = []  # grad norm and distillation terms since the last line

            def report(step: int, total: int, logs: dict) -> None:
                if "loss" in logs:
                    progress.update(task, loss=f"{logs['loss']:.3f}")
                    window.append((logs["loss"], logs.get("block_aware", False)))
                    extra.append({"grad_norm": logs.get("grad_norm", 0.0), **logs.get("parts", {})})
                progress.update(task, completed=step)
                if every and window and (step % every == 0 or step == total):
                    elapsed = time.monotonic() - started
                    losses = [loss for loss, _ in window]
                    # mix: the two halves learn at their own pace
                    split = f" ({_loss_split(mean_by_attention(window))})" if settings.block_aware == "mix" else ""
                    terms = "".join(
                        f", {name} {sum(e[name] for e in extra if name in e) / n:.3f}"
                        for name in ("tails", "ce_plain", "kl", "kl_back", "hidden", "match", "grad_norm")
                        if (n := sum(name in e for e in extra))
                    )
                    progress.console.print(
                        f"step {step}/{total}: mean loss {sum(losses) / len(losses):.3f}{split}{terms} over the last "
                        f"{len(window)} steps, {elapsed / 60:.1f} min elapsed"
                    )
                    window.clear()
                    extra.clear()
                if "val" in logs:
                    v = logs["val"]
                    reuse = "".join(
                        f", {m[k]:.3f} (cached blocks, policy {name.removeprefix('reuse_')}; "
                        f"top-1 agreement {m['top1_agree']:.2f})"
                        for name, m in v.items() if name.startswith("reuse_")
                    )
                    progress.console.print(
                        f"step {step}: validation {k.upper()} {v['contextual'][k]:.3f} (contextual), "
                        f"{v['none'][k]:.3f} (uncalibrated){reuse}"
                    )
                if "match_hr1" in logs:
                    m = logs["match_hr1"]
                    progress.console.print(
                        f"step {step}: candidates ranked by their label tokens' match score, HR@1 {m['plain']:.3f} "
                        f"(plain prefill), {m['reuse']:.3f} (cached blocks, policy none)"
                    )

            result = train(settings, progress=report)
    except TrainingInterrupted as stop:
        err.print(f"[yellow]{stop}[/]")
        raise typer.Exit(130 if stop.reason == "interrupted" else 1)
    except (UnsupportedModelError, FileNotFoundError, ValueError) as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2)
    _print_result(result.report, result.out)


def _loss_split(means: dict[str, float], suffix: str = "") -> str:
    """``causal 2.200, block-aware 3.030``: the mean loss of each kind of step."""
    return ", ".join(f"{kind}{suffix} {mean:.3f}" for kind, mean in means.items())


def _print_result(report: dict, out: Path) -> None:
    final = report["final"]["val"]
    stopped = " (--minutes spent)" if report.get("stopped_by") == "minutes" else ""
    table = Table(title=f"validation after {report['steps']} steps{stopped}, "
                        f"{report['data']['validation_users']} users, {report['settings']['candidates']} candidates")
    for column in ("ranker", "hr@1", "hr@10", "ndcg@10", "mrr"):
        table.add_column(column, justify="right" if column != "ranker" else "left")
    rows = [("model, contextual", final["contextual"]), ("model, uncalibrated", final["none"]),
            *((f"model, cached blocks ({name.removeprefix('reuse_')})", m) for name, m in final.items()
              if name.startswith("reuse_")),
            ("random (expected)", report["baselines"]["random"]), ("popularity", report["baselines"]["popularity"])]  # fmt: skip
    for name, m in rows:
        table.add_row(name, *(f"{m[c]:.3f}" for c in ("hr@1", "hr@10", "ndcg@10", "mrr")))
    console.print(table)
    split = report["final"].get("train_loss_by_attention") or {}
    if len(split) > 1:  # mix: whether the block-aware half learns as well as the causal one
        console.print(f"training loss since the previous validation: {_loss_split(split, ' steps')}")
    t = report["time"]
    rate = f"{t['steps_per_s']:.2f} steps/s, " if t["steps_per_s"] else ""
    console.print(
        f"{rate}training {t['training_seconds']:.0f} s, validation {t['validation_seconds']:.0f} s on "
        f"{report['machine']['device']}; model, training.json and training.png in {out}"
    )


def register(app: typer.Typer) -> None:
    """Add the ``finetune`` command to the ``rcllm`` app."""
    app.command("finetune")(finetune)
