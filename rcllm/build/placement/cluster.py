"""Spherical k-means of the item embeddings: many more clusters than nodes."""

from __future__ import annotations

import faiss
import numpy as np


def normalized(embeddings: np.ndarray) -> np.ndarray:
    """float32 rows of unit L2 norm, a new array: one copy of the input and no temporary of its
    size (1M x 384 float32 is 1.5 GB; ``np.linalg.norm`` would square it into another)."""
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [n, dim], got shape {x.shape}")
    out = np.array(x, dtype=np.float32, order="C")  # always a copy: the caller's array is left alone
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    out /= np.maximum(norms, 1e-12)[:, None]
    return out


def nearest(centroids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the most similar centroid (inner product) for each row of ``x``."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    _, nearest = index.search(x, 1)
    return nearest[:, 0].astype(np.int64)


def kmeans(
    embeddings: np.ndarray, n_clusters: int, seed: int = 0, niter: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (faiss): float32 L2-normalised centroids [c, d] and int64 assignment [n].

    Rows are L2-normalised first (one copy). ``n_clusters`` is clipped to the number of items;
    fewer than two items give one centroid per item. faiss trains on at most 256 rows per
    centroid (a seeded sample: 262,144 rows for 1,024 clusters, whatever the catalog's size),
    then every row goes to its nearest centroid: time and memory beyond the copy stay flat in n
    but for that one search.
    """
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be at least 1, got {n_clusters}")
    x = normalized(embeddings)
    n, d = x.shape
    if n < 2:
        return x.copy(), np.zeros(n, dtype=np.int64)
    k = min(int(n_clusters), n)
    if k == 1:
        centroids = normalized(x.mean(axis=0, keepdims=True))
        return centroids, np.zeros(n, dtype=np.int64)
    # min_points_per_centroid=1: many small clusters are the point here, not a mistake to warn of
    km = faiss.Kmeans(
        d, k, niter=niter, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1
    )
    km.train(x)
    centroids = normalized(km.centroids)
    return centroids, nearest(centroids, x)


def default_n_clusters(n_items: int, n_nodes: int) -> int:
    """Many more clusters than nodes (so whole clusters can balance the nodes finely), about 8
    items per cluster for small catalogs, at most 64 per node, never more than the items."""
    if n_items <= 0:
        return 0
    return max(1, min(n_items, max(4 * n_nodes, min(n_items // 8, 64 * n_nodes))))
