"""The Triton kernels against their torch references, and the dispatch between the two.

On a CUDA machine the kernels run compiled on the GPU. Elsewhere they run under Triton's CPU
interpreter (TRITON_INTERPRET=1, set by conftest.py before triton is imported), so CI checks
their logic without a GPU; the interpreter's own numerics differ in one place (it rounds
float32 -> bfloat16 toward zero, the GPU to nearest), which the bf16 tolerances allow for.
Without Triton installed these tests skip. The max errors are printed at the end of the run.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

from rcllm import kernels
from rcllm.kernels import kv
from rcllm.kernels.compare import compare_kernels, inv_freq_for

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Absolute tolerances for unit-normal inputs (|x| < 8 here). place_blocks: one ulp of the dtype
# at |x| in [4, 8) (a fused multiply-add on the GPU, truncation in the interpreter); attention:
# about one ulp of its outputs (|o| < 2) plus the rounding of the softmax weights to the dtype.
TOLERANCE = {
    torch.float32: {"place_blocks K": 2e-6, "selective_attention": 1e-5},
    torch.float16: {"place_blocks K": 4e-3, "selective_attention": 2e-3},
    torch.bfloat16: {"place_blocks K": 3.2e-2, "selective_attention": 1.6e-2},
}

_max_errors: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def triton_modules(request):
    """(triton_kv, triton_attention): compiled for CUDA, else run by the interpreter (conftest.py
    sets TRITON_INTERPRET=1 on machines without CUDA, before anything imports triton)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install -e '.[gpu]')")
    if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA, and TRITON_INTERPRET=1 was not set before triton was imported")
    from rcllm.kernels import triton_attention, triton_kv

    request.addfinalizer(lambda: _report(request.config))
    return triton_kv, triton_attention


def _report(config) -> None:
    """Print the max errors under the test results (outside pytest's output capture)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not _max_errors:
        return
    where = torch.cuda.get_device_name() if ON_CUDA else "CPU, Triton interpreter"
    dtypes = sorted({d for d, _ in _max_errors})
    lines = ["", f"Triton vs torch reference, max |error| over all shapes ({where}):"]
    lines.append(f"  {'kernel':22}" + "".join(f"{d:>12}" for d in dtypes))
    for k in sorted({k for _, k in _max_errors}):
        lines.append(f"  {k:22}" + "".join(f"{_max_errors.get((d, k), float('nan')):12.3g}" for d in dtypes))
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


def _record(dtype: torch.dtype, errors: dict[str, float]) -> None:
    name = str(dtype).removeprefix("torch.")
    for kernel, err in errors.items():
        _max_errors[(name, kernel)] = max(err, _max_errors.get((name, kernel), 0.0))


# ---------------------------------------------------------------------------------------------
# each kernel against its reference


@pytest.mark.parametrize("layout", ("half", "interleaved"))
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("heads,kv_heads", ((9, 3), (32, 8)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_triton_kernels_match_torch_references(triton_modules, dtype, heads, kv_heads, head_dim, layout):
    """Blocks of 1, 31, 32, 33 and 7 tokens (around the 32-token tiles), moved by -5..4000
    positions; 13 queries at unsorted positions over an odd-length context."""
    errors = compare_kernels(
        *triton_modules, DEVICE, dtype, heads=heads, kv_heads=kv_heads, head_dim=head_dim, layout=layout
    )
    _record(dtype, errors)
    tol = TOLERANCE[dtype]
    assert errors["place_blocks K"] <= tol["place_blocks K"], errors
    assert errors["place_blocks V"] == 0.0, errors  # a copy
    assert errors["scatter_kv"] == 0.0, errors  # a copy
    assert errors["selective_attention"] <= tol["selective_attention"], errors


def test_triton_place_blocks_leaves_the_rest_of_the_context_alone(triton_modules):
    triton_kv = triton_modules[0]
    layers, kv_heads, length, d = 2, 3, 50, 64
    g = torch.Generator().manual_seed(1)
    dst = [torch.full((layers, kv_heads, length, d), 7.25, device=DEVICE) for _ in range(2)]
    sizes, starts = [5, 33], [2, 16]
    keys = [torch.randn(layers, kv_heads, n, d, generator=g).to(DEVICE) for n in sizes]
    values = [torch.randn(layers, kv_heads, n, d, generator=g).to(DEVICE) for n in sizes]
    triton_kv.place_blocks(*dst, keys, values, starts, [3, -1], inv_freq_for(d).to(DEVICE))
    covered = torch.zeros(length, dtype=torch.bool)
    for s, n in zip(starts, sizes):
        covered[s : s + n] = True
    assert torch.all(dst[0][:, :, ~covered] == 7.25) and torch.all(dst[1][:, :, ~covered] == 7.25)
    assert torch.equal(dst[1][:, :, 16:49], values[1])


@pytest.mark.parametrize("src,dst", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_triton_place_blocks_converts_dtype_like_the_reference(triton_modules, src, dst):
    """Keys are re-rotated in float32, rounded to the block's dtype, then to the context's."""
    triton_kv = triton_modules[0]
    g = torch.Generator().manual_seed(2)
    d = 64
    k, v = (torch.randn(2, 3, 9, d, generator=g).to(DEVICE, src) for _ in range(2))
    inv_freq = inv_freq_for(d).to(DEVICE)
    want = [torch.zeros(2, 3, 20, d, device=DEVICE, dtype=dst) for _ in range(2)]
    got = [t.clone() for t in want]
    kv.place_blocks(*want, [k], [v], [4], [123], inv_freq)
    triton_kv.place_blocks(*got, [k], [v], [4], [123], inv_freq)
    assert float((got[0].float() - want[0].float()).abs().max()) <= TOLERANCE[torch.bfloat16]["place_blocks K"]
    assert float((got[1].float() - want[1].float()).abs().max()) <= TOLERANCE[torch.bfloat16]["place_blocks K"]


def test_triton_place_blocks_raises_the_references_errors(triton_modules):
    triton_kv = triton_modules[0]
    dst = [torch.zeros(2, 2, 12, 8, device=DEVICE) for _ in range(2)]
    k = torch.randn(2, 2, 5, 8, device=DEVICE)
    inv_freq = inv_freq_for(8).to(DEVICE)
    with pytest.raises(ValueError, match="overruns"):
        triton_kv.place_blocks(*dst, [k], [k], [8], [0], inv_freq)
    with pytest.raises(ValueError, match="does not fit"):
        triton_kv.place_blocks(*dst, [k], [k[:, :1]], [0], [0], inv_freq)
    with pytest.raises(ValueError, match="same length"):
        triton_kv.place_blocks(*dst, [k], [k], [0, 4], [0], inv_freq)
    with pytest.raises(ValueError, match="layout"):
        triton_kv.place_blocks(*dst, [k], [k], [0], [0], inv_freq, "neox")


def test_triton_selective_attention_sees_only_earlier_positions(triton_modules):
    """Changing K/V after a query's position leaves its output unchanged (causal by position)."""
    triton_attention = triton_modules[1]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(6, 3, 64, generator=g).to(DEVICE)
    k, v = (torch.randn(2, 150, 64, generator=g).to(DEVICE) for _ in range(2))
    pos = torch.tensor([70, 5, 149], device=DEVICE)
    before = triton_attention.selective_attention(q, k, v, pos, 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[:, 71:], v2[:, 71:] = 100.0, -100.0
    after = triton_attention.selective_attention(q, k2, v2, pos, 0.125)
    assert torch.equal(before[:, :2], after[:, :2])
    assert not torch.allclose(before[:, 2], after[:, 2])


# ---------------------------------------------------------------------------------------------
# the engine through the Triton kernels


def _tiny_engine():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rcllm.engine.forward import BlockEngine
    from rcllm.engine.models import wrap_model

    config = LlamaConfig(
        vocab_size=256, hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=512, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(DEVICE)
    return BlockEngine(wrap_model(model, name="tiny-llama"))


@pytest.mark.parametrize("policy", ("none", "boundary:2", "deviation:0.3", "full"))
def test_engine_through_triton_kernels_matches_engine_through_references(triton_modules, monkeypatch, policy):
    from rcllm.engine.blocks import Segment

    engine = _tiny_engine()
    g = torch.Generator().manual_seed(4)
    system = torch.randint(0, 256, (5,), generator=g)
    blocks = [engine.compute_block(torch.randint(0, 256, (n,), generator=g), system) for n in (9, 33, 4)]
    segments = [Segment.fresh(system, "system")]
    for i, block in enumerate(blocks):
        segments += [Segment.fresh(torch.tensor([10 + i, 11]), f"label{i}"), Segment.cached(block, f"item{i}")]
    segments.append(Segment.fresh(torch.randint(0, 256, (6,), generator=g), "instruction"))

    monkeypatch.setenv("RCLLM_KERNELS", "torch")
    want = engine.forward(segments, policy, return_kv=True)
    monkeypatch.setattr(kernels, "triton_kernels", lambda tensor: triton_modules)
    got = engine.forward(segments, policy, return_kv=True)
    assert got.recomputed_tokens == want.recomputed_tokens
    assert float((got.logits - want.logits).abs().max()) <= 1e-4
    assert float((got.keys - want.keys).abs().max()) <= 1e-5
    assert float((got.values - want.values).abs().max()) <= 1e-5


# ---------------------------------------------------------------------------------------------
# dispatch


def test_dispatch_keeps_cpu_tensors_on_the_torch_references(monkeypatch):
    def no_triton():
        raise AssertionError("the Triton kernels were consulted for a CPU tensor")

    monkeypatch.setattr(kernels, "_triton_modules", no_triton)
    assert kernels.triton_kernels(torch.zeros(1)) is None
    dst = [torch.zeros(2, 10, 8) for _ in range(2)]
    k = torch.randn(2, 3, 8)
    kernels.place_blocks(*dst, [k], [k], [1], [2], inv_freq_for(8))
    want = [torch.zeros(2, 10, 8) for _ in range(2)]
    kv.place_blocks(*want, [k], [k], [1], [2], inv_freq_for(8))
    assert torch.equal(dst[0], want[0]) and torch.equal(dst[1], want[1])
    kernels.scatter_kv(*dst, k, k, torch.tensor([0, 5, 9]))
    out = kernels.selective_attention(torch.randn(4, 3, 8), dst[0], dst[1], torch.tensor([0, 5, 9]), 0.3)
    assert out.shape == (4, 3, 8)


def test_dispatch_sends_cuda_tensors_to_triton_unless_forced_to_torch(monkeypatch):
    cuda_like = SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.delenv("RCLLM_KERNELS", raising=False)
    fast = kernels.triton_kernels(cuda_like)
    if HAS_TRITON:
        assert [m.__name__ for m in fast] == ["rcllm.kernels.triton_kv", "rcllm.kernels.triton_attention"]
    else:
        assert fast is None
    monkeypatch.setenv("RCLLM_KERNELS", "torch")
    assert kernels.triton_kernels(cuda_like) is None
