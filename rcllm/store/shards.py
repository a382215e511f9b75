"""One node's block store on disk: safetensors shard files and an LMDB index.

A store is a folder::

    index.lmdb/                    LMDB env: db "blocks" (key -> JSON entry), db "meta"
    shard-000000.safetensors       tensors "{key}/k", "{key}/v" [layers, kv_heads, n, head_dim]
    shard-000001.safetensors       and "{key}/ids" (int64 [n]), many blocks per file (int8 KV:
                                   "{key}/k_q", "{key}/k_scale", ...; see rcllm.store.codec)
    writer.lock                    held (flock) by the one process that may write

A store keeps its KV in one stored dtype (``kv_dtype``: fp32, bf16, fp16 or int8), recorded in
its index when a writer first names it; ``get`` decodes a block to the dtype it was computed in.

``put`` buffers blocks; a full buffer (or ``flush``) becomes one shard, written to a temp name,
fsynced and renamed, and only then indexed in one LMDB transaction. A crash therefore leaves
either nothing or an orphan shard the index never names; the next writer removes orphans on open
(``gc``). The index is the truth: a key is in the store once its transaction committed, so a
rerun of a build skips exactly the keys that are durable.

Readers in other processes open the store read-only (``open_readonly``) while one writer adds
shards. Shard names are never reused, so a reader holding an open handle on a shard that
compaction removed still reads the same bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import lmdb
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rcllm.engine.blocks import BlockKV
from rcllm.files import fsync_dir, fsync_file
from rcllm.store.codec import (
    CorruptBlockError,
    block_entry,
    check_kv_dtype,
    checksum,
    encode,
    parse,
    serialize,
    stored_parts,
    to_block,
)
from rcllm.store.manifest import IncompatibleCacheError

SHARD_FORMAT = "rcllm-shard/1"
_SHARD_NAME = re.compile(r"shard-(\d+)\.safetensors")
_OPEN_SHARDS = 8  # shard handles kept open per store (each is an mmap; gets hit few shards at once)
_MAX_READERS = 512  # LMDB reader slots: one per concurrent read transaction, across processes
_MAX_KEY_BYTES = 511  # LMDB's key size limit


# ---------------------------------------------------------------------------------------------
# the store


class StoreBusyError(RuntimeError):
    """Another writer holds the store (its ``writer.lock``): a second build or eval on the same folder."""


class BlockStore:
    """Blocks by key in one folder (``CACHE_DIR/node-<k>/`` or ``CACHE_DIR/users/``).

    One writer per folder at a time (enforced with a lock file); any number of read-only
    openers in other processes. LMDB forbids opening the same index twice in one process:
    share one BlockStore per folder. ``put`` is durable only after ``flush`` (or ``close``).

    ``kv_dtype``: how a writer stores KV (``fp32``, ``bf16``, ``fp16``, ``int8``), recorded in
    the index; a store that recorded another one is refused. None: as recorded, or (nothing
    recorded) each block in its own dtype.
    """

    def __init__(
        self,
        root: Path,
        create: bool = False,
        max_shard_bytes: int = 256 << 20,
        map_size: int = 1 << 36,
        *,
        readonly: bool = False,
        kv_dtype: str | None = None,
    ):
        self.root = Path(root)
        self.max_shard_bytes = max_shard_bytes
        self.readonly = readonly
        if create and not readonly:
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no block store at {self.root}: the folder does not exist")
        index = self.root / "index.lmdb"
        if not index.is_dir() and not (create and not readonly):
            raise FileNotFoundError(f"no block store at {self.root}: {index} is missing")

        self._lock_file = None
        if not readonly:
            self._lock_file = open(self.root / "writer.lock", "a+b")  # holds the flock until close
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                raise StoreBusyError(
                    f"the block store at {self.root} is open for writing elsewhere (one writer per "
                    "store, in this or another process): close that one, or open this one read-only"
                ) from None
        self._env = lmdb.open(
            str(index), subdir=True, map_size=map_size, max_dbs=2, max_readers=_MAX_READERS,
            lock=True, readonly=readonly, create=not readonly,
        )
        self._blocks = self._env.open_db(b"blocks", create=not readonly)
        self._meta = self._env.open_db(b"meta", create=not readonly)
        self._handles: OrderedDict[str, object] = OrderedDict()
        self._handles_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._pending: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}
        self._pending_bytes = 0
        self._next_seq = 0
        if not readonly:
            with self._env.begin() as txn:
                stored = int(txn.get(b"next_shard", b"0", db=self._meta))
            on_disk = [int(m.group(1)) for p in self.root.iterdir() if (m := _SHARD_NAME.match(p.name))]
            self._next_seq = max([stored, *(s + 1 for s in on_disk)])
            self.gc()
        self.kv_dtype = self._kv_dtype(kv_dtype)

    def _kv_dtype(self, wanted: str | None) -> str | None:
        """The store's KV dtype: the recorded one, which ``wanted`` must equal; else ``wanted``,
        recorded now (by a writer)."""
        with self._env.begin() as txn:
            raw = txn.get(b"kv_dtype", db=self._meta)
        recorded = None if raw is None else raw.decode()
        if wanted is None or wanted == recorded:
            return recorded
        if recorded is not None or self.readonly:
            self._release()
            if recorded is None:
                raise PermissionError(f"the block store at {self.root} was opened read-only: it records no KV dtype")
            raise IncompatibleCacheError(
                f"the block store at {self.root} holds {recorded} KV, not {wanted}: rerun with --kv-dtype "
                f"{recorded}, or build into another --out (or delete {self.root}) to store {wanted}"
            )
        check_kv_dtype(wanted)
        with self._env.begin(write=True) as txn:
            txn.put(b"kv_dtype", wanted.encode(), db=self._meta)
        return wanted

    @classmethod
    def open_readonly(cls, root: Path) -> "BlockStore":
        return cls(root, readonly=True)

    def close(self) -> None:
        """Flush pending blocks (a writer) and release the index, shard handles and lock."""
        if self._env is None:
            return
        try:
            if not self.readonly:
                self.flush()
        finally:
            self._release()

    def _release(self) -> None:
        with self._handles_lock:
            self._handles.clear()
        self._pending.clear()
        self._pending_bytes = 0
        self._env.close()
        self._env = None
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def __enter__(self) -> "BlockStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._env is not None:
            self._release()  # keep only what was durable before the error

    # -- index --------------------------------------------------------------------------------

    def entry(self, key: str) -> dict | None:
        """The durable index entry of ``key`` (shard, n_tokens, base_pos, ..., checksum)."""
        with self._env.begin() as txn:
            raw = txn.get(key.encode(), db=self._blocks)
        return None if raw is None else json.loads(raw)

    def contains(self, key: str) -> bool:
        """Whether ``key`` is durable (pending puts do not count)."""
        with self._env.begin() as txn:
            return txn.get(key.encode(), db=self._blocks) is not None

    __contains__ = contains

    def keys(self) -> list[str]:
        with self._env.begin() as txn:
            return [k.decode() for k in txn.cursor(db=self._blocks).iternext(keys=True, values=False)]

    def __len__(self) -> int:
        with self._env.begin() as txn:
            return txn.stat(self._blocks)["entries"]

    def _entries(self) -> list[tuple[str, dict]]:
        with self._env.begin() as txn:
            return [(k.decode(), json.loads(v)) for k, v in txn.cursor(db=self._blocks)]

    def _commit_index(self, entries: dict[str, dict]) -> None:
        """One transaction: the entries of a just-renamed shard, and the next shard number."""
        with self._env.begin(write=True) as txn:
            for key, entry in entries.items():
                txn.put(key.encode(), json.dumps(entry, separators=(",", ":")).encode(), db=self._blocks)
            txn.put(b"next_shard", str(self._next_seq).encode(), db=self._meta)

    # -- writing ------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:
            raise PermissionError(f"the block store at {self.root} was opened read-only")

    def put(self, key: str, block: BlockKV) -> None:
        """Buffer ``block`` under ``key``; a full buffer is written as one shard.

        The buffer keeps references to the block's CPU tensors until the shard is written.
        """
        self._check_writable()
        tensors = encode(block, self.kv_dtype)
        self._buffer(key, tensors, block_entry(block, tensors))

    def put_bytes(self, key: str, data: bytes) -> None:
        """Buffer a block received as :func:`~rcllm.store.codec.block_to_bytes` bytes (checksum
        verified); stored as it came unless this store keeps KV in another dtype."""
        self._check_writable()
        tensors, entry = parse(data)
        if self.kv_dtype is None or entry["kv_dtype"] == self.kv_dtype:
            self._buffer(key, tensors, entry)
        else:
            self.put(key, to_block(tensors, entry, "cpu"))

    def _buffer(self, key: str, tensors: dict[str, torch.Tensor], entry: dict) -> None:
        if not key or len(key.encode()) > _MAX_KEY_BYTES:
            raise ValueError(f"block key must be 1..{_MAX_KEY_BYTES} bytes, got {key!r}")
        size = sum(t.nbytes for t in tensors.values())
        with self._write_lock:
            if key in self._pending:
                self._pending_bytes -= sum(t.nbytes for t in self._pending.pop(key)[0].values())
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self.flush()
            self._pending[key] = (tensors, entry)
            self._pending_bytes += size
            if self._pending_bytes >= self.max_shard_bytes:
                self.flush()

    def flush(self) -> None:
        """Write the buffered blocks as one shard and index them; they are durable on return."""
        self._check_writable()
        with self._write_lock:
            if self._pending:
                self._write_shard(self._pending)
                self._pending = {}
                self._pending_bytes = 0

    def _write_shard(self, blocks: dict[str, tuple[dict[str, torch.Tensor], dict]]) -> None:
        name = f"shard-{self._next_seq:06d}.safetensors"
        self._next_seq += 1  # never reused, even if this write fails
        path = self.root / name
        tmp = self.root / f"{name}.tmp"
        tensors = {f"{key}/{part}": t for key, (ts, _) in blocks.items() for part, t in ts.items()}
        save_file(tensors, str(tmp), metadata={"format": SHARD_FORMAT})
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(self.root)
        self._commit_index({key: {**entry, "shard": name} for key, (_, entry) in blocks.items()})

    def delete_many(self, keys) -> int:
        """Drop ``keys`` from the index (and the buffer); their bytes stay until ``compact``."""
        self._check_writable()
        keys = list(keys)
        deleted = 0
        with self._write_lock:
            for key in keys:
                if key in self._pending:
                    self._pending_bytes -= sum(t.nbytes for t in self._pending.pop(key)[0].values())
            with self._env.begin(write=True) as txn:
                for key in keys:
                    deleted += bool(txn.delete(key.encode(), db=self._blocks))
        return deleted

    def compact(self, min_live_fraction: float = 0.5) -> dict:
        """Rewrite shards whose live blocks fill less than ``min_live_fraction`` of the file.

        Live blocks move to new shards (same crash-safe path as ``flush``), then the old shards,
        no longer referenced, are removed. Returns counts and bytes before and after.
        """
        self._check_writable()
        with self._write_lock:
            self.flush()
            before = self._shard_bytes()
            live: dict[str, list[tuple[str, dict]]] = {}
            for key, entry in self._entries():
                live.setdefault(entry["shard"], []).append((key, entry))
            victims = [
                path.name for path in self._shard_paths()
                if sum(e["nbytes"] + 8 * e["n_tokens"] for _, e in live.get(path.name, []))
                < min_live_fraction * path.stat().st_size
            ]
            batch, batch_bytes = {}, 0
            for name in victims:
                for key, entry in live.get(name, []):
                    tensors = self._read(key, entry)
                    batch[key] = (tensors, entry)
                    batch_bytes += sum(t.nbytes for t in tensors.values())
                    if batch_bytes >= self.max_shard_bytes:
                        self._write_shard(batch)
                        batch, batch_bytes = {}, 0
            if batch:
                self._write_shard(batch)
            removed = self.gc()
            return {
                "rewritten": len(victims),
                "removed": len(removed),
                "bytes_before": before,
                "bytes_after": self._shard_bytes(),
            }

    def gc(self) -> list[str]:
        """Remove shard files the index does not name (orphans and temp files of a crash)."""
        self._check_writable()
        with self._write_lock:
            referenced = {entry["shard"] for _, entry in self._entries()}
            removed = []
            for path in self.root.iterdir():
                if path.name.startswith("shard-") and path.name not in referenced:
                    path.unlink()
                    removed.append(path.name)
            if removed:
                with self._handles_lock:
                    for name in removed:
                        self._handles.pop(name, None)
                fsync_dir(self.root)
            return sorted(removed)

    # -- reading ------------------------------------------------------------------------------

    def _handle(self, name: str):
        with self._handles_lock:
            handle = self._handles.get(name)
            if handle is not None:
                self._handles.move_to_end(name)
                return handle
        handle = safe_open(str(self.root / name), framework="pt")
        with self._handles_lock:
            self._handles[name] = handle
            while len(self._handles) > _OPEN_SHARDS:
                self._handles.popitem(last=False)
        return handle

    def _read(self, key: str, entry: dict) -> dict[str, torch.Tensor]:
        name = entry["shard"]
        try:
            handle = self._handle(name)
            return {part: handle.get_tensor(f"{key}/{part}") for part in stored_parts(entry)}
        except FileNotFoundError:
            # A writer's compaction may have moved the block since we read the entry.
            fresh = self.entry(key)
            if fresh is not None and fresh["shard"] != name:
                return self._read(key, fresh)
            raise CorruptBlockError(f"block {key}: its shard {self.root / name} is missing") from None
        except SafetensorError as e:
            raise CorruptBlockError(f"block {key}: shard {self.root / name} is unreadable: {e}") from None

    def get(self, key: str, device: str | torch.device = "cpu", verify: bool = False) -> BlockKV | None:
        """The durable block under ``key`` (None if absent), K/V on ``device``.

        ``verify`` recomputes the checksum and raises :class:`CorruptBlockError` on a mismatch.
        """
        entry = self.entry(key)
        if entry is None:
            return None
        tensors = self._read(key, entry)
        if verify:
            actual = checksum(tensors)
            if actual != entry["checksum"]:
                raise CorruptBlockError(
                    f"block {key} in {self.root / entry['shard']} is corrupt: checksum {actual}, "
                    f"expected {entry['checksum']}; delete the shard and rerun the build to recompute it"
                )
        return to_block(tensors, entry, device)

    def get_bytes(self, key: str) -> bytes | None:
        """The block as :func:`~rcllm.store.codec.block_to_bytes` bytes, in its stored dtype,
        carrying the checksum recorded at write time (so the receiver also detects a block that
        rotted on this disk)."""
        entry = self.entry(key)
        if entry is None:
            return None
        return serialize(self._read(key, entry), entry)

    # -- size ---------------------------------------------------------------------------------

    def _shard_paths(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if _SHARD_NAME.fullmatch(p.name))

    def _shard_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._shard_paths())

    @property
    def index_bytes(self) -> int:
        """Pages the LMDB index uses (the file can be larger on platforms that preallocate)."""
        return (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]

    @property
    def total_bytes(self) -> int:
        """Disk bytes: every shard file (dead blocks included until ``compact``) plus the index."""
        return self._shard_bytes() + self.index_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.stats()["bytes_per_token"]

    def stats(self) -> dict:
        """blocks, tokens, bytes (disk), kv_bytes (K+V as stored, int8 scales included), shards,
        bytes_per_token (disk / tokens), kv_dtype (None: each block as it was put)."""
        entries = self._entries()
        tokens = sum(e["n_tokens"] for _, e in entries)
        total = self.total_bytes
        return {
            "blocks": len(entries),
            "tokens": tokens,
            "bytes": total,
            "kv_bytes": sum(e["nbytes"] for _, e in entries),
            "shards": len(self._shard_paths()),
            "bytes_per_token": total / tokens if tokens else 0.0,
            "kv_dtype": self.kv_dtype,
        }

