"""What one node computes, without HTTP: requests resolved against the cache, blocks it lacks
planned (fetch or recompute), and the ranking run over its tiered block store.

The node's web server (:mod:`rcllm.serve.node`) fetches the planned blocks from peers on its
event loop, then hands the request's :class:`~rcllm.engine.job.RankJob` to
:meth:`NodeRunner.run_many` on its single engine thread; the routing benchmark drives several
runners in one process with in-process fetches.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rcllm.data.catalog import load_catalog
from rcllm.data.formats import load_histories
from rcllm.data.sampling import DEFAULT_HISTORY
from rcllm.engine.api import DTYPES, open_ranker
from rcllm.engine.blocks import BlockKV
from rcllm.engine.errors import RequestError
from rcllm.engine.graphs import StaticRecompute
from rcllm.engine.job import RankJob
from rcllm.engine.model_policy import default_policy
from rcllm.engine.policy import parse_policy
from rcllm.engine.prompt import PromptTemplate
from rcllm.engine.ranker import Ranker
from rcllm.serve.costs import EWMA, CostModel, kv_bytes_per_token
from rcllm.serve.directory import ItemDirectory
from rcllm.serve.schema import CacheStats, RecommendRequest, RecommendResponse, check_known, make_response
from rcllm.store import BlockStore, Manifest, check_compatible, node_dir, require_built, store_root, user_stores, users_dir
from rcllm.store.built import node_store
from rcllm.store.layout import CATALOG_COPY, HISTORIES_COPY
from rcllm.store.manifest import stored_kv_dtype
from rcllm.store.tiered import TieredBlockSource

CUDA_GRAPHS = ("auto", "on", "off")


@dataclass
class NodeData:
    """What a node reads from the cache besides its model."""

    manifest: Manifest
    directory: ItemDirectory
    catalog: dict[str, dict]
    histories: dict[str, list[str]]

    @classmethod
    def load(cls, cache_dir: Path) -> "NodeData":
        manifest = Manifest.load(cache_dir)
        catalog = {item["id"]: item for item in load_catalog(Path(cache_dir) / CATALOG_COPY)}
        histories_file = users_dir(cache_dir) / HISTORIES_COPY
        histories = load_histories(histories_file, items=catalog, strict=False)[0] if histories_file.is_file() else {}
        return cls(manifest, ItemDirectory.load(cache_dir), catalog, histories)


def open_cache_ranker(manifest: Manifest, model: str | None = None, device: str = "cpu") -> Ranker:
    """The ranker a cache's blocks are valid for: its model (or ``model``), dtype and template;
    refuses another model with the reason (:class:`~rcllm.store.IncompatibleCacheError`)."""
    flags = {str(t).removeprefix("torch."): flag for flag, t in DTYPES.items()}
    dtype = flags.get(manifest.model.get("dtype"), "fp32")
    template = PromptTemplate.from_dict(manifest.template)
    ranker = open_ranker(model or manifest.model["name"], device=device, dtype=dtype, template=template)
    check_compatible(manifest, ranker.engine.lm, template.to_dict())
    return ranker


class NodeRunner:
    """One node's engine over its tiered block store. :meth:`run` and :meth:`admit` must be
    called from one thread at a time (the engine and the hot tier are not thread-safe); the
    other methods may run on another thread concurrently."""

    def __init__(
        self, ranker: Ranker, node: int, data: NodeData, stores: list[BlockStore], hot_bytes: int,
        policy: str | None = None,
    ):
        """``policy``: what requests that name none get; None: the model's gated policy
        (:func:`~rcllm.engine.model_policy.default_policy`), and ``policy_reason`` says which."""
        self.ranker, self.node, self.data = ranker, node, data
        self.directory = data.directory
        self.history_len = int(data.manifest.users.get("history", DEFAULT_HISTORY))
        if policy is None:
            chosen = default_policy(ranker.engine.lm.path, ranker.engine.lm.fingerprint)
            self.policy, self.policy_reason = chosen.policy, chosen.reason
        else:
            self.policy, self.policy_reason = str(parse_policy(policy)), "given (--policy)"
        self.source = TieredBlockSource(ranker, stores, hot_bytes)
        # the compute rate's first estimate: the block context computed again, now that the
        # first forward (lazy initialisation, allocations) is behind us
        system_ids = self.source.system.token_ids
        started = time.perf_counter()
        ranker.engine.compute_block(system_ids, ())
        context_ms = (time.perf_counter() - started) * 1000.0
        self.costs = CostModel(kv_bytes_per_token(data.manifest.model, stored_kv_dtype(data.manifest)), compute_ms_per_token=context_ms / len(system_ids))
        self.service_ms = 0.0
        self.requests = 0
        self.tiers: Counter = Counter()  # item block lookups: memory, disk, peer, computed
        self.user_lookups: Counter = Counter()  # history block: hit, miss
        self._misses: Counter = Counter()  # catalog row -> misses since the last state() call
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, cache_dir: Path, node: int, hot_bytes: int, policy: str | None = None, model: str | None = None,
        device: str = "cpu", cuda_graphs: str = "auto", graph_tokens: int = 2048,
    ) -> "NodeRunner":
        """``cuda_graphs``: ``auto`` (on with CUDA), ``on`` or ``off``: whether a request that runs
        alone goes through :class:`~rcllm.engine.graphs.StaticRecompute` (prompts of up to
        ``graph_tokens`` tokens; on CPU the same static pass runs eagerly)."""
        data = NodeData.load(cache_dir)
        if not 0 <= node < len(data.manifest.nodes):
            raise ValueError(f"--node {node}: the cache at {cache_dir} has nodes 0..{len(data.manifest.nodes) - 1}")
        if cuda_graphs not in CUDA_GRAPHS:
            raise ValueError(f"--cuda-graphs {cuda_graphs!r}: expected one of {', '.join(CUDA_GRAPHS)}")
        # a node not (completely) built would serve with blocks missing: refuse, saying how to finish it
        # (and every part of the history blocks: a user's block is in one part only)
        require_built(cache_dir, data.manifest, [node_store(node), *user_stores(data.manifest)])
        ranker = open_cache_ranker(data.manifest, model, device)
        if cuda_graphs == "on" or (cuda_graphs == "auto" and ranker.engine.device.type == "cuda"):
            ranker.static = StaticRecompute(ranker.engine, max_length=graph_tokens, logit_ids=ranker.logit_ids)
        stores = [BlockStore.open_readonly(node_dir(cache_dir, node))]
        for name in user_stores(data.manifest):  # empty ones (no histories planned) were never opened
            if (store_root(cache_dir, name) / "index.lmdb").is_dir():
                stores.append(BlockStore.open_readonly(store_root(cache_dir, name)))
        return cls(ranker, node, data, stores, hot_bytes, policy)

    def close(self) -> None:
        for store in self.source.stores:
            store.close()

    # -- before the engine thread (any thread) ---------------------------------------------

    def prepare(self, request: RecommendRequest) -> RankJob:
        """The request's job, ids resolved to texts; raises RequestError for ids or users the
        cache does not know."""
        catalog, histories = self.data.catalog, self.data.histories
        check_known(request, catalog.__contains__, histories.__contains__)
        history = request.history if request.history is not None else histories[request.user_id]
        recent = history[-self.history_len :] if self.history_len else []
        item_text = self.ranker.builder.item_text
        texts, rows = [], []
        for c in request.candidates:
            texts.append(item_text(c.item if c.item is not None else catalog[c.id]))
            rows.append(None if c.item is not None else self.directory.row.get(c.id))
        return RankJob(
            [item_text(catalog[i]) for i in recent], texts, request.policy or self.policy,
            max_new_tokens=request.max_new_tokens, request=request, rows=rows,
        )  # fmt: skip

    def lacking(self, job: RankJob) -> list[int]:
        """Catalog rows of the job's candidates this node holds neither in memory nor on disk."""
        keys = self.directory.keys
        return [r for r in job.rows if r is not None and self.source.locate(keys[r]) is None]

    def plan_fetch(self, rows: list[int], peer_up: Callable[[int], bool]) -> dict[int, list[int]]:
        """Rows worth fetching, by the peer that holds them: the owner is up and fetching is
        estimated cheaper than recomputing. The rest will be recomputed."""
        plan: dict[int, list[int]] = {}
        for r in rows:
            owner = self.directory.owner[r]
            if owner != self.node and peer_up(owner) and self.costs.should_fetch(self.directory.tokens[r]):
                plan.setdefault(owner, []).append(r)
        return plan

    def state(self) -> dict:
        """Load, hot tier, costs and the per-item misses since the last call (which resets them)."""
        with self._lock:
            misses, self._misses = self._misses, Counter()
        directory, node = self.directory, self.node
        # tuple() of the OrderedDict runs in C under the GIL: a consistent snapshot even while
        # the engine thread admits and evicts
        hot = tuple(self.source.hot)
        rows = (directory.row_by_key.get(k) for k in hot)
        replicas = [directory.ids[r] for r in rows if r is not None and directory.owner[r] != node]
        return {
            "node": node,
            "policy": self.policy,
            "service_ms": round(self.service_ms, 3),
            "requests": self.requests,
            "costs": self.costs.to_dict(),
            "hot": {"blocks": len(hot), "bytes": self.source.hot_used, "budget": self.source.hot_bytes},
            "replicas": replicas,
            "misses": {directory.ids[r]: n for r, n in misses.items()},
            "tiers": dict(self.tiers),
            "user_lookups": dict(self.user_lookups),
        }

    # -- on the engine thread -----------------------------------------------------------------

    def admit(self, blocks: dict[str, BlockKV]) -> dict[str, BlockKV]:
        """Blocks brought from peers (on the CPU) join the hot tier on the engine's device; returns them there."""
        device = self.ranker.engine.device
        placed = {}
        for key, block in blocks.items():
            if block.keys.device != device:
                block = BlockKV(block.token_ids, block.keys.to(device), block.values.to(device), block.base_pos,
                                block.fingerprint, block.context)
            self.source.admit(key, block)
            placed[key] = block
        return placed

    def run(self, job: RankJob) -> RecommendResponse:
        """Rank the job alone (:meth:`run_many`); returns its response or raises its RequestError."""
        self.run_many([job])
        if job.error is not None:
            raise job.error
        return job.response

    def run_many(self, jobs: list[RankJob]) -> None:
        """Rank several jobs with one batched forward (what the node's engine thread does with
        the requests that queued while it was busy): fills each job's ``response``, or its
        ``error`` if the engine refuses it (any other exception is a fault of ours: it
        propagates and fails the batch). Each job's blocks are gathered first, in order: the
        blocks in ``job.fetched`` (brought from peers) join the hot tier; other blocks it lacks
        are recomputed here (timed: the cost model's compute rate). Every job's ``ttft_ms`` is
        its ``fetch_ms`` plus the whole batch's time on this thread: it waited for all of it.
        The service time the coordinator plans with is the batch's time per job."""
        started = time.perf_counter()
        todo = []
        for job in jobs:
            try:
                self._gather(job)
                todo.append(job)
            except RequestError as e:  # e.g. an inline item longer than the model takes
                job.error = e
        # one batch per reply length (a generated reply runs alone anyway)
        for max_new in sorted({job.max_new_tokens for job in todo}):
            self.ranker.rank_many([job for job in todo if job.max_new_tokens == max_new])
        elapsed = (time.perf_counter() - started) * 1000.0
        per_job = elapsed / len(jobs)
        for job in jobs:
            self.service_ms = per_job if not self.requests else self.service_ms + EWMA * (per_job - self.service_ms)
            self.requests += 1
            if job.error is not None:
                continue
            ranking = job.ranking
            self.user_lookups["hit" if ranking.user_hit else "miss"] += 1
            stats = CacheStats(
                user_hit=ranking.user_hit, item_hits=job.item_hits, item_misses=job.item_misses,
                recomputed_tokens=ranking.recomputed_tokens, prompt_tokens=ranking.prompt_tokens,
            )
            job.response = make_response(job.request, ranking.order, ranking.scores, job.fetch_ms + elapsed, self.node,
                                         stats, ranking.text)  # fmt: skip

    def _gather(self, job: RankJob) -> None:
        """Every candidate block of the job at hand: found in a tier, taken from ``job.fetched``
        or recomputed; fills the job's ``blocks`` (its view of the source) and its item hits and
        misses."""
        source, builder, keys, fetched = self.source, self.ranker.builder, self.directory.keys, job.fetched
        # Where each candidate's block is, looked up before anything new enters the hot tier:
        # admitting may evict, and a block this request found in memory must not be lost.
        held: dict[str, BlockKV] = {}  # this request's blocks that only memory holds
        found: list[tuple[str, str | None, object, int | None]] = []  # key, tier, token ids, row
        for text, row in zip(job.texts, job.rows):
            ids = builder.item_ids(text) if row is None else None
            key = keys[row] if row is not None else source.key(ids)
            tier = "peer" if key in fetched else source.locate(key)
            if tier == "memory":
                held[key] = source.hot[key]
            found.append((key, tier, ids, row))
        fetched = self.admit(fetched)
        hits = misses = 0
        missed_rows = []
        for (key, tier, ids, row), text in zip(found, job.texts):
            if tier == "peer":
                held[key] = fetched[key]
            elif tier is None:
                tier = "computed"
                ids = builder.item_ids(text) if ids is None else ids
                t = time.perf_counter()
                held[key] = block = self.ranker.engine.compute_block(ids, source.system)
                self.costs.observe_compute(ids.numel(), (time.perf_counter() - t) * 1000.0)
                source.admit(key, block)
            self.tiers[tier] += 1
            if tier in ("memory", "disk"):
                hits += 1
            else:
                misses += 1
                if row is not None:
                    missed_rows.append(row)
        with self._lock:
            self._misses.update(missed_rows)
        job.blocks, job.item_hits, job.item_misses = HeldBlocks(source, held), hits, misses


class HeldBlocks:
    """A :class:`~rcllm.engine.ranker.BlockSource`: the tiered source, with one request's
    memory-only item blocks (``held``, key -> block) kept for the length of its forward. A hot
    tier smaller than a request evicts some of them as the others come in, and the ranking must
    not recompute what this request just fetched or computed."""

    def __init__(self, source: TieredBlockSource, held: dict[str, BlockKV]):
        self.source, self.held, self.system = source, held, source.system

    def get(self, kind: str, token_ids) -> tuple[BlockKV, bool]:
        block = self.held.get(self.source.key(token_ids)) if kind == "item" else None
        return (block, True) if block is not None else self.source.get(kind, token_ids)
