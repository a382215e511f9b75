"""Compressed KV storage (``rcllm build-cache --kv-dtype fp32|bf16|fp16|int8``, issue #20).

The codec on random blocks (int8's error bound, bf16/fp16 as plain conversions, checksums that
cover the scales, names a float reader cannot misread), the store (its recorded KV dtype, bytes,
peer transfer), and builds through a tiny random-weight model: an int8 build's blocks are the fp32
build's blocks through the codec, a node's ranking from them is the ranking from those blocks,
``full`` does not depend on them, and a cache is refused by a build asking for another KV dtype.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from rcllm.build.pipeline import BuildOptions, add_node, append_items, build_cache
from rcllm.cli.main import app
from rcllm.data.catalog import load_catalog
from rcllm.data.formats import load_histories
from rcllm.data.loaders import prepare
from rcllm.data.synthetic import make_synthetic
from rcllm.engine.api import open_ranker
from rcllm.engine.blocks import BlockKV
from rcllm.engine.prompt import PromptTemplate, item_text
from rcllm.engine.ranker import MemoryBlockCache
from rcllm.store import (
    BlockStore,
    CorruptBlockError,
    IncompatibleCacheError,
    Manifest,
    block_from_bytes,
    block_to_bytes,
    check_compatible,
    node_dir,
    users_dir,
)
from rcllm.store.codec import dequantize, encode, quantize, round_trip
from rcllm.store.tiered import TieredBlockSource

LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 32


def make_block(seed: int, n: int = 12, dtype=torch.float32) -> BlockKV:
    """A random block whose keys have two outlier channels (as post-RoPE keys do) and whose
    tokens differ in scale, so per-token and per-channel scales differ."""
    g = torch.Generator().manual_seed(seed)
    shape = (LAYERS, KV_HEADS, n, HEAD_DIM)
    keys = torch.randn(shape, generator=g)
    keys[..., 3] *= 20.0
    keys[..., 17] *= 8.0
    values = torch.randn(shape, generator=g) * torch.rand((1, 1, n, 1), generator=g) * 4
    return BlockKV(torch.randint(0, 50_000, (n,), generator=g), keys.to(dtype), values.to(dtype), 7, "ab" * 32, "cd" * 16)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("lock.mdb", "writer.lock")
    }


def flip_byte_of(shard: Path, tensor: str) -> None:
    """Flip one bit in the middle of ``tensor``'s bytes in a safetensors file."""
    raw = bytearray(shard.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8 : 8 + header_len])[tensor]["data_offsets"]
    raw[8 + header_len + (begin + end) // 2] ^= 0x01
    shard.write_bytes(raw)


# ---------------------------------------------------------------------------------------------
# the codec


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_int8_round_trip_error_is_at_most_half_a_scale_per_element(axis):
    x = make_block(1, n=40).keys * torch.logspace(-6, 3, 40).reshape(1, 1, 40, 1)  # rows from tiny to huge
    q, scale = quantize(x, axis)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert scale.shape == ((LAYERS, KV_HEADS, 40, 1) if axis == "token" else (LAYERS, KV_HEADS, 1, HEAD_DIM))
    assert int(q.abs().max()) == 127  # the largest element of each row or column uses the full range
    error = (x - dequantize(q, scale, torch.float32)).abs()
    bound = scale.float().expand_as(x) / 2
    assert (error <= bound * (1 + 1e-6)).all(), float((error / bound).max())
    assert float((error / bound).max()) > 0.9  # the bound is tight: rounding, not truncation or slack


def test_int8_refuses_kv_that_is_not_finite():
    x = make_block(2).keys.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize(x, "token")


@pytest.mark.parametrize("kv_dtype, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_bf16_and_fp16_storage_is_exactly_the_dtype_conversion(kv_dtype, dtype):
    block = make_block(3)
    back = round_trip(block, kv_dtype)
    assert back.keys.dtype == torch.float32  # read back in the dtype it was computed in
    assert torch.equal(back.keys, block.keys.to(dtype).float()) and torch.equal(back.values, block.values.to(dtype).float())
    assert not torch.equal(back.keys, block.keys)  # fp32 -> 16 bits loses something: the test can see it
    native = make_block(4, dtype=dtype)  # a block computed in that dtype is stored bit for bit
    again = round_trip(native, kv_dtype)
    assert again.keys.dtype == dtype and torch.equal(again.keys, native.keys) and torch.equal(again.values, native.values)


def test_fp16_storage_refuses_kv_beyond_its_range():
    block = make_block(4)
    block.values[1, 0, 2, 5] = 70_000.0  # fine in float32 and bfloat16, inf in float16
    with pytest.raises(ValueError, match="exceeds float16's range"):
        encode(block, "fp16")
    assert float(round_trip(block, "bf16").values[1, 0, 2, 5]) == pytest.approx(70_000.0, rel=1e-2)


def test_int8_scales_run_per_channel_for_keys_and_per_token_for_values():
    block = make_block(5, n=9)
    tensors = encode(block, "int8")
    assert set(tensors) == {"k_q", "k_scale", "v_q", "v_scale", "ids"}
    assert tensors["k_scale"].shape == (LAYERS, KV_HEADS, 1, HEAD_DIM)
    assert tensors["v_scale"].shape == (LAYERS, KV_HEADS, 9, 1)
    back = round_trip(block, "int8")
    assert back.keys.dtype == torch.float32 and (back.base_pos, back.fingerprint, back.context) == (7, "ab" * 32, "cd" * 16)
    assert float((back.keys - block.keys).abs().max()) <= float(tensors["k_scale"].float().max()) / 2 * (1 + 1e-6)


def test_block_bytes_of_an_int8_block_decode_to_the_codec_round_trip_and_catch_a_bad_scale():
    block = make_block(6)
    data = block_to_bytes(block, "int8")
    got = block_from_bytes(data)
    want = round_trip(block, "int8")
    assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    assert len(data) < 0.35 * len(block_to_bytes(block))  # 12 tokens: headers weigh here
    header_len = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + header_len])["v_scale"]["data_offsets"]
    damaged = bytearray(data)
    damaged[8 + header_len + begin] ^= 0x01
    with pytest.raises(CorruptBlockError, match="checksum"):
        block_from_bytes(bytes(damaged))


# ---------------------------------------------------------------------------------------------
# the store


def test_a_corrupted_scale_in_a_shard_fails_verification(tmp_path):
    with BlockStore(tmp_path, create=True, kv_dtype="int8") as store:
        for i in range(3):
            store.put(f"k{i}", make_block(i))
    shard = tmp_path / "shard-000000.safetensors"
    for tensor in ("k1/k_scale", "k2/v_scale"):
        flip_byte_of(shard, tensor)
    with BlockStore.open_readonly(tmp_path) as store:
        store.get("k0", verify=True)
        for key in ("k1", "k2"):
            with pytest.raises(CorruptBlockError, match=rf"block {key} in .* is corrupt"):
                store.get(key, verify=True)


def test_int8_blocks_use_tensor_names_a_float_reader_cannot_misread(tmp_path):
    from safetensors import safe_open

    with BlockStore(tmp_path, create=True, kv_dtype="int8") as store:
        store.put("k0", make_block(0))
    with safe_open(str(tmp_path / "shard-000000.safetensors"), framework="pt") as shard:
        names = set(shard.keys())
    assert names == {"k0/k_q", "k0/k_scale", "k0/v_q", "k0/v_scale", "k0/ids"}  # no "k0/k" to read as floats
    with BlockStore.open_readonly(tmp_path) as store:
        entry = store.entry("k0")
        assert (entry["kv_dtype"], entry["dtype"]) == ("int8", "float32")
        block = store.get("k0", verify=True)
    assert block.keys.dtype == torch.float32
    want = round_trip(make_block(0), "int8")
    assert torch.equal(block.keys, want.keys) and torch.equal(block.values, want.values)


def test_a_store_keeps_the_kv_dtype_it_recorded_and_refuses_another(tmp_path):
    with BlockStore(tmp_path, create=True, kv_dtype="int8") as store:
        store.put("k0", make_block(0))
    with pytest.raises(IncompatibleCacheError, match=r"holds int8 KV, not fp32: rerun with --kv-dtype int8"):
        BlockStore(tmp_path, kv_dtype="fp32")
    with BlockStore(tmp_path) as store:  # no kv_dtype: the recorded one
        assert store.kv_dtype == "int8"
        store.put("k1", make_block(1))
    with BlockStore.open_readonly(tmp_path) as store:
        assert store.stats()["kv_dtype"] == "int8" and store.entry("k1")["kv_dtype"] == "int8"
    with pytest.raises(ValueError, match="unknown KV dtype 'int4'"):
        BlockStore(tmp_path / "other", create=True, kv_dtype="int4")


@pytest.mark.parametrize("kv_dtype, element", [("fp32", 4), ("bf16", 2), ("fp16", 2), ("int8", 1)])
def test_stored_bytes_are_the_compressed_size(tmp_path, kv_dtype, element):
    n, blocks = 12, 5
    with BlockStore(tmp_path, create=True, kv_dtype=kv_dtype) as store:
        for i in range(blocks):
            store.put(f"k{i}", make_block(i, n=n))
        store.flush()
        stats = store.stats()
    kv = LAYERS * 2 * KV_HEADS * HEAD_DIM * element  # per token
    if kv_dtype == "int8":  # float16 scales: values one per token and head, keys one per channel and head per block
        scales = LAYERS * KV_HEADS * 2 + LAYERS * KV_HEADS * HEAD_DIM * 2 / n
    else:
        scales = 0
    assert stats["kv_bytes"] == blocks * n * (kv + scales)
    assert stats["kv_dtype"] == kv_dtype
    assert kv + scales < stats["bytes_per_token"]  # ids, headers, index on top


def test_peer_transfer_and_a_store_without_kv_dtype_keep_int8_blocks_as_they_are(tmp_path):
    with BlockStore(tmp_path / "a", create=True, kv_dtype="int8") as source:
        source.put("k", make_block(8))
        source.flush()
        data = source.get_bytes("k")
        local = source.get("k")
    assert len(data) < 0.35 * len(block_to_bytes(make_block(8)))  # a peer fetch moves the int8 bytes
    with BlockStore(tmp_path / "b", create=True) as peer:  # a new node (add-node): stores what comes
        peer.put_bytes("k", data)
    with BlockStore(tmp_path / "c", create=True, kv_dtype="fp32") as fp32:  # a store of another dtype converts
        fp32.put_bytes("k", data)
    with BlockStore.open_readonly(tmp_path / "b") as peer, BlockStore.open_readonly(tmp_path / "c") as fp32:
        assert peer.entry("k")["kv_dtype"] == "int8" and fp32.entry("k")["kv_dtype"] == "fp32"
        for store in (peer, fp32):
            got = store.get("k", verify=True)
            assert torch.equal(got.keys, local.keys) and torch.equal(got.values, local.values)


# ---------------------------------------------------------------------------------------------
# builds through a tiny model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    dataset = make_synthetic(n_items=30, n_users=8, seed=0)
    written = prepare(dataset, folder)
    return SimpleNamespace(dataset=dataset, catalog=written["catalog.jsonl"], users=written["histories.jsonl"])


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def ranker(model):
    return open_ranker(str(model))


def options(out: Path, data, model, **overrides) -> BuildOptions:
    return BuildOptions(**{"out": out, "nodes": 2, "model": str(model), "users": data.users, "embedder": "llm", **overrides})


@pytest.fixture(scope="module")
def builds(tmp_path_factory, data, model, ranker):
    """The same catalog and users built twice: blocks stored as fp32 (the default) and as int8."""
    root = tmp_path_factory.mktemp("builds")
    build_cache(data.catalog, options(root / "fp32", data, model), ranker=ranker)
    build_cache(data.catalog, options(root / "int8", data, model, kv_dtype="int8"), ranker=ranker)
    return SimpleNamespace(fp32=root / "fp32", int8=root / "int8")


def stores(cache: Path) -> list[Path]:
    return [node_dir(cache, k) for k in range(len(Manifest.load(cache).nodes))] + [users_dir(cache)]


def test_an_int8_build_stores_the_fp32_builds_blocks_through_the_codec(builds):
    assert Manifest.load(builds.int8).kv_dtype == "int8" and Manifest.load(builds.fp32).kv_dtype == "fp32"
    checked = 0
    for fp32_root, int8_root in zip(stores(builds.fp32), stores(builds.int8)):
        with BlockStore.open_readonly(fp32_root) as a, BlockStore.open_readonly(int8_root) as b:
            assert sorted(a.keys()) == sorted(b.keys()) and b.kv_dtype == "int8"
            for key in a.keys():
                want = round_trip(a.get(key, verify=True), "int8")
                got = b.get(key, verify=True)
                assert got.keys.dtype == torch.float32
                assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
                checked += 1
            sa, sb = a.stats(), b.stats()
            assert sb["kv_dtype"] == "int8" and sb["tokens"] == sa["tokens"] and sb["bytes"] < sa["bytes"]
            # K+V as stored, for the tiny model (2 layers, 2 kv heads, head_dim 16): per token a byte
            # per value and a float16 value scale per head; per block a float16 key scale per channel.
            # (On disk the LMDB index pages of a store this small weigh as much as its KV.)
            layer_heads = 2 * 2
            assert sa["kv_bytes"] == sa["tokens"] * layer_heads * 2 * 16 * 4
            assert sb["kv_bytes"] == sb["tokens"] * layer_heads * (2 * 16 + 2) + sb["blocks"] * layer_heads * 16 * 2
    assert checked == 30 + 8


def test_a_node_ranks_an_int8_cache_as_it_ranks_the_dequantised_blocks(builds, data, ranker):
    """What a node serves from the int8 cache (its tiered source over the stores) against the
    fp32 build's blocks put through the codec in memory: the same scores, bit for bit; and
    ``full`` recomputes every token, so it ranks the int8 and fp32 caches identically."""

    class Dequantised(MemoryBlockCache):
        """The blocks of ``fp32_stores``, each through the int8 codec in memory."""

        def __init__(self, fp32_stores: list[BlockStore]):
            super().__init__(ranker.engine, ranker.builder)
            self.stores = fp32_stores

        def get(self, kind, token_ids):
            key = self.key(token_ids)
            block = next(b for s in self.stores if (b := s.get(key)) is not None)
            return round_trip(block, "int8"), True

    opened: list[BlockStore] = []

    def served(cache: Path) -> TieredBlockSource:
        opened.extend(BlockStore.open_readonly(root) for root in stores(cache))
        return TieredBlockSource(ranker, opened[-len(stores(cache)) :], hot_bytes=1 << 30)

    items = {item["id"]: item for item in load_catalog(data.catalog)}
    user_history = next(iter(load_histories(data.users)[0].values()))
    history = [item_text(items[i]) for i in user_history[-BuildOptions.history :]]
    candidates = [item_text(item) for item in list(items.values())[:5]]
    sources = {}
    try:
        sources["int8"] = served(builds.int8)
        sources["fp32"] = served(builds.fp32)
        sources["dequantised"] = Dequantised(sources["fp32"].stores)
        for policy in ("none", "tail:2"):
            node = ranker.rank(history, candidates, policy, sources["int8"])
            reference = ranker.rank(history, candidates, policy, sources["dequantised"])
            assert node.order == reference.order and node.scores == reference.scores
            assert node.label_logprobs == reference.label_logprobs
            assert node.item_hits == len(candidates) and node.user_hit  # every block came from the stores
        fp32 = ranker.rank(history, candidates, "none", sources["fp32"])
        assert fp32.label_logprobs != ranker.rank(history, candidates, "none", sources["int8"]).label_logprobs
        full = {name: ranker.rank(history, candidates, "full", sources[name]) for name in ("int8", "fp32")}
        assert full["int8"].label_logprobs == full["fp32"].label_logprobs and full["int8"].order == full["fp32"].order
    finally:
        for store in opened:
            store.close()


def test_a_build_or_append_asking_for_another_kv_dtype_is_refused_and_changes_nothing(builds, data, model, ranker, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(builds.int8, out)
    before = snapshot(out)
    for kv_dtype in (None, "fp32", "bf16"):  # None: the model's dtype, float32
        asked = kv_dtype or "fp32"
        for run in (build_cache, append_items):
            with pytest.raises(IncompatibleCacheError, match=rf"stores int8 KV but this build asks for --kv-dtype {asked}: "
                               r"rerun with --kv-dtype int8, or build into another --out"):
                run(data.catalog, options(out, data, model, kv_dtype=kv_dtype), ranker=ranker)
    assert snapshot(out) == before

    result = CliRunner().invoke(app, ["build-cache", str(data.catalog), "--out", str(out), "--model", str(model),
                                      "--users", str(data.users), "--embedder", "llm", "--kv-dtype", "fp16"])
    assert result.exit_code == 2
    assert "stores int8 KV but this build asks for --kv-dtype fp16" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["build-cache", str(data.catalog), "--out", str(tmp_path / "new"),
                                      "--model", str(model), "--kv-dtype", "int4"])
    assert result.exit_code == 2 and "unknown KV dtype 'int4'" in " ".join(result.output.split())
    assert not (tmp_path / "new" / "manifest.json").exists()
    assert snapshot(out) == before
    rerun = build_cache(data.catalog, options(out, data, model, kv_dtype="int8"), ranker=ranker)  # the same dtype
    assert (rerun.computed_blocks, rerun.reused_blocks) == (0, 30 + 8)


def test_a_first_build_that_stopped_before_its_manifest_is_refused_by_its_stores(builds, data, model, ranker, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(builds.int8, out)
    (out / "manifest.json").unlink()  # as if the int8 build had stopped before writing it
    with pytest.raises(IncompatibleCacheError, match=r"holds int8 KV, not fp32: rerun with --kv-dtype int8"):
        build_cache(data.catalog, options(out, data, model), ranker=ranker)


def test_a_cache_from_before_kv_dtype_stores_its_models_dtype(builds, ranker):
    manifest = Manifest.load(builds.fp32)
    manifest.kv_dtype = ""  # what a manifest written before --kv-dtype holds
    template = ranker.builder.template.to_dict()
    check_compatible(manifest, ranker.engine.lm, template, "fp32")
    check_compatible(manifest, ranker.engine.lm, template)  # serving reads whatever is stored
    with pytest.raises(IncompatibleCacheError, match="stores fp32 KV but this build asks for --kv-dtype int8"):
        check_compatible(manifest, ranker.engine.lm, template, "int8")
    with pytest.raises(IncompatibleCacheError, match="another prompt template"):  # the older checks still come first
        check_compatible(manifest, ranker.engine.lm, PromptTemplate(system="Other.\n").to_dict(), "int8")


def test_add_node_moves_int8_blocks_without_converting_them(builds, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(builds.int8, out)
    moved = add_node(out)
    new = node_dir(out, moved["node"])
    with BlockStore.open_readonly(new) as store:
        assert len(store) == moved["items"] > 0
        for key in store.keys():
            assert store.entry(key)["kv_dtype"] == "int8"
            store.get(key, verify=True)
