"""The catalog file the build reads: ``catalog.jsonl``, one item per line.

Each line is a JSON object::

    {"id": "1193", "title": "One Flew Over the Cuckoo's Nest", "year": 1975,
     "categories": ["Drama"], "text": "optional short description"}

- ``id``: a non-empty string, unique in the file (numbers are refused, not converted: ``1`` and
  ``"01"`` would otherwise become ambiguous keys of the cache).
- ``title``: a non-empty string.
- ``year``: an integer or null; ``categories``: a list of strings; ``text`` / ``description``:
  a string. All optional (null reads as absent).
- Any other field is kept as is. Blank lines are skipped.

The whole file is validated before anything is returned, and every problem is reported at once
as ``file:line: problem``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from rcllm.data.jsonl import DataFormatError, Problems, check_id, json_type, read_objects, unique_valid, write_jsonl


class CatalogError(DataFormatError):
    """A catalog file or item list breaks the catalog format."""


def item_problems(item: Mapping) -> list[str]:
    """What is wrong with one catalog item (empty when it is valid)."""
    problems = []
    for key in ("id", "title"):
        problem = check_id(item, key)
        if problem:
            problems.append(problem)
    for key in ("text", "description"):
        value = item.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{key} must be a string, got {json_type(value)}")
    year = item.get("year")
    if year is not None and (isinstance(year, bool) or not isinstance(year, int)):
        problems.append(f"year must be an integer or null, got {json_type(year)} {year!r}")
    categories = item.get("categories")
    if categories is not None and (
        not isinstance(categories, list) or not all(isinstance(c, str) for c in categories)
    ):
        problems.append("categories must be a list of strings")
    return problems


def load_catalog(
    path: Path | str,
    max_item_tokens: int | None = None,
    count_tokens: Callable[[dict], int] | None = None,
    max_errors: int = 20,
) -> list[dict]:
    """The items of a catalog file, in file order, after validating all of it.

    With ``max_item_tokens``, ``count_tokens(item)`` (the length of the item's block, e.g. the
    token count of ``item_text(item)``) must not exceed it. Raises :class:`CatalogError` listing
    up to ``max_errors`` problems and counting the rest.
    """
    if max_item_tokens is not None and count_tokens is None:
        raise ValueError("max_item_tokens needs count_tokens to measure an item's block")
    problems = Problems(path, max_errors)
    items = _valid_items(read_objects(Path(path), problems), problems, max_item_tokens, count_tokens)
    problems.raise_if_any(CatalogError, "catalog")
    return items


def write_catalog(items: Iterable[Mapping], path: Path | str) -> Path:
    """Write ``items`` as a catalog file atomically; refuses (before writing anything) items
    that :func:`load_catalog` would refuse, naming the line each would have had."""
    rows = [dict(item) for item in items]
    problems = Problems(path)
    _valid_items(enumerate(rows, start=1), problems)
    problems.raise_if_any(CatalogError, "items to write")
    return write_jsonl(rows, path)


def _valid_items(
    numbered: Iterable[tuple[int, dict]],
    problems: Problems,
    max_item_tokens: int | None = None,
    count_tokens: Callable[[dict], int] | None = None,
) -> list[dict]:
    items: list[dict] = []
    for line_no, item in unique_valid(numbered, problems, item_problems, "id"):
        if max_item_tokens is not None:
            n_tokens = count_tokens(item)
            if n_tokens > max_item_tokens:
                problems.add(line_no, f"item {item['id']!r} is {n_tokens} tokens, over max_item_tokens={max_item_tokens}")
                continue
        items.append(item)
    return items
