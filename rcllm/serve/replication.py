"""Hot-item replication: which item blocks to copy to which node, from the misses nodes report.

Every node reports, per poll, the catalog items whose blocks it had to fetch or recompute. The
coordinator keeps a decayed miss score per (node, item): it is halved every round, so an item
stays hot only while the node keeps needing it. Items whose score reaches ``threshold`` on a
node that does not hold them are copied there (``POST /v1/replicate``), hottest first, within the
node's replica budget (a share of its hot tier). Cold replicas need no eviction order: the node's
hot tier is an LRU, and a replica nobody asks for ages out of it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rcllm.serve.routing import NodeView

REPLICA_SHARE = 0.5  # of a node's hot tier, at most, that replicas may fill


@dataclass(frozen=True)
class Replication:
    node: int  # copies to this node
    source: int  # from the node the placement put the blocks on
    rows: tuple[int, ...]
    nbytes: int


class HotItems:
    def __init__(self, threshold: float = 3.0, decay: float = 0.5, floor: float = 0.25):
        self.threshold, self.decay, self.floor = threshold, decay, floor
        self.scores: dict[int, dict[int, float]] = defaultdict(dict)  # node -> row -> decayed misses

    def add(self, node: int, misses: Mapping[int, int]) -> None:
        scores = self.scores[node]
        for row, n in misses.items():
            scores[row] = scores.get(row, 0.0) + n

    def age(self) -> None:
        """One round passes: every score decays; the negligible ones are forgotten."""
        for scores in self.scores.values():
            for row in [r for r, s in scores.items() if s * self.decay < self.floor]:
                del scores[row]
            for row in scores:
                scores[row] *= self.decay

    def plan(
        self, views: Sequence[NodeView], owner: Sequence[int], tokens: Sequence[int], budget: Mapping[int, int]
    ) -> list[Replication]:
        """Copies to make now: per up node, its hot items it lacks, within ``budget[node]`` bytes;
        planned items leave the scores (a copy that is evicted again must earn its place again)."""
        up = {v.node for v in views if v.up}
        plan = []
        for view in views:
            k = view.node
            if not view.up or k not in self.scores:
                continue
            scores = self.scores[k]
            wanted = (r for r, s in scores.items() if s >= self.threshold and owner[r] != k and owner[r] in up)
            hot = sorted((r for r in wanted if r not in view.held), key=lambda r: (-scores[r], r))
            left = budget.get(k, 0)
            by_source: dict[int, list[int]] = defaultdict(list)
            for row in hot:
                size = tokens[row] * view.costs.bytes_per_token
                if size > left:
                    continue
                left -= size
                by_source[owner[row]].append(row)
                del scores[row]
            for source, rows in sorted(by_source.items()):
                nbytes = sum(tokens[r] for r in rows) * view.costs.bytes_per_token
                plan.append(Replication(k, source, tuple(rows), nbytes))
        return plan
