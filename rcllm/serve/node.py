"""``rcllm serve --node K``: one serving node as an aiohttp app.

Endpoints:

- ``POST /v1/recommend``: the request of :mod:`rcllm.serve.schema`, ranked by the engine over
  the node's tiered block store (hot LRU tier over its item store and the replicated users
  store). Item blocks the node lacks are fetched from the peer that holds them, in parallel, on
  the event loop, or recomputed on the engine thread, whichever the cost model says is cheaper;
  either way they stay in the hot tier.
- ``GET /v1/blocks/{key}``: a block of this node's own item store, as ``block_to_bytes`` (404 for
  any other key).
- ``POST /v1/replicate`` ``{"keys": [...], "from": node}``: pull those blocks from that peer
  into the hot tier, within the replica budget; the coordinator sends hot items here.
- ``GET /v1/state``: queue depth, service time, costs, hot tier, replicas, per-item misses since
  the last poll (for the coordinator). ``GET /health``, ``GET /metrics`` (Prometheus text).

The engine runs on ONE thread (torch modules and the hot tier are not safe to share between
concurrent forwards); requests wait for it in its queue, bounded by ``max_queue``: beyond it the
node answers 503 with Retry-After. When the thread frees up, the ranking requests that queued
meanwhile run as one batched forward (at most ``max_batch``; :mod:`rcllm.serve.batcher`). With a token, every endpoint but /health wants
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time

import aiohttp
from aiohttp import web

from rcllm.engine.blocks import BlockKV
from rcllm.engine.errors import RequestError
from rcllm.engine.job import RankJob
from rcllm.serve.batcher import EngineBatcher
from rcllm.serve.http import bearer, event, json_error, make_app
from rcllm.serve.metrics import Registry
from rcllm.serve.replication import REPLICA_SHARE
from rcllm.serve.runner import NodeRunner
from rcllm.serve.schema import parse_request
from rcllm.store import block_from_bytes

PEER_BACKOFF_S = 2.0  # after a failed fetch, recompute rather than ask that peer again for this long
FETCH_TIMEOUT_S = 2.0
MAX_REPLICATE_KEYS = 10_000
_KEY = re.compile(r"[0-9a-f]{8,128}")


class NodeServer:
    def __init__(
        self, runner: NodeRunner, peers: dict[int, str], token: str | None = None, max_queue: int = 64,
        fetch_timeout_s: float = FETCH_TIMEOUT_S, max_batch: int = 8,
    ):
        self.runner = runner
        self.node = runner.node
        self.peers = peers  # node -> base URL
        self.token = token
        self.max_queue = max_queue
        self.fetch_timeout = aiohttp.ClientTimeout(total=fetch_timeout_s)
        self.batcher = EngineBatcher(runner, max_batch, name=f"engine-{self.node}")
        self.pending = 0  # admitted requests not answered yet (waiting for, or on, the engine)
        self.session: aiohttp.ClientSession | None = None
        self.peer_down_until: dict[int, float] = {}
        self.downloads: dict[str, asyncio.Task] = {}  # one fetch per key, however many requests want it
        self.metrics = self._metrics()

    def _metrics(self) -> Registry:
        m = Registry()
        runner = self.runner

        # dict() copies in one C call: a consistent snapshot while the engine thread counts
        def ratios() -> dict[tuple, float]:
            tiers = dict(runner.tiers)
            total = sum(tiers.values())
            return {(tier,): n / total for tier, n in tiers.items()} if total else {}

        def user_ratio() -> dict[tuple, float]:
            lookups = dict(runner.user_lookups)
            total = sum(lookups.values())
            return {(): lookups.get("hit", 0) / total} if total else {}

        m.gauge("rcllm_queue_depth", "Requests waiting for or on the engine", read=lambda: {(): self.pending})
        m.gauge("rcllm_batch_mean", "Mean ranking requests per engine forward", read=lambda: {(): self.batcher.mean_batch})
        m.gauge("rcllm_service_ms", "Moving average of a request's engine time", read=lambda: {(): runner.service_ms})
        self.ttft = m.histogram("rcllm_ttft_ms", "Time to first token (ranking latency) of answered requests")
        m.counter("rcllm_item_block_lookups_total", "Item block lookups by the tier that served them",
                  ("tier",), read=lambda: {(t,): n for t, n in dict(runner.tiers).items()})
        m.gauge("rcllm_item_hit_ratio", "Share of item block lookups served by each tier", ("tier",), read=ratios)
        m.gauge("rcllm_user_hit_ratio", "Share of requests whose history block was cached", read=user_ratio)
        m.gauge("rcllm_hot_tier_bytes", "Bytes in the hot tier", read=lambda: {(): runner.source.hot_used})
        m.gauge("rcllm_hot_tier_blocks", "Blocks in the hot tier", read=lambda: {(): len(runner.source.hot)})
        m.gauge("rcllm_cost", "Cost model parameters measured by this node", ("param",),
                read=lambda: {(k,): v for k, v in runner.costs.to_dict().items()})
        self.fetches = m.counter("rcllm_peer_fetches_total", "Blocks fetched from peers", ("result",))
        self.replications = m.counter("rcllm_replication_events_total", "Replicate calls served")
        self.replicated = m.counter("rcllm_replicated_blocks_total", "Blocks pulled into the hot tier by replicate calls")
        return m

    def app(self) -> web.Application:
        routes = [
            ("POST", "/v1/recommend", self.recommend),
            ("GET", "/v1/blocks/{key}", self.block),
            ("POST", "/v1/replicate", self.replicate),
            ("GET", "/v1/state", self.state),
            ("GET", "/health", self.health),
        ]
        return make_app(self.metrics, routes, self._start, self._stop, self.token)

    async def _start(self, app) -> None:
        self.session = aiohttp.ClientSession()

    async def _stop(self, app) -> None:  # after in-flight requests finished
        await self.session.close()
        self.batcher.shutdown()
        self.runner.close()

    # -- ranking ----------------------------------------------------------------------------

    async def recommend(self, request: web.Request) -> web.Response:
        req = parse_request(await request.read())
        job = self.runner.prepare(req)
        if self.pending >= self.max_queue:
            wait_s = max(1, math.ceil(self.pending * self.runner.service_ms / 1000.0))
            return json_error(
                503, f"node {self.node} is busy: {self.pending} requests queued (max {self.max_queue}); retry later",
                headers={"Retry-After": str(wait_s)},
            )
        self.pending += 1
        try:
            started = time.perf_counter()
            job.fetched = await self._fetch_lacking(job)
            job.fetch_ms = (time.perf_counter() - started) * 1000.0
            # the engine refusing this input (longer than the model takes...) raises RequestError:
            # a 400; anything else it raises is a fault of ours: a 500 (make_middlewares)
            response = await asyncio.wrap_future(self.batcher.rank(job))
        finally:
            self.pending -= 1
        self.ttft.observe(response.ttft_ms)
        return web.json_response(response.to_dict())

    def _peer_up(self, node: int) -> bool:
        return node in self.peers and time.monotonic() >= self.peer_down_until.get(node, 0.0)

    async def _fetch_lacking(self, job: RankJob) -> dict[str, BlockKV]:
        rows = self.runner.lacking(job)
        if not rows:
            return {}
        keys = self.runner.directory.keys
        wanted = [(owner, keys[r]) for owner, rs in self.runner.plan_fetch(rows, self._peer_up).items() for r in rs]
        blocks = await asyncio.gather(*(self._fetch(owner, key) for owner, key in wanted))
        return {key: block for (_, key), block in zip(wanted, blocks) if block is not None}

    async def _fetch(self, owner: int, key: str) -> BlockKV | None:
        task = self.downloads.get(key)
        if task is None:
            task = asyncio.ensure_future(self._download(owner, key))
            self.downloads[key] = task
            task.add_done_callback(lambda _: self.downloads.pop(key, None))
        return await asyncio.shield(task)

    async def _download(self, owner: int, key: str) -> BlockKV | None:
        """The block from its peer, or None (the caller recomputes) if the peer fails or lacks it."""
        url = f"{self.peers[owner]}/v1/blocks/{key}"
        started = time.perf_counter()
        try:
            async with self.session.get(url, headers=bearer(self.token), timeout=self.fetch_timeout) as resp:
                first_byte = time.perf_counter()
                data = await resp.read()
            done = time.perf_counter()
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}: {data[:200].decode(errors='replace')}")
            block = await asyncio.to_thread(block_from_bytes, data)  # verifies the checksum
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # the peer is down or hung
            self.peer_down_until[owner] = time.monotonic() + PEER_BACKOFF_S
            return self._fetch_failed(owner, key, e)
        except ValueError as e:  # it answered, without the block (or with a corrupt one)
            return self._fetch_failed(owner, key, e)
        self.runner.costs.observe_fetch(len(data), (first_byte - started) * 1000.0, (done - first_byte) * 1000.0)
        self.fetches.inc(result="ok")
        return block

    def _fetch_failed(self, owner: int, key: str, error: Exception) -> None:
        self.fetches.inc(result="failed")
        event("peer fetch failed; recomputing", logging.WARNING, peer=owner, key=key, error=repr(error))

    # -- for peers and the coordinator ------------------------------------------------------

    async def block(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        store = self.runner.source.stores[0]  # this node's item store: never the replicated users store
        data = await asyncio.to_thread(store.get_bytes, key) if _KEY.fullmatch(key) else None
        if data is None:
            raise RequestError(f"block {key!r} is not in node {self.node}'s index", 404)
        return web.Response(body=data, content_type="application/octet-stream")

    async def replicate(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"malformed JSON: {e}") from None
        if not isinstance(body, dict) or set(body) != {"keys", "from"}:
            raise RequestError('expected {"keys": [block keys], "from": node}')
        keys, source = body["keys"], body["from"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(keys) > MAX_REPLICATE_KEYS:
            raise RequestError(f"keys must be a list of at most {MAX_REPLICATE_KEYS} block keys")
        if not isinstance(source, int) or isinstance(source, bool) or source == self.node or source not in self.peers:
            raise RequestError(f"from must be another node's number ({sorted(self.peers)}), got {source!r}")
        directory, runner = self.runner.directory, self.runner
        wanted, budget = [], REPLICA_SHARE * runner.source.hot_bytes
        for key in keys:
            row = directory.row_by_key.get(key)
            if row is None or runner.source.locate(key) is not None:
                continue
            size = directory.tokens[row] * runner.costs.bytes_per_token
            if size <= budget:
                budget -= size
                wanted.append(key)
        blocks = await asyncio.gather(*(self._fetch(source, key) for key in wanted))
        got = {key: b for key, b in zip(wanted, blocks) if b is not None}
        await asyncio.wrap_future(self.batcher.call(runner.admit, got))
        nbytes = sum(b.nbytes for b in got.values())
        self.replications.inc()
        self.replicated.inc(len(got))
        event("replicated", source=source, blocks=len(got), bytes=nbytes, asked=len(keys))
        return web.json_response({"replicated": len(got), "bytes": nbytes, "skipped": len(keys) - len(got)})

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response({
            **self.runner.state(), "queue_depth": self.pending, "max_queue": self.max_queue,
            "max_batch": self.batcher.max_batch, "mean_batch": self.batcher.mean_batch,
        })  # fmt: skip

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node": self.node})
