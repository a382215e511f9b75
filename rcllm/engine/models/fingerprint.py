"""What identifies a model and a tokenizer: sha256 fingerprints of the config and weights, and
of the tokenizer's serialized form.

Hashing a weight file costs a read of every byte, so each file's digest is kept in a sidecar
under the user cache, keyed by (absolute path, size, mtime_ns).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from rcllm.engine.models.resolve import user_cache_dir
from rcllm.files import file_sha256, write_file

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# config.to_dict() keys that say how/where the config was loaded rather than what the model is
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype"}


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def _config_identity(config) -> dict:
    data = config.to_dict()
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def _prune_sidecars(folder: Path, keep_at_most: int = 512) -> None:
    sidecars = list(folder.glob("*.json"))
    if len(sidecars) <= keep_at_most:
        return
    for sidecar in sidecars:
        with contextlib.suppress(Exception):
            if not Path(json.loads(sidecar.read_text())["path"]).exists():
                sidecar.unlink()


def _cached_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached in a sidecar keyed by (absolute path, size, mtime_ns)."""
    real = path.resolve()
    stat = real.stat()
    key = {"path": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    folder = user_cache_dir() / "fingerprints"
    sidecar = folder / (hashlib.sha256(str(real).encode()).hexdigest()[:32] + ".json")
    with contextlib.suppress(Exception):
        cached = json.loads(sidecar.read_text())
        if all(cached.get(k) == v for k, v in key.items()) and len(cached.get("sha256", "")) == 64:
            return cached["sha256"]
    digest = file_sha256(real)
    with contextlib.suppress(OSError):  # the cache is an optimisation: a read-only one still works
        folder.mkdir(parents=True, exist_ok=True)
        write_file(sidecar, _canonical_json({**key, "sha256": digest}))
        _prune_sidecars(folder)
    return digest


def weights_hash(folder: Path) -> str | None:
    files = sorted(p for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES) and p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{_cached_sha256(file)}\n".encode())
    return digest.hexdigest()


def state_dict_hash(model) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}\0{data.dtype}\0{tuple(data.shape)}\n".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()



def model_fingerprint(config, weights: str) -> str:
    return hashlib.sha256(
        _canonical_json({"config": _config_identity(config), "weights": weights}).encode()
    ).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode() + b"\n")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialized = None
    if backend is not None and hasattr(backend, "to_str"):
        with contextlib.suppress(Exception):
            data = json.loads(backend.to_str())
            # call-time settings, not the tokenizer: they change while it is in use
            data.pop("padding", None)
            data.pop("truncation", None)
            serialized = _canonical_json(data)
    if serialized is None:
        serialized = _canonical_json(sorted(tokenizer.get_vocab().items()))
    digest.update(serialized.encode() + b"\n")
    special = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()}
    digest.update(_canonical_json(special).encode())
    return digest.hexdigest()
