"""How long ``rcllm eval`` takes to start timing on a large catalog, and what it writes first (#20).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_catalog.py [--items 16859] [--users 30]
        [--requests-per-user 2] [--folder DIR] [--store DIR] [--threads 1]

Writes a dataset folder (``catalog.jsonl``, ``interactions.jsonl``, as ``rcllm data prepare``
does) of invented game titles, ~17 tokens per item block, Zipf-popular, with user histories of
5-200 items (median ~9), then runs the steps of ``rcllm eval --dataset DIR`` up to the first
timed request: load the dataset and the model, sample the requests, prepare the blocks they read
(:func:`rcllm.eval.runner.prepare_block_source`, into a fresh store), the label priors. Prints
the seconds of each step and the bytes the store holds. Then time the command itself::

    time rcllm eval --dataset DIR --users 30 --requests-per-user 2 --cache FRESH_DIR
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rcllm.data.catalog import write_catalog
from rcllm.data.formats import write_interactions
from rcllm.data.loaders import load_dataset
from rcllm.engine import open_ranker
from rcllm.engine.models import DEFAULT_MODEL
from rcllm.eval.runner import EvalSettings, prepare_block_source, sample_eval_requests

WORDS = (
    "Shadow Legends Empire Dragon Star Quest Kingdom Dark Souls Racing Battle Fantasy Tactics Galaxy Ninja "
    "Warriors Chronicles Rising Arena Zero Heroes Lost Island Iron Storm Night Knight Rogue Cyber Space Pixel "
    "Dungeon Castle Mystic Blade Frontier Odyssey Saga Hunter Ghost Rebel Titan Omega Crystal Wild Steel Eternal"
).split()
GENRES = ("Action", "Adventure", "RPG", "Strategy", "Simulation", "Racing", "Sports", "Puzzle", "Shooter", "Indie")


def write_dataset(folder: Path, n_items: int, n_users: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    items, titles = [], set()
    for n in range(n_items):
        title = " ".join(rng.sample(WORDS, rng.choice((2, 3, 4, 4, 5))))
        while title in titles:
            title += f" {rng.randint(2, 9)}"
        titles.add(title)
        items.append({"id": f"g{n}", "title": title, "year": rng.randint(1995, 2024),
                      "categories": rng.sample(GENRES, rng.choice((1, 2, 2)))})
    ids = [item["id"] for item in items]
    cum, total = [], 0.0
    for rank in range(n_items):  # Zipf popularity
        total += 1 / (rank + 1) ** 1.05
        cum.append(total)
    rows = []
    for u in range(n_users):
        length = min(200, max(5, int(rng.lognormvariate(2.2, 0.8))))
        seen: dict[str, None] = {}
        while len(seen) < length:
            seen.setdefault(rng.choices(ids, cum_weights=cum, k=1)[0])
        start = rng.uniform(1.5e9, 1.6e9)
        rows += [(f"u{u}", item, start + 86400 * k) for k, item in enumerate(seen)]
    folder.mkdir(parents=True, exist_ok=True)
    write_catalog(items, folder / "catalog.jsonl")
    write_interactions(rows, folder / "interactions.jsonl")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=16859)
    ap.add_argument("--dataset-users", type=int, default=6000)
    ap.add_argument("--users", type=int, default=30)
    ap.add_argument("--requests-per-user", type=int, default=2)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--folder", type=Path, default=None, help="dataset folder (default: a temporary one)")
    ap.add_argument("--store", type=Path, default=None, help="eval's store, must be new (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="rcllm-eval-catalog-"))
    folder = args.folder or tmp / "games"
    store = args.store or tmp / "store"
    if store.exists():
        raise SystemExit(f"{store} exists: give a new folder, so every block is computed")
    try:
        if not (folder / "catalog.jsonl").is_file():
            write_dataset(folder, args.items, args.dataset_users)
        seconds = {}
        t0 = t = time.perf_counter()
        data = load_dataset(str(folder))
        seconds["load dataset"], t = time.perf_counter() - t, time.perf_counter()
        ranker = open_ranker(args.model)
        seconds["load model"], t = time.perf_counter() - t, time.perf_counter()
        settings = EvalSettings(users=args.users, requests_per_user=args.requests_per_user)
        requests = sample_eval_requests(data, settings)
        seconds["sample requests"], t = time.perf_counter() - t, time.perf_counter()
        notes = []
        prepare_block_source(ranker, data, settings, store, requests=requests, note=notes.append)
        seconds["prepare blocks"], t = time.perf_counter() - t, time.perf_counter()
        for size in {len(r.candidates) for r in requests}:
            ranker.label_prior(min(size, ranker.builder.max_candidates))
        seconds["label priors"] = time.perf_counter() - t
        seconds["until timing starts"] = time.perf_counter() - t0
        items = {i for r in requests for i in r.candidates}
        print(f"catalog {len(data.items):,} items; {len(requests)} requests read {len(items):,} distinct items "
              f"and {len({r.user_id for r in requests})} histories; torch threads {torch.get_num_threads()}")
        for note in notes:
            print(f"  eval said: {note}")
        for name, s in seconds.items():
            print(f"{name:22} {s:8.1f} s")
        print(f"store written          {folder_bytes(store) / 2**30:8.3f} GiB ({folder_bytes(store):,} bytes)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
