"""Ranking candidates by the label distribution at the first generated position.

The first generated token's distribution over the label tokens orders the candidates, so the
time to the first token is the ranking latency. LLM rankers prefer some labels and positions
whatever the items are (the embedded model answers ``A`` for every ml-100k prompt we tried),
so scores are corrected by contextual calibration by default: the label log-prior measured on
content-free prompts of the same shape is subtracted before ranking. A reuse policy can carry a
preference of its own for some label positions as its top choice; ``rcllm check --sweep
--fit-offsets`` fits one offset per position for it on requests the gate does not measure, and
the ranker lets those offsets choose that policy's first place; the rest keep the policy's own
order and the scores stay its own (:attr:`Ranker.label_offsets`, :meth:`Ranker.order`). The bias
acts on the top choice only: offsets added to every score would move the top ten as well.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from rcllm.engine.blocks import BlockKV, Segment
from rcllm.engine.errors import RequestError
from rcllm.engine.forward import BlockEngine, ForwardResult
from rcllm.engine.graphs import StaticRecompute
from rcllm.engine.job import RankJob
from rcllm.engine.policy import Policy, parse_policy
from rcllm.engine.prompt import PromptBuilder

CALIBRATIONS = ("contextual", "none")


def block_key(fingerprint: str, context_ids: torch.Tensor, token_ids: torch.Tensor) -> str:
    """Content address of a block: model, block context and the block's own token ids."""
    h = hashlib.sha256(fingerprint.encode())
    h.update(context_ids.to(torch.int64).numpy().tobytes())
    h.update(b"|")
    h.update(token_ids.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:40]


@runtime_checkable
class BlockSource(Protocol):
    """Where the ranker takes a prompt's cached blocks from: :class:`MemoryBlockCache` (computed
    on first use, in memory), :class:`~rcllm.store.tiered.TieredBlockSource` (a hot tier over
    precomputed block stores) and a node's per-request view of it
    (:class:`~rcllm.serve.runner.HeldBlocks`). The ranker reads ``system`` and calls ``get``,
    nothing else.

    ``system``: the KV of the system prefix (``PromptBuilder.system_ids()``) computed from an
    empty context, at base position 0. It is the prompt's cached system segment and the block
    context every history and item block of the source is computed after (whose hash each
    block records as ``BlockKV.context``).
    """

    system: BlockKV

    def get(self, kind: str, token_ids: torch.Tensor) -> tuple[BlockKV, bool]:
        """The block of ``token_ids`` and whether it was a hit.

        The block holds exactly ``token_ids``, computed after ``system`` by this ranker's model:
        the KV ``engine.compute_block(token_ids, system)`` gives, up to float rounding (a store
        holds KV its build computed in batches). ``kind`` is ``"history"`` or ``"item"``; a
        source may treat them differently but gives the same block for the same ids. The flag
        is True when the source held the block before this call (the ranking counts a hit) and
        False when it had to compute or bring it (a miss); a source may keep what it computed
        for later calls. Ids the model cannot take (a block longer than its positions) raise
        :class:`~rcllm.engine.errors.RequestError`, as ``compute_block`` does.
        """


class MemoryBlockCache:
    """Blocks computed on first use after the system prefix, then kept in memory (unbounded)."""

    def __init__(self, engine: BlockEngine, builder: PromptBuilder):
        self.engine = engine
        self.system_ids = builder.system_ids()
        self.system = engine.compute_block(self.system_ids, ())
        self.blocks: dict[str, BlockKV] = {}

    def key(self, token_ids: torch.Tensor) -> str:
        return block_key(self.engine.fingerprint, self.system_ids, token_ids)

    def get(self, kind: str, token_ids: torch.Tensor) -> tuple[BlockKV, bool]:
        key = self.key(token_ids)
        block = self.blocks.get(key)
        if block is not None:
            return block, True
        block = self.engine.compute_block(token_ids, self.system)
        self.blocks[key] = block
        return block, False


def offset_order(calibrated: torch.Tensor, offsets: torch.Tensor | None = None) -> list[int]:
    """Indices of a label distribution [n], highest first (ties: lower index first); with
    ``offsets`` [n], the label whose log-probability plus offset is highest comes first instead and
    the rest keep their order."""
    order = sorted(range(len(calibrated)), key=lambda i: (-float(calibrated[i]), i))
    if offsets is not None:
        shifted = calibrated.double().clamp(min=1e-30).log() + offsets.double()
        first = max(order, key=lambda i: float(shifted[i]))  # ties: the distribution's own order
        order.remove(first)
        order.insert(0, first)
    return order


@dataclass
class Ranking:
    order: list[int]  # candidate indices, best first (a policy's label offsets choose the first)
    scores: list[float]  # per candidate (input order): calibrated probability within its prompt
    label_logprobs: list[float]  # per candidate: raw log-probability of its label, before calibration
    calibration: str
    policy: str
    ttft_ms: float
    prompt_tokens: int
    recomputed_tokens: int
    recomputed_fraction: float
    user_hit: bool | None = None
    item_hits: int = 0
    item_misses: int = 0
    rounds: int = 1
    text: str = ""


class Ranker:
    """Builds block prompts, runs the engine, reads the label distribution."""

    def __init__(self, engine: BlockEngine, builder: PromptBuilder, calibration: str = "contextual"):
        if calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {calibration!r}; expected one of {CALIBRATIONS}")
        self.engine = engine
        self.builder = builder
        self.calibration = calibration
        # a StaticRecompute (CUDA graphs; ``rcllm serve --cuda-graphs``) for prompts that run alone,
        # where kernel launches rather than arithmetic set the TTFT; batches amortise them already
        self.static: StaticRecompute | None = None
        # a ranking reads only its labels' logits: the engine computes those alone
        self.logit_ids = torch.tensor(builder.label_token_ids)
        self._priors: dict[int, torch.Tensor] = {}
        # per reuse policy (its canonical name): offsets, one per label, that choose the first
        # place in prompts of exactly len(offsets) candidates (:meth:`order`); fitted by the gate
        # (rcllm.eval.gate.fit_gate_offsets), read from the model's policy file by open_ranker
        self.label_offsets: dict[str, torch.Tensor] = {}

    # -- prompt -------------------------------------------------------------------------------

    def segments(
        self, history: Sequence[str], candidates: Sequence[str], source: BlockSource | None = None
    ) -> tuple[list[Segment], dict]:
        """The prompt's segments; blocks come from ``source`` when given, else all fresh."""
        b = self.builder
        if not candidates:
            raise RequestError("no candidates to rank")
        if len(candidates) > b.max_candidates:
            raise RequestError(f"{len(candidates)} candidates in one prompt; labels allow at most {b.max_candidates}")
        stats = {"user_hit": None, "item_hits": 0, "item_misses": 0}
        system = Segment.fresh(b.system_ids(), "system") if source is None else Segment.cached(source.system, "system")
        segs = [system]
        hist_ids = b.history_ids(history)
        if source is None:
            segs.append(Segment.fresh(hist_ids, "history"))
        else:
            block, hit = source.get("history", hist_ids)
            stats["user_hit"] = hit
            segs.append(Segment.cached(block, "history"))
        for slot, text in enumerate(candidates):
            ids = b.item_ids(text)
            if source is None:
                segs.append(Segment.fresh(ids, "item"))
            else:
                block, hit = source.get("item", ids)
                stats["item_hits" if hit else "item_misses"] += 1
                segs.append(Segment.cached(block, "item"))
            if b.template.link_tokens:
                segs.append(Segment.fresh(b.link_ids(), "link"))
            segs.append(Segment.fresh(b.label_ids(slot), "label"))
        segs.append(Segment.fresh(b.instruction_ids(), "instruction"))
        return segs, stats

    # -- calibration --------------------------------------------------------------------------

    def label_prior(self, n: int) -> torch.Tensor:
        """Log-probabilities [n] the model gives each label on a content-free prompt of n items."""
        if n not in self._priors:
            filler = self.builder.template.content_free
            segs, _ = self.segments([filler], [filler] * n)
            logits = self.engine.forward(segs, "full", logit_ids=self.logit_ids).logits
            self._priors[n] = torch.log_softmax(logits[self.builder.label_token_ids[:n]], -1)
        return self._priors[n]

    def label_scores(self, logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw label log-probabilities [n] and the calibrated label distribution [n]: the label
        prior removed (contextual calibration)."""
        logprobs = torch.log_softmax(logits[self.builder.label_token_ids[:n]].float(), -1)
        scores = logprobs if self.calibration == "none" else logprobs - self.label_prior(n)
        return logprobs, torch.softmax(scores, -1)

    def order(self, calibrated: torch.Tensor, policy: str | None = None) -> list[int]:
        """Candidate indices, best first, by the calibrated distribution [n], with ``policy``'s
        label offsets for n candidates, if it has them, choosing the first (:func:`offset_order`)."""
        offsets = self.label_offsets.get(policy) if policy is not None else None
        return offset_order(calibrated, offsets if offsets is not None and len(offsets) == len(calibrated) else None)

    # -- ranking ------------------------------------------------------------------------------

    def rank(
        self,
        history: Sequence[str],
        candidates: Sequence[str],
        policy: str | Policy = "full",
        source: BlockSource | None = None,
        max_new_tokens: int = 0,
    ) -> Ranking:
        """Rank ``candidates`` (item texts) for a user with ``history`` (item texts, oldest first).

        More candidates than labels are ranked as a tournament: groups of at most 26 are ranked,
        the best of each group meet in a final prompt, and the rest follow in group-score order.
        """
        policy = parse_policy(policy)
        n = len(candidates)
        if n == 0:
            raise RequestError("no candidates to rank")
        if n <= self.builder.max_candidates:
            return self._rank_one(history, candidates, policy, source, max_new_tokens)
        return self._tournament(history, candidates, policy, source, max_new_tokens)

    def rank_many(self, jobs: Sequence[RankJob]) -> None:
        """Rank several jobs (:class:`~rcllm.engine.job.RankJob`: history, candidate texts, policy,
        blocks) with their forwards run as one batch (:meth:`BlockEngine.forward_batch`): fills
        each job's ``segments`` and ``ranking``, or its ``error`` (a :class:`RequestError`) if the
        engine refuses its input; the others still get their rankings. Any other exception is a
        fault of ours and propagates.

        Jobs that need a tournament (more candidates than labels) or a generated reply
        (``max_new_tokens``) run one at a time. Each batched ranking's ``ttft_ms`` is its prompt
        assembly plus the batch's forward: the time it waited for its first token.
        """
        batch = []  # (job, its parsed policy, prompt assembly ms, cache stats)
        for job in jobs:
            try:
                policy = parse_policy(job.policy)
                n = len(job.texts)
                if job.max_new_tokens or n > self.builder.max_candidates:
                    job.ranking = self.rank(job.history, job.texts, policy, job.blocks, job.max_new_tokens)
                    continue
                if self.calibration == "contextual" and n:
                    self.label_prior(n)
                start = time.perf_counter()
                job.segments, stats = self.segments(job.history, job.texts, job.blocks)
                batch.append((job, policy, (time.perf_counter() - start) * 1000.0, stats))
            except RequestError as e:
                job.error = e
        results = self._forward_each([(job.segments, policy) for job, policy, _, _ in batch])
        for (job, policy, assembled_ms, stats), result in zip(batch, results):
            if isinstance(result, RequestError):
                job.error = result
            else:
                job.ranking = self.make_ranking(
                    result, len(job.texts), str(policy), assembled_ms + result.prefill_ms, **stats
                )

    def _forward_each(self, batch: list) -> list[ForwardResult | Exception]:
        """The batch's forwards together; if the engine refuses one prompt, each alone, so that
        only the refused prompts fail."""
        if not batch:
            return []
        if len(batch) == 1 and self.static is not None and self.static.accepts(*batch[0]):
            try:
                return [self.static.forward(*batch[0])]
            except RequestError as e:
                return [e]
        try:
            return self.engine.forward_batch(batch, self.logit_ids)
        except RequestError as e:
            if len(batch) == 1:
                return [e]
        results: list[ForwardResult | Exception] = []
        for segs, policy in batch:
            try:
                results.append(self.engine.forward(segs, policy, logit_ids=self.logit_ids))
            except RequestError as e:
                results.append(e)
        return results

    def _rank_one(self, history, candidates, policy: Policy, source, max_new_tokens) -> Ranking:
        n = len(candidates)
        if self.calibration == "contextual":
            self.label_prior(n)  # measured once per prompt size, outside the timed path
        start = time.perf_counter()
        segs, stats = self.segments(history, candidates, source)
        assembled_ms = (time.perf_counter() - start) * 1000.0
        eos = self.builder.tokenizer.eos_token_id
        if not max_new_tokens and self.static is not None and self.static.accepts(segs, policy):
            result = self.static.forward(segs, policy)
        else:
            result = self.engine.forward(
                segs, policy, max_new_tokens=max_new_tokens, eos_token_id=eos,
                logit_ids=None if max_new_tokens else self.logit_ids,
            )
        return self.make_ranking(result, n, str(policy), assembled_ms + result.prefill_ms, **stats)

    def make_ranking(self, result: ForwardResult, n: int, policy: str, ttft_ms: float, **stats) -> Ranking:
        """The ranking of ``n`` candidates read from a forward pass over their prompt."""
        logprobs, calibrated = self.label_scores(result.logits, n)
        tok = self.builder.tokenizer
        return Ranking(
            order=self.order(calibrated, policy),
            scores=calibrated.tolist(),
            label_logprobs=logprobs.tolist(),
            calibration=self.calibration,
            policy=policy,
            ttft_ms=ttft_ms,
            prompt_tokens=result.n_tokens,
            recomputed_tokens=result.recomputed_tokens,
            recomputed_fraction=result.recomputed_fraction,
            text=tok.decode(result.generated, skip_special_tokens=True) if result.generated else "",
            **stats,
        )

    def _tournament(self, history, candidates, policy: Policy, source, max_new_tokens) -> Ranking:
        cap = self.builder.max_candidates
        n = len(candidates)
        groups = [list(range(i, min(i + cap, n))) for i in range(0, n, cap)]
        per_group = max(1, cap // len(groups))
        scores = [0.0] * n
        logprobs = [0.0] * n
        advancing, rest = [], []
        rounds, ttft, tokens, recomputed, token_layers = 0, 0.0, 0, 0, 0.0
        stats = {"user_hit": None, "item_hits": 0, "item_misses": 0}

        def account(r: Ranking) -> None:
            nonlocal rounds, ttft, tokens, recomputed, token_layers
            rounds += r.rounds
            ttft += r.ttft_ms
            tokens += r.prompt_tokens
            recomputed += r.recomputed_tokens
            token_layers += r.recomputed_fraction * r.prompt_tokens
            stats["item_hits"] += r.item_hits
            stats["item_misses"] += r.item_misses
            if r.user_hit is not None:
                stats["user_hit"] = bool(stats["user_hit"]) or r.user_hit

        for group in groups:
            r = self.rank(history, [candidates[i] for i in group], policy, source)
            account(r)
            for local, global_i in enumerate(group):
                scores[global_i] = r.scores[local]
                logprobs[global_i] = r.label_logprobs[local]
            best = [group[i] for i in r.order]
            advancing += best[:per_group]
            rest += best[per_group:]
        final = self.rank(history, [candidates[i] for i in advancing], policy, source, max_new_tokens)
        account(final)
        for local, global_i in enumerate(advancing):
            scores[global_i] = final.scores[local]
        order = [advancing[i] for i in final.order] + sorted(rest, key=lambda i: (-scores[i], i))
        return Ranking(
            order=order,
            scores=scores,
            label_logprobs=logprobs,
            calibration=self.calibration,
            policy=str(policy),
            ttft_ms=ttft,
            prompt_tokens=tokens,
            recomputed_tokens=recomputed,
            recomputed_fraction=token_layers / tokens if tokens else 0.0,
            rounds=rounds,
            text=final.text,
            **stats,
        )

