"""Ranking prompts as blocks, label reading, calibration and tournaments (tiny models)."""

from __future__ import annotations

import pytest
import torch

from rcllm.engine import BlockEngine, MemoryBlockCache, PromptBuilder, PromptTemplate, Ranker, item_text, uncached
from rcllm.engine.models import load_model
from rcllm.eval.metrics import kendall_tau, kl_divergence

HISTORY = [f"Movie {i} ({1980 + i}); Drama" for i in range(5)]
CANDIDATES = [f"Film number {i}; Comedy, Action" for i in range(8)]


@pytest.fixture(scope="module")
def ranker(tiny_models):
    lm = load_model(tiny_models["llama"])
    return Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer))


def test_prompt_ids_are_the_concatenation_of_segments(ranker):
    segs, _ = ranker.segments(HISTORY, CANDIDATES)
    names = [s.name for s in segs]
    assert names[:2] == ["system", "history"] and names[-1] == "instruction"
    assert names[2:-1] == ["item", "label"] * len(CANDIDATES)
    b = ranker.builder
    assert torch.equal(segs[2].token_ids, b.item_ids(CANDIDATES[0]))
    assert torch.equal(segs[3].token_ids, b.label_ids(0))


def test_cached_and_fresh_prompts_have_identical_token_ids(ranker):
    cache = MemoryBlockCache(ranker.engine, ranker.builder)
    cached, stats = ranker.segments(HISTORY, CANDIDATES, cache)
    fresh, _ = ranker.segments(HISTORY, CANDIDATES)
    assert torch.equal(torch.cat([s.token_ids for s in cached]), torch.cat([s.token_ids for s in fresh]))
    assert stats == {"user_hit": False, "item_hits": 0, "item_misses": len(CANDIDATES)}
    _, again = ranker.segments(HISTORY, CANDIDATES, cache)
    assert again == {"user_hit": True, "item_hits": len(CANDIDATES), "item_misses": 0}


def test_label_answer_tokens_are_distinct_single_tokens(ranker):
    ids = ranker.builder.label_token_ids
    assert len(ids) == 26 and len(set(ids)) == 26


def test_rank_full_with_cache_equals_rank_without(ranker):
    cache = MemoryBlockCache(ranker.engine, ranker.builder)
    a = ranker.rank(HISTORY, CANDIDATES, "full")
    b = ranker.rank(HISTORY, CANDIDATES, "full", cache)
    assert a.order == b.order
    assert max(abs(x - y) for x, y in zip(a.scores, b.scores)) < 1e-5


def test_scores_are_the_calibrated_label_distribution(ranker):
    r = ranker.rank(HISTORY, CANDIDATES, "full")
    segs, _ = ranker.segments(HISTORY, CANDIDATES)
    logits = ranker.engine.forward(segs, "full").logits
    n = len(CANDIDATES)
    logprobs = torch.log_softmax(logits[ranker.builder.label_token_ids[:n]], -1)
    expected = torch.softmax(logprobs - ranker.label_prior(n), -1)
    assert torch.allclose(torch.tensor(r.scores), expected, atol=1e-6)
    assert abs(sum(r.scores) - 1) < 1e-5
    assert r.order == sorted(range(n), key=lambda i: -r.scores[i])
    assert r.calibration == "contextual"


def test_calibration_removes_a_content_free_label_preference(ranker):
    """On the content-free prompt itself, calibrated scores are uniform: no label is preferred for free."""
    n = 6
    filler = ranker.builder.template.content_free
    r = ranker.rank([filler], [filler] * n, "full")
    assert max(r.scores) - min(r.scores) < 1e-5


def test_uncalibrated_ranker_reports_raw_probabilities(tiny_models):
    lm = load_model(tiny_models["llama"])
    raw = Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer), calibration="none")
    r = raw.rank(HISTORY, CANDIDATES, "full")
    assert torch.allclose(torch.tensor(r.scores), torch.tensor(r.label_logprobs).exp(), atol=1e-6)
    with pytest.raises(ValueError, match="calibration"):
        Ranker(raw.engine, raw.builder, calibration="platt")


def test_more_candidates_than_labels_are_ranked_by_tournament(ranker):
    many = [f"Item {i}; Genre {i % 4}" for i in range(60)]
    r = ranker.rank(HISTORY, many, "full")
    assert sorted(r.order) == list(range(60))
    assert r.rounds == 4  # three groups of at most 26, then a final
    # the winner of the final is the best of the items that advanced from the groups
    assert r.scores[r.order[0]] == max(r.scores[i] for i in r.order[:24])


def test_one_prompt_refuses_more_candidates_than_labels(ranker):
    with pytest.raises(ValueError, match="at most 26"):
        ranker.segments(HISTORY, [f"x{i}" for i in range(27)])
    with pytest.raises(ValueError, match="no candidates"):
        ranker.rank(HISTORY, [], "full")


def test_empty_history_uses_the_empty_history_text(ranker):
    ids = ranker.builder.history_ids([])
    text = ranker.builder.tokenizer.decode(ids)
    assert PromptTemplate().history_empty.strip() in text


def test_generation_returns_text(ranker):
    r = ranker.rank(HISTORY, CANDIDATES[:3], "boundary:2", MemoryBlockCache(ranker.engine, ranker.builder), max_new_tokens=4)
    assert isinstance(r.text, str) and r.text


def test_item_text_renders_title_year_categories_and_truncated_text():
    item = {"id": "1", "title": "Heat", "year": 1995, "categories": ["Crime", "Thriller"], "text": "word " * 200}
    text = item_text(item, max_chars=20)
    assert text.startswith("Heat (1995); Crime, Thriller; word")
    assert text.endswith("...")
    assert item_text({"id": "2", "title": "Heat (1995)", "year": 1995}) == "Heat (1995)"


def test_template_round_trips_through_a_dict():
    t = PromptTemplate(system="sys\n")
    assert PromptTemplate.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="unknown prompt template fields"):
        PromptTemplate.from_dict({"bogus": 1})


def test_kendall_tau_and_kl_on_hand_computed_cases():
    assert kendall_tau([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    assert kl_divergence([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0)
    assert kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(0.6931471805599453)
