"""The blocks a build computes: the token ids and keys of item and history blocks, the block
context they are computed after, and filling a store with the blocks it lacks.

Shared by planning (keys), building a node or the users store, appending items, serving-side
tools and eval; one definition each, so every step names a block by the same key.
"""

from __future__ import annotations

from collections.abc import Sequence

from rcllm.engine.api import parse_dtype
from rcllm.engine.blocks import BlockKV
from rcllm.engine.ranker import Ranker, block_key
from rcllm.store import BlockStore


def item_block_ids(ranker: Ranker, item: dict):
    return ranker.builder.item_ids(ranker.builder.item_text(item))


def history_block_ids(ranker: Ranker, items: dict[str, dict], history: Sequence[str], length: int):
    recent = list(history)[-length:] if length else []
    return ranker.builder.history_ids([ranker.builder.item_text(items[i]) for i in recent])


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


def fill_store(
    ranker: Ranker, store: BlockStore, wanted: dict[str, object], context: BlockKV, batch_size: int, advance
) -> tuple[int, int]:
    """Compute and store every wanted block (key -> token ids) not already durable; drop the rest.
    Returns (computed, reused)."""
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
