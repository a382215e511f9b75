"""Which models the engine can run: the family and RoPE checks, and the rotary frequencies.

The engine re-rotates cached keys by a position difference and walks the decoder layers itself,
so only decoder-only RoPE families whose rotary embedding is a pure rotation are accepted
(:func:`check_supported`); :func:`rotary_frequencies` checks the instantiated model the same way
and hands the engine the exact float32 frequencies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The model cannot run on the engine; the message names what and why."""



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


def sliding_window(config: Any, family: str) -> int | None:
    window = _get(config, "sliding_window")
    layer_types = _get(config, "layer_types") or []
    if "sliding_attention" in layer_types:
        return int(window) if window else None
    if family == "mistral" and window:
        return int(window)
    return None


def rotary_frequencies(model, config, family: str) -> tuple[torch.Tensor, int]:
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
