"""`rcllm eval`: one request stream for every system, the JSON contract, exactness of rcllm:full."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rcllm.cli.main import app
from rcllm.data.synthetic import make_synthetic
from rcllm.engine import BlockEngine, PromptBuilder, Ranker
from rcllm.engine.models import load_model
from rcllm.eval.runner import EvalSettings, prepare_block_source, run_eval, sample_eval_requests
from rcllm.eval.systems import parse_systems

SYSTEM_KEYS = {"ttft_ms", "hr@1", "hr@5", "hr@10", "ndcg@10", "mrr", "hit_ratio", "recomputed_fraction"}
TOP_KEYS = {"dataset", "model", "device", "n_users", "n_requests", "candidates", "seed", "systems", "baselines"}


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    lm = load_model(tiny_models["llama"])
    ranker = Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer))
    data = make_synthetic(n_items=80, n_users=20, seed=1)
    settings = EvalSettings(users=6, requests_per_user=2, candidates=8, history=5, seed=3)
    requests = sample_eval_requests(data, settings)
    source = prepare_block_source(ranker, data, settings, tmp_path_factory.mktemp("cache"), requests=requests)
    result = run_eval(
        ranker, data, "full,prefix,rcllm:full,rcllm:none,rcllm:boundary:2", settings, source, "tiny", requests=requests
    )
    return ranker, data, settings, requests, source, result


def test_parse_systems_validates_names_and_policies():
    assert parse_systems("full, prefix,rcllm:boundary:4") == ["full", "prefix", "rcllm:boundary:4"]
    with pytest.raises(ValueError, match="unknown system"):
        parse_systems("fast")
    with pytest.raises(ValueError, match="policy"):
        parse_systems("rcllm:boundary:x")
    with pytest.raises(ValueError, match="twice"):
        parse_systems("full,full")


def test_same_seed_gives_the_same_request_stream(setup):
    _, data, settings, requests, _, _ = setup
    again = sample_eval_requests(data, settings)
    assert [(r.user_id, r.candidates, r.history) for r in again] == [(r.user_id, r.candidates, r.history) for r in requests]
    assert len(requests) == 12 and len({r.user_id for r in requests}) == 6


def test_result_follows_the_json_contract(setup):
    result = setup[-1]
    assert TOP_KEYS <= set(result)
    assert set(result["systems"]) == {"full", "prefix", "rcllm:full", "rcllm:none", "rcllm:boundary:2"}
    for name, s in result["systems"].items():
        assert SYSTEM_KEYS <= set(s)
        assert set(s["ttft_ms"]) == {"mean", "p50", "p90", "p99"}
        assert set(s["hit_ratio"]) == {"user", "item"}
        assert ("fidelity" in s) == (name != "full")
        if name != "full":
            assert set(s["fidelity"]) == {"top1_agree", "kendall_tau", "kl", "hr@10_delta", "hr@1_delta"}
    assert set(result["baselines"]) == {"random", "popularity"}
    json.dumps(result)  # serialisable as is


def test_rcllm_full_and_prefix_reproduce_full_exactly(setup):
    result = setup[-1]
    for name in ("rcllm:full", "prefix"):
        f = result["systems"][name]["fidelity"]
        assert f["top1_agree"] == 1.0 and f["kendall_tau"] == pytest.approx(1.0) and f["hr@10_delta"] == f["hr@1_delta"] == 0.0
        assert f["kl"] < 1e-6


def test_rcllm_reuses_the_precomputed_blocks(setup):
    s = setup[-1]["systems"]["rcllm:none"]
    assert s["hit_ratio"]["user"] == 1.0 and s["hit_ratio"]["item"] == 1.0
    assert s["recomputed_fraction"] < 0.5
    assert setup[-1]["systems"]["full"]["recomputed_fraction"] == 1.0


def test_every_system_ran_the_same_token_ids(setup):
    ranker, data, _, requests, source, _ = setup
    from rcllm.engine.prompt import item_text

    r = requests[0]
    history = [item_text(data.items[i]) for i in r.history]
    candidates = [item_text(data.items[i]) for i in r.candidates]
    fresh, _ = ranker.segments(history, candidates)
    cached, _ = ranker.segments(history, candidates, source())
    assert [s.token_ids.tolist() for s in fresh] == [s.token_ids.tolist() for s in cached]


def test_eval_command_writes_json_and_plot(tiny_models, tmp_path):
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    result = CliRunner().invoke(app, [
        "eval", "--dataset", "synthetic", "--model", str(tiny_models["qwen3"]), "--users", "3",
        "--requests-per-user", "1", "--candidates", "5", "--history", "4", "--systems", "full,prefix,rcllm:boundary:1",
        "--cache", str(tmp_path / "cache"), "--json", str(out), "--plot", str(plot),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["dataset"] == "synthetic" and data["n_requests"] == 3
    assert plot.stat().st_size > 1000
    assert "rcllm:boundary:1" in result.output


def test_prefix_system_counts_the_items_a_reused_prefix_covers(setup):
    from rcllm.engine.prefix_cache import PrefixSystem

    ranker, data, settings, requests, *_ = setup
    system = PrefixSystem(ranker, budget_bytes=1 << 30)
    history, candidates = ["Some film (1990); Drama"] * 3, [f"Film {i}; Comedy" for i in range(5)]
    first = system.rank(history, candidates)
    assert (first.user_hit, first.item_hits, first.item_misses) == (False, 0, 5)
    again = system.rank(history, candidates)  # the whole prompt is a cached prefix now
    assert (again.user_hit, again.item_hits, again.item_misses) == (True, 5, 0)
    other = system.rank(history, candidates[::-1])  # same history, items in another order
    assert other.user_hit and other.item_hits < 5
