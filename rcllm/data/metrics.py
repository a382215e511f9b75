"""Ranking quality and fidelity metrics: plain functions on plain lists."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def headline_hit_rate(candidates: int) -> str:
    """The hit-rate key a plot or a progress line leads with: ``hr@10``, or ``hr@1`` when every
    candidate fits in the top 10 (HR@10 is then 1 for any ranking and says nothing)."""
    return "hr@10" if candidates > 10 else "hr@1"


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b between two score vectors (ties counted as neither)."""
    n = len(a)
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom else 0.0


def kl_divergence(p: Sequence[float], q: Sequence[float], eps: float = 1e-12) -> float:
    """KL(p || q) of two distributions over the same candidates."""
    # clamped: rounding can make the KL of two equal distributions a hair below zero
    return max(0.0, float(sum(pi * math.log((pi + eps) / (qi + eps)) for pi, qi in zip(p, q) if pi > 0)))


def mean_half_width(values: Sequence[float], z: float = 1.96) -> float | None:
    """Half the width of the normal-approximation 95% interval of the mean of ``values`` (per
    request: 1/0 agreements, or -1/0/+1 paired differences of two hit rates): ``z`` standard
    errors. None for fewer than two values, where there is no spread to estimate."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return z * math.sqrt(variance / n)


# --- ranking quality with one relevant item (the positive); ranks are 0-based ---------------


def rank_of(order: Sequence[int], positive_index: int) -> int:
    """Where the positive landed: ``order`` lists candidate indices best first."""
    try:
        return list(order).index(positive_index)
    except ValueError:
        raise ValueError(f"candidate {positive_index} is not in the ranking {list(order)}") from None


def hit_rate(rank: int, k: int) -> float:
    return 1.0 if rank < k else 0.0


def ndcg(rank: int, k: int) -> float:
    """With a single relevant item the ideal DCG is 1, so NDCG is its discounted gain."""
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0


def mrr(rank: int) -> float:
    return 1.0 / (rank + 1)


def summarize(ranks: Sequence[int]) -> dict[str, float]:
    """Mean HR@1/5/10, NDCG@10 and MRR over requests, keyed as in the eval JSON."""
    if not ranks:
        raise ValueError("no ranks to summarize")
    n = len(ranks)
    return {
        "hr@1": sum(hit_rate(r, 1) for r in ranks) / n,
        "hr@5": sum(hit_rate(r, 5) for r in ranks) / n,
        "hr@10": sum(hit_rate(r, 10) for r in ranks) / n,
        "ndcg@10": sum(ndcg(r, 10) for r in ranks) / n,
        "mrr": sum(mrr(r) for r in ranks) / n,
    }


# --- baselines reported beside every model ---------------------------------------------------


def random_expectation(candidate_counts: Sequence[int]) -> dict[str, float]:
    """What a uniformly random ranking scores in expectation on requests with these candidate
    counts, keyed as :func:`summarize`: the positive's rank is uniform over 0..n-1, so each metric
    is its mean over those ranks (HR@10 = 10/n, MRR = H_n/n). Exact, unlike one seeded draw,
    whose HR@1 on 60 requests of 8 candidates can land anywhere from 0.05 to 0.2."""
    if not candidate_counts:
        raise ValueError("no requests to score")
    per_request = [summarize(range(n)) for n in candidate_counts]
    return {key: sum(m[key] for m in per_request) / len(per_request) for key in per_request[0]}


def popularity_ranking(candidates: Sequence[str], popularity: Mapping[str, int]) -> list[int]:
    """Candidate indices by interaction count, most popular first; ties keep prompt order. Pass
    counts that leave out the test positives (``Dataset.popularity(exclude_last=1)``), or the
    baseline sees the answers."""
    return sorted(range(len(candidates)), key=lambda i: -popularity.get(candidates[i], 0))
