"""Triton version of :func:`rcllm.kernels.attention.selective_attention`.

Flash-attention style: one program takes a tile of query rows, walks the context in key tiles
with an online softmax, and never materialises the [m, L] score matrix. The rows of a tile are
the queries of one kv head's whole group, query-major (row = query * group + head in group), so
a K/V tile is read once for every head that shares it, and the tile's positions are close
together: the walk stops at the tile's last visible key (causal by position).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rcllm.kernels import attention as reference

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
# Triton's CPU interpreter multiplies bfloat16 dot operands as raw 16-bit integers; there the
# kernel widens them to float32 first (exact: a product of two bf16 values fits a float32).
_WIDEN_BF16 = triton.knobs.runtime.interpret


@triton.jit
def _selective_attention_kernel(
    q, k, v, q_pos, out,
    m, length, group, head_dim, scale_log2,
    q_head, q_tok, k_head, k_tok, v_head, v_tok, o_head, o_tok,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    WIDEN: tl.constexpr,
):
    kv_head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < m * group
    query = tl.where(valid, rows // group, 0)
    head = kv_head * group + rows % group
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    # padding rows sit at position 0: they see key 0 only, so their softmax stays finite
    pos = tl.load(q_pos + query, mask=valid, other=0)
    qt = tl.load(q + head[:, None] * q_head + query[:, None] * q_tok + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
    if WIDEN:
        qt = qt.to(tl.float32)
    k_base = k + kv_head * k_head
    v_base = v + kv_head * v_head
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(tl.max(pos, 0) + 1, length).to(tl.int32)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < length
        kt = tl.load(k_base + cols[None, :] * k_tok + d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if WIDEN:
            kt = kt.to(tl.float32)
        if IEEE:
            s = tl.dot(qt, kt, input_precision="ieee")
        else:
            s = tl.dot(qt, kt)
        s = tl.where(cols[None, :] <= pos[:, None], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + cols[:, None] * v_tok + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        pv = p.to(vt.dtype)
        if WIDEN:
            pv, vt = pv.to(tl.float32), vt.to(tl.float32)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pv, vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pv, vt)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        out + head[:, None] * o_head + query[:, None] * o_tok + d[None, :],
        acc.to(out.dtype.element_ty),
        mask=valid[:, None] & d_ok[None, :],
    )


def selective_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """:func:`rcllm.kernels.attention.selective_attention` as one flash-attention kernel.

    float32 inputs multiply in full float32 (no TF32), so the float32 engine stays exact.
    """
    heads, m, head_dim = q.shape
    kv_heads, length = k.shape[0], k.shape[-2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} kv heads")
    if not (q.dtype == k.dtype == v.dtype and q.dtype in _DTYPES) or m == 0 or length == 0:
        return reference.selective_attention(q, k, v, q_pos, scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    group = heads // kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    widen = _WIDEN_BF16 and q.dtype == torch.bfloat16
    block_m = 64
    grid = (kv_heads, triton.cdiv(m * group, block_m))
    _selective_attention_kernel[grid](
        q, k, v, q_pos.contiguous(), out,
        m, length, group, head_dim, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), IEEE=q.dtype == torch.float32 or widen,
        WIDEN=widen,
    )
    return out
