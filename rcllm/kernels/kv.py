"""Moving KV between cached blocks and the assembled attention context.

The context of one prompt is a pair of tensors [layers, kv_heads, L, head_dim] in position
order. Cached blocks are copied in (and their keys re-rotated to where they now sit); tokens
recomputed by a layer are scattered over their cached entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rcllm.kernels.rope import rerotate


def place_blocks(
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    starts: Sequence[int],
    deltas: Sequence[int],
    inv_freq: torch.Tensor,
    layout: str = "half",
) -> None:
    """Copy block ``i`` ([..., kv_heads, n_i, d]) into ``dst[..., starts[i]:starts[i]+n_i, :]``.

    Keys are re-rotated by ``deltas[i]`` (target position minus the position they were computed
    at); values carry no position and are copied as they are.
    """
    if not (len(keys) == len(values) == len(starts) == len(deltas)):
        raise ValueError("place_blocks: keys, values, starts and deltas must have the same length")
    for k, v, start, delta in zip(keys, values, starts, deltas):
        check_block(dst_k, k, v, start)
        n = k.shape[-2]
        dst_k[..., start : start + n, :] = rerotate(k.to(device=dst_k.device), delta, inv_freq, layout).to(dst_k.dtype)
        dst_v[..., start : start + n, :] = v.to(device=dst_v.device, dtype=dst_v.dtype)


def check_block(dst_k: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
    """Raise ValueError unless block KV ``k``/``v`` fits the context ``dst_k`` at ``start``."""
    n, length = k.shape[-2], dst_k.shape[-2]
    if k.shape != v.shape or k.shape[:-2] != dst_k.shape[:-2] or k.shape[-1] != dst_k.shape[-1]:
        raise ValueError(
            f"block KV of shape {tuple(k.shape)}/{tuple(v.shape)} does not fit a context of "
            f"shape {tuple(dst_k.shape)}"
        )
    if start < 0 or start + n > length:
        raise ValueError(f"block of {n} tokens at {start} overruns a context of {length} tokens")


def scatter_kv(
    dst_k: torch.Tensor, dst_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor
) -> None:
    """Write ``k``/``v`` [kv_heads, m, d] over the context entries at positions ``index`` [m]."""
    dst_k.index_copy_(-2, index, k.to(dst_k.dtype))
    dst_v.index_copy_(-2, index, v.to(dst_v.dtype))
