"""Placing a catalog (cluster, then assign the clusters), new items (beside their nearest
centroid) and a new node (whole clusters handed over from the fullest nodes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rcllm.build.placement.assign import BALANCE_TOLERANCE, assign_clusters, node_loads, pair_weights
from rcllm.build.placement.cluster import default_n_clusters, kmeans, nearest, normalized
from rcllm.build.placement.cooccurrence import cooccurrence_matrix
from rcllm.store.placement import Placement


def _as_tokens(item_tokens: np.ndarray, n: int) -> np.ndarray:
    tokens = np.asarray(item_tokens, dtype=np.int64)
    if tokens.shape != (n,):
        raise ValueError(f"expected {n} token counts, got shape {tokens.shape}")
    if (tokens < 0).any():
        raise ValueError("token counts must be non-negative")
    return tokens


def place_items(
    embeddings: np.ndarray,
    item_tokens: np.ndarray,
    n_nodes: int,
    histories: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    n_clusters: int | None = None,
) -> Placement:
    """Cluster the items (``n_clusters`` default :func:`default_n_clusters`) and assign the
    clusters to ``n_nodes`` nodes; ``histories`` (item indices per user) add co-occurrence."""
    x = np.asarray(embeddings)  # kmeans normalises its own copy: one copy of a large catalog, not two
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [n, dim], got shape {x.shape}")
    tokens = _as_tokens(item_tokens, len(x))
    if n_nodes < 1:
        raise ValueError(f"n_nodes must be at least 1, got {n_nodes}")
    if len(x) == 0:
        return Placement(
            np.zeros((0, x.shape[1]), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64),
            tokens, n_nodes,
        )
    centroids, item_cluster = kmeans(x, n_clusters or default_n_clusters(len(x), n_nodes), seed=seed)
    c = len(centroids)
    cluster_tokens = np.bincount(item_cluster, weights=tokens, minlength=c)
    cooccurrence = cooccurrence_matrix(histories, item_cluster, c) if histories else None
    cluster_node = assign_clusters(cluster_tokens, centroids, n_nodes, cooccurrence, seed=seed)
    return Placement(centroids, item_cluster, cluster_node, tokens, n_nodes)


def place_new(placement: Placement, new_embeddings: np.ndarray, new_tokens: np.ndarray) -> np.ndarray:
    """int64 [m]: the node of each new item, that of its nearest centroid. The items are appended
    to ``placement`` (in place). Nothing is rebalanced: after many additions, place again."""
    x = normalized(new_embeddings)
    tokens = _as_tokens(new_tokens, len(x))
    if len(placement.centroids) == 0:
        raise ValueError("the placement has no clusters to place new items by")
    if x.shape[1] != placement.centroids.shape[1]:
        raise ValueError(
            f"new embeddings have dim {x.shape[1]}, the placement's centroids {placement.centroids.shape[1]}"
        )
    cluster = nearest(placement.centroids, x)
    placement.item_cluster = np.concatenate([placement.item_cluster, cluster])
    placement.item_tokens = np.concatenate([placement.item_tokens, tokens])
    return placement.cluster_node[cluster]


def add_node(placement: Placement, item_tokens: np.ndarray | None = None) -> tuple[Placement, np.ndarray]:
    """Grow to n_nodes + 1: the new node takes whole clusters, each time from the fullest node,
    until it holds about the new mean; nothing else moves. Returns the new placement and the
    indices of the moved items (about 1/(N+1) of the tokens).

    ``item_tokens`` are the counts to balance on (default: those recorded in the placement; pass
    fresh ones if the item template changed). Among the fullest node's clusters that keep both
    nodes within ±BALANCE_TOLERANCE, the one most similar to what the new node already holds, and
    least to its own node, moves.
    """
    n_items = len(placement.item_cluster)
    tokens = placement.item_tokens if item_tokens is None else _as_tokens(item_tokens, n_items)
    c, new = len(placement.centroids), placement.n_nodes
    n_nodes = new + 1
    cluster_tokens = np.bincount(placement.item_cluster, weights=tokens, minlength=c).astype(np.float64)
    cluster_node = placement.cluster_node.copy()
    loads = node_loads(cluster_node, cluster_tokens, n_nodes)
    target = cluster_tokens.sum() / n_nodes
    lo, hi = target * (1 - BALANCE_TOLERANCE), target * (1 + BALANCE_TOLERANCE)
    weights = pair_weights(cluster_tokens, placement.centroids, n_nodes, None) if c else np.zeros((0, 0))
    while loads[new] < target:
        moved_one = False
        for donor in np.argsort(-loads[:new], kind="stable"):
            candidates = np.flatnonzero(
                (cluster_node == donor)
                & (cluster_tokens > 0)
                & (loads[new] + cluster_tokens <= hi)
                & (loads[donor] - cluster_tokens >= lo)
            )
            if not len(candidates):
                continue
            gain = (
                weights[candidates][:, cluster_node == new].sum(1)
                - weights[candidates][:, cluster_node == donor].sum(1)
            )
            pick = candidates[np.argmax(gain)]
            cluster_node[pick] = new
            loads[new] += cluster_tokens[pick]
            loads[donor] -= cluster_tokens[pick]
            moved_one = True
            break
        if not moved_one:
            break
    grown = Placement(placement.centroids, placement.item_cluster, cluster_node, tokens, n_nodes)
    moved = np.flatnonzero(grown.item_node != placement.item_node)
    return grown, moved
