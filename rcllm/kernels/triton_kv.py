"""Triton versions of :mod:`rcllm.kernels.kv`: same signatures, same results.

``place_blocks`` gathers every cached block into the context in one launch: the wrapper hands
the kernel a table of the blocks' addresses, so no block is first concatenated or copied, and
each key pair is re-rotated on its way through registers. ``scatter_kv`` writes the recomputed
tokens' K and V in one launch (the reference needs two ``index_copy_``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from rcllm.kernels import kv as reference
from rcllm.kernels.rope import check_layout

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _place_blocks_kernel(
    table,  # int64 [4, blocks]: K address, V address, tokens, start
    cos,  # float32 [blocks, half]
    sin,
    dst_k,
    dst_v,
    lead_stride,  # dst stride between (layer, kv head) rows
    tok_stride,  # dst stride between positions
    n_blocks,
    half,
    SRC: tl.constexpr,  # the blocks' dtype
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)  # (layer, kv head); int64: offsets can pass 2**31
    t0 = tl.program_id(2) * BLOCK_T
    n = tl.load(table + 2 * n_blocks + b)
    if t0 < n:
        start = tl.load(table + 3 * n_blocks + b)
        src_k = tl.load(table + b).to(tl.pointer_type(SRC))
        src_v = tl.load(table + n_blocks + b).to(tl.pointer_type(SRC))
        t = t0 + tl.arange(0, BLOCK_T)
        c = tl.arange(0, BLOCK_H)
        mask = (t[:, None] < n) & (c[None, :] < half)
        if INTERLEAVED:
            ca, cb = 2 * c, 2 * c + 1
        else:
            ca, cb = c, c + half
        # blocks are contiguous [lead, n, 2 * half]
        src = row * n * 2 * half + t[:, None] * 2 * half
        dst = row * lead_stride + (start + t[:, None]) * tok_stride
        cs = tl.load(cos + b * half + c, mask=c < half, other=1.0)[None, :]
        sn = tl.load(sin + b * half + c, mask=c < half, other=0.0)[None, :]
        xa = tl.load(src_k + src + ca[None, :], mask=mask).to(tl.float32)
        xb = tl.load(src_k + src + cb[None, :], mask=mask).to(tl.float32)
        # rounded to the blocks' dtype first, then to the context's, as the reference does
        ya = (xa * cs - xb * sn).to(SRC).to(dst_k.dtype.element_ty)
        yb = (xb * cs + xa * sn).to(SRC).to(dst_k.dtype.element_ty)
        tl.store(dst_k + dst + ca[None, :], ya, mask=mask)
        tl.store(dst_k + dst + cb[None, :], yb, mask=mask)
        va = tl.load(src_v + src + ca[None, :], mask=mask)
        vb = tl.load(src_v + src + cb[None, :], mask=mask)
        tl.store(dst_v + dst + ca[None, :], va.to(dst_v.dtype.element_ty), mask=mask)
        tl.store(dst_v + dst + cb[None, :], vb.to(dst_v.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as [rows, L, d] without a copy, with d contiguous; None if its strides forbid that."""
    if t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-2], t.shape[-1])
    except RuntimeError:
        return None


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
    """:func:`rcllm.kernels.kv.place_blocks` in one kernel launch.

    Blocks on another device (a CPU tier) are copied over first, asynchronously from pinned
    memory. Cases outside the kernel's scope (blocks of mixed dtypes, a context whose leading
    dims can't be flattened, an odd head dim) go to the reference, which also raises its errors.
    """
    if not (len(keys) == len(values) == len(starts) == len(deltas)) or not keys:
        return reference.place_blocks(dst_k, dst_v, keys, values, starts, deltas, inv_freq, layout)
    check_layout(layout)
    for k, v, start in zip(keys, values, starts):
        reference.check_block(dst_k, k, v, start)
    head_dim = dst_k.shape[-1]
    src_dtype = keys[0].dtype
    k_rows, v_rows = _rows(dst_k), _rows(dst_v)
    if (
        head_dim % 2
        or k_rows is None
        or v_rows is None
        or k_rows.stride() != v_rows.stride()
        or src_dtype not in _TL_DTYPES
        or dst_k.dtype not in _TL_DTYPES
        or dst_v.dtype not in _TL_DTYPES
        or any(t.dtype != src_dtype for t in (*keys, *values))
    ):
        return reference.place_blocks(dst_k, dst_v, keys, values, starts, deltas, inv_freq, layout)
    device = dst_k.device
    keys = [k.to(device, non_blocking=True).contiguous() for k in keys]
    values = [v.to(device, non_blocking=True).contiguous() for v in values]
    sizes = [k.shape[-2] for k in keys]
    table = torch.tensor(
        [[k.data_ptr() for k in keys], [v.data_ptr() for v in values], sizes, list(starts)], dtype=torch.int64
    ).to(device, non_blocking=True)
    # angles in float64, cos/sin rounded once to float32: the reference's numerics
    delta = torch.tensor(list(deltas), dtype=torch.float64).to(device, non_blocking=True)
    angles = delta[:, None] * inv_freq.to(device=device, dtype=torch.float64)
    cos, sin = angles.cos().to(torch.float32), angles.sin().to(torch.float32)
    half = head_dim // 2
    block_t = 32
    grid = (len(keys), k_rows.shape[0], triton.cdiv(max(sizes), block_t))
    _place_blocks_kernel[grid](
        table, cos, sin, k_rows, v_rows, k_rows.stride(0), k_rows.stride(1), len(keys), half,
        SRC=_TL_DTYPES[src_dtype], INTERLEAVED=layout == "interleaved",
        BLOCK_T=block_t, BLOCK_H=triton.next_power_of_2(half),
    )


@triton.jit
def _scatter_kv_kernel(
    k, v, index, dst_k, dst_v, m, d,
    k_row, k_tok, v_row, v_tok, dst_row, dst_tok,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (layer, kv head)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_D)
    mask = (t[:, None] < m) & (c[None, :] < d)
    pos = tl.load(index + t, mask=t < m, other=0)
    dst = row * dst_row + pos[:, None] * dst_tok + c[None, :]
    kt = tl.load(k + row * k_row + t[:, None] * k_tok + c[None, :], mask=mask)
    vt = tl.load(v + row * v_row + t[:, None] * v_tok + c[None, :], mask=mask)
    tl.store(dst_k + dst, kt.to(dst_k.dtype.element_ty), mask=mask)
    tl.store(dst_v + dst, vt.to(dst_v.dtype.element_ty), mask=mask)


def scatter_kv(
    dst_k: torch.Tensor, dst_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor
) -> None:
    """:func:`rcllm.kernels.kv.scatter_kv` in one kernel launch for K and V together.

    ``k``/``v`` may be strided views (the engine passes a transpose): no copy is made of them.
    """
    rows = [_rows(t) for t in (dst_k, dst_v, k, v)]
    if (
        any(r is None for r in rows)
        or rows[0].stride() != rows[1].stride()
        or k.shape != v.shape
        or k.shape[:-2] != dst_k.shape[:-2]
        or k.shape[-1] != dst_k.shape[-1]
        or index.shape != (k.shape[-2],)
        or any(t.dtype not in _TL_DTYPES for t in (dst_k, dst_v, k, v))
    ):
        return reference.scatter_kv(dst_k, dst_v, k, v, index)
    k_rows, v_rows, k_src, v_src = rows
    m, d = k.shape[-2], k.shape[-1]
    if m == 0:
        return None
    block_t = 32
    _scatter_kv_kernel[(k_rows.shape[0], triton.cdiv(m, block_t))](
        k_src, v_src, index.contiguous(), k_rows, v_rows, m, d,
        k_src.stride(0), k_src.stride(1), v_src.stride(0), v_src.stride(1), k_rows.stride(0), k_rows.stride(1),
        BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d),
    )
    return None
