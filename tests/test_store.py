"""The on-disk block store (shards + LMDB index) and the cache manifest.

Blocks are random tensors, no model, except one test that checks a block stored and loaded back
is still the engine's prefix-cache KV. Crashes are simulated three ways: an exception between the
shard rename and the index transaction, one before the rename (a temp file left), and a writer
process killed with SIGKILL in the middle of a build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rcllm import files
from rcllm.engine.blocks import BlockKV, Segment, uncached
from rcllm.engine.forward import BlockEngine
from rcllm.engine.models import load_model
from rcllm.engine.prompt import PromptTemplate
from rcllm.engine.ranker import block_key
from rcllm.store import (
    BlockStore,
    CorruptBlockError,
    IncompatibleCacheError,
    Manifest,
    StoreBusyError,
    block_from_bytes,
    block_to_bytes,
    check_compatible,
    default_nodes,
    model_record,
    node_dir,
    placement_dir,
    users_dir,
)
from rcllm.store import codec, shards

FINGERPRINT = "ab" * 32
TOKEN_BYTES = 2 * 2 * 8 * 4 * 2 + 8  # make_block's defaults: K and V in float32, and an int64 id
THREE_BLOCKS = 3 * 11 * TOKEN_BYTES  # a shard bound that holds three 11-token blocks


# ---------------------------------------------------------------------------------------------
# helpers


def make_block(seed: int, n: int | None = None, dtype=torch.float32, layers=2, kv_heads=2, head_dim=8) -> BlockKV:
    """A deterministic random block; every third one has no block context, every fourth is bf16."""
    g = torch.Generator().manual_seed(seed)
    n = 5 + seed % 7 if n is None else n
    shape = (layers, kv_heads, n, head_dim)
    return BlockKV(
        token_ids=torch.randint(0, 50_000, (n,), generator=g),
        keys=torch.randn(shape, generator=g).to(dtype),
        values=torch.randn(shape, generator=g).to(dtype),
        base_pos=seed % 13,
        fingerprint=FINGERPRINT,
        context=None if seed % 3 == 0 else f"{seed:032x}",
    )


def mixed_block(seed: int) -> BlockKV:
    return make_block(seed, dtype=torch.bfloat16 if seed % 4 == 0 else torch.float32)


def assert_same_block(a: BlockKV, b: BlockKV) -> None:
    assert a.keys.dtype == b.keys.dtype and a.values.dtype == b.values.dtype
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert (a.base_pos, a.fingerprint, a.context) == (b.base_pos, b.fingerprint, b.context)


def shard_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("shard-"))


N_BUILD = 60


def build_store(root: str, n: int = N_BUILD) -> int:
    """A resumable build: put the blocks not yet durable (3 per shard); returns how many it put.

    Also run as the writer process that the SIGKILL test kills (see HELD_WRITER).
    """
    puts = 0
    with BlockStore(Path(root), create=True, max_shard_bytes=THREE_BLOCKS) as store:
        for i in range(n):
            key = f"block-{i:03d}"
            if key in store:
                continue
            store.put(key, make_block(i, n=11))
            puts += 1
    return puts


# The writer process of the SIGKILL test: build_store, held inside the write of its fifth shard
# (written and fsynced under its temp name, not yet renamed or indexed) until the test kills it,
# so the kill lands mid-shard on every machine, however fast.
HELD_WRITER = """
import sys
sys.path.insert(0, {tests!r})
from rcllm.store import codec, shards
from test_store import build_store
fsync_file, shards_written = shards.fsync_file, []

def fsync_then_hold(path):
    fsync_file(path)
    shards_written.append(path)
    if len(shards_written) == 5:
        print("holding", path.name, flush=True)
        sys.stdin.read()  # until the test kills this process

shards.fsync_file = fsync_then_hold
build_store({root!r})
"""


# ---------------------------------------------------------------------------------------------
# round trip and layout


def test_blocks_round_trip_bit_for_bit_across_shards(tmp_path):
    root = tmp_path / "node-0"
    blocks = {f"key-{i}": mixed_block(i) for i in range(40)}
    with BlockStore(root, create=True, max_shard_bytes=4096) as store:
        for key, block in blocks.items():
            store.put(key, block)
        assert len(store) > 0  # full buffers were written as shards along the way
    names = shard_files(root)
    assert len(names) > 5 and all(n.endswith(".safetensors") for n in names)
    assert (root / "index.lmdb").is_dir()

    with BlockStore.open_readonly(root) as store:
        assert len(store) == 40 and sorted(store.keys()) == sorted(blocks)
        for key, block in blocks.items():
            assert key in store
            assert_same_block(store.get(key, verify=True), block)
            entry = store.entry(key)
            assert entry["shard"] in names
            assert entry["n_tokens"] == block.n_tokens and entry["base_pos"] == block.base_pos
            assert entry["dtype"] == str(block.keys.dtype).removeprefix("torch.")
            assert entry["nbytes"] == block.nbytes and len(entry["checksum"]) == 32
        assert store.get("no-such-key") is None
        stats = store.stats()
    assert stats["blocks"] == 40 and stats["tokens"] == sum(b.n_tokens for b in blocks.values())
    assert stats["shards"] == len(names)
    # A shard holds whole blocks and stays within the bound (one block is ~1.4 KiB here).
    assert all((root / n).stat().st_size <= 4096 + 1024 for n in names)


def test_missing_store_without_create_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        BlockStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="index.lmdb"):
        BlockStore.open_readonly(tmp_path / "empty")


def test_one_writer_at_a_time_and_readers_cannot_write(tmp_path):
    with BlockStore(tmp_path, create=True):
        with pytest.raises(StoreBusyError, match="open for writing elsewhere"):
            BlockStore(tmp_path)
    with BlockStore.open_readonly(tmp_path) as reader, pytest.raises(PermissionError, match="read-only"):
        reader.put("k", make_block(1))


def test_pending_blocks_are_not_durable_until_flush(tmp_path):
    with BlockStore(tmp_path, create=True) as store:
        store.put("k", make_block(1))
        assert "k" not in store and store.get("k") is None and not shard_files(tmp_path)
        store.flush()
        assert "k" in store and len(shard_files(tmp_path)) == 1


# ---------------------------------------------------------------------------------------------
# crash safety


def test_crash_between_shard_rename_and_index_commit_leaves_an_ignored_orphan(tmp_path, monkeypatch):
    block = make_block(7)
    with pytest.raises(OSError, match="power cut"):
        with BlockStore(tmp_path, create=True) as store:
            def crash(entries):
                raise OSError("power cut")

            monkeypatch.setattr(store, "_commit_index", crash)
            store.put("k", block)
            store.flush()
    orphans = shard_files(tmp_path)
    assert orphans == ["shard-000000.safetensors"]  # complete, renamed, but never indexed

    with BlockStore.open_readonly(tmp_path) as reader:
        assert "k" not in reader and len(reader) == 0 and reader.get("k") is None
    with BlockStore(tmp_path) as store:  # a writer's open collects the orphan
        assert shard_files(tmp_path) == [] and store.gc() == []
        assert "k" not in store
        store.put("k", block)
        store.flush()
        assert "k" in store
        assert_same_block(store.get("k", verify=True), block)
    # The orphan's name is not reused: a reader's stale handle can never see other bytes.
    assert shard_files(tmp_path) == ["shard-000001.safetensors"]


def test_crash_during_shard_write_leaves_an_ignored_temp_file(tmp_path, monkeypatch):
    with BlockStore(tmp_path, create=True) as store:
        store.put("a", make_block(1))
    with pytest.raises(OSError, match="disk gone"):
        with BlockStore(tmp_path) as store:
            def crash(path):
                raise OSError("disk gone")

            monkeypatch.setattr(shards, "fsync_file", crash)
            store.put("b", make_block(2))
            store.flush()
    monkeypatch.undo()
    assert shard_files(tmp_path) == ["shard-000000.safetensors", "shard-000001.safetensors.tmp"]

    with BlockStore.open_readonly(tmp_path) as reader:
        assert reader.keys() == ["a"]
        assert_same_block(reader.get("a", verify=True), make_block(1))
    with BlockStore(tmp_path) as store:
        assert shard_files(tmp_path) == ["shard-000000.safetensors"]
        store.put("b", make_block(2))
    with BlockStore.open_readonly(tmp_path) as reader:
        assert sorted(reader.keys()) == ["a", "b"]


@pytest.mark.slow
def test_writer_killed_mid_build_then_rerun_equals_a_clean_build(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    code = HELD_WRITER.format(tests=str(Path(__file__).parent), root=str(killed))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        line = proc.stdout.readline()
        assert line == "holding shard-000004.safetensors.tmp\n", (line, proc.wait())
        # A reader in another process sees the writer's commits while it runs: four shards.
        with BlockStore.open_readonly(killed) as reader:
            assert len(reader) == 12
        assert "shard-000004.safetensors.tmp" in shard_files(killed)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    with BlockStore.open_readonly(killed) as reader:
        survived = reader.keys()
        assert sorted(survived) == [f"block-{i:03d}" for i in range(12)]  # the half-written shard is not
        for key in survived:  # whatever is indexed is whole
            assert_same_block(reader.get(key, verify=True), make_block(int(key[-3:]), n=11))

    assert build_store(str(killed)) == N_BUILD - len(survived)  # the rerun skips durable keys
    assert build_store(str(clean)) == N_BUILD
    with BlockStore.open_readonly(killed) as resumed, BlockStore.open_readonly(clean) as reference:
        assert sorted(resumed.keys()) == sorted(reference.keys()) and len(reference) == N_BUILD
        for key in reference.keys():
            assert_same_block(resumed.get(key, verify=True), reference.get(key))
        referenced = {resumed.entry(k)["shard"] for k in resumed.keys()}
    assert set(shard_files(killed)) == referenced  # no orphan or temp file survived the rerun


def test_verify_catches_a_flipped_byte(tmp_path):
    with BlockStore(tmp_path, create=True) as store:
        for i in range(3):
            store.put(f"k{i}", make_block(i, n=10))
    shard = tmp_path / "shard-000000.safetensors"
    raw = bytearray(shard.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8 : 8 + header_len])["k1/v"]["data_offsets"]
    raw[8 + header_len + (begin + end) // 2] ^= 0x01
    shard.write_bytes(raw)

    with BlockStore.open_readonly(tmp_path) as store:
        assert_same_block(store.get("k0", verify=True), make_block(0, n=10))
        assert not torch.equal(store.get("k1").values, make_block(1, n=10).values)  # no verify: read as is
        with pytest.raises(CorruptBlockError, match=r"block k1 in .*shard-000000\.safetensors is corrupt"):
            store.get("k1", verify=True)


# ---------------------------------------------------------------------------------------------
# transfer, deletion, size


def test_block_bytes_round_trip_and_peer_transfer(tmp_path):
    for seed in (0, 1, 4):  # no context, float32, bfloat16
        block = make_block(seed)
        assert_same_block(block_from_bytes(block_to_bytes(block)), block)

    with BlockStore(tmp_path / "node-0", create=True) as source:
        source.put("k", make_block(4))
        source.flush()
        data = source.get_bytes("k")
        assert source.get_bytes("missing") is None
    with BlockStore(tmp_path / "node-1", create=True) as peer:
        peer.put_bytes("k", data)
    with BlockStore.open_readonly(tmp_path / "node-1") as peer:
        assert_same_block(peer.get("k", verify=True), make_block(4))

    with pytest.raises(ValueError, match="not a serialized rcllm block"):
        block_from_bytes(b"garbage that is no safetensors")
    damaged = bytearray(data)
    damaged[-3] ^= 0x10
    with pytest.raises(CorruptBlockError, match="checksum"):
        block_from_bytes(bytes(damaged))


def test_delete_many_then_compact_frees_disk_and_keeps_the_rest(tmp_path):
    blocks = {f"k{i:02d}": make_block(i, n=11) for i in range(30)}
    with BlockStore(tmp_path, create=True, max_shard_bytes=THREE_BLOCKS) as store:
        for key, block in blocks.items():
            store.put(key, block)
        store.flush()
        assert store.stats()["shards"] == 10
        # A cluster moves away: two of three blocks in each of the first six shards.
        gone = [k for i, k in enumerate(blocks) if i < 18 and i % 3 != 0]
        untouched = {k: store.entry(k)["shard"] for k in list(blocks)[18:]}
        assert store.delete_many(gone + ["never-stored"]) == len(gone)
        before = store.total_bytes
        result = store.compact()
        assert result["rewritten"] == 6 and result["bytes_after"] < result["bytes_before"]
        assert store.total_bytes < before
        assert store.stats()["blocks"] == 30 - len(gone)
        assert all(store.entry(k)["shard"] == shard for k, shard in untouched.items())
    with BlockStore.open_readonly(tmp_path) as store:
        for key, block in blocks.items():
            if key in gone:
                assert store.get(key) is None
            else:
                assert_same_block(store.get(key, verify=True), block)
        referenced = {store.entry(k)["shard"] for k in store.keys()}
    assert set(shard_files(tmp_path)) == referenced


def test_block_moved_by_compaction_after_its_entry_was_read_is_still_found(tmp_path):
    # What a reader in another process meets when a writer compacts between its index lookup
    # and its shard open: the entry names a shard that no longer exists.
    with BlockStore(tmp_path, create=True, max_shard_bytes=THREE_BLOCKS) as store:
        for i in range(3):
            store.put(f"k{i}", make_block(i, n=11))
        stale = store.entry("k2")
        store.delete_many(["k0", "k1"])
        store.compact()
        assert store.entry("k2")["shard"] != stale["shard"] and not (tmp_path / stale["shard"]).exists()
        assert_same_block(codec.to_block(store._read("k2", stale), stale, "cpu"), make_block(2, n=11))


def test_bytes_per_token_is_the_kv_size_plus_a_small_overhead(tmp_path):
    # SmolLM2-135M's KV in bfloat16: 30 layers x 2 (K, V) x 3 kv heads x 64 dims x 2 bytes.
    layers, kv_heads, head_dim, dtype_size = 30, 3, 64, 2
    kv_per_token = layers * 2 * kv_heads * head_dim * dtype_size
    assert kv_per_token == 23_040
    with BlockStore(tmp_path, create=True, max_shard_bytes=4 << 20) as store:
        for i in range(8):
            block = make_block(i, n=40, dtype=torch.bfloat16, layers=layers, kv_heads=kv_heads, head_dim=head_dim)
            store.put(f"k{i}", block)
        store.flush()
        stats = store.stats()
        assert stats["tokens"] == 320 and stats["kv_bytes"] == 320 * kv_per_token
        # token ids (8 bytes each), shard headers and the index add well under 1%.
        assert kv_per_token < stats["bytes_per_token"] == store.bytes_per_token < 1.01 * kv_per_token
        assert stats["bytes"] == store.total_bytes


# ---------------------------------------------------------------------------------------------
# the stored block in the engine


def test_stored_block_placed_at_its_base_position_is_the_prefix_cache_kv(tmp_path, tiny_models):
    lm = load_model(str(tiny_models["llama"]), device="cpu", dtype=torch.float32)
    engine = BlockEngine(lm)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.model.config.vocab_size, (50,), generator=g)
    ctx_ids, block_ids, tail_ids = ids[:16], ids[16:40], ids[40:]
    block = engine.compute_block(block_ids, ctx_ids)
    key = block_key(engine.fingerprint, ctx_ids, block_ids)
    root = node_dir(tmp_path, 0)
    with BlockStore(root, create=True) as store:
        store.put(key, block)
    with BlockStore.open_readonly(root) as store:
        loaded = store.get(key, verify=True)
    assert_same_block(loaded, block)

    segments = [Segment.fresh(ctx_ids), Segment.cached(loaded), Segment.fresh(tail_ids)]
    result = engine.forward(segments, "none", return_kv=True)
    prefill = engine.forward(uncached(segments), "full", return_kv=True)
    assert result.recomputed_fraction == pytest.approx(26 / 50)  # the block itself was reused
    assert (result.logits - prefill.logits).abs().max() <= 1e-5
    assert (result.keys - prefill.keys).abs().max() <= 1e-5
    assert (result.values - prefill.values).abs().max() <= 1e-5

    manifest = Manifest(model=model_record(lm), template=PromptTemplate().to_dict())
    check_compatible(manifest, lm, PromptTemplate().to_dict())
    assert manifest.model["n_layers"] == 2 and manifest.model["kv_heads"] == 2 and manifest.model["head_dim"] == 16


# ---------------------------------------------------------------------------------------------
# manifest


def sample_manifest() -> Manifest:
    return Manifest(
        model={
            "name": "smollm2-135m", "path": "/models/smollm2", "family": "llama", "fingerprint": "1a2b" * 16,
            "tokenizer_hash": "5e6f" * 16, "dtype": "float32", "n_layers": 30, "kv_heads": 3, "head_dim": 64,
        },
        template=PromptTemplate().to_dict(),
        block_context={"token_ids": [1, 2, 3], "key": "c0ffee"},
        nodes=default_nodes(2),
        placement={"n_clusters": 8, "items_per_node": [10, 12], "tokens_per_node": [400, 480]},
        items={"n": 22},
        users={"n": 5},
        build={"seconds": {"embed": 1.5, "precompute": 20.0}},
    )


def test_manifest_round_trip(tmp_path):
    manifest = sample_manifest()
    path = manifest.save(tmp_path)
    assert path == tmp_path / "manifest.json"
    assert manifest.created and manifest.updated == manifest.created
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest and loaded.cache_dir == tmp_path
    assert loaded.nodes == [
        {"node": 0, "host": "127.0.0.1", "port": 8100}, {"node": 1, "host": "127.0.0.1", "port": 8101},
    ]
    assert (node_dir(tmp_path, 1), users_dir(tmp_path), placement_dir(tmp_path)) == (
        tmp_path / "node-1", tmp_path / "users", tmp_path / "placement",
    )


def test_manifest_save_is_atomic(tmp_path, monkeypatch):
    manifest = sample_manifest()
    manifest.save(tmp_path)
    assert os.listdir(tmp_path) == ["manifest.json"]  # no temp file left

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(files.os, "replace", crash)
    manifest.items = {"n": 999}
    with pytest.raises(OSError, match="power cut"):
        manifest.save(tmp_path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["manifest.json"]
    assert Manifest.load(tmp_path).items == {"n": 22}  # the old manifest, whole


def test_manifest_load_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no rcllm cache at {tmp_path}: run rcllm build-cache first"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**sample_manifest().to_dict(), "version": 2}))
    with pytest.raises(ValueError, match="manifest version 2"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**sample_manifest().to_dict(), "colour": "red"}))
    with pytest.raises(ValueError, match="unknown manifest fields: colour"):
        Manifest.load(tmp_path)


def running(**changes) -> SimpleNamespace:
    """A LoadedModel stand-in that matches sample_manifest() unless changed."""
    base = dict(name="smollm2-135m", fingerprint="1a2b" * 16, tokenizer_hash="5e6f" * 16, dtype=torch.float32)
    return SimpleNamespace(**{**base, **changes})


@pytest.mark.parametrize(
    "lm, template, message",
    [
        (
            running(name="./my-model", fingerprint="3c4d" * 16), {},
            r"the cache at .* was built for model smollm2-135m \(fingerprint 1a2b1a2b1a2b\) but you are "
            r"running \./my-model \(3c4d3c4d3c4d\): rebuild with rcllm build-cache --model \./my-model",
        ),
        (
            running(name="./my-model", tokenizer_hash="9999" * 16), {},
            r"tokenizer of smollm2-135m .* but \./my-model has another tokenizer .*"
            r"rcllm build-cache --model \./my-model",
        ),
        (
            running(dtype=torch.bfloat16), {},
            r"holds float32 KV of smollm2-135m but you are running it in bfloat16: run with --dtype fp32, "
            r"or rebuild with rcllm build-cache --model smollm2-135m --dtype bf16",
        ),
        (
            running(), {"system": "You are a film critic.\n"},
            r"another prompt template \(fields that differ: system\).*rcllm build-cache --model smollm2-135m",
        ),
    ],
    ids=["fingerprint", "tokenizer", "dtype", "template"],
)
def test_check_compatible_names_both_sides_and_the_fix(tmp_path, lm, template, message):
    manifest = sample_manifest()
    manifest.save(tmp_path)
    with pytest.raises(IncompatibleCacheError, match=message):
        check_compatible(Manifest.load(tmp_path), lm, {**PromptTemplate().to_dict(), **template})


def test_check_compatible_accepts_the_model_that_built_the_cache():
    check_compatible(sample_manifest(), running(), PromptTemplate().to_dict())


def test_a_cache_built_before_a_template_field_existed_is_read_with_its_default():
    """categories_last came after some caches: one whose manifest lacks it was built inline (the
    field's default) and serves the default template, and is refused for categories-last."""
    manifest = sample_manifest()
    manifest.template = {k: v for k, v in PromptTemplate().to_dict().items() if k != "categories_last"}
    check_compatible(manifest, running(), PromptTemplate().to_dict())
    with pytest.raises(IncompatibleCacheError, match="fields that differ: categories_last"):
        check_compatible(manifest, running(), PromptTemplate(categories_last=True).to_dict())
