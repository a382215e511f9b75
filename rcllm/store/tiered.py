"""Where a process finds blocks: a hot tier in memory (LRU, bounded in bytes) over disk stores.

A block missing from both is recomputed after the block context and joins the hot tier. A
serving node brings the blocks it lacks from their peers before the ranking asks for them
(:mod:`rcllm.serve.runner`) and counts, per tier, where each came from.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from rcllm.engine.blocks import BlockKV
from rcllm.engine.ranker import Ranker, block_key
from rcllm.store.shards import BlockStore


class TieredBlockSource:
    """A :class:`~rcllm.engine.ranker.BlockSource`: the hot tier, then each store in order, then
    a recompute. ``system``: the system prefix's KV (the block context) when the caller has it already."""

    def __init__(self, ranker: Ranker, stores: Sequence[BlockStore], hot_bytes: int, system: BlockKV | None = None):
        self.engine = ranker.engine
        self.system_ids = ranker.builder.system_ids()
        self.system = system or self.engine.compute_block(self.system_ids, ())
        self.stores = list(stores)
        self.hot_bytes = hot_bytes
        self.hot: OrderedDict[str, BlockKV] = OrderedDict()
        self.hot_used = 0

    def key(self, token_ids: torch.Tensor) -> str:
        return block_key(self.engine.fingerprint, self.system_ids, token_ids)

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
            return block, True
        for store in self.stores:
            block = store.get(key, device=self.engine.device)
            if block is not None:
                self.admit(key, block)
                return block, True
        block = self.engine.compute_block(token_ids, self.system)
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
