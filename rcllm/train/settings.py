"""The settings of a fine-tuning run (``rcllm finetune``'s flags), their checks and schedules."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rcllm.data.sampling import DEFAULT_CANDIDATES, DEFAULT_HISTORY
from rcllm.engine.models import DEFAULT_MODEL
from rcllm.engine.prompt import LABELS
from rcllm.train.masks import block_aware_step

METHODS = ("lora", "full")
BLOCK_AWARE = ("mix", "on", "off")
AMP = ("auto", "bf16", "off")
SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# what a resumed run must share with its checkpoint (steps may grow, batch may shrink after OOM)
RESUME_KEYS = ("dataset", "model", "method", "lr", "history", "candidates", "block_aware", "seed",
               "eval_every", "val_users", "lora_rank", "amp", "schedule", "train_layers", "recent", "link_tokens",
               "instruction", "categories_last", "teacher", "distill_weight", "hidden_weight", "temperature", "match_weight", "curriculum", "tail_floor", "agree_weight", "agree_margin")  # fmt: skip
REPORT_FILE, PLOT_FILE = "training.json", "training.png"
SELF_TEACHER = "self"  # --teacher self: the student's own plain prefill, at the current step's weights
# --teacher mutual: the plain prefill and reuse of the same weights each learn the label and each other, both with
# gradient, so the prefill is also pulled towards what reuse can compute (deep mutual learning, Zhang et al. 2018)
MUTUAL_TEACHER = "mutual"
LOSS = "cross-entropy of the positive's label over the C candidates' label tokens, at the last prompt token"
DISTILL_LOSS = (
    "on block-aware steps, plus distill_weight * T^2 KL(teacher || student) of the label distributions at "
    "temperature T, plus hidden_weight * the teacher-normalised squared error of every layer's hidden states at "
    "the fresh tokens (labels, links, instruction); the teacher is a plain prefill of the same prompt (with teacher "
    "'self', the student's own, without gradient, at each step's weights; with teacher 'mutual', the student's own "
    "with gradient: its cross-entropy is added and the KL is taken both ways, each side's target without gradient); "
    "plus agree_weight * the cross-entropy of the student's label distribution against the teacher's top choice "
    "(with agree_margin M > 0, instead the hinge max(0, M - (logit of that label - the student's best other label "
    "logit))"
)

Progress = Callable[[int, int, dict], None]  # (steps done, total steps, logs of the step)


@dataclass
class TrainSettings:
    out: Path = Path("rcllm-model")
    dataset: str = "ml-100k"
    model: str = DEFAULT_MODEL
    method: str = "lora"
    steps: int = 300
    batch: int = 8
    lr: float | None = None  # None: DEFAULT_LR of the method
    history: int = DEFAULT_HISTORY
    candidates: int = DEFAULT_CANDIDATES
    block_aware: str = "mix"
    device: str = "cpu"
    seed: int = 0
    eval_every: int = 50
    val_users: int = 100
    lora_rank: int = 16
    adapter_only: bool = False  # lora: write the adapter alone (applied to the base at load), not merged weights
    amp: str = "auto"  # bf16 autocast of the training forward: auto | bf16 | off
    schedule: str = "cosine"  # learning rate after the warm-up: cosine | linear (decay to 0) | constant
    train_layers: int = 0  # train only the top N decoder layers (0: all)
    recent: int = 10  # examples from each user's K latest training positions, users drawn uniformly (0: all)
    link_tokens: int | None = None  # fresh link tokens after each item (None: the start model's template, else 0)
    instruction: str | None = None  # the text after the last candidate (None: the start model's template's)
    categories_last: bool | None = None  # item text ends with its categories (None: the start model's template's)
    teacher: str | None = None  # a model whose plain prefill block-aware steps are distilled from; "self": the student
    distill_weight: float = 1.0
    hidden_weight: float = 1.0
    temperature: float = 2.0
    agree_weight: float = 0.0  # weight of the cross-entropy of reuse against the teacher's top choice (with a teacher)
    agree_margin: float = 0.0  # > 0: the agreement term is a hinge at this margin in nats
    match_weight: float = 0.0  # weight of the match loss at the label tokens (every step)
    curriculum: int = 0  # steps over which the recomputed tail of each item (block-aware steps) falls from all to none
    tail_floor: int = 0  # block-aware steps always recompute at least the last K tokens of every item (served: tail:K)
    data_dir: Path | None = None
    resume: bool = False
    checkpoint_minutes: float = 10.0  # save a resumable checkpoint this often while training (0: only when stopped)
    minutes: float = 0.0  # a budget of training time: the schedule follows steps or time, whichever is further (0: off)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.method)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.adapter_only and self.method != "lora":
            raise ValueError("--adapter-only keeps a LoRA adapter: pass --method lora with it")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown --schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.recent < 0:
            raise ValueError("--recent must be >= 0 (0: every training position)")
        if self.train_layers < 0:
            raise ValueError("--train-layers must be >= 0 (0 trains every layer)")
        if self.amp not in AMP:
            raise ValueError(f"unknown --amp {self.amp!r}; expected one of {', '.join(AMP)}")
        if self.block_aware not in BLOCK_AWARE:
            raise ValueError(f"unknown block-aware mode {self.block_aware!r}; expected one of {', '.join(BLOCK_AWARE)}")
        if not 2 <= self.candidates <= len(LABELS):
            raise ValueError(
                f"--candidates {self.candidates}: a prompt holds 2 to {len(LABELS)} candidates (one label each)"
            )
        for name in ("batch", "eval_every", "val_users", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.link_tokens is not None and not 0 <= self.link_tokens <= 16:
            raise ValueError(f"--link-tokens {self.link_tokens}: between 0 and 16 fresh tokens after each item")
        if self.instruction is not None and not self.instruction.strip():
            raise ValueError("--instruction: empty; the answer letter follows it, so it needs at least one token")
        if self.teacher is not None and self.block_aware == "off":
            raise ValueError("--teacher distils block-aware steps: pass --block-aware on or mix with it")
        if min(self.distill_weight, self.hidden_weight, self.match_weight, self.agree_weight) < 0 or self.temperature <= 0:
            raise ValueError(
                "--distill-weight, --hidden-weight, --match-weight and --agree-weight must be >= 0 and --temperature > 0"
            )
        if self.agree_margin < 0 or (self.agree_margin and not self.agree_weight):
            raise ValueError("--agree-margin shapes the agreement term: pass it >= 0, with --agree-weight > 0")
        if self.agree_weight and self.teacher is None:
            raise ValueError("--agree-weight trains reuse towards a teacher's top choice: pass --teacher with it")
        if self.curriculum < 0:
            raise ValueError("--curriculum must be >= 0 steps (0: no curriculum)")
        if self.curriculum and self.block_aware == "off":
            raise ValueError("--curriculum shapes block-aware steps: pass --block-aware on or mix with it")
        if self.tail_floor < 0:
            raise ValueError("--tail-floor must be >= 0 tokens (0: the tails shrink to nothing)")
        if self.tail_floor and self.block_aware == "off":
            raise ValueError("--tail-floor shapes block-aware steps: pass --block-aware on or mix with it")
        if self.checkpoint_minutes < 0:
            raise ValueError("--checkpoint-minutes must be >= 0 (0: a checkpoint only when the run is stopped)")
        if self.minutes < 0:
            raise ValueError("--minutes must be >= 0 (0: the run ends after --steps, however long they take)")
        if self.steps < 0 or self.history < 0:
            raise ValueError("steps and history must be >= 0")
        if not self.lr or self.lr <= 0:
            raise ValueError("the learning rate must be > 0")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine")

    def to_json(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        data["data_dir"] = None if self.data_dir is None else str(self.data_dir)
        return data

    def autocast(self) -> bool:
        """Whether training forwards run under bfloat16 autocast (weights and optimizer stay fp32).

        ``auto`` turns it on where the hardware computes bfloat16 natively: CUDA devices with bf16
        support, and CPUs with AVX512-BF16 or AMX (where it is ~2x faster than fp32 for a
        forward+backward of a 135M model); elsewhere bf16 would be emulated and slower.
        """
        if self.amp != "auto":
            return self.amp == "bf16"
        if self.device.startswith("cuda"):
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return _cpu_has_bf16()

    def block_aware_at(self, step: int) -> bool:
        return block_aware_step(self.block_aware, step)

    def scheduled_step(self, step: int, training_seconds: float) -> int:
        """The step the schedule is at: ``step``, or with a --minutes budget, the share of the budget
        spent times --steps when that is further along, so the learning rate decays over whichever of
        steps or time runs out first and the run stops (at ``steps``) with its schedule completed."""
        if not self.minutes:
            return step
        return max(step, min(self.steps, int(training_seconds / (self.minutes * 60) * self.steps)))

    def lr_factor_at(self, step: int, training_seconds: float) -> float:
        """The multiplier of --lr at optimizer step ``step`` after ``training_seconds`` of training:
        the warm-up counts steps taken (a time budget does not shorten it); after it, the decay follows
        :meth:`scheduled_step`."""
        if step < warmup_steps(self.steps):
            return lr_factor(step, self.steps, self.schedule)
        at = min(self.scheduled_step(step, training_seconds), max(self.steps - 1, 0))
        return lr_factor(at, self.steps, self.schedule)

    def tails_at(self, step: int) -> float:
        """The share of each item block recomputed at block-aware step ``step``: from 1 (a plain
        prefill) down to 0 (reuse without correction) linearly over ``curriculum`` steps."""
        return max(0.0, 1.0 - step / self.curriculum) if self.curriculum else 0.0


def warmup_steps(steps: int) -> int:
    """The learning rate's linear warm-up: the first tenth of the steps, at most 20 (at least 1)."""
    return max(1, min(20, steps // 10))


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based) of ``steps``:
    a linear warm-up over the first tenth (at most 20 steps), then constant or a cosine/linear
    decay towards 0 (the last step still learns, at a small rate)."""
    warmup = warmup_steps(steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    done = min(1.0, (step + 1 - warmup) / (steps - warmup + 1))
    return 1.0 - done if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


def _cpu_has_bf16() -> bool:
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
