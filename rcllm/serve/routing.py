"""Which node serves a request: pure functions of the request's blocks and the nodes' load.

``affinity`` (the default) sends a request to the node with the lowest estimated TTFT::

    estimate(node) = queue_depth × service_ms                       (waiting behind other requests)
                   + Σ over candidate blocks the node lacks of  min(fetch, recompute)
                   + recompute of the history block if the node lacks it

A node lacks an item block unless the placement put it there or the node reports holding it in
memory (a replica, or a block it fetched earlier). Fetching is only possible while the owner is
up. So affinity to cached blocks is traded against load: a node holding every block but with a
long queue loses to an idle one once the queue costs more than the missing blocks.

``round-robin`` and ``user-hash`` (consistent hashing of the user id, 64 virtual nodes per node)
ignore blocks and load; they are the baselines. Every strategy returns the up nodes in the
order to try them, so a request whose node fails goes to the next one.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from rcllm.serve.costs import CostModel

STRATEGIES = ("affinity", "round-robin", "user-hash")
VIRTUAL_NODES = 64


@dataclass
class NodeView:
    """What the router knows of one node (from its polled state and the coordinator's own count)."""

    node: int
    costs: CostModel
    up: bool = True
    queue_depth: int = 0  # requests waiting or running there
    service_ms: float = 20.0  # moving average of one request's time on the node
    held: Collection[int] = field(default_factory=frozenset)  # rows of other nodes' item blocks it holds


@dataclass
class RouteQuery:
    user_id: str
    rows: Sequence[int]  # catalog rows of the candidates (inline cold items cost the same everywhere)
    history_tokens: int = 0  # size of the history block, where a node must compute it
    history_nodes: Collection[int] | None = None  # nodes holding the history block; None: all of them


def estimate_ttft_ms(
    query: RouteQuery, view: NodeView, owner: Sequence[int], tokens: Sequence[int], up: Collection[int]
) -> float:
    """Estimated time ``view``'s node adds before the request's first token: its queue and the
    blocks it lacks (``owner``/``tokens`` per catalog row, ``up``: nodes that can serve a fetch)."""
    k, held, costs = view.node, view.held, view.costs
    estimate = view.queue_depth * view.service_ms
    for row in query.rows:
        home = owner[row]
        if home != k and row not in held:
            estimate += costs.miss_ms(tokens[row], can_fetch=home in up)
    if query.history_nodes is not None and k not in query.history_nodes:
        estimate += costs.recompute_ms(query.history_tokens)
    return estimate


def affinity_order(query: RouteQuery, views: Sequence[NodeView], owner, tokens, turn: int = 0) -> list[int]:
    live = [v for v in views if v.up]
    up = {v.node for v in live}
    n = max(len(views), 1)
    # ties (e.g. only cold items) go round-robin rather than always to the lowest node number
    scored = [(estimate_ttft_ms(query, v, owner, tokens, up), (v.node - turn) % n, v.node) for v in live]
    return [node for *_, node in sorted(scored)]


def round_robin_order(views: Sequence[NodeView], turn: int) -> list[int]:
    n = len(views)
    rotated = [views[(turn + i) % n] for i in range(n)]
    return [v.node for v in rotated if v.up]


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing: a user keeps its node while that node is up; when it is down only its
    users move (to the next node on the ring)."""

    def __init__(self, nodes: Sequence[int], virtual: int = VIRTUAL_NODES):
        points = sorted((_point(f"node-{k}#{v}"), k) for k in nodes for v in range(virtual))
        self.points = [p for p, _ in points]
        self.owners = [k for _, k in points]
        self.n_nodes = len(set(nodes))

    def order(self, user_id: str, up: Collection[int]) -> list[int]:
        start = bisect.bisect(self.points, _point(user_id))
        seen: list[int] = []
        for i in range(len(self.points)):
            k = self.owners[(start + i) % len(self.points)]
            if k not in seen:
                seen.append(k)
                if len(seen) == self.n_nodes:
                    break
        return [k for k in seen if k in up]


class Router:
    """The routing strategy over a fixed placement (``owner`` and ``tokens`` per catalog row)."""

    def __init__(self, strategy: str, owner: Sequence[int], tokens: Sequence[int], nodes: Sequence[int]):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown routing {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.owner, self.tokens = owner, tokens
        self.ring = HashRing(nodes)

    def order(self, query: RouteQuery, views: Sequence[NodeView], turn: int) -> list[int]:
        """The up nodes, best first; ``turn`` counts requests (round-robin and tie-breaking)."""
        if self.strategy == "affinity":
            return affinity_order(query, views, self.owner, self.tokens, turn)
        if self.strategy == "round-robin":
            return round_robin_order(views, turn)
        return self.ring.order(query.user_id, {v.node for v in views if v.up})
