"""`rcllm check`: the correctness gate, as a library call and as a command."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rcllm.cli.main import app
from rcllm.data.movielens import load_ml100k_recbole
from rcllm.engine import BlockEngine, PromptBuilder, Ranker
from rcllm.engine.check import PromptCase, run_check, sample_cases
from rcllm.engine.models import load_model

JSON_KEYS = {"model", "policy", "prompts", "max_abs_logit_diff", "top1_agree", "kendall_tau", "kl"}


@pytest.fixture(scope="module")
def cases():
    return sample_cases(load_ml100k_recbole(), n_prompts=3, history=20, candidates=20, seed=0)


@pytest.fixture(scope="module")
def ranker(tiny_models):
    lm = load_model(tiny_models["qwen3"])
    return Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer))


def test_sample_cases_are_history_20_candidates_20(cases):
    assert len(cases) == 3
    assert all(len(c.history) == 20 and len(c.candidates) == 20 for c in cases)


def test_full_policy_passes_the_gate_exactly(ranker, cases):
    report = run_check(ranker, cases, "full", "tiny-qwen3")
    assert report.max_abs_logit_diff <= 1e-4
    assert report.full_vs_stock_max_abs_logit_diff <= 1e-4
    assert report.top1_agree == 1.0 and report.kendall_tau == pytest.approx(1.0) and report.kl < 1e-8
    assert report.recomputed_fraction == 1.0
    assert report.failures == []


def test_gate_fails_a_policy_below_the_thresholds(ranker, cases):
    report = run_check(ranker, cases, "none", "tiny-qwen3", min_top1=1.01, min_tau=1.01, max_kl=-1.0)
    assert report.max_abs_logit_diff > 0
    assert report.recomputed_fraction < 0.5
    assert any("top-1 agreement" in f for f in report.failures)
    assert any("Kendall tau" in f for f in report.failures)
    assert any("KL" in f for f in report.failures)


def test_content_blindness_is_reported_for_a_label_following_model(ranker):
    """Identical candidates leave the model nothing but the label to go by: after a shuffle
    the same label wins, never a particular item by its content."""
    cases = [PromptCase(["Some film"], [f"Film {i}" for i in range(5)]) for _ in range(2)]
    report = run_check(ranker, cases, "full", "tiny-qwen3")
    assert 0.0 <= report.top1_item_stable <= 1.0 and 0.0 <= report.top1_label_stable <= 1.0
    assert report.label_bias >= 0.5


def test_check_command_prints_the_json_contract(tiny_models):
    result = CliRunner().invoke(
        app, ["check", "--model", str(tiny_models["llama"]), "--policy", "full", "--prompts", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert JSON_KEYS <= set(data)
    assert data["policy"] == "full" and data["prompts"] == 2
    assert data["max_abs_logit_diff"] <= 1e-4


def test_check_command_exits_nonzero_below_threshold(tiny_models):
    result = CliRunner().invoke(
        app, ["check", "--model", str(tiny_models["llama"]), "--policy", "none", "--prompts", "2", "--min-top1", "1.01"]
    )
    assert result.exit_code == 1
    assert "FAIL" in result.stdout


def test_check_command_rejects_a_bad_policy_and_a_missing_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["check", "--model", str(tmp_path / "nope"), "--policy", "boundary:x"])
    assert result.exit_code == 2
    assert "error" in result.output
