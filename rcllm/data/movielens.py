"""MovieLens-100k as shipped in the recbole wheel (atomic files, tab-separated with typed headers)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from rcllm.data.dataset import Dataset

_YEAR_SUFFIX = re.compile(r"\s*\((\d{4})\)\s*$")


def recbole_ml100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "ml-100k ships in the recbole wheel, which is not installed: pip install --no-deps recbole==1.2.1"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.item").is_file():
        raise FileNotFoundError(f"recbole is installed but {path} holds no ml-100k files")
    return path


def _atomic_rows(path: Path):
    with path.open(encoding="utf-8") as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        for line_no, line in enumerate(f, start=2):
            values = line.rstrip("\n").split("\t")
            if len(values) != len(header):
                raise ValueError(f"{path}:{line_no}: expected {len(header)} tab-separated fields, got {len(values)}")
            yield line_no, dict(zip(header, values))


def load_ml100k_recbole(path: Path | None = None) -> Dataset:
    """Items (title, year, categories) and ratings (as interactions) of ml-100k."""
    path = path or recbole_ml100k_dir()
    items = {}
    for _, row in _atomic_rows(path / "ml-100k.item"):
        title = _YEAR_SUFFIX.sub("", row["movie_title"]).strip()
        item = {"id": row["item_id"], "title": title}
        if row.get("release_year", "").isdigit():
            item["year"] = int(row["release_year"])
        if row.get("class"):
            item["categories"] = row["class"].split()
        items[row["item_id"]] = item
    interactions = []
    for line_no, row in _atomic_rows(path / "ml-100k.inter"):
        if row["item_id"] not in items:
            raise ValueError(f"{path / 'ml-100k.inter'}:{line_no}: unknown item id {row['item_id']!r}")
        interactions.append((row["user_id"], row["item_id"], float(row["timestamp"])))
    return Dataset("ml-100k", items, interactions)
