"""The block-aware forward pass.

A prompt arrives as segments. Every segment is placed at its target position in one attention
context (cached keys re-rotated there), then the model runs layer by layer over only the
tokens the correction policy selects: their queries attend to the whole assembled context,
causally by position, and their recomputed K/V overwrite the cached entries in place. With
``full`` every token is recomputed and the result is a plain prefill.

We walk the model's own modules (norms, projections, MLP: ``rcllm.engine.layer``) and replace
only attention: the stock transformers forward cannot recompute a different subset of tokens in
every layer.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rcllm import kernels
from rcllm.engine.blocks import BlockKV, Segment, context_hash
from rcllm.engine.errors import RequestError
from rcllm.engine.layer import finish, project
from rcllm.engine.models import LoadedModel
from rcllm.engine.policy import Policy, base_selection, deviation_selection, parse_policy


def head_logits(lm_head: torch.nn.Module, h: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The output projection of normed hidden states [n, hidden]: logits [n, vocab], or, with
    ``ids``, only those rows of the projection computed and ``-inf`` everywhere else."""
    if ids is None:
        return lm_head(h)
    ids = ids.to(h.device)
    bias = lm_head.bias.index_select(0, ids) if getattr(lm_head, "bias", None) is not None else None
    picked = torch.nn.functional.linear(h, lm_head.weight.index_select(0, ids), bias)
    out = h.new_full((h.shape[0], lm_head.weight.shape[0]), float("-inf"), dtype=picked.dtype)
    return out.index_copy_(1, ids, picked)


@dataclass
class ForwardResult:
    logits: torch.Tensor  # float32 [vocab], next-token logits after the last prompt token
    n_tokens: int  # prompt length
    recomputed_tokens: int  # tokens recomputed per layer, averaged over layers
    recomputed_fraction: float  # token-layers recomputed / (prompt tokens * layers)
    prefill_ms: float  # wall time from entering forward to the first token's logits
    generated: list[int] = field(default_factory=list)  # greedy continuation, if asked for
    keys: torch.Tensor | None = None  # [layers, kv_heads, L, head_dim] when return_kv=True
    values: torch.Tensor | None = None


@dataclass
class Prompt:
    """One prompt on its way through the layers: its assembled context and the positions it
    recomputes (``idx`` narrows after a deviation check layer). For a decoding step ``ids`` is
    the new token and ``idx`` its position."""

    ids: torch.Tensor  # token ids on the device (the whole prompt)
    policy: Policy | None
    fresh: torch.Tensor | None  # per token: no cached KV to reuse
    exact: torch.Tensor | None  # per token: its cached KV equals a plain prefill's
    ctx_k: torch.Tensor  # [layers, kv_heads, length (+ generated), head_dim]
    ctx_v: torch.Tensor
    length: int
    idx: torch.Tensor  # positions recomputed in the current layer
    check_layer: int  # deviation: the layer whose K/V drift selects what the rest recompute


class BlockEngine:
    """Runs prompts made of fresh and cached segments on one loaded model."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        decoder = lm.model.model
        self.embed = decoder.embed_tokens
        self.layers = decoder.layers
        self.norm = decoder.norm
        self.lm_head = lm.model.lm_head
        config = lm.model.config
        self.n_layers = len(self.layers)
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = lm.head_dim
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.inv_freq = lm.inv_freq.to(lm.device)
        self.device = lm.device
        self.dtype = lm.dtype
        self.fingerprint = lm.fingerprint

    # -- validation -------------------------------------------------------------------------

    def check_block(self, kv: BlockKV, name: str) -> None:
        """Refuse cached KV that another model computed or that has another shape."""
        if kv.fingerprint != self.fingerprint:
            raise ValueError(
                f"segment {name!r}: cached KV was computed by another model (fingerprint "
                f"{kv.fingerprint[:12]}, this model {self.fingerprint[:12]}); rebuild the cache for this model"
            )
        want = (self.n_layers, self.n_kv_heads, kv.n_tokens, self.head_dim)
        if tuple(kv.keys.shape) != want:
            raise ValueError(
                f"segment {name!r}: cached KV has shape {tuple(kv.keys.shape)}, this model needs {want} "
                "[layers, kv_heads, tokens, head_dim]"
            )

    def check_length(self, length: int) -> None:
        """Refuse a prompt longer than the model's sliding window or its positions: refused
        input (the history, candidates and reply asked for are too long), a RequestError."""
        window = self.lm.sliding_window
        if window is not None and length > window:
            raise RequestError(
                f"prompt of {length} tokens exceeds the model's sliding attention window ({window}); "
                "block reuse assumes every token sees the whole context"
            )
        if self.max_positions is not None and length > self.max_positions:
            raise RequestError(f"prompt of {length} tokens exceeds the model's {self.max_positions} positions")

    def check_prompt(self, segments: Sequence[Segment], max_new_tokens: int = 0) -> int:
        """The prompt's length in tokens, after refusing cached blocks of another model or shape,
        an empty prompt, and one that (with ``max_new_tokens``) is too long for the model."""
        for i, seg in enumerate(segments):
            if seg.kv is not None:
                self.check_block(seg.kv, seg.name or f"#{i}")
        length = sum(s.n_tokens for s in segments)
        if length == 0:
            raise ValueError("empty prompt: at least one token is needed")
        self.check_length(length + max_new_tokens)
        return length

    # -- the forward pass -------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        segments: Sequence[Segment],
        policy: str | Policy = "full",
        max_new_tokens: int = 0,
        return_kv: bool = False,
        eos_token_id: int | None = None,
        logit_ids: torch.Tensor | None = None,
    ) -> ForwardResult:
        """Next-token logits of the prompt (and an optional greedy continuation).

        ``logit_ids`` (token ids): compute only those logits, the rest are ``-inf`` — a ranking
        reads only its labels' logits, and the output projection over the whole vocabulary is
        the largest weight a small recompute reads. Not with ``max_new_tokens``, whose greedy
        tokens need every logit.
        """
        started = time.perf_counter()
        if max_new_tokens < 0:
            raise RequestError("max_new_tokens must be >= 0")
        if max_new_tokens and logit_ids is not None:
            raise ValueError("logit_ids restricts the first token's logits: generation needs them all")
        prompt = self._prepare(segments, parse_policy(policy), max_new_tokens)
        (result,) = self._run([prompt], started, logit_ids)
        ctx_k, ctx_v, length = prompt.ctx_k, prompt.ctx_v, prompt.length
        logits, pos = result.logits, length
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            result.generated.append(token)
            if token == eos_token_id or len(result.generated) == max_new_tokens:
                break
            logits = self._decode(token, pos, ctx_k, ctx_v)
            pos += 1
        if return_kv:
            result.keys, result.values = ctx_k[:, :, :length], ctx_v[:, :, :length]
        return result

    @torch.inference_mode()
    def forward_batch(
        self, prompts: Sequence[tuple[Sequence[Segment], str | Policy]], logit_ids: torch.Tensor | None = None
    ) -> list[ForwardResult]:
        """Next-token logits of several prompts (segments, policy) in one pass.

        The tokens every prompt recomputes go through the projections and MLPs together, as one
        ragged batch (the weights are read once per layer for all of them); attention stays per
        prompt, over that prompt's own assembled context. Each result equals what ``forward``
        gives for its prompt alone, up to float summation order; ``prefill_ms`` is the wall time
        of the whole batch, which is what each of its requests waited. ``logit_ids``: as in
        :meth:`forward`.
        """
        started = time.perf_counter()
        if not prompts:
            return []
        prepared = [self._prepare(segments, parse_policy(policy), 0) for segments, policy in prompts]
        return self._run(prepared, started, logit_ids)

    def _prepare(self, segments: Sequence[Segment], policy: Policy, max_new_tokens: int) -> "Prompt":
        """Check one prompt, place its cached blocks in a fresh context and select its tokens."""
        length = self.check_prompt(segments, max_new_tokens)

        shape = (self.n_layers, self.n_kv_heads, length + max_new_tokens, self.head_dim)
        # Uninitialised on purpose: every entry is written (placed from a block, or scattered by
        # the layer that recomputes it) before any query can read it.
        ctx_k = torch.empty(shape, dtype=self.dtype, device=self.device)
        ctx_v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if policy.kind != "full":
            self.place(segments, ctx_k, ctx_v)
        ids_cpu, fresh, exact, idx = self.select(segments, policy)
        check_layer = max(0, min(policy.check_layer, self.n_layers - 2)) if policy.kind == "deviation" else -1
        return Prompt(ids_cpu.to(self.device), policy, fresh, exact, ctx_k, ctx_v, length, idx.to(self.device), check_layer)

    def select(self, segments: Sequence[Segment], policy: Policy):
        """The prompt's token ids and, per token, whether it has no cached KV (fresh) and whether
        its cached KV is a plain prefill's (exact), and the positions the policy recomputes
        first (the last token always: its hidden state gives the logits); all on the CPU."""
        ids = torch.cat([s.token_ids for s in segments])
        fresh = torch.cat([torch.full((s.n_tokens,), s.kv is None or policy.kind == "full") for s in segments])
        exact = torch.cat([torch.full((s.n_tokens,), e) for s, e in zip(segments, self._exact(segments, ids))])
        offset = torch.cat([torch.arange(s.n_tokens) for s in segments])
        remaining = torch.cat([torch.arange(s.n_tokens - 1, -1, -1) for s in segments])
        selected = base_selection(policy, fresh, offset, exact, remaining)
        selected[-1] = True
        return ids, fresh, exact, selected.nonzero().flatten()

    def place(self, segments: Sequence[Segment], ctx_k: torch.Tensor, ctx_v: torch.Tensor) -> None:
        """Copy every cached segment's KV into the context at its position (keys re-rotated)."""
        starts, placed, start = [], [], 0
        for seg in segments:
            if seg.kv is not None:
                placed.append(seg.kv)
                starts.append(start)
            start += seg.n_tokens
        kernels.place_blocks(
            ctx_k, ctx_v, [b.keys for b in placed], [b.values for b in placed], starts,
            [s - b.base_pos for s, b in zip(starts, placed)], self.inv_freq,
        )

    def _run(
        self, prompts: list["Prompt"], started: float, logit_ids: torch.Tensor | None = None
    ) -> list[ForwardResult]:
        """The layers over every prompt's selected tokens, as one ragged batch."""
        h = self.embed(torch.cat([p.ids[p.idx] for p in prompts])).unsqueeze(0)
        token_layers = [0] * len(prompts)
        for layer_no, layer in enumerate(self.layers):
            h, devs = self.run_layer(layer, h, prompts, layer_no)
            for i, p in enumerate(prompts):
                token_layers[i] += p.idx.numel()
            if any(d is not None for d in devs):
                h = self._narrow(h, prompts, devs)
        ends = torch.tensor([p.idx.numel() for p in prompts], device=h.device).cumsum(0) - 1
        logits = self._logits(h[0, ends], logit_ids)
        elapsed = (time.perf_counter() - started) * 1000.0
        return [
            ForwardResult(
                logits=logits[i],
                n_tokens=p.length,
                recomputed_tokens=round(token_layers[i] / self.n_layers),
                recomputed_fraction=token_layers[i] / (p.length * self.n_layers),
                prefill_ms=elapsed,
            )
            for i, p in enumerate(prompts)
        ]

    @staticmethod
    def _narrow(h: torch.Tensor, prompts: list["Prompt"], devs: list) -> torch.Tensor:
        """After a deviation check layer: keep, per checked prompt, the tokens the policy keeps."""
        parts, first = [], 0
        for p, dev in zip(prompts, devs):
            m = p.idx.numel()
            part = h[:, first : first + m]
            first += m
            if dev is not None:
                narrowed = deviation_selection(p.policy, p.fresh, dev.cpu(), p.exact)
                narrowed[-1] = True
                keep = narrowed[p.idx.cpu()].to(h.device)
                p.idx, part = p.idx[keep], part[:, keep]
            parts.append(part)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    @staticmethod
    def _exact(segments: Sequence[Segment], ids: torch.Tensor) -> list[bool]:
        """Per segment: a cached block placed at its base position behind its own block context."""
        flags, start = [], 0
        for seg in segments:
            kv = seg.kv
            flags.append(
                kv is not None and kv.context is not None and kv.base_pos == start
                and kv.context == context_hash(ids[:start])
            )
            start += seg.n_tokens
        return flags

    def run_layer(self, layer, h, prompts: list["Prompt"], layer_no: int):
        """One decoder layer for every prompt's selected tokens (``h``: [1, sum of their counts,
        hidden]); returns (h, per prompt: its deviations when this is its check layer, else None)."""
        q, k, v = (t[0].transpose(0, 1) for t in project(layer, h, self.head_dim))  # [heads, m, head_dim]
        idx = torch.cat([p.idx for p in prompts]) if len(prompts) > 1 else prompts[0].idx
        q = kernels.apply_rope(q, idx, self.inv_freq)
        k = kernels.apply_rope(k, idx, self.inv_freq)
        outs, devs, first = [], [], 0
        for p in prompts:
            n = p.idx.numel()
            pk, pv, pq = k[:, first : first + n], v[:, first : first + n], q[:, first : first + n]
            first += n
            ck, cv = p.ctx_k[layer_no], p.ctx_v[layer_no]
            dev = None
            if layer_no == p.check_layer:
                # How far each token's recomputed K/V moved from its cached entry (fresh tokens'
                # entries are uninitialised; the selection ignores them).
                moved = (pk - ck[:, p.idx]).float().pow(2).sum((0, 2)) + (pv - cv[:, p.idx]).float().pow(2).sum((0, 2))
                dev = torch.zeros(p.length, device=h.device)
                dev[p.idx] = moved
            devs.append(dev)
            kernels.scatter_kv(ck, cv, pk, pv, p.idx)
            outs.append(
                kernels.selective_attention(pq, ck[:, : p.length], cv[:, : p.length], p.idx, layer.self_attn.scaling)
            )
        o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return finish(layer, h, o.transpose(0, 1).unsqueeze(0)), devs

    def _decode(self, token: int, pos: int, ctx_k, ctx_v) -> torch.Tensor:
        idx = torch.tensor([pos], device=self.device)
        step = Prompt(idx.new_tensor([token]), None, None, None, ctx_k, ctx_v, pos + 1, idx, -1)
        h = self.embed(step.ids).unsqueeze(0)
        for layer_no, layer in enumerate(self.layers):
            h, _ = self.run_layer(layer, h, [step], layer_no)
        return self._logits(h[0, -1:])[0]

    def _logits(self, h_last: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [n, vocab] on the CPU of hidden states [n, hidden]; with ``ids``, only
        those token ids' logits are computed and every other one is ``-inf``."""
        return head_logits(self.lm_head, self.norm(h_last), ids).float().cpu()

    # -- block KV for the cache -------------------------------------------------------------

    def compute_block(self, token_ids, context: BlockKV | Sequence[int] | torch.Tensor = ()) -> BlockKV:
        """KV of ``token_ids`` computed after ``context`` (ids, or a cached context block).

        The block's keys carry RoPE at the positions right after the context; the result is
        exactly what a prefix cache holds for those tokens after that context.
        """
        block = Segment.fresh(token_ids, "block")
        if block.n_tokens == 0:
            raise ValueError("cannot compute the KV of an empty block")
        if isinstance(context, BlockKV):
            if context.base_pos != 0:
                raise ValueError("a block context must start at position 0")
            head = [Segment.cached(context, "context")]
            context_ids = context.token_ids
        else:
            head = [Segment.fresh(context, "context")] if len(context) else []
            context_ids = head[0].token_ids if head else torch.zeros(0, dtype=torch.long)
        start = sum(s.n_tokens for s in head)
        result = self.forward(head + [block], policy="none", return_kv=True)
        return BlockKV(
            token_ids=block.token_ids,
            keys=result.keys[:, :, start:].clone(),
            values=result.values[:, :, start:].clone(),
            base_pos=start,
            fingerprint=self.fingerprint,
            context=context_hash(context_ids),
        )

    @torch.inference_mode()
    def compute_blocks(self, blocks: Sequence[torch.Tensor], context: BlockKV, batch_size: int = 16) -> list[BlockKV]:
        """``compute_block`` for many blocks after one context block, batched.

        Each batch row is [block][padding] through the stock forward, over the context's cached
        KV: padding only follows a block's tokens, so under causal attention it cannot change
        them, and no mask is needed. Rows are grouped by length to keep padding small.
        """
        from transformers import DynamicCache

        if context.base_pos != 0:
            raise ValueError("a block context must start at position 0")
        self.check_block(context, "context")
        blocks = [torch.as_tensor(b, dtype=torch.long).flatten().cpu() for b in blocks]
        if any(b.numel() == 0 for b in blocks):
            raise ValueError("cannot compute the KV of an empty block")
        decoder = self.lm.model.model
        # transformers 5 renamed past_key_values to cache; accept whichever this version takes
        cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        c = context.n_tokens
        ctx_hash = context_hash(context.token_ids)
        ctx_k, ctx_v = context.keys.to(self.device, self.dtype), context.values.to(self.device, self.dtype)
        out: list[BlockKV | None] = [None] * len(blocks)
        order = sorted(range(len(blocks)), key=lambda i: blocks[i].numel())
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            width = max(blocks[i].numel() for i in rows)
            self.check_length(c + width)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : blocks[i].numel()] = blocks[i]
            cache = DynamicCache(config=self.lm.model.config)
            for layer in range(self.n_layers):
                shape = (len(rows), -1, -1, -1)
                cache.update(ctx_k[layer][None].expand(shape), ctx_v[layer][None].expand(shape), layer)
            result = decoder(input_ids=ids.to(self.device), use_cache=True, **{cache_arg: cache})
            cache = result[cache_arg]
            keys = torch.stack([layer.keys for layer in cache.layers], dim=1)
            values = torch.stack([layer.values for layer in cache.layers], dim=1)
            for r, i in enumerate(rows):
                n = blocks[i].numel()
                out[i] = BlockKV(
                    token_ids=blocks[i],
                    keys=keys[r, :, :, c : c + n].clone(),
                    values=values[r, :, :, c : c + n].clone(),
                    base_pos=c,
                    fingerprint=self.fingerprint,
                    context=ctx_hash,
                )
        return out
