"""``rcllm build-cache`` end to end on a tiny random-weight model and a small synthetic dataset.

One clean 2-node build (60 items, 15 user histories) is shared by the module; tests that change a
cache work on a copy. Covered: validation before any work (file:line: problem, the cache left
untouched), resuming after a crash (exceptions at chosen moments in process, and one SIGKILLed
``rcllm build-cache`` process), refusal of a cache by another model, dtype or template, exactness
of every stored block against a plain prefill, ``--append``, ``rcllm cache add-node``, bytes per
token, and the CLI's defaults with ``rcllm cache info``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rcllm.build import pipeline, plan
from rcllm.build.embed import get_embedder
from rcllm.build.pipeline import (
    BuildOptions,
    Reporter,
    add_node,
    append_items,
    build_cache,
    context_block,
    history_block_ids,
    item_block_ids,
    key_for,
)
from rcllm.cli.main import app
from rcllm.data.catalog import load_catalog
from rcllm.data.jsonl import DataFormatError
from rcllm.data.loaders import prepare
from rcllm.data.synthetic import make_synthetic
from rcllm.engine.api import open_ranker
from rcllm.engine.blocks import BlockKV, Segment, context_hash, uncached
from rcllm.engine.forward import BlockEngine
from rcllm.engine.prompt import PromptTemplate, item_text
from rcllm.store import (
    BlockStore,
    IncompatibleCacheError,
    Manifest,
    StoreNotBuiltError,
    cache_info,
    node_dir,
    placement_dir,
    require_built,
    store_states,
    users_dir,
)
from rcllm.store.placement import load_placement

REPO = Path(__file__).resolve().parents[1]
N_ITEMS, N_USERS, NODES = 60, 15, 2
# The tiny models' KV per token: 2 layers x (K, V) x 2 kv heads x 16 dims x 4 bytes (float32).
TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4

# Items for --append, one per theme of make_synthetic's first three categories.
NEW_ITEMS = [
    {"id": "new-space", "title": "The Orbital Nebula Express", "year": 2025, "categories": ["Space Opera"],
     "text": "A space opera story of starship and comet."},
    {"id": "new-detective", "title": "The Crooked Alibi Returns", "year": 2025, "categories": ["Detective"],
     "text": "A detective story of inspector and witness."},
    {"id": "new-romance", "title": "The Golden Wedding Letter", "year": 2025, "categories": ["Romance"],
     "text": "A romance story of heart and promise."},
]


# ---------------------------------------------------------------------------------------------
# helpers


class RecordingReporter(Reporter):
    def __init__(self):
        self.logs: list[str] = []
        self.phases: list[str] = []

    def phase(self, name, total):
        self.phases.append(name)
        return lambda n=1: None

    def log(self, message):
        self.logs.append(message)


def options(out: Path, data, model, **overrides) -> BuildOptions:
    settings = dict(out=Path(out), nodes=NODES, model=str(model), users=data.users, interactions=data.interactions)
    settings.update(overrides)
    return BuildOptions(**settings)


def cli(*args: str):
    """``rcllm ARGS`` in this process (typer's CliRunner): the result has exit_code, stdout, output."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def flat(text: str) -> str:
    """Text without any whitespace: rich wraps long lines (paths) at the console width."""
    return "".join(text.split())


def store_dirs(out: Path) -> list[Path]:
    n_nodes = len(Manifest.load(out).nodes)
    return [node_dir(out, k) for k in range(n_nodes)] + [users_dir(out)]


def read_store(root: Path) -> dict[str, BlockKV]:
    """Every durable block of a store, checksums verified; {} when the store has no index yet."""
    try:
        store = BlockStore.open_readonly(root)
    except FileNotFoundError:
        return {}
    with store:
        return {key: store.get(key, verify=True) for key in store.keys()}


def shard_names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name.startswith("shard-")}


def assert_no_orphans(root: Path) -> None:
    """The store's folder holds exactly the shards its index names: no orphan, no temp file."""
    with BlockStore.open_readonly(root) as store:
        referenced = {store.entry(k)["shard"] for k in store.keys()}
    assert shard_names(root) == referenced


def assert_same_block(a: BlockKV, b: BlockKV) -> None:
    assert a.keys.dtype == b.keys.dtype
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert (a.base_pos, a.fingerprint, a.context) == (b.base_pos, b.fingerprint, b.context)


def assert_same_blocks(got: dict[str, BlockKV], want: dict[str, BlockKV]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert_same_block(got[key], want[key])


STABLE_MANIFEST_FIELDS = ("version", "model", "template", "block_context", "nodes", "placement", "items", "users", "stores")


def assert_same_cache(got: Path, want: Path) -> None:
    """Same blocks bit for bit in every store, same placement, same manifest (less timings)."""
    a, b = Manifest.load(got), Manifest.load(want)
    for name in STABLE_MANIFEST_FIELDS:
        assert getattr(a, name) == getattr(b, name), name
    assert sorted(p.name for p in got.glob("node-*")) == sorted(p.name for p in want.glob("node-*"))
    for root in store_dirs(want):
        mine = got / root.name
        assert_same_blocks(read_store(mine), read_store(root))
        assert_no_orphans(mine)
    for name in ("items.json", "keys.json"):
        assert (placement_dir(got) / name).read_bytes() == (placement_dir(want) / name).read_bytes()
    pa, pb = load_placement(placement_dir(got)), load_placement(placement_dir(want))
    assert np.array_equal(pa.item_node, pb.item_node) and np.array_equal(pa.item_cluster, pb.item_cluster)
    assert (got / "catalog.jsonl").read_bytes() == (want / "catalog.jsonl").read_bytes()


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (LMDB's reader table and the writer lock excluded:
    opening a store read-only writes to them)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("lock.mdb", "writer.lock")
    }


def copy_cache(clean, tmp_path: Path, name: str = "cache") -> Path:
    out = tmp_path / name
    shutil.copytree(clean.out, out)
    return out


def forbid_compute(monkeypatch) -> None:
    """Fail loudly if anything embeds items or computes KV blocks."""

    def refuse(*args, **kwargs):
        raise AssertionError("computed KV or embedded items where nothing may be computed")

    monkeypatch.setattr(BlockEngine, "compute_blocks", refuse)
    monkeypatch.setattr(BlockEngine, "compute_block", refuse)
    monkeypatch.setattr(plan, "get_embedder", refuse)


def count_computed_blocks(monkeypatch) -> list[int]:
    """Wrap compute_blocks; the returned list grows by the number of blocks of each call."""
    computed: list[int] = []
    original = BlockEngine.compute_blocks

    def counting(self, blocks, *args, **kwargs):
        computed.append(len(blocks))
        return original(self, blocks, *args, **kwargs)

    monkeypatch.setattr(BlockEngine, "compute_blocks", counting)
    return computed


def crash_compute_after(monkeypatch, calls: int) -> None:
    """compute_blocks works ``calls`` times, then the build 'crashes' inside the next call."""
    original = BlockEngine.compute_blocks
    seen = [0]

    def crashing(self, *args, **kwargs):
        if seen[0] == calls:
            raise RuntimeError("simulated crash")
        seen[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BlockEngine, "compute_blocks", crashing)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def remembered_embeddings():
    """An item text embeds the same in every build: the default embedder (MiniLM) embeds each
    text once per module, which keeps the many fresh builds here fast. Placement is unchanged."""
    real = plan.get_embedder
    memo: dict[str, np.ndarray] = {}
    shared = {}

    class Remembering:
        def __init__(self, inner):
            self.inner, self.name, self.dim = inner, inner.name, inner.dim

        def embed(self, texts, batch_size=64, progress=None):
            missing = [t for t in dict.fromkeys(texts) if t not in memo]
            if missing:
                memo.update(zip(missing, self.inner.embed(missing, batch_size)))
            if progress is not None:
                progress(len(texts))
            return np.stack([memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def get_embedder(spec="minilm", lm=None, device="cpu"):
        if spec != "minilm":
            return real(spec, lm=lm, device=device)
        if spec not in shared:
            shared[spec] = Remembering(real(spec, lm=lm, device=device))
        return shared[spec]

    mp = pytest.MonkeyPatch()
    mp.setattr(plan, "get_embedder", get_embedder)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    dataset = make_synthetic(n_items=N_ITEMS, n_users=N_USERS, seed=0)
    written = prepare(dataset, folder)
    return SimpleNamespace(
        dir=folder, dataset=dataset, catalog=written["catalog.jsonl"], users=written["histories.jsonl"],
        interactions=written["interactions.jsonl"],
    )


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def ranker(model):
    return open_ranker(str(model))


@pytest.fixture(scope="module")
def clean(tmp_path_factory, data, model, ranker):
    """One clean build, shared: never mutate it (copy_cache first)."""
    out = tmp_path_factory.mktemp("clean") / "cache"
    reporter = RecordingReporter()
    report = build_cache(data.catalog, options(out, data, model), reporter, ranker=ranker)
    return SimpleNamespace(out=out, report=report, reporter=reporter)


# ---------------------------------------------------------------------------------------------
# the clean build


def test_clean_build_puts_every_block_on_the_node_its_placement_names(clean, data, ranker):
    out, report = clean.out, clean.report
    assert (report.items, report.users) == (N_ITEMS, N_USERS)
    assert (report.computed_blocks, report.reused_blocks) == (N_ITEMS + N_USERS, 0)
    assert report.imbalance <= 0.10 + 1e-9
    assert set(clean.reporter.phases) >= {"node 0: item KV blocks", "node 1: item KV blocks", "history KV blocks"}

    items = load_catalog(data.catalog)
    assert load_catalog(out / "catalog.jsonl") == items
    item_ids = json.loads((placement_dir(out) / "items.json").read_text())
    keys = json.loads((placement_dir(out) / "keys.json").read_text())
    assert item_ids == [i["id"] for i in items]
    assert keys == [key_for(ranker, item_block_ids(ranker, i)) for i in items]
    placement = load_placement(placement_dir(out))
    assert placement.n_nodes == NODES and len(placement.item_cluster) == N_ITEMS

    for k in range(NODES):
        blocks = read_store(node_dir(out, k))
        want = {keys[r] for r in np.flatnonzero(placement.item_node == k)}
        assert set(blocks) == want and len(want) > 0
        assert_no_orphans(node_dir(out, k))
        row = report.nodes[k]
        assert (row["node"], row["items"], row["blocks"]) == (k, len(want), len(want))
        assert row["tokens"] == sum(b.n_tokens for b in blocks.values())
    by_id = {i["id"]: i for i in items}
    histories = [json.loads(line)["history"] for line in data.users.read_text().splitlines()]
    want_users = {key_for(ranker, history_block_ids(ranker, by_id, h, 20)) for h in histories}
    assert set(read_store(users_dir(out))) == want_users
    assert (users_dir(out) / "histories.jsonl").read_bytes() == data.users.read_bytes()

    manifest = Manifest.load(out)
    assert [n["node"] for n in manifest.nodes] == list(range(NODES))
    assert manifest.items["count"] == N_ITEMS and manifest.users["count"] == N_USERS
    assert manifest.items["catalog_sha256"] == hashlib.sha256((out / "catalog.jsonl").read_bytes()).hexdigest()
    assert manifest.placement["items_per_node"] == [r["items"] for r in report.nodes]
    assert manifest.block_context["token_ids"] == ranker.builder.system_ids().tolist()
    assert manifest.model["fingerprint"] == ranker.engine.fingerprint
    # placement quality is reported for ours and the baselines
    assert set(report.quality) == {"rcllm", "hash", "random"}
    assert all("cooccurrence_locality" in q for q in report.quality.values())


def test_manifest_block_context_key_is_the_context_every_stored_block_carries(clean, ranker):
    # Every block was computed after the system prompt: its ``context`` is the hash of those ids.
    # The manifest's block context must name that context, not the empty one before it.
    contexts = {b.context for root in store_dirs(clean.out) for b in read_store(root).values()}
    assert contexts == {context_hash(ranker.builder.system_ids())}
    assert Manifest.load(clean.out).block_context["key"] in contexts


def test_rerun_of_a_complete_build_computes_nothing_and_changes_no_block(clean, data, model, ranker, tmp_path):
    out = copy_cache(clean, tmp_path)
    reporter = RecordingReporter()
    with pytest.MonkeyPatch.context() as mp:
        computed = count_computed_blocks(mp)
        mp.setattr(plan, "get_embedder", lambda *a, **k: pytest.fail("re-embedded a placed catalog"))
        report = build_cache(data.catalog, options(out, data, model), reporter, ranker=ranker)
    assert sum(computed) == 0
    assert (report.computed_blocks, report.reused_blocks) == (0, N_ITEMS + N_USERS)
    assert any("reusing the placement" in m for m in reporter.logs)
    assert_same_cache(out, clean.out)


# ---------------------------------------------------------------------------------------------
# validation before anything is computed or written


def _corrupt_catalog(data, folder):
    lines = data.catalog.read_text().splitlines()
    lines[6] = json.dumps({"id": 7, "title": "Seven"})  # line 7: a number id
    lines[11] = '{"id": "11", "title": '  # line 12: malformed JSON
    path = folder / "catalog.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return {"catalog": path}, [f"{path}:7: id must be a string", f"{path}:12: malformed JSON", "2 problems"]


def _long_item(data, folder):
    rows = [json.loads(line) for line in data.catalog.read_text().splitlines()]
    rows[2]["text"] = "a long description " * 20
    path = write_jsonl(folder / "catalog.jsonl", rows)
    return {"catalog": path, "max_item_tokens": 40}, [f"{path}:3: item '2' is", "over max_item_tokens=40"]


def _unknown_history_item(data, folder):
    rows = [json.loads(line) for line in data.users.read_text().splitlines()]
    rows[3]["history"].append("no-such-item")
    path = write_jsonl(folder / "histories.jsonl", rows)
    return {"users": path}, [f"{path}:4: unknown item id 'no-such-item'"]


def _bad_timestamp(data, folder):
    rows = [json.loads(line) for line in data.interactions.read_text().splitlines()]
    rows[1]["timestamp"] = "yesterday"
    path = write_jsonl(folder / "interactions.jsonl", rows)
    return {"interactions": path}, [f"{path}:2: timestamp must be a number"]


@pytest.mark.parametrize("corrupt", [_corrupt_catalog, _long_item, _unknown_history_item, _bad_timestamp])
def test_a_bad_input_line_is_reported_before_anything_is_computed_or_written(
    corrupt, clean, data, model, ranker, tmp_path, monkeypatch
):
    out = copy_cache(clean, tmp_path)
    before = snapshot(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    changed, expected = corrupt(data, bad)
    catalog = changed.pop("catalog", data.catalog)
    forbid_compute(monkeypatch)
    with pytest.raises(DataFormatError) as caught:
        build_cache(catalog, options(out, data, model, **changed), ranker=ranker)
    for text in expected:
        assert text in str(caught.value)
    assert snapshot(out) == before
    # a fresh cache folder is not even created
    with pytest.raises(DataFormatError):
        build_cache(catalog, options(tmp_path / "fresh", data, model, **changed), ranker=ranker)
    assert not (tmp_path / "fresh").exists()


def test_cli_reports_a_bad_catalog_line_and_exits_non_zero_leaving_the_cache(clean, data, model, tmp_path, monkeypatch):
    out = copy_cache(clean, tmp_path)
    before = snapshot(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    changed, expected = _corrupt_catalog(data, bad)
    forbid_compute(monkeypatch)
    result = cli("build-cache", changed["catalog"], "--out", out, "--model", model,
                 "--users", data.users, "--interactions", data.interactions)
    assert result.exit_code == 2
    assert "error" in result.output
    for text in expected:
        assert flat(text) in flat(result.output)
    assert snapshot(out) == before


def test_cli_error_shows_item_ids_that_look_like_markup(tmp_path, model):
    # Item ids are user data; the error printer must not read them as rich markup.
    catalog = write_jsonl(tmp_path / "catalog.jsonl", [{"id": "[/b]", "title": "A"}, {"id": "[/b]", "title": "B"}])
    result = CliRunner().invoke(app, ["build-cache", str(catalog), "--out", str(tmp_path / "c"), "--model", str(model)])
    assert result.exit_code == 2, f"not a clean error exit: {result.exception!r}"
    assert flat(f"{catalog}:2: duplicate id '[/b]'") in flat(result.output)


def test_a_cache_with_another_node_count_is_refused_pointing_at_add_node(clean, data, model, ranker, tmp_path, monkeypatch):
    out = copy_cache(clean, tmp_path)
    before = snapshot(out)
    forbid_compute(monkeypatch)
    with pytest.raises(ValueError, match="cache add-node"):
        build_cache(data.catalog, options(out, data, model, nodes=3), ranker=ranker)
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# crash and resume


@pytest.mark.parametrize("crash_at", ["first-batch", "second-node", "histories"])
def test_build_crashed_mid_compute_resumes_to_exactly_the_clean_build(crash_at, clean, data, model, ranker, tmp_path):
    # compute_blocks runs once per batch (16 blocks) of each node's items, then of the histories
    batches = [-(-row["items"] // BuildOptions.batch_size) for row in clean.report.nodes]
    calls_before_crash = {"first-batch": 0, "second-node": batches[0], "histories": sum(batches)}[crash_at]
    out = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as mp:
        crash_compute_after(mp, calls_before_crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            build_cache(data.catalog, options(out, data, model), ranker=ranker)

    # Planned, half-built: the stores the crash left unfinished say so, and nothing serves them.
    finished = {"second-node": ["node-0"], "histories": ["node-0", "node-1"]}.get(crash_at, [])
    manifest = Manifest.load(out)
    assert [s.name for s in store_states(out, manifest) if s.built] == finished
    assert [row["state"] for row in cache_info(out)["stores"]] == [
        "built" if name in finished else "not built" for name in ("node-0", "node-1", "users")
    ]
    with pytest.raises(StoreNotBuiltError, match="is not built"):
        require_built(out, manifest, ["node-0", "node-1", "users"])
    durable = 0
    for root in [node_dir(clean.out, k) for k in range(NODES)] + [users_dir(clean.out)]:
        survived = read_store(out / root.name)
        reference = read_store(root)
        assert set(survived) <= set(reference)  # whatever is indexed is whole and right
        assert_same_blocks(survived, {k: reference[k] for k in survived})
        durable += len(survived)
        if root.name in finished:
            assert len(survived) == len(reference)  # a store finished before the crash is durable
    if crash_at == "first-batch":
        assert durable == 0

    reporter = RecordingReporter()
    with pytest.MonkeyPatch.context() as mp:
        computed = count_computed_blocks(mp)
        report = build_cache(data.catalog, options(out, data, model), reporter, ranker=ranker)
    assert any("reusing the placement" in m for m in reporter.logs)
    assert (report.computed_blocks, report.reused_blocks) == (N_ITEMS + N_USERS - durable, durable)
    assert sum(computed) == N_ITEMS + N_USERS - durable
    assert_same_cache(out, clean.out)


def test_crash_between_shard_rename_and_index_commit_never_serves_the_orphan(clean, data, model, ranker, tmp_path):
    out = tmp_path / "cache"
    original = BlockStore._commit_index
    commits = [0]

    def crash_on_second_commit(self, entries):
        commits[0] += 1
        if commits[0] == 2:  # node 1's shard is renamed into place, its index transaction never runs
            raise RuntimeError("simulated crash")
        return original(self, entries)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BlockStore, "_commit_index", crash_on_second_commit)
        with pytest.raises(RuntimeError, match="simulated crash"):
            build_cache(data.catalog, options(out, data, model), ranker=ranker)
    node1 = node_dir(out, 1)
    assert len(shard_names(node1)) == 1  # the orphan shard is on disk ...
    assert read_store(node1) == {}  # ... but no reader sees any of its blocks
    assert_same_blocks(read_store(node_dir(out, 0)), read_store(node_dir(clean.out, 0)))

    report = build_cache(data.catalog, options(out, data, model), ranker=ranker)
    assert report.reused_blocks == len(read_store(node_dir(clean.out, 0)))
    assert_same_cache(out, clean.out)  # includes: the orphan is gone


# The real CLI, held at the first batch of blocks it computes after a store's flush made blocks
# durable (node 0 done, node 1 started) until the test kills it: the kill lands there on every
# machine, however fast.
HELD_CLI = """
import sys
from rcllm.engine.forward import BlockEngine
from rcllm.store import BlockStore
flush, compute_blocks = BlockStore.flush, BlockEngine.compute_blocks
durable = []

def flush_and_note(self):
    flush(self)
    if len(self):
        durable.append(self.root.name)

def compute_or_hold(self, *args, **kwargs):
    if durable:
        print("holding after", durable[-1], flush=True)
        sys.stdin.read()  # until the test kills this process
    return compute_blocks(self, *args, **kwargs)

BlockStore.flush = flush_and_note
BlockEngine.compute_blocks = compute_or_hold
from rcllm.cli.main import main
main()
"""


@pytest.mark.slow
def test_build_cache_process_killed_with_sigkill_then_rerun_equals_the_clean_build(clean, data, model, tmp_path):
    out = tmp_path / "cache"
    args = ["build-cache", str(data.catalog), "--out", str(out), "--model", str(model),
            "--users", str(data.users), "--interactions", str(data.interactions)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "build.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-c", HELD_CLI, *args], cwd=REPO, env=env,
                                stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a measure
        while "holding after node-0" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"build ended before it was held: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the build never reached node 1: {log.read_text()[-2000:]}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL

    # node 0 finished and recorded itself built; node 1 and the users store did not
    assert [s.name for s in store_states(out, Manifest.load(out)) if s.built] == ["node-0"]
    with pytest.raises(StoreNotBuiltError, match=r"node-1 of the cache at .* is not built \(no blocks built yet\)"):
        require_built(out, Manifest.load(out), ["node-0", "node-1"])
    durable = 0
    for root in [node_dir(clean.out, k) for k in range(NODES)] + [users_dir(clean.out)]:
        survived = read_store(out / root.name)
        reference = read_store(root)
        assert_same_blocks(survived, {k: reference[k] for k in survived if k in reference})
        assert set(survived) == (set(reference) if root.name == "node-0" else set())  # node 0 durable, nothing else
        durable += len(survived)
    assert 0 < durable < N_ITEMS + N_USERS

    rerun = cli(*args)  # the same command, in this process
    assert rerun.exit_code == 0, rerun.output
    assert f"blocks computed {N_ITEMS + N_USERS - durable}, reused {durable}" in " ".join(rerun.stdout.split())
    assert_same_cache(out, clean.out)


# ---------------------------------------------------------------------------------------------
# a cache belongs to one model, dtype and template


def test_a_cache_is_refused_by_another_model_dtype_or_template(clean, data, model, tiny_models, tmp_path, monkeypatch):
    out = copy_cache(clean, tmp_path)
    before = snapshot(out)
    others = {
        "was built for model": open_ranker(str(tiny_models["qwen2"])),
        "you are running it in bfloat16": open_ranker(str(model), dtype="bf16"),
        "another prompt template (fields that differ: system)": open_ranker(
            str(model), template=PromptTemplate(system="You rank things.\n\n")
        ),
    }
    forbid_compute(monkeypatch)
    for message, other in others.items():
        with pytest.raises(IncompatibleCacheError) as caught:
            build_cache(data.catalog, options(out, data, model), ranker=other)
        assert message in str(caught.value) and "rebuild" in str(caught.value)
        with pytest.raises(IncompatibleCacheError):
            append_items(data.catalog, options(out, data, model), ranker=other)
    assert snapshot(out) == before

    result = cli("build-cache", data.catalog, "--out", out, "--model", tiny_models["qwen2"],
                 "--users", data.users, "--interactions", data.interactions)
    assert result.exit_code == 2
    assert "was built for model" in " ".join(result.output.split())
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# exactness: a stored block is the prefix cache's KV


def plain_prefill_kv(lm, prompts: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) [layers, kv_heads, n, head_dim] of each prompt by the model's own forward, batched
    and right-padded (under causal attention padding after a prompt cannot change it)."""
    width = max(p.numel() for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : prompt.numel()] = prompt
    with torch.inference_mode():
        out = lm.model.model(input_ids=ids, use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    keys = torch.stack([layer.keys for layer in cache.layers], dim=1)
    values = torch.stack([layer.values for layer in cache.layers], dim=1)
    return [(keys[r, :, :, : p.numel()], values[r, :, :, : p.numel()]) for r, p in enumerate(prompts)]


def test_every_stored_block_is_the_plain_prefill_kv_after_the_system_prompt(clean, ranker):
    system = ranker.builder.system_ids()
    checked = 0
    for root in store_dirs(clean.out):
        blocks = read_store(root)
        prompts = [torch.cat([system, b.token_ids]) for b in blocks.values()]
        for (key, block), (k, v) in zip(blocks.items(), plain_prefill_kv(ranker.engine.lm, prompts)):
            assert key == key_for(ranker, block.token_ids)  # content addressed
            assert block.base_pos == system.numel() and block.fingerprint == ranker.engine.fingerprint
            assert block.context == context_hash(system)
            assert (block.keys - k[:, :, system.numel() :]).abs().max() <= 1e-5
            assert (block.values - v[:, :, system.numel() :]).abs().max() <= 1e-5
            checked += 1
    assert checked == N_ITEMS + N_USERS


def test_stored_blocks_placed_at_their_base_position_give_the_prefill_logits_and_kv(clean, ranker):
    """The engine over [system block][stored block][fresh tail], nothing corrected, against a
    plain prefill of the same ids: one block of each store (full prefills are slow on 2 cores)."""
    engine = ranker.engine
    context = context_block(ranker)
    assert context.base_pos == 0 and context.context == context_hash([])
    tail = torch.cat([ranker.builder.label_ids(0), ranker.builder.instruction_ids()])
    for root in store_dirs(clean.out):
        with BlockStore.open_readonly(root) as store:
            block = store.get(min(store.keys()), verify=True)
        segments = [Segment.cached(context), Segment.cached(block), Segment.fresh(tail)]
        reused = engine.forward(segments, "none", return_kv=True)
        prefill = engine.forward(uncached(segments), "full", return_kv=True)
        assert reused.recomputed_tokens == len(tail) < reused.n_tokens  # only the tail was computed
        assert (reused.logits - prefill.logits).abs().max() <= 1e-4
        assert (reused.keys - prefill.keys).abs().max() <= 1e-5
        assert (reused.values - prefill.values).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# bytes per token


def test_bytes_per_token_is_the_kv_size_plus_small_overhead(clean, ranker):
    report = clean.report
    e = ranker.engine
    assert report.expected_bytes_per_token == e.n_layers * 2 * e.n_kv_heads * e.head_dim * 4 == TINY_KV_BYTES_PER_TOKEN
    manifest = Manifest.load(clean.out)
    m = manifest.model
    assert (m["n_layers"], m["kv_heads"], m["head_dim"], m["dtype"]) == (2, 2, 16, "float32")
    assert manifest.build["expected_bytes_per_token"] == report.expected_bytes_per_token
    total_bytes = total_tokens = 0
    for root in store_dirs(clean.out):
        with BlockStore.open_readonly(root) as store:
            stats = store.stats()
        assert stats["kv_bytes"] == stats["tokens"] * TINY_KV_BYTES_PER_TOKEN  # the payload is KV, exactly
        total_bytes += stats["bytes"]
        total_tokens += stats["tokens"]
    assert report.bytes_per_token == pytest.approx(total_bytes / total_tokens)
    # On disk: the KV, plus an int64 id per token (1.6% of this tiny model's 512 bytes), shard
    # headers and the LMDB index. (A real model's KV is ~45x larger per token: <1% there.)
    assert report.expected_bytes_per_token < report.bytes_per_token < 1.08 * report.expected_bytes_per_token


# ---------------------------------------------------------------------------------------------
# --append


def _nearest_nodes(placement, items) -> tuple[np.ndarray, np.ndarray]:
    embeddings = get_embedder("minilm").embed([item_text(i) for i in items])
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    clusters = np.argmax(embeddings @ placement.centroids.T, axis=1)
    return clusters, placement.cluster_node[clusters]


def test_append_places_new_items_by_nearest_centroid_and_computes_only_their_blocks(
    clean, data, model, ranker, tmp_path, monkeypatch
):
    out = copy_cache(clean, tmp_path)
    before = load_placement(placement_dir(out))
    old_blocks = {root.name: read_store(root) for root in store_dirs(out)}
    clusters, nodes = _nearest_nodes(before, NEW_ITEMS)
    catalog = write_jsonl(tmp_path / "grown.jsonl", load_catalog(data.catalog) + NEW_ITEMS)
    computed = count_computed_blocks(monkeypatch)

    args = ("build-cache", catalog, "--out", out, "--model", model, "--append")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert sum(computed) == len(NEW_ITEMS)  # only the new items' blocks

    after = load_placement(placement_dir(out))
    assert after.n_nodes == before.n_nodes
    assert np.array_equal(after.centroids, before.centroids) and np.array_equal(after.cluster_node, before.cluster_node)
    assert np.array_equal(after.item_cluster[:N_ITEMS], before.item_cluster)
    assert np.array_equal(after.item_cluster[N_ITEMS:], clusters)  # nearest centroid
    ids = json.loads((placement_dir(out) / "items.json").read_text())
    keys = json.loads((placement_dir(out) / "keys.json").read_text())
    new_keys = [key_for(ranker, item_block_ids(ranker, i)) for i in NEW_ITEMS]
    assert ids[N_ITEMS:] == [i["id"] for i in NEW_ITEMS] and keys[N_ITEMS:] == new_keys
    assert len(ids) == len(keys) == len(after.item_cluster) == len(np.load(placement_dir(out) / "embeddings.npy"))

    context = context_block(ranker)
    for root in store_dirs(out):
        blocks = read_store(root)
        assert_same_blocks({k: blocks[k] for k in old_blocks[root.name]}, old_blocks[root.name])  # untouched
        added = set(blocks) - set(old_blocks[root.name])
        want = {new_keys[r] for r in range(len(NEW_ITEMS)) if root.name == f"node-{nodes[r]}"}
        assert added == want
        for key in added:  # the new block is the one a build computes
            block = blocks[key]
            fresh = ranker.engine.compute_block(block.token_ids, context)
            assert (block.keys - fresh.keys).abs().max() <= 1e-5 and block.base_pos == fresh.base_pos

    manifest = Manifest.load(out)
    assert manifest.items["count"] == N_ITEMS + len(NEW_ITEMS)
    assert sum(manifest.placement["items_per_node"]) == N_ITEMS + len(NEW_ITEMS)
    assert load_catalog(out / "catalog.jsonl") == load_catalog(catalog)
    assert manifest.items["catalog_sha256"] == hashlib.sha256((out / "catalog.jsonl").read_bytes()).hexdigest()
    assert [s["blocks"] for s in cache_info(out)["stores"][:NODES]] == [
        len(read_store(node_dir(out, k))) for k in range(NODES)
    ]
    assert all(s.built for s in store_states(out, manifest))  # the nodes that grew recorded it

    # the same append again is a no-op
    state = snapshot(out)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert sum(computed) == len(NEW_ITEMS)
    changed = {name for name in set(state) | set(snapshot(out)) if state.get(name) != snapshot(out).get(name)}
    assert changed <= {"manifest.json"}, changed  # (its "updated" time)
    assert Manifest.load(out).items == manifest.items and Manifest.load(out).placement == manifest.placement

    # an id already in the cache with other content is refused, and nothing changes
    state = snapshot(out)
    edited = [dict(NEW_ITEMS[0], title="The Orbital Nebula Express II")]
    result = cli("build-cache", write_jsonl(tmp_path / "edited.jsonl", edited), "--out", out, "--model", model, "--append")
    assert result.exit_code == 2
    assert "other content" in result.output and "new-space" in result.output
    assert snapshot(out) == state
    assert sum(computed) == len(NEW_ITEMS)


def test_append_interrupted_between_its_index_writes_then_rerun_stays_consistent(
    clean, data, model, ranker, tmp_path
):
    """The placement, items.json, keys.json and embeddings.npy must describe the same rows after
    an append was interrupted while writing them and then rerun."""
    out = copy_cache(clean, tmp_path)
    catalog = write_jsonl(tmp_path / "new.jsonl", NEW_ITEMS)
    original = pipeline.write_file

    def crash_before_item_ids(path, payload):
        if Path(path).name == "items.json":
            raise RuntimeError("simulated crash")
        return original(path, payload)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "write_file", crash_before_item_ids)
        with pytest.raises(RuntimeError, match="simulated crash"):
            append_items(catalog, options(out, data, model), ranker=ranker)
    append_items(catalog, options(out, data, model), ranker=ranker)

    ids = json.loads((placement_dir(out) / "items.json").read_text())
    keys = json.loads((placement_dir(out) / "keys.json").read_text())
    rows = len(load_placement(placement_dir(out)).item_cluster)
    embeddings = len(np.load(placement_dir(out) / "embeddings.npy"))
    assert len(ids) == len(set(ids)) == N_ITEMS + len(NEW_ITEMS)
    assert (len(keys), rows, embeddings) == (len(ids), len(ids), len(ids))
    assert Manifest.load(out).items["count"] == len(ids)


# ---------------------------------------------------------------------------------------------
# rcllm cache add-node


def test_add_node_moves_whole_clusters_bit_for_bit_and_computes_nothing(clean, data, model, ranker, tmp_path, monkeypatch):
    out = copy_cache(clean, tmp_path)
    before = load_placement(placement_dir(out))
    keys = json.loads((placement_dir(out) / "keys.json").read_text())
    old = {k: read_store(node_dir(out, k)) for k in range(NODES)}
    forbid_compute(monkeypatch)
    monkeypatch.setattr(pipeline, "open_ranker", lambda *a, **k: pytest.fail("add-node loaded a model"))

    result = cli("cache", "add-node", out)
    assert result.exit_code == 0, result.output
    assert f"node {NODES} added" in " ".join(result.output.split())

    grown = load_placement(placement_dir(out))
    assert grown.n_nodes == NODES + 1
    assert np.array_equal(grown.item_cluster, before.item_cluster)
    moved = np.flatnonzero(grown.item_node != before.item_node)
    assert len(moved) > 0 and set(grown.item_node[moved].tolist()) == {NODES}  # only onto the new node
    moved_clusters = set(grown.item_cluster[moved].tolist())
    assert set(np.flatnonzero(np.isin(grown.item_cluster, list(moved_clusters))).tolist()) == set(moved.tolist())

    stores = {k: read_store(node_dir(out, k)) for k in range(NODES + 1)}
    for row, key in enumerate(keys):  # every block on the node the placement says, and only there
        assert [k for k in stores if key in stores[k]] == [int(grown.item_node[row])]
        was = int(before.item_node[row])
        assert_same_block(stores[int(grown.item_node[row])][key], old[was][key])  # moved as is
    for k in range(NODES + 1):
        assert_no_orphans(node_dir(out, k))

    manifest = Manifest.load(out)
    assert [n["node"] for n in manifest.nodes] == list(range(NODES + 1))
    assert len({n["port"] for n in manifest.nodes}) == NODES + 1
    assert manifest.placement["n_nodes"] == NODES + 1
    assert manifest.placement["items_per_node"] == np.bincount(grown.item_node, minlength=NODES + 1).tolist()
    info = cli("cache", "info", out, "--json")
    assert [s["name"] for s in json.loads(info.stdout)["stores"]] == ["node-0", "node-1", "node-2", "users (replicated)"]
    assert {s["state"] for s in json.loads(info.stdout)["stores"]} == {"built"}

    # the grown cache is what a build on NODES + 1 nodes expects: rerunning it computes nothing
    monkeypatch.undo()
    with pytest.raises(ValueError, match="cache add-node"):
        build_cache(data.catalog, options(out, data, model), ranker=ranker)
    report = build_cache(data.catalog, options(out, data, model, nodes=NODES + 1), ranker=ranker)
    assert (report.computed_blocks, report.reused_blocks) == (0, N_ITEMS + N_USERS)
    assert {k: read_store(node_dir(out, k)).keys() for k in range(NODES + 1)} == {k: stores[k].keys() for k in stores}


def test_add_node_interrupted_before_its_manifest_then_rerun_leaves_a_consistent_cache(clean, tmp_path, monkeypatch):
    """add-node saves the grown placement, then the manifest, then drops the moved blocks' old
    copies: interrupted in between and rerun, the manifest, placement and stores must agree."""
    out = copy_cache(clean, tmp_path)
    keys = json.loads((placement_dir(out) / "keys.json").read_text())

    def crash(self, cache_dir):
        raise RuntimeError("simulated crash")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Manifest, "save", crash)  # after the grown placement is saved, before the manifest
        with pytest.raises(RuntimeError, match="simulated crash"):
            add_node(out)
    add_node(out)

    grown = load_placement(placement_dir(out))
    manifest = Manifest.load(out)
    assert [n["node"] for n in manifest.nodes] == list(range(grown.n_nodes))
    stores = {k: read_store(node_dir(out, k)) for k in range(grown.n_nodes)}
    for row, key in enumerate(keys):
        assert [k for k in stores if key in stores[k]] == [int(grown.item_node[row])]


def test_add_node_moves_about_one_share_of_the_bytes_and_keeps_the_balance(model, ranker, tmp_path):
    # A catalog with enough clusters (20 for 160 items) that whole clusters can balance 3 nodes
    # (the 60-item one has 8 clusters of ~36% of a node each). The LLM embedder keeps it fast.
    written = prepare(make_synthetic(n_items=160, n_users=15, seed=0), tmp_path)
    out = tmp_path / "cache"
    build_cache(written["catalog.jsonl"], BuildOptions(out=out, nodes=2, model=str(model), embedder="llm",
                interactions=written["interactions.jsonl"]), ranker=ranker)
    before = load_placement(placement_dir(out))
    moved = add_node(out)
    grown = load_placement(placement_dir(out))
    assert (moved["node"], moved["nodes"]) == (2, 3)
    assert Manifest.load(out).placement["embedder"] == "llm"
    assert moved["imbalance"] == pytest.approx(grown.imbalance())
    assert grown.imbalance() <= 0.10 + 0.02  # the balance bound, and a little slack
    token_share = grown.node_tokens()[2] / grown.item_tokens.sum()
    assert abs(token_share - 1 / 3) <= 0.05
    assert abs(moved["fraction"] - 1 / 3) <= 0.05  # bytes moved vs all item bytes
    assert moved["bytes_moved"] < moved["bytes_total"]
    assert moved["items"] == int((grown.item_node != before.item_node).sum())


# ---------------------------------------------------------------------------------------------
# the CLI's defaults and rcllm cache info


def test_build_cache_with_only_a_catalog_writes_rcllm_cache_on_two_nodes(data, ranker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(data.catalog, tmp_path / "catalog.jsonl")
    asked = []

    def tiny_instead(model, device="cpu", dtype="fp32", **kwargs):
        asked.append((model, device, dtype))
        return ranker  # the default model, smollm2-135m, is too slow for this test

    monkeypatch.setattr(pipeline, "open_ranker", tiny_instead)
    result = cli("build-cache", "catalog.jsonl")
    assert result.exit_code == 0, result.output
    assert asked == [("smollm2-135m", "cpu", "fp32")]
    assert f"blocks computed {N_ITEMS}, reused 0" in " ".join(result.stdout.split())

    cache = tmp_path / "rcllm-cache"
    manifest = Manifest.load(cache)
    assert [(n["node"], n["port"]) for n in manifest.nodes] == [(0, 8100), (1, 8101)]
    assert sorted(p.name for p in cache.glob("node-*")) == ["node-0", "node-1"]
    assert manifest.items["count"] == N_ITEMS and manifest.users["count"] == 0

    info = cli("cache", "info")  # default: ./rcllm-cache
    assert info.exit_code == 0, info.output
    text = " ".join(info.stdout.split())
    assert "rcllm-cache" in text and f"{N_ITEMS} items, 0 users" in text
    assert manifest.model["fingerprint"][:12] in text
    assert "node-0" in text and "node-1" in text and "127.0.0.1:8100" in text

    as_json = cli("cache", "info", "--json")
    assert as_json.exit_code == 0, as_json.output
    described = json.loads(as_json.stdout)
    assert described["manifest"] == manifest.to_dict()
    stores = {s["name"]: s for s in described["stores"]}
    assert list(stores) == ["node-0", "node-1", "users (replicated)"]
    for k in range(2):
        with BlockStore.open_readonly(node_dir(cache, k)) as store:
            row = stores[f"node-{k}"]
            assert row.items() >= {"name": f"node-{k}", "address": f"127.0.0.1:{8100 + k}", **store.stats()}.items()
            assert (row["state"], row["reason"], row["record"]["blocks"]) == ("built", "", store.stats()["blocks"])
    assert sum(stores[f"node-{k}"]["blocks"] for k in range(2)) == N_ITEMS
    assert stores["users (replicated)"]["blocks"] == 0


def test_cache_info_without_a_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("cache", "info")
    assert result.exit_code == 2
    assert "no rcllm cache at rcllm-cache" in " ".join(result.output.split())
