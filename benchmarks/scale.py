"""Scale measured, not assumed (#20): placing a large catalog, build cost per item, KV capacity.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py [--items 1000000] [--nodes 16]
        [--dim 384] [--components 2000] [--sizes 10000,100000] [--kv-sample 16,32,64,128]
        [--model smollm2-135m] [--threads 1]

1. Placement. ``--items`` synthetic items with given ``--dim``-d embeddings (a mixture of
   ``--components`` Gaussians of Zipf-distributed sizes) and 20-60 tokens each are placed on
   ``--nodes`` nodes by the project's placement (:func:`rcllm.build.placement.place_items`: faiss
   spherical k-means, then whole clusters to nodes). Printed: seconds, memory (the process's RSS
   before placing, the input array included, and its peak while placing, from getrusage; the
   largest catalog goes first so that the peak is its own), the size of the faiss index the
   placement saves (``placement/centroids.faiss``) and the balance (every node's tokens against
   the mean). Also at each of ``--sizes``, for the build-cost rows below.
2. Build cost per item at the ``--sizes`` catalogs: KV compute with the embedded model measured on
   ``--kv-sample`` blocks of 40 tokens (``BlockEngine.compute_blocks``, batch 16), embedding
   with MiniLM on the same number of items, each fitted as ``seconds = a + b * items`` by least
   squares (the fit printed) and extrapolated; placement as measured in 1.
3. Capacity: KV bytes per item (40 tokens) and per 1M items for the 135M, 0.5B and 8B dims at
   fp32, bf16 and int8, from layers x 2 (K, V) x kv_heads x head_dim x bytes. int8 counts 1 byte
   per element plus the float16 scales rcllm/store/codec.py stores: one per token and head for V,
   one per channel and head per block for K (2 x head_dim bytes per layer and head, spread over
   the block's 40 tokens).
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

TOKENS_PER_ITEM = 40
MODELS = {  # name: (layers, kv_heads, head_dim)
    "SmolLM2-135M": (30, 3, 64),
    "Qwen2.5-0.5B": (24, 2, 64),
    "Llama-3-8B": (32, 8, 128),
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}
SCALE_BYTES = 2  # float16 scales of int8 blocks


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def mixture(n: int, dim: int, components: int, seed: int = 0) -> np.ndarray:
    """float32 [n, dim]: items around ``components`` random centres of Zipf-distributed sizes,
    noise about 0.7x a centre's norm, so neighbouring clusters overlap. Filled in chunks to
    keep the peak near the array itself."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, components + 1) ** 0.8
    which = rng.choice(components, size=n, p=weights / weights.sum())
    out = np.empty((n, dim), dtype=np.float32)
    for first in range(0, n, 100_000):
        rows = slice(first, min(n, first + 100_000))
        noise = rng.standard_normal((rows.stop - rows.start, dim), dtype=np.float32)
        out[rows] = centres[which[rows]] + noise * np.float32(0.7 / np.sqrt(dim))
    return out


def place(embeddings: np.ndarray, tokens: np.ndarray, n_nodes: int) -> dict:
    from rcllm.build.placement import place_items
    from rcllm.store.placement import save_placement

    before = rss_bytes()
    started = time.perf_counter()
    placement = place_items(embeddings, tokens, n_nodes, seed=0)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        save_placement(placement, tmp)
        index_bytes = (Path(tmp) / "centroids.faiss").stat().st_size
        arrays_bytes = (Path(tmp) / "placement.npz").stat().st_size
    loads = placement.node_tokens()
    return {
        "items": len(tokens), "seconds": seconds, "rss_before": before, "rss_peak": peak_rss_bytes(),
        "clusters": len(placement.centroids), "index_bytes": index_bytes, "arrays_bytes": arrays_bytes,
        "imbalance": placement.imbalance(), "min": loads.min() / loads.mean() - 1, "max": loads.max() / loads.mean() - 1,
    }


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: (a, b, R^2)."""
    b, a = np.polyfit(xs, ys, 1)
    predicted = a + b * np.asarray(xs)
    total = float(((np.asarray(ys) - np.mean(ys)) ** 2).sum())
    r2 = 1 - float(((np.asarray(ys) - predicted) ** 2).sum()) / total if total else 1.0
    return float(a), float(b), r2


def kv_seconds(sample_sizes: list[int], model: str) -> list[float]:
    """Seconds to compute ``n`` item blocks of TOKENS_PER_ITEM tokens after the block context."""
    import torch

    from rcllm.data.synthetic import make_synthetic
    from rcllm.engine import open_ranker

    ranker = open_ranker(model)
    builder = ranker.builder
    ids = torch.cat([builder.item_ids(builder.item_text(i)) for i in make_synthetic(n_items=64).items.values()])
    blocks = [ids[(k * 7) % 1000 : (k * 7) % 1000 + TOKENS_PER_ITEM] for k in range(max(sample_sizes))]
    context = ranker.engine.compute_block(ranker.builder.system_ids(), ())
    ranker.engine.compute_blocks(blocks[:16], context)  # warm-up
    out = []
    for n in sample_sizes:
        started = time.perf_counter()
        ranker.engine.compute_blocks(blocks[:n], context, 16)
        out.append(time.perf_counter() - started)
    return out


def embed_seconds(sample_sizes: list[int]) -> list[float]:
    from rcllm.build.embed import get_embedder
    from rcllm.data.synthetic import make_synthetic
    from rcllm.engine.prompt import item_text

    texts = [item_text(i) for i in make_synthetic(n_items=max(sample_sizes)).items.values()]
    embedder = get_embedder("minilm")
    embedder.embed(texts[:16])  # warm-up
    out = []
    for n in sample_sizes:
        started = time.perf_counter()
        embedder.embed(texts[:n])
        out.append(time.perf_counter() - started)
    return out


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: str) -> float:
    elements = layers * 2 * kv_heads * head_dim
    if dtype != "int8":
        return elements * DTYPE_BYTES[dtype]
    v_scales = layers * kv_heads * SCALE_BYTES  # one per token and head
    k_scales = layers * kv_heads * head_dim * SCALE_BYTES / TOKENS_PER_ITEM  # per channel and head, per block
    return elements + v_scales + k_scales


def human(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--components", type=int, default=2000)
    ap.add_argument("--sizes", default="10000,100000", help="smaller catalogs placed too, and the build-cost rows")
    ap.add_argument("--kv-sample", default="16,32,64,128", help="block counts the KV and embedding fits are measured at")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d')} · commit {commit} · {platform.machine()}, {args.threads} thread(s), "
          f"faiss {faiss.__version__}, numpy {np.__version__}")

    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows = []
    for n in [args.items, *sizes]:  # the large one first, so the peak RSS is its own
        rng = np.random.default_rng(n)
        embeddings = mixture(n, args.dim, args.components, seed=n)
        tokens = rng.integers(20, 61, n)
        rows.append(place(embeddings, tokens, args.nodes))
        del embeddings
    print(f"\n## Placement on {args.nodes} nodes, {args.dim}-d embeddings ({args.components} Gaussians), 20-60 tokens per item\n")
    print("| items | clusters | seconds | RSS before (input included) | peak RSS | faiss index | placement.npz | node tokens vs mean |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(rows, key=lambda r: r["items"]):
        peak = human(r["rss_peak"]) if r["items"] == args.items else "(the largest's)"
        print(f"| {r['items']:,} | {r['clusters']:,} | {r['seconds']:.1f} | {human(r['rss_before'])} | {peak} | "
              f"{human(r['index_bytes'])} | {human(r['arrays_bytes'])} | {r['min']:+.1%} .. {r['max']:+.1%} |")

    samples = [int(s) for s in args.kv_sample.split(",") if s]
    kv = kv_seconds(samples, args.model)
    emb = embed_seconds(samples)
    kv_fit, emb_fit = fit(samples, kv), fit(samples, emb)
    print(f"\n## Build cost per item ({args.model}, {TOKENS_PER_ITEM}-token item blocks, batch 16; MiniLM embeddings)\n")
    print("| blocks | KV seconds | embed seconds |\n| ---: | ---: | ---: |")
    for n, k, e in zip(samples, kv, emb):
        print(f"| {n} | {k:.2f} | {e:.2f} |")
    for name, (a, b, r2) in (("KV", kv_fit), ("embed", emb_fit)):
        print(f"\n{name} fit: seconds = {a:.3f} + {b * 1000:.2f} ms x items (R^2 {r2:.4f})")
    placed = {r["items"]: r["seconds"] for r in rows}
    print("\n| catalog | embed (fit) | place (measured) | KV (fit) | total | per item |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in [*sizes, args.items]:
        e, k = emb_fit[0] + emb_fit[1] * n, kv_fit[0] + kv_fit[1] * n
        total = e + placed[n] + k
        print(f"| {n:,} | {e / 60:,.1f} min | {placed[n]:.1f} s | {k / 3600:,.2f} h | {total / 3600:,.2f} h | {total / n * 1000:.1f} ms |")

    print(f"\n## KV capacity, {TOKENS_PER_ITEM} tokens per item\n")
    print("| model dims | dtype | bytes per token | per item | per 1M items | vs fp32 |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for name, dims in MODELS.items():
        fp32 = bytes_per_token(*dims, "fp32")
        for dtype in DTYPE_BYTES:
            per = bytes_per_token(*dims, dtype)
            print(f"| {name} ({dims[0]} layers, {dims[1]} kv heads x {dims[2]}) | {dtype} | {per:,.0f} | "
                  f"{human(per * TOKENS_PER_ITEM)} | {human(per * TOKENS_PER_ITEM * 1e6)} | {per / fp32:.3f} |")


if __name__ == "__main__":
    main()
