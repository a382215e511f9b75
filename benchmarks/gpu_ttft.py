"""GPU time to first token: full prefill vs prefix cache vs rcllm, next to the weight-read floor.

    python benchmarks/gpu_ttft.py                 # one H100/H200; sized for < 4 min, not yet timed there
    python benchmarks/gpu_ttft.py --smoke         # tiny dims, any device (CI runs it on CPU)

Random-weight models with the dimensions of Llama-3-8B and Qwen2.5-0.5B (built from transformers
configs, nothing downloaded), bf16 on CUDA, batch 1. Prompts are block-structured like the
engine's: [system][history][item_1][label_1] ... [item_n][label_n][instruction], at L ~ 2048
with 20 candidates and L ~ 4096 with 100. Item and history blocks are computed after the system
prompt (as the cache builder does), then:

- ``full prefill``: the stock transformers forward (sdpa) of all L tokens, last logits only;
- ``engine full``: the block engine recomputing every token (its kernels, no reuse);
- ``prefix cache``: system and history cached where they were computed, the rest recomputed;
- ``rcllm:POLICY``: every block reused, with its blocks in the GPU tier (device memory) or in
  the CPU tier (pinned host memory, copied in by the placement of each request);
- ``rcllm:POLICY CUDA graph``: the same, its recompute pass replayed as a CUDA graph over static
  buffers (``rcllm.engine.graphs``; eager "static buffers" on CPU), with its logits' distance
  from the eager pass as a check;
- ``weight-read floor``: bytes of the weights / device memory read bandwidth (measured with a
  device-to-device copy): no forward that touches every weight once can be faster.

TTFT is the median of ``--runs`` runs after a warm-up, synchronized on the device; ``vs full``
is the full prefill's median divided by the system's. Then the Triton kernels' max error
against the torch references at each model's dims (``rcllm.kernels.compare``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import statistics
import sys
import time

import torch

MODELS = {
    "llama3-8b": dict(
        family="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=False,
    ),
    "qwen2.5-0.5b": dict(
        family="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, head_dim=64, intermediate_size=4864, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True,
    ),
}
SMOKE_MODELS = {
    "tiny-llama": dict(
        family="llama", vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, intermediate_size=256, rope_theta=500000.0,
        max_position_embeddings=1024, tie_word_embeddings=False,
    ),
    "tiny-qwen2": dict(
        family="qwen2", vocab_size=512, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, intermediate_size=192, rope_theta=1000000.0,
        max_position_embeddings=1024, tie_word_embeddings=True,
    ),
}
POLICIES = ("none", "boundary:2", "boundary:4", "deviation:0.15")
GRAPH_POLICIES = ("none", "boundary:2", "boundary:4")  # deviation narrows on the host mid-pass: no graph


@dataclasses.dataclass(frozen=True)
class Shape:
    """A prompt: ``candidates`` items of ``item`` tokens between the fixed segments."""

    candidates: int
    length: int  # target prompt length; the items fill what the other segments leave
    system: int = 32
    history: int = 256
    label: int = 1  # one fresh token per candidate, as the engine's prompts
    instruction: int = 32

    @property
    def item(self) -> int:
        fixed = self.system + self.history + self.instruction + self.candidates * self.label
        return max(1, (self.length - fixed) // self.candidates)


SHAPES = (Shape(20, 2048), Shape(100, 4096))
SMOKE_SHAPES = (Shape(4, 96, system=8, history=16, instruction=8), Shape(8, 160, system=8, history=16, instruction=8))


def build_model(dims: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """A random-weight causal LM of these dimensions, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rcllm.engine.models import wrap_model

    dims = dict(dims)
    family, theta = dims.pop("family"), dims.pop("rope_theta")
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    config = config_cls(**dims, rope_parameters={"rope_type": "default", "rope_theta": theta})
    rng_devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, dtype=dtype)
    # hashing every weight would read them all back to the host: name the random model instead
    config_hash = hashlib.sha256(config.to_json_string().encode()).hexdigest()[:16]
    return wrap_model(model, name=f"random-{family}", fingerprint=f"random-{family}-{config_hash}-s{seed}")


def build_prompt(engine, shape: Shape, vocab: int, seed: int):
    """(segments with every block cached on the device, the same blocks in a CPU tier)."""
    from rcllm.engine.blocks import Segment

    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=g)

    system = engine.compute_block(ids(shape.system))
    history = engine.compute_block(ids(shape.history), system)
    items = engine.compute_blocks([ids(shape.item) for _ in range(shape.candidates)], system)
    segments = [Segment.cached(system, "system"), Segment.cached(history, "history")]
    for i, item in enumerate(items):
        segments += [Segment.cached(item, f"item {i}"), Segment.fresh(ids(shape.label), f"label {i}")]
    segments.append(Segment.fresh(ids(shape.instruction), "instruction"))
    pin = engine.device.type == "cuda"

    def host(kv):
        keys, values = kv.keys.cpu(), kv.values.cpu()
        return dataclasses.replace(kv, keys=keys.pin_memory() if pin else keys, values=values.pin_memory() if pin else values)

    cpu_tier = [dataclasses.replace(s, kv=host(s.kv)) if s.kv is not None else s for s in segments]
    return segments, cpu_tier


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, runs: int) -> float:
    fn()  # warm-up: kernel compilation, allocator
    samples = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(samples)


def read_bandwidth(device: torch.device) -> float:
    """Bytes per second the device reads, from a device-to-device copy (read + write counted)."""
    nbytes = 1 << 30 if device.type == "cuda" else 1 << 26
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, 10)
    return 2 * nbytes / (ms / 1000.0)


def host_to_device_ms(segments, device: torch.device, runs: int) -> float:
    """Time to copy every cached block's KV from the CPU tier to the device, nothing else."""
    blocks = [t for s in segments if s.kv is not None for t in (s.kv.keys, s.kv.values)]
    return median_ms(lambda: [t.to(device, non_blocking=True) for t in blocks], device, runs)


def run_model(name: str, dims: dict, shapes, device, dtype, runs: int, seed: int) -> tuple[list[dict], dict]:
    from rcllm.engine.blocks import uncached
    from rcllm.engine.forward import BlockEngine
    from rcllm.engine.graphs import StaticRecompute

    lm = build_model(dims, device, dtype, seed)
    engine = BlockEngine(lm)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    floor_ms = weight_bytes / read_bandwidth(device) * 1000.0
    static = StaticRecompute(engine, max_length=max(shape.length for shape in shapes))
    static_name = "CUDA graph" if static.use_graphs else "static buffers"
    rows = []
    for shape in shapes:
        segments, cpu_tier = build_prompt(engine, shape, dims["vocab_size"], seed)
        plain = uncached(segments)
        prefix = segments[:2] + plain[2:]
        ids = torch.cat([s.token_ids for s in plain])[None].to(device)
        base = dict(model=name, length=ids.shape[1], candidates=shape.candidates)

        @torch.inference_mode()
        def stock():
            return lm.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float().cpu()

        full_ms = median_ms(stock, device, runs)
        stock_logits = stock()
        rows.append(dict(base, system="full prefill (transformers)", tier="", ms=full_ms, recomputed=1.0, full_ms=full_ms))
        engine_full = engine.forward(plain, "full")
        rows.append(dict(
            base, system="engine full", tier="", ms=median_ms(lambda: engine.forward(plain, "full"), device, runs),
            recomputed=1.0, full_ms=full_ms, dlogit=float((engine_full.logits - stock_logits).abs().max()),
        ))
        r = engine.forward(prefix, "none")
        rows.append(dict(
            base, system="prefix cache", tier="gpu", ms=median_ms(lambda: engine.forward(prefix, "none"), device, runs),
            recomputed=r.recomputed_fraction, full_ms=full_ms,
        ))
        for tier, segs in (("gpu", segments), ("cpu", cpu_tier)):
            for policy in POLICIES:
                r = engine.forward(segs, policy)
                ms = median_ms(lambda: engine.forward(segs, policy), device, runs)
                rows.append(dict(base, system=f"rcllm:{policy}", tier=tier, ms=ms, recomputed=r.recomputed_fraction, full_ms=full_ms))
            for policy in GRAPH_POLICIES:
                eager = engine.forward(segs, policy)
                ms = median_ms(lambda: static.forward(segs, policy), device, runs)
                rows.append(dict(
                    base, system=f"rcllm:{policy} {static_name}", tier=tier, ms=ms, recomputed=eager.recomputed_fraction,
                    full_ms=full_ms, dlogit_eager=float((static.forward(segs, policy).logits - eager.logits).abs().max()),
                ))
        if device.type == "cuda":
            rows.append(dict(
                base, system="CPU tier: host->device copy of all blocks", tier="cpu",
                ms=host_to_device_ms(cpu_tier, device, runs), full_ms=full_ms,
            ))
        rows.append(dict(base, system="weight-read floor", tier="", ms=floor_ms, full_ms=full_ms))
        del segments, cpu_tier, plain, prefix
    facts = dict(
        params=sum(p.numel() for p in lm.model.parameters()), weight_bytes=weight_bytes,
        layers=dims["num_hidden_layers"], hidden=dims["hidden_size"], heads=dims["num_attention_heads"],
        kv_heads=dims["num_key_value_heads"], head_dim=dims["head_dim"],
    )
    del static, engine, lm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, facts


def kernel_errors(models: dict, device: torch.device) -> list[tuple[str, str, dict[str, float]]]:
    """Triton-vs-reference max errors at each model's head counts and head dim, per dtype."""
    from rcllm.kernels import triton_attention, triton_kv
    from rcllm.kernels.compare import compare_kernels

    out = []
    for name, dims in models.items():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            errors = compare_kernels(
                triton_kv, triton_attention, device, dtype, heads=dims["num_attention_heads"],
                kv_heads=dims["num_key_value_heads"], head_dim=dims["head_dim"],
            )
            out.append((name, str(dtype).removeprefix("torch."), errors))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny dims and short prompts (runs on CPU in seconds)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per system (default 5; smoke 1)")
    ap.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.smoke:
        sys.exit("no CUDA device: this benchmark needs one GPU (or --smoke, to check that it runs)")
    have_triton = _have_triton()
    if args.smoke and not cuda and have_triton:
        # the kernels' error check then runs under Triton's CPU interpreter, which must be chosen
        # before any kernel is defined
        os.environ["TRITON_INTERPRET"] = "1"
    models = SMOKE_MODELS if args.smoke else MODELS
    if args.models:
        models = {k: MODELS[k] for k in args.models.split(",")}
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    runs = args.runs or (1 if args.smoke else 5)
    dtype = torch.bfloat16 if cuda else torch.float32

    from rich.console import Console
    from rich.table import Table

    from rcllm import kernels

    console = Console(highlight=False, width=160)  # wide enough for the tables when piped to a file
    card = torch.cuda.get_device_name(device) if cuda else "CPU (smoke run: no GPU figures)"
    backend = "Triton" if cuda and kernels.triton_kernels(torch.empty(0, device=device)) else "torch references"
    console.print(
        f"[bold]{card}[/bold]; torch {torch.__version__}; kernels: {backend}; {str(dtype).removeprefix('torch.')}, "
        f"batch 1, random weights; median of {runs} runs after a warm-up"
    )
    started = time.perf_counter()
    for name, dims in models.items():
        rows, facts = run_model(name, dims, shapes, device, dtype, runs, args.seed)
        table = Table(
            title=f"{name}: {facts['layers']} layers, hidden {facts['hidden']}, {facts['heads']}/{facts['kv_heads']} heads, "
            f"head_dim {facts['head_dim']}, {facts['params'] / 1e9:.2f}B params ({facts['weight_bytes'] / 2**30:.1f} GiB)",
            title_justify="left",
        )
        for col, justify in (("L", "right"), ("cands", "right"), ("system", "left"), ("tier", "left"),
                             ("recomputed", "right"), ("TTFT ms", "right"), ("vs full", "right")):
            table.add_column(col, justify=justify)
        for row in rows:
            recomputed = f"{row['recomputed']:.0%}" if "recomputed" in row else ""
            note = f" (max|dlogit| vs transformers {row['dlogit']:.2g})" if "dlogit" in row else ""
            note += f" (max|dlogit| vs eager {row['dlogit_eager']:.2g})" if "dlogit_eager" in row else ""
            table.add_row(
                str(row["length"]), str(row["candidates"]), row["system"] + note, row["tier"], recomputed,
                f"{row['ms']:.2f}", f"{row['full_ms'] / row['ms']:.2f}x",
            )
        console.print(table)

    if not have_triton:
        console.print("triton is not installed: no kernel error check (pip install -e '.[gpu]')")
    else:
        table = Table(
            title=f"Triton kernels vs torch references, max |error| ({'on ' + card if cuda else 'Triton CPU interpreter'})",
            title_justify="left",
        )
        for col in ("model dims", "dtype", "place_blocks K", "place_blocks V", "scatter_kv", "selective_attention"):
            table.add_column(col, justify="left" if col in ("model dims", "dtype") else "right")
        for name, dtype_name, errors in kernel_errors(models, device):
            table.add_row(name, dtype_name, *(f"{errors[k]:.3g}" for k in ("place_blocks K", "place_blocks V", "scatter_kv", "selective_attention")))
        console.print(table)
    console.print(f"total {time.perf_counter() - started:.0f} s")


def _have_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


if __name__ == "__main__":
    main()
