"""The prefix-caching baseline reuses exactly the leading full blocks, and stays exact."""

from __future__ import annotations

import pytest
import torch

from rcllm.engine import BlockEngine, Segment
from rcllm.engine.models import load_model
from rcllm.engine.prefix_cache import PrefixCache


@pytest.fixture(scope="module")
def engine(tiny_models):
    return BlockEngine(load_model(tiny_models["qwen2"]))


def ids(n, seed):
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed))


def test_repeated_prompt_reuses_every_full_block_and_matches_prefill(engine):
    cache = PrefixCache(engine, budget_bytes=1 << 30, block_size=16)
    prompt = ids(70, 0)
    plain = engine.forward([Segment.fresh(prompt)], "full").logits
    first, hit0 = cache.forward(prompt)
    second, hit1 = cache.forward(prompt)
    assert hit0.tokens == 0 and hit1.tokens == 64 and hit1.blocks == 4
    assert second.recomputed_fraction == pytest.approx(6 / 70)
    assert (second.logits - plain).abs().max() <= 1e-4
    assert (first.logits - plain).abs().max() <= 1e-4


def test_only_the_common_leading_blocks_are_reused(engine):
    cache = PrefixCache(engine, budget_bytes=1 << 30, block_size=16)
    a = ids(64, 1)
    b = torch.cat([a[:40], ids(24, 2)])  # shares 2 full blocks (32 tokens), diverges inside the third
    cache.forward(a)
    result, hit = cache.forward(b)
    assert hit.tokens == 32
    assert (result.logits - engine.forward([Segment.fresh(b)], "full").logits).abs().max() <= 1e-4


def test_last_token_is_always_computed(engine):
    cache = PrefixCache(engine, budget_bytes=1 << 30, block_size=16)
    prompt = ids(32, 3)  # exactly two blocks
    cache.forward(prompt)
    _, hit = cache.forward(prompt)
    assert hit.tokens == 16


def test_lru_eviction_keeps_the_cache_within_budget(engine):
    block_bytes = 2 * engine.n_layers * engine.n_kv_heads * 16 * engine.head_dim * 4
    cache = PrefixCache(engine, budget_bytes=3 * block_bytes, block_size=16)
    for seed in range(4):
        cache.forward(ids(50, 10 + seed))
        assert cache.nbytes <= cache.budget_bytes
    assert len(cache.blocks) == 3
    _, hit = cache.forward(ids(50, 10))  # the oldest prompt's blocks were evicted
    assert hit.tokens == 0
