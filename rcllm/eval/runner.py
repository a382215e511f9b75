"""``rcllm eval``: every system on one seeded request stream, then quality, latency and fidelity."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rcllm.data.dataset import Dataset
from rcllm.data.metrics import kendall_tau, kl_divergence, popularity_ranking, random_expectation, rank_of, summarize
from rcllm.data.sampling import DEFAULT_CANDIDATES, DEFAULT_HISTORY, RankingRequest, sample_requests
from rcllm.engine.policy import parse_policy
from rcllm.engine.prefix_cache import PrefixSystem
from rcllm.engine.ranker import BlockSource, Ranker, Ranking
from rcllm.eval.blocks import (
    check_disk,
    compute_plan,
    default_store_dir,
    is_built_cache,
    needed_blocks,
    open_built_cache,
    plan_blocks,
)
from rcllm.eval.systems import FullSystem, RcllmSystem, parse_systems


@dataclass
class EvalSettings:
    users: int = 200
    requests_per_user: int = 3
    candidates: int = DEFAULT_CANDIDATES
    history: int = DEFAULT_HISTORY
    negatives: str = "popularity"
    seed: int = 0
    hot_tier_bytes: int = 256 << 20  # rcllm's in-memory tier; the prefix cache gets the same budget


def default_systems(policy: str) -> str:
    """What ``rcllm eval`` compares when not told: full prefill, prefix caching, rcllm with the
    model's policy, and two cheaper rcllm policies for contrast."""
    names = ["full", "prefix", f"rcllm:{parse_policy(policy)}", "rcllm:deviation:0.15", "rcllm:none"]
    return ",".join(dict.fromkeys(names))


def sample_eval_requests(dataset: Dataset, settings: EvalSettings) -> list[RankingRequest]:
    """The seeded, interleaved request stream every system runs on."""
    return sample_requests(
        dataset, settings.users, history=settings.history, candidates=settings.candidates,
        negatives=settings.negatives, seed=settings.seed, requests_per_user=settings.requests_per_user,
    )


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """Mean, p50, p90 and p99 of latencies, keyed as in the eval JSON."""
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]

    return {"mean": statistics.fmean(ordered), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def fidelity(full: list[Ranking], other: list[Ranking], full_ranks: list[int], ranks: list[int]) -> dict[str, float]:
    """How closely ``other``'s rankings follow full prefill's on the same requests (the eval JSON's
    ``fidelity``); ``ranks``: where each ranking put the held-out item."""
    n = len(full)
    hr = lambda rs, k: sum(r < k for r in rs) / len(rs)  # noqa: E731
    return {
        "top1_agree": sum(a.order[0] == b.order[0] for a, b in zip(full, other)) / n,
        "kendall_tau": statistics.fmean(kendall_tau(a.scores, b.scores) for a, b in zip(full, other)),
        "kl": statistics.fmean(kl_divergence(a.scores, b.scores) for a, b in zip(full, other)),
        "hr@10_delta": hr(ranks, 10) - hr(full_ranks, 10),
        "hr@1_delta": hr(ranks, 1) - hr(full_ranks, 1),
    }


def _system_summary(rankings: list[Ranking], ranks: list[int]) -> dict:
    requests = len(rankings)
    item_lookups = sum(r.item_hits + r.item_misses for r in rankings)
    user_known = [r.user_hit for r in rankings if r.user_hit is not None]
    return {
        "ttft_ms": percentiles([r.ttft_ms for r in rankings]),
        **summarize(ranks),
        "hit_ratio": {
            "user": sum(user_known) / len(user_known) if user_known else 0.0,
            "item": sum(r.item_hits for r in rankings) / item_lookups if item_lookups else 0.0,
        },
        "recomputed_fraction": statistics.fmean(r.recomputed_fraction for r in rankings),
        "prompt_tokens": statistics.fmean(r.prompt_tokens for r in rankings),
        "requests": requests,
    }


def run_eval(
    ranker: Ranker,
    dataset: Dataset,
    systems: str | Sequence[str],
    settings: EvalSettings,
    make_source: Callable[[], BlockSource],
    model_name: str,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    requests: list[RankingRequest] | None = None,
) -> dict:
    """Run ``systems`` on the same seeded request stream; returns the ``--json`` object.

    ``make_source`` makes the rcllm systems' block source (a built cache behind a hot tier);
    each rcllm system gets its own, so no system warms another's cache.
    """
    names = parse_systems(systems)
    if requests is None:
        requests = sample_eval_requests(dataset, settings)
    if not requests:
        raise ValueError(f"{dataset.name}: no user qualifies for a leave-one-out request")
    texts = {i: ranker.builder.item_text(item) for i, item in dataset.items.items()}
    prompts = [([texts[i] for i in r.history], [texts[i] for i in r.candidates]) for r in requests]
    for size in {len(r.candidates) for r in requests}:
        if ranker.calibration == "contextual":
            ranker.label_prior(min(size, ranker.builder.max_candidates))  # once, before any timing

    built = {}
    for name in names:
        if name == "full":
            built[name] = FullSystem(ranker)
        elif name == "prefix":
            built[name] = PrefixSystem(ranker, settings.hot_tier_bytes)
        else:
            built[name] = RcllmSystem(ranker, name.removeprefix("rcllm:"), make_source())
    if "full" not in built:  # fidelity is measured against full prefill, which then runs untimed
        built = {"full": FullSystem(ranker), **built}

    rankings: dict[str, list[Ranking]] = {name: [] for name in built}
    for name, system in built.items():
        for history, candidates in prompts:
            rankings[name].append(system.rank(history, candidates))
            if progress:
                progress(name)
    return assemble_result(
        dataset, requests, settings, names, rankings, model_name=model_name, device=device,
        calibration=ranker.calibration,
    )


def assemble_result(
    dataset: Dataset,
    requests: Sequence[RankingRequest],
    settings: EvalSettings,
    names: Sequence[str],
    rankings: dict[str, Sequence[Ranking | None]],
    *,
    model_name: str,
    device: str,
    calibration: str,
) -> dict:
    """The ``--json`` object from each system's rankings of ``requests``, in-process or over HTTP.

    ``rankings[name][i]`` is system ``name``'s ranking of ``requests[i]``, or None where that
    request failed (``--endpoint``): a failed request is left out of that system's metrics, and
    fidelity compares only the requests both it and ``full`` answered. ``rankings["full"]`` must
    be there whenever a system other than ``full`` is named (fidelity is measured against it).
    Baselines are computed without a model on every request.
    """
    positives = [r.candidates.index(r.positive) for r in requests]
    answered = {name: [i for i, r in enumerate(rs) if r is not None] for name, rs in rankings.items()}
    for name in names:
        if not answered[name]:
            raise ValueError(f"{name}: no request was answered")
    ranks = {
        name: {i: rank_of(rs[i].order, positives[i]) for i in answered[name]} for name, rs in rankings.items()
    }

    out_systems = {}
    for name in names:
        kept = answered[name]
        summary = _system_summary([rankings[name][i] for i in kept], [ranks[name][i] for i in kept])
        if name != "full":
            both = [i for i in kept if rankings["full"][i] is not None]
            if not both:
                raise ValueError(f"{name}: no request answered by both it and full, so no fidelity to measure")
            summary["fidelity"] = fidelity(
                [rankings["full"][i] for i in both], [rankings[name][i] for i in both],
                [ranks["full"][i] for i in both], [ranks[name][i] for i in both],
            )
        out_systems[name] = summary

    popularity = dataset.popularity(exclude_last=1)
    pop_ranks = [rank_of(popularity_ranking(r.candidates, popularity), p) for r, p in zip(requests, positives)]
    return {
        "dataset": dataset.name,
        "model": model_name,
        "device": device,
        "n_users": len({r.user_id for r in requests}),
        "n_requests": len(requests),
        "candidates": settings.candidates,
        "seed": settings.seed,
        "calibration": calibration,
        "systems": out_systems,
        "baselines": {
            "random": random_expectation([len(r.candidates) for r in requests]),
            "popularity": summarize(pop_ranks),
        },
    }


def prepare_block_source(
    ranker: Ranker,
    dataset: Dataset,
    settings: EvalSettings,
    cache: Path | None = None,
    *,
    requests: list[RankingRequest] | None = None,
    store_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> Callable[[], BlockSource]:
    """Make sure every block the requests read is on disk before anything is timed, computing
    only those no store holds (:mod:`rcllm.eval.blocks` says why no more, and why no placement);
    returns a factory of block sources over them, each with its own hot tier and all sharing the
    disk stores (a store is opened once per process).

    ``cache``: a cache built by ``rcllm build-cache`` (it holds a manifest), read first and never
    written; or else the folder of eval's own store. ``store_dir``: eval's own store beside a
    built cache (default: under the user cache). ``note`` hears the plan (blocks, tokens, disk)
    before any block is computed, the estimated time after the second batch and the time taken
    at the end; ``progress`` (done, total) each batch. Raises
    :class:`~rcllm.eval.blocks.NotEnoughDiskError` (a ValueError) before computing anything when
    the blocks do not fit on their disk.
    """
    from rcllm.store import BlockStore
    from rcllm.store.tiered import TieredBlockSource

    if requests is None:
        requests = sample_eval_requests(dataset, settings)
    built: list[BlockStore] = []
    if cache is not None and is_built_cache(cache):
        built = open_built_cache(Path(cache), ranker)
    elif cache is not None and store_dir is None:
        store_dir = Path(cache)
    store_dir = Path(store_dir) if store_dir is not None else default_store_dir(ranker)
    stores = list(built)
    try:
        plan = plan_blocks(ranker, needed_blocks(ranker, dataset, requests), built, store_dir)
        check_disk(plan)
        if note:
            note(plan.describe())
        context = ranker.engine.compute_block(ranker.builder.system_ids(), ())
        compute_plan(ranker, plan, context, progress, note)
        if plan.needed > plan.in_cache:  # eval's own store holds the rest
            stores.append(BlockStore.open_readonly(store_dir))
    except BaseException:
        for store in built:
            store.close()
        raise
    return lambda: TieredBlockSource(ranker, stores, settings.hot_tier_bytes, system=context)
