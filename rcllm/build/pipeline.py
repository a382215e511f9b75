"""``rcllm build-cache``: the one-command build, and growing a built cache (``--append``,
``rcllm cache add-node``).

The one-command build is the plan (:mod:`rcllm.build.plan`: validate, embed, cluster, place,
describe) followed by every store's build (:mod:`rcllm.build.nodes`: each node's item blocks,
then the replicated history blocks, part by part) in this process: the same functions
``--plan``, ``--node K`` and ``--user-blocks [--part K]`` run one by one, anywhere. Every step is
resumable: placement is saved before any KV is computed, blocks are content-addressed and skipped
when already durable in a store, and a store records itself built last. A validation error stops
the build before anything on disk is touched.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rcllm.build import placement as pl
from rcllm.build.blocks import (
    context_block,
    expected_bytes_per_token,
    history_block_ids,
    item_block_ids,
    key_for,
    torch_element_size,
)
from rcllm.build.nodes import StoreBuild, build_node, build_users, node_summary, plan_options, record_stores
from rcllm.build.options import BuildOptions, Reporter
from rcllm.build.plan import (
    PlanReport,
    committed_placement,
    embed_items,
    npy_bytes,
    placement_summary,
    plan_cache,
    planned_node_stores,
)
from rcllm.build.vectors import load_embeddings
from rcllm.data.catalog import load_catalog, write_catalog
from rcllm.engine.api import open_ranker
from rcllm.engine.ranker import Ranker
from rcllm.files import file_sha256, write_file
from rcllm.store import BlockStore, Manifest, check_compatible, node_dir, placement_dir, require_built, store_states
from rcllm.store.built import node_store
from rcllm.store.codec import check_kv_dtype, kv_dtype_of
from rcllm.store.layout import CATALOG_COPY, EMBEDDINGS, ITEM_IDS, ITEM_KEYS
from rcllm.store.placement import save_placement

__all__ = [  # the build's names, from the modules that define them
    "BuildOptions", "BuildReport", "PlanReport", "Reporter", "StoreBuild", "add_node", "append_items",
    "build_cache", "build_node", "build_users", "context_block", "expected_bytes_per_token",
    "history_block_ids", "item_block_ids", "key_for", "placement_summary", "plan_cache", "plan_options",
    "torch_element_size",
]


@dataclass
class BuildReport:
    out: Path
    items: int
    users: int
    nodes: list[dict]  # per node: items, tokens, blocks, bytes
    seconds: dict[str, float]
    quality: dict[str, dict[str, float]]  # placement name -> measures
    computed_blocks: int
    reused_blocks: int
    bytes_per_token: float
    expected_bytes_per_token: int
    imbalance: float
    notes: list[str] = field(default_factory=list)


def build_cache(catalog: Path, options: BuildOptions, reporter: Reporter | None = None, ranker: Ranker | None = None) -> BuildReport:
    """Plan the cache, then build every node's store and the history blocks' stores, in this process."""
    reporter = reporter or Reporter()
    out = Path(options.out)
    t0 = time.perf_counter()
    ranker = ranker or open_ranker(options.model, device=options.device, dtype=options.dtype, label_offsets=False)
    plan = plan_cache(catalog, options, reporter, ranker)
    seconds = {k: v for k, v in plan.seconds.items() if k != "total"}
    t = time.perf_counter()
    builds: list[StoreBuild] = [build_node(out, k, options, reporter, ranker) for k in range(options.nodes)]
    seconds["item_kv"] = time.perf_counter() - t
    t = time.perf_counter()
    builds += build_users(out, options, reporter, ranker)  # every part of the history blocks
    seconds["history_kv"] = time.perf_counter() - t
    placement, _, _ = committed_placement(placement_dir(out))
    nodes = node_summary(out, placement, options.nodes)
    total_bytes = sum(b.record["bytes"] for b in builds)
    total_tokens = sum(b.record["tokens"] for b in builds)
    seconds["total"] = time.perf_counter() - t0
    return BuildReport(
        out=out, items=plan.items, users=plan.users, nodes=nodes, seconds=seconds, quality=plan.quality,
        computed_blocks=sum(b.computed for b in builds), reused_blocks=sum(b.reused for b in builds),
        bytes_per_token=total_bytes / total_tokens if total_tokens else 0.0,
        expected_bytes_per_token=expected_bytes_per_token(ranker, plan.kv_dtype), imbalance=plan.imbalance, notes=plan.notes,
    )


# -- growing a cache ------------------------------------------------------------------------


def append_items(catalog: Path, options: BuildOptions, reporter: Reporter | None = None, ranker: Ranker | None = None) -> BuildReport:
    """Place new items by nearest centroid and compute only their blocks; nothing else moves.

    New items are placed by the vectors the cache was placed by: its embedder's, or, for a cache
    placed from a file, those in ``options.embeddings`` (which may also hold the placed items').
    """
    reporter = reporter or Reporter()
    out = Path(options.out)
    t0 = time.perf_counter()
    manifest = Manifest.load(out)
    ranker = ranker or open_ranker(options.model, device=options.device, dtype=options.dtype, label_offsets=False)
    kv_dtype = check_kv_dtype(options.kv_dtype) if options.kv_dtype else kv_dtype_of(ranker.engine.lm.dtype)
    check_compatible(manifest, ranker.engine.lm, ranker.builder.template.to_dict(), kv_dtype)
    pdir = placement_dir(out)
    placement, item_ids, keys = committed_placement(pdir)
    existing = {item["id"]: item for item in load_catalog(out / CATALOG_COPY)}
    max_tokens = manifest.items.get("max_item_tokens", options.max_item_tokens)
    incoming = load_catalog(catalog, max_item_tokens=max_tokens,
                            count_tokens=lambda item: int(item_block_ids(ranker, item).numel()))
    placed = set(item_ids)
    changed = [i["id"] for i in incoming if i["id"] in existing and existing[i["id"]] != i]
    if changed:
        raise ValueError(
            f"{catalog}: {len(changed)} items already in the cache with other content (e.g. {changed[0]!r}); "
            "--append only adds new items: rebuild to change existing ones"
        )
    new = [i for i in incoming if i["id"] not in placed]
    token_ids = [item_block_ids(ranker, item) for item in new]
    embedder = manifest.placement.get("embedder", options.embedder)
    source = manifest.placement.get("embeddings")
    if new:
        embeddings, given = _new_item_vectors(out, manifest, placement, new, placed, options, ranker, reporter)
        if given is not None:
            source = {**source, "appended": [*source.get("appended", []), {**given.record(), "items": len(new)}]}
        tokens = np.array([t.numel() for t in token_ids], dtype=np.int64)
        nodes = pl.place_new(placement, embeddings, tokens)
        context = context_block(ranker)
        advance = reporter.phase("item KV blocks", len(new))
        new_keys = [key_for(ranker, ids) for ids in token_ids]
        for k in sorted(set(nodes.tolist())):
            rows = np.flatnonzero(nodes == k)
            wanted = {new_keys[r]: token_ids[r] for r in rows}
            with BlockStore(node_dir(out, k), create=True, max_shard_bytes=options.max_shard_mb << 20, kv_dtype=kv_dtype) as store:
                todo = [(key, ids) for key, ids in wanted.items() if key not in store]
                for first in range(0, len(todo), options.batch_size):
                    chunk = todo[first : first + options.batch_size]
                    for (key, _), block in zip(chunk, ranker.engine.compute_blocks([i for _, i in chunk], context)):
                        store.put(key, block)
                    advance(len(chunk))
        all_embeddings = np.concatenate([np.load(pdir / EMBEDDINGS)[: len(item_ids)], embeddings])
        write_file(pdir / EMBEDDINGS, npy_bytes(all_embeddings))
        save_placement(placement, pdir)
        keys = keys + new_keys
        write_file(pdir / ITEM_KEYS, json.dumps(keys))
        write_file(pdir / ITEM_IDS, json.dumps(item_ids + [i["id"] for i in new]))
    merged = {**existing, **{i["id"]: i for i in new}}
    write_catalog(list(merged.values()), out / CATALOG_COPY)
    n_nodes = placement.n_nodes
    manifest.placement = placement_summary(placement, embedder, manifest.placement.get("seed", 0), source)
    manifest.items = {**manifest.items, "count": len(merged), "tokens": int(placement.item_tokens.sum()),
                      "catalog_sha256": file_sha256(out / CATALOG_COPY)}
    if manifest.stores:  # (an older cache without a plan of its stores stays without one)
        manifest.stores = {**manifest.stores, **planned_node_stores(placement, keys)}
    manifest.save(out)
    if manifest.stores:
        record_stores(out, manifest, [node_store(k) for k in range(n_nodes)], "append")
    nodes_summary = node_summary(out, placement, n_nodes)
    total_bytes = sum(n["bytes"] for n in nodes_summary)
    return BuildReport(
        out=out, items=len(merged), users=manifest.users.get("count", 0), nodes=nodes_summary,
        seconds={"append": time.perf_counter() - t0}, quality={}, computed_blocks=len(new), reused_blocks=0,
        bytes_per_token=total_bytes / max(1, int(placement.item_tokens.sum())),
        expected_bytes_per_token=expected_bytes_per_token(ranker, kv_dtype), imbalance=placement.imbalance(),
        notes=[f"{len(new)} new items placed by nearest centroid; {len(incoming) - len(new)} already in the cache"],
    )


def _new_item_vectors(out, manifest, placement, new, placed, options, ranker, reporter):
    """(vectors of the new items, the file they came from or None), in the space the cache was placed in."""
    embedder = manifest.placement.get("embedder", options.embedder)
    origin = (manifest.placement.get("embeddings") or {}).get("file")
    if embedder != "file":
        if options.embeddings:
            raise ValueError(
                f"the cache at {out} was placed by the {embedder} embedder's vectors; vectors from "
                f"{options.embeddings} live in another space: append without --embeddings, or plan the whole "
                "catalog from your vectors (--plan --embeddings)"
            )
        return embed_items(embedder, new, ranker, options.device, reporter), None
    if not options.embeddings:
        raise ValueError(
            f"the cache at {out} was placed by the vectors in {origin}: pass --embeddings with the new items' "
            "vectors, from the same model"
        )
    given = load_embeddings(options.embeddings, [i["id"] for i in new], options.embedding_ids, known=placed)
    dim = placement.centroids.shape[1]
    if given.vectors.shape[1] != dim:
        raise ValueError(
            f"{options.embeddings}: its vectors have {given.vectors.shape[1]} dimensions, the cache was placed by "
            f"{dim}-dimensional ones (from {origin}): give vectors from the same model"
        )
    return given.vectors, given


def add_node(cache: Path) -> dict:
    """Hand a new node whole clusters from the fullest nodes; move only their blocks (no model needed).

    Only a built cache grows (every store as its plan says). The grown placement is saved before
    the manifest names the new node, so a run that stopped in between is finished by the next
    one instead of growing the cluster twice; stopped after, the stores it left out of date say
    so, and ``rcllm build-cache --node K`` finishes each without computing a block.
    """
    out = Path(cache)
    manifest = Manifest.load(out)
    require_built(out, manifest, [s.name for s in store_states(out, manifest)])
    pdir = placement_dir(out)
    placement, _, keys = committed_placement(pdir)
    old_nodes = len(manifest.nodes)
    if placement.n_nodes == old_nodes:
        grown, _ = pl.add_node(placement)
    elif placement.n_nodes == old_nodes + 1:
        grown = placement  # an earlier add-node saved this placement, then stopped
    else:
        raise ValueError(f"{pdir} places items on {placement.n_nodes} nodes, the manifest lists {old_nodes}")
    new_node = grown.n_nodes - 1
    moved = np.flatnonzero(grown.item_node == new_node)
    total = moved_bytes = 0
    sources = {k: BlockStore.open_readonly(node_dir(out, k)) for k in range(old_nodes)}
    try:
        total = sum(store.stats()["bytes"] for store in sources.values())
        with BlockStore(node_dir(out, new_node), create=True) as target:
            for row in moved:
                key = keys[int(row)]
                if key in target:
                    continue
                data = next((d for store in sources.values() if (d := store.get_bytes(key)) is not None), None)
                if data is None:
                    raise ValueError(f"no node holds the block of item row {int(row)}: rebuild the cache")
                target.put_bytes(key, data)
                moved_bytes += len(data)
    finally:
        for store in sources.values():
            store.close()
    save_placement(grown, pdir)
    if len(manifest.nodes) == new_node:
        host = manifest.nodes[-1]["host"] if manifest.nodes else "127.0.0.1"
        port = max(n["port"] for n in manifest.nodes) + 1
        manifest.nodes = manifest.nodes + [{"node": new_node, "host": host, "port": port}]
    manifest.placement = placement_summary(grown, manifest.placement.get("embedder", "minilm"), manifest.placement.get("seed", 0),
                                           manifest.placement.get("embeddings"))
    manifest.stores = {**manifest.stores, **planned_node_stores(grown, keys)}
    manifest.save(out)
    moved_keys = {keys[int(r)] for r in moved}
    for k in range(old_nodes):  # the new node owns them now: drop the old copies
        with BlockStore(node_dir(out, k)) as store:
            if store.delete_many([key for key in moved_keys if key in store]):
                store.compact()
    record_stores(out, manifest, [node_store(k) for k in range(grown.n_nodes)], "add-node")
    return {
        "node": new_node, "nodes": grown.n_nodes, "items": int(len(moved)),
        "clusters": int(len(set(grown.item_cluster[moved].tolist()))),
        "bytes_moved": moved_bytes, "bytes_total": total, "fraction": moved_bytes / total if total else 0.0,
        "imbalance": grown.imbalance(),
    }
