"""Files and folders written whole or not at all, and the sha256 of a file.

A write goes to a temporary file (or folder) beside its target, is fsynced, renamed over the
target, and the folder holding the target is fsynced: after a crash a reader finds the old file
or the complete new one, never part of one. An error on the way (a full disk, Ctrl-C) leaves the
old target as it was and no temporary behind. The temporary sits in the target's own folder
because a rename is atomic only within one filesystem; its name starts with ``.{target name}.``
(``.{target name}.tmp-`` for folders), so the leftovers of a killed process are easy to spot.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["file_sha256", "fill_file", "fsync_dir", "fsync_file", "write_file", "write_folder"]

_CHUNK = 1 << 20  # 1 MiB


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and unlinks inside ``path`` durable (a rename lives in the directory)."""
    if os.name == "nt":  # a folder cannot be opened, so not fsynced, on Windows
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fill_file(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Replace ``path`` by what ``fill(tmp)`` writes to ``tmp``, an empty file beside it.

    For writers that want a path of their own (``faiss.write_index``, ``savefig``, a stream of
    lines); :func:`write_file` for bytes or text in hand. The result is world-readable (0644),
    whatever ``mkstemp``'s private 0600: caches and model folders may be shared. ``path``'s
    folder must exist.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        fill(tmp)
        os.chmod(tmp, 0o644)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_file(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace ``path`` by ``data`` (text is written as UTF-8), whole or not at all."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return fill_file(path, lambda tmp: tmp.write_bytes(payload))


def write_folder(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Run ``fill(tmp)`` on a fresh temporary folder beside ``target``, fsync what it wrote, then
    rename it to ``target``, replacing an older folder (or file). Nothing is left behind if
    ``fill`` fails or is interrupted; the folder is 0755, whatever ``mkdtemp``'s private 0700."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        for folder, _, names in os.walk(tmp):
            for name in names:
                fsync_file(Path(folder) / name)
            fsync_dir(folder)
        if target.exists() or target.is_symlink():
            # a folder cannot be renamed over a non-empty one: move the old one aside first
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(target.parent)
    return target


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
