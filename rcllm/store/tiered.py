"""Where a process finds blocks: a hot tier in memory (LRU, bounded in bytes) over disk stores.

A block missing from both is fetched (from a peer, when a fetcher is given) or recomputed after
the block context; either way it then joins the hot tier. Hits and misses are counted per tier
so nodes can report them and the coordinator can route on them.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

import torch

from rcllm.engine.blocks import BlockKV
from rcllm.engine.ranker import Ranker, block_key
from rcllm.store.shards import BlockStore

Fetcher = Callable[[str], BlockKV | None]


class TieredBlockSource:
    def __init__(
        self,
        ranker: Ranker,
        stores: Sequence[BlockStore],
        hot_bytes: int,
        fetch: Fetcher | None = None,
        context: BlockKV | None = None,
    ):
        self.ranker = ranker
        self.engine = ranker.engine
        self.context_ids = ranker.builder.system_ids()
        self.context = context or self.engine.compute_block(self.context_ids, ())
        self.stores = list(stores)
        self.hot_bytes = hot_bytes
        self.fetch = fetch
        self.hot: OrderedDict[str, BlockKV] = OrderedDict()
        self.hot_used = 0
        self.tiers: Counter = Counter()  # "memory", "disk", "peer", "computed" -> lookups served

    def key(self, token_ids: torch.Tensor) -> str:
        return block_key(self.engine.fingerprint, self.context_ids, token_ids)

    def locate(self, key: str) -> str | None:
        """The tier that holds ``key`` now ("memory" or "disk"), or None."""
        if key in self.hot:
            return "memory"
        if any(key in store for store in self.stores):
            return "disk"
        return None

    def get(self, kind: str, token_ids: torch.Tensor) -> tuple[BlockKV, bool]:
        """The block for these ids and whether it was precomputed here (memory or disk tier)."""
        key = self.key(token_ids)
        block = self.hot.get(key)
        if block is not None:
            self.hot.move_to_end(key)
            self.tiers["memory"] += 1
            return block, True
        for store in self.stores:
            block = store.get(key, device=self.engine.device)
            if block is not None:
                self.tiers["disk"] += 1
                self.admit(key, block)
                return block, True
        block = self.fetch(key) if self.fetch else None
        if block is not None:
            self.tiers["peer"] += 1
        else:
            block = self.engine.compute_block(token_ids, self.context)
            self.tiers["computed"] += 1
        self.admit(key, block)
        return block, False

    def admit(self, key: str, block: BlockKV) -> None:
        """Keep ``block`` in the hot tier, evicting the least recently used beyond the budget."""
        if block.nbytes > self.hot_bytes:
            return
        if key in self.hot:
            self.hot.move_to_end(key)
            return
        self.hot[key] = block
        self.hot_used += block.nbytes
        while self.hot_used > self.hot_bytes:
            _, old = self.hot.popitem(last=False)
            self.hot_used -= old.nbytes
