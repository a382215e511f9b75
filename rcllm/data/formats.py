"""The user-side files: ``interactions.jsonl`` (what a dataset is made of) and ``histories.jsonl``
(the users whose history blocks the build precomputes, its ``--users`` file).

``interactions.jsonl``, one interaction per line, extra fields ignored::

    {"user_id": "42", "item_id": "1193", "timestamp": 978300760}

``histories.jsonl``, one user per line, items oldest first, each user once::

    {"user_id": "42", "history": ["1193", "661", "914"]}

Ids are non-empty strings, timestamps finite numbers. Loaders validate the whole file and report
every problem as ``file:line: problem`` (:class:`DataFormatError`). Item ids missing from a
given catalog either fail the load (``strict=True``) or are dropped and counted (``strict=False``):
never skipped without a count.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

from rcllm.data.jsonl import DataFormatError, Problems, check_id, json_type, read_objects, unique_valid, write_jsonl

Interaction = tuple[str, str, float]  # (user_id, item_id, timestamp)


def load_interactions(
    path: Path | str,
    items: Collection[str] | None = None,
    strict: bool = True,
    max_errors: int = 20,
) -> tuple[list[Interaction], int]:
    """``(interactions in file order, number dropped for an item id not in items)``."""
    problems = Problems(path, max_errors)
    unknown = Problems(path, max_errors)
    rows: list[Interaction] = []
    for line_no, obj in read_objects(Path(path), problems):
        found = [p for p in (check_id(obj, "user_id"), check_id(obj, "item_id")) if p]
        ts = obj.get("timestamp")
        if "timestamp" not in obj:
            found.append("missing timestamp")
        elif isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            found.append(f"timestamp must be a number, got {json_type(ts)} {ts!r}")
        for problem in found:
            problems.add(line_no, problem)
        if found:
            continue
        if items is not None and obj["item_id"] not in items:
            unknown.add(line_no, f"unknown item id {obj['item_id']!r} (not in the catalog)")
            continue
        rows.append((obj["user_id"], obj["item_id"], float(ts)))
    problems.raise_if_any(DataFormatError, "interactions file")
    if strict:
        unknown.raise_if_any(DataFormatError, "interactions file (use strict=False to drop them)")
    return rows, unknown.count


def _history_problems(obj: Mapping) -> list[str]:
    """What is wrong with one line of a histories file (empty when it is valid)."""
    found = [problem] if (problem := check_id(obj, "user_id")) else []
    history = obj.get("history")
    if "history" not in obj:
        found.append("missing history")
    elif not isinstance(history, list):
        found.append(f"history must be a list of item ids, got {json_type(history)}")
    else:
        bad = [n for n, item in enumerate(history) if not isinstance(item, str) or not item.strip()]
        if bad:
            found.append(f"history[{bad[0]}] must be a non-empty string item id ({len(bad)} bad in all)")
    return found


def load_histories(
    path: Path | str,
    items: Collection[str] | None = None,
    strict: bool = True,
    max_errors: int = 20,
) -> tuple[dict[str, list[str]], int]:
    """``(user id -> history oldest first, number of item ids dropped for not being in items)``.

    With ``strict=False`` an unknown item is removed from its history (which may become empty);
    the user is kept.
    """
    problems = Problems(path, max_errors)
    unknown = Problems(path, max_errors)
    histories: dict[str, list[str]] = {}
    for line_no, obj in unique_valid(read_objects(Path(path), problems), problems, _history_problems, "user_id"):
        user, history = obj["user_id"], obj["history"]
        if items is not None:
            for item in history:
                if item not in items:
                    unknown.add(line_no, f"unknown item id {item!r} in the history of user {user!r}")
            history = [item for item in history if item in items]
        histories[user] = history
    problems.raise_if_any(DataFormatError, "histories file")
    if strict:
        unknown.raise_if_any(DataFormatError, "histories file (use strict=False to drop them)")
    return histories, unknown.count


def write_interactions(interactions: Iterable[Interaction], path: Path | str) -> Path:
    """Write ``(user_id, item_id, timestamp)`` rows as ``interactions.jsonl``, atomically."""
    return write_jsonl(
        ({"user_id": u, "item_id": i, "timestamp": _number(ts)} for u, i, ts in interactions), path
    )


def write_histories(histories: Mapping[str, Sequence[str]], path: Path | str) -> Path:
    """Write user id -> history (oldest first) as ``histories.jsonl``, atomically."""
    return write_jsonl(({"user_id": u, "history": list(h)} for u, h in histories.items()), path)


def _number(ts: float) -> int | float:
    # Unix seconds are whole numbers; writing 978300760 rather than 978300760.0 keeps files diffable
    return int(ts) if float(ts).is_integer() else ts
