"""Attention of a chosen subset of queries over the whole assembled context."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """Queries ``q`` [heads, m, d] at positions ``q_pos`` [m] over ``k``/``v`` [kv_heads, L, d].

    Context entry ``j`` sits at position ``j``; a query at position ``p`` sees entries ``j <= p``
    (causal by position, whichever tokens were recomputed). Grouped-query attention: query head
    ``h`` reads kv head ``h // (heads / kv_heads)``, as in transformers' ``repeat_kv``.
    Returns [heads, m, d].
    """
    heads, kv_heads = q.shape[0], k.shape[0]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} kv heads")
    length = k.shape[-2]
    mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale,
        enable_gqa=heads != kv_heads,
    ).squeeze(0)
