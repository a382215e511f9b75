"""Item vectors the user already has (a two-tower model, matrix factorisation), to place items by
instead of embedding their texts (``rcllm build-cache --embeddings FILE``).

Accepted files: ``.npy``, a float array [n, dim] whose row i belongs to the i-th id of a JSON
list in an ids file (default: ``vectors.ids.json`` or ``vectors.npy.ids.json`` beside
``vectors.npy``); ``.npz`` with arrays ``id`` [n] and ``vector`` [n, dim]; ``.parquet`` with
columns ``id`` and ``vector`` (a list of floats per row) when pyarrow is installed (rcllm does
not depend on it). Every catalog item needs exactly one finite, non-zero vector, all of one
dimension; anything else is refused naming the item, before the cache is touched.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcllm.files import file_sha256

FORMATS = (".npy", ".npz", ".parquet")
NPZ_HINT = "save them as .npz: np.savez(path, id=np.array(ids), vector=vectors)"


@dataclass(eq=False)
class GivenEmbeddings:
    vectors: np.ndarray  # float32 [n_items, dim], row i for the i-th item asked for
    path: Path
    sha256: str
    ids_path: Path | None = None  # the .npy's ids file
    ids_sha256: str | None = None

    def record(self) -> dict:
        """What the manifest's placement record says about where the vectors came from."""
        record = {"source": "file", "file": str(self.path), "sha256": self.sha256, "dim": int(self.vectors.shape[1])}
        if self.ids_path is not None:
            record.update(ids_file=str(self.ids_path), ids_sha256=self.ids_sha256)
        return record


def default_ids_path(path: Path) -> Path:
    """``vectors.ids.json`` beside ``vectors.npy``, else ``vectors.npy.ids.json`` if only that exists."""
    path = Path(path)
    stem, whole = path.with_suffix(".ids.json"), path.with_name(f"{path.name}.ids.json")
    return whole if whole.is_file() and not stem.is_file() else stem


def load_embeddings(
    path: Path, item_ids: Sequence[str], ids_path: Path | None = None, known: Collection[str] = ()
) -> GivenEmbeddings:
    """The vectors of ``item_ids`` (in that order) from ``path``.

    ``known``: ids the file may also hold without being asked for (items already placed, when
    appending); any other id the catalog does not have is an error, as is an item without one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--embeddings {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--embeddings {path}: unknown format {suffix or '(no suffix)'!r}; use {', '.join(FORMATS)}")
    ids_sha256 = None
    if suffix == ".npy":
        ids_path = Path(ids_path) if ids_path is not None else default_ids_path(path)
        ids = _read_ids_file(path, ids_path)
        ids_sha256 = file_sha256(ids_path)
        rows = _matrix(_load_npy(path), path, ids)
    else:
        if ids_path is not None:
            raise ValueError(f"--embedding-ids is for .npy files; {path} names its rows in its own 'id' array")
        ids, rows = _read_npz(path) if suffix == ".npz" else _read_parquet(path)
    if len(ids) != len(rows):
        raise ValueError(f"{path}: {len(rows)} vectors but {len(ids)} ids; every vector needs one id")
    return GivenEmbeddings(_match(path, ids, rows, item_ids, known), path, file_sha256(path), ids_path, ids_sha256)


def _read_ids_file(path: Path, ids_path: Path) -> list[str]:
    if not ids_path.is_file():
        raise FileNotFoundError(
            f"--embeddings {path}: its ids file {ids_path} is missing; write the item id of each row there "
            f"as a JSON list (or name another with --embedding-ids), or {NPZ_HINT}"
        )
    try:
        ids = json.loads(ids_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ids_path}: not valid JSON ({e}); expected a list of item ids") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{ids_path}: expected a JSON list of item ids (strings), one per row of {path.name}")
    return ids


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays (ragged rows), or not an .npy file
        raise ValueError(f"{path}: not a numeric .npy array ({e}); store one float array [n_items, dim]") from None


def _read_npz(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"id", "vector"} - set(data.files)
            if missing:
                raise ValueError(
                    f"{path}: no array {' or '.join(sorted(missing))!r} (it has {', '.join(data.files) or 'none'}); "
                    "expected 'id' [n] and 'vector' [n, dim]"
                )
            ids, vectors = data["id"], data["vector"]
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a numeric .npz ({e}); 'vector' must be one float array [n, dim]") from None
    if ids.ndim != 1 or ids.dtype.kind not in "USiu":
        raise ValueError(f"{path}: 'id' must be a 1-D array of strings (or integers), got {ids.dtype} {ids.shape}")
    names = [i.decode() if isinstance(i, bytes) else str(i) for i in ids.tolist()]
    return names, _matrix(vectors, path, names)


def _read_parquet(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow, which is not installed; {NPZ_HINT}") from None
    table = pq.read_table(path)
    missing = {"id", "vector"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: no column {' or '.join(sorted(missing))!r}; expected 'id' and 'vector'")
    ids = [str(i) for i in table.column("id").to_pylist()]
    vectors = table.column("vector").to_pylist()
    dims = {len(v) if v is not None else 0 for v in vectors}
    if len(dims) > 1:
        first = len(vectors[0] or [])
        bad = next(n for n, v in enumerate(vectors) if len(v or []) != first)
        raise ValueError(
            f"{path}: item {ids[bad]!r} (row {bad}) has a vector of {len(vectors[bad] or [])} numbers, item "
            f"{ids[0]!r} of {first}: every vector must have the same dimension"
        )
    return ids, np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)


def _matrix(vectors: np.ndarray, path: Path, ids: Sequence[str]) -> np.ndarray:
    if vectors.dtype.kind not in "fiu":
        raise ValueError(f"{path}: the vectors are {vectors.dtype}, not numbers")
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(
            f"{path}: the vectors have shape {vectors.shape}; expected one row per item, [n_items, dim] with dim >= 1"
        )
    return vectors


def _match(path: Path, ids: list[str], rows: np.ndarray, item_ids: Sequence[str], known: Collection[str]) -> np.ndarray:
    """Rows reordered to ``item_ids``, float32, every one checked."""
    row_of: dict[str, int] = {}
    for n, item in enumerate(ids):
        if item in row_of:
            raise ValueError(f"{path}: item {item!r} has two vectors (rows {row_of[item]} and {n}); keep one")
        row_of[item] = n
    missing = [i for i in item_ids if i not in row_of]
    if missing:
        raise ValueError(
            f"{path} has no vector for {len(missing)} catalog item(s), e.g. {', '.join(map(repr, missing[:5]))}; "
            "give every item one"
        )
    wanted, known = set(item_ids), set(known)
    extra = [i for i in ids if i not in wanted and i not in known]
    if extra:
        raise ValueError(
            f"{path} has vectors for {len(extra)} item(s) not in the catalog, e.g. {', '.join(map(repr, extra[:5]))}; "
            "are the file and the catalog from the same export?"
        )
    picked = np.asarray(rows[[row_of[i] for i in item_ids]], dtype=np.float64)
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf: refused below
        vectors = picked.astype(np.float32)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        n = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path}: the vector of item {item_ids[n]!r} (row {row_of[item_ids[n]]}) has a NaN or infinite value "
            f"({int(bad.sum())} item(s) in all); fix them at the source"
        )
    zero = ~vectors.any(axis=1)
    if zero.any():
        n = int(np.flatnonzero(zero)[0])
        raise ValueError(
            f"{path}: the vector of item {item_ids[n]!r} (row {row_of[item_ids[n]]}) is all zeros: it has no "
            "direction to place the item by"
        )
    return vectors
