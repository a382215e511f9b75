"""Assigning whole clusters to nodes: tokens balanced, similar and co-occurring clusters together.

The assignment maximises one objective, the pairwise affinity of clusters that share a node:

    sum over nodes k, clusters a != b on k of  W[a, b]
    W[a, b] = N * t_a * t_b * <mu_a, mu_b>  +  COOCCURRENCE_WEIGHT * C[a, b] / sum(C)

with t the clusters' token shares, mu their centroids and C their co-occurrence counts in user
histories. The first term is, for balanced nodes, about the mean cosine similarity of the items
sharing a node (sum_k ||sum of node k's embeddings||^2, the same quantity that
:func:`intra_node_similarity` measures); the second is the share of co-occurring pairs kept on one
node (what :func:`cooccurrence_locality` measures). Both live in [-1, 1], so neither swamps the
other.
"""

from __future__ import annotations

import warnings

import numpy as np

from rcllm.store.placement import token_imbalance

BALANCE_TOLERANCE = 0.10  # every node's tokens within ±10% of the mean
COOCCURRENCE_WEIGHT = 1.0  # weight of co-occurrence locality against centroid similarity
_MAX_SEARCH_PASSES = 20
_RESTARTS = 4


def node_loads(node: np.ndarray, tokens: np.ndarray, n_nodes: int) -> np.ndarray:
    return np.bincount(node, weights=tokens, minlength=n_nodes).astype(np.float64)


def pair_weights(
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
    loads = node_loads(node, tokens, n_nodes)
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
    loads = node_loads(node, tokens, n_nodes)
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

    weights = pair_weights(tokens, centroids, n_nodes, cooccurrence)
    mean = tokens.sum() / n_nodes
    lo, hi = mean * (1 - tolerance), mean * (1 + tolerance)
    best, best_score = None, -np.inf
    # single moves and swaps cannot carry a group of clusters across nodes sitting at the bounds:
    # a few restarts from differently seeded orders find markedly better optima
    for rng in (np.random.default_rng([seed, r]) for r in range(_RESTARTS)):
        node = _contiguous_cut(tokens, _similarity_order(tokens, centroids, rng), n_nodes)
        _repair_balance(node, tokens, weights, n_nodes, lo, hi)
        # where the bound could not be met, the search may not make any node worse than it is now
        loads = node_loads(node, tokens, n_nodes)
        _local_search(node, tokens, weights, n_nodes, np.minimum(lo, loads), np.maximum(hi, loads), rng)
        balanced = token_imbalance(node_loads(node, tokens, n_nodes)) <= tolerance + 1e-9
        score = (balanced, _objective(node, weights))
        if best is None or score > best_score:
            best, best_score = node, score
    node = best
    achieved = token_imbalance(node_loads(node, tokens, n_nodes))
    if achieved > tolerance + 1e-9:
        warnings.warn(
            f"placement: node tokens deviate up to {achieved:.1%} from the mean (bound "
            f"±{tolerance:.0%}); the largest cluster holds {tokens.max() / mean:.0%} of a node's "
            f"mean share and clusters are never split: use more clusters",
            RuntimeWarning,
            stacklevel=2,
        )
    return node
