"""Bring your own embeddings (#20): ``rcllm build-cache --embeddings FILE`` places items by the
user's vectors instead of embedding their texts.

The reader (rcllm.build.vectors) is tested on its own for every refusal (an item without a
vector, a vector for no item, two for one, rows and ids that disagree, a dimension that is not
one, NaN, inf, all zeros, a format it cannot read) and for reordering rows to the catalog; then a
plan from a shuffled .npz is checked to be exactly the placement of those vectors, without an
embedder, recorded in the manifest with the file's sha256, and ``--append`` to such a cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from test_build import N_ITEMS, NEW_ITEMS, cli, flat, snapshot, write_jsonl

from rcllm.build import placement as pl
from rcllm.build import plan
from rcllm.build.blocks import item_block_ids
from rcllm.build.options import BuildOptions
from rcllm.build.pipeline import append_items
from rcllm.build.plan import plan_cache
from rcllm.build.vectors import load_embeddings
from rcllm.data.catalog import load_catalog
from rcllm.data.loaders import prepare
from rcllm.data.synthetic import make_synthetic
from rcllm.engine.api import open_ranker
from rcllm.engine.forward import BlockEngine
from rcllm.store import Manifest, placement_dir
from rcllm.store.placement import load_placement

IDS = ["a", "b", "c", "d"]
VECTORS = np.arange(1, 13, dtype=np.float32).reshape(4, 3)


def npy(tmp_path: Path, vectors, ids, name: str = "vectors.npy") -> Path:
    path = tmp_path / name
    np.save(path, vectors)
    if ids is not None:
        path.with_suffix(".ids.json").write_text(json.dumps(ids))
    return path


def npz(tmp_path: Path, name: str = "vectors.npz", **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------------------------
# reading the file


def test_npy_with_its_ids_file_gives_the_rows_in_the_order_asked_and_the_files_sha256(tmp_path):
    path = npy(tmp_path, VECTORS, IDS)
    given = load_embeddings(path, ["c", "a", "d", "b"])
    assert given.vectors.dtype == np.float32
    assert np.array_equal(given.vectors, VECTORS[[2, 0, 3, 1]])
    record = given.record()
    assert record["source"] == "file" and record["file"] == str(path) and record["dim"] == 3
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["ids_sha256"] == hashlib.sha256(path.with_suffix(".ids.json").read_bytes()).hexdigest()
    # the ids file may also be FILE.ids.json, or any file named by --embedding-ids
    other = tmp_path / "other"
    other.mkdir()
    whole = npy(other, VECTORS, None)
    (other / "vectors.npy.ids.json").write_text(json.dumps(IDS))
    assert np.array_equal(load_embeddings(whole, IDS).vectors, VECTORS)
    named = tmp_path / "names.json"
    named.write_text(json.dumps(list(reversed(IDS))))
    assert np.array_equal(load_embeddings(path, IDS, ids_path=named).vectors, VECTORS[::-1])


def test_npz_with_string_or_integer_ids(tmp_path):
    given = load_embeddings(npz(tmp_path, id=np.array(IDS), vector=VECTORS), ["b", "a", "c", "d"])
    assert np.array_equal(given.vectors, VECTORS[[1, 0, 2, 3]]) and "ids_file" not in given.record()
    numbered = npz(tmp_path, "numbered.npz", id=np.array([10, 11, 12, 13]), vector=VECTORS)
    assert np.array_equal(load_embeddings(numbered, ["13", "10", "11", "12"]).vectors, VECTORS[[3, 0, 1, 2]])


@pytest.mark.parametrize(
    "make, asked, message",
    [
        (lambda t: npy(t, VECTORS, IDS), IDS + ["e", "f"], "has no vector for 2 catalog item(s), e.g. 'e', 'f'"),
        (lambda t: npy(t, VECTORS, IDS), IDS[:3], "has vectors for 1 item(s) not in the catalog, e.g. 'd'"),
        (lambda t: npy(t, VECTORS, ["a", "b", "a", "d"]), IDS, "item 'a' has two vectors (rows 0 and 2)"),
        (lambda t: npy(t, VECTORS, IDS[:3]), IDS[:3], "4 vectors but 3 ids"),
        (lambda t: npy(t, VECTORS[0], ["a", "b", "c"]), ["a", "b", "c"], "have shape (3,); expected one row per item"),
        (lambda t: npy(t, np.zeros((4, 0), np.float32), IDS), IDS, "have shape (4, 0)"),
        (lambda t: npy(t, np.where(np.arange(12).reshape(4, 3) == 7, np.nan, VECTORS), IDS), IDS,
         "the vector of item 'c' (row 2) has a NaN or infinite value (1 item(s) in all)"),
        (lambda t: npy(t, np.where(np.arange(12).reshape(4, 3) == 10, np.inf, VECTORS), IDS), IDS,
         "the vector of item 'd' (row 3) has a NaN or infinite value"),
        (lambda t: npy(t, np.array([[1e39, 1, 1]] + VECTORS[1:].tolist()), IDS), IDS,  # overflows float32
         "the vector of item 'a' (row 0) has a NaN or infinite value"),
        (lambda t: npy(t, np.vstack([VECTORS[:1], np.zeros((1, 3)), VECTORS[2:]]), IDS), IDS,
         "the vector of item 'b' (row 1) is all zeros"),
        (lambda t: npy(t, np.array([[1, 2], [3]], dtype=object), ["a", "b"]), ["a", "b"], "not a numeric .npy array"),
        (lambda t: npy(t, np.array([["x", "y"]] * 2), ["a", "b"]), ["a", "b"], "the vectors are <U1, not numbers"),
        (lambda t: npz(t, id=np.array(IDS)), IDS, "no array 'vector' (it has id)"),
        (lambda t: npz(t, id=np.array(IDS), vector=np.array([[1.0, 2.0], [3.0]] * 2, dtype=object)), IDS,
         "not a numeric .npz"),
        (lambda t: npz(t, id=np.array([0.5, 1.5, 2.5, 3.5]), vector=VECTORS), IDS, "'id' must be a 1-D array of strings"),
    ],
    ids=["missing", "extra", "duplicate", "ids-vs-rows", "one-dimensional", "zero-dim", "nan", "inf", "overflow",
         "zero", "ragged-npy", "not-numbers", "npz-no-vector", "ragged-npz", "float-ids"],
)
def test_bad_vectors_are_refused_naming_the_item(make, asked, message, tmp_path):
    with pytest.raises(ValueError) as caught:
        load_embeddings(make(tmp_path), asked)
    assert message in str(caught.value)


def test_missing_files_and_unknown_formats_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_embeddings(tmp_path / "nothing.npy", IDS)
    np.save(tmp_path / "lonely.npy", VECTORS)
    with pytest.raises(FileNotFoundError, match=r"its ids file .*lonely.ids.json is missing.*--embedding-ids.*\.npz"):
        load_embeddings(tmp_path / "lonely.npy", IDS)
    (tmp_path / "vectors.csv").write_text("a,1,2\n")
    with pytest.raises(ValueError, match=r"unknown format '\.csv'; use \.npy, \.npz, \.parquet"):
        load_embeddings(tmp_path / "vectors.csv", IDS)
    with pytest.raises(ValueError, match="--embedding-ids is for .npy files"):
        load_embeddings(npz(tmp_path, id=np.array(IDS), vector=VECTORS), IDS, ids_path=tmp_path / "x.json")


def test_parquet_needs_pyarrow_or_suggests_npz(tmp_path):
    path = tmp_path / "vectors.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match=r"reading \.parquet needs pyarrow, which is not installed; save them as \.npz"):
            load_embeddings(path, IDS)
        return
    pq.write_table(pa.table({"id": IDS, "vector": VECTORS.tolist()}), path)
    assert np.array_equal(load_embeddings(path, IDS[::-1]).vectors, VECTORS[::-1])
    pq.write_table(pa.table({"id": IDS, "vector": [[1.0, 2.0, 3.0]] * 3 + [[1.0, 2.0]]}), path)
    with pytest.raises(ValueError, match="item 'd' \\(row 3\\) has a vector of 2 numbers, item 'a' of 3"):
        load_embeddings(path, IDS)


# ---------------------------------------------------------------------------------------------
# a cache placed by given vectors


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    written = prepare(make_synthetic(n_items=N_ITEMS, n_users=5, seed=0), tmp_path_factory.mktemp("data"))
    return written["catalog.jsonl"]


@pytest.fixture(scope="module")
def ranker(tiny_models):
    return open_ranker(str(tiny_models["llama"]))


def grouped_vectors(n: int, seed: int = 0) -> np.ndarray:
    """Four well separated groups (item n in group n % 4) in 16 dimensions."""
    rng = np.random.default_rng(seed)
    centres = 10 * np.eye(16, dtype=np.float32)[:4]
    return centres[np.arange(n) % 4] + rng.normal(0, 0.5, (n, 16)).astype(np.float32)


@pytest.fixture
def no_embedder(monkeypatch):
    monkeypatch.setattr(plan, "get_embedder", lambda *a, **k: pytest.fail("embedded the items despite --embeddings"))
    monkeypatch.setattr(BlockEngine, "compute_blocks", lambda *a, **k: pytest.fail("--plan computed KV"))


def test_a_plan_from_given_vectors_is_the_placement_of_those_vectors(catalog, ranker, tmp_path, no_embedder):
    items = load_catalog(catalog)
    ids = [i["id"] for i in items]
    vectors = grouped_vectors(len(ids))
    order = np.random.default_rng(1).permutation(len(ids))  # the file lists the items in another order
    path = npz(tmp_path, id=np.array(ids)[order], vector=vectors[order])
    out = tmp_path / "cache"
    report = plan_cache(catalog, BuildOptions(out=out, nodes=2, model=str(ranker.engine.lm.name), embeddings=path),
                        ranker=ranker)

    saved = load_placement(placement_dir(out))
    tokens = np.array([item_block_ids(ranker, i).numel() for i in items])
    expected = pl.place_items(vectors, tokens, 2, seed=0)
    assert np.array_equal(saved.item_cluster, expected.item_cluster)
    assert np.array_equal(saved.item_node, expected.item_node)
    assert np.array_equal(np.load(placement_dir(out) / "embeddings.npy"), vectors)  # in catalog order
    # well separated groups stay together far more than by hash
    assert report.quality["rcllm"]["intra_node_similarity"] > report.quality["hash"]["intra_node_similarity"] + 0.1

    manifest = Manifest.load(out)
    assert manifest.placement["embedder"] == "file"
    assert manifest.placement["embeddings"] == {
        "source": "file", "file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "dim": 16,
    }
    assert report.embeddings == manifest.placement["embeddings"]

    # the same vectors again reuse the placement; other vectors place again
    before = (placement_dir(out) / "placement.npz").read_bytes()
    plan_cache(catalog, BuildOptions(out=out, nodes=2, model=str(ranker.engine.lm.name), embeddings=path), ranker=ranker)
    assert (placement_dir(out) / "placement.npz").read_bytes() == before
    moved = npz(tmp_path, "moved.npz", id=np.array(ids), vector=grouped_vectors(len(ids), seed=7)[::-1].copy())
    plan_cache(catalog, BuildOptions(out=out, nodes=2, model=str(ranker.engine.lm.name), embeddings=moved), ranker=ranker)
    assert np.array_equal(np.load(placement_dir(out) / "embeddings.npy"), grouped_vectors(len(ids), seed=7)[::-1])
    assert Manifest.load(out).placement["embeddings"]["file"] == str(moved)


def test_cli_refuses_bad_vectors_before_touching_the_cache(catalog, tiny_models, tmp_path, no_embedder):
    ids = [i["id"] for i in load_catalog(catalog)]
    vectors = grouped_vectors(len(ids))
    vectors[5, 3] = np.nan
    bad = npy(tmp_path, vectors, ids)
    out = tmp_path / "cache"
    result = cli("build-cache", catalog, "--plan", "--out", out, "--model", tiny_models["llama"], "--embeddings", bad)
    assert result.exit_code == 2
    assert flat(f"the vector of item {ids[5]!r} (row 5) has a NaN or infinite value") in flat(result.output)
    assert not out.exists()

    short = npy(tmp_path, grouped_vectors(len(ids) - 1), ids[:-1], name="short.npy")
    result = cli("build-cache", catalog, "--out", out, "--model", tiny_models["llama"], "--embeddings", short)
    assert result.exit_code == 2
    assert flat(f"has no vector for 1 catalog item(s), e.g. {ids[-1]!r}") in flat(result.output)
    assert not out.exists()


def test_append_to_a_cache_placed_by_given_vectors_needs_vectors_for_the_new_items(catalog, ranker, tmp_path):
    items = load_catalog(catalog)
    ids = [i["id"] for i in items]
    vectors = grouped_vectors(len(ids))
    out = tmp_path / "cache"
    settings = dict(out=out, nodes=2, model=str(ranker.engine.lm.name))
    path = npz(tmp_path, id=np.array(ids), vector=vectors)
    plan_cache(catalog, BuildOptions(**settings, embeddings=path), ranker=ranker)
    new = write_jsonl(tmp_path / "new.jsonl", NEW_ITEMS)
    before = snapshot(out)
    with pytest.raises(ValueError, match="was placed by the vectors in .*vectors.npz: pass --embeddings"):
        append_items(new, BuildOptions(**settings), ranker=ranker)
    narrow = npz(tmp_path, "narrow.npz", id=np.array([i["id"] for i in NEW_ITEMS]), vector=np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="its vectors have 4 dimensions, the cache was placed by 16-dimensional ones"):
        append_items(new, BuildOptions(**settings, embeddings=narrow), ranker=ranker)
    assert snapshot(out) == before

    # every vector, old items' included, in one file: the new ones are placed by nearest centroid
    new_vectors = grouped_vectors(3, seed=3)
    grown = npz(tmp_path, "grown.npz", id=np.array(ids + [i["id"] for i in NEW_ITEMS]), vector=np.vstack([vectors, new_vectors]))
    placement = load_placement(placement_dir(out))
    unit = new_vectors / np.linalg.norm(new_vectors, axis=1, keepdims=True)
    nearest = placement.cluster_node[np.argmax(unit @ placement.centroids.T, axis=1)]
    append_items(new, BuildOptions(**settings, embeddings=grown), ranker=ranker)
    after = load_placement(placement_dir(out))
    assert np.array_equal(after.item_node[len(ids):], nearest)
    record = Manifest.load(out).placement["embeddings"]
    assert record["file"] == str(path) and record["appended"][0]["sha256"] == hashlib.sha256(grown.read_bytes()).hexdigest()
    assert record["appended"][0]["items"] == 3


def test_vectors_cannot_be_appended_to_a_cache_placed_by_an_embedder(catalog, ranker, tmp_path):
    out = tmp_path / "cache"
    plan_cache(catalog, BuildOptions(out=out, nodes=2, model=str(ranker.engine.lm.name), embedder="llm"), ranker=ranker)
    vectors = npz(tmp_path, id=np.array([i["id"] for i in NEW_ITEMS]), vector=np.ones((3, 64), np.float32))
    with pytest.raises(ValueError, match="was placed by the llm embedder's vectors; vectors from .* live in another space"):
        append_items(write_jsonl(tmp_path / "new.jsonl", NEW_ITEMS),
                     BuildOptions(out=out, model=str(ranker.engine.lm.name), embeddings=vectors), ranker=ranker)
