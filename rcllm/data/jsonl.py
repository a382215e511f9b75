"""JSON Lines plumbing shared by rcllm's file formats: line-numbered reading that collects every
problem before failing, and atomic writing (through rcllm/files.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from rcllm.files import fill_file


class DataFormatError(ValueError):
    """An input file breaks its format; the message lists ``file:line: problem`` entries."""


class Problems:
    """Problems found in one file, reported together so one run shows everything to fix."""

    def __init__(self, path: Path | str, max_errors: int = 20):
        self.path = str(path)
        self.max_errors = max_errors
        self.shown: list[str] = []
        self.count = 0

    def add(self, line_no: int, problem: str) -> None:
        self.count += 1
        if len(self.shown) < self.max_errors:
            self.shown.append(f"{self.path}:{line_no}: {problem}")

    def raise_if_any(self, error: type[DataFormatError], what: str) -> None:
        if not self.count:
            return
        lines = [f"{self.path}: {self.count} problem{'s' if self.count > 1 else ''} in the {what}:"]
        lines += [f"  {p}" for p in self.shown]
        if self.count > len(self.shown):
            lines.append(f"  ... and {self.count - len(self.shown)} more")
        raise error("\n".join(lines))


def read_objects(path: Path, problems: Problems) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each line of a UTF-8 JSON Lines file that holds a JSON
    object; blank lines are skipped, anything else is recorded in ``problems``."""
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                problems.add(line_no, f"not valid UTF-8 (byte {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.add(line_no, f"malformed JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                problems.add(line_no, f"expected a JSON object, got {json_type(obj)}")
                continue
            yield line_no, obj


def unique_valid(
    numbered: Iterable[tuple[int, dict]], problems: Problems, check: Callable[[Mapping], list[str]], key: str
) -> Iterator[tuple[int, dict]]:
    """The ``(line number, object)`` pairs whose object ``check`` finds nothing wrong with and
    whose ``key`` was not on an earlier line; every problem and repeat is recorded in ``problems``."""
    first_line: dict[str, int] = {}
    for line_no, obj in numbered:
        found = check(obj)
        for problem in found:
            problems.add(line_no, problem)
        if found:
            continue
        value = obj[key]
        if value in first_line:
            problems.add(line_no, f"duplicate {key} {value!r} (first on line {first_line[value]})")
            continue
        first_line[value] = line_no
        yield line_no, obj


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def check_id(obj: dict, key: str) -> str | None:
    """The problem with ``obj[key]`` as an id (a non-empty string), or None when it is fine."""
    if key not in obj:
        return f"missing {key}"
    value = obj[key]
    if not isinstance(value, str):
        return f"{key} must be a string, got {json_type(value)} {json.dumps(value)}"
    if not value.strip():
        return f"{key} is empty"
    return None


def write_lines_atomic(lines: Iterable[str], path: Path | str) -> Path:
    """Write ``lines`` (each without its newline) to ``path`` with :func:`rcllm.files.fill_file`:
    readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line)
                f.write("\n")

    return fill_file(path, fill)


def write_jsonl(rows: Iterable[dict], path: Path | str) -> Path:
    return write_lines_atomic((json.dumps(row, ensure_ascii=False) for row in rows), path)
