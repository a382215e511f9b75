"""benchmarks/gpu_ttft.py runs end to end (--smoke: tiny dims, on CPU here) and prints its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_ttft.py"


def test_gpu_ttft_smoke_prints_every_system_and_the_kernel_errors():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for name in ("tiny-llama", "tiny-qwen2"):
        assert name in text
    for system in (
        "full prefill (transformers)", "engine full", "prefix cache", "rcllm:none", "rcllm:boundary:2",
        "rcllm:boundary:4", "rcllm:deviation:0.15", "weight-read floor",
    ):
        assert system in text, system
    assert "vs full" in text and "TTFT ms" in text
    # the Triton error table, or the line saying why there is none
    assert "selective_attention" in text or "triton is not installed" in text
