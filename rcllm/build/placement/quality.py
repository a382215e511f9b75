"""How good a placement is (similar items together, co-occurring items together), and the
baselines it is compared with (hash, random)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from rcllm.build.placement.cooccurrence import PAIR_WINDOW, history_pairs


def intra_node_similarity(embeddings: np.ndarray, item_node: np.ndarray) -> float:
    """Mean cosine similarity over all pairs of distinct items that share a node (pairs pooled
    across nodes). O(n d): the sum of a node's pairwise similarities is ||sum of its rows||^2
    minus the self-pairs. NaN when no node holds two items."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [n, dim], got shape {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    item_node = np.asarray(item_node, dtype=np.int64)
    if len(item_node) != len(x):
        raise ValueError(f"{len(x)} embeddings but {len(item_node)} item nodes")
    if len(x) == 0:
        return float("nan")
    n_nodes = int(item_node.max()) + 1
    sums = np.zeros((n_nodes, x.shape[1]))
    np.add.at(sums, item_node, x)
    counts = np.bincount(item_node, minlength=n_nodes).astype(np.float64)
    self_pairs = np.bincount(item_node, weights=(x * x).sum(1), minlength=n_nodes)
    pairs = (counts * (counts - 1)).sum()
    if pairs == 0:
        return float("nan")
    return float((((sums * sums).sum(1) - self_pairs).sum()) / pairs)


def cooccurrence_locality(histories: Sequence[Sequence[int]], item_node: np.ndarray) -> float:
    """The share of history pairs (distinct items at most PAIR_WINDOW positions apart in one
    user's history) whose two items sit on the same node; NaN when there are no pairs."""
    item_node = np.asarray(item_node, dtype=np.int64)
    same = total = 0
    for left, right in history_pairs(histories, len(item_node), PAIR_WINDOW):
        same += int((item_node[left] == item_node[right]).sum())
        total += len(left)
    return same / total if total else float("nan")


def hash_placement(item_ids: Sequence[str], n_nodes: int) -> np.ndarray:
    """int64 [n]: blake2b of each item id modulo n_nodes (stable across runs and machines)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") % n_nodes
         for i in item_ids),
        dtype=np.int64,
        count=len(item_ids),
    )


def random_placement(n: int, n_nodes: int, seed: int = 0) -> np.ndarray:
    """int64 [n]: a seeded random placement with n/n_nodes items (±1) per node."""
    return (np.random.default_rng(seed).permutation(n) % n_nodes).astype(np.int64)
