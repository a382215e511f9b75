"""The systems compared by ``rcllm eval``, all on the same requests and the same token ids.

``full``: plain prefill. ``prefix``: hash-chained prefix cache (16-token blocks, LRU), in
:mod:`rcllm.engine.prefix_cache` since the demo runs it too. ``rcllm:<policy>``: history and
item blocks from a block source, spliced and corrected. Each returns the engine's
:class:`Ranking` so that metrics and fidelity read one shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from rcllm.engine.policy import parse_policy
from rcllm.engine.ranker import BlockSource, Ranker, Ranking


def parse_systems(spec: str | Sequence[str]) -> list[str]:
    """``full,prefix,rcllm:boundary:4`` -> validated names (policies parsed, duplicates refused)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ValueError("no systems to evaluate")
    out = []
    for name in names:
        if name.startswith("rcllm:"):
            name = f"rcllm:{parse_policy(name.removeprefix('rcllm:'))}"
        elif name not in ("full", "prefix"):
            raise ValueError(f"unknown system {name!r}; expected full, prefix or rcllm:<policy>")
        if name in out:
            raise ValueError(f"system {name!r} listed twice")
        out.append(name)
    return out


class FullSystem:
    name = "full"

    def __init__(self, ranker: Ranker):
        self.ranker = ranker

    def rank(self, history: Sequence[str], candidates: Sequence[str]) -> Ranking:
        return self.ranker.rank(history, candidates, "full")


class RcllmSystem:
    def __init__(self, ranker: Ranker, policy: str, source: BlockSource):
        self.ranker = ranker
        self.policy = parse_policy(policy)
        self.source = source
        self.name = f"rcllm:{self.policy}"

    def rank(self, history: Sequence[str], candidates: Sequence[str]) -> Ranking:
        return self.ranker.rank(history, candidates, self.policy, self.source)
