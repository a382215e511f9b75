"""The prefix-caching baseline: a vLLM-style hash-chained block cache with LRU eviction.

A prompt's ids are cut into fixed blocks of ``block_size`` tokens; block ``i`` is keyed by the
hash of (key of block ``i-1``, its own ids), so a key names a whole prefix. A request reuses
the longest run of leading blocks already cached, computes the rest, and then caches every
full block of its own prompt, evicting the least recently used blocks beyond a byte budget.
:class:`PrefixSystem` ranks with it: the baseline that ``rcllm eval`` and ``rcllm demo`` run.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rcllm.engine.blocks import BlockKV, Segment, context_hash
from rcllm.engine.forward import BlockEngine, ForwardResult
from rcllm.engine.ranker import Ranker, Ranking


@dataclass
class PrefixHit:
    tokens: int  # prompt tokens served from the cache
    blocks: int


class PrefixCache:
    def __init__(self, engine: BlockEngine, budget_bytes: int, block_size: int = 16):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.engine = engine
        self.budget_bytes = budget_bytes
        self.block_size = block_size
        self.blocks: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.lookups = 0

    def _keys(self, ids: torch.Tensor) -> list[str]:
        keys, parent = [], self.engine.fingerprint
        for start in range(0, ids.numel() - self.block_size + 1, self.block_size):
            digest = hashlib.sha256(parent.encode())
            digest.update(ids[start : start + self.block_size].numpy().tobytes())
            parent = digest.hexdigest()[:32]
            keys.append(parent)
        return keys

    def forward(
        self, ids: torch.Tensor, max_new_tokens: int = 0, eos_token_id: int | None = None,
        logit_ids: torch.Tensor | None = None,
    ) -> tuple[ForwardResult, PrefixHit]:
        """Prefill ``ids`` reusing the longest cached prefix, then cache the prompt's full blocks
        (``logit_ids``: as in :meth:`BlockEngine.forward`)."""
        ids = ids.to(torch.long).cpu()
        keys = self._keys(ids)
        hit = 0
        # The last token is always computed: its hidden state gives the logits.
        while hit < len(keys) and (hit + 1) * self.block_size < ids.numel() and keys[hit] in self.blocks:
            self.blocks.move_to_end(keys[hit])
            hit += 1
        self.lookups += 1
        self.hits += hit > 0
        n_cached = hit * self.block_size
        segments = []
        if hit:
            k = torch.cat([self.blocks[key][0] for key in keys[:hit]], dim=2)
            v = torch.cat([self.blocks[key][1] for key in keys[:hit]], dim=2)
            prefix = BlockKV(ids[:n_cached], k, v, 0, self.engine.fingerprint, context=context_hash([]))
            segments.append(Segment.cached(prefix, "prefix"))
        segments.append(Segment.fresh(ids[n_cached:], "rest"))
        result = self.engine.forward(
            segments, "none", max_new_tokens=max_new_tokens, return_kv=True, eos_token_id=eos_token_id,
            logit_ids=logit_ids,
        )
        for i in range(hit, len(keys)):
            if keys[i] in self.blocks:
                self.blocks.move_to_end(keys[i])
                continue
            sl = slice(i * self.block_size, (i + 1) * self.block_size)
            k, v = result.keys[:, :, sl].clone(), result.values[:, :, sl].clone()
            self.blocks[keys[i]] = (k, v)
            self.nbytes += k.nbytes + v.nbytes
        while self.nbytes > self.budget_bytes and self.blocks:
            _, (k, v) = self.blocks.popitem(last=False)
            self.nbytes -= k.nbytes + v.nbytes
        result.keys = result.values = None
        return result, PrefixHit(tokens=n_cached, blocks=hit)


class PrefixSystem:
    name = "prefix"

    def __init__(self, ranker: Ranker, budget_bytes: int, block_size: int = 16):
        self.ranker = ranker
        self.cache = PrefixCache(ranker.engine, budget_bytes, block_size)

    def rank(self, history: Sequence[str], candidates: Sequence[str]) -> Ranking:
        ranker, n = self.ranker, len(candidates)
        start = time.perf_counter()
        segments, _ = ranker.segments(history, candidates)
        ids = torch.cat([s.token_ids for s in segments])
        result, hit = self.cache.forward(ids, logit_ids=ranker.logit_ids)
        ttft_ms = (time.perf_counter() - start) * 1000.0
        # what the reused prefix covered: part of the history, and any item wholly inside it
        ends, pos = {}, 0
        for s in segments:
            pos += s.n_tokens
            ends.setdefault(s.name, []).append(pos)
        item_hits = sum(end <= hit.tokens for end in ends.get("item", []))
        return ranker.make_ranking(
            result, n, "prefix", ttft_ms,
            user_hit=hit.tokens > ends["system"][0],  # the reused prefix reaches into the history
            item_hits=item_hits, item_misses=n - item_hits,
        )
