"""One ranking request on its way through a node, from the HTTP handler to the kernels.

A :class:`RankJob` is made once per request and filled in as it travels; every step below reads
and writes the same object. ``POST /v1/recommend``, in order:

1. ``NodeServer.recommend`` (:mod:`rcllm.serve.node`): parses the body (``parse_request``) and has
   ``NodeRunner.prepare`` (:mod:`rcllm.serve.runner`) make the job: ``request``, ``history``,
   ``texts``, ``rows``, ``policy``, ``max_new_tokens``. ``NodeServer._fetch_lacking`` brings the
   blocks the node lacks from peers on the event loop: ``fetched``, ``fetch_ms``.
2. ``EngineBatcher.rank`` (:mod:`rcllm.serve.batcher`) queues the job for the engine thread,
   whose ``_loop`` takes the jobs that queued meanwhile to ``NodeRunner.run_many``.
3. ``NodeRunner.run_many`` gathers each job's blocks from the tiers (``_gather``: ``blocks``,
   ``item_hits``, ``item_misses``), then hands the batch to the ranker.
4. ``Ranker.rank_many`` (:mod:`rcllm.engine.ranker`) builds each prompt (``segments``) and runs
   them together through ``BlockEngine.forward_batch`` (:mod:`rcllm.engine.forward`), which
   prepares one ``Prompt`` per job and runs the layers (``BlockEngine.run_layer``) over the
   kernels of :mod:`rcllm.kernels` (``place_blocks``, ``apply_rope``, ``scatter_kv``,
   ``selective_attention``); it reads the labels: ``ranking``, or ``error`` if refused.
5. ``NodeRunner.run_many`` turns the ranking into the node's answer (``response``); the batcher
   resolves the job's future with it (or raises ``error``) and the handler renders it as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rcllm.engine.blocks import BlockKV, Segment
from rcllm.engine.errors import RequestError
from rcllm.engine.policy import Policy

if TYPE_CHECKING:
    from rcllm.engine.ranker import BlockSource, Ranking


@dataclass(eq=False)
class RankJob:
    # what the ranker reads
    history: list[str]  # item texts, oldest first (the cache's history length at most)
    texts: list[str]  # candidate item texts, in request order
    policy: str | Policy
    max_new_tokens: int = 0
    blocks: BlockSource | None = None  # where the prompt's cached blocks come from; None: all fresh
    # what a node adds (the engine never reads these)
    request: Any = None  # the parsed request (rcllm.serve.schema.RecommendRequest)
    rows: list[int | None] = field(default_factory=list)  # catalog row per candidate; None: inline (cold) item
    fetched: dict[str, BlockKV] = field(default_factory=dict)  # key -> block brought from a peer
    fetch_ms: float = 0.0
    item_hits: int = 0  # candidate blocks found in memory or on disk
    item_misses: int = 0  # fetched from a peer or recomputed
    # results
    segments: list[Segment] | None = None  # the prompt (None for a tournament or a generated reply: several)
    ranking: Ranking | None = None
    error: RequestError | None = None  # the input refused; the job has no ranking
    response: Any = None  # the node's answer (rcllm.serve.schema.RecommendResponse)
