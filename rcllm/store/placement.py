"""The placement record: which cluster each item is in, which node each cluster is on.

Build computes it (rcllm/build/placement/) and saves it under ``CACHE_DIR/placement/``;
serving reads it here to find the node that holds a block, without loading the build's
clustering or embedder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from rcllm.files import fill_file

_ARRAYS_FILE = "placement.npz"
_INDEX_FILE = "centroids.faiss"


@dataclass(eq=False)  # numpy fields: compare the arrays, not the objects
class Placement:
    """Items -> clusters -> nodes. ``item_node`` is derived, so it never disagrees."""

    centroids: np.ndarray  # float32 [c, d], L2-normalised
    item_cluster: np.ndarray  # int64 [n]
    cluster_node: np.ndarray  # int64 [c]
    item_tokens: np.ndarray  # int64 [n], what the balance is measured in
    n_nodes: int

    @property
    def item_node(self) -> np.ndarray:
        """int64 [n]: the node holding each item."""
        return self.cluster_node[self.item_cluster]

    def node_tokens(self) -> np.ndarray:
        """int64 [n_nodes]: the tokens each node holds."""
        return np.bincount(self.item_node, weights=self.item_tokens, minlength=self.n_nodes).astype(np.int64)

    def imbalance(self) -> float:
        """The largest relative deviation of a node's tokens from the mean (0.05 = ±5%)."""
        return token_imbalance(self.node_tokens())


def token_imbalance(node_tokens: np.ndarray) -> float:
    """max_k |tokens_k / mean - 1|; 0 when there are no tokens."""
    loads = np.asarray(node_tokens, dtype=np.float64)
    mean = loads.mean() if len(loads) else 0.0
    if mean <= 0:
        return 0.0
    return float(np.abs(loads / mean - 1.0).max())


# --------------------------------------------------------------------------------------------
# on disk
# --------------------------------------------------------------------------------------------


def _centroids_digest(centroids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(centroids, dtype=np.float32).tobytes()).hexdigest()


def save_placement(placement: Placement, folder: str | os.PathLike) -> None:
    """Write ``centroids.faiss`` (the faiss index new items are placed with; the centroids' only
    copy) then ``placement.npz`` (the assignment, and a digest of the centroids it belongs to)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    centroids = np.ascontiguousarray(placement.centroids, dtype=np.float32)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    fill_file(folder / _INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)))
    arrays = {
        "item_cluster": np.asarray(placement.item_cluster, dtype=np.int64),
        "cluster_node": np.asarray(placement.cluster_node, dtype=np.int64),
        "item_tokens": np.asarray(placement.item_tokens, dtype=np.int64),
        "n_nodes": np.int64(placement.n_nodes),
        "centroids_sha256": np.str_(_centroids_digest(centroids)),
    }

    def write_arrays(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would add ".npz" to a name
            np.savez(handle, **arrays)

    fill_file(folder / _ARRAYS_FILE, write_arrays)


def load_placement(folder: str | os.PathLike) -> Placement:
    """Read what :func:`save_placement` wrote; refuses files that do not belong together."""
    folder = Path(folder)
    for name in (_INDEX_FILE, _ARRAYS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} holds no placement: {name} is missing")
    index = faiss.read_index(str(folder / _INDEX_FILE))
    centroids = index.reconstruct_n(0, index.ntotal).astype(np.float32).reshape(index.ntotal, index.d)
    with np.load(folder / _ARRAYS_FILE, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    if str(arrays["centroids_sha256"]) != _centroids_digest(centroids):
        raise ValueError(
            f"{folder}: {_INDEX_FILE} and {_ARRAYS_FILE} come from different placements "
            "(an interrupted save?); place the items again"
        )
    return Placement(
        centroids=centroids,
        item_cluster=arrays["item_cluster"],
        cluster_node=arrays["cluster_node"],
        item_tokens=arrays["item_tokens"],
        n_nodes=int(arrays["n_nodes"]),
    )
