"""``rcllm build-cache --plan``: validate, embed (or read the user's vectors), cluster and place,
and describe the cache: everything but KV.

The history blocks are planned into ``--user-parts`` stores (``users``, or ``users-0`` ..
``users-<N-1>``), a user's block in part :func:`~rcllm.store.built.user_part` (a stable hash of the
user id, balanced by user count in expectation), each built apart like a node's store.

The plan writes, in order: the placement (``placement/``: the vectors, each item's cluster and
node, the item ids and block keys), the catalog copy, the users' histories copy, then the
manifest, which says what every store holds once built. The stores are then built from the
folder alone (:mod:`rcllm.build.nodes`), in this process or on any machine the folder is shared
with or copied to. A validation error stops the plan before anything on disk is touched; planning
the same items on as many nodes again reuses the saved placement (no embedding, no clustering).
"""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rcllm.build import placement as pl
from rcllm.build.blocks import expected_bytes_per_token, history_block_ids, item_block_ids, key_for
from rcllm.build.embed import get_embedder
from rcllm.build.options import BuildOptions, Reporter
from rcllm.build.vectors import GivenEmbeddings, load_embeddings
from rcllm.data.catalog import load_catalog, write_catalog
from rcllm.data.formats import load_histories, load_interactions, write_histories
from rcllm.engine.api import open_ranker
from rcllm.engine.blocks import context_hash
from rcllm.engine.prompt import item_text
from rcllm.engine.ranker import Ranker
from rcllm.files import file_sha256, write_file
from rcllm.store import Manifest, check_compatible, default_nodes, model_record, placement_dir, users_dir
from rcllm.store.built import USERS_STORE, expected_store, node_store, user_part, user_part_store
from rcllm.store.codec import check_kv_dtype, kv_dtype_of
from rcllm.store.layout import CATALOG_COPY, EMBEDDINGS, HISTORIES_COPY, ITEM_IDS, ITEM_KEYS
from rcllm.store.manifest import MANIFEST_NAME
from rcllm.store.placement import Placement, load_placement, save_placement


@dataclass
class PlanReport:
    out: Path
    items: int
    users: int
    nodes: list[dict]  # per node: node, items, tokens, blocks (as planned)
    seconds: dict[str, float]
    quality: dict[str, dict[str, float]]  # placement name -> measures
    imbalance: float
    embeddings: dict  # where the vectors placed by came from (the manifest's placement record)
    kv_dtype: str  # how the stores will keep KV
    user_parts: list[dict] = field(default_factory=list)  # per part of the history blocks: part, users, blocks, tokens
    notes: list[str] = field(default_factory=list)


def plan_cache(catalog: Path, options: BuildOptions, reporter: Reporter | None = None, ranker: Ranker | None = None) -> PlanReport:
    """Plan the cache in ``options.out`` for ``catalog``: no KV is computed, every store is left to build."""
    reporter = reporter or Reporter()
    out = Path(options.out)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if options.nodes < 1:
        raise ValueError("--nodes must be at least 1")
    if options.user_parts < 1:
        raise ValueError("--user-parts must be at least 1")
    if options.user_parts > 1 and not options.users:
        raise ValueError(f"--user-parts {options.user_parts} splits the history blocks of --users histories.jsonl, "
                         "and none is given: add --users, or leave --user-parts out")
    ranker = ranker or open_ranker(options.model, device=options.device, dtype=options.dtype, label_offsets=False)
    lm = ranker.engine.lm
    kv_dtype = check_kv_dtype(options.kv_dtype) if options.kv_dtype else kv_dtype_of(lm.dtype)
    previous = None
    if (out / MANIFEST_NAME).is_file():
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
    users, sequences = read_histories(options, set(by_id))
    item_ids = [item["id"] for item in items]
    token_ids = [item_block_ids(ranker, item) for item in items]
    tokens = np.array([t.numel() for t in token_ids], dtype=np.int64)
    given = load_embeddings(options.embeddings, item_ids, options.embedding_ids) if options.embeddings else None
    seconds["validate"] = time.perf_counter() - t0

    pdir = placement_dir(out)
    embedder = "file" if given is not None else options.embedder
    source = given.record() if given is not None else {"source": "embedder", "embedder": options.embedder}
    t = time.perf_counter()
    placement, embeddings = _saved_placement(pdir, item_ids, options.nodes, given, previous, embedder)
    if placement is not None:
        reporter.log(f"reusing the placement saved in {pdir}")
    else:
        if given is not None:
            embeddings = given.vectors
            reporter.log(f"placing by the {embeddings.shape[1]}-dim vectors in {given.path} (no embedding pass)")
        else:
            embeddings = embed_items(options.embedder, items, ranker, options.device, reporter)
            seconds["embed"] = time.perf_counter() - t
            t = time.perf_counter()
        index = {item_id: n for n, item_id in enumerate(item_ids)}
        placed = reporter.phase("cluster and place", 1)
        placement = pl.place_items(embeddings, tokens, options.nodes, histories=_rows(sequences, index) or None,
                                   seed=options.seed)
        placed(1)
        pdir.mkdir(parents=True, exist_ok=True)
        write_file(pdir / EMBEDDINGS, npy_bytes(embeddings))
        save_placement(placement, pdir)
        write_file(pdir / ITEM_IDS, json.dumps(item_ids))
        seconds["place"] = time.perf_counter() - t
    keys = [key_for(ranker, ids) for ids in token_ids]
    write_file(pdir / ITEM_KEYS, json.dumps(keys))
    write_catalog(items, out / CATALOG_COPY)
    write_histories(users, users_dir(out) / HISTORIES_COPY)

    parts = options.user_parts
    user_blocks: list[dict[str, int]] = [{} for _ in range(parts)]  # per part: key -> tokens
    part_users = [0] * parts
    for user, history in users.items():
        ids = history_block_ids(ranker, by_id, history, options.history)
        k = user_part(user, parts)
        user_blocks[k][key_for(ranker, ids)] = int(ids.numel())
        part_users[k] += 1
    index = {item_id: n for n, item_id in enumerate(item_ids)}
    quality = _quality(embeddings, item_ids, placement.item_node, _rows(sequences, index), options.nodes, options.seed)
    seconds["total"] = time.perf_counter() - t0
    manifest = previous or Manifest()
    manifest.model = model_record(lm)
    manifest.kv_dtype = kv_dtype
    manifest.template = ranker.builder.template.to_dict()
    manifest.block_context = {"token_ids": ranker.builder.system_ids().tolist(), "key": context_hash(ranker.builder.system_ids())}
    manifest.nodes = previous.nodes if previous else default_nodes(options.nodes)
    manifest.placement = placement_summary(placement, embedder, options.seed, source)
    manifest.items = {"count": len(items), "tokens": int(tokens.sum()), "catalog_sha256": file_sha256(out / CATALOG_COPY),
                      "source_sha256": file_sha256(catalog), "max_item_tokens": options.max_item_tokens}
    manifest.users = {"count": len(users), "history": options.history, **({"parts": parts} if parts > 1 else {})}
    user_stores = {USERS_STORE: expected_store(user_blocks[0])} if parts == 1 else {
        user_part_store(k): expected_store(blocks) for k, blocks in enumerate(user_blocks)}
    manifest.stores = {**planned_node_stores(placement, keys), **user_stores}
    manifest.build = {"seconds": {k: round(v, 3) for k, v in seconds.items()}, "quality": quality,
                      "expected_bytes_per_token": expected_bytes_per_token(ranker, kv_dtype), "device": options.device}
    manifest.save(out)
    nodes = [{"node": k, "items": int((placement.item_node == k).sum()), "tokens": manifest.stores[node_store(k)]["tokens"],
              "blocks": manifest.stores[node_store(k)]["blocks"]} for k in range(options.nodes)]
    return PlanReport(out=out, items=len(items), users=len(users), nodes=nodes, seconds=seconds, quality=quality,
                      imbalance=placement.imbalance(), embeddings=source, kv_dtype=kv_dtype,
                      user_parts=[{"part": k, "store": name, "users": part_users[k], "blocks": planned["blocks"],
                                   "tokens": planned["tokens"]} for k, (name, planned) in enumerate(user_stores.items())])


def planned_node_stores(placement: Placement, keys: list[str]) -> dict[str, dict]:
    """What each node's store holds once built: the blocks of the items placed on it."""
    stores = {}
    for k in range(placement.n_nodes):
        rows = np.flatnonzero(placement.item_node == k)
        stores[node_store(k)] = expected_store({keys[r]: int(placement.item_tokens[r]) for r in rows})
    return stores


def embed_items(spec: str, items: list[dict], ranker: Ranker, device: str, reporter: Reporter) -> np.ndarray:
    """The vectors of ``items`` by embedder ``spec`` (rcllm.build.embed)."""
    embedder = get_embedder(spec, lm=ranker.engine.lm, device=device)
    advance = reporter.phase(f"embed ({spec})", len(items))
    return embedder.embed([item_text(i) for i in items], progress=advance)


def _saved_placement(
    pdir: Path, item_ids: list[str], n_nodes: int, given: GivenEmbeddings | None, previous: Manifest | None, embedder: str
) -> tuple[Placement | None, np.ndarray | None]:
    """The saved placement and vectors if they place exactly these items on as many nodes, by
    the same vectors (a given file's, compared exactly) or the same embedder; else (None, None)."""
    if not ((pdir / ITEM_IDS).is_file() and (pdir / EMBEDDINGS).is_file()):
        return None, None
    try:
        saved = load_placement(pdir)
        if json.loads((pdir / ITEM_IDS).read_text()) != item_ids or saved.n_nodes != n_nodes:
            return None, None
        vectors = np.load(pdir / EMBEDDINGS)
    except (ValueError, FileNotFoundError):
        return None, None
    if given is not None:
        same = vectors.shape == given.vectors.shape and np.array_equal(vectors, given.vectors)
    else:
        same = previous is None or previous.placement.get("embedder", embedder) == embedder
    return (saved, vectors) if same else (None, None)


def read_histories(options: BuildOptions, catalog_ids: set[str]) -> tuple[dict[str, list[str]], list[list[str]]]:
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


def _rows(sequences: list[list[str]], index: dict[str, int]) -> list[list[int]]:
    return [[index[i] for i in seq] for seq in sequences]


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


def placement_summary(placement: Placement, embedder: str, seed: int, embeddings: dict | None = None) -> dict:
    """The manifest's placement record; ``embeddings``: where the vectors came from (a file's
    path and sha256, or the embedder)."""
    item_node = placement.item_node
    summary = {
        "n_clusters": int(len(placement.centroids)),
        "n_nodes": placement.n_nodes,
        "items_per_node": np.bincount(item_node, minlength=placement.n_nodes).tolist(),
        "tokens_per_node": placement.node_tokens().tolist(),
        "imbalance": round(placement.imbalance(), 4),
        "embedder": embedder,
        "seed": seed,
    }
    if embeddings is not None:
        summary["embeddings"] = embeddings
    return summary


def committed_placement(pdir: Path) -> tuple[Placement, list[str], list[str]]:
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


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    return buffer.getvalue()
