"""benchmarks/frontier.py: two sweeps of rcllm check side by side, as a table and a plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py"


def _row(policy: str, top1: float, share: float, speedup: float, pareto: bool, hr1: float = 0.6) -> dict:
    return {"policy": policy, "hr_at_1": hr1, "hr_at_10": 1.0, "hr_at_1_delta": hr1 - 0.6, "hr_at_10_delta": 0.0,
            "top1_agree": top1, "kendall_tau": top1, "kl": 1 - top1, "recomputed_fraction": share,
            "prefill_ms": 10 / speedup, "speedup": speedup, "pareto": pareto}  # fmt: skip


def _sweep(path: Path, chosen: str | None, none_top1: float) -> Path:
    rows = [_row("full", 1.0, 1.0, 1.0, True), _row("none", none_top1, 0.08, 5.0, True, hr1=0.2),
            _row("boundary:2", 0.3, 0.2, 4.0, False)]  # fmt: skip
    path.write_text(json.dumps({"model": path.stem, "dataset": "synthetic", "requests": 40, "candidates": 5,
                                "headline": "hr@1", "chosen": chosen, "refusal": None if chosen else "no policy passed",
                                "frontier": rows}))  # fmt: skip
    return path


def test_frontier_prints_both_sweeps_and_plots_them(tmp_path):
    before = _sweep(tmp_path / "before.json", None, 0.17)
    after = _sweep(tmp_path / "after.json", "none", 0.93)
    out = tmp_path / "frontier.png"
    done = subprocess.run([sys.executable, str(SCRIPT), str(before), str(after), "--labels", "causal,reuse",
                           "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "gate: refused (no policy passed)" in text and "gate: none" in text
    none_lines = [line for line in text.splitlines() if line.startswith("none ")]
    assert len(none_lines) == 2 and "0.17" in none_lines[0] and "0.93" in none_lines[1]
    assert "5.0x  *" in none_lines[0] and "-0.400" in none_lines[0]
    assert out.stat().st_size > 5000


def test_frontier_refuses_files_that_are_not_sweeps(tmp_path):
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps({"systems": {}}))
    done = subprocess.run([sys.executable, str(SCRIPT), str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "not the output of rcllm check --sweep" in done.stderr
