"""Ranking metrics with a single relevant item, and the random and popularity baselines."""

from __future__ import annotations

import math
import random

import pytest

from rcllm.data.metrics import (
    headline_hit_rate,
    hit_rate,
    mean_half_width,
    mrr,
    ndcg,
    popularity_ranking,
    random_expectation,
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


def test_random_expectation_is_exact_and_matches_many_random_draws():
    e = random_expectation([20])
    assert e["hr@1"] == pytest.approx(1 / 20) and e["hr@5"] == pytest.approx(0.25) and e["hr@10"] == pytest.approx(0.5)
    assert e["mrr"] == pytest.approx(sum(1 / r for r in range(1, 21)) / 20)
    assert e["ndcg@10"] == pytest.approx(sum(1 / math.log2(r + 2) for r in range(10)) / 20)
    mixed = random_expectation([8, 20])
    assert mixed["hr@10"] == pytest.approx((1.0 + 0.5) / 2) and mixed["hr@1"] == pytest.approx((1 / 8 + 1 / 20) / 2)
    rng = random.Random(0)
    draws = []
    for _ in range(20000):
        order = list(range(8))
        rng.shuffle(order)
        draws.append(rank_of(order, 0))
    sampled = summarize(draws)
    for key, value in random_expectation([8]).items():
        assert sampled[key] == pytest.approx(value, abs=0.01), key
    with pytest.raises(ValueError):
        random_expectation([])


def test_popularity_ranking_orders_by_count_and_keeps_prompt_order_on_ties():
    counts = {"a": 5, "b": 50, "c": 5, "d": 0}
    assert popularity_ranking(["a", "b", "c", "d", "unseen"], counts) == [1, 0, 2, 3, 4]


def test_headline_hit_rate_is_hr1_when_every_candidate_fits_in_the_top_10():
    # with C <= 10 every ranking has HR@10 = 1, so plots and progress lines lead with HR@1
    assert headline_hit_rate(8) == "hr@1"
    assert headline_hit_rate(10) == "hr@1"
    assert headline_hit_rate(11) == "hr@10"
    assert summarize([0, 5, 9])["hr@10"] == 1.0


def test_mean_half_width_is_the_95_percent_normal_interval_of_the_mean():
    agreements = [1.0] * 90 + [0.0] * 10
    # p 0.9 over 100: sample variance 0.9 * 0.1 * 100 / 99
    assert mean_half_width(agreements) == pytest.approx(1.96 * math.sqrt(0.09 * 100 / 99 / 100))
    # paired hit-rate changes: mostly none, a few each way
    changes = [0.0] * 460 + [1.0] * 15 + [-1.0] * 25
    mean = -10 / 500
    variance = (460 * mean**2 + 15 * (1 - mean) ** 2 + 25 * (1 + mean) ** 2) / 499
    assert mean_half_width(changes) == pytest.approx(1.96 * math.sqrt(variance / 500))
    assert mean_half_width([0.0] * 50) == 0.0  # no request moved: no spread
    assert mean_half_width([1.0]) is None and mean_half_width([]) is None
    # the interval narrows with the square root of the requests
    assert mean_half_width(agreements * 4) == pytest.approx(mean_half_width(agreements) / 2, rel=0.01)
