"""Rotary position embedding: applying it, and re-rotating K that already carries it.

Two layouts exist in the wild. ``half`` (Hugging Face Llama/Mistral/Qwen) pairs dimension ``i``
with ``i + d/2``; ``interleaved`` (GPT-J, Meta's original Llama) pairs ``2i`` with ``2i + 1``.
Both rotate pair ``i`` by ``position * inv_freq[i]``, so a K computed at position ``p`` becomes
the K of position ``p + delta`` by one more rotation of ``delta * inv_freq[i]``.
"""

from __future__ import annotations

import torch

LAYOUTS = ("half", "interleaved")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown RoPE layout {layout!r}; expected one of {LAYOUTS}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate pairs of ``x`` [..., n, d] by angles given as ``cos``/``sin`` [n, d/2]."""
    if layout == "half":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [n, d/2] of ``positions * inv_freq``, computed in float32 like transformers does."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    return freqs.cos(), freqs.sin()


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, layout: str = "half"
) -> torch.Tensor:
    """Rotary embedding of ``x`` [..., n, d] at integer ``positions`` [n].

    cos/sin are rounded to ``x``'s dtype before the rotation, exactly as the stock
    transformers forward does, so that a full recompute matches it bit for bit in float32.
    """
    check_layout(layout)
    cos, sin = rope_angles(positions, inv_freq)
    return _rotate(x, cos.to(x.dtype), sin.to(x.dtype), layout)


def rerotate(
    k: torch.Tensor, delta: torch.Tensor | int, inv_freq: torch.Tensor, layout: str = "half"
) -> torch.Tensor:
    """Move post-RoPE keys ``k`` [..., n, d] by ``delta`` positions (a scalar or one per token).

    The rotation angle is formed in float64 and the product in float32: re-rotation then adds
    no error beyond the single rounding of its cos/sin, whatever the distance moved.
    """
    check_layout(layout)
    n = k.shape[-2]
    delta = torch.as_tensor(delta, device=k.device)
    if delta.dim() == 0:
        delta = delta.expand(n)
    if delta.shape != (n,):
        raise ValueError(f"delta has shape {tuple(delta.shape)}; expected a scalar or ({n},)")
    if not torch.any(delta):
        return k
    angles = delta.to(torch.float64)[:, None] * inv_freq.to(device=k.device, dtype=torch.float64)
    cos, sin = angles.cos().to(torch.float32), angles.sin().to(torch.float32)
    return _rotate(k.to(torch.float32), cos, sin, layout).to(k.dtype)
