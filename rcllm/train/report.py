"""What a fine-tuning run leaves beside its model: the machine it ran on and a plot of its curves."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from rcllm.eval.metrics import headline_hit_rate


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
    losses = report["losses"]
    left.plot(range(1, len(losses) + 1), losses, lw=0.8, color="tab:gray", alpha=0.6, label="per step")
    if len(losses) >= 10:
        window = max(5, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(losses))]
        left.plot(range(1, len(losses) + 1), smooth, color="tab:blue", label=f"mean of {window}")
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy over the label tokens")
    left.set_title("training loss")
    if losses:
        left.legend()
    steps = [e["step"] for e in report["evals"]]
    for name, style, label in (("contextual", "o-", "contextual"), ("none", "s--", "uncalibrated"),
                               ("reuse_none", "^:", "cached blocks, policy none")):  # fmt: skip
        right.plot(steps, [e["val"][name][k] for e in report["evals"]], style, label=f"model, {label}")
    for name, color in (("random", "tab:red"), ("popularity", "tab:green")):
        right.axhline(report["baselines"][name][k], color=color, lw=1, ls="--", label=name)
    right.set_xlabel("step")
    right.set_ylabel(f"validation {k.upper()}")
    users, candidates = report["data"]["validation_users"], report["settings"]["candidates"]
    right.set_title(f"validation, {users} users, {candidates} candidates")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
