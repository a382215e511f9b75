"""The blocks an in-process eval measures, and only those.

``rcllm eval`` (in-process) ranks every request in one process that stands for one serving
node: the rcllm systems read history and item blocks from a block source (a hot tier over disk
stores) and never route. So eval needs the KV of exactly the blocks its sampled requests read,
each request's history block and its candidates' item blocks, not the whole catalog's: on a
16,859-item catalog, 60 requests read ~1,200 item blocks, and precomputing all 16,859 wrote
13 GB and took a quarter of an hour before anything was timed.

No placement is computed here, and none is needed. In-process, every block a request reads is on
the node being measured, so its TTFT, hit ratios and fidelity are those of a node that holds
the request's blocks, which is what affinity routing aims for. How a placement spreads a whole
catalog over nodes, and what routing then costs, is measured against a running cluster
(``rcllm eval --endpoint``) that serves a cache ``rcllm build-cache`` placed whole; embedding and
clustering 16k items for a one-node eval would only delay the timing.

Where blocks come from, in order: a cache built by ``rcllm build-cache`` when one is given
(read, never written: its node stores and its replicated users store), then eval's own store,
a content-addressed :class:`BlockStore` that keeps what earlier evals computed. Only blocks in
neither are computed, after :class:`BlockPlan` has said how many, how many tokens and how much
disk they take, and refused when the disk cannot hold them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rcllm.data.dataset import Dataset
from rcllm.data.sampling import RankingRequest
from rcllm.engine.blocks import BlockKV
from rcllm.engine.models import user_cache_dir
from rcllm.engine.ranker import Ranker, block_key
from rcllm.store import BlockStore, Manifest, check_compatible, node_dir, store_root, user_stores
from rcllm.store.manifest import MANIFEST_NAME

# Disk a stored block takes beyond its K, V and token ids: its tensors' entries in the shard's
# safetensors header (~330 bytes) and its entry in the LMDB index (~700 bytes with its share of
# the B-tree's pages), measured on stores of 50-220 blocks; rounded up, so the estimate errs high.
BLOCK_OVERHEAD_BYTES = 1280
STORE_OVERHEAD_BYTES = 64 << 10  # an index's fixed pages (meta, two named databases)
ID_BYTES = 8  # each block stores its token ids as int64
SHARD_BYTES = 64 << 20  # as the build's shards: the most an interrupted eval loses
BATCH_SIZE = 16


class NotEnoughDiskError(ValueError):
    """The blocks eval would compute do not fit in the free space of the disk they go to."""


def needed_blocks(ranker: Ranker, dataset: Dataset, requests: Sequence[RankingRequest]) -> dict[str, torch.Tensor]:
    """Block key -> token ids of every history and item block the requests read, built by the
    ranker's own prompt builder (the ids :meth:`Ranker.segments` asks the block source for)."""
    builder = ranker.builder
    context_ids = builder.system_ids()
    fingerprint = ranker.engine.fingerprint
    texts: dict[str, str] = {}
    blocks: dict[str, torch.Tensor] = {}

    def add(ids: torch.Tensor) -> None:
        blocks.setdefault(block_key(fingerprint, context_ids, ids), ids)

    def text(item: str) -> str:
        if item not in texts:
            texts[item] = builder.item_text(dataset.items[item])
        return texts[item]

    for r in requests:
        add(builder.history_ids([text(i) for i in r.history]))
        for item in r.candidates:
            add(builder.item_ids(text(item)))
    return blocks


@dataclass
class BlockPlan:
    """What eval will compute before timing: the blocks no store holds, shortest first."""

    needed: int  # distinct blocks the requests read
    in_cache: int  # of those, held by the built cache given
    in_store: int  # held by eval's own store (computed by an earlier eval)
    todo: list[tuple[str, torch.Tensor]]  # (key, token ids) to compute
    store: Path  # eval's own store, where they go
    bytes_per_token: int  # K and V of one token, from the model's dims and dtype

    @property
    def tokens(self) -> int:
        return sum(int(ids.numel()) for _, ids in self.todo)

    @property
    def disk_bytes(self) -> int:
        """Estimated disk bytes of the computed blocks: KV and ids per token, a header and an index
        entry per block, an index."""
        if not self.todo:
            return 0
        kv = self.tokens * (self.bytes_per_token + ID_BYTES)
        return kv + len(self.todo) * BLOCK_OVERHEAD_BYTES + STORE_OVERHEAD_BYTES

    def describe(self) -> str:
        held = []
        if self.in_cache:
            held.append(f"{self.in_cache:,} in the cache given")
        if self.in_store:
            held.append(f"{self.in_store:,} computed by an earlier eval")
        have = f" ({', '.join(held)})" if held else ""
        if not self.todo:
            return f"the requests read {self.needed:,} blocks, all already computed{have}"
        return (
            f"the requests read {self.needed:,} blocks{have}; computing {len(self.todo):,}: {self.tokens:,} "
            f"tokens, about {gib(self.disk_bytes)} on disk in {self.store} ({self.bytes_per_token:,} KV bytes "
            "per token from the model's dims and dtype)"
        )


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def free_bytes(folder: Path) -> tuple[Path, int]:
    """(the nearest existing folder at or above ``folder``, its disk's free bytes)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def check_disk(plan: BlockPlan) -> None:
    """Raise :class:`NotEnoughDiskError` when the plan's blocks do not fit in their disk's free space."""
    if not plan.todo:
        return
    where, free = free_bytes(plan.store)
    if plan.disk_bytes > free:
        raise NotEnoughDiskError(
            f"eval would compute {len(plan.todo):,} blocks ({plan.tokens:,} tokens), about {gib(plan.disk_bytes)}, "
            f"into {plan.store}, but the disk holding {where} has {gib(free)} free: "
            "free some space, put eval's blocks on a larger disk (--cache FOLDER), or sample fewer "
            "requests (--users, --requests-per-user)"
        )


def open_built_cache(cache: Path, ranker: Ranker) -> list[BlockStore]:
    """Read-only stores of a cache built by ``rcllm build-cache`` (its node stores, then the
    replicated history blocks' store, or each of its parts), after checking that this model and
    template may use its blocks. A store not built yet is skipped: eval computes what it would
    have held."""
    manifest = Manifest.load(cache)
    check_compatible(manifest, ranker.engine.lm, ranker.builder.template.to_dict())
    stores = []
    users = [store_root(cache, name) for name in user_stores(manifest)]
    for folder in [node_dir(cache, n["node"]) for n in manifest.nodes] + users:
        try:
            stores.append(BlockStore.open_readonly(folder))
        except FileNotFoundError:
            continue
    return stores


def default_store_dir(ranker: Ranker) -> Path:
    """Eval's own store under the user cache, one per model and dtype (blocks are keyed by model
    fingerprint, block context and token ids, so every dataset shares it)."""
    lm = ranker.engine.lm
    return user_cache_dir() / "eval-blocks" / f"{lm.fingerprint[:12]}-{str(lm.dtype).removeprefix('torch.')}"


def plan_blocks(ranker: Ranker, blocks: dict[str, torch.Tensor], stores: Sequence[BlockStore], store: Path) -> BlockPlan:
    """The blocks of ``blocks`` that neither ``stores`` (a built cache) nor eval's own store at
    ``store`` hold."""
    from rcllm.build.pipeline import expected_bytes_per_token  # the build's count (loads faiss: only here)

    in_cache = {key for key in blocks if any(key in s for s in stores)}
    in_store = set()
    if store.is_dir():
        try:
            with BlockStore.open_readonly(store) as own:
                in_store = {key for key in blocks if key not in in_cache and key in own}
        except FileNotFoundError:  # a folder without an index yet: nothing held
            pass
    todo = [(k, ids) for k, ids in blocks.items() if k not in in_cache and k not in in_store]
    todo.sort(key=lambda item: item[1].numel())  # batches of like lengths pad little
    return BlockPlan(len(blocks), len(in_cache), len(in_store), todo, store, expected_bytes_per_token(ranker))


def is_built_cache(folder: Path) -> bool:
    """Whether ``folder`` holds a cache built by ``rcllm build-cache`` (it has a manifest)."""
    return (Path(folder) / MANIFEST_NAME).is_file()


def compute_plan(
    ranker: Ranker,
    plan: BlockPlan,
    context: BlockKV,
    progress: Callable[[int, int], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> None:
    """Compute the plan's blocks into eval's own store, in batches; durable shard by shard, so an
    interrupted eval resumes where it stopped. After the second batch (the first warms the
    kernels up), ``note`` hears how long all of them take at its rate: an estimate, on the high
    side, since blocks go shortest first and short blocks run the fewest tokens per second; at
    the end, how long they took."""
    if not plan.todo:
        return
    total, done = len(plan.todo), 0
    began = time.perf_counter()
    with BlockStore(plan.store, create=True, max_shard_bytes=SHARD_BYTES) as store:
        for n, first in enumerate(range(0, total, BATCH_SIZE)):
            chunk = plan.todo[first : first + BATCH_SIZE]
            started = time.perf_counter()
            for (key, _), block in zip(chunk, ranker.engine.compute_blocks([ids for _, ids in chunk], context, BATCH_SIZE)):
                store.put(key, block)
            done += len(chunk)
            if n == 1 and note and done < total:
                rate = sum(int(ids.numel()) for _, ids in chunk) / max(time.perf_counter() - started, 1e-9)
                note(f"estimated time: {plan.tokens / rate:.0f} s for {plan.tokens:,} tokens (an estimate from the "
                     f"second batch of {len(chunk)} blocks, {rate:,.0f} tokens/s)")
            if progress:
                progress(done, total)
    if note:
        note(f"computed {total:,} blocks ({plan.tokens:,} tokens) in {time.perf_counter() - began:.0f} s")
