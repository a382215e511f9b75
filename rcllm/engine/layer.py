"""One transformers decoder layer, split around its attention.

Serving (:meth:`BlockEngine.run_layer`, which the static CUDA-graph pass replays too) and
training (``rcllm/train/forward.py``) each attend their own way; what comes before attention
(input norm, q/k/v projections, the per-head q/k norms of Qwen3) and after it (output
projection, residual, MLP block) is the model's own and is walked here, once. Every weight is
called as a module, so peft's LoRA wrappers and autocast apply as in the stock forward.
"""

from __future__ import annotations

import torch


def project(layer, h: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of hidden states ``h`` [..., tokens, hidden], each
    [..., tokens, heads, head_dim]; q and k before RoPE, normed where the family does that."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*h.shape[:-1], -1, head_dim)
    q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def finish(layer, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The layer's output from its input ``h`` [..., tokens, hidden] and its attention output
    ``attn_out`` [..., tokens, heads, head_dim]: output projection and residual, then the MLP
    block and its residual."""
    h = h + layer.self_attn.o_proj(attn_out.flatten(-2))
    return h + layer.mlp(layer.post_attention_layernorm(h))
