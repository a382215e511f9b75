"""The cache folder's layout: the names of the files it holds beside the node stores, the
manifest (:mod:`rcllm.store.manifest`, with the node, users and placement folders) and the
placement record (:mod:`rcllm.store.placement`), and :func:`cache_info`, what a cache holds and
which of its stores are built (:mod:`rcllm.store.built`).

Build writes these files; serving and eval read them. The names live here, below all three.
"""

from __future__ import annotations

from pathlib import Path

from rcllm.store.built import build_command, is_user_store, node_store, store_root, store_states
from rcllm.store.manifest import Manifest
from rcllm.store.shards import BlockStore

CATALOG_COPY = "catalog.jsonl"  # the items as built: nodes render candidate texts from it
HISTORIES_COPY = "histories.jsonl"  # under users/: a request may omit a known user's history
ITEM_IDS = "items.json"  # under placement/: row i of the placement arrays is this item id
ITEM_KEYS = "keys.json"  # under placement/: the block key of row i (moving blocks needs no model)
EMBEDDINGS = "embeddings.npy"


def cache_info(cache: Path) -> dict:
    """The manifest and every store's state and statistics (node stores with their address, then
    the history blocks' store, or its parts): ``state`` is built, not built or nothing to build, ``reason`` says why not
    built and ``command`` what builds it, ``record`` is the store's completion record; a store not
    started has zero statistics."""
    out = Path(cache)
    manifest = Manifest.load(out)
    addresses = {node_store(n["node"]): f"{n['host']}:{n['port']}" for n in manifest.nodes}
    stores = []
    for state in store_states(out, manifest):
        row = {"name": f"{state.name} (replicated)" if is_user_store(state.name) else state.name}
        if state.name in addresses:
            row["address"] = addresses[state.name]
        row.update(state=state.label, reason=state.reason, record=state.record, **_stats(store_root(out, state.name)))
        if state.needed and not state.built:
            row["command"] = build_command(out, state.name)
        stores.append(row)
    return {"manifest": manifest.to_dict(), "stores": stores}


def _stats(root: Path) -> dict:
    try:
        with BlockStore.open_readonly(root) as store:
            return store.stats()
    except FileNotFoundError:  # not started yet
        return {"blocks": 0, "tokens": 0, "bytes": 0, "kv_bytes": 0, "shards": 0, "bytes_per_token": 0.0, "kv_dtype": None}

