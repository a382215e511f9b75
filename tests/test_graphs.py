"""The static-buffer recompute pass (rcllm.engine.graphs) against BlockEngine.forward.

On CPU the pass runs eagerly on its static buffers; a CUDA machine also captures and replays
it as a CUDA graph. Either way it must give the engine's logits: padding rows, the
whole-buffer attention and context entries left over from an earlier prompt must change nothing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rcllm import kernels
from rcllm.engine.blocks import Segment
from rcllm.engine.forward import BlockEngine
from rcllm.engine.graphs import StaticRecompute
from rcllm.engine.models import wrap_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 256


@pytest.fixture(scope="module")
def engine() -> BlockEngine:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=512, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(DEVICE)
    return BlockEngine(wrap_model(model, name="tiny-llama"))


def prompt(engine: BlockEngine, seed: int, n_items: int = 3) -> list[Segment]:
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(0, VOCAB, (5,), generator=g)
    segments = [Segment.cached(engine.compute_block(system), "system")]
    for i in range(n_items):
        item = engine.compute_block(torch.randint(0, VOCAB, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g), system)
        segments += [Segment.fresh(torch.tensor([10 + i, 11]), f"label {i}"), Segment.cached(item, f"item {i}")]
    segments.append(Segment.fresh(torch.randint(0, VOCAB, (6,), generator=g), "instruction"))
    return segments


@pytest.mark.parametrize("policy", ("none", "boundary:2", "full"))
def test_static_pass_matches_engine_forward_across_prompts(engine, policy):
    """Two prompts of different lengths in turn through one pass, with a bucket that pads."""
    static = StaticRecompute(engine, max_length=200, bucket=16)
    for seed, n_items in ((1, 4), (2, 2), (1, 4)):
        segments = prompt(engine, seed, n_items)
        want = engine.forward(segments, policy)
        got = static.forward(segments, policy)
        assert got.n_tokens == want.n_tokens
        assert got.recomputed_tokens == want.recomputed_tokens
        assert float((got.logits - want.logits).abs().max()) <= 1e-4


def test_static_pass_through_triton_kernels_matches_engine_forward(engine, monkeypatch):
    """Padding rows at the scratch position and the whole-buffer attention, in the Triton kernels."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    segments = prompt(engine, 3, 3)
    monkeypatch.setenv("RCLLM_KERNELS", "torch")
    want = engine.forward(segments, "boundary:2")
    monkeypatch.delenv("RCLLM_KERNELS")
    if DEVICE == "cpu":
        # the kernels under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 without CUDA)
        from rcllm.kernels import triton_attention, triton_kv

        monkeypatch.setattr(kernels, "triton_kernels", lambda tensor: (triton_kv, triton_attention))
    got = StaticRecompute(engine, max_length=160, bucket=32).forward(segments, "boundary:2")
    assert float((got.logits - want.logits).abs().max()) <= 1e-4


def test_static_pass_refuses_deviation_and_overlong_prompts(engine):
    static = StaticRecompute(engine, max_length=40)
    segments = prompt(engine, 4, 3)
    with pytest.raises(ValueError, match="deviation"):
        static.forward(segments, "deviation:0.2")
    with pytest.raises(ValueError, match="exceeds"):
        static.forward(segments, "none")
