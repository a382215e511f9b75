"""Where KV lives on disk: the per-node block store (shards + index) and the cache manifest.

Beside them, ``layout`` names the other files of a cache folder, ``placement`` holds the
placement record (item -> cluster -> node) that build writes and serving reads, and ``built``
says which stores are built (each store's own completion record against the plan).
"""

from rcllm.store.manifest import (
    IncompatibleCacheError,
    Manifest,
    check_compatible,
    default_nodes,
    model_record,
    node_dir,
    placement_dir,
    users_dir,
)
from rcllm.store.built import StoreNotBuiltError, require_built, store_root, store_states, user_stores
from rcllm.store.layout import cache_info
from rcllm.store.codec import KV_DTYPES, CorruptBlockError, block_from_bytes, block_to_bytes
from rcllm.store.shards import BlockStore, StoreBusyError

__all__ = [
    "KV_DTYPES", "BlockStore", "CorruptBlockError", "IncompatibleCacheError", "Manifest", "StoreNotBuiltError", "StoreBusyError",
    "block_from_bytes", "block_to_bytes", "cache_info", "check_compatible", "default_nodes", "model_record",
    "node_dir", "placement_dir", "require_built", "store_root", "store_states", "user_stores", "users_dir",
]
