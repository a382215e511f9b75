"""`rcllm eval` computes only the blocks its requests read, ranks as it would on a full cache, and
refuses up front when the disk cannot hold what it would compute (#20)."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rcllm.build.pipeline import BuildOptions, build_cache
from rcllm.cli.main import app
from rcllm.data.catalog import write_catalog
from rcllm.data.formats import write_histories
from rcllm.data.loaders import prepare
from rcllm.data.synthetic import make_synthetic
from rcllm.engine import BlockEngine, PromptBuilder, Ranker
from rcllm.engine.models import load_model
from rcllm.eval import blocks
from rcllm.eval.blocks import NotEnoughDiskError
from rcllm.eval.runner import EvalSettings, prepare_block_source, run_eval, sample_eval_requests

CATALOG = 400  # items; the requests below read a few dozen of them
SYSTEMS = "full,prefix,rcllm:full,rcllm:none,rcllm:boundary:2"
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def ranker(tiny_models):
    lm = load_model(tiny_models["llama"])
    return Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer))


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_items=CATALOG, n_users=40, n_interactions_per_user=(8, 20), seed=2)


@pytest.fixture(scope="module")
def settings():
    return EvalSettings(users=5, requests_per_user=2, candidates=6, history=5, seed=4)


def read_blocks(requests) -> tuple[set[str], set[tuple[str, ...]]]:
    """The items and the histories the requests put in their prompts."""
    return {i for r in requests for i in r.candidates}, {tuple(r.history) for r in requests}


def stores_of(source_factory):
    return source_factory().stores


def close(source_factory) -> None:
    for store in stores_of(source_factory):
        store.close()


def flat(result: dict, prefix: str = "") -> dict:
    """Every number of the result by its path, less the timings."""
    out = {}
    for key, value in result.items():
        if key == "ttft_ms":
            continue
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_eval_computes_only_the_blocks_its_requests_read_and_ranks_as_on_a_full_cache(ranker, data, settings, tmp_path):
    requests = sample_eval_requests(data, settings)
    items, histories = read_blocks(requests)
    assert len(items) + len(histories) < CATALOG / 4  # the point: far fewer blocks than the catalog

    notes: list[str] = []
    only_needed = prepare_block_source(ranker, data, settings, tmp_path / "own", requests=requests, note=notes.append)
    (own,) = stores_of(only_needed)
    assert len(own) == len(items) + len(histories)  # one block per item read, one per history
    assert f"the requests read {len(own)} blocks; computing {len(own)}:" in notes[0]
    assert notes[1].startswith("estimated time: ") and "(an estimate from the second batch" in notes[1]
    assert notes[2].startswith(f"computed {len(own)} blocks (")
    lean = run_eval(ranker, data, SYSTEMS, settings, only_needed, "tiny", requests=requests)
    close(only_needed)

    # The same requests on a cache of the whole catalog, built over two nodes. Its users' history
    # blocks end with each user's last item (the eval's held-out positive), so eval computes the
    # history blocks it reads beside it, and only those.
    full = tmp_path / "full"
    write_catalog(list(data.items.values()), tmp_path / "catalog.jsonl")
    write_histories(data.user_sequences(), tmp_path / "histories.jsonl")
    build_cache(tmp_path / "catalog.jsonl", BuildOptions(out=full, nodes=2, model=ranker.engine.lm.name,
                users=tmp_path / "histories.jsonl", history=settings.history, embedder="llm"), ranker=ranker)
    notes.clear()
    on_full = prepare_block_source(ranker, data, settings, full, requests=requests, store_dir=tmp_path / "beside",
                                   note=notes.append)
    *built, beside = stores_of(on_full)
    assert sum(len(s) for s in built[:2]) == CATALOG  # the two node stores: the whole catalog
    assert len(beside) == len(histories)
    assert f"({len(items)} in the cache given); computing {len(histories)}:" in notes[0]
    wide = run_eval(ranker, data, SYSTEMS, settings, on_full, "tiny", requests=requests)
    close(on_full)

    assert lean["systems"]["rcllm:none"]["hit_ratio"] == {"user": 1.0, "item": 1.0}
    lean, wide = flat(lean), flat(wide)
    assert lean.keys() == wide.keys()
    for path, value in lean.items():  # ranks, hit ratios and token counts exactly; KL and tau to float noise
        exact = not path.endswith(("/kl", "/kendall_tau"))
        assert value == (wide[path] if exact else pytest.approx(wide[path], abs=1e-6)), path


def test_a_second_eval_computes_nothing_and_its_estimate_covers_the_disk_used(ranker, data, settings, tmp_path):
    requests = sample_eval_requests(data, settings)
    first = prepare_block_source(ranker, data, settings, tmp_path / "own", requests=requests)
    (store,) = stores_of(first)
    used = store.total_bytes
    close(first)
    plan = blocks.plan_blocks(ranker, blocks.needed_blocks(ranker, data, requests), [], tmp_path / "empty")
    # the estimate from the model's dims errs high, but not by more than a quarter
    assert used <= plan.disk_bytes <= 1.25 * used

    notes: list[str] = []
    again = prepare_block_source(ranker, data, settings, tmp_path / "own", requests=requests, note=notes.append)
    assert notes == [f"the requests read {plan.needed} blocks, all already computed ({plan.needed} computed by an earlier eval)"]
    close(again)


def test_eval_refuses_before_computing_when_the_disk_cannot_hold_its_blocks(ranker, data, settings, tmp_path, monkeypatch):
    requests = sample_eval_requests(data, settings)
    plan = blocks.plan_blocks(ranker, blocks.needed_blocks(ranker, data, requests), [], tmp_path / "own")
    free = plan.disk_bytes // 2
    monkeypatch.setattr(blocks.shutil, "disk_usage", lambda path: Usage(10 * free, 9 * free, free))
    with pytest.raises(NotEnoughDiskError, match=r"eval would compute [\d,]+ blocks \([\d,]+ tokens\), about .* MiB, into .* but the disk holding .* free"):
        prepare_block_source(ranker, data, settings, tmp_path / "own", requests=requests)
    assert not (tmp_path / "own").exists()  # refused before anything was written

    monkeypatch.setattr(blocks.shutil, "disk_usage", lambda path: Usage(10 * free, 0, 10 * free))
    prepare_block_source(ranker, data, settings, tmp_path / "own", requests=requests)  # the same with room: runs


def test_eval_command_says_what_it_builds_and_refuses_a_full_disk(tiny_models, tmp_path, monkeypatch):
    folder = tmp_path / "shop"
    prepare(make_synthetic(n_items=120, n_users=20, n_interactions_per_user=(6, 12), seed=5), folder)
    args = ["eval", "--dataset", str(folder), "--model", str(tiny_models["qwen3"]), "--users", "3", "--requests-per-user",
            "2", "--candidates", "5", "--history", "4", "--systems", "full,rcllm:none", "--cache", str(tmp_path / "own")]
    monkeypatch.setattr(blocks.shutil, "disk_usage", lambda path: Usage(1 << 30, (1 << 30) - 4096, 4096))
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and not isinstance(refused.exception, NotEnoughDiskError)  # a message, no traceback
    assert "but the disk holding" in " ".join(refused.output.split())
    assert not (tmp_path / "own").exists()

    monkeypatch.undo()
    ran = CliRunner().invoke(app, args)
    assert ran.exit_code == 0, ran.output
    said = " ".join(ran.output.split())
    assert "the requests read" in said and "on disk in" in said and "KV bytes per token" in said


def test_a_built_cache_of_another_model_is_refused(ranker, tiny_models, data, settings, tmp_path):
    other_lm = load_model(tiny_models["qwen3"])
    other = Ranker(BlockEngine(other_lm), PromptBuilder(other_lm.tokenizer))
    write_catalog(list(data.items.values())[:50], tmp_path / "catalog.jsonl")
    build_cache(tmp_path / "catalog.jsonl", BuildOptions(out=tmp_path / "cache", nodes=1, model=str(tiny_models["qwen3"]),
                embedder="llm"), ranker=other)
    with pytest.raises(ValueError, match="built for model"):
        prepare_block_source(ranker, data, settings, tmp_path / "cache", store_dir=tmp_path / "own")
    assert not Path(tmp_path / "own").exists()


def test_an_eval_whose_store_another_writer_holds_is_refused_with_a_message(tiny_models, tmp_path):
    """Two evals computing into one store at once: the second says who holds it, no traceback."""
    from rcllm.store import BlockStore, StoreBusyError

    folder = tmp_path / "shop"
    prepare(make_synthetic(n_items=120, n_users=20, n_interactions_per_user=(6, 12), seed=5), folder)
    args = ["eval", "--dataset", str(folder), "--model", str(tiny_models["qwen3"]), "--users", "2", "--requests-per-user",
            "1", "--candidates", "4", "--history", "3", "--systems", "full,rcllm:none", "--cache", str(tmp_path / "own")]
    import fcntl

    BlockStore(tmp_path / "own", create=True).close()
    with open(tmp_path / "own" / "writer.lock", "a+b") as lock:  # what another process's writer holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and not isinstance(refused.exception, StoreBusyError), refused.output
    assert "open for writing elsewhere" in " ".join(refused.output.split())
