"""History blocks split into parts (#20): ``rcllm build-cache --plan --user-parts N``, then
``--user-blocks --part K`` for each part, in N processes on N machines, like node stores.

The proof: a plan with 2 user parts, copied twice, part 0 built by one ``rcllm`` process in copy A
while part 1 is built by another in copy B, the part folders then put side by side, holds the
one-process build's history blocks bit for bit, and together the blocks of the one-store (N = 1)
build. Around it: serve refuses while a part is unbuilt (naming the command) and then answers a
part-1 user from its stored history block; a part out of range or --part without --user-blocks
is refused with nothing changed; ``cache info`` lists each part's state and command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_build import assert_no_orphans, assert_same_blocks, cli, count_computed_blocks, flat, read_store, snapshot

from rcllm.build.nodes import build_users
from rcllm.build.options import BuildOptions
from rcllm.build.pipeline import add_node, build_cache
from rcllm.build.plan import plan_cache
from rcllm.data.formats import load_histories
from rcllm.data.loaders import prepare
from rcllm.data.synthetic import make_synthetic
from rcllm.engine.api import open_ranker
from rcllm.engine.forward import BlockEngine
from rcllm.eval.blocks import open_built_cache
from rcllm.serve import http
from rcllm.serve.runner import NodeRunner
from rcllm.serve.schema import parse_request
from rcllm.store import Manifest, StoreNotBuiltError, store_states
from rcllm.store.built import user_part

REPO = Path(__file__).resolve().parents[1]
N_ITEMS, N_USERS, NODES, PARTS = 30, 15, 2, 2
PART_STORES = [f"users-{k}" for k in range(PARTS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    written = prepare(make_synthetic(n_items=N_ITEMS, n_users=N_USERS, seed=0), folder)
    return SimpleNamespace(catalog=written["catalog.jsonl"], users=written["histories.jsonl"])


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def ranker(model):
    return open_ranker(str(model))


def options(out: Path, data, model, **overrides) -> BuildOptions:
    # the tiny model embeds for placement: no sentence encoder to load, and deterministic
    settings = dict(out=Path(out), nodes=NODES, model=str(model), users=data.users, embedder="llm", user_parts=PARTS)
    return BuildOptions(**{**settings, **overrides})


@pytest.fixture(scope="module")
def planned(tmp_path_factory, data, model):
    """Planned by the CLI with 2 user parts, nothing built: never change it, copy it."""
    out = tmp_path_factory.mktemp("planned") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BlockEngine, "compute_blocks", lambda *a, **k: pytest.fail("--plan computed KV"))
        result = cli("build-cache", data.catalog, "--plan", "--out", out, "--model", model, "--embedder", "llm",
                     "--nodes", NODES, "--users", data.users, "--user-parts", PARTS)
    assert result.exit_code == 0, result.output
    return SimpleNamespace(out=out, output=result.output)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data, model, ranker):
    """The reference: the one-command build with 2 user parts, in this process."""
    out = tmp_path_factory.mktemp("one-process") / "cache"
    build_cache(data.catalog, options(out, data, model), ranker=ranker)
    return out


@pytest.fixture(scope="module")
def one_store(tmp_path_factory, one_process, data, model, ranker):
    """The same cache planned again with one user part (N = 1: the store users/), history blocks built."""
    out = tmp_path_factory.mktemp("one-store") / "cache"
    shutil.copytree(one_process, out)
    plan_cache(data.catalog, options(out, data, model, user_parts=1), ranker=ranker)
    build_users(out, ranker=ranker)
    return out


def copy_of(root: Path, tmp_path: Path, name: str) -> Path:
    shutil.copytree(root, tmp_path / name)
    return tmp_path / name


def rcllm_processes(*commands) -> list[subprocess.CompletedProcess]:
    """Each ``rcllm ARGS`` in a process of its own, all at once (the tasks of an array job)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    code = "import sys; from rcllm.cli.main import main; sys.exit(main())"
    running = [subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in commands]
    done = []
    for args, process in zip(commands, running):
        stdout, stderr = process.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    return done


# ---------------------------------------------------------------------------------------------
# what the plan says


def test_the_plan_splits_the_history_blocks_by_user_into_parts_and_prints_each_parts_command(planned, data):
    out = planned.out
    manifest = Manifest.load(out)
    users = load_histories(data.users)[0]
    parts = [sum(user_part(u, PARTS) == k for u in users) for k in range(PARTS)]
    assert manifest.users == {"count": N_USERS, "history": manifest.users["history"], "parts": PARTS}
    assert sorted(manifest.stores) == sorted([f"node-{k}" for k in range(NODES)] + PART_STORES)
    assert [manifest.stores[name]["blocks"] for name in PART_STORES] == parts and all(parts)
    assert [s.name for s in store_states(out, manifest)] == [f"node-{k}" for k in range(NODES)] + PART_STORES
    assert (out / "users" / "histories.jsonl").read_bytes() == data.users.read_bytes()  # one copy, all users
    assert not (out / "users" / "index.lmdb").exists() and not any((out / n).exists() for n in PART_STORES)
    text = flat(planned.output)
    assert flat(f"`rcllm build-cache --node K --out {out}` for K = 0..{NODES - 1}") in text
    assert flat(f"`rcllm build-cache --user-blocks --part P --out {out}` for P = 0..{PARTS - 1}") in text
    assert flat(f"users-1 ({parts[1]} users, {parts[1]} blocks") in text


# ---------------------------------------------------------------------------------------------
# (a) parts built in separate processes equal the one-process build, and together the one store


def test_parts_built_in_separate_processes_into_copies_equal_the_one_process_build_and_the_one_store(
    planned, one_process, one_store, tmp_path
):
    a, b = copy_of(planned.out, tmp_path, "copy-a"), copy_of(planned.out, tmp_path, "copy-b")
    first, second = rcllm_processes(["build-cache", "--user-blocks", "--part", 0, "--out", a],
                                    ["build-cache", "--user-blocks", "--part", 1, "--out", b])
    for done in (first, second):
        assert done.returncode == 0, done.stderr[-3000:]
    assert flat("users-0 built:") in flat(first.stdout) and flat("still to build node-0, node-1, users-1") in flat(first.stdout)
    assert not (a / "users-1").exists() and not (b / "users-0").exists()  # each wrote its own part only

    shutil.copytree(b / "users-1", a / "users-1")  # side by side, as a shared folder would have them
    manifest = Manifest.load(a)
    assert [s.name for s in store_states(a, manifest) if s.built] == PART_STORES
    together = {}
    for name in PART_STORES:
        mine, reference = read_store(a / name), read_store(one_process / name)
        assert len(mine) == manifest.stores[name]["blocks"] and {b.keys.dtype for b in mine.values()} == {torch.float32}
        assert_same_blocks(mine, reference)  # every history block's K, V and token ids, bit for bit
        assert_no_orphans(a / name)
        ours, theirs = (json.loads((root / name / "built.json").read_text()) for root in (a, one_process))
        assert (ours["checksums_sha256"], ours["keys_sha256"]) == (theirs["checksums_sha256"], theirs["keys_sha256"])
        together.update(mine)
    # the parts hold the one store's set of blocks; their KV agrees to float rounding only (measured
    # up to 6e-7), as the blocks were computed in other batches (other padding, other matmul shapes)
    single = read_store(one_store / "users")
    assert sorted(together) == sorted(single)
    for key, block in single.items():
        mine = together[key]
        assert torch.equal(mine.token_ids, block.token_ids) and (mine.base_pos, mine.context) == (block.base_pos, block.context)
        assert torch.allclose(mine.keys, block.keys, rtol=0, atol=1e-5)
        assert torch.allclose(mine.values, block.values, rtol=0, atol=1e-5)
    assert sum(Manifest.load(a).stores[n]["blocks"] for n in PART_STORES) == Manifest.load(one_store).stores["users"]["blocks"]


def test_the_one_store_plan_keeps_todays_layout(one_store):
    manifest = Manifest.load(one_store)
    assert "parts" not in manifest.users and "users" in manifest.stores
    assert not any(name.startswith("users-") for name in manifest.stores)
    assert [s.name for s in store_states(one_store, manifest)][-1] == "users"
    assert (one_store / "users" / "built.json").is_file() and (one_store / "users" / "histories.jsonl").is_file()


# ---------------------------------------------------------------------------------------------
# (b) serve needs every part; (d) cache info lists them


def test_serve_refuses_while_a_part_is_unbuilt_then_answers_a_part_1_user_from_its_history_block(
    one_process, ranker, tmp_path, monkeypatch
):
    out = copy_of(one_process, tmp_path, "cache")
    shutil.rmtree(out / "users-1")
    command = f"rcllm build-cache --user-blocks --part 1 --out {out}"
    with pytest.raises(StoreNotBuiltError, match=r"users-1 of the cache at .* is not built \(no blocks built yet\)") as e:
        NodeRunner.open(out, 0, hot_bytes=1 << 20)
    assert f"run `{command}`" in str(e.value)
    monkeypatch.setattr(http, "setup_logging", lambda *a, **k: None)  # keep this process's log handlers
    result = cli("serve", "--node", 0, "--cache", out)
    assert result.exit_code == 2 and flat(f"run `{command}`") in flat(result.output)
    with pytest.raises(ValueError, match="not built"):
        add_node(out)  # growing needs every store built, every part included

    with monkeypatch.context() as mp:
        computed = count_computed_blocks(mp)
        (build,) = build_users(out, ranker=ranker, part=1)
    planned = Manifest.load(out).stores["users-1"]["blocks"]
    assert (build.store, build.computed, build.reused, sum(computed)) == ("users-1", planned, 0, planned)
    assert all(s.built for s in store_states(out, Manifest.load(out)))

    runner = NodeRunner.open(out, 0, hot_bytes=1 << 20)
    try:
        user = sorted(u for u in runner.data.histories if user_part(u, PARTS) == 1)[0]
        response = runner.run(runner.prepare(parse_request({"user_id": user, "candidates": sorted(runner.data.catalog)[:5]})))
    finally:
        runner.close()
    assert response.cache.user_hit is True
    stores = open_built_cache(out, ranker)  # eval reads every part too
    try:
        assert [s.root.name for s in stores] == [f"node-{k}" for k in range(NODES)] + PART_STORES
    finally:
        for store in stores:
            store.close()


def test_cache_info_lists_each_parts_state_and_the_command_that_finishes_it(one_process, tmp_path):
    out = copy_of(one_process, tmp_path, "cache")
    (out / "users-1" / "built.json").unlink()  # as if its build had stopped before its record
    info = json.loads(cli("cache", "info", out, "--json").stdout)
    rows = {row["name"]: row for row in info["stores"]}
    assert [row["name"] for row in info["stores"]][-PARTS:] == ["users-0 (replicated)", "users-1 (replicated)"]
    assert rows["users-0 (replicated)"]["state"] == "built" and "command" not in rows["users-0 (replicated)"]
    unbuilt = rows["users-1 (replicated)"]
    assert unbuilt["state"] == "not built" and unbuilt["reason"].startswith("half-built")
    assert unbuilt["command"] == f"rcllm build-cache --user-blocks --part 1 --out {out}"
    text = flat(cli("cache", "info", out).output)
    assert flat(f"users-1 (replicated) not built (half-built:") in text
    assert flat(f"run `rcllm build-cache --user-blocks --part 1 --out {out}`") in text


# ---------------------------------------------------------------------------------------------
# (c) bad requests: a clear message, nothing changed


def test_a_part_out_of_range_or_without_user_blocks_is_refused_and_changes_nothing(planned, one_store, data, ranker, tmp_path):
    out = copy_of(planned.out, tmp_path, "cache")
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"--part 2: the cache at .* splits its history blocks into parts 0\.\.1"):
        build_users(out, ranker=ranker, part=2)
    result = cli("build-cache", "--user-blocks", "--part", 5, "--out", out)
    assert result.exit_code == 2 and flat(f"--part 5: the cache at {out} splits its history blocks into parts 0..1") in flat(result.output)
    for step in ([], ["--node", 0]):
        result = cli("build-cache", *step, "--part", 1, "--out", out)
        assert result.exit_code == 2
        assert flat(f"--part 1 picks a part of the history blocks: use it with --user-blocks "
                    f"(`rcllm build-cache --user-blocks --part 1 --out {out}`)") in flat(result.output)
    result = cli("build-cache", "--user-blocks", "--user-parts", 3, "--out", out)
    assert result.exit_code == 2 and flat("--user-parts: set when the cache was planned") in flat(result.output)
    assert snapshot(out) == before

    single = copy_of(one_store, tmp_path, "single")
    before = snapshot(single)
    result = cli("build-cache", "--user-blocks", "--part", 1, "--out", single)
    assert result.exit_code == 2 and flat("splits its history blocks into parts 0..0 (one part:") in flat(result.output)
    assert snapshot(single) == before

    empty = tmp_path / "no-users"
    result = cli("build-cache", data.catalog, "--plan", "--user-parts", 2, "--out", empty)
    assert result.exit_code == 2 and flat("--user-parts 2 splits the history blocks of --users") in flat(result.output)
    assert not empty.exists()
