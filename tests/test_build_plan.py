"""Plan once, build each store anywhere (#20): ``rcllm build-cache --plan``, ``--node K`` and
``--user-blocks`` on the tiny random-weight model and the small synthetic dataset of test_build.

The proof that matters: a 2-node cache planned once, its folder copied twice, node 0 built by one
process in copy A, node 1 and the history blocks by others in copy B, the store folders then put
side by side, is the one-process ``build_cache`` of the same catalog block for block, bit for
bit. Around it: what a plan writes (no KV), a killed node build (half-built, refused by serve,
resumed by a rerun), and bad input (another catalog, a node out of range, an unplanned folder,
another model or template, options that belong to the plan) refused with nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_build import (
    N_ITEMS,
    N_USERS,
    NODES,
    RecordingReporter,
    assert_no_orphans,
    assert_same_blocks,
    cli,
    count_computed_blocks,
    crash_compute_after,
    flat,
    read_store,
    snapshot,
    write_jsonl,
)

from rcllm.build.nodes import build_node, build_users
from rcllm.build.options import BuildOptions
from rcllm.build.pipeline import build_cache
from rcllm.build.plan import plan_cache
from rcllm.data.loaders import prepare
from rcllm.data.synthetic import make_synthetic
from rcllm.engine.api import open_ranker
from rcllm.engine.forward import BlockEngine
from rcllm.engine.prompt import PromptTemplate
from rcllm.serve import http
from rcllm.serve.runner import NodeRunner
from rcllm.store import IncompatibleCacheError, Manifest, StoreNotBuiltError, cache_info, placement_dir, store_states
from rcllm.store.placement import load_placement

REPO = Path(__file__).resolve().parents[1]
STORES = [f"node-{k}" for k in range(NODES)] + ["users"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    written = prepare(make_synthetic(n_items=N_ITEMS, n_users=N_USERS, seed=0), folder)
    return SimpleNamespace(catalog=written["catalog.jsonl"], users=written["histories.jsonl"],
                           interactions=written["interactions.jsonl"])


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def ranker(model):
    return open_ranker(str(model))


def options(out: Path, data, model, **overrides) -> BuildOptions:
    # the tiny model embeds for placement: no sentence encoder to load, and deterministic
    settings = dict(out=Path(out), nodes=NODES, model=str(model), users=data.users, interactions=data.interactions,
                    embedder="llm")
    return BuildOptions(**{**settings, **overrides})


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data, model, ranker):
    """The reference: the one-command build of the catalog, in this process."""
    out = tmp_path_factory.mktemp("one-process") / "cache"
    build_cache(data.catalog, options(out, data, model), ranker=ranker)
    return out


@pytest.fixture(scope="module")
def planned(tmp_path_factory, data, model, ranker):
    """A planned folder (nothing built): never change it, copy it."""
    out = tmp_path_factory.mktemp("planned") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BlockEngine, "compute_blocks", lambda *a, **k: pytest.fail("--plan computed KV"))
        report = plan_cache(data.catalog, options(out, data, model), ranker=ranker)
    return SimpleNamespace(out=out, report=report)


def copy_of(planned, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(planned.out, out)
    return out


def rcllm_process(*args) -> subprocess.CompletedProcess:
    """``rcllm ARGS`` in a process of its own (the CLI a scheduler's array task would run)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    code = "import sys; from rcllm.cli.main import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_built_like(got: Path, want: Path) -> None:
    """Every store of ``got`` holds ``want``'s blocks bit for bit (fp32) and is recorded built."""
    manifest = Manifest.load(got)
    assert [s.name for s in store_states(got, manifest) if s.built] == STORES
    for name in STORES:
        mine, theirs = read_store(got / name), read_store(want / name)
        assert len(mine) > 0 and {b.keys.dtype for b in mine.values()} == {torch.float32}
        assert_same_blocks(mine, theirs)
        assert_no_orphans(got / name)
        ours, reference = (json.loads((root / name / "built.json").read_text()) for root in (got, want))
        assert ours["checksums_sha256"] == reference["checksums_sha256"]
        assert (ours["blocks"], ours["tokens"], ours["keys_sha256"]) == (reference["blocks"], reference["tokens"],
                                                                        reference["keys_sha256"])


# ---------------------------------------------------------------------------------------------
# the split build equals the one-process build


def test_nodes_built_in_separate_processes_into_copies_of_one_plan_equal_the_one_process_build(
    planned, one_process, data, tmp_path
):
    a, b = copy_of(planned, tmp_path, "copy-a"), copy_of(planned, tmp_path, "copy-b")
    # node 0 in copy A, from the plan alone (no catalog, no model named: both are the plan's)
    done = rcllm_process("build-cache", "--node", 0, "--out", a)
    assert done.returncode == 0, done.stderr[-3000:]
    assert flat("node-0 built: 28 blocks (computed 28") in flat(done.stdout) and flat("still to build node-1, users") in flat(done.stdout)
    # node 1 and the history blocks in copy B, the catalog given (it must be the planned one)
    for step in (["--node", 1, data.catalog], ["--user-blocks"]):
        done = rcllm_process("build-cache", *step, "--out", b)
        assert done.returncode == 0, done.stderr[-3000:]
    assert [s.name for s in store_states(b, Manifest.load(b)) if s.built] == ["node-1", "users"]

    # side by side: copy B's stores into copy A, as a shared folder would have had them
    for name in ("node-1", "users"):
        shutil.rmtree(a / name, ignore_errors=True)  # users/ holds the plan's histories copy
        shutil.copytree(b / name, a / name)
    assert_built_like(a, one_process)
    for name in ("items.json", "keys.json", "embeddings.npy"):
        assert (placement_dir(a) / name).read_bytes() == (placement_dir(one_process) / name).read_bytes()
    assert (a / "catalog.jsonl").read_bytes() == (one_process / "catalog.jsonl").read_bytes()
    got, want = Manifest.load(a), Manifest.load(one_process)
    for name in ("model", "template", "block_context", "nodes", "placement", "items", "users", "stores"):
        assert getattr(got, name) == getattr(want, name), name
    info = cli("cache", "info", a, "--json")
    assert [s["state"] for s in json.loads(info.stdout)["stores"]] == ["built"] * len(STORES)


def test_the_one_command_build_is_the_plan_then_every_store(one_process, planned):
    # same plan, and the stores its records say it built are the plan's
    assert Manifest.load(one_process).stores == Manifest.load(planned.out).stores
    records = {name: json.loads((one_process / name / "built.json").read_text()) for name in STORES}
    assert {r["store"] for r in records.values()} == {"node-0", "node-1", "users"}
    assert sum(records[f"node-{k}"]["blocks"] for k in range(NODES)) == N_ITEMS
    assert records["users"]["blocks"] == N_USERS


# ---------------------------------------------------------------------------------------------
# what a plan is


def test_plan_places_and_describes_every_store_but_computes_nothing(planned, data):
    out = planned.out
    assert not any((out / name / "index.lmdb").exists() for name in STORES)  # no store opened, no KV
    manifest = Manifest.load(out)
    placement = load_placement(placement_dir(out))
    assert sorted(manifest.stores) == sorted(STORES)
    assert [manifest.stores[f"node-{k}"]["blocks"] for k in range(NODES)] == [
        int((placement.item_node == k).sum()) for k in range(NODES)
    ] == [n["blocks"] for n in planned.report.nodes]
    assert manifest.stores["users"]["blocks"] == N_USERS
    assert manifest.items["source_sha256"] == hashlib.sha256(data.catalog.read_bytes()).hexdigest()
    assert (out / "users" / "histories.jsonl").read_bytes() == data.users.read_bytes()
    states = store_states(out, manifest)
    assert [(s.name, s.built, s.reason) for s in states] == [(name, False, "no blocks built yet") for name in STORES]

    result = cli("cache", "info", out)
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    for k in range(NODES):
        assert flat(f"node-{k} not built (no blocks built yet): run `rcllm build-cache --node {k} --out {out}`") in text
    assert flat(f"run `rcllm build-cache --user-blocks --out {out}`") in text


def test_cli_plan_prints_the_plan_and_the_next_steps(data, model, tmp_path, monkeypatch):
    monkeypatch.setattr(BlockEngine, "compute_blocks", lambda *a, **k: pytest.fail("--plan computed KV"))
    out = tmp_path / "cache"
    result = cli("build-cache", data.catalog, "--plan", "--out", out, "--model", model, "--embedder", "llm",
                 "--users", data.users)
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert flat(f"plan {out}: {N_ITEMS} items, {N_USERS} user histories (nothing computed yet)") in text
    assert flat(f"`rcllm build-cache --node K --out {out}` for K = 0..{NODES - 1}") in text
    assert not any(s.built for s in store_states(out, Manifest.load(out)))


# ---------------------------------------------------------------------------------------------
# a node build stopped midway: half-built, refused by serve, resumed


def test_a_node_build_stopped_midway_is_half_built_refused_by_serve_and_resumed(
    planned, one_process, ranker, tmp_path, monkeypatch
):
    out = copy_of(planned, tmp_path, "cache")
    wanted = Manifest.load(out).stores["node-0"]["blocks"]
    store_options = BuildOptions(out=out, model=str(Manifest.load(out).model["name"]), max_shard_mb=0)  # a shard per block
    with pytest.MonkeyPatch.context() as mp:
        crash_compute_after(mp, 1)  # one batch of 16 blocks durable, then the process "dies"
        with pytest.raises(RuntimeError, match="simulated crash"):
            build_node(out, 0, store_options, ranker=ranker)
    (state,) = [s for s in store_states(out, Manifest.load(out)) if s.name == "node-0"]
    assert not state.built and state.reason.startswith(f"half-built: 16 of its {wanted} blocks stored")
    with pytest.raises(StoreNotBuiltError, match=r"node-0 of the cache at .* is not built \(half-built: 16 of"):
        NodeRunner.open(out, 0, hot_bytes=1 << 20)
    monkeypatch.setattr(http, "setup_logging", lambda *a, **k: None)  # keep this process's log handlers
    result = cli("serve", "--node", 0, "--cache", out)
    assert result.exit_code == 2 and flat(f"run `rcllm build-cache --node 0 --out {out}`") in flat(result.output)

    with pytest.MonkeyPatch.context() as mp:
        computed = count_computed_blocks(mp)
        build = build_node(out, 0, store_options, ranker=ranker)
    assert (build.computed, build.reused, sum(computed)) == (wanted - 16, 16, wanted - 16)
    assert_same_blocks(read_store(out / "node-0"), read_store(one_process / "node-0"))
    # a rerun of a built node computes nothing and changes no block
    with pytest.MonkeyPatch.context() as mp:
        computed = count_computed_blocks(mp)
        again = build_node(out, 0, store_options, ranker=ranker)
    assert (again.computed, again.reused, sum(computed)) == (0, wanted, 0)
    assert again.record["checksums_sha256"] == build.record["checksums_sha256"]
    assert [s.name for s in store_states(out, Manifest.load(out)) if s.built] == ["node-0"]
    with pytest.raises(StoreNotBuiltError, match=r"users of the cache .* is not built"):
        NodeRunner.open(out, 0, hot_bytes=1 << 20)  # node 0 is built, but its history blocks are not


# ---------------------------------------------------------------------------------------------
# bad input: a clear error, nothing written


def test_building_from_another_catalog_or_a_changed_copy_is_refused(planned, data, ranker, tmp_path):
    out = copy_of(planned, tmp_path, "cache")
    before = snapshot(out)
    rows = [json.loads(line) for line in data.catalog.read_text().splitlines()]
    other = write_jsonl(tmp_path / "other.jsonl", [dict(rows[0], title="Another Title"), *rows[1:]])
    with pytest.raises(ValueError, match=f"{other} is not the catalog the cache at {out} was planned from"):
        build_node(out, 0, ranker=ranker, catalog=other)
    result = cli("build-cache", other, "--node", 1, "--out", out)
    assert result.exit_code == 2 and flat("is not the catalog the cache at") in flat(result.output)
    assert snapshot(out) == before

    edited = out / "catalog.jsonl"
    edited.write_text(edited.read_text().replace(rows[0]["title"], "Edited"))
    with pytest.raises(ValueError, match="was changed after the cache was planned"):
        build_users(out, ranker=ranker)
    assert not (out / "node-0").exists()


def test_a_node_out_of_range_or_an_unplanned_folder_is_refused(planned, ranker, tmp_path):
    out = copy_of(planned, tmp_path, "cache")
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"--node 2: the cache at .* is planned on nodes 0\.\.1"):
        build_node(out, 2, ranker=ranker)
    result = cli("build-cache", "--node", 5, "--out", out)
    assert result.exit_code == 2 and flat("--node 5: the cache at") in flat(result.output)
    assert snapshot(out) == before and not (out / "node-2").exists()

    empty = tmp_path / "empty"
    for step in (["--node", 0], ["--user-blocks"]):
        result = cli("build-cache", *step, "--out", empty)
        assert result.exit_code == 2
        assert flat(f"{empty} is not a planned cache (no manifest.json): plan it first with") in flat(result.output)
    assert not empty.exists()

    # a cache from before plans (no stores in its manifest) says how to bring it up to date
    legacy = copy_of(planned, tmp_path, "legacy")
    manifest = Manifest.load(legacy)
    manifest.stores = {}
    manifest.save(legacy)
    with pytest.raises(ValueError, match="was built by an older rcllm"):
        build_node(legacy, 0, ranker=ranker)
    assert "manifest plans no stores" in store_states(legacy, manifest)[0].reason


def test_another_model_or_template_than_the_plans_is_refused(planned, model, tiny_models, tmp_path):
    out = copy_of(planned, tmp_path, "cache")
    before = snapshot(out)
    others = {
        "was built for model": open_ranker(str(tiny_models["qwen2"])),
        "you are running it in bfloat16": open_ranker(str(model), dtype="bf16"),
        "another prompt template": open_ranker(str(model), template=PromptTemplate(system="You rank things.\n\n")),
    }
    for message, other in others.items():
        for build in (lambda: build_node(out, 0, ranker=other), lambda: build_users(out, ranker=other)):
            with pytest.raises(IncompatibleCacheError, match=message):
                build()
    result = cli("build-cache", "--node", 0, "--out", out, "--model", tiny_models["qwen2"])
    assert result.exit_code == 2 and flat("was built for model") in flat(result.output)
    assert snapshot(out) == before


def test_a_history_length_other_than_the_plans_is_refused_before_any_block(planned, ranker, tmp_path, monkeypatch):
    """The plan fixed each store's keys; a builder that would compute other blocks stops first."""
    out = copy_of(planned, tmp_path, "cache")
    manifest = Manifest.load(out)
    manifest.users = {**manifest.users, "history": 3}  # as if the plan had said 3 items per history block
    manifest.save(out)
    before = snapshot(out)
    monkeypatch.setattr(BlockEngine, "compute_blocks", lambda *a, **k: pytest.fail("computed a block"))
    with pytest.raises(IncompatibleCacheError, match="are not the 15 the plan at .* puts there"):
        build_users(out, ranker=ranker)
    assert snapshot(out) == before


def test_options_that_belong_to_the_plan_are_refused_when_building_a_store(planned, data, tmp_path):
    out = copy_of(planned, tmp_path, "cache")
    result = cli("build-cache", "--node", 0, "--out", out, "--users", data.users, "--nodes", 3)
    assert result.exit_code == 2
    assert flat("--nodes, --users: set when the cache was planned; --node builds the plan as it is") in flat(result.output)
    result = cli("build-cache", data.catalog, "--plan", "--node", 0, "--out", out)
    assert result.exit_code == 2 and flat("--plan and --node are separate steps") in flat(result.output)
    result = cli("build-cache", "--out", out)
    assert result.exit_code == 2 and flat("missing the catalog") in flat(result.output)


def test_replanning_a_built_cache_keeps_its_stores_built_and_a_new_catalog_makes_them_out_of_date(
    one_process, data, model, ranker, tmp_path
):
    out = tmp_path / "cache"
    shutil.copytree(one_process, out)
    reporter = RecordingReporter()
    plan_cache(data.catalog, options(out, data, model), reporter, ranker=ranker)
    assert any("reusing the placement" in m for m in reporter.logs)
    assert all(s.built for s in store_states(out, Manifest.load(out)))

    rows = [json.loads(line) for line in data.catalog.read_text().splitlines()]
    smaller = write_jsonl(tmp_path / "smaller.jsonl", rows[:-5])
    users = [json.loads(line) for line in data.users.read_text().splitlines()]
    kept = {r["id"] for r in rows[:-5]}
    histories = write_jsonl(tmp_path / "h.jsonl", [dict(u, history=[i for i in u["history"] if i in kept]) for u in users])
    plan_cache(smaller, options(out, data, model, users=histories, interactions=None), ranker=ranker)
    states = store_states(out, Manifest.load(out))
    assert any(not s.built and s.reason.startswith("out of date") for s in states)
    for k in range(NODES):
        build_node(out, k, ranker=ranker)
    build_users(out, ranker=ranker)
    assert all(s.built for s in store_states(out, Manifest.load(out)))
    assert sum(len(read_store(out / f"node-{k}")) for k in range(NODES)) == N_ITEMS - 5
    assert cache_info(out)["stores"][0]["record"]["fingerprint"] == ranker.engine.fingerprint


def test_stores_keep_kv_in_the_plans_kv_dtype(data, model, ranker, tmp_path):
    out = tmp_path / "cache"
    plan_cache(data.catalog, options(out, data, model, users=None, kv_dtype="bf16"), ranker=ranker)
    build = build_node(out, 0, ranker=ranker)  # no KV dtype asked: the plan's
    assert cache_info(out)["stores"][0]["kv_dtype"] == "bf16" and build.record["blocks"] > 0
    with pytest.raises(IncompatibleCacheError, match="stores bf16 KV but this build asks for --kv-dtype int8"):
        build_node(out, 1, BuildOptions(out=out, model=str(model), kv_dtype="int8"), ranker=ranker)
    assert not (out / "node-1").exists()
    result = cli("build-cache", "--node", 1, "--out", out, "--kv-dtype", "int8")
    assert result.exit_code == 2 and flat("--kv-dtype: set when the cache was planned") in flat(result.output)
