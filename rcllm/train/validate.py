"""Validation with the real serving ranker on the model being trained.

Each validation request is ranked from one plain prefill, read with both calibrations, and once
more with every block cached and the ``none`` policy (no correction): the reuse that block-aware
training is meant to make faithful.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rcllm.data.metrics import popularity_ranking, random_expectation, rank_of, summarize
from rcllm.engine.forward import BlockEngine
from rcllm.engine.models import LoadedModel
from rcllm.engine.prompt import PromptBuilder
from rcllm.engine.ranker import CALIBRATIONS, MemoryBlockCache, Ranker
from rcllm.train.examples import Example, PromptEncoder


def validate(
    lm: LoadedModel,
    builder: PromptBuilder,
    encoder: PromptEncoder,
    requests: Sequence[Example],
    policies: Sequence[str] = ("none",),
) -> dict:
    """``{"none": metrics, "contextual": metrics, "reuse_<policy>": metrics + top1_agree}`` for each
    correction policy in ``policies`` (``none``: the reuse block-aware training aims at; a
    ``--tail-floor K`` run also reads ``tail:K``, the policy it trains for).

    Rankers are built afresh: the contextual prior belongs to the current weights.
    """
    was_training = lm.model.training
    lm.model.eval()
    try:
        engine = BlockEngine(lm)
        rankers = {c: Ranker(engine, builder, calibration=c) for c in CALIBRATIONS}
        cache = MemoryBlockCache(engine, builder)
        reused = [f"reuse_{p}" for p in policies]
        ranks: dict[str, list[int]] = {c: [] for c in (*CALIBRATIONS, *reused)}
        agree = dict.fromkeys(reused, 0)
        for request in requests:
            history, candidates = encoder.texts_of(request)
            n = len(candidates)
            segments, _ = rankers["none"].segments(history, candidates)
            full = engine.forward(segments, "full")
            orders = {c: r.make_ranking(full, n, "full", 0.0).order for c, r in rankers.items()}
            ranker = rankers["contextual"]
            cached, _ = ranker.segments(history, candidates, cache)
            for policy, name in zip(policies, reused, strict=True):
                orders[name] = ranker.make_ranking(engine.forward(cached, policy), n, policy, 0.0).order
                agree[name] += orders[name][0] == orders["contextual"][0]
            for name, order in orders.items():
                ranks[name].append(rank_of(order, request.positive))
    finally:
        lm.model.train(was_training)
    result = {name: summarize(r) for name, r in ranks.items()}
    for name, count in agree.items():
        result[name]["top1_agree"] = count / len(requests)
    return result


def baselines(requests: Sequence[Example], popularity: Mapping[str, int]) -> dict:
    """The expected score of a random ranking, and the popularity ranking (from training counts),
    on the validation requests."""
    return {
        "random": random_expectation([len(r.candidates) for r in requests]),
        "popularity": summarize([rank_of(popularity_ranking(r.candidates, popularity), r.positive) for r in requests]),
    }

