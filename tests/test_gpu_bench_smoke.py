"""benchmarks/gpu_ttft.py runs end to end (--smoke: tiny dims, on CPU here) and prints its tables."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
from test_triton_kernels import TOLERANCE

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_ttft.py"
HAS_TRITON = importlib.util.find_spec("triton") is not None
MODELS = ("tiny-llama", "tiny-qwen2")
DTYPES = ("bfloat16", "float16", "float32")


def test_gpu_ttft_smoke_prints_every_system_and_the_kernel_errors():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for name in MODELS:
        assert name in text
    for system in (
        "full prefill (transformers)", "engine full", "prefix cache", "rcllm:none", "rcllm:boundary:2",
        "rcllm:boundary:4", "rcllm:deviation:0.15", "weight-read floor",
    ):
        assert system in text, system
    assert "vs full" in text and "TTFT ms" in text

    # Which of the two endings is printed is decided by this environment, not left open: with
    # Triton installed, one row of errors per model and dtype, each within the kernel tests' bounds.
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 6 and cells[0] in MODELS and cells[1] in DTYPES:
            rows[cells[0], cells[1]] = [float(c) for c in cells[2:]]
    if not HAS_TRITON:
        assert "triton is not installed: no kernel error check" in text
        assert rows == {} and "selective_attention" not in text
        return
    assert "triton is not installed" not in text
    assert "Triton kernels vs torch references" in text and "selective_attention" in text
    assert set(rows) == {(m, d) for m in MODELS for d in DTYPES}, text
    for (model, dtype), (place_k, place_v, scatter, attention) in rows.items():
        tol = TOLERANCE[getattr(torch, dtype)]
        what = f"{model} {dtype}: {place_k, place_v, scatter, attention}"
        assert place_v == 0.0 and scatter == 0.0, what  # copies
        assert place_k <= tol["place_blocks K"] and attention <= tol["selective_attention"], what
