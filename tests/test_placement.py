"""Placement of item blocks on nodes, on synthetic clustered embeddings (no model, no server)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rcllm.build.placement import (
    BALANCE_TOLERANCE,
    add_node,
    assign_clusters,
    cooccurrence_locality,
    cooccurrence_matrix,
    hash_placement,
    intra_node_similarity,
    kmeans,
    place_items,
    place_new,
    random_placement,
)
from rcllm.store.placement import Placement, load_placement, save_placement

N_ITEMS, N_BLOBS, DIM = 2000, 8, 64
NODE_COUNTS = (2, 3, 5)


@pytest.fixture(scope="module")
def catalog():
    """8 Gaussian blobs on the sphere of unequal sizes (blob k holds a (k+1)/36 share, so the
    largest is bigger than a node's share at N=5), items of 10-40 tokens."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(N_BLOBS, DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    shares = np.arange(1, N_BLOBS + 1) / np.arange(1, N_BLOBS + 1).sum()
    blob = rng.choice(N_BLOBS, size=N_ITEMS, p=shares)
    x = centers[blob] + rng.normal(size=(N_ITEMS, DIM)) / np.sqrt(DIM)  # within-blob cosine ~0.5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tokens = rng.integers(10, 41, size=N_ITEMS)
    return {"x": x.astype(np.float32), "blob": blob, "tokens": tokens, "centers": centers}


@pytest.fixture(scope="module")
def placements(catalog):
    """n_nodes -> place_items without histories, computed once per module."""
    return {n: place_items(catalog["x"], catalog["tokens"], n) for n in NODE_COUNTS}


def within_bound(node_tokens: np.ndarray) -> bool:
    mean = node_tokens.mean()
    return bool(np.all(np.abs(node_tokens / mean - 1) <= BALANCE_TOLERANCE + 1e-9))


def blob_histories(blob: np.ndarray, mixed: tuple[int, int], seed: int = 1) -> list[list[int]]:
    """200 users alternating between the two ``mixed`` blobs, and 20 single-blob users per blob."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(blob == b) for b in range(N_BLOBS)]
    a, b = (members[m] for m in mixed)
    histories = [[int(rng.choice(a if j % 2 else b)) for j in range(20)] for _ in range(200)]
    for items in members:
        histories += [rng.choice(items, 20).tolist() for _ in range(20)]
    return histories


@pytest.mark.parametrize("n_nodes", NODE_COUNTS)
def test_placement_keeps_similar_items_together_better_than_hash_and_random(catalog, placements, n_nodes):
    x = catalog["x"]
    ours = intra_node_similarity(x, placements[n_nodes].item_node)
    hashed = intra_node_similarity(x, hash_placement([f"item-{i}" for i in range(N_ITEMS)], n_nodes))
    rand = intra_node_similarity(x, random_placement(N_ITEMS, n_nodes, seed=0))
    assert ours > 1.5 * max(hashed, rand), (ours, hashed, rand)


@pytest.mark.parametrize("n_nodes", NODE_COUNTS)
def test_node_tokens_are_within_ten_percent_of_the_mean(placements, n_nodes):
    placement = placements[n_nodes]
    assert placement.node_tokens().sum() == placement.item_tokens.sum()
    assert within_bound(placement.node_tokens()), placement.node_tokens()
    assert placement.imbalance() <= BALANCE_TOLERANCE + 1e-9


def test_histories_pull_co_consumed_blobs_onto_one_node(catalog, placements):
    x, blob, tokens = catalog["x"], catalog["blob"], catalog["tokens"]
    alone = placements[3]
    majority = [np.bincount(alone.item_node[blob == b]).argmax() for b in range(N_BLOBS)]
    # co-consume blob 0 with a blob that similarity alone puts on another node
    partner = next(b for b in (5, 4, 6, 3, 7, 2, 1) if majority[b] != majority[0])
    histories = blob_histories(blob, (0, partner))
    together = place_items(x, tokens, 3, histories=histories)
    without = cooccurrence_locality(histories, alone.item_node)
    with_histories = cooccurrence_locality(histories, together.item_node)
    assert with_histories > without + 0.1, (without, with_histories)
    assert within_bound(together.node_tokens())


def test_new_item_goes_to_the_node_holding_its_blob(catalog, placements):
    rng = np.random.default_rng(5)
    placement = placements[5]
    placement = Placement(  # a copy: place_new appends to the placement it is given
        placement.centroids, placement.item_cluster.copy(), placement.cluster_node,
        placement.item_tokens.copy(), placement.n_nodes,
    )
    blob, centers = catalog["blob"], catalog["centers"]
    new = centers + 0.3 * rng.normal(size=centers.shape) / np.sqrt(DIM)
    nodes = place_new(placement, new, np.full(N_BLOBS, 25))
    assert len(placement.item_cluster) == N_ITEMS + N_BLOBS
    assert list(placement.item_node[N_ITEMS:]) == list(nodes)
    whole_blobs = 0
    for b in range(N_BLOBS):
        share = np.bincount(placement.item_node[:N_ITEMS][blob == b], minlength=5)
        assert share[nodes[b]] > 0  # the node holds some of blob b
        if share.max() == share.sum():
            whole_blobs += 1
            assert share[nodes[b]] == share.sum()
    assert whole_blobs >= 1


@pytest.mark.parametrize("n_nodes", NODE_COUNTS)
def test_add_node_moves_whole_clusters_to_a_new_node_of_mean_size(placements, n_nodes):
    before = placements[n_nodes]
    after, moved = add_node(before)
    tokens = before.item_tokens
    assert after.n_nodes == n_nodes + 1
    # only whole clusters move, and only onto the new node
    changed = np.flatnonzero(after.cluster_node != before.cluster_node)
    assert np.all(after.cluster_node[changed] == n_nodes)
    assert set(moved.tolist()) == set(np.flatnonzero(np.isin(before.item_cluster, changed)).tolist())
    assert np.all(after.item_node[moved] == n_nodes)
    fraction = tokens[moved].sum() / tokens.sum()
    assert 0.5 / (n_nodes + 1) <= fraction <= 1.5 / (n_nodes + 1), fraction
    assert within_bound(after.node_tokens()), after.node_tokens()


def test_placement_round_trips_through_disk(placements, tmp_path):
    placement = placements[3]
    save_placement(placement, tmp_path / "placement")
    loaded = load_placement(tmp_path / "placement")
    assert loaded.n_nodes == placement.n_nodes
    for field in ("centroids", "item_cluster", "cluster_node", "item_tokens"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(placement, field))
    assert sorted(p.name for p in (tmp_path / "placement").iterdir()) == ["centroids.faiss", "placement.npz"]


def test_load_refuses_an_index_from_another_placement(placements, tmp_path):
    save_placement(placements[2], tmp_path / "a")
    save_placement(placements[3], tmp_path / "b")
    (tmp_path / "b" / "centroids.faiss").replace(tmp_path / "a" / "centroids.faiss")
    with pytest.raises(ValueError, match="different placements"):
        load_placement(tmp_path / "a")


def test_same_seed_gives_the_same_placement(catalog, placements):
    again = place_items(catalog["x"], catalog["tokens"], 3)
    np.testing.assert_array_equal(again.item_cluster, placements[3].item_cluster)
    np.testing.assert_array_equal(again.cluster_node, placements[3].cluster_node)


def test_a_cluster_too_large_to_balance_is_reported_not_split():
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(6, 8))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    tokens = np.array([1000, 100, 100, 100, 100, 100])  # mean per node (N=2) is 750
    with pytest.warns(RuntimeWarning, match="deviate"):
        node = assign_clusters(tokens, centroids, 2)
    loads = np.bincount(node, weights=tokens, minlength=2)
    assert sorted(loads.tolist()) == [500, 1000]  # everything else joins the other node


def test_assignment_prefers_similar_clusters_on_one_node():
    # two tight groups of 4 clusters, equal tokens: the balanced optimum splits by group
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 16))
    centroids = np.stack([center + 0.1 * rng.normal(size=16) for center in (a, a, a, a, b, b, b, b)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    order = rng.permutation(8)
    node = assign_clusters(np.full(8, 10), centroids[order], 2)
    groups = (order >= 4).astype(int)
    assert len(set(zip(node.tolist(), groups.tolist()))) == 2


def test_cooccurrence_counts_pairs_within_the_window():
    item_cluster = np.array([0, 0, 1, 2])
    histories = [[0, 2, 3], [1, 0], [3]]
    counts = cooccurrence_matrix(histories, item_cluster, 3)
    # pairs: (0,2)->c0-c1, (2,3)->c1-c2, (0,3)->c0-c2, (1,0)->c0-c0
    expected = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0]])
    np.testing.assert_array_equal(counts, expected)
    adjacent_only = expected - np.array([[0, 0, 1], [0, 0, 0], [1, 0, 0]])  # (0,3) is 2 apart
    np.testing.assert_array_equal(cooccurrence_matrix(histories, item_cluster, 3, window=1), adjacent_only)
    with pytest.raises(ValueError, match="out of range"):
        cooccurrence_matrix([[0, 7]], item_cluster, 3)


def test_cooccurrence_locality_is_the_share_of_pairs_on_one_node():
    item_node = np.array([0, 0, 1, 1])
    # pairs (0,1) same, (1,2) different, (0,2) different; (3,3) is a repeat, not a pair
    assert cooccurrence_locality([[0, 1, 2], [3, 3]], item_node) == pytest.approx(1 / 3)
    assert np.isnan(cooccurrence_locality([[1]], item_node))


def test_intra_node_similarity_matches_the_pairwise_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    node = rng.integers(0, 3, 30)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = [xn[i] @ xn[j] for i, j in itertools.permutations(range(30), 2) if node[i] == node[j]]
    assert intra_node_similarity(x, node) == pytest.approx(np.mean(sims), rel=1e-9)


def test_kmeans_handles_fewer_items_than_clusters():
    centroids, assignment = kmeans(np.zeros((0, 4)), 3)
    assert centroids.shape == (0, 4) and assignment.shape == (0,)
    centroids, assignment = kmeans(np.ones((1, 4)), 3)
    assert centroids.shape == (1, 4) and assignment.tolist() == [0]
    x = np.random.default_rng(0).normal(size=(5, 4))
    centroids, assignment = kmeans(x, 10)
    assert len(centroids) == 5 and sorted(assignment.tolist()) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, rtol=1e-5)


def test_hash_placement_is_stable_and_random_placement_balanced():
    # blake2b of the id: the same on every run, machine and Python (unlike hash())
    assert hash_placement(["1193", "661", "914", "3408"], 4).tolist() == [1, 1, 3, 3]
    counts = np.bincount(random_placement(101, 4, seed=3))
    assert counts.max() - counts.min() <= 1


def test_placing_a_catalog_holds_one_normalised_copy_of_its_embeddings():
    """At 1M x 384 a float32 copy is 1.5 GB: besides the caller's array, the placement's numpy
    allocations stay near one copy (it made three, and a squared temporary, before #20)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(16, 96))[rng.integers(0, 16, 20_000)] + rng.normal(size=(20_000, 96))).astype(np.float32)
    before = x.copy()
    tracemalloc.start()
    placement = place_items(x, rng.integers(20, 60, 20_000), 4)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.5 * x.nbytes, f"peak {peak / x.nbytes:.2f}x the embeddings"
    np.testing.assert_array_equal(x, before)  # the caller's array is left as it was
    assert placement.imbalance() <= BALANCE_TOLERANCE + 1e-9
