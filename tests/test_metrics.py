"""Ranking metrics with a single relevant item, and the random and popularity baselines."""

from __future__ import annotations

import math
import random

import pytest

from rcllm.eval.metrics import (
    headline_hit_rate,
    hit_rate,
    mrr,
    ndcg,
    popularity_ranking,
    random_ranking,
    rank_of,
    summarize,
)


def test_rank_of_finds_the_positive_in_a_best_first_order():
    assert rank_of([3, 0, 2, 1], positive_index=3) == 0
    assert rank_of([3, 0, 2, 1], positive_index=1) == 3
    with pytest.raises(ValueError, match="not in the ranking"):
        rank_of([0, 1], positive_index=5)


def test_hit_rate_counts_ranks_below_k():
    assert hit_rate(0, 1) == 1.0
    assert hit_rate(1, 1) == 0.0
    assert hit_rate(9, 10) == 1.0
    assert hit_rate(10, 10) == 0.0


def test_ndcg_is_the_discounted_gain_of_the_one_relevant_item():
    assert ndcg(0, 10) == 1.0
    assert ndcg(1, 10) == pytest.approx(1 / math.log2(3))  # 0.6309
    assert ndcg(2, 10) == pytest.approx(0.5)
    assert ndcg(9, 10) == pytest.approx(1 / math.log2(11))
    assert ndcg(10, 10) == 0.0


def test_mrr_is_the_reciprocal_of_the_one_based_rank():
    assert mrr(0) == 1.0
    assert mrr(1) == 0.5
    assert mrr(3) == 0.25


def test_summarize_averages_over_requests():
    # ranks 0, 2, 7, 15: hits@1 = 1, @5 = 2, @10 = 3
    summary = summarize([0, 2, 7, 15])
    assert set(summary) == {"hr@1", "hr@5", "hr@10", "ndcg@10", "mrr"}
    assert summary["hr@1"] == 0.25
    assert summary["hr@5"] == 0.5
    assert summary["hr@10"] == 0.75
    assert summary["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(9) + 0) / 4)
    assert summary["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 8 + 1 / 16) / 4)
    with pytest.raises(ValueError):
        summarize([])


def test_random_ranking_is_a_seeded_permutation_with_chance_hit_rate():
    assert sorted(random_ranking(20, random.Random(0))) == list(range(20))
    assert random_ranking(20, random.Random(1)) == random_ranking(20, random.Random(1))
    rng = random.Random(0)
    ranks = [rank_of(random_ranking(20, rng), 0) for _ in range(4000)]
    assert summarize(ranks)["hr@10"] == pytest.approx(0.5, abs=0.03)


def test_popularity_ranking_orders_by_count_and_keeps_prompt_order_on_ties():
    counts = {"a": 5, "b": 50, "c": 5, "d": 0}
    assert popularity_ranking(["a", "b", "c", "d", "unseen"], counts) == [1, 0, 2, 3, 4]


def test_headline_hit_rate_is_hr1_when_every_candidate_fits_in_the_top_10():
    # with C <= 10 every ranking has HR@10 = 1, so plots and progress lines lead with HR@1
    assert headline_hit_rate(8) == "hr@1"
    assert headline_hit_rate(10) == "hr@1"
    assert headline_hit_rate(11) == "hr@10"
    assert summarize([0, 5, 9])["hr@10"] == 1.0
