"""benchmarks/targeted_recompute.py: item blocks recomputed in full on top of a reuse policy."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "targeted_recompute.py"
_spec = importlib.util.spec_from_file_location("targeted_recompute", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_recomputing_every_item_block_gives_the_plain_prefill(tiny_models):
    """The check that the variants recompute what they say: with every item block fresh, the
    policy's prompt is a plain prefill (system and history blocks are exact where they are)."""
    rows = bench.collect(str(tiny_models["llama"]), "synthetic", 3, 0, history=2, candidates=4, policy="none",
                         variants={"top2": 2, "all": 4, "oracle": None})  # fmt: skip
    assert len(rows) == 3
    for r in rows:
        assert r["all"] == pytest.approx(r["full"], abs=1e-4)
        assert r["policy"] != pytest.approx(r["full"], abs=1e-4)  # cached blocks never saw the history
        shares = r["recomputed"]
        assert shares["policy"] < shares["top2"] < shares["all"] <= 1.0
        assert shares["oracle"] <= shares["top2"] + 1e-9  # two blocks at most
    assert 0 <= rows[0]["positive"] < 4


def _row(full, policy, top2, positive=0):
    return {"positive": positive, "full": full, "policy": policy, "top2": top2,
            "recomputed": {"policy": 0.1, "top2": 0.2}}  # fmt: skip


def test_analyse_measures_agreement_and_the_escalation_by_margin():
    # request 1: policy's top choice wrong by a near-tie, fixed by the top-2 recompute
    # request 2: a clear top choice, right either way; request 3: wrong by a wide margin, top 2 wrong too
    rows = [_row([0.0, 1.0, -1.0], [1.0, 0.98, -1.0], [0.5, 1.0, -1.0], positive=1),
            _row([2.0, 0.0, -1.0], [2.0, 0.0, -1.0], [2.0, 0.0, -1.0]),
            _row([0.0, 1.0, -1.0], [3.0, 0.0, -1.0], [3.0, 0.0, -1.0])]
    result = bench.analyse(rows)
    v = result["variants"]
    assert v["policy"]["top1"] == pytest.approx(1 / 3) and v["top2"]["top1"] == pytest.approx(2 / 3)
    assert v["policy"]["recomputed"] == pytest.approx(0.1) and result["k"] == 3
    by_margin = {e["margin"]: e for e in result["escalation"]}
    assert by_margin[0.05]["escalated"] == pytest.approx(1 / 3) and by_margin[0.05]["top1"] == pytest.approx(2 / 3)
    assert by_margin[1.0]["escalated"] == pytest.approx(1 / 3)  # the wide-margin miss is never escalated
    with pytest.raises(ValueError):
        bench.analyse([])


def test_the_script_reads_rows_written_before_and_refuses_other_files(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({"rows": [_row([0.0, 1.0], [1.0, 0.9], [0.0, 1.0])] * 4}))
    done = subprocess.run([sys.executable, str(SCRIPT), "--from-rows", str(rows)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "4 requests" in done.stdout and "top2" in done.stdout and "margin < 0.2" in done.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fit": []}))
    done = subprocess.run([sys.executable, str(SCRIPT), "--from-rows", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "not written by --rows" in done.stderr
