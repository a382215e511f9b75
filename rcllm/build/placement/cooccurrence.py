"""Which items users take together: pairs of history items a few positions apart, counted per
pair of clusters."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

# Two history items form a pair when at most this many positions apart: all pairs of a long
# history would be quadratic, and distant interactions say little about each other.
PAIR_WINDOW = 20


def history_pairs(
    histories: Sequence[Sequence[int]], n_items: int, window: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each offset 1..window, the (earlier, later) item indices of a user's history that sit
    that many positions apart, repeats of one item left out. Memory stays O(interactions)."""
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    total = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(histories), dtype=np.int64, count=total)
    if total and (flat.min() < 0 or flat.max() >= n_items):
        bad = flat[(flat < 0) | (flat >= n_items)][0]
        raise ValueError(f"history item index {bad} is out of range for {n_items} items")
    user = np.repeat(np.arange(len(lengths)), lengths)
    for offset in range(1, min(window, max(total - 1, 0)) + 1):
        keep = user[offset:] == user[:-offset]
        left, right = flat[:-offset][keep], flat[offset:][keep]
        distinct = left != right
        yield left[distinct], right[distinct]


def cooccurrence_matrix(
    histories: Sequence[Sequence[int]], item_cluster: np.ndarray, n_clusters: int, window: int = 0
) -> np.ndarray:
    """float64 [c, c] symmetric: how many history pairs join an item of cluster a to one of b.

    ``histories`` holds item indices (rows of ``item_cluster``), one list per user. Two items
    pair when at most ``window`` positions apart in one history (0: the default PAIR_WINDOW).
    """
    item_cluster = np.asarray(item_cluster, dtype=np.int64)
    window = window or PAIR_WINDOW
    counts = np.zeros(n_clusters * n_clusters, dtype=np.float64)
    for left, right in history_pairs(histories, len(item_cluster), window):
        flat = item_cluster[left] * n_clusters + item_cluster[right]
        counts += np.bincount(flat, minlength=n_clusters * n_clusters)
    counts = counts.reshape(n_clusters, n_clusters)
    return counts + counts.T - np.diag(np.diag(counts))
