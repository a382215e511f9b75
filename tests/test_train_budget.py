"""``rcllm finetune --minutes``: a budget of training time that ends the run with its schedule done."""

from __future__ import annotations

import json

import pytest

from rcllm.engine.models import load_model
from rcllm.train import TrainSettings, train
from rcllm.train.settings import lr_factor


def _settings(tmp_path, model, **overrides) -> TrainSettings:
    base = dict(out=tmp_path / "model", model=str(model), method="full", steps=4, batch=2, lr=1e-3, history=3,
                candidates=4, block_aware="mix", eval_every=2, val_users=3, seed=0, amp="off")  # fmt: skip
    return TrainSettings(**{**base, **overrides})


def test_the_schedule_follows_steps_or_the_time_spent_whichever_is_further():
    steps = TrainSettings(steps=100)
    assert [steps.scheduled_step(s, 1e6) for s in (0, 40, 100)] == [0, 40, 100]  # no budget: time is ignored
    timed = TrainSettings(steps=100, minutes=2.0)
    assert timed.scheduled_step(10, 60.0) == 50  # half the budget spent: half-way through the schedule
    assert timed.scheduled_step(70, 60.0) == 70  # steps further along than time
    assert timed.scheduled_step(10, 500.0) == 100  # budget spent: the schedule is at its end
    # the learning rate at half the budget is the schedule's half-way rate, not the 10th step's
    assert lr_factor(timed.scheduled_step(10, 60.0), 100, "cosine") == pytest.approx(lr_factor(50, 100, "cosine"))
    assert lr_factor(timed.scheduled_step(10, 60.0), 100, "cosine") < 0.6 < lr_factor(10, 100, "cosine")


def test_a_time_budget_keeps_the_warm_up_and_decays_over_the_time_spent():
    timed = TrainSettings(steps=100_000, minutes=10.0)  # far more steps than the budget reaches
    # the warm-up counts steps taken: 20 of them, however far the clock is
    assert timed.lr_factor_at(0, 30.0) == pytest.approx(1 / 20)
    assert timed.lr_factor_at(19, 30.0) == 1.0
    # after it the cosine follows the clock: half the budget spent, half the peak rate
    assert timed.lr_factor_at(25, 300.0) == pytest.approx(0.5, abs=0.01)
    assert timed.lr_factor_at(25, 599.0) < 0.01
    plain = TrainSettings(steps=200)  # no budget: the step schedule, whatever the clock says
    assert [plain.lr_factor_at(s, 1e6) for s in (0, 110, 199)] == [lr_factor(s, 200, "cosine") for s in (0, 110, 199)]


def test_a_negative_budget_is_refused(tmp_path, tiny_models, small_data):
    with pytest.raises(ValueError, match="--minutes"):
        train(_settings(tmp_path, tiny_models["llama"], minutes=-1), dataset=small_data)


def test_a_spent_budget_ends_the_run_validated_and_saved(tmp_path, tiny_models, small_data):
    # a budget far below one step's time: the first step spends it, then the run validates and writes its model
    result = train(_settings(tmp_path, tiny_models["llama"], steps=50, minutes=1e-7), dataset=small_data)
    report = result.report
    assert report["steps"] == 1 and report["stopped_by"] == "minutes"
    assert [e["step"] for e in report["evals"]] == [0, 1]
    assert json.loads((result.out / "training.json").read_text())["stopped_by"] == "minutes"
    load_model(result.out)  # a complete model folder
    assert not (tmp_path / "model.ckpt").exists()


def test_a_generous_budget_leaves_the_run_to_its_steps(tmp_path, tiny_models, small_data):
    result = train(_settings(tmp_path, tiny_models["llama"], steps=3, minutes=60.0), dataset=small_data)
    assert result.report["steps"] == 3 and result.report["stopped_by"] == "steps"
