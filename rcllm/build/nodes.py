"""``rcllm build-cache --node K`` and ``--user-blocks [--part K]``: build one store of a planned
cache (or every part of its history blocks).

A store is built from the planned folder alone (manifest, placement, catalog copy, histories
copy), so N machines can each build one node of a shared or copied folder at once. A builder
writes inside its own store folder only: its blocks (crash-safe shard by shard, resumed by a
rerun) and, last, its completion record (:mod:`rcllm.store.built`). It never writes the
manifest, so builders never race on a file, and a finished node folder copied next to the others
is as built as if it had been built there.

Before anything is computed the builder checks that the folder is planned, that the model (and
dtype and template) is the plan's, that the catalog copy is the one planned (and the catalog
given, if any) and that the blocks it would compute are exactly the ones the plan puts in the
store: a mismatch is an error, and the store is left as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rcllm.build.blocks import context_block, fill_store, history_block_ids, item_block_ids, key_for
from rcllm.build.options import BuildOptions, Reporter
from rcllm.build.plan import committed_placement
from rcllm.data.catalog import load_catalog
from rcllm.data.formats import load_histories
from rcllm.engine.api import DTYPES, open_ranker
from rcllm.engine.ranker import Ranker
from rcllm.files import file_sha256
from rcllm.store import BlockStore, IncompatibleCacheError, Manifest, check_compatible, node_dir, placement_dir, users_dir
from rcllm.store.built import (
    clear_built,
    keys_digest,
    node_store,
    store_root,
    store_state,
    user_part,
    user_parts,
    user_stores,
    write_built,
)
from rcllm.store.layout import CATALOG_COPY, HISTORIES_COPY
from rcllm.store.manifest import stored_kv_dtype


@dataclass
class StoreBuild:
    """What building one store did: its completion record, and the blocks computed and reused."""

    store: str  # node-<k>, users or users-<k>
    computed: int
    reused: int
    seconds: float
    record: dict


def load_plan(out: Path) -> Manifest:
    """The manifest of a planned cache folder; a clear error for a folder that is not one."""
    out = Path(out)
    try:
        manifest = Manifest.load(out)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{out} is not a planned cache (no manifest.json): plan it first with "
            f"`rcllm build-cache CATALOG --plan --out {out}`, then build its nodes"
        ) from None
    if not manifest.stores:
        raise ValueError(
            f"the cache at {out} was built by an older rcllm and has no plan of its stores: rerun "
            f"`rcllm build-cache CATALOG --out {out}` (it reuses every stored block) or plan it again with --plan"
        )
    return manifest


def plan_options(out: Path, **given) -> BuildOptions:
    """Options to build a store of the plan at ``out``: its model, dtype, KV dtype and node count,
    with the ``given`` values (not None) in their place (``device``, ``batch_size``, another
    ``model`` path)."""
    manifest = load_plan(out)
    flags = {str(t).removeprefix("torch."): flag for flag, t in DTYPES.items()}
    options = BuildOptions(out=Path(out), nodes=len(manifest.nodes), model=manifest.model.get("name", ""),
                           dtype=flags.get(manifest.model.get("dtype"), "fp32"), kv_dtype=stored_kv_dtype(manifest))
    return replace(options, **{k: v for k, v in given.items() if v is not None})


def build_node(
    out: Path, node: int, options: BuildOptions | None = None, reporter: Reporter | None = None,
    ranker: Ranker | None = None, catalog: Path | None = None,
) -> StoreBuild:
    """Compute node ``node``'s item blocks of the plan at ``out`` (resumes: reuses what is durable).

    ``options``: device, batch size, shard size and model (default :func:`plan_options`);
    ``catalog``: if given, it must be the catalog the folder was planned from.
    """
    out = Path(out)
    manifest = load_plan(out)
    n_nodes = len(manifest.nodes)
    if not 0 <= node < n_nodes:
        raise ValueError(f"--node {node}: the cache at {out} is planned on nodes 0..{n_nodes - 1}")
    options = options or plan_options(out)
    items = _planned_catalog(out, manifest, catalog)
    ranker = _planned_ranker(manifest, options, ranker)
    placement, item_ids, keys = committed_placement(placement_dir(out))
    if placement.n_nodes != n_nodes:
        raise ValueError(f"{placement_dir(out)} places items on {placement.n_nodes} nodes, the manifest lists {n_nodes}: "
                         "plan the cache again")
    wanted = {}
    for row in np.flatnonzero(placement.item_node == node):
        item = items.get(item_ids[row])
        if item is None:
            raise ValueError(f"{placement_dir(out)} places item {item_ids[row]!r}, which the catalog copy lacks: "
                             "plan the cache again")
        ids = item_block_ids(ranker, item)
        wanted[key_for(ranker, ids)] = ids
    return _build_store(ranker, out, node_store(node), wanted, manifest, options, reporter or Reporter(),
                        f"node {node}: item KV blocks")


def build_users(
    out: Path, options: BuildOptions | None = None, reporter: Reporter | None = None,
    ranker: Ranker | None = None, catalog: Path | None = None, part: int | None = None,
) -> list[StoreBuild]:
    """Compute the replicated history blocks of the plan at ``out`` (of the histories copied at
    planning; none planned: an empty store): part ``part`` of them only, or (None) every part in
    turn, one store each. Same options and checks as :func:`build_node`; every part's planned
    keys are checked before any is built."""
    out = Path(out)
    manifest = load_plan(out)
    parts = user_parts(manifest)
    if part is not None and not 0 <= part < parts:
        whole = f" (one part: `rcllm build-cache --user-blocks --out {out}` builds it)" if parts == 1 else ""
        raise ValueError(f"--part {part}: the cache at {out} splits its history blocks into parts 0..{parts - 1}{whole}")
    options = options or plan_options(out)
    items = _planned_catalog(out, manifest, catalog)
    ranker = _planned_ranker(manifest, options, ranker)
    copy = users_dir(out) / HISTORIES_COPY
    users = load_histories(copy, items=items, strict=True)[0] if copy.is_file() else {}
    length = int(manifest.users.get("history", 0))
    todo = list(range(parts)) if part is None else [part]
    wanted: dict[int, dict] = {k: {} for k in todo}
    for user, history in users.items():
        k = user_part(user, parts)
        if k in wanted:  # only this part's users are tokenized
            ids = history_block_ids(ranker, items, history, length)
            wanted[k][key_for(ranker, ids)] = ids
    names = user_stores(manifest)
    for k in todo:
        _check_planned(out, names[k], wanted[k], manifest)
    reporter = reporter or Reporter()
    return [_build_store(ranker, out, names[k], wanted[k], manifest, options, reporter,
                         "history KV blocks" + (f", part {k} of 0..{parts - 1}" if parts > 1 else "")) for k in todo]


def _planned_catalog(out: Path, manifest: Manifest, catalog: Path | None) -> dict[str, dict]:
    """The planned items by id, from the folder's catalog copy (checked against the manifest)."""
    copy = out / CATALOG_COPY
    if catalog is not None:
        given = file_sha256(catalog)
        if given not in (manifest.items.get("source_sha256"), manifest.items.get("catalog_sha256")):
            raise ValueError(
                f"{catalog} is not the catalog the cache at {out} was planned from (sha256 {given[:12]}, planned "
                f"{str(manifest.items.get('source_sha256'))[:12]}): leave the catalog out to build from the plan's "
                f"copy, or plan again with `rcllm build-cache {catalog} --plan --out {out}`"
            )
    if not copy.is_file() or file_sha256(copy) != manifest.items.get("catalog_sha256"):
        raise ValueError(
            f"{copy} is missing or was changed after the cache was planned: copy the planned folder whole, "
            f"or plan it again with `rcllm build-cache CATALOG --plan --out {out}`"
        )
    return {item["id"]: item for item in load_catalog(copy)}


def _planned_ranker(manifest: Manifest, options: BuildOptions, ranker: Ranker | None) -> Ranker:
    ranker = ranker or open_ranker(options.model, device=options.device, dtype=options.dtype, label_offsets=False)
    check_compatible(manifest, ranker.engine.lm, ranker.builder.template.to_dict(), options.kv_dtype)
    return ranker


def _build_store(
    ranker: Ranker, out: Path, name: str, wanted: dict, manifest: Manifest, options: BuildOptions,
    reporter: Reporter, phase: str,
) -> StoreBuild:
    """Fill store ``name`` with ``wanted`` (key -> token ids), dropping other blocks, then record
    it built. The plan's keys for the store are checked first: a mismatch changes nothing."""
    _check_planned(out, name, wanted, manifest)
    started = time.perf_counter()
    root = store_root(out, name)
    advance = reporter.phase(phase, len(wanted))
    context = context_block(ranker)
    kv_dtype = stored_kv_dtype(manifest)  # the plan's: every store of a cache keeps KV alike
    with BlockStore(root, create=True, max_shard_bytes=options.max_shard_mb << 20, kv_dtype=kv_dtype) as store:
        clear_built(root)  # until the new record, this store is not built
        computed, reused = fill_store(ranker, store, wanted, context, options.batch_size, advance)
        seconds = time.perf_counter() - started
        record = write_built(store, manifest.model["fingerprint"], {
            "computed_blocks": computed, "reused_blocks": reused, "seconds": round(seconds, 3),
            "device": options.device, "batch_size": options.batch_size,
        })
    return StoreBuild(name, computed, reused, seconds, record)


def _check_planned(out: Path, name: str, wanted: dict, manifest: Manifest) -> None:
    """Refuse to build store ``name`` with other blocks than the plan's for it."""
    planned = manifest.stores.get(name)
    if planned is None or keys_digest(wanted) != planned["keys_sha256"]:
        raise IncompatibleCacheError(
            f"the {len(wanted)} blocks this build would put in {name} are not the {planned and planned['blocks']} "
            f"the plan at {out} puts there (another model, template or history length than the plan's?): "
            f"build with the plan's model, or plan again"
        )


def record_stores(out: Path, manifest: Manifest, names: list[str], step: str) -> None:
    """Rewrite the completion records of the stores a whole-cache step (append, add-node) may
    have changed, unless still right. A record says what its store holds, so a store that was not
    built before (a node of a plan not built yet) stays not built; one not started is left alone."""
    for name in names:
        if store_state(out, manifest, name).built:
            continue
        try:
            store = BlockStore(store_root(out, name))
        except FileNotFoundError:
            continue
        with store:
            write_built(store, manifest.model["fingerprint"], {"step": step})


def node_summary(out: Path, placement, n_nodes: int) -> list[dict]:
    """Per node: items placed on it, their tokens, and the blocks and bytes its store holds."""
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
