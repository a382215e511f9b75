"""The cache folder's layout: the names of the files it holds beside the node stores, the
manifest (:mod:`rcllm.store.manifest`, with the node, users and placement folders) and the
placement record (:mod:`rcllm.store.placement`), and :func:`cache_info`, what a cache holds.

Build writes these files; serving and eval read them. The names live here, below all three.
"""

from __future__ import annotations

from pathlib import Path

from rcllm.store.manifest import Manifest, node_dir, users_dir
from rcllm.store.shards import BlockStore

CATALOG_COPY = "catalog.jsonl"  # the items as built: nodes render candidate texts from it
HISTORIES_COPY = "histories.jsonl"  # under users/: a request may omit a known user's history
ITEM_IDS = "items.json"  # under placement/: row i of the placement arrays is this item id
ITEM_KEYS = "keys.json"  # under placement/: the block key of row i (moving blocks needs no model)
EMBEDDINGS = "embeddings.npy"


def cache_info(cache: Path) -> dict:
    """The manifest and every store's statistics (node stores with their address, the users store)."""
    out = Path(cache)
    manifest = Manifest.load(out)
    stores = []
    for node in manifest.nodes:
        with BlockStore.open_readonly(node_dir(out, node["node"])) as store:
            stores.append({"name": f"node-{node['node']}", "address": f"{node['host']}:{node['port']}", **store.stats()})
    if users_dir(out).is_dir():
        with BlockStore.open_readonly(users_dir(out)) as store:
            stores.append({"name": "users (replicated)", **store.stats()})
    return {"manifest": manifest.to_dict(), "stores": stores}

