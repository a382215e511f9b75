"""Which stores of a cache are built: each store's own completion record, checked against the plan.

A cache is planned once (``rcllm build-cache --plan``: placement, catalog copy, manifest), then
its stores (``node-<k>/`` and ``users/``) are built, by one process or by N processes on N
machines, into one shared folder or into copies whose store folders are put side by side later.
The manifest says what each store holds once built (``Manifest.stores``: its block count, its
tokens, the sha256 of its sorted keys); only planning writes it. Each builder writes inside its
own store folder only, and last of all ``built.json``: what the store holds (count, tokens, the
digest of its keys and of its blocks' checksums, the model), so no two builders ever write one
file and a copied store folder carries its own proof of completion.

A store is built when its record describes what the plan asks of it, for the plan's model. A
builder removes the record before it changes the store, so a killed build leaves none: half-built.

The history blocks are one store, ``users/``, or, planned with ``--user-parts N`` (N > 1), N stores
``users-0/`` .. ``users-<N-1>/`` built apart like node stores: user u's history block goes to
part :func:`user_part` (u, N), a stable hash of the user id (not of its history), so each part's
builder reads only its own users' histories, parts are balanced by user count in expectation,
and planning again with more users never moves a user to another part. Two users of different
parts with the same recent history each have the block in their part.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rcllm.files import fsync_dir, write_file
from rcllm.store.manifest import Manifest, node_dir, users_dir
from rcllm.store.shards import BlockStore

BUILT_RECORD = "built.json"
USERS_STORE = "users"
USER_PART_PREFIX = "users-"  # part k of the history blocks: store (and folder) users-<k>


class StoreNotBuiltError(ValueError):
    """A store the plan names is not completely built: serving it would miss blocks."""


def node_store(k: int) -> str:
    """The name of node k's store in ``Manifest.stores`` (its folder's name)."""
    return node_dir(Path(), k).name


def user_part_store(k: int) -> str:
    """The name (and folder) of part k of the history blocks, when there are several parts."""
    return f"{USER_PART_PREFIX}{k}"


def user_parts(manifest: Manifest) -> int:
    """Into how many stores the plan splits the history blocks (1: the one store ``users``)."""
    return int(manifest.users.get("parts", 1))


def user_stores(manifest: Manifest) -> list[str]:
    """The stores that hold the history blocks: ``users``, or ``users-0`` .. ``users-<N-1>``."""
    parts = user_parts(manifest)
    return [USERS_STORE] if parts == 1 else [user_part_store(k) for k in range(parts)]


def user_part(user_id: str, parts: int) -> int:
    """The part whose store holds user ``user_id``'s history block: the first 8 bytes of the
    sha256 of the id, modulo ``parts`` (stable across processes, machines and plans)."""
    if parts == 1:
        return 0
    return int.from_bytes(hashlib.sha256(str(user_id).encode()).digest()[:8], "big") % parts


def is_user_store(name: str) -> bool:
    return name == USERS_STORE or (name.startswith(USER_PART_PREFIX) and name[len(USER_PART_PREFIX):].isdigit())


def keys_digest(keys: Iterable[str]) -> str:
    """sha256 of the distinct keys, sorted, one per line: names exactly the blocks a store holds."""
    return hashlib.sha256("".join(f"{key}\n" for key in sorted(set(keys))).encode()).hexdigest()


def expected_store(key_tokens: Mapping[str, int]) -> dict:
    """What the plan asks of a store that holds the blocks ``key -> token count``."""
    return {"blocks": len(key_tokens), "tokens": int(sum(key_tokens.values())), "keys_sha256": keys_digest(key_tokens)}


def write_built(store: BlockStore, fingerprint: str, extra: Mapping | None = None) -> dict:
    """Record what ``store`` (open for writing, flushed) holds now, as its ``built.json``.

    The record only describes the store; whether that is what the plan asks is for the reader
    to compare. ``checksums_sha256`` is equal for two stores exactly when they hold the same
    blocks bit for bit (a block's checksum covers its K, V and token ids).
    """
    store.flush()
    keys = sorted(store.keys())
    entries = [store.entry(key) for key in keys]
    checksums = hashlib.sha256("".join(f"{k} {e['checksum']}\n" for k, e in zip(keys, entries)).encode())
    stats = store.stats()
    record = {
        "store": store.root.name,
        "blocks": len(keys),
        "tokens": stats["tokens"],
        "bytes": stats["bytes"],
        "keys_sha256": keys_digest(keys),
        "checksums_sha256": checksums.hexdigest(),
        "fingerprint": fingerprint,
        **dict(extra or {}),
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_file(store.root / BUILT_RECORD, json.dumps(record, indent=2) + "\n")
    return record


def clear_built(root: Path) -> None:
    """Remove a store's record before changing the store: until a new one is written, it is unbuilt."""
    path = Path(root) / BUILT_RECORD
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


def read_built(root: Path) -> dict | None:
    """The store's record, or None if it has none (or an unreadable one: as good as none)."""
    try:
        record = json.loads((Path(root) / BUILT_RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class StoreState:
    name: str  # node-<k>, users or users-<k>
    built: bool
    needed: bool  # False: the plan puts no block in it (a cache without user histories)
    reason: str  # why not built, in words; "" when built
    expected: dict
    record: dict | None

    @property
    def label(self) -> str:
        return "built" if self.built else ("not built" if self.needed else "nothing to build")


def store_root(cache_dir: Path, name: str) -> Path:
    return users_dir(cache_dir) if name == USERS_STORE else Path(cache_dir) / name


def store_state(cache_dir: Path, manifest: Manifest, name: str) -> StoreState:
    """Whether store ``name`` is built as the cache's plan says."""
    root = store_root(cache_dir, name)
    expected = manifest.stores.get(name)
    record = read_built(root)
    needed = not is_user_store(name) or not expected or expected["blocks"] > 0
    if expected is None:
        reason = ("the manifest plans no stores (a cache from an older rcllm): rerun `rcllm build-cache CATALOG "
                  "--out DIR` on it, which reuses every stored block and records each store")
        return StoreState(name, False, True, reason, {}, record)
    if record is None:
        held = _held_blocks(root)
        reason = (f"half-built: {held} of its {expected['blocks']} blocks stored, no completion record (its build "
                  "stopped before the end, or is running)" if held else "no blocks built yet")
    elif record.get("fingerprint") != manifest.model.get("fingerprint"):
        reason = f"its blocks were computed by another model (fingerprint {str(record.get('fingerprint'))[:12]})"
    elif record.get("keys_sha256") != expected["keys_sha256"] or record.get("blocks") != expected["blocks"]:
        reason = (f"out of date: it holds {record.get('blocks')} blocks, not the {expected['blocks']} blocks the "
                  "plan puts on it (the cache was planned again since, or grown)")
    else:
        return StoreState(name, True, needed, "", expected, record)
    return StoreState(name, False, needed, reason, expected, record)


def _held_blocks(root: Path) -> int:
    try:
        with BlockStore.open_readonly(root) as store:
            return len(store)
    except FileNotFoundError:
        return 0


def store_states(cache_dir: Path, manifest: Manifest) -> list[StoreState]:
    """Every store of the cache, nodes in order, then the history blocks' store (or parts, in order)."""
    names = [node_store(n["node"]) for n in manifest.nodes] + user_stores(manifest)
    return [store_state(cache_dir, manifest, name) for name in names]


def build_command(cache_dir: Path, name: str) -> str:
    """The command that builds (or finishes) store ``name``."""
    if name == USERS_STORE:
        step = "--user-blocks"
    elif is_user_store(name):
        step = f"--user-blocks --part {name.removeprefix(USER_PART_PREFIX)}"
    else:
        step = f"--node {name.removeprefix('node-')}"
    return f"rcllm build-cache {step} --out {cache_dir}"


def require_built(cache_dir: Path, manifest: Manifest, names: Iterable[str]) -> None:
    """Raise :class:`StoreNotBuiltError` unless every needed store of ``names`` is built."""
    missing = [s for s in (store_state(cache_dir, manifest, n) for n in names) if s.needed and not s.built]
    if missing:
        raise StoreNotBuiltError("; ".join(
            f"{s.name} of the cache at {cache_dir} is not built ({s.reason}): run `{build_command(cache_dir, s.name)}`"
            " (it resumes, reusing every block already stored)" for s in missing
        ))
