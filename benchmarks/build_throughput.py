"""Build throughput of ``rcllm build-cache``: items/s and tokens/s per phase, and size on disk.

    .venv/bin/python benchmarks/build_throughput.py [--model smollm2-135m] [--threads 2]
        [--dataset ml-100k] [--scales 1,2,4] [--synthetic-items 500]

First the ml-100k catalog (1,682 items, from the recbole wheel), then a synthetic catalog at
1x, 2x, 4x its size to show that the cost grows linearly with the catalog. Item blocks only
(no user histories), two nodes, into a temporary folder.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from rcllm.build.pipeline import BuildOptions, build_cache
from rcllm.data.loaders import load_dataset, prepare
from rcllm.data.synthetic import make_synthetic
from rcllm.engine import open_ranker
from rcllm.engine.models import DEFAULT_MODEL


def run(ranker, name: str, dataset, root: Path, batch: int) -> None:
    files = prepare(dataset, root / f"{name}-data")
    out = root / f"{name}-cache"
    report = build_cache(files["catalog.jsonl"], BuildOptions(out=out, nodes=2, batch_size=batch), ranker=ranker)
    tokens = sum(n["tokens"] for n in report.nodes)
    kv = report.seconds["item_kv"]
    size = sum(n["bytes"] for n in report.nodes)
    print(f"{name:18} {report.items:7d} {tokens:8d} {report.seconds.get('embed', 0):8.1f} {kv:8.1f} "
          f"{report.items / kv:8.1f} {tokens / kv:9.0f} {size / 2**20:9.1f} {report.bytes_per_token:9.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--scales", default="1,2,4")
    ap.add_argument("--synthetic-items", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ranker = open_ranker(args.model)
    print(f"model {args.model}; CPU {platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"batch {args.batch}; item blocks only, 2 nodes")
    print(f"{'catalog':18} {'items':>7} {'tokens':>8} {'embed s':>8} {'KV s':>8} {'items/s':>8} {'tokens/s':>9} "
          f"{'MiB':>9} {'B/token':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.dataset:
            run(ranker, args.dataset, load_dataset(args.dataset), root, args.batch)
        for scale in (int(s) for s in args.scales.split(",") if s):
            n = args.synthetic_items * scale
            run(ranker, f"synthetic x{scale}", make_synthetic(n_items=n, n_users=50, seed=0), root, args.batch)


if __name__ == "__main__":
    main()
