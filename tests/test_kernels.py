"""The torch reference kernels (RoPE, KV placement, selective attention) and the policy helpers.

No model is loaded here: every test runs on small random tensors in milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rcllm.engine.policy import (
    POLICY_HELP,
    Policy,
    base_selection,
    deviation_selection,
    parse_policy,
)
from rcllm.kernels import apply_rope, place_blocks, rerotate, scatter_kv, selective_attention

LAYOUTS = ("half", "interleaved")
MAX_POS = 4096


def inv_freq_for(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """inv_freq exactly as transformers' default RoPE computes it (float32)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))


def pair_index(head_dim: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (a_i, b_i) of the dimensions rotated together as pair i, as the docstrings define them."""
    i = torch.arange(head_dim // 2)
    if layout == "half":
        return i, i + head_dim // 2
    return 2 * i, 2 * i + 1


def rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, layout: str) -> torch.Tensor:
    """Float64 RoPE written independently: pair i rotated by position * inv_freq[i], one 2x2 matrix each."""
    x = x.to(torch.float64)
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # [n, d/2]
    a, b = pair_index(x.shape[-1], layout)
    out = torch.empty_like(x)
    for i in range(x.shape[-1] // 2):
        c, s = angles[:, i].cos(), angles[:, i].sin()  # [n]
        xa, xb = x[..., a[i]], x[..., b[i]]
        # [[cos, -sin], [sin, cos]] @ [xa, xb]
        out[..., a[i]] = c * xa - s * xb
        out[..., b[i]] = s * xa + c * xb
    return out


def pair_norm_max(x: torch.Tensor, layout: str) -> float:
    a, b = pair_index(x.shape[-1], layout)
    return float(torch.sqrt(x[..., a].double() ** 2 + x[..., b].double() ** 2).max())


# ---------------------------------------------------------------------------------------------
# RoPE


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    half_dim=st.integers(4, 128),
    n=st.integers(1, 12),
    p0=st.integers(0, MAX_POS),
    delta=st.integers(-MAX_POS, MAX_POS),
    layout=st.sampled_from(LAYOUTS),
    base=st.sampled_from([10000.0, 500000.0, 1000000.0]),
)
def test_rerotate_equals_rope_at_new_positions(seed, half_dim, n, p0, delta, layout, base):
    """rerotate(rope(x, p0), d) == rope(x, p0 + d), for negative deltas too (target position >= 0)."""
    if p0 + delta < 0:
        delta = -p0  # keep every target position >= 0
    head_dim = 2 * half_dim
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, head_dim, generator=g)
    inv_freq = inv_freq_for(head_dim, base)
    pos = torch.arange(p0, p0 + n)
    moved = rerotate(apply_rope(x, pos, inv_freq, layout), delta, inv_freq, layout)
    direct = apply_rope(x, pos + delta, inv_freq, layout)
    assert moved.dtype == torch.float32 and moved.shape == x.shape
    # Both sides round float32 angles of size up to max_position * inv_freq[0] = max_position rad:
    # half an ulp is max_position * 2**-24 ~ 6e-8 * max_position per side; a rotation error of e
    # rad moves a pair of norm r by e * r. Allow 2e-7 * max_position plus 1e-5 for cos/sin/mul.
    max_position = max(p0, p0 + delta) + n
    tol = (1e-5 + 2e-7 * max_position) * pair_norm_max(x, layout)
    err = float((moved - direct).abs().max())
    assert err <= tol, f"max |diff| {err:.3g} > {tol:.3g}"


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    half_dim=st.integers(4, 128),
    n=st.integers(1, 10),
    p0=st.integers(0, MAX_POS),
    layout=st.sampled_from(LAYOUTS),
)
def test_apply_rope_matches_float64_pairwise_rotation(seed, half_dim, n, p0, layout):
    """The layouts are what the docstrings say: half pairs (i, i+d/2), interleaved pairs (2i, 2i+1)."""
    head_dim = 2 * half_dim
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, head_dim, generator=g)
    inv_freq = inv_freq_for(head_dim)
    pos = torch.randint(0, MAX_POS + 1, (n,), generator=g)
    pos[0] = p0
    got = apply_rope(x, pos, inv_freq, layout).double()
    want = rope_reference(x, pos, inv_freq, layout)
    # apply_rope forms float32 angles (like transformers): error up to ~6e-8 * position rad.
    tol = (1e-5 + 2e-7 * int(pos.max())) * pair_norm_max(x, layout)
    assert float((got - want).abs().max()) <= tol


def test_rope_layouts_differ_and_preserve_pair_norms():
    head_dim = 16
    x = torch.randn(4, 5, head_dim, generator=torch.Generator().manual_seed(0))
    inv_freq = inv_freq_for(head_dim)
    pos = torch.arange(3, 8)
    half = apply_rope(x, pos, inv_freq, "half")
    inter = apply_rope(x, pos, inv_freq, "interleaved")
    assert not torch.allclose(half, inter, atol=1e-3)
    for layout, y in (("half", half), ("interleaved", inter)):
        a, b = pair_index(head_dim, layout)
        torch.testing.assert_close(x[..., a] ** 2 + x[..., b] ** 2, y[..., a] ** 2 + y[..., b] ** 2)
    # Position 0 is the identity rotation in both layouts.
    zero = torch.zeros(5, dtype=torch.long)
    assert torch.equal(apply_rope(x, zero, inv_freq, "half"), x)
    assert torch.equal(apply_rope(x, zero, inv_freq, "interleaved"), x)


def test_apply_rope_half_matches_transformers_rotary_bit_for_bit():
    """The 'half' layout is Hugging Face Llama's rotate_half RoPE, bit for bit in float32."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    rotary = LlamaRotaryEmbedding(config)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 37, 16, generator=g)
    k = torch.randn(1, 2, 37, 16, generator=g)
    pos = torch.arange(1000, 1037)
    cos, sin = rotary(q, pos[None])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q[0], pos, rotary.inv_freq, "half"), q_hf[0])
    assert torch.equal(apply_rope(k[0], pos, rotary.inv_freq, "half"), k_hf[0])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    delta=st.integers(-100_000, 100_000),
    layout=st.sampled_from(LAYOUTS),
)
def test_rerotate_error_does_not_grow_with_distance(seed, delta, layout):
    """Angles in float64: moving by d then by -d returns the keys to float32 rounding, however far."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 6, 64, generator=g)
    inv_freq = inv_freq_for(64)
    back = rerotate(rerotate(k, delta, inv_freq, layout), -delta, inv_freq, layout)
    assert float((back - k).abs().max()) <= 2e-6 * pair_norm_max(k, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rerotate_by_zero_returns_input_unchanged(layout):
    k = torch.randn(2, 3, 7, 32)
    inv_freq = inv_freq_for(32)
    assert torch.equal(rerotate(k, 0, inv_freq, layout), k)
    assert torch.equal(rerotate(k, torch.zeros(7, dtype=torch.long), inv_freq, layout), k)
    assert torch.equal(rerotate(k, torch.tensor(0), inv_freq, layout), k)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rerotate_per_token_delta_vector(layout):
    head_dim, n = 64, 9
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, n, head_dim, generator=g)
    inv_freq = inv_freq_for(head_dim)
    pos = torch.arange(100, 100 + n)
    delta = torch.tensor([0, 5, -7, 300, -100, 1, 2000, -50, 0])
    moved = rerotate(apply_rope(x, pos, inv_freq, layout), delta, inv_freq, layout)
    direct = apply_rope(x, pos + delta, inv_freq, layout)
    torch.testing.assert_close(moved, direct, atol=1e-5 + 2e-7 * 2200 * pair_norm_max(x, layout), rtol=0)
    # Token i moved alone by delta[i] gives the same row.
    for i in range(n):
        alone = rerotate(apply_rope(x[:, i : i + 1], pos[i : i + 1], inv_freq, layout), int(delta[i]), inv_freq, layout)
        torch.testing.assert_close(alone, moved[:, i : i + 1], atol=1e-6, rtol=0)


def test_rerotate_keeps_dtype():
    k = torch.randn(2, 4, 16).to(torch.bfloat16)
    out = rerotate(k, 3, inv_freq_for(16))
    assert out.dtype == torch.bfloat16 and out.shape == k.shape


@pytest.mark.parametrize("bad", [torch.zeros(5, dtype=torch.long), torch.zeros(7, dtype=torch.long), torch.zeros(6, 1, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)])
def test_rerotate_bad_delta_shape_raises(bad):
    k = torch.randn(2, 6, 16)
    with pytest.raises(ValueError, match="delta"):
        rerotate(k, bad, inv_freq_for(16))


def test_unknown_rope_layout_raises():
    x = torch.randn(2, 3, 8)
    inv_freq = inv_freq_for(8)
    with pytest.raises(ValueError, match="layout"):
        apply_rope(x, torch.arange(3), inv_freq, "neox")
    with pytest.raises(ValueError, match="layout"):
        rerotate(x, 1, inv_freq, "neox")
    with pytest.raises(ValueError, match="layout"):
        rerotate(x, 0, inv_freq, "neox")  # even when there is nothing to rotate


# ---------------------------------------------------------------------------------------------
# KV placement


def test_place_blocks_lands_blocks_at_their_starts_with_rerotated_keys():
    layers, kvh, length, d = 3, 2, 40, 16
    inv_freq = inv_freq_for(d)
    g = torch.Generator().manual_seed(3)
    sentinel = 7.25
    dst_k = torch.full((layers, kvh, length, d), sentinel)
    dst_v = torch.full((layers, kvh, length, d), sentinel)
    sizes, starts, deltas = [5, 8, 3], [2, 10, 30], [-4, 0, 25]
    keys = [torch.randn(layers, kvh, n, d, generator=g) for n in sizes]
    values = [torch.randn(layers, kvh, n, d, generator=g) for n in sizes]
    place_blocks(dst_k, dst_v, keys, values, starts, deltas, inv_freq)
    covered = torch.zeros(length, dtype=torch.bool)
    for k, v, s, dl in zip(keys, values, starts, deltas):
        n = k.shape[-2]
        assert torch.equal(dst_k[:, :, s : s + n], rerotate(k, dl, inv_freq))
        assert torch.equal(dst_v[:, :, s : s + n], v)
        covered[s : s + n] = True
    # Everything else is untouched.
    assert torch.all(dst_k[:, :, ~covered] == sentinel)
    assert torch.all(dst_v[:, :, ~covered] == sentinel)
    # Delta 0 is a plain copy; a nonzero delta actually rotates.
    assert torch.equal(dst_k[:, :, 10:18], keys[1])
    assert not torch.allclose(dst_k[:, :, 2:7], keys[0])


def test_place_blocks_interleaved_layout_and_single_layer():
    kvh, length, d = 2, 12, 8
    inv_freq = inv_freq_for(d)
    dst_k, dst_v = torch.zeros(kvh, length, d), torch.zeros(kvh, length, d)
    k, v = torch.randn(kvh, 4, d), torch.randn(kvh, 4, d)
    place_blocks(dst_k, dst_v, [k], [v], [6], [3], inv_freq, "interleaved")
    assert torch.equal(dst_k[:, 6:10], rerotate(k, 3, inv_freq, "interleaved"))
    assert torch.equal(dst_v[:, 6:10], v)


def test_place_blocks_converts_dtype():
    inv_freq = inv_freq_for(8)
    dst_k, dst_v = torch.zeros(2, 10, 8, dtype=torch.bfloat16), torch.zeros(2, 10, 8, dtype=torch.bfloat16)
    k, v = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    place_blocks(dst_k, dst_v, [k], [v], [1], [2], inv_freq)
    assert torch.equal(dst_k[:, 1:4], rerotate(k, 2, inv_freq).to(torch.bfloat16))
    assert torch.equal(dst_v[:, 1:4], v.to(torch.bfloat16))


@pytest.mark.parametrize("start,n", [(8, 5), (-1, 3), (12, 1), (0, 13)])
def test_place_blocks_overrunning_the_context_raises(start, n):
    dst_k, dst_v = torch.zeros(2, 2, 12, 8), torch.zeros(2, 2, 12, 8)
    k = torch.randn(2, 2, n, 8)
    with pytest.raises(ValueError, match="overruns"):
        place_blocks(dst_k, dst_v, [k], [k.clone()], [start], [0], inv_freq_for(8))


@pytest.mark.parametrize(
    "k_shape,v_shape",
    [
        ((2, 2, 3, 8), (2, 2, 4, 8)),  # keys and values disagree
        ((2, 3, 3, 8), (2, 3, 3, 8)),  # wrong kv heads
        ((3, 2, 3, 8), (3, 2, 3, 8)),  # wrong layers
        ((2, 2, 3, 16), (2, 2, 3, 16)),  # wrong head dim
        ((2, 3, 8), (2, 3, 8)),  # missing the layer axis
    ],
)
def test_place_blocks_mismatched_shapes_raise(k_shape, v_shape):
    dst_k, dst_v = torch.zeros(2, 2, 12, 8), torch.zeros(2, 2, 12, 8)
    with pytest.raises(ValueError):
        place_blocks(dst_k, dst_v, [torch.randn(k_shape)], [torch.randn(v_shape)], [0], [0], inv_freq_for(8))


def test_place_blocks_mismatched_argument_lengths_raise():
    dst_k, dst_v = torch.zeros(2, 12, 8), torch.zeros(2, 12, 8)
    k = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="same length"):
        place_blocks(dst_k, dst_v, [k], [k], [0, 4], [0], inv_freq_for(8))
    with pytest.raises(ValueError, match="same length"):
        place_blocks(dst_k, dst_v, [k, k], [k], [0, 4], [0, 0], inv_freq_for(8))


def test_scatter_kv_writes_at_index_positions_only():
    kvh, length, d = 2, 15, 8
    dst_k, dst_v = torch.full((kvh, length, d), -3.0), torch.full((kvh, length, d), -5.0)
    index = torch.tensor([0, 4, 5, 11, 14])
    k, v = torch.randn(kvh, 5, d), torch.randn(kvh, 5, d)
    scatter_kv(dst_k, dst_v, k, v, index)
    assert torch.equal(dst_k[:, index], k)
    assert torch.equal(dst_v[:, index], v)
    rest = torch.ones(length, dtype=torch.bool)
    rest[index] = False
    assert torch.all(dst_k[:, rest] == -3.0) and torch.all(dst_v[:, rest] == -5.0)
    # Unsorted indices write row i to index[i].
    scatter_kv(dst_k, dst_v, k.flip(1), v.flip(1), index.flip(0))
    assert torch.equal(dst_k[:, index], k)
    assert torch.equal(dst_v[:, index], v)


# ---------------------------------------------------------------------------------------------
# Selective attention


def attention_reference(q, k, v, q_pos, scale):
    """Naive float64 attention: explicit repeat_kv, softmax over entries j <= q_pos[i]."""
    q, k, v = q.double(), k.double(), v.double()
    heads, kv_heads = q.shape[0], k.shape[0]
    group = heads // kv_heads
    out = torch.empty(heads, q.shape[1], q.shape[2], dtype=torch.float64)
    for h in range(heads):
        kh, vh = k[h // group], v[h // group]
        for i, p in enumerate(q_pos.tolist()):
            scores = (kh[: p + 1] @ q[h, i]) * scale
            w = torch.softmax(scores, dim=0)
            out[h, i] = w @ vh[: p + 1]
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 4]),
    length=st.integers(1, 40),
    head_dim=st.sampled_from([8, 16, 64]),
)
def test_selective_attention_matches_naive_float64(seed, kv_heads, group, length, head_dim):
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    subset = torch.rand(length, generator=g) < 0.5
    subset[torch.randint(0, length, (1,), generator=g)] = True
    q_pos = subset.nonzero().flatten()
    m = q_pos.numel()
    q = torch.randn(heads, m, head_dim, generator=g)
    k = torch.randn(kv_heads, length, head_dim, generator=g)
    v = torch.randn(kv_heads, length, head_dim, generator=g)
    scale = head_dim**-0.5
    got = selective_attention(q, k, v, q_pos, scale)
    assert got.shape == (heads, m, head_dim) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), attention_reference(q, k, v, q_pos, scale), atol=2e-5, rtol=1e-5)


def test_selective_attention_unsorted_positions_and_custom_scale():
    g = torch.Generator().manual_seed(5)
    q_pos = torch.tensor([9, 0, 4, 9, 2])
    q = torch.randn(4, 5, 16, generator=g)
    k, v = torch.randn(2, 10, 16, generator=g), torch.randn(2, 10, 16, generator=g)
    got = selective_attention(q, k, v, q_pos, 0.37)
    torch.testing.assert_close(got.double(), attention_reference(q, k, v, q_pos, 0.37), atol=2e-5, rtol=1e-5)
    # Position 0 sees only entry 0: its output is v[0] of its kv head.
    torch.testing.assert_close(got[0, 1], v[0, 0])
    torch.testing.assert_close(got[3, 1], v[1, 0])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_selective_attention_over_all_positions_equals_causal_sdpa(heads, kv_heads):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    length, d = 23, 32
    q = torch.randn(heads, length, d, generator=g)
    k, v = torch.randn(kv_heads, length, d, generator=g), torch.randn(kv_heads, length, d, generator=g)
    got = selective_attention(q, k, v, torch.arange(length), d**-0.5)
    group = heads // kv_heads
    want = F.scaled_dot_product_attention(
        q[None], k.repeat_interleave(group, 0)[None], v.repeat_interleave(group, 0)[None], is_causal=True
    )[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_selective_attention_heads_not_divisible_by_kv_heads_raises():
    q, k = torch.randn(6, 3, 8), torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match="kv heads"):
        selective_attention(q, k, k.clone(), torch.tensor([1, 2, 4]), 1.0)


# ---------------------------------------------------------------------------------------------
# Policies


@pytest.mark.parametrize(
    "text,want",
    [
        ("none", Policy("none")),
        ("full", Policy("full")),
        ("  full ", Policy("full")),
        ("boundary:0", Policy("boundary", k=0)),
        ("boundary:3", Policy("boundary", k=3)),
        ("boundary:128", Policy("boundary", k=128)),
        ("deviation:0", Policy("deviation", ratio=0.0)),
        ("deviation:0.3", Policy("deviation", ratio=0.3)),
        ("deviation:1", Policy("deviation", ratio=1.0)),
        ("deviation:1.0", Policy("deviation", ratio=1.0)),
    ],
)
def test_parse_policy_valid_forms(text, want):
    got = parse_policy(text)
    assert got == want
    assert parse_policy(str(got)) == got  # str round-trips
    assert parse_policy(got) is got  # a Policy passes through


@pytest.mark.parametrize(
    "text",
    ["", "bogus", "None", "none:1", "full:0", "boundary", "boundary:", "boundary:-1", "boundary:1.5",
     "boundary:x", "boundary:3:4", "deviation", "deviation:", "deviation:-0.1", "deviation:1.5",
     "deviation:abc", "deviation:nan", "deviation:inf", "dev:0.3", "prefix"],
)
def test_parse_policy_invalid_forms_raise_naming_expected_forms(text):
    with pytest.raises(ValueError) as info:
        parse_policy(text)
    msg = str(info.value)
    assert POLICY_HELP in msg
    for form in ("none", "boundary:K", "deviation:R", "full"):
        assert form in msg


def _masks(spec):
    """spec: list of (n_tokens, is_fresh) segments -> (fresh mask, block offsets)."""
    fresh = torch.cat([torch.full((n,), f) for n, f in spec])
    offset = torch.cat([torch.arange(n) for n, _ in spec])
    return fresh, offset


SPEC = [(3, True), (5, False), (2, True), (4, False), (1, False), (2, True)]


def test_base_selection_by_policy():
    fresh, offset = _masks(SPEC)
    n = fresh.numel()
    assert torch.equal(base_selection(Policy("none"), fresh, offset), fresh)
    assert torch.equal(base_selection(Policy("full"), fresh, offset), torch.ones(n, dtype=torch.bool))
    assert torch.equal(base_selection(Policy("deviation", ratio=0.2), fresh, offset), torch.ones(n, dtype=torch.bool))
    assert torch.equal(base_selection(Policy("boundary", k=0), fresh, offset), fresh)
    # boundary:2 = fresh + first 2 tokens of each cached block (a 1-token block contributes 1).
    want = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert torch.equal(base_selection(Policy("boundary", k=2), fresh, offset), want)
    # k larger than every block selects everything.
    assert torch.equal(base_selection(Policy("boundary", k=50), fresh, offset), torch.ones(n, dtype=torch.bool))
    # The none selection is a copy, not the caller's mask.
    sel = base_selection(Policy("none"), fresh, offset)
    sel[:] = True
    assert not fresh.all()


def test_deviation_selection_picks_largest_cached_deviations_plus_fresh():
    fresh, _ = _masks(SPEC)  # 10 cached tokens at 3..7, 10..13, 14
    deviation = torch.zeros(fresh.numel())
    # Fresh tokens get huge deviations: they must not use up any of the picks.
    deviation[fresh] = 1e6
    cached_idx = (~fresh).nonzero().flatten()
    for rank, i in enumerate([4, 13, 7, 10, 3, 14, 11, 6, 5, 12]):
        deviation[i] = 100.0 - rank  # 4 is largest, then 13, 7, ...
    order = [4, 13, 7, 10, 3, 14, 11, 6, 5, 12]
    for ratio, n_pick in [(0.0, 0), (0.05, 1), (0.1, 1), (0.3, 3), (0.31, 4), (0.5, 5), (0.99, 10), (1.0, 10)]:
        got = deviation_selection(Policy("deviation", ratio=ratio), fresh, deviation)
        want = fresh.clone()
        want[order[:n_pick]] = True
        assert torch.equal(got, want), (ratio, n_pick)
        assert int((got & ~fresh).sum()) == n_pick == math.ceil(ratio * cached_idx.numel())


def test_deviation_selection_all_fresh_or_all_cached():
    dev = torch.arange(6, dtype=torch.float32)
    all_fresh = torch.ones(6, dtype=torch.bool)
    assert torch.equal(deviation_selection(Policy("deviation", ratio=0.5), all_fresh, dev), all_fresh)
    none_fresh = torch.zeros(6, dtype=torch.bool)
    got = deviation_selection(Policy("deviation", ratio=0.5), none_fresh, dev)
    assert torch.equal(got, torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.bool))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    length=st.integers(1, 200),
    ratio_pct=st.integers(0, 100),
)
def test_deviation_selection_count_is_ceil_of_ratio_times_cached(seed, length, ratio_pct):
    """deviation:R recomputes ceil(R * n_cached) cached tokens, R written as a decimal like the CLI."""
    g = torch.Generator().manual_seed(seed)
    fresh = torch.rand(length, generator=g) < 0.3
    deviation = torch.randperm(length, generator=g).float()  # distinct: the top set is unique
    ratio = parse_policy(f"deviation:{ratio_pct / 100}").ratio
    n_cached = int((~fresh).sum())
    n_pick = -(-ratio_pct * n_cached // 100)  # exact integer ceil(R * n_cached)
    got = deviation_selection(Policy("deviation", ratio=ratio), fresh, deviation)
    assert torch.all(got[fresh])
    picked = got & ~fresh
    assert int(picked.sum()) == n_pick
    if n_pick and n_pick < n_cached:
        assert deviation[picked].min() > deviation[~fresh & ~got].max()


def test_deviation_selection_ratio_0_55_of_100_cached_picks_55():
    """Float rounding of R * n must not add a token: 0.55 * 100 == 55.000000000000007 in floating point."""
    fresh = torch.zeros(100, dtype=torch.bool)
    got = deviation_selection(parse_policy("deviation:0.55"), fresh, torch.arange(100.0))
    assert int(got.sum()) == 55


def test_exact_tokens_are_spared_by_every_partial_policy():
    fresh = torch.tensor([True, False, False, False, False, True])
    offset = torch.tensor([0, 0, 1, 0, 1, 0])
    exact = torch.tensor([False, True, True, False, False, False])
    assert base_selection(Policy("boundary", k=1), fresh, offset, exact).tolist() == [True, False, False, True, False, True]
    assert base_selection(Policy("deviation", ratio=0.5), fresh, offset, exact).tolist() == [True, False, False, True, True, True]
    assert base_selection(Policy("full"), fresh, offset, exact).all()
    deviation = torch.tensor([0.0, 9.0, 9.0, 1.0, 2.0, 0.0])  # exact tokens never count, however large
    got = deviation_selection(Policy("deviation", ratio=0.5), fresh, deviation, exact)
    assert got.tolist() == [True, False, False, False, True, True]
