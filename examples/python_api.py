"""rcllm as a library: rank a reader's next book with cached blocks, in this process.

    python examples/python_api.py [--model smollm2-135m|FOLDER|HF-ID]

Blocks (the history, every candidate) are computed once by the MemoryBlockCache and reused by
every later ranking; each policy is compared with a plain prefill (policy ``full``).
"""

from __future__ import annotations

import argparse

from rcllm.data.loaders import load_dataset
from rcllm.engine import MemoryBlockCache, open_ranker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--user", default="reader-01")
    args = parser.parse_args()

    data = load_dataset("bookshop")  # examples/bookshop: catalog.jsonl + interactions.jsonl
    items = data.items
    sequence = data.user_sequences()[args.user]
    history, held_out = sequence[:-1], sequence[-1]
    unseen = [i for i in items if i not in sequence]
    candidates = [held_out] + unseen[:: max(1, len(unseen) // 9)][:9]

    ranker = open_ranker(args.model)
    source = MemoryBlockCache(ranker.engine, ranker.builder)
    texts = lambda ids: [ranker.builder.item_text(items[i]) for i in ids]  # noqa: E731 - each item's prompt text
    print(f"{args.user} read: " + "; ".join(items[i]["title"] for i in history[-5:]))

    ranker.label_prior(len(candidates))  # the label-bias prior of this prompt shape, measured once
    ranker.rank(texts(history), texts(candidates), policy="none", source=source)  # first call computes the blocks
    full = ranker.rank(texts(history), texts(candidates), policy="full")
    for policy in ("full", "boundary:2", "none"):
        r = full if policy == "full" else ranker.rank(texts(history), texts(candidates), policy=policy, source=source)
        top = [candidates[i] for i in r.order[:3]]
        print(f"{policy:>10}: TTFT {r.ttft_ms:7.1f} ms, recomputed {r.recomputed_fraction:4.0%}, "
              f"same top-1 as full: {r.order[0] == full.order[0]}, top 3: "
              + "; ".join(items[i]["title"] for i in top))
    print(f"held-out next book: {items[held_out]['title']}")


if __name__ == "__main__":
    main()
