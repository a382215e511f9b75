"""What a fine-tuning run leaves beside its model: the machine it ran on and a plot of its curves."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from rcllm.data.metrics import headline_hit_rate
from rcllm.train.masks import block_aware_step


def mean_by_attention(losses: Iterable[tuple[float, bool]]) -> dict[str, float]:
    """Mean loss of the plain causal and of the block-aware steps among ``(loss, block-aware)``
    pairs, causal first (a kind with no step is left out).

    Under ``--block-aware mix`` one mean hides which attention learns: the causal half can fall
    while the block-aware half stays at chance (ln C), and only the split shows it."""
    kinds: dict[str, list[float]] = {}
    for loss, aware in losses:
        kinds.setdefault("block-aware" if aware else "causal", []).append(loss)
    return {kind: sum(kinds[kind]) / len(kinds[kind]) for kind in ("causal", "block-aware") if kind in kinds}


def losses_by_attention(losses: Sequence[float], mode: str, start: int = 0) -> dict[str, float]:
    """:func:`mean_by_attention` of ``losses[start:]``, where ``losses[i]`` is step ``i``'s loss
    under ``--block-aware`` ``mode``."""
    return mean_by_attention((losses[i], block_aware_step(mode, i)) for i in range(start, len(losses)))


def machine(device: torch.device) -> dict:
    import transformers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


def plot_training(report: dict, path: Path) -> Path:
    """Training loss per step, and validation HR@10 (HR@1 when every candidate fits in the top 10)
    per evaluation with the random and popularity baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = headline_hit_rate(report["settings"]["candidates"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    losses, mode = report["losses"], report["settings"]["block_aware"]
    left.plot(range(1, len(losses) + 1), losses, lw=0.8, color="tab:gray", alpha=0.6, label="per step")
    if len(losses) >= 10:
        window = max(5, len(losses) // 20)
        # under mix, one curve per attention: their mean would hide a half that learns nothing
        kinds = [(None, "tab:blue", "")] if mode != "mix" else [(False, "tab:blue", ", causal steps"),
                                                               (True, "tab:orange", ", block-aware steps")]  # fmt: skip
        for kind, color, suffix in kinds:
            steps = [i for i in range(len(losses)) if kind is None or block_aware_step(mode, i) == kind]
            picked = [losses[i] for i in steps]
            smooth = [sum(picked[max(0, j - window + 1) : j + 1]) / min(window, j + 1) for j in range(len(picked))]
            left.plot([i + 1 for i in steps], smooth, color=color, label=f"mean of {window}{suffix}")
    candidates = report["settings"]["candidates"]  # a ranker that knows nothing: uniform over the labels
    left.axhline(math.log(candidates), color="tab:red", lw=1, ls="--", label=f"chance, ln {candidates}")
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy over the label tokens")
    left.set_title("training loss")
    left.legend()
    steps = [e["step"] for e in report["evals"]]
    for name, style, label in (("contextual", "o-", "contextual"), ("none", "s--", "uncalibrated"),
                               ("reuse_none", "^:", "cached blocks, policy none")):  # fmt: skip
        right.plot(steps, [e["val"][name][k] for e in report["evals"]], style, label=f"model, {label}")
    for name, color in (("random", "tab:red"), ("popularity", "tab:green")):
        right.axhline(report["baselines"][name][k], color=color, lw=1, ls="--", label=name)
    right.set_xlabel("step")
    right.set_ylabel(f"validation {k.upper()}")
    users = report["data"]["validation_users"]
    right.set_title(f"validation, {users} users, {candidates} candidates")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
