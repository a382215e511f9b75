"""``rcllm demo``: the whole system on one machine, end to end.

1. builds a block cache for the example catalog (or ml-100k) on ``nodes`` nodes — reused when
   it is already complete;
2. starts the nodes and the coordinator as child processes on free loopback ports
   (:class:`rcllm.serve.cluster.LocalCluster`);
3. sends a seeded stream of ranking requests through the coordinator twice: with full prefill
   (policy ``full``) and with rcllm's block reuse (the chosen policy);
4. runs the prefix-caching baseline in-process on the same prompts;
5. stops every child (also on Ctrl-C or an error) and returns what the CLI prints.

Requests are leave-one-out: a sampled user's history up to their last interaction, the held-out
item among popularity-sampled negatives. The cache holds those history blocks, so the user
blocks hit; item blocks are spread over the nodes by similarity, so a node fetches or recomputes
the candidates it does not hold.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rcllm.data.dataset import Dataset
from rcllm.data.metrics import kendall_tau
from rcllm.data.sampling import RankingRequest
from rcllm.engine.models import DEFAULT_MODEL, is_adapter_folder

HIT_RATE_KS = (1, 3)  # the demo's hit rates: the next item first, in the top 3
STATE_FILE = "cluster.json"  # pids and addresses of the running demo cluster (removed at exit)
# a LoRA adapter of the embedded model, trained by `rcllm finetune` to rank and to stay faithful under
# reuse (its command is in its training.json and the README); the demo's default model
DEMO_ADAPTER = Path(__file__).resolve().parents[1] / "examples" / "reuse-ranker"


def default_demo_model() -> str:
    """The bundled reuse-trained adapter when the source tree ships it, else the embedded model."""
    return str(DEMO_ADAPTER) if is_adapter_folder(DEMO_ADAPTER) else DEFAULT_MODEL


@dataclass
class DemoSettings:
    dataset: str = "bookshop"
    out: Path | None = None  # default: <user cache>/demo/<dataset>
    nodes: int = 2
    requests: int = 24
    candidates: int = 5  # what the bundled adapter's gate measured (C = 5, history 5)
    history: int = 5
    policy: str | None = None  # None: the model's gated policy (rcllm.engine.model_policy.default_policy)
    model: str | None = None  # None: default_demo_model()
    concurrency: int = 2
    seed: int = 0
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = default_demo_model()

    def folder(self) -> Path:
        """``out``, else one folder per dataset and model in the user cache (a cache holds one model's blocks)."""
        if self.out is not None:
            return Path(self.out)
        from rcllm.engine.models import user_cache_dir

        return user_cache_dir() / "demo" / Path(self.dataset).name / Path(str(self.model)).name


@dataclass
class SystemRun:
    """One system over the stream: per request, TTFT (engine) and end-to-end latency (client)."""

    name: str
    where: str
    ttft_ms: list[float]
    latency_ms: list[float] = field(default_factory=list)
    rankings: list[list[str]] = field(default_factory=list)  # item ids, best first

    def stats(self, values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "mean": statistics.fmean(values),
            "p50": statistics.median(values),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        }


@dataclass
class DemoResult:
    dataset: Dataset
    requests: list[RankingRequest]
    systems: dict[str, SystemRun]
    hit_ratio: dict[str, float]
    per_node: dict[int, int]  # node -> requests it answered (rcllm pass)
    fidelity: dict[str, float]
    hit_rates: dict[str, dict[int, float]]  # system -> {K: share of requests whose next item is in its top K}
    cluster: dict  # the coordinator's /v1/cluster after the stream
    cache: Path
    logs: Path
    build_seconds: float
    exit_codes: dict[str, int]
    policy: str  # the rcllm pass's policy
    policy_reason: str  # where it came from: given, the model's gated policy file, or the fallback


def _request_body(r: RankingRequest, policy: str) -> dict:
    return {"user_id": r.user_id, "history": r.history, "candidates": r.candidates, "policy": policy}


def _check_answers(name: str, answers: list, requests: list[RankingRequest], cluster) -> list:
    failed = [(i, a) for i, (a, _) in enumerate(answers) if isinstance(a, Exception)]
    if failed:
        i, error = failed[0]
        raise RuntimeError(
            f"{len(failed)} of {len(requests)} {name} requests failed, first: user {requests[i].user_id}: {error}; "
            f"logs in {cluster.logs}"
        )
    return [a for a, _ in answers]


def run_demo(
    settings: DemoSettings,
    reporter=None,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Build, serve, query, tear down. ``reporter`` receives the build's phases (see
    :class:`rcllm.build.pipeline.Reporter`); ``log`` one line per stage."""
    import time

    from rcllm.build.pipeline import BuildOptions, build_cache
    from rcllm.data.catalog import write_catalog
    from rcllm.data.formats import write_histories, write_interactions
    from rcllm.data.loaders import load_dataset
    from rcllm.data.sampling import sample_requests
    from rcllm.engine.model_policy import default_policy
    from rcllm.engine.policy import parse_policy
    from rcllm.store import Manifest
    from rcllm.serve.client import send_all
    from rcllm.serve.cluster import LocalCluster

    if settings.policy is not None:
        parse_policy(settings.policy)
    if settings.nodes < 1 or settings.requests < 1:
        raise ValueError("the demo needs at least one node and one request")
    folder = settings.folder()
    dataset = load_dataset(settings.dataset, data_dir=settings.data_dir)
    requests = sample_requests(
        dataset, settings.requests, history=settings.history, candidates=settings.candidates, seed=settings.seed
    )
    if not requests:
        raise ValueError(f"{dataset.name}: no user has enough interactions for a leave-one-out request")

    # inputs of the build: the catalog, each requesting user's history before the held-out item,
    # and the interactions without the held-out items (placement reads co-occurrence from them)
    inputs = folder / "inputs"
    held_out = {(r.user_id, r.positive) for r in requests}
    sequences = dataset.user_sequences()
    histories = {r.user_id: sequences[r.user_id][: sequences[r.user_id].index(r.positive)] for r in requests}
    write_catalog(list(dataset.items.values()), inputs / "catalog.jsonl")
    write_histories(histories, inputs / "histories.jsonl")
    write_interactions([x for x in dataset.interactions if (x[0], x[1]) not in held_out],
                       inputs / "interactions.jsonl")
    cache = folder / "cache"
    log(f"building the block cache of {settings.model} in {cache} ({len(dataset.items)} items, "
        f"{len(histories)} histories, {settings.nodes} nodes; reused when complete)")
    started = time.perf_counter()
    options = BuildOptions(out=cache, nodes=settings.nodes, model=settings.model, users=inputs / "histories.jsonl",
                           interactions=inputs / "interactions.jsonl", history=settings.history, seed=settings.seed)
    build_cache(inputs / "catalog.jsonl", options, reporter)
    build_seconds = time.perf_counter() - started
    if settings.policy is None:
        chosen = default_policy(settings.model, Manifest.load(cache).model["fingerprint"])
        policy, policy_reason = chosen.policy, chosen.reason
    else:
        policy, policy_reason = str(parse_policy(settings.policy)), "given (--policy)"
    log(f"rcllm's policy: {policy}, {policy_reason}")

    logs = folder / "logs"
    threads = max(1, (os.cpu_count() or 1) // settings.nodes)
    cluster = LocalCluster(
        cache, logs, settings.nodes,
        node_args=("--threads", str(threads), "--policy", policy),
        env={"OMP_NUM_THREADS": str(threads)},
    )
    state = folder / STATE_FILE
    systems: dict[str, SystemRun] = {}
    try:
        log(f"starting {settings.nodes} nodes and the coordinator (logs in {logs})")
        for k in range(settings.nodes):
            cluster.start_node(k)
        cluster.start_coordinator()
        state.write_text(json.dumps({
            "coordinator": cluster.url, "nodes": [cluster.node_url(k) for k in range(settings.nodes)],
            "pids": {name: p.pid for name, p in cluster.procs.items()}, "demo_pid": os.getpid(),
        }, indent=2))
        cluster.wait_until(lambda r: r.get("up") == settings.nodes, f"{settings.nodes} nodes up", 300)
        # one untimed request per node: model warm-up and the label prior, as a server would at start
        for k in range(settings.nodes):
            warm = _request_body(requests[k % len(requests)], policy)
            answers = asyncio.run(send_all(cluster.node_url(k), [warm], 1, timeout_s=300))
            _check_answers("warm-up", answers, requests[:1], cluster)

        for name, sent in (("full", "full"), (f"rcllm:{policy}", policy)):
            log(f"sending {len(requests)} requests through the coordinator, policy {sent}")
            answers = asyncio.run(send_all(cluster.url, [_request_body(r, sent) for r in requests],
                                           settings.concurrency, timeout_s=300))
            responses = _check_answers(name, answers, requests, cluster)
            systems[name] = SystemRun(
                name, "cluster", [a.ttft_ms for a in responses], [ms for _, ms in answers],
                [[item for item, _ in a.ranking] for a in responses],
            )
            if name != "full":
                served = responses
        report = cluster.report()
    finally:
        codes = cluster.stop()
        state.unlink(missing_ok=True)

    systems["prefix"] = _prefix_baseline(cache, dataset, requests, threads)
    systems = {k: systems[k] for k in ("full", "prefix", f"rcllm:{policy}")}
    lookups = sum(a.cache.item_hits + a.cache.item_misses for a in served)
    users_known = [a.cache.user_hit for a in served if a.cache.user_hit is not None]
    per_node: dict[int, int] = {}
    for a in served:
        per_node[a.node] = per_node.get(a.node, 0) + 1
    full, reused = systems["full"].rankings, systems[f"rcllm:{policy}"].rankings
    return DemoResult(
        dataset=dataset, requests=requests, systems=systems,
        hit_ratio={
            "user": sum(users_known) / len(users_known) if users_known else 0.0,
            "item": sum(a.cache.item_hits for a in served) / lookups if lookups else 0.0,
        },
        per_node=dict(sorted(per_node.items())),
        fidelity={
            "top1_agree": statistics.fmean(a[0] == b[0] for a, b in zip(full, reused)),
            "kendall_tau": statistics.fmean(_order_tau(a, b) for a, b in zip(full, reused)),
            "recomputed_fraction": statistics.fmean(
                a.cache.recomputed_tokens / a.cache.prompt_tokens for a in served if a.cache.prompt_tokens
            ),
        },
        hit_rates={
            name: {k: statistics.fmean(r.positive in ranking[:k] for r, ranking in zip(requests, run.rankings))
                   for k in HIT_RATE_KS}
            for name, run in systems.items()
        },
        cluster=report, cache=cache, logs=logs, build_seconds=build_seconds, exit_codes=codes,
        policy=policy, policy_reason=policy_reason,
    )


def _order_tau(a: list[str], b: list[str]) -> float:
    """Kendall tau between two rankings of the same items (best first)."""
    place = {item: -i for i, item in enumerate(a)}
    other = {item: -i for i, item in enumerate(b)}
    items = list(place)
    return kendall_tau([place[i] for i in items], [other[i] for i in items])


def _prefix_baseline(cache: Path, dataset: Dataset, requests: list[RankingRequest], threads: int) -> SystemRun:
    """The prefix-caching baseline (hash-chained 16-token blocks, LRU) on the same prompts,
    in this process with as many threads as one node."""
    import torch

    from rcllm.engine.prefix_cache import PrefixSystem
    from rcllm.serve.runner import open_cache_ranker
    from rcllm.store import Manifest

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ranker = open_cache_ranker(Manifest.load(cache))
        texts = {i: ranker.builder.item_text(item) for i, item in dataset.items.items()}
        system = PrefixSystem(ranker, 256 << 20)
        ranker.label_prior(min(len(requests[0].candidates), ranker.builder.max_candidates))
        run = SystemRun("prefix", "in-process", [])
        for r in requests:
            ranking = system.rank([texts[i] for i in r.history], [texts[i] for i in r.candidates])
            run.ttft_ms.append(ranking.ttft_ms)
            run.rankings.append([r.candidates[i] for i in ranking.order])
        return run
    finally:
        torch.set_num_threads(previous)
