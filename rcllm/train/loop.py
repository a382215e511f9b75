"""``rcllm finetune``: LoRA or full fine-tuning of a ranker on the prompts it will serve.

One step draws a batch of training examples (:mod:`rcllm.train.examples`), encodes them with
the serving prompt code, runs the plain or block-aware forward (:mod:`rcllm.train.forward`) and
minimises the cross-entropy of the positive's label over the candidates' label tokens. Every
``eval_every`` steps (and before the first and after the last) the serving ranker ranks the
validation requests on the weights being trained. The result is a plain model folder (a LoRA
adapter is merged) that :func:`rcllm.engine.models.load_model` opens, with ``training.json`` and
``training.png`` beside the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from rcllm.data.dataset import Dataset
from rcllm.engine.forward import BlockEngine
from rcllm.engine.models import (
    LoadedModel,
    adapter_rank,
    is_adapter_folder,
    load_adapter_base,
    load_model,
    state_dict_hash,
    write_adapter,
)
from rcllm.engine.prompt import TEMPLATE_FILE, PromptBuilder, PromptTemplate, model_template
from rcllm.engine.ranker import Ranker
from rcllm.files import write_folder
from rcllm.train.checkpoint import (
    checkpoint_dir,
    deferred_interrupt,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from rcllm.train.examples import ExampleStream, PromptEncoder
from rcllm.train.forward import (
    agreement_loss,
    answer_logits,
    collate,
    distill_loss,
    hidden_loss,
    label_loss,
    match_loss,
    match_scores,
    probe_match,
    probe_label_attention,
)
from rcllm.train.settings import (
    DISTILL_LOSS,
    LORA_TARGETS,
    LOSS,
    PLOT_FILE,
    REPORT_FILE,
    RESUME_KEYS,
    MUTUAL_TEACHER,
    SELF_TEACHER,
    Progress,
    TrainSettings,
)
from rcllm.train.report import losses_by_attention, machine, plot_training
from rcllm.train.validate import baselines, validate

def _template(start_path: str, settings: TrainSettings) -> PromptTemplate:
    """The prompt template of the run: the start model's (a folder from an earlier run records
    its own), with ``--link-tokens``, ``--instruction`` and ``--categories-last`` when given."""
    start = (model_template(start_path) if os.path.isdir(start_path) else None) or PromptTemplate()
    data = start.to_dict()
    if settings.link_tokens is not None:
        data["link_tokens"] = settings.link_tokens
    if settings.instruction is not None:
        data["instruction"] = settings.instruction
    if settings.categories_last is not None:
        data["categories_last"] = settings.categories_last
    return PromptTemplate.from_dict(data)


def _continued_adapter(settings: TrainSettings) -> Path | None:
    """The adapter folder a ``--method lora --adapter-only`` run starts from, which it trains further
    (rather than stacking a new adapter on its merged weights); None for any other run."""
    if not (settings.method == "lora" and settings.adapter_only):
        return None
    folder = Path(settings.model).expanduser()
    return folder.resolve() if folder.is_dir() and is_adapter_folder(folder) else None


def stream_start(model_path: str) -> int:
    """Where a run's example stream starts: after the examples its start model was trained on,
    when that model is a folder ``rcllm finetune`` wrote (its ``training.json``), else 0.

    The stream is a pure function of (seed, step), so a run continuing a fine-tune from step 0
    would draw exactly the examples its parent drew first — a second epoch over them instead of
    new ones. Continuing the parent's stream keeps every example new (until the data runs out)."""
    report = Path(model_path) / REPORT_FILE
    if not report.is_file():
        return 0
    try:
        parent = json.loads(report.read_text())
        return int(parent.get("examples", {}).get("next_step", parent.get("steps", 0)))
    except (ValueError, TypeError, AttributeError):
        return 0


def _load_teacher(settings: TrainSettings, student: LoadedModel) -> LoadedModel | None:
    """The frozen teacher of distillation; it must read the same token ids as the student. None
    without a teacher, and for ``--teacher self`` and ``mutual`` (the student's own plain prefill teaches)."""
    if settings.teacher in (None, SELF_TEACHER, MUTUAL_TEACHER):
        return None
    teacher = load_model(settings.teacher, device=settings.device, dtype=torch.float32)
    if teacher.tokenizer_hash != student.tokenizer_hash:
        raise ValueError(f"--teacher {settings.teacher} has another tokenizer than {settings.model}: "
                         "distillation compares the two on the same token ids")
    if settings.hidden_weight:
        shape = [(len(m.model.model.layers), m.model.config.hidden_size) for m in (teacher, student)]
        if shape[0] != shape[1]:
            raise ValueError(
                f"--teacher {settings.teacher} has {shape[0][0]} layers of width {shape[0][1]} and {settings.model} "
                f"{shape[1][0]} of width {shape[1][1]}: hidden states are matched layer by layer, so pass a teacher "
                "of the same shape (e.g. a causal fine-tune of the same model) or --hidden-weight 0"
            )
    teacher.model.eval().requires_grad_(False)
    return teacher


class TrainingInterrupted(Exception):
    """Ctrl-C (or running out of memory) stopped the run; its state is in ``checkpoint``."""

    def __init__(self, step: int, checkpoint: Path, reason: str = "interrupted"):
        super().__init__(f"{reason} after step {step}; checkpoint in {checkpoint}: rerun with --resume to continue")
        self.step, self.checkpoint, self.reason = step, checkpoint, reason


@dataclass
class TrainResult:
    out: Path
    report: dict  # the content of training.json


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_FILE).is_file())):
        raise ValueError(f"--out {out} exists and is not the output of rcllm finetune; refusing to overwrite it")


def _trained_layers(lm: LoadedModel, settings: TrainSettings) -> list[int]:
    """Indices of the decoder layers that train: the top ``train_layers`` (all when 0)."""
    n = len(lm.model.model.layers)
    if settings.train_layers > n:
        raise ValueError(f"--train-layers {settings.train_layers}: the model has {n} decoder layers")
    return list(range(n - settings.train_layers if settings.train_layers else 0, n))


def _prepare(lm: LoadedModel, settings: TrainSettings, adapter: Path | None = None):
    """Make the trainable parameters of ``lm.model`` (LoRA layers are injected into it in place;
    with ``adapter``, a LoRA adapter folder over ``lm``, its layers, to train further).

    With ``train_layers`` N > 0 only the top N decoder layers train (all their weights, or their
    LoRA adapters) and the final norm with them for full fine-tuning; the layers below are frozen,
    so autograd records nothing there and the backward pass stops at the first trained layer,
    which is most of the saving on a CPU. Embeddings (tied to the output head in small models)
    stay frozen then."""
    model = lm.model
    layers = _trained_layers(lm, settings)
    if settings.method == "full":
        if settings.train_layers:
            model.requires_grad_(False)
            for i in layers:
                model.model.layers[i].requires_grad_(True)
            model.model.norm.requires_grad_(True)
        else:
            model.requires_grad_(True)
        peft_model = None
    else:
        try:
            from peft import LoraConfig, PeftModel, get_peft_model
        except ImportError as e:
            raise ValueError("--method lora needs the peft package: pip install peft (or use --method full)") from e
        if adapter is not None:
            rank = adapter_rank(adapter)
            if rank != settings.lora_rank:
                raise ValueError(f"{adapter} is a rank-{rank} adapter: continue it with --lora-rank {rank}")
            peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
            model.train()
            return peft_model
        config = LoraConfig(
            r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
            target_modules=list(LORA_TARGETS), bias="none",
            layers_to_transform=layers if settings.train_layers else None,
        )
        peft_model = get_peft_model(model, config)
    model.train()
    return peft_model


def _optimizer(model: torch.nn.Module, settings: TrainSettings, training_seconds: Callable[[], float]):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: settings.lr_factor_at(s, training_seconds())
    )
    return optimizer, scheduler


def _restore(folder: Path, settings: TrainSettings, model, optimizer, scheduler) -> dict:
    ckpt = load_checkpoint(folder)
    saved = ckpt.state["settings"]
    mine = settings.to_json()
    defaults = TrainSettings().to_json()
    differ = [
        f"{k} ({saved.get(k)!r} in the checkpoint, {mine[k]!r} now)"
        for k in RESUME_KEYS
        if saved.get(k, defaults.get(k)) != mine[k]  # a key newer than the checkpoint: its default then
    ]
    if differ:
        raise ValueError(f"cannot resume {folder}: settings differ: {'; '.join(differ)}")
    if ckpt.state["step"] > settings.steps:
        raise ValueError(f"cannot resume {folder}: it is at step {ckpt.state['step']}, past --steps {settings.steps}")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    result = model.load_state_dict(ckpt.trainable, strict=False)
    missing = trainable - set(ckpt.trainable)
    if result.unexpected_keys or missing:
        example = sorted(missing or result.unexpected_keys)[:3]
        raise ValueError(f"{folder} holds other parameters than this run trains (e.g. {example})")
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    restore_rng(ckpt.rng)
    return ckpt.state


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def train(settings: TrainSettings, dataset: Dataset | None = None, progress: Progress | None = None) -> TrainResult:
    """Fine-tune ``settings.model`` and write it to ``settings.out``; ``dataset`` (when given)
    replaces loading ``settings.dataset``. Raises :class:`TrainingInterrupted` on Ctrl-C after
    saving a checkpoint that ``resume=True`` continues from."""
    settings.check()
    out = settings.out.absolute()
    ckpt_dir = checkpoint_dir(out)
    _check_out(out)
    if settings.resume and not ckpt_dir.is_dir():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_dir}")
    if not settings.resume and ckpt_dir.exists():
        raise ValueError(
            f"{ckpt_dir} holds an interrupted run: pass --resume to continue it, or delete it to start over"
        )
    if dataset is None:
        from rcllm.data.loaders import load_dataset

        dataset = load_dataset(settings.dataset, data_dir=settings.data_dir)
    stream = ExampleStream(
        dataset, settings.history, settings.candidates, settings.seed, settings.val_users, settings.recent
    )
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)

    continued = _continued_adapter(settings)
    if continued is None:
        lm = load_model(settings.model, device=settings.device, dtype=torch.float32)
        start_path, base_name = lm.path, settings.model
    else:  # a LoRA run that keeps an adapter, from an adapter folder: it trains that adapter further
        lm, info = load_adapter_base(continued, device=settings.device, dtype=torch.float32)
        start_path, base_name = str(continued), info.base
    first = stream_start(start_path) if os.path.isdir(start_path) else 0
    template = _template(start_path, settings)
    builder = PromptBuilder(lm.tokenizer, template)
    match_ids = builder.match_token_ids()
    teacher = _load_teacher(settings, lm)
    base_state = state_dict_hash(lm.model) if settings.adapter_only else None  # before LoRA layers go in
    encoder = PromptEncoder(Ranker(BlockEngine(lm), builder), dataset.items)
    peft_model = _prepare(lm, settings, continued)
    model = lm.model
    state = {"step": 0, "evals": [], "losses": [], "seconds": {"training": 0.0, "validation": 0.0},
             "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "interruptions": 0}  # fmt: skip
    optimizer, scheduler = _optimizer(model, settings, lambda: state["seconds"]["training"])
    if settings.resume:
        state = _restore(ckpt_dir, settings, model, optimizer, scheduler)
    state["settings"] = settings.to_json()
    state["template"] = template.to_dict()
    state["first_example_step"] = first
    base = baselines(stream.validation, stream.popularity)
    val_prompts = [encoder.encode(e) for e in stream.validation]
    served = ("none", f"tail:{settings.tail_floor}") if settings.tail_floor else ("none",)
    probe_prompts = val_prompts[: settings.batch]

    def evaluate(logs: dict) -> None:
        started = time.perf_counter()
        since = state["evals"][-1]["step"] if state["evals"] else 0
        recent = state["losses"][since:]
        entry = {
            "step": state["step"],
            "train_loss": sum(recent) / len(recent) if recent else None,
            "train_loss_by_attention": losses_by_attention(state["losses"], settings.block_aware, since),
            "val": validate(lm, builder, encoder, stream.validation, served),
            "label_attention": probe_label_attention(model, probe_prompts, lm.inv_freq, lm.head_dim),
        }
        if settings.match_weight:
            entry["match_hr1"] = logs["match_hr1"] = probe_match(model, val_prompts, lm.inv_freq, lm.head_dim, match_ids)
        state["seconds"]["validation"] += time.perf_counter() - started
        state["evals"].append(entry)
        logs["val"] = entry["val"]

    def due(step: int) -> bool:
        return step == 0 or step == settings.steps or step % settings.eval_every == 0

    last_saved = time.perf_counter()

    def checkpoint_due(step: int) -> bool:
        minutes = settings.checkpoint_minutes
        return bool(minutes) and step < settings.steps and time.perf_counter() - last_saved >= minutes * 60

    if progress:
        progress(state["step"], settings.steps, {})
    label_ids = builder.label_token_ids
    first_trained = _trained_layers(lm, settings)[0]  # the hidden term's layers: those that learn
    autocast = settings.autocast()
    state["autocast_bf16"] = autocast
    prompts: list = []
    try:
        if due(state["step"]) and not any(e["step"] == state["step"] for e in state["evals"]):
            logs: dict = {}
            evaluate(logs)
            if progress:
                progress(state["step"], settings.steps, logs)
        while settings.scheduled_step(state["step"], state["seconds"]["training"]) < settings.steps:
            step = state["step"]
            started = time.perf_counter()
            prompts = [encoder.encode(e) for e in stream.batch(first + step, settings.batch)]
            aware = settings.block_aware_at(step)
            tails = settings.tails_at(settings.scheduled_step(step, state["seconds"]["training"])) if aware else 0.0
            batch = collate(prompts, aware, lm.device, tails, settings.tail_floor if aware else 0)
            distil = settings.teacher is not None and aware
            mutual = distil and settings.teacher == MUTUAL_TEACHER
            hidden: list | None = [] if distil and settings.hidden_weight else None
            states: list | None = [] if settings.match_weight else None
            with torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = answer_logits(model, batch, lm.inv_freq, lm.head_dim, hidden, labels=states)
                if distil:
                    with torch.set_grad_enabled(mutual):  # mutual: the plain prefill learns too
                        taught: list | None = [] if hidden is not None else None
                        plain = collate(prompts, False, lm.device)
                        source = lm if teacher is None else teacher  # self/mutual: the weights being trained
                        teacher_logits = answer_logits(source.model, plain, source.inv_freq, source.head_dim, taught)
            loss = label_loss(logits, batch, label_ids)
            parts = {"ce": loss.item(), **({"tails": tails} if settings.curriculum else {})}
            if mutual:
                plain_ce = label_loss(teacher_logits, plain, label_ids)
                parts["ce_plain"] = plain_ce.item()
                loss = loss + plain_ce
            if states is not None:
                m = match_loss(match_scores(model, states[0], match_ids), batch)
                parts["match"] = m.item()
                loss = loss + settings.match_weight * m
            if distil:
                kl = distill_loss(logits, teacher_logits.detach(), batch, label_ids, settings.temperature)
                parts["kl"] = kl.item()
                if mutual:  # and the prefill towards reuse: each side's target held fixed
                    back = distill_loss(teacher_logits, logits.detach(), plain, label_ids, settings.temperature)
                    parts["kl_back"] = back.item()
                    kl = kl + back
                loss = loss + settings.distill_weight * kl
                if settings.agree_weight:
                    agree = agreement_loss(logits, teacher_logits.detach(), batch, label_ids, settings.agree_margin)
                    parts["agree"] = agree.item()
                    loss = loss + settings.agree_weight * agree
                if hidden is not None:
                    taught = [t.detach() for t in taught[first_trained:]]
                    h = hidden_loss(hidden[first_trained:], taught, batch.fresh)
                    parts["hidden"] = h.item()
                    loss = loss + settings.hidden_weight * h
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
            with deferred_interrupt():
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] = step + 1
                state["losses"].append(parts["ce"])
                state.setdefault("loss_parts", []).append(parts)
                state.setdefault("grad_norms", []).append(float(grad_norm))
                state["seconds"]["training"] += time.perf_counter() - started
            logs = {"loss": state["losses"][-1], "block_aware": aware, "parts": parts, "grad_norm": float(grad_norm)}
            if due(state["step"]):
                evaluate(logs)
            if checkpoint_due(state["step"]):
                # a killed machine (no Ctrl-C, no exception) then loses at most this many minutes
                save_checkpoint(ckpt_dir, model, optimizer, scheduler, state)
                last_saved = time.perf_counter()
            if progress:
                progress(state["step"], settings.steps, logs)
        if not state["evals"] or state["evals"][-1]["step"] != state["step"]:
            # stopped by --minutes between two validations: validate where it stopped
            logs = {}
            evaluate(logs)
            if progress:
                progress(state["step"], settings.steps, logs)
    except BaseException as error:
        if not (isinstance(error, KeyboardInterrupt) or _is_oom(error)):
            raise
        optimizer.zero_grad(set_to_none=True)
        if lm.device.type == "cuda":
            torch.cuda.empty_cache()
        state["interruptions"] += 1
        save_checkpoint(ckpt_dir, model, optimizer, scheduler, state)
        if isinstance(error, KeyboardInterrupt):
            raise TrainingInterrupted(state["step"], ckpt_dir) from None
        longest = max((p.ids.numel() for p in prompts), default=0)
        raise TrainingInterrupted(
            state["step"], ckpt_dir,
            f"out of memory on {lm.device} (batch {settings.batch}, prompts up to {longest} tokens): lower --batch "
            "(it may change on --resume), --history or --candidates; stopped",
        ) from error

    report = _report(settings, state, stream, base, lm, dataset.name)
    adapter_only = settings.adapter_only and peft_model is not None
    merged = peft_model if adapter_only else peft_model.merge_and_unload() if peft_model is not None else model
    merged.eval()

    def fill(tmp: Path) -> None:
        if adapter_only:  # the base is loaded and this adapter merged into it when the folder is opened
            write_adapter(tmp, peft_model, base_name, lm.fingerprint, base_state)
        else:
            merged.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
        (tmp / TEMPLATE_FILE).write_text(json.dumps(template.to_dict(), indent=2) + "\n")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        plot_training(report, tmp / PLOT_FILE)

    write_folder(out, fill)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(ckpt_dir)
    return TrainResult(out=out, report=report)


def _report(settings, state, stream, base, lm, dataset_name) -> dict:
    seconds = state["seconds"]
    trained = len(state["losses"])
    return {
        "settings": settings.to_json(),
        "model": {
            "source": settings.model,
            "source_fingerprint": lm.fingerprint,
            "family": lm.family,
            "parameters": sum(p.numel() for p in lm.model.parameters()),
            "trainable_parameters": sum(p.numel() for p in lm.model.parameters() if p.requires_grad),
        },
        "data": {"dataset": dataset_name, **stream.sizes()},
        "loss": LOSS + ("; " + DISTILL_LOSS if settings.teacher else ""),
        "template": state.get("template"),
        "loss_parts": state.get("loss_parts", []),
        "grad_norms": state.get("grad_norms", []),
        "training_precision": "bf16 autocast, fp32 weights" if state.get("autocast_bf16") else "fp32",
        "steps": state["step"],
        "stopped_by": "minutes" if state["step"] < settings.steps else "steps",
        # the example stream's steps this run drew: a run from this folder continues at next_step
        "examples": {"first_step": state.get("first_example_step", 0),
                     "next_step": state.get("first_example_step", 0) + state["step"]},
        "baselines": base,
        "evals": state["evals"],
        "final": state["evals"][-1] if state["evals"] else None,
        "losses": state["losses"],
        "time": {
            "started": state["started"],
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "training_seconds": round(seconds["training"], 2),
            "validation_seconds": round(seconds["validation"], 2),
            "steps_per_s": trained / seconds["training"] if seconds["training"] else None,
            "interruptions": state["interruptions"],
        },
        "machine": machine(lm.device),
    }
