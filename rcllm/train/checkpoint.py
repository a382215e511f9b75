"""Checkpoints of an interrupted run: saved whole or not at all, resumed, Ctrl-C deferred.

A checkpoint lives beside the output folder (``rcllm-model`` -> ``rcllm-model.ckpt``) and holds
the trainable parameters (the LoRA adapter, or every weight), the optimizer and schedule, the
step, the RNG states and the run's history so far. Both it and the final model folder are
written into a temporary folder next to their target and renamed into place
(:func:`rcllm.files.write_folder`).
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rcllm.files import write_folder

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.pt"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


def checkpoint_dir(out: Path) -> Path:
    out = Path(out).absolute()
    return out.with_name(out.name + ".ckpt")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


@dataclass
class Checkpoint:
    state: dict  # step, settings, history, losses, seconds
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict) -> Path:
    rng = {"python": _python_rng(random.getstate()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()

    def fill(tmp: Path) -> None:
        torch.save(trainable_state(model), tmp / TRAINABLE_FILE)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
        torch.save(rng, tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    return write_folder(folder, fill)


def load_checkpoint(folder: Path) -> Checkpoint:
    folder = Path(folder)
    missing = [f for f in (STATE_FILE, TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete checkpoint: {', '.join(missing)} missing")
    opt = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
    return Checkpoint(
        state=json.loads((folder / STATE_FILE).read_text()),
        trainable=torch.load(folder / TRAINABLE_FILE, weights_only=True),
        optimizer=opt["optimizer"],
        scheduler=opt["scheduler"],
        rng=torch.load(folder / RNG_FILE, weights_only=True),
    )


def restore_rng(rng: dict) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _python_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so that parameters and optimizer state are never saved
    half-updated (only the main thread can take signals; elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
