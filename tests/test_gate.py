"""The gate's decisions on plain data: the Pareto front, the choice of the cheapest policy that
meets the thresholds, and the model's policy file (read, written, refused). No model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rcllm.engine.model_policy import (
    FALLBACK_POLICY,
    POLICY_FILE,
    default_policy,
    gated_label_offsets,
    model_folder,
    read_policy_file,
    write_policy_file,
)
from rcllm.engine.models import embedded_dir
from rcllm.eval.check import FrontierRow, Thresholds, choose_policy, gate_failures, mark_front, pareto_front
from rcllm.eval.gate import fit_label_offsets
from rcllm.eval.runner import default_systems

DEFAULT = Thresholds()  # |dHR| <= 0.01, top-1 agreement >= 0.9


def row(
    policy: str, top1: float, share: float, d1: float = 0.0, d10: float = 0.0, ms: float = 10.0, kl: float | None = None
) -> FrontierRow:
    return FrontierRow(
        policy=policy, hr_at_1=0.5 + d1, hr_at_10=0.8 + d10, hr_at_1_delta=d1, hr_at_10_delta=d10, top1_agree=top1,
        kendall_tau=top1, kl=1.0 - top1 if kl is None else kl, recomputed_fraction=share, prefill_ms=ms,
        speedup=100.0 / ms,
    )


FULL = row("full", 1.0, 1.0, ms=100.0)


# --- the Pareto front ---------------------------------------------------------------------------


def test_pareto_front_keeps_the_points_nothing_beats_on_every_coordinate():
    points = [(1.0, -1.0), (0.9, -0.3), (0.95, -0.3), (0.5, -0.05), (0.5, -0.1), (0.95, -0.3)]
    # (0.9, -0.3) loses to (0.95, -0.3); (0.5, -0.1) to (0.5, -0.05); equal points don't dominate each other
    assert pareto_front(points) == [True, False, True, True, False, True]


def test_front_weighs_fidelity_against_recomputed_share_not_noisy_time():
    rows = [row("none", 0.6, 0.05, ms=5), row("boundary:2", 0.6, 0.10, ms=4), row("deviation:0.5", 0.95, 0.4), FULL]
    mark_front(rows, "hr@10")
    # boundary:2 is faster this run but recomputes more for no more fidelity: off the front
    assert [r.pareto for r in rows] == [True, False, True, True]


def test_front_counts_kl_as_fidelity_beside_top1_agreement():
    rows = [row("none", 1.0, 0.2, kl=0.01), row("boundary:1", 1.0, 0.25, kl=0.01), row("boundary:4", 1.0, 0.35, kl=0.0),
            row("full", 1.0, 1.0, kl=0.0)]
    mark_front(rows, "hr@10")
    assert [r.pareto for r in rows] == [True, False, True, False]  # full: as faithful as boundary:4, dearer


def test_front_counts_the_change_of_the_headline_hit_rate_as_fidelity():
    rows = [row("a", 0.95, 0.1, d10=-0.05), row("b", 0.95, 0.2, d10=0.0), FULL]
    mark_front(rows, "hr@10")
    assert [r.pareto for r in rows] == [True, True, True]  # b costs more but keeps HR@10
    mark_front(rows, "hr@1")  # both keep HR@1: b is the same fidelity for more work
    assert [r.pareto for r in rows] == [True, False, True]


# --- the choice ---------------------------------------------------------------------------------


def test_gate_chooses_the_cheapest_policy_that_meets_both_thresholds():
    rows = [
        row("none", 0.60, 0.05, d10=-0.10),  # unfaithful
        row("boundary:2", 0.95, 0.10, d10=-0.02),  # agrees, but moves HR@10 by more than 0.01
        row("boundary:4", 0.92, 0.15, d10=0.01),  # meets both, at the limits
        row("deviation:0.5", 1.0, 0.40),  # meets both, dearer
        FULL,
    ]
    choice = choose_policy(rows, DEFAULT, "hr@10")
    assert choice.chosen.policy == "boundary:4" and choice.closest is None


def test_gate_thresholds_are_inclusive_and_the_headline_picks_the_hit_rate():
    assert gate_failures(row("p", 0.9, 0.1, d10=-0.01), DEFAULT, "hr@10") == []
    assert gate_failures(row("p", 0.8999, 0.1), DEFAULT, "hr@10") == ["top-1 agreement 0.900 < 0.9"]
    moved_10 = row("p", 1.0, 0.1, d1=0.0, d10=0.2)
    assert gate_failures(moved_10, DEFAULT, "hr@10") == ["|dHR@10| 0.200 > 0.01"]
    assert gate_failures(moved_10, DEFAULT, "hr@1") == []  # C <= 10: HR@10 is 1 for every ranking
    assert gate_failures(row("p", 1.0, 0.1, d1=-0.05), DEFAULT, "hr@1") == ["|dHR@1| 0.050 > 0.01"]
    # a change of exactly the threshold, as two hit rates over 100 requests subtract in floats
    assert abs(0.63 - 0.64) > 0.01 and abs(0.62 - 0.64) > 0.02
    assert gate_failures(row("p", 0.93, 0.1, d1=0.63 - 0.64), DEFAULT, "hr@1") == []
    assert gate_failures(row("p", 0.94, 0.1, d1=0.62 - 0.64), Thresholds(max_hr_delta=0.02), "hr@1") == []
    assert gate_failures(row("p", 0.94, 0.1, d1=0.61 - 0.64), Thresholds(max_hr_delta=0.02), "hr@1") == [
        "|dHR@1| 0.030 > 0.02"
    ]
    assert gate_failures(row("p", 0.7 + 0.2, 0.1), DEFAULT, "hr@1") == []  # 0.8999999999999999
    looser = Thresholds(max_hr_delta=0.1, min_top1=0.5)
    assert gate_failures(row("p", 0.6, 0.1, d10=-0.05), looser, "hr@10") == []


def test_full_is_never_the_choice_and_the_closest_miss_is_named():
    rows = [row("none", 0.5, 0.05, d10=-0.2), row("deviation:0.5", 0.85, 0.4, d10=-0.02), FULL]
    choice = choose_policy(rows, DEFAULT, "hr@10")
    assert choice.chosen is None
    assert choice.closest.policy == "deviation:0.5"
    assert choice.shortfall == ["|dHR@10| 0.020 > 0.01", "top-1 agreement 0.850 < 0.9"]
    assert choose_policy([FULL], DEFAULT, "hr@10").chosen is None


def test_equally_cheap_policies_are_decided_by_fidelity_then_time():
    rows = [row("boundary:8", 0.92, 0.2, ms=9), row("boundary:16", 0.97, 0.2, ms=12), FULL]
    assert choose_policy(rows, DEFAULT, "hr@10").chosen.policy == "boundary:16"
    rows = [row("boundary:8", 0.97, 0.2, ms=12), row("boundary:16", 0.97, 0.2, ms=9), FULL]
    assert choose_policy(rows, DEFAULT, "hr@10").chosen.policy == "boundary:16"


rows_strategy = st.lists(
    st.tuples(st.sampled_from([0.5, 0.8, 0.9, 0.95, 1.0]), st.sampled_from([0.05, 0.1, 0.2, 0.5]),
              st.sampled_from([-0.05, -0.01, 0.0, 0.01]), st.sampled_from([0.0, 0.01, 0.1]), st.floats(1, 100)),
    min_size=1, max_size=8,
)


@given(rows_strategy)
def test_the_chosen_policy_is_on_the_front_and_nothing_cheaper_passes(points):
    rows = [row(f"p{i}", top1, share, d10=d, kl=kl, ms=ms) for i, (top1, share, d, kl, ms) in enumerate(points)]
    rows.append(FULL)
    mark_front(rows, "hr@10")
    choice = choose_policy(rows, DEFAULT, "hr@10")
    passing = [r for r in rows[:-1] if not gate_failures(r, DEFAULT, "hr@10")]
    assert (choice.chosen is None) == (not passing)
    if choice.chosen is not None:
        assert choice.chosen.pareto
        assert all(r.recomputed_fraction >= choice.chosen.recomputed_fraction for r in passing)
    else:
        assert choice.closest in rows[:-1] and choice.shortfall


# --- the model's policy file --------------------------------------------------------------------


def record(policy: str = "boundary:4", fingerprint: str = "f" * 64) -> dict:
    return {
        "policy": policy, "fingerprint": fingerprint, "dataset": "synthetic", "requests": 40,
        "date": "2026-12-03T04:00:00+00:00", "thresholds": {"max_hr_delta": 0.01, "min_top1": 0.9},
        "frontier": [],
    }


def test_a_model_without_a_policy_file_gets_the_fallback_and_is_told_why(tmp_path):
    chosen = default_policy(tmp_path)
    assert chosen.policy == FALLBACK_POLICY == "boundary:2" and not chosen.gated
    assert f"no {POLICY_FILE} in {tmp_path.resolve()}" in chosen.reason and "rcllm check --sweep" in chosen.reason
    hub = default_policy("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert hub.policy == FALLBACK_POLICY and "not a local folder" in hub.reason


def test_the_policy_file_is_the_models_default_and_only_for_its_weights(tmp_path):
    path = write_policy_file(tmp_path, record("deviation:0.3", fingerprint="a" * 64))
    assert path == tmp_path / POLICY_FILE
    assert read_policy_file(path)["policy"] == "deviation:0.3"
    chosen = default_policy(tmp_path, fingerprint="a" * 64)
    assert chosen.policy == "deviation:0.3" and chosen.gated
    assert "synthetic, 40 requests, 2026-12-03" in chosen.reason and str(path) in chosen.reason
    assert default_policy(str(tmp_path)).policy == "deviation:0.3"  # no fingerprint at hand: the file is trusted
    other = default_policy(tmp_path, fingerprint="b" * 64)
    assert other.policy == FALLBACK_POLICY and not other.gated and "other weights" in other.reason


def test_writing_replaces_the_file_whole_and_leaves_no_temporary_behind(tmp_path):
    write_policy_file(tmp_path, record("none"))
    write_policy_file(tmp_path, record("boundary:8"))
    assert os.listdir(tmp_path) == [POLICY_FILE]
    assert json.loads((tmp_path / POLICY_FILE).read_text())["policy"] == "boundary:8"
    with pytest.raises(ValueError, match="needs frontier"):
        write_policy_file(tmp_path, {k: v for k, v in record().items() if k != "frontier"})
    with pytest.raises(ValueError, match="unknown correction policy"):
        write_policy_file(tmp_path, record("magic"))
    assert json.loads((tmp_path / POLICY_FILE).read_text())["policy"] == "boundary:8"


def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path):
    write_policy_file(tmp_path, record("boundary:4"))
    before = (tmp_path / POLICY_FILE).read_bytes()
    broken = {**record("none"), "frontier": [{"policy": "none", "measured": object()}]}  # json.dump fails inside
    with pytest.raises(TypeError):
        write_policy_file(tmp_path, broken)
    assert (tmp_path / POLICY_FILE).read_bytes() == before and os.listdir(tmp_path) == [POLICY_FILE]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable policy file"),
    ("[1, 2]", "a JSON object expected"),
    (json.dumps({"policy": "none"}), "missing fingerprint"),
    (json.dumps(record("boundary:x")), "unknown correction policy"),
])
def test_a_broken_policy_file_is_an_error_that_names_it(tmp_path, content, message):
    (tmp_path / POLICY_FILE).write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        default_policy(tmp_path)
    assert str(tmp_path / POLICY_FILE) in str(e.value) and "rcllm check --sweep" in str(e.value)


def test_model_folder_finds_the_embedded_models_converted_folder_without_converting(tmp_path, monkeypatch):
    monkeypatch.setenv("RCLLM_CACHE_DIR", str(tmp_path / "cache"))
    assert model_folder("smollm2-135m") == embedded_dir("smollm2-135m") == tmp_path / "cache" / "models" / "smollm2-135m"
    assert not (tmp_path / "cache").exists()
    assert model_folder(tmp_path) == tmp_path.resolve()
    assert model_folder("org/some-model") is None and model_folder(tmp_path / "missing") is None


def test_eval_compares_the_models_policy_with_cheaper_ones_by_default():
    assert default_systems("boundary:4") == "full,prefix,rcllm:boundary:4,rcllm:deviation:0.15,rcllm:none"
    assert default_systems("none") == "full,prefix,rcllm:none,rcllm:deviation:0.15"
    with pytest.raises(ValueError, match="unknown correction policy"):
        default_systems("fast")


# --- label offsets ------------------------------------------------------------------------------


def test_fitted_label_offsets_undo_a_policys_position_bias():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(400, 6, generator=g) * 0.3  # near-ties: a small bias moves the top choice
    bias = torch.tensor([0.4, 0.2, 0.0, -0.1, -0.2, -0.3])
    scores = target + bias + torch.randn(400, 6, generator=g) * 0.02
    offsets = fit_label_offsets(target, scores)
    assert torch.allclose(offsets, -(bias - bias.mean()), atol=0.03) and abs(float(offsets.sum())) < 1e-5
    before = (target.argmax(-1) == scores.argmax(-1)).float().mean()
    after = (target.argmax(-1) == (scores + offsets).argmax(-1)).float().mean()
    assert before < 0.6 and after > 0.9
    assert fit_label_offsets(target, target).abs().max() < 0.01  # no bias: nothing to undo
    with pytest.raises(ValueError, match="equal shape"):
        fit_label_offsets(target, scores[:, :5])


def offsets_record(policies: dict, candidates: int = 3, calibration: str = "contextual",
                   decides: str | None = "first place") -> dict:
    fitted = {"requests": 30, "candidates": candidates, "policies": policies}
    if decides is not None:
        fitted["decides"] = decides
    return {**record("tail:2", fingerprint="a" * 64), "calibration": calibration, "label_offsets": fitted}


def test_label_offsets_are_served_only_for_the_weights_and_correction_they_were_fitted_on(tmp_path):
    write_policy_file(tmp_path, offsets_record({"tail:2": [0.1, 0.0, -0.1], "boundary:02": [0, 0, 0]}))
    assert "40 requests, with label offsets fitted on 30 other requests" in default_policy(tmp_path).reason
    fitted = gated_label_offsets(tmp_path, "a" * 64, "contextual")
    assert fitted == {"tail:2": [0.1, 0.0, -0.1], "boundary:2": [0.0, 0.0, 0.0]}  # names made canonical
    assert gated_label_offsets(tmp_path, "b" * 64, "contextual") == {}  # other weights
    assert gated_label_offsets(tmp_path, "a" * 64, "none") == {}  # fitted on another correction
    write_policy_file(tmp_path, record("tail:2", fingerprint="a" * 64))
    assert gated_label_offsets(tmp_path, "a" * 64, "contextual") == {}  # a gate without offsets
    assert gated_label_offsets(tmp_path / "missing", "a" * 64, "contextual") == {}


def test_offsets_an_older_rcllm_fitted_to_shift_every_score_are_not_served(tmp_path):
    older = offsets_record({"tail:2": [0.1, 0.0, -0.1]}, decides=None)  # no "decides": gated as a shift of all
    (tmp_path / POLICY_FILE).write_text(json.dumps(older))
    assert gated_label_offsets(tmp_path, "a" * 64, "contextual") == {}
    reason = default_policy(tmp_path).reason
    assert "label offsets not served" in reason and "--fit-offsets" in reason
    assert default_policy(tmp_path).policy == "tail:2"  # the gated policy itself still serves


@pytest.mark.parametrize("policies, candidates, message", [
    ({"tail:2": [0.1, 0.0]}, 3, "3 finite numbers"),
    ({"tail:2": [0.1, float("nan"), 0.0]}, 3, "3 finite numbers"),
    ({"tail:2": [0.1, True, 0.0]}, 3, "3 finite numbers"),
    ({"full": [0.0, 0.0, 0.0]}, 3, "never offset"),
    ({"magic": [0.0, 0.0, 0.0]}, 3, "unknown policy"),
    ({"tail:2": [0.0, 0.0, 0.0]}, None, "the prompt size they were fitted for"),
    ({"tail:2": [0.0, 0.0, 0.0]}, 3, "what they decide"),
])
def test_broken_label_offsets_are_refused_when_written_and_when_read(tmp_path, policies, candidates, message):
    broken = offsets_record(policies, candidates, decides="every score" if message == "what they decide" else
                            "first place")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        write_policy_file(tmp_path, broken)
    assert not (tmp_path / POLICY_FILE).exists()
    (tmp_path / POLICY_FILE).write_text(json.dumps(broken))  # edited by hand
    with pytest.raises(ValueError, match=message) as e:
        gated_label_offsets(tmp_path, "a" * 64, "contextual")
    assert str(tmp_path / POLICY_FILE) in str(e.value) and "--fit-offsets" in str(e.value)
