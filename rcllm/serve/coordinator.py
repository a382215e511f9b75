"""``rcllm coordinator``: the front door. Routes each request to a node, fails over, replicates hot items.

- ``POST /v1/recommend``: validated here (same schema as the node), routed by
  :mod:`rcllm.serve.routing` over the nodes that are up, forwarded with the shared token. A node
  that drops the request (dies, refuses the connection, answers 5xx) or is full (503) is skipped
  and the next node in the routing order gets the request; the client sees an error only when
  no node can answer.
- A poll loop per node (``GET /v1/state`` every ``poll_every`` s, ``poll_timeout`` s timeout) is
  the health check and brings queue depth, service time, cost parameters, the foreign blocks the
  node holds and its per-item misses. Two failed polls in a row, or one refused connection, mark
  a node down; one good poll brings it back.
- A replication loop feeds those misses to :class:`~rcllm.serve.replication.HotItems` and sends
  ``POST /v1/replicate`` for the items that stay hot on a node.
- ``GET /v1/cluster`` (nodes, up/down, load, placement, hit rates, replicas, replication events),
  ``GET /health``, ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from rcllm.data.formats import load_histories
from rcllm.data.sampling import DEFAULT_HISTORY
from rcllm.serve.costs import CostModel, kv_bytes_per_token
from rcllm.serve.directory import ItemDirectory
from rcllm.serve.http import bearer, event, json_error, make_app
from rcllm.serve.metrics import Registry
from rcllm.serve.replication import REPLICA_SHARE, HotItems
from rcllm.serve.routing import NodeView, RouteQuery, Router
from rcllm.serve.schema import RecommendRequest, check_known, parse_request
from rcllm.store import Manifest, users_dir
from rcllm.store.manifest import stored_kv_dtype
from rcllm.store.layout import HISTORIES_COPY

DOWN_AFTER_FAILED_POLLS = 2
RECENT_HISTORIES = 100_000  # computed history blocks remembered per (user, history), for affinity
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=1.0)
ROUTING_BUCKETS_MS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class NodeLink:
    """The coordinator's view of one node."""

    node: int
    address: str  # host:port
    view: NodeView
    polled_queue: int = 0
    outstanding: int = 0  # requests the coordinator sent and is waiting for
    failed_polls: int = 0
    since: float = field(default_factory=time.time)  # of the last up/down change
    reason: str = "not polled yet"
    state: dict = field(default_factory=dict)  # the last /v1/state
    routed: int = 0
    item_hits: int = 0
    item_misses: int = 0
    user_hits: int = 0
    user_lookups: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def _total(counter) -> int:
    return int(sum(counter.values.values()))


class Coordinator:
    def __init__(
        self, directory: ItemDirectory, addresses: list[str], bytes_per_token: int, *, strategy: str = "affinity",
        token: str | None = None, histories: dict[str, list[str]] | None = None, history_len: int = DEFAULT_HISTORY,
        placement: dict | None = None, poll_every: float = 0.5, poll_timeout: float = 1.0,
        replicate_every: float = 2.0, hot: HotItems | None = None,
    ):
        self.directory = directory
        self.token = token
        self.histories = histories or {}
        self.history_len = history_len
        self.placement = placement or {}
        self.poll_every, self.poll_timeout, self.replicate_every = poll_every, poll_timeout, replicate_every
        self.links = [
            NodeLink(k, address, NodeView(k, CostModel(bytes_per_token), up=False)) for k, address in enumerate(addresses)
        ]
        self.views = [link.view for link in self.links]
        self.router = Router(strategy, directory.owner, directory.tokens, range(len(addresses)))
        self.hot = hot or HotItems()
        self.turn = 0
        self.recent_histories: OrderedDict[tuple, set[int]] = OrderedDict()
        self.replication_log: deque = deque(maxlen=50)
        self.session: aiohttp.ClientSession | None = None
        self.tasks: list[asyncio.Task] = []
        self.metrics = self._metrics()

    @classmethod
    def from_cache(cls, cache_dir: Path, addresses: list[str] | None = None, **options) -> "Coordinator":
        manifest = Manifest.load(cache_dir)
        if addresses is None:
            addresses = [f"{n['host']}:{n['port']}" for n in manifest.nodes]
        if len(addresses) != len(manifest.nodes):
            raise ValueError(f"{len(addresses)} node addresses for a cache of {len(manifest.nodes)} nodes")
        histories_file = users_dir(cache_dir) / HISTORIES_COPY
        histories = load_histories(histories_file, strict=False)[0] if histories_file.is_file() else {}
        return cls(
            ItemDirectory.load(cache_dir), addresses, kv_bytes_per_token(manifest.model, stored_kv_dtype(manifest)), histories=histories,
            history_len=int(manifest.users.get("history", DEFAULT_HISTORY)), placement=manifest.placement, **options,
        )

    def _metrics(self) -> Registry:
        m = Registry()
        links = self.links

        def ratios() -> dict[tuple, float]:
            out = {}
            for link in links:
                if link.item_hits + link.item_misses:
                    out[(link.node, "item")] = link.item_hits / (link.item_hits + link.item_misses)
                if link.user_lookups:
                    out[(link.node, "user")] = link.user_hits / link.user_lookups
            return out

        m.gauge("rcllm_node_up", "1 while the node answers its polls", ("node",),
                read=lambda: {(link.node,): float(link.view.up) for link in links})
        m.gauge("rcllm_queue_depth", "Requests queued on each node (its last poll or our in-flight count)", ("node",),
                read=lambda: {(link.node,): link.view.queue_depth for link in links})
        m.gauge("rcllm_hit_ratio", "Cache hit ratio of answered requests, by node and block kind", ("node", "kind"),
                read=ratios)
        m.counter("rcllm_routed_total", "Requests answered, by node", ("node",),
                  read=lambda: {(link.node,): link.routed for link in links})
        self.ttft = m.histogram("rcllm_ttft_ms", "Time to first token reported by the node that answered")
        self.latency = m.histogram("rcllm_recommend_ms", "Coordinator latency of answered requests (queueing included)")
        self.routing_ms = m.histogram("rcllm_routing_decision_ms", "Time to parse, validate and route a request",
                                      buckets=ROUTING_BUCKETS_MS)
        self.retries = m.counter("rcllm_retries_total", "Requests sent to another node, by why", ("reason",))
        self.transitions = m.counter("rcllm_node_transitions_total", "Nodes marked up or down", ("node", "to"))
        self.replications = m.counter("rcllm_replication_events_total", "Replicate calls made, by target node", ("node",))
        self.replicated = m.counter("rcllm_replicated_blocks_total", "Blocks replicated, by target node", ("node",))
        return m

    def app(self) -> web.Application:
        routes = [
            ("POST", "/v1/recommend", self.recommend),
            ("GET", "/v1/cluster", self.cluster),
            ("GET", "/health", self.health),
        ]
        return make_app(self.metrics, routes, self._start, self._stop)

    async def _start(self, app) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
        self.tasks = [asyncio.ensure_future(self._poll_loop(link)) for link in self.links]
        self.tasks.append(asyncio.ensure_future(self._replication_loop()))

    async def _stop(self, app) -> None:  # after in-flight requests finished
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.session.close()

    # -- routing ----------------------------------------------------------------------------

    def _history_key(self, request: RecommendRequest) -> tuple | None:
        """Identity of a request's history block when it is not one the cache holds on every node."""
        if request.history is None:
            return None
        n = self.history_len
        recent = tuple(request.history[-n:]) if n else ()
        stored = self.histories.get(request.user_id)
        if stored is not None and tuple(stored[-n:] if n else ()) == recent:
            return None
        return recent  # the block depends on these ids only, whoever sends them

    def query(self, request: RecommendRequest) -> tuple[RouteQuery, tuple | None]:
        row, tokens = self.directory.row, self.directory.tokens
        rows = [r for c in request.candidates if c.item is None and (r := row.get(c.id)) is not None]
        history = self._history_key(request)
        if history is None:
            return RouteQuery(request.user_id, rows), None
        # the history block is about as long as its items' blocks
        history_tokens = sum(tokens[row[i]] for i in history if i in row)
        nodes = self.recent_histories.get(history, set())
        return RouteQuery(request.user_id, rows, history_tokens, nodes), history

    def route(self, query: RouteQuery) -> list[int]:
        for link in self.links:
            link.view.queue_depth = max(link.outstanding, link.polled_queue)
        order = self.router.order(query, self.views, self.turn)
        self.turn += 1
        return order

    # -- requests ---------------------------------------------------------------------------

    async def recommend(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        body = await request.read()
        deciding = time.perf_counter()
        req = parse_request(body)
        check_known(req, self.directory.row.__contains__, self.histories.__contains__)
        query, history = self.query(req)
        order = self.route(query)
        self.routing_ms.observe((time.perf_counter() - deciding) * 1000.0)
        if not order:
            down = "; ".join(f"node {link.node} ({link.address}): {link.reason}" for link in self.links)
            return json_error(503, f"no node is up: {down}", headers={"Retry-After": "1"})
        busy: list[int] = []
        failures: list[str] = []
        for k in order:
            link = self.links[k]
            link.outstanding += 1
            try:
                async with self.session.post(
                    f"{link.url}/v1/recommend", data=body, timeout=REQUEST_TIMEOUT,
                    headers={"Content-Type": "application/json", **bearer(self.token)},
                ) as resp:
                    status, payload = resp.status, await resp.read()
                    retry_after = resp.headers.get("Retry-After", "1")
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                failures.append(f"node {k}: {type(e).__name__}")
                self.retries.inc(reason="node failed")
                self._lost(link, e)
                continue
            finally:
                link.outstanding -= 1
            if status == 200:
                self._answered(link, payload, history, started)
                return web.Response(body=payload, content_type="application/json")
            if status == 503:
                busy.append(int(retry_after) if retry_after.isdigit() else 1)
                self.retries.inc(reason="node busy")
                continue
            if 400 <= status < 500:  # the request's fault: every node would say the same
                return web.Response(body=payload, status=status, content_type="application/json")
            failures.append(f"node {k}: HTTP {status}")
            self.retries.inc(reason="node error")
            event("node error", logging.WARNING, node=k, status=status, body=payload[:300].decode(errors="replace"))
        if busy and not failures:
            return json_error(503, f"every node is busy ({len(busy)} tried); retry later",
                              headers={"Retry-After": str(min(busy))})
        return json_error(503, f"no node could answer: {'; '.join(failures + [f'{len(busy)} busy'])}",
                          headers={"Retry-After": "1"})

    def _answered(self, link: NodeLink, payload: bytes, history: tuple | None, started: float) -> None:
        data = json.loads(payload)
        cache = data.get("cache", {})
        link.routed += 1
        link.item_hits += cache.get("item_hits", 0)
        link.item_misses += cache.get("item_misses", 0)
        if cache.get("user_hit") is not None:
            link.user_lookups += 1
            link.user_hits += bool(cache["user_hit"])
        self.ttft.observe(float(data.get("ttft_ms", 0.0)))
        self.latency.observe((time.perf_counter() - started) * 1000.0)
        if history is not None:  # that node now holds the history block it computed
            self.recent_histories.setdefault(history, set()).add(link.node)
            self.recent_histories.move_to_end(history)
            while len(self.recent_histories) > RECENT_HISTORIES:
                self.recent_histories.popitem(last=False)

    # -- node health and state ----------------------------------------------------------------

    def _mark(self, link: NodeLink, up: bool, reason: str) -> None:
        link.reason = reason
        if link.view.up == up:
            return
        link.view.up = up
        link.since = time.time()
        self.transitions.inc(node=link.node, to="up" if up else "down")
        event("node up" if up else "node down", logging.INFO if up else logging.WARNING,
              node=link.node, address=link.address, reason=reason)

    def _lost(self, link: NodeLink, error: Exception) -> None:
        """A forwarded request failed: a refused connection means the node is gone; anything
        else (a dropped keep-alive connection, a timeout) waits for the poll's verdict."""
        if isinstance(error, aiohttp.ClientConnectorError):
            self._mark(link, False, f"connection refused ({error})")
        event("request to node failed; retrying elsewhere", logging.WARNING, node=link.node, error=repr(error))

    async def _poll_loop(self, link: NodeLink) -> None:
        timeout = aiohttp.ClientTimeout(total=self.poll_timeout)
        while True:
            try:
                async with self.session.get(f"{link.url}/v1/state", headers=bearer(self.token), timeout=timeout) as resp:
                    if resp.status != 200:
                        raise ValueError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                    state = await resp.json()
                self._polled(link, state)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                link.failed_polls += 1
                refused = isinstance(e, aiohttp.ClientConnectorError)
                if refused or link.failed_polls >= DOWN_AFTER_FAILED_POLLS:
                    self._mark(link, False, f"poll failed: {type(e).__name__}: {e}")
            await asyncio.sleep(self.poll_every)

    def _polled(self, link: NodeLink, state: dict) -> None:
        row = self.directory.row
        link.failed_polls = 0
        link.state = state
        link.polled_queue = int(state.get("queue_depth", 0))
        view = link.view
        if state.get("service_ms"):
            view.service_ms = float(state["service_ms"])
        if "costs" in state:
            view.costs = CostModel.from_dict(state["costs"])
        view.held = {row[i] for i in state.get("replicas", ()) if i in row}
        misses = {row[i]: int(n) for i, n in state.get("misses", {}).items() if i in row}
        if misses:
            self.hot.add(link.node, misses)
        self._mark(link, True, "answering")

    async def _replication_loop(self) -> None:
        directory = self.directory
        while True:
            await asyncio.sleep(self.replicate_every)
            budget = {}
            for link in self.links:
                hot = link.state.get("hot", {})
                held = sum(directory.tokens[r] for r in link.view.held) * link.view.costs.bytes_per_token
                budget[link.node] = max(0, int(REPLICA_SHARE * hot.get("budget", 0)) - held)
            for plan in self.hot.plan(self.views, directory.owner, directory.tokens, budget):
                await self._replicate(plan)
            self.hot.age()

    async def _replicate(self, plan) -> None:
        link = self.links[plan.node]
        keys = [self.directory.keys[r] for r in plan.rows]
        try:
            async with self.session.post(
                f"{link.url}/v1/replicate", json={"keys": keys, "from": plan.source}, headers=bearer(self.token),
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:
                result = await resp.json() if resp.status == 200 else {"error": f"HTTP {resp.status}"}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            result = {"error": repr(e)}
        record = {"ts": round(time.time(), 3), "node": plan.node, "from": plan.source,
                  "items": [self.directory.ids[r] for r in plan.rows[:20]], "blocks": len(plan.rows), **result}
        self.replication_log.append(record)
        if "error" not in result:
            self.replications.inc(node=plan.node)
            self.replicated.inc(result.get("replicated", 0), node=plan.node)
        event("replication", **{k: v for k, v in record.items() if k != "ts"})

    # -- reports ----------------------------------------------------------------------------

    def cluster_report(self) -> dict:
        nodes = []
        for link in self.links:
            view, state = link.view, link.state
            lookups = link.item_hits + link.item_misses
            nodes.append({
                "node": link.node, "address": link.address, "up": view.up, "since": round(link.since, 3),
                "reason": link.reason, "queue_depth": view.queue_depth, "outstanding": link.outstanding,
                "service_ms": view.service_ms, "routed": link.routed,
                "hit_ratio": {"item": link.item_hits / lookups if lookups else None,
                              "user": link.user_hits / link.user_lookups if link.user_lookups else None},
                "tiers": state.get("tiers", {}), "hot": state.get("hot", {}), "replicas": len(view.held),
                "costs": view.costs.to_dict(),
            })
        return {
            "routing": self.router.strategy,
            "nodes": nodes,
            "up": sum(link.view.up for link in self.links),
            "items": len(self.directory),
            "placement": self.placement,
            "replication": {"events": _total(self.replications), "blocks": _total(self.replicated),
                            "hot_items": self.hot_items(), "recent": list(self.replication_log)},
        }

    def hot_items(self, top: int = 10) -> dict[int, list]:
        """Per node, the items it misses most (decayed miss counts)."""
        ids = self.directory.ids
        return {
            node: [[ids[r], round(score, 2)] for r, score in sorted(scores.items(), key=lambda x: -x[1])[:top]]
            for node, scores in self.hot.scores.items() if scores
        }

    async def cluster(self, request: web.Request) -> web.Response:
        return web.json_response(self.cluster_report())

    async def health(self, request: web.Request) -> web.Response:
        up = sum(link.view.up for link in self.links)
        return web.json_response({"status": "ok", "nodes_up": up, "nodes": len(self.links)})
