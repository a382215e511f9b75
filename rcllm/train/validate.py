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


def validate(lm: LoadedModel, builder: PromptBuilder, encoder: PromptEncoder, requests: Sequence[Example]) -> dict:
    """``{"none": metrics, "contextual": metrics, "reuse_none": metrics + top1_agree}``.

    Rankers are built afresh: the contextual prior belongs to the current weights.
    """
    was_training = lm.model.training
    lm.model.eval()
    try:
        engine = BlockEngine(lm)
        rankers = {c: Ranker(engine, builder, calibration=c) for c in CALIBRATIONS}
        cache = MemoryBlockCache(engine, builder)
        ranks: dict[str, list[int]] = {c: [] for c in (*CALIBRATIONS, "reuse_none")}
        agree = 0
        for request in requests:
            history, candidates = encoder.texts_of(request)
            n = len(candidates)
            segments, _ = rankers["none"].segments(history, candidates)
            full = engine.forward(segments, "full")
            orders = {c: r.make_ranking(full, n, "full", 0.0).order for c, r in rankers.items()}
            ranker = rankers["contextual"]
            cached, _ = ranker.segments(history, candidates, cache)
            orders["reuse_none"] = ranker.make_ranking(engine.forward(cached, "none"), n, "none", 0.0).order
            for name, order in orders.items():
                ranks[name].append(rank_of(order, request.positive))
            agree += orders["reuse_none"][0] == orders["contextual"][0]
    finally:
        lm.model.train(was_training)
    result = {name: summarize(r) for name, r in ranks.items()}
    result["reuse_none"]["top1_agree"] = agree / len(requests)
    return result


def baselines(requests: Sequence[Example], popularity: Mapping[str, int]) -> dict:
    """The expected score of a random ranking, and the popularity ranking (from training counts),
    on the validation requests."""
    return {
        "random": random_expectation([len(r.candidates) for r in requests]),
        "popularity": summarize([rank_of(popularity_ranking(r.candidates, popularity), r.positive) for r in requests]),
    }

