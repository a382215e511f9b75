"""Placing item KV blocks on serving nodes: similar items together, tokens balanced.

Items are clustered by spherical k-means into many more clusters than nodes, and whole clusters
are assigned to nodes. A request's candidates tend to be similar to each other and to the user's
history, so keeping similar items on one node lets the coordinator route most of a request's
blocks to a single node; balancing *tokens* (not items) balances KV bytes, since a block's KV is
proportional to its token count.

The assignment maximises one objective, the pairwise affinity of clusters that share a node:

    sum over nodes k, clusters a != b on k of  W[a, b]
    W[a, b] = N * t_a * t_b * <mu_a, mu_b>  +  COOCCURRENCE_WEIGHT * C[a, b] / sum(C)

with t the clusters' token shares, mu their centroids and C their co-occurrence counts in user
histories. The first term is, for balanced nodes, about the mean cosine similarity of the items
sharing a node (sum_k ||sum of node k's embeddings||^2, the same quantity that
:func:`intra_node_similarity` measures); the second is the share of co-occurring pairs kept on one
node (what :func:`cooccurrence_locality` measures). Both live in [-1, 1], so neither swamps the
other.

Everything here is a plain function on numpy arrays. The result, :class:`Placement`, and its
files are in rcllm/store/placement.py, where serving reads them.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Iterator, Sequence

import faiss
import numpy as np

from rcllm.store.placement import Placement, token_imbalance

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

BALANCE_TOLERANCE = 0.10  # every node's tokens within ±10% of the mean
COOCCURRENCE_WEIGHT = 1.0  # weight of co-occurrence locality against centroid similarity
# Two history items form a pair when at most this many positions apart: all pairs of a long
# history would be quadratic, and distant interactions say little about each other.
PAIR_WINDOW = 20
_MAX_SEARCH_PASSES = 20
_RESTARTS = 4


# --------------------------------------------------------------------------------------------
# token balance
# --------------------------------------------------------------------------------------------


def _node_loads(node: np.ndarray, tokens: np.ndarray, n_nodes: int) -> np.ndarray:
    return np.bincount(node, weights=tokens, minlength=n_nodes).astype(np.float64)


# --------------------------------------------------------------------------------------------
# clustering
# --------------------------------------------------------------------------------------------


def _normalized(embeddings: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [n, dim], got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _nearest(centroids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the most similar centroid (inner product) for each row of ``x``."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    _, nearest = index.search(x, 1)
    return nearest[:, 0].astype(np.int64)


def kmeans(
    embeddings: np.ndarray, n_clusters: int, seed: int = 0, niter: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (faiss): float32 L2-normalised centroids [c, d] and int64 assignment [n].

    Rows are L2-normalised first. ``n_clusters`` is clipped to the number of items; fewer than two
    items give one centroid per item.
    """
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be at least 1, got {n_clusters}")
    x = _normalized(embeddings)
    n, d = x.shape
    if n < 2:
        return x.copy(), np.zeros(n, dtype=np.int64)
    k = min(int(n_clusters), n)
    if k == 1:
        centroids = _normalized(x.mean(axis=0, keepdims=True))
        return centroids, np.zeros(n, dtype=np.int64)
    # min_points_per_centroid=1: many small clusters are the point here, not a mistake to warn of
    km = faiss.Kmeans(
        d, k, niter=niter, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1
    )
    km.train(x)
    centroids = _normalized(km.centroids)
    return centroids, _nearest(centroids, x)


def default_n_clusters(n_items: int, n_nodes: int) -> int:
    """Many more clusters than nodes (so whole clusters can balance the nodes finely), about 8
    items per cluster for small catalogs, at most 64 per node, never more than the items."""
    if n_items <= 0:
        return 0
    return max(1, min(n_items, max(4 * n_nodes, min(n_items // 8, 64 * n_nodes))))


# --------------------------------------------------------------------------------------------
# co-occurrence
# --------------------------------------------------------------------------------------------


def _pairs_by_offset(
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
    for left, right in _pairs_by_offset(histories, len(item_cluster), window):
        flat = item_cluster[left] * n_clusters + item_cluster[right]
        counts += np.bincount(flat, minlength=n_clusters * n_clusters)
    counts = counts.reshape(n_clusters, n_clusters)
    return counts + counts.T - np.diag(np.diag(counts))


# --------------------------------------------------------------------------------------------
# assigning clusters to nodes
# --------------------------------------------------------------------------------------------


def _pair_weights(
    tokens: np.ndarray, centroids: np.ndarray, n_nodes: int, cooccurrence: np.ndarray | None
) -> np.ndarray:
    """W [c, c] of the module docstring, zero diagonal (a cluster's affinity to itself is a
    constant of every assignment)."""
    total = tokens.sum()
    shares = tokens / total if total > 0 else np.full(len(tokens), 1.0 / len(tokens))
    mu = centroids.astype(np.float64)
    weights = n_nodes * np.outer(shares, shares) * (mu @ mu.T)
    if cooccurrence is not None:
        pairs = cooccurrence.sum()
        if pairs > 0:
            weights += COOCCURRENCE_WEIGHT * cooccurrence / pairs
    np.fill_diagonal(weights, 0.0)
    return weights


def _principal_direction(x: np.ndarray, rng: np.random.Generator, iterations: int = 30) -> np.ndarray:
    """The top right singular vector of ``x`` by power iteration (an SVD per bisection step
    would dominate the whole assignment); a direction of nearly top variance serves as well."""
    v = rng.standard_normal(x.shape[1])
    for _ in range(iterations):
        v = x.T @ (x @ v)
        norm = np.linalg.norm(v)
        if norm == 0:
            break
        v /= norm
    return v


def _similarity_order(tokens: np.ndarray, centroids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 1-D order of the clusters in which neighbours are similar: recursive bisection along the
    token-weighted principal direction of the centroids, cut at the token median."""
    weights = tokens + 1.0  # empty clusters still take a place in the order
    mu = centroids.astype(np.float64)
    order: list[int] = []
    stack = [np.arange(len(tokens))]
    while stack:
        idx = stack.pop()
        if len(idx) <= 2:
            order.extend(idx.tolist())
            continue
        w, x = weights[idx], mu[idx]
        centred = x - (w[:, None] * x).sum(axis=0) / w.sum()
        direction = _principal_direction(centred * np.sqrt(w)[:, None], rng)
        ranked = idx[np.argsort(centred @ direction, kind="stable")]
        cum = np.cumsum(weights[ranked])
        cut = int(np.clip(np.searchsorted(cum, cum[-1] / 2), 1, len(idx) - 1))
        stack.append(ranked[cut:])  # popped after the left half: the order stays left to right
        stack.append(ranked[:cut])
    return np.asarray(order, dtype=np.int64)


def _contiguous_cut(tokens: np.ndarray, order: np.ndarray, n_nodes: int) -> np.ndarray:
    """Cut the order into n_nodes runs of about equal tokens; a cluster goes where its middle
    falls."""
    w = tokens[order] if tokens.sum() > 0 else np.ones(len(order))
    middle = np.cumsum(w) - w / 2
    node = np.empty(len(order), dtype=np.int64)
    node[order] = np.minimum((middle / w.sum() * n_nodes).astype(np.int64), n_nodes - 1)
    return node


def _repair_balance(
    node: np.ndarray, tokens: np.ndarray, weights: np.ndarray, n_nodes: int, lo: float, hi: float
) -> None:
    """Move clusters from the fullest to the emptiest node until every node is within [lo, hi]
    or no move narrows their gap. Each move lowers the sum of squared loads, so this ends."""
    loads = _node_loads(node, tokens, n_nodes)
    for _ in range(len(node) * n_nodes):
        if loads.max() <= hi and loads.min() >= lo:
            return
        full, empty = int(np.argmax(loads)), int(np.argmin(loads))
        gap = loads[full] - loads[empty]
        candidates = np.flatnonzero((node == full) & (tokens > 0) & (tokens < gap))
        if not len(candidates):
            return
        t = tokens[candidates]
        fits = (loads[full] - t >= lo) & (loads[empty] + t <= hi)
        if fits.any():
            gain = weights[candidates][:, node == empty].sum(1) - weights[candidates][:, node == full].sum(1)
            pick = candidates[np.flatnonzero(fits)[np.argmax(gain[fits])]]
        else:
            pick = candidates[np.argmin(np.abs(t - gap / 2))]
        node[pick] = empty
        loads[full] -= tokens[pick]
        loads[empty] += tokens[pick]


def _local_search(
    node: np.ndarray,
    tokens: np.ndarray,
    weights: np.ndarray,
    n_nodes: int,
    lo: np.ndarray,
    hi: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """First-improvement moves and pairwise swaps, visiting clusters in a seeded order, that
    raise the objective while every node's tokens stay within its [lo, hi]."""
    c = len(node)
    rows = np.arange(c)
    affinity = np.zeros((c, n_nodes))  # affinity[x, k] = sum of W[x, y] over clusters y on node k
    for k in range(n_nodes):
        affinity[:, k] = weights[:, node == k].sum(axis=1)
    loads = _node_loads(node, tokens, n_nodes)
    eps = 1e-12 * max(float(np.abs(weights).max()), 1e-300)
    for _ in range(_MAX_SEARCH_PASSES):
        improved = False
        for x in rng.permutation(c):
            a, t = node[x], tokens[x]
            # moves of x to every other node
            move_gain = affinity[x] - affinity[x, a]
            move_ok = (loads + t <= hi) & (loads[a] - t >= lo[a])
            move_ok[a] = False
            move_gain = np.where(move_ok, move_gain, -np.inf)
            best_move = int(np.argmax(move_gain))
            # swaps of x with every cluster y on another node
            swap_gain = (
                affinity[x, node] - affinity[x, a] + affinity[rows, a] - affinity[rows, node] - 2 * weights[x]
            )
            into_a = loads[a] - t + tokens  # x's node after swapping x with each y
            into_b = loads[node] - tokens + t  # each y's node after the swap
            swap_ok = (node != a) & (lo[a] <= into_a) & (into_a <= hi[a])
            swap_ok &= (lo[node] <= into_b) & (into_b <= hi[node])
            swap_gain = np.where(swap_ok, swap_gain, -np.inf)
            best_swap = int(np.argmax(swap_gain))
            if max(move_gain[best_move], swap_gain[best_swap]) <= eps:
                continue
            improved = True
            if move_gain[best_move] >= swap_gain[best_swap]:
                b = best_move
                affinity[:, a] -= weights[:, x]
                affinity[:, b] += weights[:, x]
                loads[a] -= t
                loads[b] += t
                node[x] = b
            else:
                y = best_swap
                b = node[y]
                delta = weights[:, x] - weights[:, y]
                affinity[:, a] -= delta
                affinity[:, b] += delta
                loads[a] += tokens[y] - t
                loads[b] += t - tokens[y]
                node[x], node[y] = b, a
        if not improved:
            return


def _objective(node: np.ndarray, weights: np.ndarray) -> float:
    same = node[:, None] == node[None, :]
    return float(weights[same].sum())


def assign_clusters(
    cluster_tokens: np.ndarray,
    centroids: np.ndarray,
    n_nodes: int,
    cooccurrence: np.ndarray | None = None,
    tolerance: float = BALANCE_TOLERANCE,
    seed: int = 0,
) -> np.ndarray:
    """int64 [c]: the node of each cluster, balanced in tokens and keeping similar (and, given
    ``cooccurrence`` [c, c], co-occurring) clusters together. Deterministic for a given seed.

    1. order the clusters so that neighbours are similar and cut the order into n_nodes runs of
       equal tokens; 2. move clusters from the fullest to the emptiest node until every node is
       within ±tolerance of the mean; 3. local search (moves and swaps, seeded visiting order)
       that raises the objective of the module docstring and never leaves the bound.

    Clusters are never split: when one cluster alone holds more than (1 + tolerance) times the
    mean, or the clusters are too coarse, the bound cannot be met; the search then keeps the
    balance it reached, and a RuntimeWarning reports the achieved imbalance.
    """
    if n_nodes < 1:
        raise ValueError(f"n_nodes must be at least 1, got {n_nodes}")
    tokens = np.asarray(cluster_tokens, dtype=np.float64)
    c = len(tokens)
    centroids = np.asarray(centroids)
    if centroids.ndim != 2 or len(centroids) != c:
        raise ValueError(f"centroids must be [{c}, dim] for {c} clusters, got shape {centroids.shape}")
    if (tokens < 0).any():
        raise ValueError("cluster token counts must be non-negative")
    if cooccurrence is not None:
        cooccurrence = np.asarray(cooccurrence, dtype=np.float64)
        if cooccurrence.shape != (c, c):
            raise ValueError(f"cooccurrence must be [{c}, {c}], got shape {cooccurrence.shape}")
    if c == 0 or n_nodes == 1:
        return np.zeros(c, dtype=np.int64)

    weights = _pair_weights(tokens, centroids, n_nodes, cooccurrence)
    mean = tokens.sum() / n_nodes
    lo, hi = mean * (1 - tolerance), mean * (1 + tolerance)
    best, best_score = None, -np.inf
    # single moves and swaps cannot carry a group of clusters across nodes sitting at the bounds:
    # a few restarts from differently seeded orders find markedly better optima
    for rng in (np.random.default_rng([seed, r]) for r in range(_RESTARTS)):
        node = _contiguous_cut(tokens, _similarity_order(tokens, centroids, rng), n_nodes)
        _repair_balance(node, tokens, weights, n_nodes, lo, hi)
        # where the bound could not be met, the search may not make any node worse than it is now
        loads = _node_loads(node, tokens, n_nodes)
        _local_search(node, tokens, weights, n_nodes, np.minimum(lo, loads), np.maximum(hi, loads), rng)
        balanced = token_imbalance(_node_loads(node, tokens, n_nodes)) <= tolerance + 1e-9
        score = (balanced, _objective(node, weights))
        if best is None or score > best_score:
            best, best_score = node, score
    node = best
    achieved = token_imbalance(_node_loads(node, tokens, n_nodes))
    if achieved > tolerance + 1e-9:
        warnings.warn(
            f"placement: node tokens deviate up to {achieved:.1%} from the mean (bound "
            f"±{tolerance:.0%}); the largest cluster holds {tokens.max() / mean:.0%} of a node's "
            f"mean share and clusters are never split: use more clusters",
            RuntimeWarning,
            stacklevel=2,
        )
    return node


# --------------------------------------------------------------------------------------------
# placing items, new items and a new node
# --------------------------------------------------------------------------------------------


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
    x = _normalized(embeddings)
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
    x = _normalized(new_embeddings)
    tokens = _as_tokens(new_tokens, len(x))
    if len(placement.centroids) == 0:
        raise ValueError("the placement has no clusters to place new items by")
    if x.shape[1] != placement.centroids.shape[1]:
        raise ValueError(
            f"new embeddings have dim {x.shape[1]}, the placement's centroids {placement.centroids.shape[1]}"
        )
    cluster = _nearest(placement.centroids, x)
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
    loads = _node_loads(cluster_node, cluster_tokens, n_nodes)
    target = cluster_tokens.sum() / n_nodes
    lo, hi = target * (1 - BALANCE_TOLERANCE), target * (1 + BALANCE_TOLERANCE)
    weights = _pair_weights(cluster_tokens, placement.centroids, n_nodes, None) if c else np.zeros((0, 0))
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


# --------------------------------------------------------------------------------------------
# quality measures and baselines
# --------------------------------------------------------------------------------------------


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
    for left, right in _pairs_by_offset(histories, len(item_node), PAIR_WINDOW):
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
