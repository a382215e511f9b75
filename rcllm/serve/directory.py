"""Where every catalog item's block lives, read once from the cache's placement.

Row ``r`` of ``placement/items.json``, ``placement/keys.json`` and the placement arrays is one
item: its id, its block key, the node that stores it and its token count. Nodes use it to find
the peer holding a block; the coordinator to price the blocks a node lacks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from rcllm.store import placement_dir
from rcllm.store.layout import ITEM_IDS, ITEM_KEYS
from rcllm.store.placement import load_placement


@dataclass(eq=False)
class ItemDirectory:
    ids: list[str]
    keys: list[str]
    owner: list[int]  # node holding row r's block (lists: indexing them is what routing does per candidate)
    tokens: list[int]
    n_nodes: int

    @classmethod
    def load(cls, cache_dir: Path) -> "ItemDirectory":
        folder = placement_dir(cache_dir)
        placement = load_placement(folder)
        ids = json.loads((folder / ITEM_IDS).read_text())
        keys = json.loads((folder / ITEM_KEYS).read_text())
        if not len(ids) == len(keys) == len(placement.item_cluster):
            raise ValueError(
                f"{folder}: {len(ids)} item ids, {len(keys)} keys and {len(placement.item_cluster)} placed items "
                "do not match (an interrupted build?): rerun rcllm build-cache"
            )
        return cls.from_arrays(ids, keys, placement.item_node, placement.item_tokens, placement.n_nodes)

    @classmethod
    def from_arrays(cls, ids, keys, owner, tokens, n_nodes: int) -> "ItemDirectory":
        return cls(list(ids), list(keys), np.asarray(owner).tolist(), np.asarray(tokens).tolist(), int(n_nodes))

    @cached_property
    def row(self) -> dict[str, int]:
        """item id -> row."""
        return {item_id: r for r, item_id in enumerate(self.ids)}

    @cached_property
    def row_by_key(self) -> dict[str, int]:
        """block key -> row."""
        return {key: r for r, key in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.ids)
