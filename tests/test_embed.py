"""Item embedders: the shipped MiniLM sentence encoder and the serving LLM (a tiny model)."""

from __future__ import annotations

import numpy as np
import pytest

from rcllm.build.embed import LLMEmbedder, SentenceEmbedder, get_embedder, minilm_path
from rcllm.engine.models import load_model

TEXTS = ["a space opera with starships", "galactic war film", "a cooking show about pastry"]


@pytest.fixture(scope="module")
def minilm():
    return get_embedder("minilm")


@pytest.fixture(scope="module")
def llm_embedder(tiny_models):
    return get_embedder("llm", lm=load_model(tiny_models["llama"]))


def test_minilm_is_found_inside_its_wheel():
    assert (minilm_path() / "config.json").is_file()
    assert (minilm_path() / "model.safetensors").is_file()


def test_minilm_puts_related_titles_closer_than_unrelated_ones(minilm):
    assert isinstance(minilm, SentenceEmbedder) and minilm.dim == 384
    space, war, pastry = minilm.embed(TEXTS)
    assert space @ war > space @ pastry + 0.1


def test_minilm_rows_are_unit_norm_and_independent_of_batching(minilm):
    texts = TEXTS + ["a much longer description of a film about a detective solving a case in the rain"]
    done: list[int] = []
    batched = minilm.embed(texts, batch_size=3, progress=done.append)
    assert batched.shape == (4, 384) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    assert sum(done) == 4
    np.testing.assert_allclose(minilm.embed(texts[:1]), batched[:1], atol=1e-5)


def test_llm_embedder_is_normalised_and_padding_invariant(llm_embedder):
    assert isinstance(llm_embedder, LLMEmbedder) and llm_embedder.dim == 64
    short = "Heat (1995)"
    texts = [short, "Toy Story (1995); Animation, Children's, Comedy; a cowboy doll is threatened"]
    batch = llm_embedder.embed(texts)
    assert batch.shape == (2, 64) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-5)
    alone = llm_embedder.embed([short])
    np.testing.assert_allclose(alone[0], batch[0], atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-3)


def test_get_embedder_names_the_choices_for_an_unknown_spec():
    with pytest.raises(ValueError, match="minilm, llm"):
        get_embedder("no-such-embedder")
    with pytest.raises(ValueError, match="lm="):
        get_embedder("llm")


def test_get_embedder_loads_a_sentence_encoder_from_a_local_folder():
    embedder = get_embedder(str(minilm_path()))
    assert isinstance(embedder, SentenceEmbedder) and embedder.dim == 384
    assert embedder.name == str(minilm_path())
