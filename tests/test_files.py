"""Atomic writes (rcllm/files.py): the target is the old file or the complete new one, and no
temporary is left behind, whatever fails on the way."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from rcllm import files
from rcllm.files import file_sha256, fill_file, write_file, write_folder


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_file_writes_bytes_and_text_whole_and_leaves_only_the_target(tmp_path):
    target = tmp_path / "result.json"
    assert write_file(target, b"\x00binary\xff") == target
    assert target.read_bytes() == b"\x00binary\xff"
    write_file(target, "Misérables\n")  # replaces, as UTF-8
    assert target.read_bytes() == "Misérables\n".encode()
    assert os.listdir(tmp_path) == ["result.json"]
    assert mode(target) == 0o644  # not mkstemp's private 0600: caches and model folders are shared


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "Ctrl-C"])
def test_a_failure_mid_write_leaves_the_old_file_intact_and_no_temp_file(tmp_path, error):
    target = tmp_path / "catalog.jsonl"
    write_file(target, "old\n")

    def half_then_fail(tmp):
        tmp.write_text("new but only ha")
        raise error

    with pytest.raises(type(error)):
        fill_file(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["catalog.jsonl"]


@pytest.mark.parametrize("step", ["fsync_file", "replace"])
def test_a_failure_after_the_write_leaves_the_old_file_intact_and_no_temp_file(tmp_path, monkeypatch, step):
    target = tmp_path / "manifest.json"
    write_file(target, "old")

    def crash(*args):
        raise OSError("power cut")

    if step == "fsync_file":
        monkeypatch.setattr(files, "fsync_file", crash)
    else:
        monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        write_file(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    target = tmp_path / "policy.json"
    events = []
    fsync_file, fsync_dir = files.fsync_file, files.fsync_dir

    def file_synced(path):
        events.append(("file", path.read_text(), target.exists()))
        fsync_file(path)

    def dir_synced(path):
        events.append(("dir", str(path), target.read_text()))
        fsync_dir(path)

    monkeypatch.setattr(files, "fsync_file", file_synced)
    monkeypatch.setattr(files, "fsync_dir", dir_synced)
    write_file(target, "complete")
    assert events == [("file", "complete", False), ("dir", str(tmp_path), "complete")]


def test_write_folder_replaces_an_old_folder_whole_and_syncs_every_file(tmp_path, monkeypatch):
    target = tmp_path / "rcllm-model"
    write_folder(target, lambda tmp: (tmp / "old.bin").write_bytes(b"old"))
    synced = []
    fsync_file = files.fsync_file

    def noted(path):
        synced.append(path.name)
        fsync_file(path)

    monkeypatch.setattr(files, "fsync_file", noted)

    def fill(tmp):
        (tmp / "config.json").write_text("{}")
        (tmp / "weights").mkdir()
        (tmp / "weights" / "model.safetensors").write_bytes(b"w" * 100)

    assert write_folder(target, fill) == target
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "config.json", "weights", "weights/model.safetensors",
    ]
    assert sorted(synced) == ["config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["rcllm-model"]  # the temporary and the old folder are gone
    assert mode(target) == 0o755  # not mkdtemp's private 0700


def test_a_failure_while_filling_a_folder_leaves_the_old_one_and_no_temp_folder(tmp_path):
    target = tmp_path / "rcllm-model.ckpt"
    write_folder(target, lambda tmp: (tmp / "state.json").write_text('{"step": 10}'))

    def crash(tmp):
        (tmp / "state.json").write_text('{"step": 20}')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder(target, crash)
    assert (target / "state.json").read_text() == '{"step": 10}'
    assert os.listdir(tmp_path) == ["rcllm-model.ckpt"]


def test_file_sha256_is_the_sha256_of_every_byte(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks and a short last one
    path = tmp_path / "catalog.jsonl"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
