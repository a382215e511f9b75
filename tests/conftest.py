"""Shared fixtures: the embedded SmolLM2 folder and tiny random-weight models of each family.

The tiny models reuse the SmolLM2 tokenizer (so they can tokenize real prompts); the first run on a
machine therefore converts the embedded model once (~20 s), later runs reuse the converted folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels' tests run them under Triton's CPU interpreter, which has to
    # be chosen before triton is first imported (transformers' model modules import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")

_TINY_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=4096,
    # larger than the usual 0.02, so attention is far from uniform even in a tiny random model
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def tiny_model_dir(family: str, root: Path, tokenizer, *, seed: int = 0, **overrides) -> Path:
    """Save a tiny random-weight model of ``family`` (one of TINY_FAMILIES) with ``tokenizer``
    into ``root`` if it is missing or empty, else into ``root/<family>-s<seed>``; return the folder.

    ``tokenizer`` is a tokenizer object or a folder holding one. ``overrides`` go to the config
    (e.g. ``sliding_window=16``). Deterministic for a given seed; the global RNG is left alone.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    if not hasattr(tokenizer, "save_pretrained"):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    tokens = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    default_rope = {"rope_type": "default", "rope_theta": 10000.0}
    classes = {
        "llama": LlamaConfig,
        "llama3": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
    }
    if family not in classes:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    kwargs = dict(_TINY_SHAPE, **tokens, rope_parameters=dict(default_rope))
    if family == "llama3":
        kwargs["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        }
    elif family == "mistral":
        kwargs["sliding_window"] = 4096
    elif family == "qwen2":  # q/k/v projections with bias; head_dim is hidden / heads = 16
        del kwargs["head_dim"]
    # qwen3: q/k RMSNorm comes with the architecture
    kwargs.update(overrides)
    config = classes[family](**kwargs)

    root = Path(root)
    folder = (
        root
        if not root.exists() or (root.is_dir() and not any(root.iterdir()))
        else root / f"{family}-s{seed}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The converted embedded SmolLM2-135M-Instruct folder (converted on first use)."""
    from rcllm.engine.models import pull_embedded

    return pull_embedded()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm_path) -> dict[str, Path]:
    """family -> folder of a tiny random float32 model with the SmolLM2 tokenizer.

    Keys: "llama", "llama3" (llama3 rope scaling), "mistral" (sliding_window 4096),
    "qwen2" (attention bias), "qwen3" (q/k norm). Hidden 64, 2 layers, 4 heads, 2 kv heads,
    head_dim 16, intermediate 128, vocab = the SmolLM2 tokenizer's.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_path)
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: tiny_model_dir(family, root / family, tokenizer) for family in TINY_FAMILIES}


@pytest.fixture(scope="module")
def small_data():
    """A small synthetic dataset for training-loop tests (60 items, 24 users; one per test module)."""
    from rcllm.data.synthetic import make_synthetic

    return make_synthetic(n_items=60, n_users=24, n_interactions_per_user=(5, 9), seed=0)
