"""Placing item KV blocks on serving nodes: similar items together, tokens balanced.

Items are clustered by spherical k-means into many more clusters than nodes, and whole clusters
are assigned to nodes. A request's candidates tend to be similar to each other and to the user's
history, so keeping similar items on one node lets the coordinator route most of a request's
blocks to a single node; balancing *tokens* (not items) balances KV bytes, since a block's KV is
proportional to its token count.

The assignment maximises the pairwise affinity of clusters sharing a node (its objective is in
rcllm/build/placement/assign.py). One step per module:

- ``cluster``: spherical k-means of the item embeddings (:func:`kmeans`)
- ``cooccurrence``: history pairs counted per pair of clusters (:func:`cooccurrence_matrix`)
- ``assign``: whole clusters to nodes, tokens balanced (:func:`assign_clusters`)
- ``place``: a catalog, new items, a new node (:func:`place_items`, :func:`place_new`, :func:`add_node`)
- ``quality``: the measures and the hash and random baselines

Everything here is a plain function on numpy arrays. The result, :class:`Placement`, and its
files are in rcllm/store/placement.py, where serving reads them.
"""

from rcllm.build.placement.assign import BALANCE_TOLERANCE, COOCCURRENCE_WEIGHT, assign_clusters
from rcllm.build.placement.cluster import default_n_clusters, kmeans
from rcllm.build.placement.cooccurrence import PAIR_WINDOW, cooccurrence_matrix
from rcllm.build.placement.place import add_node, place_items, place_new
from rcllm.build.placement.quality import (
    cooccurrence_locality,
    hash_placement,
    intra_node_similarity,
    random_placement,
)

__all__ = [
    "BALANCE_TOLERANCE",
    "COOCCURRENCE_WEIGHT",
    "PAIR_WINDOW",
    "add_node",
    "assign_clusters",
    "cooccurrence_locality",
    "cooccurrence_matrix",
    "default_n_clusters",
    "hash_placement",
    "intra_node_similarity",
    "kmeans",
    "place_items",
    "place_new",
    "random_placement",
]
