"""Stored KV dtype (``rcllm build-cache --kv-dtype``): bytes per token, load time, ranking fidelity.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_dtype.py [--model /tmp/runs/causal-c5] \\
        [--prompts 100] [--history 5] [--candidates 5] [--policies none,tail:8]

For every stored form (fp32, bf16, fp16, int8 with the store's scales, and the int8 ablation:
which axis the key and value scales run along), on the same leave-one-out requests of the
synthetic dataset (the one the default fine-tuned model was trained on):

- bytes per token: a block store holding the requests' history and item blocks, written in that
  form: its disk bytes (shards, token ids, index) and its K+V bytes (scales included) per token,
  and both against fp32;
- load ms per block: ``BlockStore.get`` (read from the shard, decode to the compute dtype),
  median over every block, and decode alone;
- fidelity to fp32-stored blocks under the same policy: every history and item block goes
  through the codec (stored and read back), then each request is ranked with those blocks and
  compared with the ranking from the fp32 blocks: max |delta| of the label logits over all
  requests, top-1 agreement, Kendall tau, and HR@1 / HR@10 and their change.

The system prompt's block is never stored (a node computes it), so it stays exact. Fidelity means
something only on a model that ranks: the HR of each policy is printed beside it, and full
prefill's above the table (``full`` recomputes every token, so no stored form can change it).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from rcllm.data.loaders import load_dataset
from rcllm.data.metrics import rank_of
from rcllm.engine import MemoryBlockCache, open_ranker
from rcllm.engine.models import DEFAULT_MODEL
from rcllm.eval.check import sample_cases
from rcllm.eval.runner import fidelity
from rcllm.store import BlockStore
from rcllm.store.codec import block_entry, decode, encode, round_trip, serialize

FINETUNED = Path("/tmp/runs/causal-c5")
# name -> (kv_dtype, key scale axis, value scale axis); "int8" is what the store writes.
FORMS = {
    "fp32": ("fp32", None, None),
    "bf16": ("bf16", None, None),
    "fp16": ("fp16", None, None),
    "int8": ("int8", "channel", "token"),
    "int8 k:token v:token": ("int8", "token", "token"),
    "int8 k:channel v:channel": ("int8", "channel", "channel"),
    "int8 k:token v:channel": ("int8", "token", "channel"),
}


class StoredForm:
    """A block source: the blocks of ``inner``, each stored in one form and read back."""

    def __init__(self, inner: MemoryBlockCache, kv_dtype: str, key_axis: str | None, value_axis: str | None):
        self.inner, self.system = inner, inner.system
        axes = {} if key_axis is None else {"key_axis": key_axis, "value_axis": value_axis}
        self.convert = lambda block: round_trip(block, kv_dtype, **axes)
        self.blocks = {}

    def get(self, kind, token_ids):
        block, hit = self.inner.get(kind, token_ids)
        key = self.inner.key(token_ids)
        if key not in self.blocks:
            self.blocks[key] = self.convert(block)
        return self.blocks[key], hit


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def store_figures(blocks: dict, form: tuple, folder: Path, runs: int) -> dict:
    """Write ``blocks`` in ``form`` to a fresh store; bytes per token and per-block load times."""
    kv_dtype, key_axis, value_axis = form
    axes = {} if key_axis is None else {"key_axis": key_axis, "value_axis": value_axis}
    with BlockStore(folder, create=True, kv_dtype=kv_dtype) as store:
        for key, block in blocks.items():
            # Encoded here with the form's axes; the store keeps bytes in its own kv_dtype as they come.
            tensors = encode(block, kv_dtype, **axes)
            store.put_bytes(key, serialize(tensors, block_entry(block, tensors)))
    load_ms, decode_ms = [], []
    with BlockStore.open_readonly(folder) as store:
        stats = store.stats()
        dtype = next(iter(blocks.values())).keys.dtype
        for _ in range(runs):
            for key in blocks:
                t0 = time.perf_counter()
                store.get(key)
                load_ms.append((time.perf_counter() - t0) * 1000)
        for key, block in blocks.items():
            tensors = encode(block, kv_dtype, **axes)
            t0 = time.perf_counter()
            decode(tensors, dtype)
            decode_ms.append((time.perf_counter() - t0) * 1000)
    return {
        "disk_bpt": stats["bytes_per_token"],
        "kv_bpt": stats["kv_bytes"] / stats["tokens"],
        "load_ms": statistics.median(load_ms),
        "decode_ms": statistics.median(decode_ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(FINETUNED) if FINETUNED.is_dir() else DEFAULT_MODEL)
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--history", type=int, default=5, help="items per history block (the fine-tuned model's)")
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--policies", default="none,tail:8")
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of: {', '.join(FORMS)}")
    ap.add_argument("--load-runs", type=int, default=3, help="reads of every block when timing loads")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    forms = [f.strip() for f in args.forms.split(",")]
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        ap.error(f"unknown forms {unknown}; expected some of {list(FORMS)}")
    policies = [p.strip() for p in args.policies.split(",")]

    ranker = open_ranker(args.model)
    engine = ranker.engine
    cases = sample_cases(load_dataset(args.dataset), args.prompts, args.history, args.candidates, args.seed,
                         text=ranker.builder.item_text)
    exact = MemoryBlockCache(engine, ranker.builder)
    sources = {name: StoredForm(exact, *FORMS[name]) for name in forms}
    labels = ranker.builder.label_token_ids
    print(f"# {datetime.date.today()}, commit {git_commit()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print(f"# model {args.model} ({engine.dtype}), {args.dataset}: {len(cases)} requests, history {args.history}, "
          f"{args.candidates} candidates, calibration {ranker.calibration}")

    # Ranked with every form, policy by policy; the fp32-stored blocks are the reference.
    results = {}  # (form, policy) -> (rankings, ranks, label logits)
    for policy in ["full", *policies]:
        for name in ["fp32-ref"] if policy == "full" else ["fp32-ref", *forms]:
            source = exact if name == "fp32-ref" else sources[name]
            rankings, ranks, logits = [], [], []
            for case in cases:
                n = len(case.candidates)
                if ranker.calibration == "contextual":
                    ranker.label_prior(n)
                segments, _ = ranker.segments(case.history, case.candidates, source)
                result = engine.forward(segments, policy)
                r = ranker.make_ranking(result, n, policy, result.prefill_ms)
                rankings.append(r)
                ranks.append(rank_of(r.order, case.positive))
                logits.append(result.logits[labels[:n]].float())
            results[name, policy] = (rankings, ranks, logits)

    full_ranks = results["fp32-ref", "full"][1]
    print(f"# full prefill: HR@1 {sum(r < 1 for r in full_ranks) / len(cases):.3f}, "
          f"HR@10 {sum(r < 10 for r in full_ranks) / len(cases):.3f}")
    blocks = exact.blocks
    tokens = sum(b.n_tokens for b in blocks.values())
    print(f"# {len(blocks)} history and item blocks, {tokens / len(blocks):.1f} tokens per block on average")
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {name: store_figures(blocks, FORMS[name], Path(tmp) / str(i), args.load_runs)
                 for i, name in enumerate(["fp32", *(f for f in forms if f != "fp32")])}
    fp32 = sizes["fp32"]

    head = ("| stored as | bytes/token on disk (x fp32) | K+V bytes/token (x fp32) | load ms/block | decode ms/block "
            "| policy | max abs d label logit | top-1 agree | tau | HR@1 (d) | HR@10 (d) |")
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for name in forms:
        s = sizes[name]
        for policy in policies:
            ref_rankings, ref_ranks, ref_logits = results["fp32-ref", policy]
            rankings, ranks, logits = results[name, policy]
            f = fidelity(ref_rankings, rankings, ref_ranks, ranks)
            dlogit = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits))
            hr1 = sum(r < 1 for r in ranks) / len(ranks)
            hr10 = sum(r < 10 for r in ranks) / len(ranks)
            print(
                f"| {name} | {s['disk_bpt']:.0f} ({s['disk_bpt'] / fp32['disk_bpt']:.3f}) "
                f"| {s['kv_bpt']:.0f} ({s['kv_bpt'] / fp32['kv_bpt']:.3f}) | {s['load_ms']:.3f} | {s['decode_ms']:.3f} "
                f"| {policy} | {dlogit:.4f} | {f['top1_agree']:.3f} | {f['kendall_tau']:.3f} "
                f"| {hr1:.3f} ({f['hr@1_delta']:+.3f}) | {hr10:.3f} ({f['hr@10_delta']:+.3f}) |"
            )


if __name__ == "__main__":
    main()
