"""From a model name to a :class:`LoadedModel`: the model, its tokenizer, its family and
fingerprints, checked to run on the engine.

An embedded name is converted once (:func:`pull_embedded`); any local transformers folder or
Hugging Face hub id of a supported family can be loaded too.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rcllm.engine.models.adapter import (
    AdapterInfo,
    adapted_weights_hash,
    is_adapter_folder,
    merge_adapter,
    read_adapter,
)
from rcllm.engine.models.convert import pull_embedded, transformers_progress
from rcllm.engine.models.fingerprint import model_fingerprint, state_dict_hash, tokenizer_hash, weights_hash
from rcllm.engine.models.resolve import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ModelNotFoundError,
    hub_files_only,
    hub_snapshot,
    model_not_found,
)
from rcllm.engine.models.support import check_supported, rotary_frequencies, sliding_window

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase



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
    folder = Path(path) if local else hub_snapshot(path)
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
    name: str = DEFAULT_MODEL,
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
    if local and is_adapter_folder(path):
        return _load_adapted(name, Path(path), device, dtype, attn_implementation)

    if local:
        check_supported(_read_config_json(Path(path)))  # before transformers parses anything
        local_only = True
    else:
        local_only = hub_files_only(name)

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as error:
        if local:
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise model_not_found(name, f"could not be loaded ({type(error).__name__}: {first_line})") from error
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
    inv_freq, head_dim = rotary_frequencies(model, model.config, family)

    weights = None
    folder = Path(path) if local else hub_snapshot(path)
    if folder is not None:
        weights = weights_hash(folder)
    if weights is None:
        weights = state_dict_hash(model)

    return LoadedModel(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        family=family,
        fingerprint=model_fingerprint(model.config, weights),
        tokenizer_hash=tokenizer_hash(tokenizer),
        inv_freq=inv_freq.to(device),
        head_dim=head_dim,
        device=device,
        dtype=dtype,
        sliding_window=sliding_window(model.config, family),
    )


def load_adapter_base(folder: str | os.PathLike, device="cpu", dtype=torch.float32, *,
                      attn_implementation: str = "sdpa") -> tuple[LoadedModel, AdapterInfo]:
    """The base model of LoRA adapter ``folder``, checked to be the model it was trained on (its
    fingerprint, or the same weight values in other bytes), and the adapter's description."""
    folder = Path(folder)
    info = read_adapter(folder)
    if Path(info.base).expanduser().absolute() == folder.absolute():
        raise ValueError(f"adapter folder {folder} names itself as its base")
    base = load_model(info.base, device=device, dtype=dtype, attn_implementation=attn_implementation)
    # the same values in other bytes (e.g. the embedded GGUF converted by another transformers) still match;
    # hashing every weight is only worth it when the fingerprint differs
    if base.fingerprint != info.base_fingerprint and not (
        info.base_state is not None and state_dict_hash(base.model) == info.base_state
    ):
        raise ValueError(
            f"adapter {folder} was trained on {info.base} with fingerprint {info.base_fingerprint[:12]}, but "
            f"{info.base} now loads as {base.fingerprint[:12]}: its weights changed, so the adapter no longer "
            "applies to them. Load the original base, or fine-tune the adapter again"
        )
    return base, info


def _load_adapted(name: str, folder: Path, device, dtype, attn_implementation: str) -> LoadedModel:
    """A LoRA adapter folder: its base with the adapter merged in (in the base's dtype, on its device)."""
    base, info = load_adapter_base(folder, device, dtype, attn_implementation=attn_implementation)
    model = merge_adapter(base.model, folder)
    model.eval()
    model.requires_grad_(False)
    return replace(
        base,
        name=name,
        path=str(folder),
        model=model,
        # from the recorded base identity, so that a policy gated on one machine holds on another
        fingerprint=model_fingerprint(model.config, adapted_weights_hash(info.base_fingerprint, weights_hash(folder) or "")),
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
    inv_freq, head_dim = rotary_frequencies(model, model.config, family)
    return LoadedModel(
        name=name,
        path=name,
        model=model,
        tokenizer=tokenizer,
        family=family,
        fingerprint=fingerprint or model_fingerprint(model.config, state_dict_hash(model)),
        tokenizer_hash=tokenizer_hash(tokenizer) if tokenizer is not None else "",
        inv_freq=inv_freq.to(weight.device),
        head_dim=head_dim,
        device=weight.device,
        dtype=weight.dtype,
        sliding_window=sliding_window(model.config, family),
    )
