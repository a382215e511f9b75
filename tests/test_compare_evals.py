"""benchmarks/compare_evals.py: side-by-side policies of several eval JSON files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_evals.py"


def _summary(hr1: float, mrr: float, top1: float | None = None, tau: float | None = None) -> dict:
    s = {"hr@1": hr1, "hr@5": 0.9, "hr@10": 1.0, "ndcg@10": 0.5, "mrr": mrr}
    if top1 is not None:
        s["fidelity"] = {"top1_agree": top1, "kendall_tau": tau, "kl": 0.1, "hr@10_delta": 0.0}
    return s


def _result(model: str, none_hr1: float, none_top1: float, **overrides) -> dict:
    return {
        "dataset": "synthetic", "model": model, "device": "cpu", "n_users": 60, "n_requests": 60, "candidates": 8,
        "seed": 0, "calibration": "contextual",
        "systems": {"full": _summary(0.5, 0.66), "rcllm:none": _summary(none_hr1, 0.4, none_top1, 0.3)},
        "baselines": {"random": _summary(0.125, 0.34), "popularity": _summary(0.1, 0.31)},
        **overrides,
    }  # fmt: skip


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_rows_show_each_files_figures_and_the_change_against_full(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result("/m/off", 0.117, 0.13)))
    b.write_text(json.dumps(_result("/m/mix", 0.45, 0.83)))
    out = _run(a, b, "--labels", "off,mix")
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "rcllm:none" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells == ["rcllm:none", "0.117", "0.400", "0.13", "0.30", "-0.383", "0.450", "0.400", "0.83", "0.30", "-0.050"]
    assert "HR@1" in out.stdout and "off" in out.stdout and "mix" in out.stdout


def test_files_from_different_streams_are_refused(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result("/m/off", 0.1, 0.1)))
    b.write_text(json.dumps(_result("/m/mix", 0.4, 0.8, candidates=20)))
    out = _run(a, b)
    assert out.returncode != 0 and "candidates" in out.stderr
