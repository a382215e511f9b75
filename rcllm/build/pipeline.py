"""``rcllm build-cache``: validate, embed, cluster and place, precompute KV, describe the cache.

Every phase is resumable: placement is saved before any KV is computed, blocks are
content-addressed and skipped when already durable in a node's store, and the manifest (what
serving and eval read) is written last, atomically. A validation error stops the build before
anything on disk is touched.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rcllm.build import placement as pl
from rcllm.build.embed import get_embedder
from rcllm.data.catalog import load_catalog, write_catalog
from rcllm.data.formats import load_histories, load_interactions, write_histories
from rcllm.data.sampling import DEFAULT_HISTORY
from rcllm.engine.api import open_ranker, parse_dtype
from rcllm.engine.blocks import BlockKV, context_hash
from rcllm.engine.prompt import item_text
from rcllm.engine.models import DEFAULT_MODEL
from rcllm.engine.ranker import Ranker, block_key
from rcllm.files import file_sha256, write_file
from rcllm.store import BlockStore, Manifest, check_compatible, default_nodes, model_record, node_dir, placement_dir, users_dir
from rcllm.store.codec import check_kv_dtype, kv_dtype_of
from rcllm.store.layout import CATALOG_COPY, EMBEDDINGS, HISTORIES_COPY, ITEM_IDS, ITEM_KEYS
from rcllm.store.placement import Placement, load_placement, save_placement


class Reporter:
    """Progress of the build's phases; the CLI passes one that draws rich progress bars."""

    def phase(self, name: str, total: int | None) -> Callable[[int], None]:
        return lambda n=1: None

    def log(self, message: str) -> None:
        pass


@dataclass
class BuildOptions:
    out: Path = Path("rcllm-cache")
    nodes: int = 2
    model: str = DEFAULT_MODEL
    users: Path | None = None
    interactions: Path | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    kv_dtype: str | None = None  # how blocks are stored: fp32 | bf16 | fp16 | int8; None: as computed (dtype)
    embedder: str = "minilm"
    max_item_tokens: int = 256
    history: int = DEFAULT_HISTORY
    batch_size: int = 16
    seed: int = 0
    max_shard_mb: int = 64


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


# -- pieces shared by build, append, add-node, serve and eval --------------------------------


def item_block_ids(ranker: Ranker, item: dict):
    return ranker.builder.item_ids(item_text(item))


def history_block_ids(ranker: Ranker, items: dict[str, dict], history: Sequence[str], length: int):
    recent = list(history)[-length:] if length else []
    return ranker.builder.history_ids([item_text(items[i]) for i in recent])


def context_block(ranker: Ranker) -> BlockKV:
    """The block context (system prompt) every history and item block is computed after."""
    return ranker.engine.compute_block(ranker.builder.system_ids(), ())


def key_for(ranker: Ranker, token_ids) -> str:
    return block_key(ranker.engine.fingerprint, ranker.builder.system_ids(), token_ids)


def expected_bytes_per_token(ranker: Ranker, kv_dtype: str | None = None) -> int:
    """K and V of one token as stored in ``kv_dtype`` (None: the compute dtype); int8's scales not counted."""
    e = ranker.engine
    element = 1 if kv_dtype == "int8" else torch_element_size(e.dtype if kv_dtype is None else parse_dtype(kv_dtype))
    return e.n_layers * 2 * e.n_kv_heads * e.head_dim * element


def torch_element_size(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _fill_store(
    ranker: Ranker, store: BlockStore, wanted: dict[str, object], context: BlockKV, batch_size: int, advance
) -> tuple[int, int]:
    """Compute and store every wanted block (key -> token ids) not already durable; drop the rest."""
    todo = [(k, ids) for k, ids in wanted.items() if k not in store]
    reused = len(wanted) - len(todo)
    advance(reused)
    for first in range(0, len(todo), batch_size):
        chunk = todo[first : first + batch_size]
        for (key, _), block in zip(chunk, ranker.engine.compute_blocks([ids for _, ids in chunk], context, batch_size)):
            store.put(key, block)
        advance(len(chunk))
    store.flush()
    stale = set(store.keys()) - set(wanted)
    if stale:  # items that left the catalog or moved to another node
        store.delete_many(stale)
        store.compact()
    return len(todo), reused


def _read_histories(options: BuildOptions, catalog_ids: set[str]) -> tuple[dict[str, list[str]], list[list[str]]]:
    """(user histories to precompute, sequences for co-occurrence) from --users / --interactions."""
    users: dict[str, list[str]] = {}
    sequences: list[list[str]] = []
    if options.users:
        users, _ = load_histories(options.users, items=catalog_ids, strict=True)
        sequences += [h for h in users.values() if h]
    if options.interactions:
        rows, _ = load_interactions(options.interactions, items=catalog_ids, strict=True)
        by_user: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
        for n, (user, item, ts) in enumerate(rows):
            by_user[user].append((ts, n, item))
        sequences += [[item for _, _, item in sorted(r)] for r in by_user.values()]
    return users, sequences


def _quality(embeddings, item_ids, ours, sequences_idx, n_nodes, seed) -> dict[str, dict[str, float]]:
    placements = {
        "rcllm": ours,
        "hash": pl.hash_placement(item_ids, n_nodes),
        "random": pl.random_placement(len(item_ids), n_nodes, seed),
    }
    out = {}
    for name, item_node in placements.items():
        measures = {"intra_node_similarity": float(pl.intra_node_similarity(embeddings, item_node))}
        if sequences_idx:
            measures["cooccurrence_locality"] = float(pl.cooccurrence_locality(sequences_idx, item_node))
        out[name] = measures
    return out


def _node_summary(out: Path, placement: Placement, n_nodes: int) -> list[dict]:
    rows = []
    for k in range(n_nodes):
        with BlockStore.open_readonly(node_dir(out, k)) as store:
            stats = store.stats()
        on_node = placement.item_node == k
        rows.append({
            "node": k,
            "items": int(on_node.sum()),
            "tokens": int(placement.item_tokens[on_node].sum()),
            "blocks": stats["blocks"],
            "bytes": stats["bytes"],
        })
    return rows


# -- the build ----------------------------------------------------------------------------


def build_cache(catalog: Path, options: BuildOptions, reporter: Reporter | None = None, ranker: Ranker | None = None) -> BuildReport:
    reporter = reporter or Reporter()
    out = Path(options.out)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if options.nodes < 1:
        raise ValueError("--nodes must be at least 1")
    ranker = ranker or open_ranker(options.model, device=options.device, dtype=options.dtype)
    lm = ranker.engine.lm
    kv_dtype = check_kv_dtype(options.kv_dtype) if options.kv_dtype else kv_dtype_of(lm.dtype)
    previous = None
    if (out / "manifest.json").is_file():
        previous = Manifest.load(out)
        check_compatible(previous, lm, ranker.builder.template.to_dict(), kv_dtype)
        if len(previous.nodes) != options.nodes:
            raise ValueError(
                f"the cache at {out} has {len(previous.nodes)} nodes; to grow it use "
                f"`rcllm cache add-node --out {out}` (moves whole clusters, recomputes nothing)"
            )
    items = load_catalog(
        catalog, max_item_tokens=options.max_item_tokens,
        count_tokens=lambda item: int(item_block_ids(ranker, item).numel()),
    )
    if not items:
        raise ValueError(f"{catalog}: the catalog has no items")
    by_id = {item["id"]: item for item in items}
    users, sequences = _read_histories(options, set(by_id))
    item_ids = [item["id"] for item in items]
    token_ids = [item_block_ids(ranker, item) for item in items]
    tokens = np.array([t.numel() for t in token_ids], dtype=np.int64)
    seconds["validate"] = time.perf_counter() - t0

    # Embed and place, unless a placement of exactly these items on this many nodes is saved.
    pdir = placement_dir(out)
    t = time.perf_counter()
    placement = embeddings = None
    if (pdir / ITEM_IDS).is_file() and (pdir / EMBEDDINGS).is_file():
        try:
            saved = load_placement(pdir)
            if json.loads((pdir / ITEM_IDS).read_text()) == item_ids and saved.n_nodes == options.nodes:
                placement, embeddings = saved, np.load(pdir / EMBEDDINGS)
                reporter.log(f"reusing the placement saved in {pdir}")
        except (ValueError, FileNotFoundError):
            placement = None
    if placement is None:
        embedder = get_embedder(options.embedder, lm=lm, device=options.device)
        advance = reporter.phase(f"embed ({options.embedder})", len(items))
        embeddings = embedder.embed([item_text(i) for i in items], progress=advance)
        seconds["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        index = {item_id: n for n, item_id in enumerate(item_ids)}
        sequences_idx = [[index[i] for i in seq] for seq in sequences]
        placed = reporter.phase("cluster and place", 1)
        placement = pl.place_items(embeddings, tokens, options.nodes, histories=sequences_idx or None, seed=options.seed)
        placed(1)
        pdir.mkdir(parents=True, exist_ok=True)
        write_file(pdir / EMBEDDINGS, _npy_bytes(embeddings))
        save_placement(placement, pdir)
        write_file(pdir / ITEM_IDS, json.dumps(item_ids))
        seconds["place"] = time.perf_counter() - t
    write_file(pdir / ITEM_KEYS, json.dumps([key_for(ranker, ids) for ids in token_ids]))
    write_catalog(items, out / CATALOG_COPY)

    # Precompute KV: item blocks on their node, history blocks replicated under users/.
    t = time.perf_counter()
    context = context_block(ranker)
    computed = reused = 0
    item_node = placement.item_node
    advance = reporter.phase("item KV blocks", len(items))
    for k in range(options.nodes):
        wanted = {key_for(ranker, token_ids[n]): token_ids[n] for n in np.flatnonzero(item_node == k)}
        with BlockStore(node_dir(out, k), create=True, max_shard_bytes=options.max_shard_mb << 20, kv_dtype=kv_dtype) as store:
            c, r = _fill_store(ranker, store, wanted, context, options.batch_size, advance)
        computed, reused = computed + c, reused + r
    seconds["item_kv"] = time.perf_counter() - t
    t = time.perf_counter()
    advance = reporter.phase("history KV blocks", len(users))
    wanted = {}
    for history in users.values():
        ids = history_block_ids(ranker, by_id, history, options.history)
        wanted[key_for(ranker, ids)] = ids
    with BlockStore(users_dir(out), create=True, max_shard_bytes=options.max_shard_mb << 20, kv_dtype=kv_dtype) as store:
        c, r = _fill_store(ranker, store, wanted, context, options.batch_size, advance)
    write_histories(users, users_dir(out) / HISTORIES_COPY)
    computed, reused = computed + c, reused + r
    seconds["history_kv"] = time.perf_counter() - t

    index = {item_id: n for n, item_id in enumerate(item_ids)}
    sequences_idx = [[index[i] for i in seq] for seq in sequences]
    quality = _quality(embeddings, item_ids, item_node, sequences_idx, options.nodes, options.seed)
    nodes = _node_summary(out, placement, options.nodes)
    with BlockStore.open_readonly(users_dir(out)) as store:
        user_stats = store.stats()
    total_bytes = sum(n["bytes"] for n in nodes) + user_stats["bytes"]
    total_tokens = int(tokens.sum()) + user_stats["tokens"]
    report = BuildReport(
        out=out, items=len(items), users=len(users), nodes=nodes, seconds=seconds, quality=quality,
        computed_blocks=computed, reused_blocks=reused,
        bytes_per_token=total_bytes / total_tokens if total_tokens else 0.0,
        expected_bytes_per_token=expected_bytes_per_token(ranker, kv_dtype), imbalance=placement.imbalance(),
    )
    seconds["total"] = time.perf_counter() - t0
    manifest = previous or Manifest()
    manifest.model = model_record(lm)
    manifest.kv_dtype = kv_dtype
    manifest.template = ranker.builder.template.to_dict()
    manifest.block_context = {"token_ids": ranker.builder.system_ids().tolist(), "key": context_hash(ranker.builder.system_ids())}
    manifest.nodes = previous.nodes if previous else default_nodes(options.nodes)
    manifest.placement = placement_summary(placement, options.embedder, options.seed)
    manifest.items = {"count": len(items), "tokens": int(tokens.sum()), "catalog_sha256": file_sha256(out / CATALOG_COPY),
                      "max_item_tokens": options.max_item_tokens}
    manifest.users = {"count": len(users), "history": options.history}
    manifest.build = {"seconds": {k: round(v, 3) for k, v in seconds.items()}, "quality": quality,
                      "computed_blocks": computed, "reused_blocks": reused, "bytes_per_token": report.bytes_per_token,
                      "expected_bytes_per_token": report.expected_bytes_per_token, "batch_size": options.batch_size,
                      "device": options.device}
    manifest.save(out)
    return report


def placement_summary(placement: Placement, embedder: str, seed: int) -> dict:
    item_node = placement.item_node
    return {
        "n_clusters": int(len(placement.centroids)),
        "n_nodes": placement.n_nodes,
        "items_per_node": np.bincount(item_node, minlength=placement.n_nodes).tolist(),
        "tokens_per_node": placement.node_tokens().tolist(),
        "imbalance": round(placement.imbalance(), 4),
        "embedder": embedder,
        "seed": seed,
    }


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    return buffer.getvalue()


# -- growing a cache ------------------------------------------------------------------------


def _committed_placement(pdir: Path) -> tuple[Placement, list[str], list[str]]:
    """The placement, item ids and keys as last committed. ``items.json`` is written last by
    every operation: rows beyond it belong to an append that stopped midway and are dropped."""
    placement = load_placement(pdir)
    item_ids = json.loads((pdir / ITEM_IDS).read_text())
    keys = json.loads((pdir / ITEM_KEYS).read_text())[: len(item_ids)]
    n = len(item_ids)
    if len(placement.item_cluster) < n or len(keys) < n:
        raise ValueError(f"{pdir}: the placement files disagree with items.json; rebuild the cache")
    placement.item_cluster = placement.item_cluster[:n]
    placement.item_tokens = placement.item_tokens[:n]
    return placement, item_ids, keys


def append_items(catalog: Path, options: BuildOptions, reporter: Reporter | None = None, ranker: Ranker | None = None) -> BuildReport:
    """Place new items by nearest centroid and compute only their blocks; nothing else moves."""
    reporter = reporter or Reporter()
    out = Path(options.out)
    t0 = time.perf_counter()
    manifest = Manifest.load(out)
    ranker = ranker or open_ranker(options.model, device=options.device, dtype=options.dtype)
    kv_dtype = check_kv_dtype(options.kv_dtype) if options.kv_dtype else kv_dtype_of(ranker.engine.lm.dtype)
    check_compatible(manifest, ranker.engine.lm, ranker.builder.template.to_dict(), kv_dtype)
    pdir = placement_dir(out)
    placement, item_ids, keys = _committed_placement(pdir)
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
    if new:
        embedder = get_embedder(manifest.placement.get("embedder", options.embedder), lm=ranker.engine.lm, device=options.device)
        embeddings = embedder.embed([item_text(i) for i in new], progress=reporter.phase("embed new items", len(new)))
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
        write_file(pdir / EMBEDDINGS, _npy_bytes(all_embeddings))
        save_placement(placement, pdir)
        write_file(pdir / ITEM_KEYS, json.dumps(keys + new_keys))
        write_file(pdir / ITEM_IDS, json.dumps(item_ids + [i["id"] for i in new]))
    merged = {**existing, **{i["id"]: i for i in new}}
    write_catalog(list(merged.values()), out / CATALOG_COPY)
    n_nodes = placement.n_nodes
    manifest.placement = placement_summary(placement, manifest.placement.get("embedder", options.embedder), manifest.placement.get("seed", 0))
    manifest.items = {**manifest.items, "count": len(merged), "tokens": int(placement.item_tokens.sum()),
                      "catalog_sha256": file_sha256(out / CATALOG_COPY)}
    manifest.save(out)
    nodes_summary = _node_summary(out, placement, n_nodes)
    total_bytes = sum(n["bytes"] for n in nodes_summary)
    return BuildReport(
        out=out, items=len(merged), users=manifest.users.get("count", 0), nodes=nodes_summary,
        seconds={"append": time.perf_counter() - t0}, quality={}, computed_blocks=len(new), reused_blocks=0,
        bytes_per_token=total_bytes / max(1, int(placement.item_tokens.sum())),
        expected_bytes_per_token=expected_bytes_per_token(ranker, kv_dtype), imbalance=placement.imbalance(),
        notes=[f"{len(new)} new items placed by nearest centroid; {len(incoming) - len(new)} already in the cache"],
    )


def add_node(cache: Path) -> dict:
    """Hand a new node whole clusters from the fullest nodes; move only their blocks (no model needed).

    The grown placement is saved before the manifest names the new node, so a run that stopped
    in between is finished by the next one instead of growing the cluster twice.
    """
    out = Path(cache)
    manifest = Manifest.load(out)
    pdir = placement_dir(out)
    placement, _, keys = _committed_placement(pdir)
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
    manifest.placement = placement_summary(grown, manifest.placement.get("embedder", "minilm"), manifest.placement.get("seed", 0))
    manifest.save(out)
    moved_keys = {keys[int(r)] for r in moved}
    for k in range(old_nodes):  # the new node owns them now: drop the old copies
        with BlockStore(node_dir(out, k)) as store:
            if store.delete_many([key for key in moved_keys if key in store]):
                store.compact()
    return {
        "node": new_node, "nodes": grown.n_nodes, "items": int(len(moved)),
        "clusters": int(len(set(grown.item_cluster[moved].tolist()))),
        "bytes_moved": moved_bytes, "bytes_total": total, "fraction": moved_bytes / total if total else 0.0,
        "imbalance": grown.imbalance(),
    }
