"""Ranking prompts as blocks, label reading, calibration and tournaments (tiny models)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rcllm.data.metrics import kendall_tau, kl_divergence
from rcllm.engine import BlockEngine, MemoryBlockCache, PromptBuilder, PromptTemplate, Ranker, Segment, item_text, uncached
from rcllm.engine.errors import RequestError
from rcllm.engine.models import load_model
from rcllm.engine.job import RankJob
from rcllm.engine.ranker import BlockSource, block_key
from rcllm.serve.runner import HeldBlocks
from rcllm.store import BlockStore
from rcllm.store.tiered import TieredBlockSource

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
    source = MemoryBlockCache(ranker.engine, ranker.builder)
    cached, stats = ranker.segments(HISTORY, CANDIDATES, source)
    fresh, _ = ranker.segments(HISTORY, CANDIDATES)
    assert torch.equal(torch.cat([s.token_ids for s in cached]), torch.cat([s.token_ids for s in fresh]))
    assert stats == {"user_hit": False, "item_hits": 0, "item_misses": len(CANDIDATES)}
    _, again = ranker.segments(HISTORY, CANDIDATES, source)
    assert again == {"user_hit": True, "item_hits": len(CANDIDATES), "item_misses": 0}


@pytest.fixture(params=["memory", "tiered", "held"])
def source(request, ranker, tmp_path):
    """Each BlockSource, set up to serve CANDIDATES[0]'s item block its own way: the memory
    cache computes it, the tiered source reads it from a store, a node's held view holds it."""
    engine, builder = ranker.engine, ranker.builder
    context = engine.compute_block(builder.system_ids(), ())
    ids = builder.item_ids(CANDIDATES[0])
    key = block_key(engine.fingerprint, builder.system_ids(), ids)
    if request.param == "memory":
        yield MemoryBlockCache(engine, builder)
        return
    with BlockStore(tmp_path / "store", create=True) as store:
        store.put(key, engine.compute_block(ids, context))
    with BlockStore.open_readonly(tmp_path / "store") as store:
        if request.param == "tiered":
            yield TieredBlockSource(ranker, [store], hot_bytes=1 << 20, system=context)
        else:  # nothing in the tiers: the item comes from the held blocks, the history is computed
            yield HeldBlocks(TieredBlockSource(ranker, [], hot_bytes=0, system=context), {key: store.get(key)})


def test_every_block_source_gives_the_block_compute_block_computes_after_its_context(ranker, source):
    engine, builder = ranker.engine, ranker.builder
    assert isinstance(source, BlockSource)
    torch.testing.assert_close(source.system.keys, engine.compute_block(builder.system_ids(), ()).keys, rtol=0, atol=1e-6)
    assert source.system.base_pos == 0
    for kind, ids in [("item", builder.item_ids(CANDIDATES[0])), ("history", builder.history_ids(HISTORY))]:
        want = engine.compute_block(ids, source.system)
        for _ in range(2):  # whether it was computed, read or held, and again once the source has it
            block, hit = source.get(kind, ids)
            assert isinstance(hit, bool)
            assert torch.equal(block.token_ids, ids) and block.base_pos == source.system.n_tokens
            assert block.fingerprint == engine.fingerprint and block.context == want.context
            torch.testing.assert_close(block.keys, want.keys, rtol=0, atol=1e-6)
            torch.testing.assert_close(block.values, want.values, rtol=0, atol=1e-6)


def test_the_ranking_over_any_block_source_under_full_is_the_plain_ranking(ranker, source):
    plain = ranker.rank(HISTORY, CANDIDATES, "full")
    over = ranker.rank(HISTORY, CANDIDATES, "full", source)
    assert over.order == plain.order
    assert max(abs(x - y) for x, y in zip(over.scores, plain.scores)) < 1e-5


def test_label_answer_tokens_are_distinct_single_tokens(ranker):
    ids = ranker.builder.label_token_ids
    assert len(ids) == 26 and len(set(ids)) == 26


def stock_label_logprobs(ranker, history, candidates) -> torch.Tensor:
    """Log-probabilities of the n label tokens after the prompt, by the stock transformers forward."""
    segs, _ = ranker.segments(history, candidates)
    ids = torch.cat([s.token_ids for s in segs])
    with torch.inference_mode():
        logits = ranker.engine.lm.model(input_ids=ids[None]).logits[0, -1].float()
    return torch.log_softmax(logits[ranker.builder.label_token_ids[: len(candidates)]], -1)


PROMPTS = [  # (history, candidates) of the same size, other contents
    (HISTORY, CANDIDATES),
    (HISTORY[:2], CANDIDATES[::-1]),
    ([], [f"Documentary {i} (2001); Music" for i in range(8)]),
]


def test_calibration_removes_the_content_free_label_prior_from_every_prompt(ranker):
    """Scores are each prompt's label distribution divided by the prior of the content-free prompt
    of the same size (measured here with the stock forward, not with the ranker's own prior)."""
    n = len(CANDIDATES)
    filler = ranker.builder.template.content_free
    prior = stock_label_logprobs(ranker, [filler], [filler] * n)
    assert float(prior.max() - prior.min()) > 0.1  # the model prefers some labels whatever the items
    for history, candidates in PROMPTS:
        r = ranker.rank(history, candidates, "full")
        raw = stock_label_logprobs(ranker, history, candidates)
        want = torch.softmax(raw - prior, -1)
        assert r.calibration == "contextual"
        assert torch.allclose(torch.tensor(r.label_logprobs), raw, atol=1e-4)
        assert torch.allclose(torch.tensor(r.scores), want, atol=1e-4)
        assert abs(sum(r.scores) - 1) < 1e-5
        ranked = sorted(want.tolist(), reverse=True)
        assert min(a - b for a, b in zip(ranked, ranked[1:])) > 1e-3  # no near-tie: the order is defined
        assert r.order == torch.argsort(want, descending=True).tolist()


def test_uncalibrated_ranker_reports_raw_probabilities(tiny_models):
    lm = load_model(tiny_models["llama"])
    raw = Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer), calibration="none")
    r = raw.rank(HISTORY, CANDIDATES, "full")
    assert torch.allclose(torch.tensor(r.scores), torch.tensor(r.label_logprobs).exp(), atol=1e-6)
    with pytest.raises(ValueError, match="calibration"):
        Ranker(raw.engine, raw.builder, calibration="platt")


def test_more_candidates_than_labels_are_ranked_by_tournament(ranker):
    """60 candidates: three groups (26, 26, 8) ranked alone; the best 8 of each (26 labels shared
    by 3 groups) meet in a final, whose order leads; the rest follow by their group scores."""
    many = [f"Item {i}; Genre {i % 4}" for i in range(60)]
    r = ranker.rank(HISTORY, many, "full")
    assert sorted(r.order) == list(range(60))
    assert r.rounds == 4
    advancing, group_scores = [], {}
    for group in (range(0, 26), range(26, 52), range(52, 60)):
        alone = ranker.rank(HISTORY, [many[i] for i in group], "full")
        best = [group[i] for i in alone.order]
        advancing += best[:8]
        group_scores.update({group[k]: score for k, score in enumerate(alone.scores)})
    final = ranker.rank(HISTORY, [many[i] for i in advancing], "full")
    assert r.order[:24] == [advancing[i] for i in final.order]  # the groups' winners, as the final ranks them
    rest = r.order[24:]
    assert set(rest) == set(range(60)) - set(advancing)
    assert all(group_scores[a] >= group_scores[b] for a, b in zip(rest, rest[1:]))
    assert [r.scores[i] for i in rest] == [group_scores[i] for i in rest]


def test_one_prompt_refuses_more_candidates_than_labels(ranker):
    with pytest.raises(RequestError, match="at most 26"):
        ranker.segments(HISTORY, [f"x{i}" for i in range(27)])
    with pytest.raises(RequestError, match="no candidates"):
        ranker.rank(HISTORY, [], "full")


def test_refused_input_is_a_request_error_and_a_block_of_another_model_is_not(ranker, monkeypatch):
    """What the caller sent (a policy, a prompt too long) is refused with a RequestError, one
    request at a time in a batch; a cached block another model computed is the server's fault."""
    with pytest.raises(RequestError, match="unknown correction policy"):
        ranker.rank(HISTORY, CANDIDATES, "sideways")
    source = MemoryBlockCache(ranker.engine, ranker.builder)
    monkeypatch.setattr(ranker.engine, "max_positions", 40)
    with pytest.raises(RequestError, match="exceeds the model's 40 positions"):
        ranker.rank(HISTORY, CANDIDATES, "none", source)
    monkeypatch.undo()
    jobs = [RankJob(HISTORY, CANDIDATES, policy, blocks=source) for policy in ("none", "sideways")]
    ranker.rank_many(jobs)
    assert jobs[0].ranking.order and jobs[0].error is None
    assert jobs[1].ranking is None and isinstance(jobs[1].error, RequestError)

    segments, _ = ranker.segments(HISTORY, CANDIDATES, source)
    foreign = dataclasses.replace(segments[1].kv, fingerprint="another model")
    segments[1] = Segment.cached(foreign, "history")
    with pytest.raises(ValueError, match="another model") as refused:
        ranker.engine.forward(segments, "none")
    assert not isinstance(refused.value, RequestError)


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
