"""`rcllm check`: the correctness gate on real (tiny) models, as library calls and as a command.

Three tiny llamas: the random-weight one of conftest (it follows labels, not content, and reuse
without correction changes its answers); a *content-blind* one whose final norm is zeroed (every
logit exactly 0: a uniform answer, so the first label always wins); and a *content-aware* one
trained here in seconds to pick the candidate with "Golden" in its title, a rule each label can
read from its own item, so cached blocks keep it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rcllm.cli.main import app
from rcllm.data.catalog import write_catalog
from rcllm.data.formats import write_interactions
from rcllm.data.loaders import load_dataset
from rcllm.cli.common import console
from rcllm.data.metrics import mean_half_width
from rcllm.data.movielens import load_ml100k_recbole
from rcllm.data.sampling import sample_requests
from rcllm.data.synthetic import make_synthetic
from rcllm.engine import BlockEngine, PromptBuilder, Ranker
from rcllm.engine.model_policy import POLICY_FILE, read_policy_file
from rcllm.engine.models import load_model, wrap_model
from rcllm.engine.prompt import item_text
from rcllm.eval.check import (
    FrontierRow,
    PromptCase,
    SweepResult,
    Thresholds,
    choose_policy,
    rotation,
    run_check,
    run_sweep,
    sample_cases,
    undecided,
)
from rcllm.eval.gate import GateSettings, log_scores, offset_cases, run_gate

JSON_KEYS = {"model", "policy", "prompts", "max_abs_logit_diff", "top1_agree", "kendall_tau", "kl"}
COLORS = ["Grey", "Brown", "Silver", "Blue", "Green", "Pale", "Dark", "Quiet"]
NOUNS = ["River", "Harbour", "Garden", "Tower", "Meadow", "Lantern", "Bridge", "Forest"]
PLAIN = [f"The {c} {n}" for c in COLORS for n in NOUNS]
GOLDEN = [f"The Golden {n}" for n in NOUNS]
SWEEP_ARGS = ["--prompts", "8", "--history", "3", "--candidates", "5", "--calibration", "none"]


def golden_case(rng: random.Random, n: int = 5) -> PromptCase:
    """Three plain titles of history; n - 1 plain candidates and one golden at a random slot."""
    candidates = rng.sample(PLAIN, n - 1)
    slot = rng.randrange(n)
    candidates.insert(slot, rng.choice(GOLDEN))
    return PromptCase(rng.sample(PLAIN, 3), candidates, slot)


def train_golden(folder: Path, steps: int = 120, batch: int = 16) -> Path:
    """Teach the tiny llama in ``folder`` (plain prefill, loss on the answer's label logits) to
    answer with the label of the golden candidate; save it back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ranker = Ranker(BlockEngine(wrap_model(model, tokenizer, fingerprint="in-training")), PromptBuilder(tokenizer))
    model.requires_grad_(True)
    model.train()
    labels = torch.tensor(ranker.builder.label_token_ids[:5])
    rng = random.Random(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            cases = [golden_case(rng) for _ in range(batch)]
            prompts = [torch.cat([s.token_ids for s in ranker.segments(c.history, c.candidates)[0]]) for c in cases]
            length = max(len(p) for p in prompts)
            # left padding, so that every prompt's answer position is the last one
            ids = torch.stack([torch.cat([torch.zeros(length - len(p), dtype=torch.long), p]) for p in prompts])
            mask = torch.stack([torch.cat([torch.zeros(length - len(p)), torch.ones(len(p))]) for p in prompts]).long()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1]
            loss = torch.nn.functional.cross_entropy(hidden @ model.lm_head.weight[labels].T,
                                                     torch.tensor([c.positive for c in cases]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def golden_model(tiny_models, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("golden") / "model"
    shutil.copytree(tiny_models["llama"], folder)
    return train_golden(folder)


@pytest.fixture(scope="module")
def blind_model(tiny_models, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("blind") / "model"
    shutil.copytree(tiny_models["llama"], folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory) -> Path:
    """A catalog of 56 plain and 8 golden titles; each of 24 users chose every golden title but one
    early, then four plain ones, then the last golden one: its leave-one-out request has that
    golden title among plain negatives (nothing else golden is left unseen)."""
    folder = tmp_path_factory.mktemp("golden-data")
    items = [{"id": f"p{i}", "title": t} for i, t in enumerate(PLAIN)] + [{"id": f"g{i}", "title": t} for i, t in enumerate(GOLDEN)]
    rng = random.Random(1)
    rows = []
    for u in range(24):
        last = u % len(GOLDEN)
        sequence = [f"g{i}" for i in range(len(GOLDEN)) if i != last] + [f"p{i}" for i in rng.sample(range(len(PLAIN)), 4)]
        sequence.append(f"g{last}")
        rows += [(f"u{u}", item, float(t)) for t, item in enumerate(sequence)]
    write_catalog(items, folder / "catalog.jsonl")
    write_interactions(rows, folder / "interactions.jsonl")
    return folder


def open_tiny(folder: Path, calibration: str = "contextual") -> Ranker:
    lm = load_model(str(folder))
    return Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer), calibration=calibration)


@pytest.fixture(scope="module")
def random_ranker(tiny_models) -> Ranker:
    return open_tiny(tiny_models["llama"])


@pytest.fixture(scope="module")
def synthetic_cases() -> list[PromptCase]:
    return sample_cases(make_synthetic(), n_prompts=12, history=5, candidates=5, seed=0)


# --- prompts ------------------------------------------------------------------------------------


def test_sample_cases_are_the_leave_one_out_requests_with_the_held_out_slot():
    data = load_ml100k_recbole()
    cases = sample_cases(data, n_prompts=3, history=20, candidates=20, seed=0)
    requests = sample_requests(data, 3, history=20, candidates=20, seed=0)
    assert len(cases) == 3
    for case, request in zip(cases, requests):
        assert case.history == [item_text(data.items[i]) for i in request.history] and len(case.history) == 20
        assert case.candidates == [item_text(data.items[i]) for i in request.candidates]
        assert case.candidates[case.positive] == item_text(data.items[request.positive])


def test_sample_cases_take_any_dataset_the_other_commands_take(golden_data):
    cases = sample_cases(load_dataset(str(golden_data)), n_prompts=5, history=3, candidates=5, seed=0)
    assert len(cases) == 5
    for case in cases:
        assert [c for c in case.candidates if "Golden" in c] == [case.candidates[case.positive]]
        assert len(case.history) == 3 and not any("Golden" in h for h in case.history)


@pytest.mark.parametrize("n", [2, 3, 5, 26])
def test_rotation_moves_every_candidate_to_another_slot(n):
    for seed in range(10):
        perm = rotation(n, random.Random(seed))
        assert sorted(perm) == list(range(n)) and all(perm[j] != j for j in range(n))


# --- one policy ---------------------------------------------------------------------------------


def test_full_policy_passes_the_gate_exactly(random_ranker, synthetic_cases):
    report = run_check(random_ranker, synthetic_cases, "full", "tiny-llama")
    assert report.max_abs_logit_diff <= 1e-4
    assert report.full_vs_stock_max_abs_logit_diff <= 1e-4
    assert report.top1_agree == 1.0 and report.kendall_tau == pytest.approx(1.0) and report.kl < 1e-8
    assert report.recomputed_fraction == 1.0
    assert report.failures == []


def test_realistic_thresholds_separate_full_from_reuse_without_correction(random_ranker, synthetic_cases):
    """At the defaults (top-1 >= 0.9, tau >= 0.9, KL <= 0.05), reuse without correction changes
    this model's answer on too many prompts, and full prefill does not."""
    none = run_check(random_ranker, synthetic_cases, "none", "tiny-llama")
    assert none.top1_agree < 0.75 and none.max_abs_logit_diff > 1e-3
    assert f"top-1 agreement {none.top1_agree:.3f} < 0.9" in none.failures
    assert run_check(random_ranker, synthetic_cases, "full", "tiny-llama").failures == []


def test_gate_fails_a_policy_below_each_threshold(random_ranker, synthetic_cases):
    report = run_check(random_ranker, synthetic_cases, "none", "tiny-llama", min_top1=1.01, min_tau=1.01, max_kl=-1.0)
    assert report.recomputed_fraction < 0.5
    assert any(f.startswith("top-1 agreement") for f in report.failures)
    assert any(f.startswith("Kendall tau") for f in report.failures)
    assert any(f.startswith("KL") for f in report.failures)


def test_a_content_blind_model_is_reported_and_no_cheap_policy_passes_on_it(blind_model, synthetic_cases):
    ranker = open_tiny(blind_model)
    report = run_check(ranker, synthetic_cases, "none", "blind")
    assert report.content_blind
    assert report.top1_label_stable == 1.0 and report.top1_item_stable == 0.0
    assert report.label_bias == 1.0  # the raw answer is always the first label
    assert report.top1_agree == 1.0  # it agrees with itself whatever the cache does...
    assert any("content-blind" in f for f in report.failures)  # ...and that is not fidelity
    assert run_check(ranker, synthetic_cases, "full", "blind").failures == []  # exactness still means something


def test_a_content_aware_model_is_not_blind_and_its_faithful_reuse_passes(golden_model):
    ranker = open_tiny(golden_model, calibration="none")
    cases = [golden_case(random.Random(100 + i)) for i in range(10)]
    assert [ranker.rank(c.history, c.candidates).order[0] for c in cases] == [c.positive for c in cases]
    report = run_check(ranker, cases, "none", "golden")
    assert not report.content_blind
    assert report.top1_item_stable == 1.0 and report.top1_label_stable == 0.0
    assert report.label_bias <= 0.4  # the answer moves with the golden title
    assert report.failures == []


# --- the sweep ----------------------------------------------------------------------------------


def test_sweep_measures_each_policy_against_the_held_out_item_and_full_prefill(random_ranker, synthetic_cases):
    sweep = run_sweep(random_ranker, synthetic_cases, ["none", "deviation:1", "none"], seed=0)
    assert [r.policy for r in sweep.rows] == ["none", "deviation:1", "full"]
    none, exact, full = sweep.rows
    full_ranking = [random_ranker.rank(c.history, c.candidates, "full").order for c in synthetic_cases]
    assert full.hr_at_1 == sum(o[0] == c.positive for o, c in zip(full_ranking, synthetic_cases)) / 12
    assert full.top1_agree == 1.0 and full.hr_at_1_delta == 0.0 and full.recomputed_fraction == 1.0 and full.speedup == 1.0
    assert exact.top1_agree == 1.0 and exact.kl < 1e-6  # 2 layers: deviation:1 recomputes every moved token
    assert none.top1_agree < 0.75 and none.recomputed_fraction < exact.recomputed_fraction < 1.0
    assert all(r.prefill_ms > 0 for r in sweep.rows)
    assert sweep.headline == "hr@1" and sweep.prompts == 12 and sweep.candidates == 5
    # the 95% intervals come from the per-request outcomes of the same rankings
    agreed = [float(a.order[0] == b.order[0]) for a, b in zip(sweep.rankings["none"], sweep.rankings["full"])]
    assert none.top1_agree_ci == pytest.approx(mean_half_width(agreed)) and none.top1_agree_ci > 0
    hits = {name: [float(r.order[0] == c.positive) for r, c in zip(sweep.rankings[name], synthetic_cases)]
            for name in ("none", "full")}
    changes = [a - b for a, b in zip(hits["none"], hits["full"])]
    assert none.hr_at_1_delta_ci == pytest.approx(mean_half_width(changes))
    assert none.delta_ci("hr@1") == none.hr_at_1_delta_ci and none.delta_ci("hr@10") == none.hr_at_10_delta_ci
    assert full.top1_agree_ci == 0.0 and full.hr_at_1_delta_ci == 0.0
    # realistic thresholds pass over the cheap unfaithful policy to the faithful one...
    choice = choose_policy(sweep.rows, Thresholds(), sweep.headline)
    assert choice.chosen.policy == "deviation:1" and none.pareto and exact.pareto
    # ...but this random model follows labels, so the gate would not trust either
    assert sweep.content_blind


def test_sweep_refuses_requests_it_cannot_score(random_ranker):
    with pytest.raises(ValueError, match="held-out item"):
        run_sweep(random_ranker, [PromptCase(["a"], ["b", "c"])], ["none"])
    with pytest.raises(ValueError, match="at most 26"):
        run_sweep(random_ranker, [PromptCase(["a"], [f"film {i}" for i in range(27)], 0)], ["none"])
    with pytest.raises(ValueError, match="besides full"):
        run_sweep(random_ranker, [PromptCase(["a"], ["b", "c"], 0)], ["full"])


def test_gate_writes_nothing_when_no_cheap_policy_passes(golden_model, golden_data, tmp_path, monkeypatch):
    """The gate's refusal on a content-aware model whose cheap policies all miss the thresholds
    (rows given, the decision and the file are what is tested)."""
    missed = [
        FrontierRow("none", 0.2, 1.0, -0.4, 0.0, 0.5, 0.3, 0.9, 0.05, 1.0, 8.0),
        FrontierRow("boundary:2", 0.5, 1.0, -0.1, 0.0, 0.85, 0.8, 0.1, 0.1, 1.5, 5.0),
        FrontierRow("full", 0.6, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 8.0, 1.0),
    ]
    monkeypatch.setattr("rcllm.eval.gate.run_sweep", lambda *a, **k: SweepResult(missed, 8, 5, "none", 1.0, 0.0))
    outcome = run_gate(open_tiny(golden_model), load_dataset(str(golden_data)), GateSettings("golden", prompts=8,
                       history=3, candidates=5), "golden", tmp_path)
    assert not outcome.passed and outcome.written is None and list(tmp_path.iterdir()) == []
    assert outcome.refusal == ("no policy other than full meets the thresholds; the closest, boundary:2, missed by "
                               "|dHR@1| 0.100 > 0.01; top-1 agreement 0.850 < 0.9")


# --- the command --------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def gated_model(golden_model, golden_data, tmp_path_factory):
    """A copy of the content-aware model after `rcllm check --sweep` chose its policy."""
    folder = tmp_path_factory.mktemp("gated") / "model"
    shutil.copytree(golden_model, folder)
    result = invoke("check", "--sweep", "--model", str(folder), "--dataset", str(golden_data), *SWEEP_ARGS,
                    "--policies", "deviation:0.5,boundary:3")
    return folder, result


def test_sweep_command_writes_the_cheapest_passing_policy_into_the_model_folder(gated_model, golden_data):
    folder, result = gated_model
    assert result.exit_code == 0, result.output
    record = read_policy_file(folder / POLICY_FILE)
    assert record["policy"] == "boundary:3"  # both pass; it recomputes less than deviation:0.5
    assert record["fingerprint"] == load_model(str(folder)).fingerprint
    assert record["dataset"] == str(golden_data) and record["requests"] == 8 and record["candidates"] == 5
    assert record["thresholds"] == {"max_hr_delta": 0.01, "min_top1": 0.9, "headline": "hr@1"}
    assert record["content_probe"]["top1_item_stable"] == 1.0
    rows = {r["policy"]: r for r in record["frontier"]}
    assert list(rows) == ["deviation:0.5", "boundary:3", "full"]
    assert rows["boundary:3"]["top1_agree"] == 1.0 and rows["boundary:3"]["pareto"]
    assert rows["boundary:3"]["recomputed_fraction"] < rows["deviation:0.5"]["recomputed_fraction"]
    assert "PASS" in result.output and POLICY_FILE in result.output
    assert [p.name for p in folder.iterdir() if p.name.startswith(f".{POLICY_FILE}")] == []


def test_check_eval_and_serve_default_to_the_gated_policy(gated_model, golden_data, tmp_path):
    from rcllm.build.pipeline import BuildOptions, build_cache
    from rcllm.data.formats import write_histories
    from rcllm.serve.runner import NodeRunner

    folder, _ = gated_model
    checked = invoke("check", "--model", str(folder), "--dataset", str(golden_data), *SWEEP_ARGS)
    assert checked.exit_code == 0, checked.output
    assert "policy boundary:3: gated by `rcllm check --sweep`" in " ".join(checked.output.split())

    out = tmp_path / "eval.json"
    evaluated = invoke("eval", "--model", str(folder), "--dataset", str(golden_data), "--users", "3",
                       "--requests-per-user", "1", "--candidates", "5", "--history", "3", "--cache", str(tmp_path / "c"),
                       "--json", str(out))
    assert evaluated.exit_code == 0, evaluated.output
    assert list(json.loads(out.read_text())["systems"]) == [
        "full", "prefix", "rcllm:boundary:3", "rcllm:deviation:0.15", "rcllm:none"
    ]
    assert "gated by `rcllm check --sweep`" in " ".join(evaluated.output.split())

    data = load_dataset(str(golden_data))
    write_catalog(list(data.items.values()), tmp_path / "catalog.jsonl")
    write_histories({u: s[:-1] for u, s in data.user_sequences().items()}, tmp_path / "histories.jsonl")
    build_cache(tmp_path / "catalog.jsonl", BuildOptions(out=tmp_path / "cache", nodes=1, model=str(folder),
                                                          users=tmp_path / "histories.jsonl", history=3))
    runner = NodeRunner.open(tmp_path / "cache", 0, hot_bytes=1 << 20)
    assert runner.policy == "boundary:3" and runner.policy_reason.startswith("gated by")
    assert runner.state()["policy"] == "boundary:3"
    given = NodeRunner(runner.ranker, 0, runner.data, runner.source.stores, 1 << 20, policy="none")
    assert given.policy == "none" and given.policy_reason == "given (--policy)"
    runner.close()


@pytest.mark.slow
def test_demo_defaults_to_the_gated_policy(gated_model, tmp_path):
    from rcllm.demo import DemoSettings, run_demo

    folder, _ = gated_model
    settings = DemoSettings(dataset="bookshop", out=tmp_path / "demo", nodes=1, requests=3, candidates=5, history=3,
                            model=str(folder))
    result = run_demo(settings, log=lambda message: None)
    assert result.policy == "boundary:3" and result.policy_reason.startswith("gated by")
    assert list(result.systems) == ["full", "prefix", "rcllm:boundary:3"]
    assert result.exit_codes and all(code == 0 for code in result.exit_codes.values())
    for name, run in result.systems.items():  # the demo's hit rates: where each reader's next item was ranked
        places = [ranking.index(r.positive) for r, ranking in zip(result.requests, run.rankings)]
        assert result.hit_rates[name] == {1: places.count(0) / 3, 3: sum(p < 3 for p in places) / 3}


def test_sweep_command_refuses_a_content_blind_model_and_writes_nothing(blind_model, golden_data):
    result = invoke("check", "--sweep", "--model", str(blind_model), "--dataset", str(golden_data), *SWEEP_ARGS,
                    "--policies", "none,boundary:2")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "FAIL the model is content-blind" in text and "no policy file written" in text
    assert not (blind_model / POLICY_FILE).exists()


def test_sweep_command_exits_nonzero_and_names_the_closest_when_none_passes(golden_model, golden_data, tmp_path,
                                                                              monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(golden_model, folder)
    missed = [FrontierRow("none", 0.2, 1.0, -0.4, 0.0, 0.5, 0.3, 0.9, 0.05, 1.0, 8.0),
              FrontierRow("full", 0.6, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 8.0, 1.0)]
    monkeypatch.setattr("rcllm.eval.gate.run_sweep", lambda *a, **k: SweepResult(missed, 8, 5, "none", 1.0, 0.0))
    result = invoke("check", "--sweep", "--model", str(folder), "--dataset", str(golden_data), *SWEEP_ARGS,
                    "--policies", "none")
    assert result.exit_code == 1, result.output
    assert "the closest, none, missed by" in " ".join(result.output.split())
    assert not (folder / POLICY_FILE).exists()
    (folder / POLICY_FILE).write_text("{}")  # an earlier sweep's file: kept, and the user is told
    again = invoke("check", "--sweep", "--model", str(folder), "--dataset", str(golden_data), *SWEEP_ARGS,
                   "--policies", "none")
    assert again.exit_code == 1 and (folder / POLICY_FILE).read_text() == "{}"
    assert f"the one from an earlier sweep, {folder.resolve() / POLICY_FILE}, is left as it was" in " ".join(
        again.output.split()
    )


def test_undecided_names_each_threshold_inside_its_95_percent_interval():
    t = Thresholds(max_hr_delta=0.01, min_top1=0.9)
    row = lambda d, d_ci, top1, top1_ci: FrontierRow(  # noqa: E731
        "tail:2", 0.2, 0.8, 0.0, d, top1, 0.9, 0.05, 0.1, 200.0, 5.0,
        hr_at_10_delta_ci=d_ci, top1_agree_ci=top1_ci,
    )
    # the seed-1 draw of the ml-100k gate: both verdicts within an interval of their thresholds
    notes = undecided(row(-0.016, 0.011, 0.884, 0.028), t, "hr@10")
    assert len(notes) == 2 and notes[0].startswith("dHR@10 -0.016 +/- 0.011") and "top-1 agreement 0.884" in notes[1]
    # clear passes and clear fails settle their verdicts
    assert undecided(row(0.001, 0.004, 0.97, 0.01), t, "hr@10") == []
    assert undecided(row(-0.08, 0.02, 0.5, 0.04), t, "hr@10") == []
    # a pass on the point estimate that a second draw could fail
    assert undecided(row(0.008, 0.011, 0.95, 0.01), t, "hr@10") == ["dHR@10 +0.008 +/- 0.011 against |d| <= 0.01"]
    # no interval (fewer than two requests, or no request moved): nothing to say
    assert undecided(row(0.0, None, 0.95, None), t, "hr@10") == []
    assert undecided(row(0.0, 0.0, 1.0, 0.0), t, "hr@10") == []


def test_sweep_command_says_when_its_requests_do_not_settle_the_verdict(golden_model, golden_data, tmp_path,
                                                                        monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(golden_model, folder)
    near = [FrontierRow("none", 0.2, 0.8, 0.0, -0.016, 0.884, 0.9, 0.05, 0.1, 1.0, 5.1,
                        hr_at_10_delta_ci=0.011, top1_agree_ci=0.028),
            FrontierRow("full", 0.2, 0.8, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 5.1, 1.0, hr_at_10_delta_ci=0.0,
                        top1_agree_ci=0.0)]
    monkeypatch.setattr("rcllm.eval.gate.run_sweep", lambda *a, **k: SweepResult(near, 500, 20, "none", 1.0, 0.0))
    monkeypatch.setattr(console, "width", 260)  # the table on one line per policy
    args = ("check", "--sweep", "--model", str(folder), "--dataset", str(golden_data), *SWEEP_ARGS, "--policies", "none")
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "-0.016 +/-0.011" in text and "0.884 +/-0.028" in text  # the table shows the intervals
    assert "not settled: 500 requests do not decide none's verdict at 95%" in text
    data = json.loads(invoke(*args, "--json").output)
    assert data["undecided"]["policy"] == "none" and len(data["undecided"]["thresholds"]) == 2
    assert data["frontier"][0]["top1_agree_ci"] == 0.028
    # a clear miss is settled: no such line
    far = [FrontierRow("none", 0.2, 0.8, 0.0, -0.2, 0.3, 0.2, 0.9, 0.1, 1.0, 8.0, hr_at_10_delta_ci=0.02,
                       top1_agree_ci=0.04), near[1]]
    monkeypatch.setattr("rcllm.eval.gate.run_sweep", lambda *a, **k: SweepResult(far, 500, 20, "none", 1.0, 0.0))
    assert "not settled" not in invoke(*args).output


@pytest.mark.parametrize("args, message", [
    (["--model", "org/some-model"], "not a local folder"),
    (["--policy", "none"], "--sweep measures the grid"),
    (["--policies", "boundary:x"], "--policies: unknown correction policy"),
    (["--policies", "full"], "no policy besides full"),
    (["--min-top1", "1.5"], "--min-top1 between 0 and 1"),
])
def test_sweep_command_explains_bad_input_before_measuring(args, message, tiny_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("check", "--sweep", *(["--model", str(tiny_models["llama"])] if "--model" not in args else []), *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_check_command_prints_the_json_contract(tiny_models):
    result = invoke("check", "--model", str(tiny_models["llama"]), "--policy", "full", "--prompts", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert JSON_KEYS <= set(data)
    assert data["policy"] == "full" and data["prompts"] == 2
    assert data["max_abs_logit_diff"] <= 1e-4


def test_check_command_exits_nonzero_below_threshold(tiny_models):
    result = invoke("check", "--model", str(tiny_models["llama"]), "--policy", "none", "--prompts", "2", "--min-top1", "1.01")
    assert result.exit_code == 1
    assert "FAIL" in result.stdout


def test_check_command_rejects_a_bad_policy_and_a_missing_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("check", "--model", str(tmp_path / "nope"), "--policy", "boundary:x")
    assert result.exit_code == 2
    assert "error" in result.output


def test_cases_take_the_item_text_of_the_rankers_template():
    """sample_cases writes items as the ranker's template does: with categories last, every
    history and candidate text is title; description; category."""
    from rcllm.data.synthetic import THEMES

    data = make_synthetic()
    cases = sample_cases(data, n_prompts=3, history=4, candidates=5, seed=0,
                         text=lambda item: item_text(item, categories_last=True))
    for case in cases:
        for text in case.history + case.candidates:
            title, description, categories = text.split("; ")
            assert description.startswith("A ") and categories in THEMES


# --- label offsets ------------------------------------------------------------------------------


def test_label_offsets_choose_only_the_first_place_of_their_policys_rankings_of_their_size(random_ranker,
                                                                                         synthetic_cases):
    case = synthetic_cases[0]
    plain = {p: random_ranker.rank(case.history, case.candidates, p) for p in ("none", "full")}
    last = plain["none"].order[-1]
    push = torch.full((5,), -10.0)
    push[last] = 30.0
    random_ranker.label_offsets["none"] = push
    try:
        pushed = random_ranker.rank(case.history, case.candidates, "none")
        assert pushed.order == [last] + plain["none"].order[:-1]  # the rest keep the policy's own order
        assert pushed.scores == plain["none"].scores  # the scores stay the policy's own
        assert pushed.label_logprobs == plain["none"].label_logprobs
        assert random_ranker.rank(case.history, case.candidates, "full").order == plain["full"].order
        four = random_ranker.rank(case.history, case.candidates[:4], "none")  # offsets are for 5 candidates
        random_ranker.label_offsets.clear()
        assert four.order == random_ranker.rank(case.history, case.candidates[:4], "none").order
    finally:
        random_ranker.label_offsets.clear()


def test_the_first_place_is_the_best_score_plus_offset(random_ranker):
    calibrated = torch.tensor([0.1, 0.4, 0.3, 0.2])
    assert random_ranker.order(calibrated, "none") == [1, 2, 3, 0]  # no offsets: by score
    random_ranker.label_offsets["none"] = torch.tensor([0.0, 0.0, 0.26, 0.0])  # 0.3 * e^0.26 = 0.389 < 0.4
    try:
        assert random_ranker.order(calibrated, "none") == [1, 2, 3, 0]
        random_ranker.label_offsets["none"] = torch.tensor([0.0, 0.0, 0.3, 0.0])  # 0.405 > 0.4
        assert random_ranker.order(calibrated, "none") == [2, 1, 3, 0]
        random_ranker.label_offsets["none"] = torch.tensor([1.5, 0.0, 0.0, 0.0])
        assert random_ranker.order(calibrated, "none") == [0, 1, 2, 3]  # 0.1 * e^1.5 = 0.45 > 0.4
        assert random_ranker.order(calibrated, "full") == [1, 2, 3, 0]
    finally:
        random_ranker.label_offsets.clear()


def test_offsets_are_fitted_on_other_users_than_the_gates(golden_data):
    data = load_dataset(str(golden_data))
    settings = GateSettings("golden", prompts=8, history=3, candidates=5, offset_requests=6)
    gate = sample_cases(data, 8, 3, 5, 0)
    fit = offset_cases(data, settings, gate, item_text)
    requests = sample_requests(data, 14, history=3, candidates=5, seed=0)
    assert len(fit) == 6 and {r.user_id for r in requests[:8]}.isdisjoint(r.user_id for r in requests[8:])
    assert fit == sample_cases(data, 14, 3, 5, 0)[8:]
    everyone = GateSettings("golden", prompts=24, history=3, candidates=5, offset_requests=6)
    with pytest.raises(ValueError, match="no user is left for fitting label offsets"):
        offset_cases(data, everyone, sample_cases(data, 24, 3, 5, 0), item_text)


def test_the_gate_measures_policies_with_the_offsets_it_fitted(golden_model, golden_data, tmp_path):
    ranker = open_tiny(golden_model, calibration="none")
    ranker.label_offsets["boundary:1"] = torch.ones(5)  # from an earlier file: dropped by the gate
    data = load_dataset(str(golden_data))
    settings = GateSettings("golden", prompts=8, history=3, candidates=5, policies=("none", "boundary:1"),
                            offset_requests=10)  # fmt: skip
    outcome = run_gate(ranker, data, settings, "golden", tmp_path)
    fit = outcome.offsets
    assert fit.requests == 10 and fit.candidates == 5 and set(fit.offsets) == {"none", "boundary:1"}
    assert all(ranker.label_offsets[p].tolist() == pytest.approx(v) for p, v in fit.offsets.items())
    assert all(abs(sum(v)) < 1e-4 for v in fit.offsets.values())
    # the gate's rankings are the policies' own, with the first place chosen by score plus offset
    with_offsets = outcome.sweep.rankings
    ranker.label_offsets.clear()
    without = run_sweep(ranker, sample_cases(data, 8, 3, 5, 0), ["none", "boundary:1"], probe=False).rankings
    for policy, offsets in fit.offsets.items():
        firsts = (log_scores(without[policy]) + torch.tensor(offsets)).argmax(-1).tolist()
        for a, b, first in zip(with_offsets[policy], without[policy], firsts):
            assert a.scores == pytest.approx(b.scores, abs=1e-5)
            assert a.order == [first] + [i for i in b.order if i != first]
    assert [r.scores for r in with_offsets["full"]] == [r.scores for r in without["full"]]
    if outcome.written:
        assert read_policy_file(outcome.written)["label_offsets"]["policies"] == fit.offsets
    # a gate without offsets measures and writes none, whatever the ranker had
    ranker.label_offsets["none"] = torch.ones(5)
    plain = run_gate(ranker, data, GateSettings("golden", prompts=8, history=3, candidates=5, policies=("none",)),
                     "golden", tmp_path)  # fmt: skip
    assert plain.offsets is None and ranker.label_offsets == {}
    if plain.written:
        assert "label_offsets" not in read_policy_file(plain.written)


def test_sweep_command_fits_offsets_that_check_and_serving_apply(golden_model, golden_data, tmp_path):
    from rcllm.engine import open_ranker

    folder = tmp_path / "model"
    shutil.copytree(golden_model, folder)
    result = invoke("check", "--sweep", "--model", str(folder), "--dataset", str(golden_data), *SWEEP_ARGS,
                    "--policies", "boundary:3", "--fit-offsets", "10")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "with fitted label offsets" in text and "label offsets fitted on 10 requests of other users" in text
    record = read_policy_file(folder / POLICY_FILE)
    offsets = record["label_offsets"]["policies"]["boundary:3"]
    assert len(offsets) == 5 and record["label_offsets"]["requests"] == 10
    assert record["label_offsets"]["decides"] == "first place"
    assert open_ranker(str(folder), calibration="none").label_offsets["boundary:3"].tolist() == pytest.approx(offsets)
    assert open_ranker(str(folder)).label_offsets == {}  # fitted without contextual calibration
    assert open_ranker(str(folder), calibration="none", label_offsets=False).label_offsets == {}
    checked = invoke("check", "--model", str(folder), "--dataset", str(golden_data), *SWEEP_ARGS, "--json")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout.strip().splitlines()[-1])["label_offsets"] is True
    refused = invoke("check", "--model", str(folder), "--fit-offsets", "3")
    assert refused.exit_code == 2 and "use it with --sweep" in " ".join(refused.output.split())
