"""Datasets by name (``ml-1m``, ``ml-100k``, ``synthetic``) or by folder in rcllm's formats, and
``rcllm data prepare``: a dataset written out as the files the build and eval read."""

from __future__ import annotations

from pathlib import Path

from rcllm.data.catalog import load_catalog, write_catalog
from rcllm.data.dataset import Dataset
from rcllm.data.formats import load_interactions, write_histories, write_interactions
from rcllm.data.movielens import (
    ML100K_FILES,
    find_ml1m,
    load_ml1m,
    load_ml100k_grouplens,
    load_ml100k_recbole,
    recbole_ml100k_dir,
)
from rcllm.data.synthetic import make_synthetic

DATASETS = ("ml-1m", "ml-100k", "synthetic", "bookshop")


def bookshop_dir() -> Path:
    """``examples/bookshop``: the small example catalog (48 invented books in six shelves) and 24
    readers' histories written for rcllm's demo and walk-through; it ships in the source tree."""
    folder = Path(__file__).resolve().parents[2] / "examples" / "bookshop"
    if not (folder / CATALOG_FILE).is_file():
        raise FileNotFoundError(
            f"the bookshop example is not at {folder} (it ships in the source tree's examples/, which this install "
            "lacks): pass --dataset ml-100k or a folder with catalog.jsonl and interactions.jsonl"
        )
    return folder
CATALOG_FILE, INTERACTIONS_FILE, HISTORIES_FILE = "catalog.jsonl", "interactions.jsonl", "histories.jsonl"


def load_dataset(name_or_path: str, data_dir: Path | None = None, **synthetic_kwargs) -> Dataset:
    """``ml-1m`` (GroupLens files in ``data_dir``, the user cache, or downloaded: see
    :func:`find_ml1m`), ``ml-100k`` (GroupLens files in ``data_dir`` when it has them, else the
    copy in the recbole wheel), ``synthetic`` (``synthetic_kwargs`` go to :func:`make_synthetic`),
    or a folder holding ``catalog.jsonl`` and ``interactions.jsonl``."""
    if synthetic_kwargs and name_or_path != "synthetic":
        raise ValueError(f"{', '.join(synthetic_kwargs)}: options of the synthetic dataset only")
    if name_or_path == "synthetic":
        return make_synthetic(**synthetic_kwargs)
    if name_or_path == "ml-1m":
        return load_ml1m(find_ml1m(data_dir))
    if name_or_path == "ml-100k":
        return _load_ml100k(data_dir)
    if name_or_path == "bookshop":
        return load_folder(bookshop_dir())
    folder = Path(name_or_path)
    if folder.is_dir():
        return load_folder(folder)
    raise ValueError(
        f"unknown dataset {name_or_path!r}: expected one of {', '.join(DATASETS)}, "
        f"or a folder holding {CATALOG_FILE} and {INTERACTIONS_FILE}"
    )


def load_folder(folder: Path) -> Dataset:
    """A dataset in rcllm's formats; interactions must name catalog items."""
    missing = [name for name in (CATALOG_FILE, INTERACTIONS_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} holds no {' or '.join(missing)} (write them with `rcllm data prepare`)")
    items = {item["id"]: item for item in load_catalog(folder / CATALOG_FILE)}
    interactions, _ = load_interactions(folder / INTERACTIONS_FILE, items, strict=True)
    return Dataset(folder.resolve().name, items, interactions)


def prepare(dataset: Dataset, out_dir: Path) -> dict[str, Path]:
    """Write ``catalog.jsonl``, ``interactions.jsonl`` and ``histories.jsonl`` (every user's
    full sequence, oldest first) into ``out_dir``, each atomically; returns file name -> path."""
    out_dir = Path(out_dir)
    return {
        CATALOG_FILE: write_catalog(dataset.items.values(), out_dir / CATALOG_FILE),
        INTERACTIONS_FILE: write_interactions(dataset.interactions, out_dir / INTERACTIONS_FILE),
        HISTORIES_FILE: write_histories(dataset.user_sequences(), out_dir / HISTORIES_FILE),
    }


def _load_ml100k(data_dir: Path | None) -> Dataset:
    if data_dir is not None:
        for folder in (Path(data_dir), Path(data_dir) / "ml-100k"):
            if all((folder / name).is_file() for name in ML100K_FILES):
                return load_ml100k_grouplens(folder)
    try:
        recbole_ml100k_dir()
    except FileNotFoundError as e:
        where = f"in {data_dir}" if data_dir is not None else "(no data folder given)"
        raise FileNotFoundError(
            f"ml-100k: no GroupLens files ({', '.join(ML100K_FILES)}) {where}, and {e}"
        ) from e
    return load_ml100k_recbole()
