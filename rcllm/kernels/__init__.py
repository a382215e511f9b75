"""Kernels of the block-aware forward pass.

Each name below is what the engine calls. The torch references (``rope``, ``kv``,
``attention``) run everywhere; for CUDA tensors, when Triton is installed, the KV placement,
KV scatter and selective attention go to their Triton versions (``triton_kv``,
``triton_attention``), which are tested against the references. ``RCLLM_KERNELS=torch`` keeps
the references on CUDA too (to compare, or to rule the Triton kernels out). CPU tensors always
take the references: the CPU engine does not depend on Triton at all.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from types import ModuleType

import torch

from rcllm.kernels import attention as _attention
from rcllm.kernels import kv as _kv
from rcllm.kernels.rope import apply_rope, rerotate, rope_angles

__all__ = [
    "apply_rope", "place_blocks", "rerotate", "rope_angles", "scatter_kv", "selective_attention", "triton_kernels",
]


@cache
def _triton_modules() -> tuple[ModuleType, ModuleType] | None:
    # imported on first use only: importing triton costs about a second
    if importlib.util.find_spec("triton") is None:
        return None
    from rcllm.kernels import triton_attention, triton_kv

    return triton_kv, triton_attention


def triton_kernels(tensor: torch.Tensor) -> tuple[ModuleType, ModuleType] | None:
    """The (kv, attention) Triton modules that serve ``tensor``, or None when the references do."""
    if tensor.device.type != "cuda" or os.environ.get("RCLLM_KERNELS", "").lower() == "torch":
        return None
    return _triton_modules()


def place_blocks(dst_k, dst_v, keys, values, starts, deltas, inv_freq, layout: str = "half") -> None:
    """See :func:`rcllm.kernels.kv.place_blocks`."""
    fast = triton_kernels(dst_k)
    (fast[0] if fast else _kv).place_blocks(dst_k, dst_v, keys, values, starts, deltas, inv_freq, layout)


def scatter_kv(dst_k, dst_v, k, v, index) -> None:
    """See :func:`rcllm.kernels.kv.scatter_kv`."""
    fast = triton_kernels(dst_k)
    (fast[0] if fast else _kv).scatter_kv(dst_k, dst_v, k, v, index)


def selective_attention(q, k, v, q_pos, scale: float) -> torch.Tensor:
    """See :func:`rcllm.kernels.attention.selective_attention`."""
    fast = triton_kernels(q)
    return (fast[1] if fast else _attention).selective_attention(q, k, v, q_pos, scale)
