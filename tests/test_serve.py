"""Serving: the request schema, routing, replication and cost model as plain functions; the
coordinator in this process in front of scripted nodes (a node dying or hanging with a request
in flight, hung polls, every node busy); a node in this process with its engine held by the test
(503 beyond max_queue, the drain on SIGTERM/SIGINT); then a real cluster (3 ``rcllm serve``
processes and an ``rcllm coordinator`` on loopback, tiny random model, token auth on) answering
a seeded stream exactly like the in-process engine while a node is SIGKILLed and restarted, 32
concurrent clients, bad requests, metrics, replication and a graceful SIGTERM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import re
import signal
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
import typer
from typer.testing import CliRunner

from rcllm.build.pipeline import BuildOptions, build_cache
from rcllm.cli.serve import register
from rcllm.data.loaders import prepare
from rcllm.data.synthetic import make_synthetic
from rcllm.engine.errors import RequestError
from rcllm.engine.prompt import item_text
from rcllm.engine.ranker import MemoryBlockCache
from rcllm.serve.client import RecommendClient, ServiceError, send_all
from rcllm.serve.cluster import ClusterError, LocalCluster, free_port
from rcllm.serve.coordinator import Coordinator
from rcllm.serve.costs import CostModel
from rcllm.serve.directory import ItemDirectory
from rcllm.serve.http import json_error, serve_until_signalled
from rcllm.serve.metrics import Registry, parse_text
from rcllm.serve.replication import HotItems
from rcllm.serve.routing import HashRing, NodeView, RouteQuery, Router, estimate_ttft_ms
from rcllm.serve.node import NodeServer
from rcllm.serve.runner import NodeData, NodeRunner, open_cache_ranker
from rcllm.serve.schema import (
    MAX_BODY_BYTES,
    MAX_CANDIDATES,
    CacheStats,
    RecommendRequest,
    RecommendResponse,
    check_known,
    make_response,
    parse_request,
)
from rcllm.store import Manifest

TOKEN = "test-token"
HISTORY = 5  # the cache's history blocks hold a user's 5 most recent items
DEFAULT_POLICY = "boundary:2"
MAX_QUEUE = 6


# ---------------------------------------------------------------------------------------------
# the schema


def test_parse_request_reads_the_documented_request_and_inline_cold_items():
    req = parse_request(json.dumps({
        "user_id": "42", "history": ["1193", "661"], "top_k": 10, "policy": "boundary:4", "max_new_tokens": 0,
        "candidates": ["3408", {"id": "new-1", "title": "A Brand New Film", "year": 2025}],
    }))
    assert req.user_id == "42" and req.history == ["1193", "661"] and req.top_k == 10 and req.policy == "boundary:4"
    assert [c.id for c in req.candidates] == ["3408", "new-1"]
    assert req.candidates[0].item is None and req.candidates[1].item["title"] == "A Brand New Film"
    assert parse_request(req.to_json()) == req  # what the client sends is what the server reads
    bare = parse_request(b'{"user_id": "7", "candidates": ["1"]}')
    assert bare.history is None and bare.top_k is None and bare.policy is None and bare.max_new_tokens == 0


@pytest.mark.parametrize("body, message", [
    (b'{"user_id": "1", "candidates": ["1"', "malformed JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b'["1"]', "must be a JSON object"),
    (b'{"user_id": "1", "candidates": ["1"], "colour": "red"}', "unknown fields: colour"),
    (b'{"user_id": 42, "candidates": ["1"]}', "user_id must be a non-empty string"),
    (b'{"candidates": ["1"]}', "user_id must be a non-empty string"),
    (b'{"user_id": "1", "candidates": []}', "candidates is empty"),
    (b'{"user_id": "1", "candidates": "1,2"}', "candidates must be a list"),
    (b'{"user_id": "1", "candidates": [1, 2]}', "candidates[0] must be an item id"),
    (b'{"user_id": "1", "candidates": [{"id": "x"}]}', "missing title"),
    (b'{"user_id": "1", "candidates": ["1", "1"]}', "appears twice"),
    (b'{"user_id": "1", "candidates": ["1"], "history": "1"}', "history must be a list"),
    (b'{"user_id": "1", "candidates": ["1"], "history": [""]}', "history[0]"),
    (b'{"user_id": "1", "candidates": ["1"], "top_k": 0}', "top_k must be a positive integer"),
    (b'{"user_id": "1", "candidates": ["1"], "top_k": true}', "top_k must be a positive integer"),
    (b'{"user_id": "1", "candidates": ["1"], "policy": "magic"}', "unknown correction policy"),
    (b'{"user_id": "1", "candidates": ["1"], "max_new_tokens": -1}', "max_new_tokens"),
])
def test_parse_request_refuses_bad_input_with_a_message(body, message):
    with pytest.raises(RequestError, match=re.escape(message)) as e:
        parse_request(body)
    assert e.value.status == 400


def test_parse_request_refuses_more_candidates_than_the_limit():
    ids = [str(i) for i in range(MAX_CANDIDATES + 1)]
    with pytest.raises(RequestError, match=f"at most {MAX_CANDIDATES}"):
        parse_request(json.dumps({"user_id": "1", "candidates": ids}))
    assert len(parse_request(json.dumps({"user_id": "1", "candidates": ids[:-1]})).candidates) == MAX_CANDIDATES


def test_check_known_refuses_unknown_ids_and_unknown_users_without_history():
    items, users = {"1", "2"}.__contains__, {"u"}.__contains__
    check_known(parse_request(b'{"user_id": "u", "candidates": ["1", {"id": "9", "title": "Cold"}]}'), items, users)
    check_known(parse_request(b'{"user_id": "new", "history": ["2"], "candidates": ["1"]}'), items, users)
    with pytest.raises(RequestError, match="unknown item id '9': not in the catalog"):
        check_known(parse_request(b'{"user_id": "u", "candidates": ["9"]}'), items, users)
    with pytest.raises(RequestError, match="unknown item id '9' in history"):
        check_known(parse_request(b'{"user_id": "u", "history": ["9"], "candidates": ["1"]}'), items, users)
    with pytest.raises(RequestError, match="has no history in the cache"):
        check_known(parse_request(b'{"user_id": "new", "candidates": ["1"]}'), items, users)


def test_response_keeps_top_k_and_round_trips_through_json():
    req = parse_request(b'{"user_id": "u", "candidates": ["a", "b", "c"], "top_k": 2}')
    stats = CacheStats(user_hit=True, item_hits=2, item_misses=1, recomputed_tokens=10, prompt_tokens=90)
    resp = make_response(req, [2, 0, 1], [0.2, 0.1, 0.7], 12.34567, 1, stats)
    assert resp.ranking == [("c", 0.7), ("a", 0.2)]
    data = json.loads(json.dumps(resp.to_dict()))
    assert set(data) == {"ranking", "ttft_ms", "node", "cache", "text"}
    assert data["ranking"][0] == {"item_id": "c", "score": 0.7}
    assert RecommendResponse.from_dict(data) == resp


# ---------------------------------------------------------------------------------------------
# cost model, routing, replication: plain functions


def costs(**kw) -> CostModel:
    return CostModel(bytes_per_token=kw.pop("bytes_per_token", 1000), **kw)


def test_cost_model_picks_the_cheaper_of_fetch_and_recompute_and_learns_from_measurements():
    c = costs(rtt_ms=1.0, bytes_per_ms=1e5, compute_ms_per_token=0.5)
    assert c.fetch_ms(100) == pytest.approx(1.0 + 100 * 1000 / 1e5)  # 2 ms
    assert c.recompute_ms(100) == pytest.approx(50.0)
    assert c.should_fetch(100) and c.miss_ms(100) == pytest.approx(2.0)
    assert c.miss_ms(100, can_fetch=False) == pytest.approx(50.0)
    for _ in range(50):  # the network turns out to be slow: 300 ms to the first byte
        c.observe_fetch(100_000, first_byte_ms=300.0, body_ms=1.0)
    assert not c.should_fetch(100)
    for _ in range(50):
        c.observe_compute(100, 1.0)
    assert c.compute_ms_per_token == pytest.approx(0.01, rel=0.01)


# items 0-3 on node 0, 4-7 on node 1, 8-11 on node 2; 10 tokens each
OWNER = [0] * 4 + [1] * 4 + [2] * 4
TOKENS = [10] * 12


def views(**per_node) -> list[NodeView]:
    out = []
    for k in range(3):
        fields = per_node.get(f"n{k}", {})
        out.append(NodeView(k, fields.pop("costs", costs(compute_ms_per_token=1.0, bytes_per_ms=1e3)), **fields))
    return out


def test_affinity_routes_to_the_node_holding_most_of_the_requests_blocks():
    router = Router("affinity", OWNER, TOKENS, range(3))
    query = RouteQuery("u", rows=[4, 5, 6, 0])
    assert router.order(query, views(), turn=0)[0] == 1
    # each lacking block costs min(fetch 1 + 10*1000/1e3 = 11 ms, recompute 10 ms) = 10 ms
    assert estimate_ttft_ms(query, views()[1], OWNER, TOKENS, {0, 1, 2}) == pytest.approx(10.0)
    assert estimate_ttft_ms(query, views()[2], OWNER, TOKENS, {0, 1, 2}) == pytest.approx(40.0)


def test_affinity_trades_cached_blocks_against_queue_delay():
    router = Router("affinity", OWNER, TOKENS, range(3))
    query = RouteQuery("u", rows=[4, 5, 6, 0])
    # node 1 lacks 1 block (10 ms), node 0 lacks 3 (30 ms): a 20 ms queue on node 1 is still worth it...
    assert router.order(query, views(n1={"queue_depth": 1, "service_ms": 19.0}), 0)[0] == 1
    # ... a 50 ms queue is not
    assert router.order(query, views(n1={"queue_depth": 5, "service_ms": 10.0}), 0)[0] == 0


def test_affinity_counts_replicas_and_the_history_block():
    router = Router("affinity", OWNER, TOKENS, range(3))
    query = RouteQuery("u", rows=[4, 5, 8, 9])
    tie = router.order(query, views(), turn=0)
    assert set(tie[:2]) == {1, 2}
    assert router.order(query, views(n2={"held": {4}}), 0)[0] == 2  # holds a replica of item 4
    history_on_1 = RouteQuery("u", rows=[4, 5, 8, 9], history_tokens=30, history_nodes={1})
    assert router.order(history_on_1, views(), 0)[0] == 1


def test_no_strategy_routes_to_a_down_node_and_blocks_of_a_down_owner_cost_a_recompute():
    query = RouteQuery("u", rows=[4, 5, 6, 7])
    for strategy in ("affinity", "round-robin", "user-hash"):
        router = Router(strategy, OWNER, TOKENS, range(3))
        for turn in range(6):
            order = router.order(query, views(n1={"up": False}), turn)
            assert 1 not in order and sorted(order) == [0, 2]
    slow_fetch = costs(compute_ms_per_token=1.0, bytes_per_ms=1e6, rtt_ms=1.0)  # fetch 1 ms, recompute 10 ms
    view = NodeView(0, slow_fetch)
    assert estimate_ttft_ms(query, view, OWNER, TOKENS, up={0, 1, 2}) == pytest.approx(4 * 1.01)
    assert estimate_ttft_ms(query, view, OWNER, TOKENS, up={0, 2}) == pytest.approx(4 * 10.0)


def test_round_robin_rotates_and_ties_spread_across_nodes():
    rr = Router("round-robin", OWNER, TOKENS, range(3))
    assert [rr.order(RouteQuery("u", []), views(), t)[0] for t in range(6)] == [0, 1, 2, 0, 1, 2]
    affinity = Router("affinity", OWNER, TOKENS, range(3))
    cold = RouteQuery("u", rows=[])  # only cold items: every node costs the same
    assert {affinity.order(cold, views(), t)[0] for t in range(3)} == {0, 1, 2}


def test_user_hash_keeps_users_on_their_node_and_moves_only_a_down_nodes_users():
    ring = HashRing(range(3))
    users = [f"user-{i}" for i in range(600)]
    home = {u: ring.order(u, {0, 1, 2})[0] for u in users}
    assert all(ring.order(u, {0, 1, 2})[0] == home[u] for u in users)  # stable
    assert min(list(home.values()).count(k) for k in range(3)) > 100  # spread
    moved = {u: ring.order(u, {0, 2})[0] for u in users}
    assert all(moved[u] == home[u] for u in users if home[u] != 1)
    assert all(moved[u] in (0, 2) for u in users)


def test_hot_items_are_replicated_within_budget_to_nodes_that_keep_missing_them_and_cold_ones_age_out():
    hot = HotItems(threshold=3.0, decay=0.5)
    v = views()
    hot.add(0, {4: 5, 8: 4, 9: 1, 1: 9})  # item 1 is node 0's own: never replicated to it
    plan = hot.plan(v, OWNER, TOKENS, budget={0: 10_000 * 2})  # room for 2 blocks of 10 tokens x 1000 bytes
    assert [(p.node, p.source, p.rows) for p in plan] == [(0, 1, (4,)), (0, 2, (8,))]
    assert plan[0].nbytes == 10_000
    assert hot.plan(v, OWNER, TOKENS, budget={0: 10**9}) == []  # planned items left the scores
    hot.add(2, {0: 2})
    hot.age()
    hot.add(2, {0: 1})  # 2 * 0.5 + 1 = 2 < 3: not hot
    assert hot.plan(v, OWNER, TOKENS, budget={2: 10**9}) == []
    hot.add(2, {0: 2})
    assert [p.rows for p in hot.plan(v, OWNER, TOKENS, budget={2: 10**9})] == [(0,)]
    assert [p.rows for p in hot.plan(views(n2={"held": {0}}), OWNER, TOKENS, budget={2: 10**9})] == []
    hot.add(1, {9: 3})
    for _ in range(10):
        hot.age()
    assert 9 not in hot.scores[1]  # forgotten once it stops missing


def test_coordinator_prices_a_new_history_block_except_where_it_was_computed():
    directory = ItemDirectory.from_arrays([str(i) for i in range(12)], [f"k{i}" for i in range(12)], OWNER, TOKENS, 3)
    coord = Coordinator(directory, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], bytes_per_token=1000,
                        histories={"known": ["1", "2", "3"]}, history_len=2)
    known = parse_request({"user_id": "known", "candidates": ["4", {"id": "new", "title": "Cold"}]})
    query, history = coord.query(known)
    assert (query.rows, query.history_nodes, history) == ([4], None, None)  # the cache holds it on every node
    same = parse_request({"user_id": "known", "history": ["0", "2", "3"], "candidates": ["4"]})
    assert coord.query(same)[0].history_nodes is None  # the same 2 most recent items: the cached block
    fresh = parse_request({"user_id": "known", "history": ["5", "6"], "candidates": ["4"]})
    query, history = coord.query(fresh)
    assert (query.history_tokens, query.history_nodes, history) == (20, set(), ("5", "6"))
    coord._answered(coord.links[2], json.dumps({"cache": {"user_hit": False}, "ttft_ms": 1.0}).encode(), history, 0.0)
    assert coord.query(fresh)[0].history_nodes == {2}


def test_metrics_render_prometheus_text():
    m = Registry()
    m.counter("x_total", "things", ("kind",)).inc(kind="a")
    m.gauge("depth", "queue", read=lambda: {(): 3})
    h = m.histogram("lat_ms", "latency", buckets=(1, 10))
    for v in (0.5, 5, 50):
        h.observe(v)
    text = m.render()
    assert "# TYPE x_total counter" in text and "# TYPE lat_ms histogram" in text
    values = parse_text(text)
    assert values['x_total{kind="a"}'] == 1 and values["depth"] == 3
    assert values['lat_ms_bucket{le="1"}'] == 1 and values['lat_ms_bucket{le="10"}'] == 2
    assert values['lat_ms_bucket{le="+Inf"}'] == 3 and values["lat_ms_count"] == 3 and values["lat_ms_sum"] == 55.5


# ---------------------------------------------------------------------------------------------
# the coordinator in this process, in front of nodes the test scripts


async def until(condition, what: str, guard_s: float = 60.0) -> None:
    """Wait for ``condition()`` (polled on the event loop); ``guard_s`` only stops a hang."""

    async def poll():
        while not condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), guard_s)
    except asyncio.TimeoutError:
        pytest.fail(f"never happened: {what}")


class ScriptedNode:
    """A node that answers ``GET /v1/state`` and ``POST /v1/recommend`` as its script says and
    counts the calls. A script holds one behaviour per call, its last one repeating:
    "ok"; "hang" (hold the call until ``release`` is set); "drop" (close the connection with the
    request in flight, as a dying node does); "busy" (503 with Retry-After ``retry_after``)."""

    def __init__(self, node: int, state=("ok",), recommend=("ok",), retry_after: int = 1):
        self.node, self.scripts, self.retry_after = node, {"state": state, "recommend": recommend}, retry_after
        self.calls = {"state": 0, "recommend": 0}
        self.release = asyncio.Event()

    def _next(self, kind: str) -> str:
        script = self.scripts[kind]
        self.calls[kind] += 1
        return script[min(self.calls[kind], len(script)) - 1]

    async def state(self, request: web.Request) -> web.Response:
        if self._next("state") == "hang":
            await self.release.wait()
        return web.json_response({"node": self.node, "queue_depth": 0, "service_ms": 1.0})

    async def recommend(self, request: web.Request) -> web.Response:
        req = parse_request(await request.read())
        what = self._next("recommend")
        if what == "hang":
            await self.release.wait()
        if what == "drop":
            request.transport.close()
            return web.Response()
        if what == "busy":
            return json_error(503, f"node {self.node} is busy", headers={"Retry-After": str(self.retry_after)})
        stats = CacheStats(user_hit=None, item_hits=0, item_misses=len(req.candidates), recomputed_tokens=1, prompt_tokens=1)
        n = len(req.candidates)
        return web.json_response(make_response(req, list(range(n)), [1.0 / n] * n, 1.0, self.node, stats).to_dict())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/state", self.state)
        app.router.add_post("/v1/recommend", self.recommend)
        return app


class LogRecords(logging.Handler):
    """The serving log's records while in a ``with`` block (the logger may not propagate:
    ``setup_logging`` turns that off)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "LogRecords":
        logging.getLogger("rcllm.serve").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("rcllm.serve").removeHandler(self)

    def tracebacks(self, message: str) -> int:
        """How many records carry the traceback of an exception with this message."""
        return sum(1 for r in self.records if r.exc_info and str(r.exc_info[1]) == message)


async def with_coordinator(nodes: list[ScriptedNode], body, **options):
    """Start the scripted nodes and a Coordinator (round-robin: node 0 is tried first) in this
    process; wait until it sees them up; run ``body(coordinator, url)``; stop everything."""
    directory = ItemDirectory.from_arrays([str(i) for i in range(6)], [f"k{i}" for i in range(6)], [0, 0, 0, 1, 1, 1],
                                          [10] * 6, 2)
    servers = [TestServer(n.app(), host="127.0.0.1") for n in nodes]
    for server in servers:
        await server.start_server()
    coord = Coordinator(directory, [f"127.0.0.1:{s.port}" for s in servers], bytes_per_token=1000,
                        strategy="round-robin", replicate_every=3600.0, **options)
    try:
        async with TestServer(coord.app(), host="127.0.0.1") as front:
            await until(lambda: all(link.view.up for link in coord.links), "every scripted node up")
            return await body(coord, str(front.make_url("")))
    finally:
        for n in nodes:
            n.release.set()
        for server in servers:
            await server.close()


REQUEST = {"user_id": "u", "history": ["0"], "candidates": ["1", "4"]}


def retries(coord: Coordinator) -> dict[str, float]:
    values = parse_text(coord.metrics.render())
    return {reason: values.get(f'rcllm_retries_total{{reason="{reason}"}}', 0.0)
            for reason in ("node failed", "node busy", "node error")}


@pytest.mark.parametrize("failure", ["drop", "hang"], ids=["dies-mid-request", "hangs"])
def test_a_request_a_node_drops_or_hangs_on_is_retried_on_the_next_node(failure, monkeypatch):
    """Node 0 receives the request and dies with it in flight (the connection closes) or never
    answers (the request timeout fires): the client gets node 1's answer, one retry is counted,
    and node 0 stays up, its polls answering (only a refused connection or two failed polls
    mark a node down)."""
    from rcllm.serve import coordinator

    monkeypatch.setattr(coordinator, "REQUEST_TIMEOUT", aiohttp.ClientTimeout(total=1.0, sock_connect=1.0))
    nodes = [ScriptedNode(0, recommend=(failure, "ok")), ScriptedNode(1)]

    async def body(coord, url):
        async with RecommendClient(url) as client:
            return await client.recommend(REQUEST), retries(coord), [link.view.up for link in coord.links]

    answer, counted, up = asyncio.run(with_coordinator(nodes, body))
    assert [n.calls["recommend"] for n in nodes] == [1, 1]  # node 0 had it in flight
    assert answer.node == 1 and [i for i, _ in answer.ranking] == ["1", "4"]
    assert counted == {"node failed": 1.0, "node busy": 0.0, "node error": 0.0}
    assert up == [True, True]


def test_two_failed_polls_in_a_row_mark_a_hung_node_down_and_one_does_not():
    """Node 0 stops answering its polls after the first; node 1 hangs on its second poll only."""
    nodes = [ScriptedNode(0, state=("ok", "hang")), ScriptedNode(1, state=("ok", "hang", "ok"))]
    marked = []

    async def body(coord, url):
        mark = coord._mark

        def record(link, up, reason):
            if link.view.up != up:
                marked.append((link.node, up, link.failed_polls))
            mark(link, up, reason)

        coord._mark = record
        await until(lambda: not coord.links[0].view.up or nodes[0].calls["state"] > 6, "node 0 marked down")
        await until(lambda: nodes[1].calls["state"] >= 4, "node 1 polled after its hung poll")
        return [(link.view.up, link.reason, link.failed_polls) for link in coord.links]

    links = asyncio.run(with_coordinator(nodes, body, poll_every=0.05, poll_timeout=0.5))
    assert marked == [(0, False, 2)]  # down at its second failed poll, never node 1
    assert links[0][0] is False and "poll failed" in links[0][1] and "Timeout" in links[0][1]
    assert links[1] == (True, "answering", 0)


def test_when_every_node_is_busy_the_coordinator_answers_503_with_the_shortest_retry_after():
    nodes = [ScriptedNode(0, recommend=("busy",), retry_after=7), ScriptedNode(1, recommend=("busy",), retry_after=3)]

    async def body(coord, url):
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/recommend", data=json.dumps(REQUEST)) as resp:
                return resp.status, resp.headers, json.loads(await resp.read()), retries(coord)

    status, headers, payload, counted = asyncio.run(with_coordinator(nodes, body))
    assert status == 503 and headers["Content-Type"].startswith("application/json")
    assert headers["Retry-After"] == "3" and "every node is busy (2 tried)" in payload["error"]
    assert [n.calls["recommend"] for n in nodes] == [1, 1]
    assert counted == {"node failed": 0.0, "node busy": 2.0, "node error": 0.0}


def test_an_internal_error_in_the_coordinator_answers_500_and_the_next_request_is_answered(monkeypatch):
    """A ValueError of the coordinator's own (its routing, standing in for a bug) is a 500 with
    the traceback logged, not the 400 of a refused request; the next request is routed as usual."""
    nodes = [ScriptedNode(0), ScriptedNode(1)]
    logged = LogRecords()

    async def body(coord, url):
        query = coord.query
        calls = []

        def broken(request):
            calls.append(request)
            if len(calls) == 1:
                raise ValueError("a bug of ours")
            return query(request)

        coord.query = broken
        first = await raw(url, "POST", "/v1/recommend", json.dumps(REQUEST).encode())
        refused = await raw(url, "POST", "/v1/recommend", b'{"user_id": "u", "candidates": []}')
        second = await raw(url, "POST", "/v1/recommend", json.dumps(REQUEST).encode())
        return first, refused, second

    with logged:
        first, refused, second = asyncio.run(with_coordinator(nodes, body))
    status, content_type, payload = first
    assert status == 500 and content_type.startswith("application/json")
    assert json.loads(payload)["error"] == "internal error: ValueError: a bug of ours"
    assert logged.tracebacks("a bug of ours") == 1
    assert refused[0] == 400 and "candidates is empty" in json.loads(refused[2])["error"]
    assert second[0] == 200 and [r["item_id"] for r in json.loads(second[2])["ranking"]] == ["1", "4"]


def test_cli_refuses_a_missing_cache_with_a_message(tmp_path):
    app = typer.Typer()
    register(app)
    for args in (["serve", "--node", "0"], ["coordinator"]):
        result = CliRunner().invoke(app, [*args, "--cache", str(tmp_path / "nowhere")])
        assert result.exit_code == 2
        assert "no rcllm cache" in result.output and "build-cache" in result.output


# ---------------------------------------------------------------------------------------------
# a real cluster


class Cluster(LocalCluster):
    """The test's cluster: 3 nodes and a coordinator (rcllm.serve.cluster), node ports from the manifest."""

    def __init__(self, cache: Path, logs: Path, coordinator_port: int):
        super().__init__(
            cache, logs, nodes=3, node_ports=[n["port"] for n in Manifest.load(cache).nodes],
            coordinator_port=coordinator_port, token=TOKEN, env={"OMP_NUM_THREADS": "1"},
            node_args=("--threads", "1", "--max-queue", str(MAX_QUEUE), "--hot-mb", "0.5", "--policy", DEFAULT_POLICY),
            coordinator_args=("--replicate-every", "1.0"),
        )


async def cluster_report(url: str) -> dict:
    async with RecommendClient(url) as client:
        return await client.get_json("/v1/cluster")


def wait_until(cluster: Cluster, condition, what: str, timeout: float = 120.0) -> dict:
    try:
        return cluster.wait_until(condition, what, timeout)
    except ClusterError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-data")
    dataset = make_synthetic(n_items=120, n_users=30, seed=0)
    written = prepare(dataset, folder)
    return SimpleNamespace(catalog=written["catalog.jsonl"], users=written["histories.jsonl"],
                           interactions=written["interactions.jsonl"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data, tiny_models) -> Path:
    """A 3-node cache of the tiny llama, nodes on free loopback ports."""
    out = tmp_path_factory.mktemp("serve-cache") / "cache"
    options = BuildOptions(out=out, nodes=3, model=str(tiny_models["llama"]), users=data.users,
                           interactions=data.interactions, history=HISTORY)
    build_cache(data.catalog, options)
    manifest = Manifest.load(out)
    manifest.nodes = [{"node": k, "host": "127.0.0.1", "port": free_port()} for k in range(3)]
    manifest.save(out)
    return out


@pytest.fixture(scope="module")
def engine(cache):
    """The in-process engine every answer is compared with: same model and template, blocks
    computed on first use (no cache files)."""
    data = NodeData.load(cache)
    ranker = open_cache_ranker(data.manifest)
    return SimpleNamespace(ranker=ranker, source=MemoryBlockCache(ranker.engine, ranker.builder), data=data)


def expected_ranking(engine, req: RecommendRequest) -> list[tuple[str, float]]:
    catalog, histories = engine.data.catalog, engine.data.histories
    history = req.history if req.history is not None else histories[req.user_id]
    texts = [item_text(c.item if c.item is not None else catalog[c.id]) for c in req.candidates]
    ranking = engine.ranker.rank([item_text(catalog[i]) for i in history[-HISTORY:]], texts,
                                 req.policy or DEFAULT_POLICY, source=engine.source)
    order = ranking.order[: req.top_k] if req.top_k else ranking.order
    return [(req.candidates[i].id, ranking.scores[i]) for i in order]


def make_stream(cache: Path, n: int, seed: int) -> list[RecommendRequest]:
    """Known users without history, users with a history of their own, cold inline items,
    every policy, sometimes top_k: 8 candidates each."""
    data = NodeData.load(cache)
    rng = random.Random(seed)
    users, items = sorted(data.histories), sorted(data.catalog)
    stream = []
    for i in range(n):
        user = rng.choice(users)
        mode = rng.random()
        history = None if mode < 0.6 else data.histories[user][-rng.randint(1, 8):] if mode < 0.85 else rng.sample(items, 3)
        candidates = rng.sample(items, 8)
        if rng.random() < 0.1:
            k = rng.randrange(4)
            candidates[0] = {"id": f"cold-{i}", "title": f"The Unreleased Picture {k}", "categories": ["Romance"]}
        body = {"user_id": user, "candidates": candidates, "history": history,
                "policy": rng.choice([None, None, "none", "full", "boundary:4"]), "top_k": rng.choice([None, None, 5])}
        stream.append(parse_request({k: v for k, v in body.items() if v is not None}))
    return stream


@pytest.fixture(scope="module")
def stream(cache, engine):
    """320 requests and the in-process engine's answer to each (computed before any server starts)."""
    requests = make_stream(cache, 320, seed=1)
    return [(req, expected_ranking(engine, req)) for req in requests]


@pytest.fixture(scope="module")
def cluster(cache, stream, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    c = Cluster(cache, logs, free_port())
    try:
        for k in range(3):
            c.start_node(k)
        c.start_coordinator()
        wait_until(c, lambda r: r["up"] == 3, "3 nodes up")
        yield c
    finally:
        c.stop()
        print(f"\nserver logs in {logs}")


def assert_same_ranking(got: RecommendResponse, want: list[tuple[str, float]], what: str) -> None:
    assert [i for i, _ in got.ranking] == [i for i, _ in want], what
    for (_, a), (_, b) in zip(got.ranking, want):
        assert a == pytest.approx(b, abs=1e-5), what


async def send_stream(url: str, requests, concurrency: int, on_done=None) -> list:
    """Each request once, ``concurrency`` at a time; returns responses (or exceptions) in order."""
    return [answer for answer, _ in await send_all(url, requests, concurrency, timeout_s=60, on_done=on_done)]


@pytest.mark.slow
def test_cluster_answers_like_the_in_process_engine_through_a_killed_and_restarted_node(cluster, stream, engine):
    killed = []

    def kill_node_1(done: int) -> None:
        if done == 100 and not killed:
            cluster.signal("node1", signal.SIGKILL)
            killed.append(time.monotonic())

    requests = [req for req, _ in stream]
    started = time.monotonic()
    results = asyncio.run(send_stream(cluster.url, requests, concurrency=8, on_done=kill_node_1))
    seconds = time.monotonic() - started
    failed = [(i, r) for i, r in enumerate(results) if not isinstance(r, RecommendResponse)]
    assert not failed, f"{len(failed)} requests failed, e.g. {failed[:3]}"
    assert killed and cluster.procs["node1"].wait(timeout=10) == -signal.SIGKILL
    for (req, want), got in zip(stream, results):
        assert_same_ranking(got, want, f"request {req.to_dict()} answered by node {got.node}")
        assert got.cache.item_hits + got.cache.item_misses == len(req.candidates)
        assert got.cache.prompt_tokens > 0 and got.ttft_ms > 0
    answered_by = [r.node for r in results]
    print(f"\n{len(results)} requests in {seconds:.1f} s; answered per node {[answered_by.count(k) for k in range(3)]}; "
          f"node 1 answered {answered_by[150:].count(1)} of the 170 sent after its kill")
    assert {0, 1, 2} <= set(answered_by[:100])
    # Whether node 1 held a request at the instant of the kill (then the coordinator retried it
    # elsewhere: counted as "node failed") or a poll marked it down first (no retry needed) is
    # timing; either way no request was lost (asserted above). The retry itself is checked
    # deterministically by test_a_request_a_node_drops_or_hangs_on_is_retried_on_the_next_node.
    metrics = parse_text(asyncio.run(raw(cluster.url, "GET", "/metrics"))[2].decode())
    retried = metrics.get('rcllm_retries_total{reason="node failed"}', 0)
    print(f"requests retried after node 1's kill: {retried:g}")

    report = wait_until(cluster, lambda r: not r["nodes"][1]["up"], "node 1 reported down", timeout=10)
    assert report["up"] == 2
    cluster.start_node(1)
    report = wait_until(cluster, lambda r: r["up"] == 3, "node 1 back up")
    assert report["nodes"][1]["up"]

    # the cluster serves again, with the same answers; 30 candidates are ranked as a tournament
    tournament = parse_request({"user_id": stream[0][0].user_id, "candidates": sorted(engine.data.catalog)[:30]})
    again = stream[:30] + [(tournament, expected_ranking(engine, tournament))]
    results = asyncio.run(send_stream(cluster.url, [req for req, _ in again], concurrency=4))
    for (req, want), got in zip(again, results):
        assert isinstance(got, RecommendResponse), got
        assert_same_ranking(got, want, f"after restart: {req.to_dict()}")
    assert len(results[-1].ranking) == 30

    async def direct():
        async with RecommendClient(cluster.node_url(1), token=TOKEN) as client:
            return await client.recommend(stream[0][0])

    assert_same_ranking(asyncio.run(direct()), stream[0][1], "node 1 directly after restart")
    report = asyncio.run(cluster_report(cluster.url))
    print(json.dumps({"hit_ratio": [n["hit_ratio"] for n in report["nodes"]], "replication": report["replication"]["events"]}))


@pytest.mark.slow
def test_32_concurrent_clients_are_answered_without_errors(cluster, stream):
    """Load through the coordinator: every request is answered, or refused with a well-formed 503
    if every node is full (that refusal itself is forced and checked by
    test_a_node_refuses_requests_beyond_max_queue_with_503_and_retry_after_and_admits_again_when_drained
    and test_when_every_node_is_busy_the_coordinator_answers_503_with_the_shortest_retry_after)."""
    requests = [req for req, _ in stream]
    latencies, busy, errors = [], [], []

    async def client_loop(client, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        for _ in range(200):  # bounded in count as well as time
            if time.monotonic() >= deadline:
                return
            t = time.perf_counter()
            try:
                await client.recommend(rng.choice(requests))
                latencies.append((time.perf_counter() - t) * 1000.0)
            except ServiceError as e:
                (busy if e.status == 503 and e.retry_after and e.message else errors).append(e)
                await asyncio.sleep(rng.uniform(0.05, 0.1))  # a polite client backs off (less than Retry-After: the test is short)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                errors.append(e)

    async def run() -> None:
        async with RecommendClient(cluster.url, timeout_s=60) as client:
            deadline = time.monotonic() + 5.0
            await asyncio.gather(*(client_loop(client, seed, deadline) for seed in range(32)))

    started = time.monotonic()
    asyncio.run(run())
    seconds = time.monotonic() - started
    assert not errors, errors[:5]
    assert latencies
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    print(f"\n32 clients, {seconds:.1f} s: {len(latencies)} answered ({len(latencies) / seconds:.0f}/s), "
          f"{len(busy)} well-formed 503s; latency p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    wait_until(cluster, lambda r: r["up"] == 3, "all nodes up after the load", timeout=20)


async def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url + path, data=body, headers=headers or {}) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


@pytest.mark.slow
def test_bad_requests_get_a_json_4xx_with_a_message_and_the_servers_stay_up(cluster, cache):
    directory = ItemDirectory.load(cache)
    foreign = next(key for key, owner in zip(directory.keys, directory.owner) if owner != 0)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    good = b'{"user_id": "u1", "candidates": ["1", "2", "3"]}'
    cases = [  # (server, method, path, body, headers, status, words in the message)
        ("coordinator", "POST", "/v1/recommend", b'{"user_id": "u1", "candidates": [', {}, 400, "malformed JSON"),
        ("coordinator", "POST", "/v1/recommend", b'{"user_id": "u1", "candidates": ["1"], "x": 1}', {}, 400, "unknown fields"),
        ("coordinator", "POST", "/v1/recommend", b'{"user_id": "u1", "candidates": ["no-such-item"]}', {}, 400, "not in the catalog"),
        ("coordinator", "POST", "/v1/recommend", b'{"user_id": "u1", "candidates": []}', {}, 400, "candidates is empty"),
        ("coordinator", "POST", "/v1/recommend", b'{"user_id": "nobody", "candidates": ["1"]}', {}, 400, "no history"),
        ("coordinator", "POST", "/v1/recommend", b'{"user_id": "u1", "candidates": ["1"], "policy": "x"}', {}, 400, "policy"),
        ("coordinator", "POST", "/v1/recommend", b" " * (MAX_BODY_BYTES + 1), {}, 413, "body size"),
        ("coordinator", "GET", "/v1/nothing", None, {}, 404, "Not Found"),
        ("node", "POST", "/v1/recommend", good, {}, 401, "bearer token"),
        ("node", "POST", "/v1/recommend", good, {"Authorization": "Bearer wrong"}, 401, "bearer token"),
        ("node", "GET", "/v1/state", None, {"Authorization": "Bearer wrong"}, 401, "bearer token"),
        ("node", "POST", "/v1/recommend", b"{nope", auth, 400, "malformed JSON"),
        ("node", "POST", "/v1/recommend", b'{"user_id": "u1", "candidates": ["no-such-item"]}', auth, 400, "not in the catalog"),
        ("node", "POST", "/v1/recommend", b'{"user_id": "u1", "candidates": []}', auth, 400, "candidates is empty"),
        ("node", "POST", "/v1/recommend", b"x" * (MAX_BODY_BYTES + 1), auth, 413, "body size"),
        ("node", "GET", "/v1/blocks/" + foreign, None, auth, 404, "not in node 0's index"),
        ("node", "GET", "/v1/blocks/..%2F..%2Fetc", None, auth, 404, "index"),
        ("node", "POST", "/v1/replicate", b'{"keys": "k", "from": 1}', auth, 400, "keys must be a list"),
        ("node", "POST", "/v1/replicate", b'{"keys": [], "from": 0}', auth, 400, "another node"),
    ]
    urls = {"coordinator": cluster.url, "node": cluster.node_url(0)}
    for server, method, path, body, headers, status, words in cases:
        got, content_type, payload = asyncio.run(raw(urls[server], method, path, body, headers))
        what = f"{server} {method} {path} {body[:60] if body else ''!r}"
        assert got == status, f"{what}: {got} {payload[:300]!r}"
        assert content_type.startswith("application/json"), what
        message = json.loads(payload)["error"]
        assert words in message, f"{what}: {message}"
    cluster.check_alive()
    for k in range(3):
        status, _, payload = asyncio.run(raw(cluster.node_url(k), "GET", "/health"))
        assert status == 200 and json.loads(payload)["status"] == "ok"
    status, _, payload = asyncio.run(raw(cluster.url, "POST", "/v1/recommend", good))
    assert status == 200 and len(json.loads(payload)["ranking"]) == 3


@pytest.mark.slow
def test_metrics_state_and_replication_endpoints(cluster, cache):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, content_type, payload = asyncio.run(raw(cluster.node_url(0), "GET", "/metrics", None, auth))
    assert status == 200 and content_type.startswith("text/plain")
    text = payload.decode()
    values = parse_text(text)
    assert values["rcllm_ttft_ms_count"] > 0
    assert any(name.startswith("rcllm_item_hit_ratio{tier=") for name in values)
    assert "rcllm_queue_depth" in values and "# TYPE rcllm_replication_events_total counter" in text
    _, _, payload = asyncio.run(raw(cluster.url, "GET", "/metrics"))
    values = parse_text(payload.decode())
    assert values["rcllm_routing_decision_ms_count"] > 0
    assert {f'rcllm_node_up{{node="{k}"}}' for k in range(3)} <= set(values)
    assert any(name.startswith("rcllm_hit_ratio{") for name in values)

    # replicate node 2's first blocks into node 0's hot tier; the cluster's own replication (every
    # second) admits blocks too and may age one of these out of the LRU between the two calls, so
    # the pair is tried up to three times: a replicate call that admits nothing fails all three
    directory = ItemDirectory.load(cache)
    rows = [r for r, owner in enumerate(directory.owner) if owner == 2][:3]
    body = json.dumps({"keys": [directory.keys[r] for r in rows], "from": 2}).encode()
    for _ in range(3):
        status, _, payload = asyncio.run(raw(cluster.node_url(0), "POST", "/v1/replicate", body, auth))
        assert status == 200, payload
        result = json.loads(payload)
        assert result["replicated"] + result["skipped"] == 3
        _, _, payload = asyncio.run(raw(cluster.node_url(0), "GET", "/v1/state", None, auth))
        state = json.loads(payload)
        if {directory.ids[r] for r in rows} <= set(state["replicas"]):
            break
    assert {directory.ids[r] for r in rows} <= set(state["replicas"]), state["replicas"]
    assert {"queue_depth", "service_ms", "hot", "misses", "costs"} <= set(state)

    report = asyncio.run(cluster_report(cluster.url))
    assert report["routing"] == "affinity" and report["items"] == len(directory)
    assert report["placement"]["n_nodes"] == 3 and len(report["nodes"]) == 3
    assert all(n["hit_ratio"]["item"] is not None for n in report["nodes"])


@pytest.mark.slow
def test_a_node_fetches_blocks_it_lacks_from_their_peer_and_recomputes_those_of_a_dead_peer(cluster, cache, engine):
    """Node 0 in this process (its app on a test server), its peers: the cluster's node 2, and a
    node 1 at an address where nothing listens."""
    directory = ItemDirectory.load(cache)
    on_2 = [directory.ids[r] for r, owner in enumerate(directory.owner) if owner == 2][:4]
    on_1 = [directory.ids[r] for r, owner in enumerate(directory.owner) if owner == 1][:4]
    req = parse_request({"user_id": sorted(engine.data.histories)[0], "candidates": on_2 + on_1})
    runner = NodeRunner.open(cache, 0, hot_bytes=1 << 20)
    runner.costs.compute_ms_per_token = 1e3  # recomputing looks dear: fetch whatever a live peer holds
    server = NodeServer(runner, {1: f"http://127.0.0.1:{free_port()}", 2: cluster.node_url(2)}, token=TOKEN)

    async def run():
        async with TestServer(server.app(), host="127.0.0.1") as test_server:
            async with RecommendClient(str(test_server.make_url("")), token=TOKEN) as client:
                return await client.recommend(req), await client.get_json("/v1/state")

    response, state = asyncio.run(run())
    assert_same_ranking(response, expected_ranking(engine, req), "fetched and recomputed blocks")
    assert (response.cache.item_hits, response.cache.item_misses) == (0, 8)
    assert state["tiers"] == {"peer": 4, "computed": 4}
    assert sorted(state["misses"]) == sorted(on_2 + on_1)
    assert state["costs"]["rtt_ms"] != 1.0  # measured on the fetches


def test_a_node_refuses_requests_beyond_max_queue_with_503_and_retry_after_and_admits_again_when_drained(cache, stream):
    """The engine thread is held (a call the test releases), so the first max_queue requests wait
    on it; the next one is refused at once with a JSON 503 and Retry-After, and once the queue
    drains the node admits it."""
    import threading

    max_queue = 3
    picked = [req for req, _ in stream if req.max_new_tokens == 0][: max_queue + 1]
    runner = NodeRunner.open(cache, 0, hot_bytes=1 << 20)
    server = NodeServer(runner, {}, token=TOKEN, max_queue=max_queue)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    gate = threading.Event()

    async def post(url: str, req: RecommendRequest):
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/recommend", data=req.to_json(), headers=auth) as resp:
                return resp.status, resp.headers, await resp.read()

    async def run():
        async with TestServer(server.app(), host="127.0.0.1") as test_server:
            url = str(test_server.make_url(""))
            held = server.batcher.call(gate.wait, 120)  # 120 s only guards against a hang: the test opens the gate
            waiting = [asyncio.ensure_future(post(url, req)) for req in picked[:max_queue]]
            await until(lambda: server.pending == max_queue, f"{max_queue} requests queued")
            extra = asyncio.ensure_future(post(url, picked[-1]))
            await until(lambda: extra.done() or server.pending > max_queue, "the extra request refused or admitted")
            admitted_beyond = server.pending > max_queue
            answered_early = [f.done() for f in waiting]
            gate.set()
            assert await asyncio.to_thread(held.result, 120) is True
            return admitted_beyond, answered_early, await extra, await asyncio.gather(*waiting), await post(url, picked[-1])

    try:
        admitted_beyond, answered_early, refused, answers, again = asyncio.run(run())
    finally:
        server.batcher.shutdown()
        runner.close()
    assert not admitted_beyond, "a request was admitted beyond max_queue"
    assert answered_early == [False] * max_queue  # they were waiting on the held engine
    status, headers, payload = refused
    assert status == 503 and headers["Content-Type"].startswith("application/json")
    assert int(headers["Retry-After"]) >= 1
    assert f"node 0 is busy: {max_queue} requests queued (max {max_queue})" in json.loads(payload)["error"]
    for status, _, payload in [*answers, again]:
        assert status == 200 and RecommendResponse.from_dict(json.loads(payload)).node == 0


def test_an_internal_error_deep_in_the_engine_answers_500_refused_input_400_and_the_node_goes_on(cache, stream):
    """A ValueError from deep in the engine (its token selection, standing in for a bug) is a
    fault of ours: 500, the traceback logged, never the 400 of refused input. A prompt longer
    than the model takes (the engine's length check: a RequestError) is refused with a 400.
    The node answers the next request as the in-process engine does."""
    req, want = next((req, want) for req, want in stream if req.max_new_tokens == 0)
    runner = NodeRunner.open(cache, 0, hot_bytes=1 << 20)
    server = NodeServer(runner, {}, token=TOKEN)
    engine = runner.ranker.engine
    select, calls = engine.select, []

    def broken(segments, policy):
        calls.append(policy)
        if len(calls) == 1:
            raise ValueError("a bug of ours")
        return select(segments, policy)

    async def run():
        async with TestServer(server.app(), host="127.0.0.1") as test_server:
            url, auth = str(test_server.make_url("")), {"Authorization": f"Bearer {TOKEN}"}
            engine.select = broken
            internal = await raw(url, "POST", "/v1/recommend", req.to_json(), auth)
            positions, engine.max_positions = engine.max_positions, 16
            refused = await raw(url, "POST", "/v1/recommend", req.to_json(), auth)
            engine.max_positions = positions
            answered = await raw(url, "POST", "/v1/recommend", req.to_json(), auth)
            return internal, refused, answered

    try:
        with LogRecords() as logged:
            internal, refused, answered = asyncio.run(run())
    finally:
        server.batcher.shutdown()
        runner.close()
    status, content_type, payload = internal
    assert status == 500 and content_type.startswith("application/json"), payload
    assert json.loads(payload)["error"] == "internal error: ValueError: a bug of ours"
    assert logged.tracebacks("a bug of ours") == 1
    status, _, payload = refused
    assert status == 400 and "exceeds the model's 16 positions" in json.loads(payload)["error"], payload
    status, _, payload = answered
    assert status == 200, payload
    assert_same_ranking(RecommendResponse.from_dict(json.loads(payload)), want, "after the 500 and the 400")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signalled_node_stops_accepting_then_answers_its_in_flight_requests_before_it_stops(cache, stream, sig):
    """The node's app run by serve_until_signalled (what ``rcllm serve`` runs) in this process:
    with requests in flight (the engine held by the test), SIGTERM or SIGINT closes the listener
    at once, and every request in flight is still answered before the app is torn down."""
    import os
    import threading

    picked = [req for req, _ in stream if req.max_new_tokens == 0][:4]
    runner = NodeRunner.open(cache, 1, hot_bytes=1 << 20)
    server = NodeServer(runner, {}, token=TOKEN)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gate = threading.Event()
    before = signal.getsignal(sig)

    async def listening() -> bool:
        try:
            return (await raw(url, "GET", "/health"))[0] == 200
        except aiohttp.ClientConnectorError:
            return False

    async def run():
        app = server.app()
        shutting_down = asyncio.Event()

        async def note(app) -> None:  # aiohttp calls it once the listener is closed, before the drain
            shutting_down.set()

        app.on_shutdown.append(note)
        serving = asyncio.ensure_future(serve_until_signalled(app, "127.0.0.1", port, role="node"))
        while not await listening():
            assert not serving.done(), serving
            await asyncio.sleep(0.01)
        server.batcher.call(gate.wait, 120)  # 120 s only guards against a hang: the test opens the gate
        async with RecommendClient(url, token=TOKEN) as client:
            sent = [asyncio.ensure_future(client.recommend(req)) for req in picked]
            await until(lambda: server.pending == len(picked), "every request in flight")
            # the server's handler is installed (never the default, which would stop the test run)
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler)
            os.kill(os.getpid(), sig)
            await until(shutting_down.is_set, "the server shutting down")
            refusing = not await listening()
            in_flight = [not f.done() for f in sent]
            gate.set()
            answers = await asyncio.gather(*sent, return_exceptions=True)
        await serving
        return refusing, in_flight, answers

    try:
        refusing, in_flight, answers = asyncio.run(run())
    finally:
        signal.signal(sig, before)
        gate.set()
    assert refusing and in_flight == [True] * len(picked)  # the listener closed while they waited
    for (req, want), got in zip([(r, w) for r, w in stream if r in picked], answers):
        assert isinstance(got, RecommendResponse), got
        assert_same_ranking(got, want, "answered while draining")
    with pytest.raises(RuntimeError, match="shutting down"):  # the app's cleanup ran after the drain
        server.batcher.rank(runner.prepare(picked[0]))


def test_requests_that_queue_while_the_engine_is_busy_run_as_one_batch(cache, stream):
    """The node's engine thread: six ranking requests wait behind a blocking call, then run as
    one batched forward and each gets the in-process engine's answer; a request the engine
    refuses fails alone; replication-style calls run alone, in order."""
    import threading

    from rcllm.serve.batcher import EngineBatcher

    runner = NodeRunner.open(cache, 1, hot_bytes=1 << 20)
    batcher = EngineBatcher(runner, max_batch=8)
    try:
        gate = threading.Event()
        blocker = batcher.call(gate.wait, 30)
        picked = [(req, want) for req, want in stream if req.max_new_tokens == 0][:6]
        jobs = [runner.prepare(req) for req, _ in picked]
        bad = dataclasses.replace(runner.prepare(picked[0][0]), policy="sideways")
        futures = [batcher.rank(job) for job in jobs[:3]] + [batcher.rank(bad)]
        futures += [batcher.rank(job) for job in jobs[3:]]
        after = batcher.call(lambda: "ran after the batch")
        gate.set()
        assert blocker.result(timeout=30) is True
        for k, ((req, want), future) in enumerate(zip(picked, futures[:3] + futures[4:])):
            assert_same_ranking(future.result(timeout=120), want, f"batched request {k}")
        with pytest.raises(ValueError, match="sideways"):
            futures[3].result(timeout=5)
        assert after.result(timeout=30) == "ran after the batch"
        assert (batcher.batches, batcher.batched_requests, batcher.mean_batch) == (1, 7, 7.0)
    finally:
        batcher.shutdown()
        runner.close()


def test_max_batch_one_runs_requests_one_at_a_time(cache, stream):
    from rcllm.serve.batcher import EngineBatcher

    runner = NodeRunner.open(cache, 0, hot_bytes=1 << 20)
    batcher = EngineBatcher(runner, max_batch=1)
    try:
        picked = [(req, want) for req, want in stream if req.max_new_tokens == 0][:3]
        futures = [batcher.rank(runner.prepare(req)) for req, _ in picked]
        for (req, want), future in zip(picked, futures):
            assert_same_ranking(future.result(timeout=120), want, "one at a time")
        assert (batcher.batches, batcher.batched_requests) == (3, 3)
    finally:
        batcher.shutdown()
        runner.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.rank(runner.prepare(picked[0][0]))


@pytest.mark.slow
def test_sigterm_lets_a_node_process_finish_its_in_flight_requests(cluster, stream):
    """``rcllm serve`` wires the drain to SIGTERM (the drain itself is proven in this process by
    test_a_signalled_node_stops_accepting_then_answers_its_in_flight_requests_before_it_stops).
    Last test of the module: node 2 shuts down for good."""
    # slower requests (a continuation after the ranking), run one at a time by the engine
    requests = [dataclasses.replace(req, max_new_tokens=40) for req, _ in stream[:6]]

    async def run():
        async with RecommendClient(cluster.node_url(2), token=TOKEN) as client:
            sent = [asyncio.ensure_future(client.recommend(req)) for req in requests]
            while True:  # every request admitted, some still waiting: then the signal
                state = await client.get_json("/v1/state")
                answered = sum(f.done() for f in sent)
                assert answered < len(sent), "every request was answered before the signal"
                if state["queue_depth"] + answered == len(sent):
                    break
            cluster.signal("node2", signal.SIGTERM)
            return state["queue_depth"], await asyncio.gather(*sent, return_exceptions=True)

    in_flight, results = asyncio.run(run())
    assert in_flight >= 1
    assert all(isinstance(r, RecommendResponse) and r.node == 2 for r in results), results
    assert cluster.procs["node2"].wait(timeout=60) == 0
    log = cluster.log_tail("node2", 5)
    assert '"event": "shutting down: draining in-flight requests"' in log and '"event": "stopped"' in log


def test_a_node_with_the_static_pass_on_answers_as_the_engine_does_and_deviation_runs_eagerly(cache, stream):
    """``--cuda-graphs on`` (on CPU: the same static pass, eager): requests that run alone go
    through it and get the in-process engine's answers; a deviation request, which the static pass
    cannot run, falls back to the engine's own forward; a bad flag is refused."""
    with pytest.raises(ValueError, match="cuda-graphs"):
        NodeRunner.open(cache, 1, hot_bytes=1 << 20, cuda_graphs="sometimes")
    off = NodeRunner.open(cache, 1, hot_bytes=1 << 20, cuda_graphs="off")
    assert off.ranker.static is None
    off.close()
    runner = NodeRunner.open(cache, 1, hot_bytes=1 << 20, cuda_graphs="on", graph_tokens=4096)
    static = runner.ranker.static
    assert static is not None
    calls = []
    forward = static.forward
    static.forward = lambda segments, policy: calls.append(str(policy)) or forward(segments, policy)
    try:
        picked = [(req, want) for req, want in stream if req.max_new_tokens == 0][:5]
        for k, (req, want) in enumerate(picked):
            assert_same_ranking(runner.run(runner.prepare(req)), want, f"static pass, request {k}")
        assert len(calls) == len(picked)
        deviation = dataclasses.replace(runner.prepare(picked[0][0]), policy="deviation:0.5")
        runner.run(deviation)
        assert len(calls) == len(picked)  # ran eagerly
    finally:
        runner.close()


def test_fetch_costs_count_the_bytes_a_block_is_stored_in():
    """A node weighs a peer fetch against recomputing by the bytes it moves: an int8 cache moves
    a quarter of its fp32 model's KV, a bf16 one half; no stored dtype means the compute dtype."""
    from rcllm.serve.costs import kv_bytes_per_token

    model = {"n_layers": 30, "kv_heads": 3, "head_dim": 64, "dtype": "float32"}
    fp32 = 30 * 2 * 3 * 64 * 4
    assert kv_bytes_per_token(model) == kv_bytes_per_token(model, "fp32") == fp32
    assert kv_bytes_per_token(model, "bf16") == kv_bytes_per_token(model, "fp16") == fp32 // 2
    assert kv_bytes_per_token(model, "int8") == fp32 // 4
    assert kv_bytes_per_token({**model, "dtype": "bfloat16"}) == fp32 // 2
