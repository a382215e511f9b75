"""The block-aware forward pass (BlockEngine) against the stock transformers forward.

Every tiny random-weight family runs in float32: the ``full`` policy must be a plain prefill,
a block reused exactly where it was computed must give the prefill's KV and logits, a moved
block must be the re-rotated block, and bad input must fail with a clear ValueError.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rcllm.engine.blocks import BlockKV, Segment, uncached
from rcllm.engine.forward import BlockEngine
from rcllm.engine.models import load_model
from rcllm.kernels import rerotate

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")
POLICIES = ("none", "boundary:3", "tail:3", "deviation:0.3", "full")
LOGIT_TOL = 1e-4
KV_TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tiny_models):
    """(LoadedModel, BlockEngine) of one tiny family, float32 on CPU."""
    lm = load_model(str(tiny_models[request.param]), device="cpu", dtype=torch.float32)
    lm.model.eval()
    return lm, BlockEngine(lm)


def rand_ids(lm, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.model.config.vocab_size, (n,), generator=g)


def split(ids: torch.Tensor, sizes) -> list[torch.Tensor]:
    assert sum(sizes) == ids.numel()
    return list(torch.split(ids, list(sizes)))


def cat_ids(segments) -> torch.Tensor:
    return torch.cat([s.token_ids for s in segments])


@torch.inference_mode()
def stock_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    return lm.model(input_ids=ids[None].to(lm.device)).logits[0, -1].float().cpu()


@torch.inference_mode()
def stock_kv(lm, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock forward's KV cache as [layers, kv_heads, L, head_dim]."""
    out = lm.model(input_ids=ids[None].to(lm.device), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    keys = torch.stack([layer.keys[0] for layer in cache.layers]).float().cpu()
    values = torch.stack([layer.values[0] for layer in cache.layers]).float().cpu()
    assert keys.shape[2] == ids.numel(), "stock cache was truncated (sliding window?)"
    return keys, values


def kv_tol(ref: torch.Tensor) -> float:
    """KV_TOL for entries of size <= 1; relative beyond (SmolLM2's keys reach ~20, where a float32
    ulp is ~2e-6 and recomputing a subset of rows reorders the matmul sums)."""
    return KV_TOL * max(1.0, float(ref.abs().max()))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def garbage_like(block: BlockKV, seed: int) -> BlockKV:
    """A block with the right ids, shape and fingerprint but random KV."""
    g = torch.Generator().manual_seed(seed)
    return BlockKV(
        token_ids=block.token_ids,
        keys=torch.randn(block.keys.shape, generator=g) * 5,
        values=torch.randn(block.values.shape, generator=g) * 5,
        base_pos=block.base_pos,
        fingerprint=block.fingerprint,
    )


def moved_prompt(lm, engine, seed: int = 0, lead: int = 0):
    """A ranking-like prompt: [context]([lead])[label][block]...[label][block][instruction].

    Every block is computed once after the context (base position = context length) and then
    placed at its own slot, so all but the first are moved, and none sees its real left context.
    ``lead`` fresh tokens after the context move every block that much further (as a long history
    does in a real prompt).
    """
    ctx = rand_ids(lm, 16, seed)
    segments = [Segment.fresh(ctx, "context")]
    if lead:
        segments.append(Segment.fresh(rand_ids(lm, lead, seed + 400), "lead"))
    for i, n in enumerate((14, 11, 17, 9)):
        segments.append(Segment.fresh(rand_ids(lm, 2, seed + 100 + i), f"label{i}"))
        block = engine.compute_block(rand_ids(lm, n, seed + 200 + i), ctx)
        assert block.base_pos == ctx.numel()
        segments.append(Segment.cached(block, f"block{i}"))
    segments.append(Segment.fresh(rand_ids(lm, 8, seed + 300), "instruction"))
    return segments


# ---------------------------------------------------------------------------------------------
# full policy == stock forward


def test_full_policy_matches_stock_forward(tiny):
    lm, engine = tiny
    ids = rand_ids(lm, 100, 1)
    parts = split(ids, (12, 20, 3, 25, 15, 25))
    # Cached segments of every kind: exact prefix, moved, and pure garbage KV. Full ignores them.
    exact = engine.compute_block(parts[1], parts[0])
    moved = engine.compute_block(parts[3], [])
    garbage = garbage_like(engine.compute_block(parts[5], parts[4]), seed=7)
    segments = [
        Segment.fresh(parts[0]),
        Segment.cached(exact),
        Segment.fresh(parts[2]),
        Segment.cached(moved),
        Segment.fresh(parts[4]),
        Segment.cached(garbage),
    ]
    assert torch.equal(cat_ids(segments), ids)
    result = engine.forward(segments, "full")
    want = stock_logits(lm, ids)
    assert result.logits.shape == want.shape and result.logits.dtype == torch.float32
    assert max_diff(result.logits, want) <= LOGIT_TOL
    assert result.n_tokens == 100
    assert result.recomputed_fraction == 1.0
    assert result.recomputed_tokens == 100
    # The same prompt with every segment fresh gives the same logits.
    plain = engine.forward(uncached(segments), "full")
    assert max_diff(plain.logits, result.logits) <= 1e-6


def test_full_policy_kv_matches_stock_cache(tiny):
    lm, engine = tiny
    ids = rand_ids(lm, 40, 2)
    result = engine.forward([Segment.fresh(ids)], "full", return_kv=True)
    keys, values = stock_kv(lm, ids)
    assert result.keys.shape == keys.shape
    assert max_diff(result.keys, keys) <= KV_TOL
    assert max_diff(result.values, values) <= KV_TOL


def test_greedy_generation_matches_stock_generate(tiny):
    lm, engine = tiny
    ids = rand_ids(lm, 40, 3)
    result = engine.forward([Segment.fresh(ids[:25]), Segment.fresh(ids[25:])], "full", max_new_tokens=6)
    assert len(result.generated) == 6
    with torch.inference_mode():
        out = lm.model.generate(
            ids[None].to(lm.device),
            attention_mask=torch.ones(1, ids.numel(), dtype=torch.long, device=lm.device),
            do_sample=False,
            max_new_tokens=6,
            min_new_tokens=6,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    stock = out.sequences[0, ids.numel() :].tolist()
    assert len(stock) == 6
    # Compare the common prefix; at a divergence the two candidates must be a float tie.
    for step, (ours, theirs) in enumerate(zip(result.generated, stock)):
        step_logits = out.logits[step][0].float().cpu()
        if ours != theirs:
            gap = abs(float(step_logits[ours] - step_logits[theirs]))
            assert gap <= LOGIT_TOL, f"step {step}: engine {ours} vs stock {theirs}, logit gap {gap:.3g}"
            break
    assert max_diff(result.logits, out.logits[0][0]) <= LOGIT_TOL


def test_generation_stops_at_eos(tiny):
    lm, engine = tiny
    segments = [Segment.fresh(rand_ids(lm, 30, 4))]
    free = engine.forward(segments, "full", max_new_tokens=6).generated
    assert len(free) == 6
    stop = free[2]
    first = free.index(stop)
    stopped = engine.forward(segments, "full", max_new_tokens=6, eos_token_id=stop).generated
    assert stopped == free[: first + 1]
    assert engine.forward(segments, "full", max_new_tokens=0).generated == []


# ---------------------------------------------------------------------------------------------
# prefix reuse: a block placed where it was computed, after the same context, is exact


def test_prefix_block_reuse_is_exact(tiny):
    lm, engine = tiny
    ctx_ids, block_ids, tail_ids = split(rand_ids(lm, 60, 5), (20, 30, 10))
    ids = torch.cat([ctx_ids, block_ids, tail_ids])
    block = engine.compute_block(block_ids, ctx_ids)
    assert block.base_pos == 20 and block.n_tokens == 30 and block.fingerprint == lm.fingerprint
    keys, values = stock_kv(lm, ids)
    # compute_block itself is what a prefix cache holds for these tokens.
    assert max_diff(block.keys, keys[:, :, 20:50]) <= KV_TOL
    assert max_diff(block.values, values[:, :, 20:50]) <= KV_TOL

    segments = [Segment.fresh(ctx_ids), Segment.cached(block), Segment.fresh(tail_ids)]
    result = engine.forward(segments, "none", return_kv=True)
    assert max_diff(result.logits, stock_logits(lm, ids)) <= LOGIT_TOL
    assert max_diff(result.keys, keys) <= KV_TOL
    assert max_diff(result.values, values) <= KV_TOL
    # Only the context and the tail were recomputed.
    assert result.recomputed_fraction == pytest.approx(30 / 60)
    # The cached block's entries are its cached KV, untouched.
    assert torch.equal(result.keys[:, :, 20:50], block.keys)
    assert torch.equal(result.values[:, :, 20:50], block.values)


def test_prefix_block_reuse_is_exact_with_cached_context(tiny):
    lm, engine = tiny
    ctx_ids, block_ids, tail_ids = split(rand_ids(lm, 60, 6), (20, 30, 10))
    ids = torch.cat([ctx_ids, block_ids, tail_ids])
    ctx = engine.compute_block(ctx_ids, [])
    assert ctx.base_pos == 0
    block = engine.compute_block(block_ids, ctx)
    assert block.base_pos == 20
    keys, values = stock_kv(lm, ids)
    assert max_diff(ctx.keys, keys[:, :, :20]) <= KV_TOL
    assert max_diff(block.keys, keys[:, :, 20:50]) <= KV_TOL
    assert max_diff(block.values, values[:, :, 20:50]) <= KV_TOL

    segments = [Segment.cached(ctx), Segment.cached(block), Segment.fresh(tail_ids)]
    result = engine.forward(segments, "none", return_kv=True)
    assert max_diff(result.logits, stock_logits(lm, ids)) <= LOGIT_TOL
    assert max_diff(result.keys, keys) <= KV_TOL
    assert max_diff(result.values, values) <= KV_TOL
    assert result.recomputed_fraction == pytest.approx(10 / 60)


@pytest.mark.parametrize("policy", POLICIES + ("boundary:0", "deviation:0", "deviation:1"))
def test_every_policy_is_exact_when_blocks_sit_where_they_were_computed(tiny, policy):
    lm, engine = tiny
    ctx_ids, b1, b2, tail_ids = split(rand_ids(lm, 50, 7), (10, 15, 17, 8))
    ids = torch.cat([ctx_ids, b1, b2, tail_ids])
    ctx = engine.compute_block(ctx_ids, [])
    first = engine.compute_block(b1, ctx)
    second = engine.compute_block(b2, torch.cat([ctx_ids, b1]))
    assert second.base_pos == 25
    segments = [Segment.cached(ctx), Segment.cached(first), Segment.cached(second), Segment.fresh(tail_ids)]
    result = engine.forward(segments, policy)
    assert max_diff(result.logits, stock_logits(lm, ids)) <= LOGIT_TOL


def test_prefix_reuse_greedy_generation_matches_full(tiny):
    lm, engine = tiny
    ctx_ids, block_ids = split(rand_ids(lm, 36, 8), (12, 24))
    block = engine.compute_block(block_ids, ctx_ids)
    cached = engine.forward([Segment.fresh(ctx_ids), Segment.cached(block)], "none", max_new_tokens=5)
    full = engine.forward([Segment.fresh(ctx_ids), Segment.fresh(block_ids)], "full", max_new_tokens=5)
    assert max_diff(cached.logits, full.logits) <= LOGIT_TOL
    assert cached.generated == full.generated


# ---------------------------------------------------------------------------------------------
# moved blocks


@pytest.mark.parametrize("lead", [7, 33])  # the block moves 13 positions back / forward
def test_moved_block_keys_are_the_rerotated_cached_keys(tiny, lead):
    lm, engine = tiny
    ctx_ids = rand_ids(lm, 20, 9)
    block_ids = rand_ids(lm, 30, 10)
    block = engine.compute_block(block_ids, ctx_ids)
    lead_ids, tail_ids = rand_ids(lm, lead, 11), rand_ids(lm, 5, 12)
    segments = [Segment.fresh(lead_ids), Segment.cached(block), Segment.fresh(tail_ids)]
    result = engine.forward(segments, "none", return_kv=True)
    delta = lead - block.base_pos
    placed_k = result.keys[:, :, lead : lead + 30]
    assert max_diff(placed_k, rerotate(block.keys, delta, engine.inv_freq)) <= 1e-6
    assert torch.equal(result.values[:, :, lead : lead + 30], block.values)
    # A real move: the keys are not the ones computed at the base position.
    assert max_diff(placed_k, block.keys) > 1e-3
    # With full, the moved prompt is a plain prefill.
    ids = cat_ids(segments)
    full = engine.forward(segments, "full")
    assert max_diff(full.logits, stock_logits(lm, ids)) <= LOGIT_TOL


def test_moved_block_keys_equal_keys_computed_at_the_new_position_in_layer_0(tiny):
    """Layer 0 K depends only on the token and its position: a moved block's layer-0 keys are exact."""
    lm, engine = tiny
    block_ids = rand_ids(lm, 12, 13)
    block = engine.compute_block(block_ids, rand_ids(lm, 9, 14))
    lead_ids = rand_ids(lm, 21, 15)
    result = engine.forward([Segment.fresh(lead_ids), Segment.cached(block), Segment.fresh(lead_ids[:3])], "none", return_kv=True)
    keys, _ = stock_kv(lm, torch.cat([lead_ids, block_ids]))
    assert max_diff(result.keys[0, :, 21:33], keys[0, :, 21:33]) <= KV_TOL


# ---------------------------------------------------------------------------------------------
# policies


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_equals_full_without_cached_segments(tiny, policy):
    lm, engine = tiny
    ids = rand_ids(lm, 45, 16)
    segments = [Segment.fresh(p) for p in split(ids, (10, 5, 20, 10))]
    result = engine.forward(segments, policy)
    full = engine.forward(segments, "full")
    assert max_diff(result.logits, full.logits) <= LOGIT_TOL
    assert max_diff(result.logits, stock_logits(lm, ids)) <= LOGIT_TOL
    assert result.recomputed_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("policy", ["deviation:1", "boundary:1000", "tail:1000"])
def test_policies_selecting_every_token_equal_full_whatever_the_cache(tiny, policy):
    lm, engine = tiny
    segments = moved_prompt(lm, engine, seed=17)
    segments = [Segment.cached(garbage_like(s.kv, i), s.name) if s.is_cached else s for i, s in enumerate(segments)]
    result = engine.forward(segments, policy)
    assert max_diff(result.logits, stock_logits(lm, cat_ids(segments))) <= LOGIT_TOL
    assert result.recomputed_fraction == pytest.approx(1.0)


def test_policies_are_ordered_in_recomputation_and_full_is_exact(tiny):
    lm, engine = tiny
    segments = moved_prompt(lm, engine, seed=18)
    ids = cat_ids(segments)
    length = ids.numel()
    n_fresh = sum(s.n_tokens for s in segments if not s.is_cached)
    n_cached = length - n_fresh
    n_blocks = sum(s.is_cached for s in segments)
    n_layers = engine.n_layers
    want = stock_logits(lm, ids)

    results = {p: engine.forward(segments, p) for p in ("none", "boundary:2", "deviation:0.5", "full")}
    frac = {p: r.recomputed_fraction for p, r in results.items()}
    err = {p: max_diff(r.logits, want) for p, r in results.items()}

    assert frac["none"] < frac["boundary:2"] < frac["deviation:0.5"] < frac["full"] == 1.0
    # The bookkeeping is exact (the prompt ends with a fresh segment).
    assert frac["none"] == pytest.approx(n_fresh / length)
    assert frac["boundary:2"] == pytest.approx((n_fresh + 2 * n_blocks) / length)
    tail = engine.forward(segments, "tail:2")
    assert tail.recomputed_fraction == pytest.approx((n_fresh + 2 * n_blocks) / length)
    assert max_diff(tail.logits, results["boundary:2"].logits) > 0  # the other end of every block
    check = max(0, min(1, n_layers - 2))
    dev_tokens = (check + 1) * length + (n_layers - check - 1) * (n_fresh + math.ceil(0.5 * n_cached))
    assert frac["deviation:0.5"] == pytest.approx(dev_tokens / (length * n_layers))
    assert err["full"] <= LOGIT_TOL
    assert err["none"] > 10 * LOGIT_TOL  # moved blocks without correction are not a prefill
    assert all(math.isfinite(e) for e in err.values())
    assert all(torch.isfinite(r.logits).all() for r in results.values())


# ---------------------------------------------------------------------------------------------
# partial policies on moved blocks, against an independent float64 reference


def _rope64(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x`` [..., n, d] rotated to ``positions`` [n] (pairs i and i + d/2), all in float64."""
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class Reference:
    """The model's weights in float64 and its attention written out, for the policies' semantics:
    every layer computes q, k, v of every token; a cached token offers the others the K/V of its
    block's own prefill (after the block context, RoPE at the token's place in this prompt)
    unless the policy recomputes it in that layer; queries see keys at positions <= their own.
    Shares no code with the engine (no kernels, no rcllm.engine.policy)."""

    def __init__(self, lm):
        self.model = copy.deepcopy(lm.model).to(torch.float64).eval()
        self.inv_freq = lm.inv_freq.double().cpu()
        self.head_dim = lm.head_dim
        self.layers = self.model.model.layers

    def _qkv(self, layer, h):
        """q [heads, n, d] and k [kv_heads, n, d] before RoPE, v [kv_heads, n, d]."""
        attn, n, d = layer.self_attn, h.shape[0], self.head_dim
        x = layer.input_layernorm(h)
        q, k, v = (proj(x).view(n, -1, d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def _layer(self, layer, h, q, k, v):
        n = h.shape[0]
        heads = q.shape[0]
        k, v = (t.repeat_interleave(heads // t.shape[0], dim=0) for t in (k, v))
        scores = q @ k.transpose(1, 2) * layer.self_attn.scaling
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
        h = h + layer.self_attn.o_proj(o)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def prefill(self, ids: torch.Tensor):
        """Plain causal prefill: (last logits, K before RoPE [layers, kv_heads, n, d], V)."""
        return self.forward(ids)

    @torch.no_grad()
    def forward(self, ids, select=None, cached=None):
        """Logits of the last token and the K (before RoPE) and V every layer attended to.

        ``cached``: (is_cached [n], K before RoPE, V [layers, kv_heads, n, d]) of the cached
        tokens; ``select(layer, k, v, cached_k, cached_v)``: the tokens that layer recomputes,
        given their recomputed and their cached K (after RoPE) and V; fresh tokens always are."""
        n = ids.numel()
        positions = torch.arange(n)
        h = self.model.model.embed_tokens(ids)
        keys, values = [], []
        for no, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h)
            if cached is not None:
                is_cached, cache_k, cache_v = cached
                rotated_cache_k = _rope64(cache_k[no], positions, self.inv_freq)
                use = (select(no, _rope64(k, positions, self.inv_freq), v, rotated_cache_k, cache_v[no]) | ~is_cached)
                k = torch.where(use[None, :, None], k, cache_k[no])
                v = torch.where(use[None, :, None], v, cache_v[no])
            keys.append(k)
            values.append(v)
            h = self._layer(layer, h, _rope64(q, positions, self.inv_freq), _rope64(k, positions, self.inv_freq), v)
        logits = self.model.lm_head(self.model.model.norm(h[-1]))
        return logits, torch.stack(keys), torch.stack(values)

    def policy(self, segments, policy: str):
        """Logits, K (after RoPE) and V of ``segments`` (a moved_prompt) under ``policy``."""
        ids = cat_ids(segments).cpu()
        n, context = ids.numel(), segments[0].token_ids.cpu()
        is_cached = torch.zeros(n, dtype=torch.bool)
        boundary = torch.zeros(n, dtype=torch.bool)
        cache_k = torch.zeros(len(self.layers), self.model.config.num_key_value_heads, n, self.head_dim, dtype=torch.float64)
        cache_v = torch.zeros_like(cache_k)
        start = 0
        for seg in segments:
            if seg.is_cached:  # the block's own prefill after the context it was computed behind
                _, bk, bv = self.prefill(torch.cat([context, seg.token_ids.cpu()]))
                cache_k[:, :, start : start + seg.n_tokens] = bk[:, :, context.numel() :]
                cache_v[:, :, start : start + seg.n_tokens] = bv[:, :, context.numel() :]
                is_cached[start : start + seg.n_tokens] = True
                k = min(int(policy.split(":")[1]) if policy.startswith(("boundary:", "tail:")) else 0, seg.n_tokens)
                if policy.startswith("tail:"):  # the block's last k tokens
                    boundary[start + seg.n_tokens - k : start + seg.n_tokens] = True
                else:
                    boundary[start : start + k] = True
            start += seg.n_tokens
        last = torch.arange(n) == n - 1
        kind = policy.split(":")[0]
        check = max(0, min(1, len(self.layers) - 2))  # deviation: layers 0..1 in full, 0 for 2 layers
        chosen = {}

        def select(layer, k, v, cached_k, cached_v):
            if kind == "none":
                return last.clone()
            if kind in ("boundary", "tail"):
                return boundary | last
            if layer <= check:  # deviation
                if layer == check:
                    drift = (k - cached_k).pow(2).sum((0, 2)) + (v - cached_v).pow(2).sum((0, 2))
                    drift[~is_cached] = float("-inf")
                    ratio = float(policy.split(":")[1])
                    picked = torch.topk(drift, math.ceil(round(ratio * int(is_cached.sum()), 9))).indices
                    ranked = drift[is_cached].sort(descending=True).values
                    chosen["margin"] = float(ranked[picked.numel() - 1] - ranked[picked.numel()]) / float(ranked[0])
                    chosen["tokens"] = torch.zeros(n, dtype=torch.bool).index_fill(0, picked, True)
                return torch.ones(n, dtype=torch.bool)
            return chosen["tokens"] | last

        logits, keys, values = self.forward(ids, select, (is_cached, cache_k, cache_v))
        return logits, _rope64(keys, torch.arange(n), self.inv_freq), values, chosen.get("margin")


@pytest.fixture(scope="module", params=FAMILIES)
def deep(request, tmp_path_factory, smollm_path):
    """(LoadedModel, BlockEngine) of a 4-layer tiny model, float32: deviation checks layer 1.

    With 2 layers the check layer is 0, whose K and V depend only on each token and its position:
    a moved block's are exact there, so its deviations are rounding noise and pick nothing in
    particular."""
    from conftest import tiny_model_dir

    folder = tiny_model_dir(request.param, tmp_path_factory.mktemp(f"deep-{request.param}"), smollm_path,
                            num_hidden_layers=4)
    lm = load_model(str(folder), device="cpu", dtype=torch.float32)
    lm.model.eval()
    return lm, BlockEngine(lm)


@pytest.mark.parametrize("policy", ["none", "boundary:3"])
def test_partial_policies_on_moved_blocks_match_a_float64_reference(tiny, policy):
    """The engine's logits and every layer's assembled K/V under a partial policy, with every block
    moved away from where it was computed, equal the float64 reference's."""
    check_against_reference(*tiny, policy)


def test_deviation_on_moved_blocks_matches_a_float64_reference(deep):
    check_against_reference(*deep, "deviation:0.3")


def check_against_reference(lm, engine, policy: str) -> None:
    ref = Reference(lm)
    segments = moved_prompt(lm, engine, seed=24)
    ids = cat_ids(segments)
    # the reference itself: a full prefill equals the stock forward
    full_logits, full_k, full_v = ref.prefill(ids.cpu())
    assert max_diff(full_logits, stock_logits(lm, ids)) <= LOGIT_TOL
    stock_k, stock_v = stock_kv(lm, ids)
    assert max_diff(_rope64(full_k, torch.arange(ids.numel()), ref.inv_freq), stock_k) <= kv_tol(stock_k)

    want_logits, want_k, want_v, margin = ref.policy(segments, policy)
    assert max_diff(want_logits, full_logits) > 100 * LOGIT_TOL  # moved blocks: not a prefill
    if margin is not None:  # the gap at the cut, relative to the largest drift, is well above float32
        assert margin > 1e-5  # rounding of the drifts (~1e-7 of them): both pick the same tokens
    got = engine.forward(segments, policy, return_kv=True)
    assert max_diff(got.logits, want_logits) <= LOGIT_TOL
    assert max_diff(got.keys, want_k) <= kv_tol(want_k)
    assert max_diff(got.values, want_v) <= kv_tol(want_v)


LEAD = 600  # bf16 tests move blocks ~600-660 positions, where bfloat16 no longer holds every integer


def bf16_ulp(scale: float) -> float:
    """The spacing of bfloat16 numbers (8 significant bits) at magnitude ``scale``."""
    return 2.0 ** (math.floor(math.log2(scale)) - 7)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_bf16(request, tiny_models):
    """(LoadedModel, BlockEngine) of one tiny family in bfloat16 on CPU."""
    lm = load_model(str(tiny_models[request.param]), device="cpu", dtype=torch.bfloat16)
    lm.model.eval()
    return lm, BlockEngine(lm)


def test_bf16_full_policy_and_exact_reuse_match_the_stock_bf16_forward(tiny_bf16):
    """Within 4 bf16 ulps of the logits' scale (on CPU the engine's full policy is bit for bit the
    stock forward; GPU kernels sum in another order)."""
    lm, engine = tiny_bf16
    segments = moved_prompt(lm, engine, seed=25)
    ids = cat_ids(segments)
    want = stock_logits(lm, ids)
    tol = 4 * bf16_ulp(float(want.abs().max()))
    assert max_diff(engine.forward(segments, "full").logits, want) <= tol
    ctx_ids, block_ids, tail_ids = split(rand_ids(lm, 60, 26), (20, 30, 10))
    block = engine.compute_block(block_ids, ctx_ids)
    exact = [Segment.fresh(ctx_ids), Segment.cached(block), Segment.fresh(tail_ids)]
    for policy in ("none", "boundary:3", "deviation:0.3"):
        assert max_diff(engine.forward(exact, policy).logits, stock_logits(lm, cat_ids(exact))) <= tol, policy


@pytest.mark.parametrize("policy", ["none", "boundary:3"])
def test_bf16_partial_policies_on_moved_blocks_stay_as_close_to_float64_as_a_bf16_prefill(tiny_bf16, policy):
    """bf16 rounds every activation to 8 bits: a plain bf16 prefill of this prompt is already a few
    ulps off the float64 truth. Under a partial policy on moved blocks the engine in bf16 must be
    no further from the float64 reference (the same bf16 weights, in float64) than twice that, and
    never held to less than 4 ulps."""
    lm, engine = tiny_bf16
    ref = Reference(lm)
    segments = moved_prompt(lm, engine, seed=24, lead=LEAD)
    ids = cat_ids(segments)
    full_logits, full_k, full_v = ref.prefill(ids.cpu())
    stock_k, stock_v = stock_kv(lm, ids)
    positions = torch.arange(ids.numel())
    want_logits, want_k, want_v, _ = ref.policy(segments, policy)
    got = engine.forward(segments, policy, return_kv=True)
    for what, got_x, want_x, stock_error in (
        ("logits", got.logits, want_logits, max_diff(stock_logits(lm, ids), full_logits)),
        ("keys", got.keys, want_k, max_diff(stock_k, _rope64(full_k, positions, ref.inv_freq))),
        ("values", got.values, want_v, max_diff(stock_v, full_v)),
    ):
        tol = max(2 * stock_error, 4 * bf16_ulp(float(want_x.abs().max())))
        assert max_diff(got_x, want_x) <= tol, (what, max_diff(got_x, want_x), tol)


def test_a_batch_of_prompts_gives_each_prompt_its_own_forward(tiny):
    """forward_batch: ragged prompts with different policies (deviation narrowing its own rows
    mid-stack) and different lengths give what each prompt gives alone."""
    lm, engine = tiny
    cached = moved_prompt(lm, engine, seed=21)
    plain = uncached(moved_prompt(lm, engine, seed=22))[:-2]  # a shorter prompt, all fresh
    batch = [(cached, "none"), (cached, "deviation:0.5"), (plain, "full"), (cached, "boundary:2"), (cached, "full")]
    together = engine.forward_batch(batch)
    assert len(together) == len(batch)
    for (segments, policy), got in zip(batch, together):
        alone = engine.forward(segments, policy)
        assert max_diff(got.logits, alone.logits) <= LOGIT_TOL, policy
        assert (got.n_tokens, got.recomputed_tokens) == (alone.n_tokens, alone.recomputed_tokens)
        assert got.recomputed_fraction == pytest.approx(alone.recomputed_fraction)
    assert max_diff(together[4].logits, stock_logits(lm, cat_ids(cached))) <= LOGIT_TOL
    assert engine.forward_batch([]) == []


def test_logits_restricted_to_some_ids_equal_those_of_the_whole_vocabulary(tiny):
    """logit_ids: those ids' logits equal the whole projection's, every other one is -inf; alone,
    in a batch, and refused with generation (whose greedy tokens need every logit)."""
    lm, engine = tiny
    segments = moved_prompt(lm, engine, seed=24)
    ids = torch.tensor([5, 1, 17, 3])
    rest = torch.ones(lm.model.config.vocab_size, dtype=torch.bool)
    rest[ids] = False
    for policy in ("none", "tail:3", "full"):
        whole = engine.forward(segments, policy).logits
        for got in (engine.forward(segments, policy, logit_ids=ids), engine.forward_batch([(segments, policy)], ids)[0]):
            assert got.logits.shape == whole.shape
            assert max_diff(got.logits[ids], whole[ids]) <= LOGIT_TOL, policy
            assert torch.isneginf(got.logits[rest]).all()
            assert int(got.logits.argmax()) == int(ids[whole[ids].argmax()])
    with pytest.raises(ValueError, match="generation needs them all"):
        engine.forward(segments, "none", max_new_tokens=2, logit_ids=ids)


def test_a_bad_prompt_fails_its_batch_before_any_work(tiny):
    lm, engine = tiny
    good = moved_prompt(lm, engine, seed=23)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.forward_batch([(good, "none"), ([Segment.fresh([])], "full")])


# ---------------------------------------------------------------------------------------------
# bad input


def test_empty_prompt_raises(tiny):
    _, engine = tiny
    with pytest.raises(ValueError, match="empty prompt"):
        engine.forward([])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.forward([Segment.fresh([])])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.forward([Segment.fresh([]), Segment.fresh(torch.zeros(0, dtype=torch.long))], "none")


@pytest.mark.parametrize("segments", [[], [Segment.fresh([])]], ids=["no-segments", "zero-tokens"])
def test_empty_prompt_with_generation_raises(tiny, segments):
    _, engine = tiny
    with pytest.raises(ValueError, match="empty prompt"):
        engine.forward(segments, "full", max_new_tokens=2)


def test_block_from_another_model_raises(tiny):
    lm, engine = tiny
    block = engine.compute_block(rand_ids(lm, 8, 19), [])
    foreign = BlockKV(block.token_ids, block.keys, block.values, block.base_pos, fingerprint="another-model")
    with pytest.raises(ValueError, match="another model"):
        engine.forward([Segment.fresh(rand_ids(lm, 4, 20)), Segment.cached(foreign, "item")], "none")
    with pytest.raises(ValueError, match="another model"):
        engine.compute_block(rand_ids(lm, 3, 21), foreign)


@pytest.mark.parametrize("what", ["layers", "kv_heads", "head_dim"])
def test_block_of_the_wrong_shape_raises(tiny, what):
    lm, engine = tiny
    block = engine.compute_block(rand_ids(lm, 8, 22), [])
    layers, kvh, n, d = block.keys.shape
    shape = {"layers": (layers - 1 or 2, kvh, n, d), "kv_heads": (layers, kvh + 1, n, d), "head_dim": (layers, kvh, n, d + 2)}[what]
    bad = BlockKV(block.token_ids, torch.zeros(shape), torch.zeros(shape), 0, fingerprint=block.fingerprint)
    with pytest.raises(ValueError, match="shape"):
        engine.forward([Segment.cached(bad), Segment.fresh(rand_ids(lm, 3, 23))], "none")


def test_block_kv_inconsistent_with_its_ids_raises(tiny):
    lm, engine = tiny
    block = engine.compute_block(rand_ids(lm, 8, 24), [])
    with pytest.raises(ValueError, match="do not match"):
        BlockKV(block.token_ids[:5], block.keys, block.values, 0, block.fingerprint)
    with pytest.raises(ValueError, match="do not match"):
        BlockKV(block.token_ids, block.keys, block.values[:, :, :4], 0, block.fingerprint)
    with pytest.raises(ValueError, match="base position"):
        BlockKV(block.token_ids, block.keys, block.values, -1, block.fingerprint)


def test_cached_segment_with_other_token_ids_raises(tiny):
    lm, engine = tiny
    block = engine.compute_block(rand_ids(lm, 8, 25), [])
    other = block.token_ids.clone()
    other[3] = (other[3] + 1) % lm.model.config.vocab_size
    with pytest.raises(ValueError, match="other token ids"):
        Segment(token_ids=other, kv=block, name="item")
    with pytest.raises(ValueError, match="other token ids"):
        Segment(token_ids=block.token_ids[:7], kv=block)


def test_compute_block_of_empty_ids_raises(tiny):
    lm, engine = tiny
    with pytest.raises(ValueError, match="empty block"):
        engine.compute_block([], rand_ids(lm, 4, 26))
    with pytest.raises(ValueError, match="empty block"):
        engine.compute_block(torch.zeros(0, dtype=torch.long))


def test_compute_block_after_a_context_not_at_position_0_raises(tiny):
    lm, engine = tiny
    mid = engine.compute_block(rand_ids(lm, 6, 27), rand_ids(lm, 4, 28))
    assert mid.base_pos == 4
    with pytest.raises(ValueError, match="position 0"):
        engine.compute_block(rand_ids(lm, 3, 29), mid)


@pytest.mark.parametrize("policy", ["bogus", "boundary:-1", "tail:-1", "tail:x", "deviation:2", "none:1", ""])
def test_unknown_policy_raises(tiny, policy):
    lm, engine = tiny
    with pytest.raises(ValueError, match="expected none"):
        engine.forward([Segment.fresh(rand_ids(lm, 5, 30))], policy)


def test_negative_max_new_tokens_raises(tiny):
    lm, engine = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.forward([Segment.fresh(rand_ids(lm, 5, 31))], "full", max_new_tokens=-1)


def test_prompt_beyond_the_model_positions_raises(tiny):
    lm, engine = tiny
    limit = min(x for x in (engine.max_positions, lm.sliding_window) if x is not None)
    ids = torch.zeros(limit + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds"):
        engine.forward([Segment.fresh(ids)], "none")
    with pytest.raises(ValueError, match="exceeds"):
        engine.forward([Segment.fresh(ids[:limit])], "none", max_new_tokens=1)


# ---------------------------------------------------------------------------------------------
# the real SmolLM2-135M


@pytest.fixture(scope="module")
def smollm(smollm_path):
    lm = load_model(str(smollm_path), device="cpu", dtype=torch.float32)
    lm.model.eval()
    return lm, BlockEngine(lm)


TEXT = (
    "You are a movie recommender. The user watched, oldest first: Toy Story (1995), Heat (1995), "
    "GoldenEye (1995), Babe (1995), Dead Man Walking (1995), The Usual Suspects (1995), Braveheart "
    "(1995), Apollo 13 (1995), Batman Forever (1995) and Pulp Fiction (1994). Candidates: (A) Star "
    "Wars (1977) (B) Fargo (1996) (C) Twister (1996) (D) Casablanca (1942) (E) The Rock (1996). "
    "Answer with the letter of the movie the user is most likely to watch next, then explain why in "
    "one short sentence. The answer is ("
)


@pytest.mark.slow
def test_smollm_full_policy_matches_stock_forward(smollm):
    lm, engine = smollm
    ids = torch.as_tensor(lm.tokenizer(TEXT)["input_ids"], dtype=torch.long)
    assert 120 <= ids.numel() <= 200
    cut = [0, 30, 60, 61, 100, ids.numel()]
    segments = [Segment.fresh(ids[a:b]) for a, b in zip(cut, cut[1:])]
    result = engine.forward(segments, "full")
    assert max_diff(result.logits, stock_logits(lm, ids)) <= LOGIT_TOL
    assert result.recomputed_fraction == 1.0


@pytest.mark.slow
def test_smollm_prefix_block_reuse_is_exact(smollm):
    lm, engine = smollm
    ids = torch.as_tensor(lm.tokenizer(TEXT)["input_ids"], dtype=torch.long)
    ctx_ids, block_ids, tail_ids = ids[:30], ids[30:150], ids[150:]
    block = engine.compute_block(block_ids, ctx_ids)
    result = engine.forward([Segment.fresh(ctx_ids), Segment.cached(block), Segment.fresh(tail_ids)], "none", return_kv=True)
    keys, values = stock_kv(lm, ids)
    assert max_diff(result.logits, stock_logits(lm, ids)) <= LOGIT_TOL
    assert max_diff(result.keys, keys) <= kv_tol(keys)
    assert max_diff(result.values, values) <= kv_tol(values)
    assert result.recomputed_fraction == pytest.approx((ids.numel() - 120) / ids.numel())


# ---------------------------------------------------------------------------------------------
# exact blocks: a prefix-cache hit needs no correction


def test_block_behind_its_own_context_is_exact_and_never_recomputed(tiny):
    lm, engine = tiny
    ctx_ids, hist_ids, rest = rand_ids(lm, 12, 40), rand_ids(lm, 30, 41), rand_ids(lm, 10, 42)
    ctx = engine.compute_block(ctx_ids, [])
    hist = engine.compute_block(hist_ids, ctx)
    segments = [Segment.cached(ctx, "system"), Segment.cached(hist, "history"), Segment.fresh(rest, "tail")]
    reference = stock_logits(lm, cat_ids(segments))
    for policy in ("none", "boundary:4", "deviation:0.5"):
        result = engine.forward(segments, policy)
        # only the fresh tail is computed: the cached blocks are exactly what a prefill holds
        assert result.recomputed_fraction == pytest.approx(10 / 52)
        assert max_diff(result.logits, reference) <= LOGIT_TOL


def test_block_behind_other_ids_is_not_exact(tiny):
    lm, engine = tiny
    ctx_ids, other, hist_ids = rand_ids(lm, 12, 50), rand_ids(lm, 12, 51), rand_ids(lm, 30, 52)
    hist = engine.compute_block(hist_ids, ctx_ids)  # computed behind ctx_ids...
    segments = [Segment.fresh(other, "other"), Segment.cached(hist, "history"), Segment.fresh(rand_ids(lm, 4, 53))]
    result = engine.forward(segments, "boundary:4")  # ...placed at the same position behind other ids
    assert result.recomputed_fraction == pytest.approx((12 + 4 + 4) / 46)


def test_blocks_without_a_recorded_context_are_never_exact(tiny):
    lm, engine = tiny
    ctx_ids, blk_ids = rand_ids(lm, 12, 60), rand_ids(lm, 20, 61)
    blk = engine.compute_block(blk_ids, ctx_ids)
    unknown = BlockKV(blk.token_ids, blk.keys, blk.values, blk.base_pos, blk.fingerprint)
    segments = [Segment.fresh(ctx_ids), Segment.cached(unknown), Segment.fresh(rand_ids(lm, 3, 62))]
    assert engine.forward(segments, "boundary:2").recomputed_fraction == pytest.approx((12 + 2 + 3) / 35)
