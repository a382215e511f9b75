"""The Triton kernels against their torch references on random inputs: max error of each.

Used by the tests (over a grid of dtypes, head counts, head dims and layouts) and by
``benchmarks/gpu_ttft.py`` (at the benchmarked model's dimensions), so both report the same
measure. Inputs are unit normals; errors are absolute.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from rcllm.kernels import attention, kv

# Block sizes straddle the kernels' 32-token tiles; deltas move blocks back, not at all, a little
# and far, so that large angles are exercised.
BLOCK_SIZES = (1, 31, 32, 33, 7)
DELTAS = (-5, 0, 17, 4000, -2)


def inv_freq_for(head_dim: int, base: float = 500000.0) -> torch.Tensor:
    """float32 inverse frequencies of plain RoPE, as transformers computes them."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))


def compare_kernels(
    triton_kv: ModuleType,
    triton_attention: ModuleType,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    layout: str = "half",
    layers: int = 2,
    block_sizes: Sequence[int] = BLOCK_SIZES,
    queries: int = 13,
    seed: int = 0,
) -> dict[str, float]:
    """Max |Triton - reference| of place_blocks (K and V), scatter_kv and selective_attention.

    The context is the blocks laid end to end with a 3-token gap before each; the attention's
    queries sit at random (unsorted) positions, the last at the final token. The references run
    on the same device and dtype, so the errors are the Triton kernels' own.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    gap = 3
    starts = [gap * (i + 1) + sum(block_sizes[:i]) for i in range(len(block_sizes))]
    length = starts[-1] + block_sizes[-1]
    deltas = [DELTAS[i % len(DELTAS)] for i in range(len(block_sizes))]
    keys = [randn(layers, kv_heads, n, head_dim) for n in block_sizes]
    values = [randn(layers, kv_heads, n, head_dim) for n in block_sizes]
    inv_freq = inv_freq_for(head_dim).to(device)

    def placed(module):
        ctx = [torch.zeros(layers, kv_heads, length, head_dim, device=device, dtype=dtype) for _ in range(2)]
        module.place_blocks(*ctx, keys, values, starts, deltas, inv_freq, layout)
        return ctx

    want_k, want_v = placed(kv)
    got_k, got_v = placed(triton_kv)
    errors = {
        "place_blocks K": _max_error(got_k, want_k),
        "place_blocks V": _max_error(got_v, want_v),
    }

    m = queries
    index = torch.randperm(length, generator=g)[:m].to(device)
    new_k, new_v = randn(kv_heads, m, head_dim), randn(m, kv_heads, head_dim).transpose(0, 1)  # V strided, as in the engine
    # both scatter into the reference's context, so that the error is the scatter's alone
    got_k, got_v = want_k.clone(), want_v.clone()
    kv.scatter_kv(want_k[-1], want_v[-1], new_k, new_v, index)
    triton_kv.scatter_kv(got_k[-1], got_v[-1], new_k, new_v, index)
    errors["scatter_kv"] = max(_max_error(got_k, want_k), _max_error(got_v, want_v))

    q = randn(heads, m, head_dim)
    q_pos = index.clone()
    q_pos[-1] = length - 1
    scale = head_dim**-0.5
    want = attention.selective_attention(q, want_k[-1], want_v[-1], q_pos, scale)
    got = triton_attention.selective_attention(q, want_k[-1], want_v[-1], q_pos, scale)
    errors["selective_attention"] = _max_error(got, want)
    return errors


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}")
    return float((got.float() - want.float()).abs().max())
