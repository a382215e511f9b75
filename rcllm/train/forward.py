"""A differentiable forward pass over ranking prompts, plain or with the attention of cached reuse.

Plain, it is the model's causal forward. Block-aware, each history and item block computes its
hidden states exactly as the block cache did: attending to the system prefix and to itself,
*at its base position* ``len(system)`` (where the cache computed it), while the labels and the
instruction read the block's keys at the block's real place in the prompt (where serving
re-rotates them). A key of a block token is therefore needed at two positions in the same layer:

- its base position, for the queries of its own block (which sit at base positions too);
- its real position, for the fresh tokens that follow.

A masked stock forward with ordinary position ids gets the second right and the first wrong:
the distance from a block token to the system prefix would be its real distance, not the one
the cache used. So we walk the model's own modules (norms, projections, MLP:
``rcllm.engine.layer``; LoRA layers are plain modules there too) and attend over both copies of
the keys, ``[base copy | real copy]``: block rows read the base copy, every other row the real
copy. The result equals the engine's ``none`` policy with every block cached, to float
rounding, and gradients flow through the block's hidden states as well as through the tokens
that read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcllm import kernels
from rcllm.engine.layer import finish, project
from rcllm.train.examples import EncodedPrompt
from rcllm.train.masks import block_attention_mask, block_positions, block_token_flags, with_recomputed_tails


@dataclass
class Batch:
    ids: torch.Tensor  # long [B, L], right-padded
    positions: torch.Tensor  # long [B, L]: each token's place in the prompt
    query_positions: torch.Tensor  # long [B, L]: where each token computes (base position for block tokens)
    mask: torch.Tensor  # bool [B, 1, L, 2L] (block-aware: base copy, then real copy) or [B, 1, L, L]
    answer: torch.Tensor  # long [B]: index of each prompt's last token
    targets: torch.Tensor  # long [B]: the positive's slot
    n_candidates: int
    fresh: torch.Tensor  # bool [B, L]: recomputed under reuse (labels, links, instruction), not padding
    labels: torch.Tensor  # long [B, C]: index of each candidate's label token (the last token after its item)

    @property
    def block_aware(self) -> bool:
        return self.mask.shape[-1] == 2 * self.ids.shape[1]


def collate(
    prompts: Sequence[EncodedPrompt],
    block_aware: bool,
    device: torch.device | str = "cpu",
    tails: float = 0.0,
    floor: int = 0,
) -> Batch:
    """Pad prompts into one batch with the masks and positions of a plain or block-aware forward.

    ``tails`` (block-aware only): the share of every item block's last tokens that are recomputed
    (:func:`with_recomputed_tails`); 0 is reuse without correction. ``floor``: at least this many
    of every item block's last tokens are recomputed (what ``tail:K`` serves)."""
    if not prompts:
        raise ValueError("an empty batch")
    n_candidates = prompts[0].n_candidates
    if any(p.n_candidates != n_candidates for p in prompts):
        raise ValueError("every prompt of a batch needs the same number of candidates")
    b, width = len(prompts), max(p.ids.numel() for p in prompts)
    ids = torch.zeros(b, width, dtype=torch.long)
    positions = torch.arange(width).repeat(b, 1)
    query_positions = positions.clone()
    mask = torch.zeros(b, 1, width, 2 * width if block_aware else width, dtype=torch.bool)
    fresh = torch.zeros(b, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        n = prompt.ids.numel()
        ids[row, :n] = prompt.ids
        fresh[row, :n] = ~block_token_flags(prompt.layout)
        fresh[row, : prompt.layout[0][1]] = False  # the system prefix is cached too
        # padding rows see themselves only (no empty softmax row); no real row sees padding
        pad = torch.arange(n, width)
        mask[row, 0, pad, pad + (width if block_aware else 0)] = True
        if not block_aware:
            mask[row, 0, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            continue
        layout = with_recomputed_tails(prompt.layout, tails, floor) if tails or floor else prompt.layout
        allowed = block_attention_mask(layout)
        in_block = block_token_flags(layout)
        fresh[row, layout[0][1] : n] = ~in_block[layout[0][1] :]
        mask[row, 0, :n, :n] = allowed & in_block[:, None]
        mask[row, 0, :n, width : width + n] = allowed & ~in_block[:, None]
        query_positions[row, :n] = block_positions(layout)
    return Batch(
        ids=ids.to(device),
        positions=positions.to(device),
        query_positions=query_positions.to(device),
        mask=mask.to(device),
        answer=torch.tensor([p.ids.numel() - 1 for p in prompts], device=device),
        targets=torch.tensor([p.target for p in prompts], device=device),
        n_candidates=n_candidates,
        fresh=fresh.to(device),
        labels=torch.stack([_label_positions(p) for p in prompts]).to(device),
    )


def _label_positions(prompt: EncodedPrompt) -> torch.Tensor:
    ends = [end - 1 for start, end in _spans(prompt.layout, "label")]
    if len(ends) != prompt.n_candidates:
        raise ValueError(f"a prompt of {prompt.n_candidates} candidates with {len(ends)} labels")
    return torch.tensor(ends)


def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` [B, L, heads, d] at ``positions`` [B, L]; returns [B, heads, L, d]."""
    b, n, heads, d = x.shape
    flat = x.permute(2, 0, 1, 3).reshape(heads, b * n, d)
    return kernels.apply_rope(flat, positions.reshape(-1), inv_freq).view(heads, b, n, d).transpose(0, 1)


def _layer(
    layer, h: torch.Tensor, batch: Batch, inv_freq: torch.Tensor, head_dim: int, probe: list | None = None
) -> torch.Tensor:
    attn = layer.self_attn
    n = h.shape[1]
    q, k, v = project(layer, h, head_dim)
    v = v.transpose(1, 2)
    q = _rope(q, batch.query_positions, inv_freq)
    keys = _rope(k, batch.positions, inv_freq)
    if batch.block_aware:
        keys = torch.cat([_rope(k, batch.query_positions, inv_freq), keys], dim=2)
        v = torch.cat([v, v], dim=2)
    if probe is None:
        o = F.scaled_dot_product_attention(
            q, keys, v, attn_mask=batch.mask, scale=attn.scaling, enable_gqa=q.shape[1] != keys.shape[1]
        )
    else:  # the same attention with its weights kept, for diagnostics
        group = q.shape[1] // keys.shape[1]
        keys, v = keys.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q @ keys.transpose(-1, -2)) * attn.scaling
        weights = scores.masked_fill(~batch.mask, float("-inf")).softmax(-1)
        o = weights @ v
        # block-aware: a key's two copies (base, real) are one token; fold them, average the heads
        folded = weights[..., :n] + weights[..., n:] if batch.block_aware else weights
        probe.append(folded.mean(1))
    return finish(layer, h, o.transpose(1, 2))


def answer_logits(
    model,
    batch: Batch,
    inv_freq: torch.Tensor,
    head_dim: int,
    hidden: list | None = None,
    probe: list | None = None,
    labels: list | None = None,
) -> torch.Tensor:
    """Next-token logits [B, vocab] at each prompt's last token (``model``: a *ForCausalLM).

    ``hidden``, when given, receives each layer's output [B, L, D]; ``probe`` each layer's
    attention weights [B, L, L] (heads averaged); ``labels`` the final normed states of the label
    tokens [B, C, D] (what :func:`match_scores` reads)."""
    decoder = model.model
    h = decoder.embed_tokens(batch.ids)
    for layer in decoder.layers:
        h = _layer(layer, h, batch, inv_freq, head_dim, probe)
        if hidden is not None:
            hidden.append(h)
    rows = torch.arange(h.shape[0], device=h.device)
    if labels is not None:
        labels.append(decoder.norm(h[rows[:, None], batch.labels]))
    return model.lm_head(decoder.norm(h[rows, batch.answer]))


def match_scores(model, label_states: torch.Tensor, match_ids: Sequence[int]) -> torch.Tensor:
    """Per candidate, ``logit(yes) - logit(no)`` at its label token [B, C]: whether the label,
    reading its own item and the history, judges the item a match. ``match_ids``: the (yes, no)
    token ids."""
    weight = model.lm_head.weight[list(match_ids)]
    logits = label_states @ weight.T.to(label_states.dtype)
    bias = getattr(model.lm_head, "bias", None)
    if bias is not None:
        logits = logits + bias[list(match_ids)]
    return (logits[..., 0] - logits[..., 1]).float()


def match_loss(scores: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the positive among the candidates' match scores: a listwise signal *at each
    label token*, where under reuse the comparison of item and history has to happen (the answer
    token can only pick a label; it cannot read an item that never saw the history)."""
    return F.cross_entropy(scores, batch.targets)


def label_logits(logits: torch.Tensor, batch: Batch, label_token_ids: Sequence[int]) -> torch.Tensor:
    """The answer logits of the batch's C candidate labels, in fp32: the distribution every label
    term reads (the ranking; mass on other tokens plays no part in it)."""
    ids = torch.tensor(list(label_token_ids[: batch.n_candidates]), device=logits.device)
    return logits[:, ids].float()


def label_loss(logits: torch.Tensor, batch: Batch, label_token_ids: Sequence[int]) -> torch.Tensor:
    """Cross-entropy of the positive's label within the candidates' label tokens.

    The softmax is restricted to the C label tokens because that is exactly the distribution
    the ranker reads; mass on other tokens plays no part in a ranking.
    """
    return F.cross_entropy(label_logits(logits, batch, label_token_ids), batch.targets)


def distill_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, batch: Batch, label_token_ids: Sequence[int], temperature: float
) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` of the label distributions softened by ``temperature``: the
    whole ranking the teacher reads, not only which candidate was right (Hinton et al.'s scaling
    keeps the gradient's size independent of T)."""
    student = F.log_softmax(label_logits(logits, batch, label_token_ids) / temperature, -1)
    teacher = F.log_softmax(label_logits(teacher_logits, batch, label_token_ids) / temperature, -1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def agreement_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, batch: Batch, label_token_ids: Sequence[int], margin: float = 0.0
) -> torch.Tensor:
    """The gate's top-1 agreement, trained directly: the student's label distribution against the
    teacher's top choice. The KL term barely sees a swap of two near-tied candidates (labels at
    0.30 and 0.28 exchanged cost it ~1e-3 nats, a gradient of 0.02 on each), yet such a swap is a
    lost top choice.

    ``margin`` 0: the cross-entropy against the teacher's top label, which pushes it up with 1 - p
    (0.72 there) whatever the margin, so it also sharpens the student beyond the teacher and, under
    a mutual teacher, the prefill through the KL. ``margin`` > 0: a hinge, the mean of
    ``max(0, margin - (z_top - max_{j != top} z_j))`` over the student's label logits ``z``: the
    teacher's top label must lead the student's runner-up by ``margin`` nats; once it does, the
    term is silent, and it never touches the order or spread of the other candidates."""
    z = label_logits(logits, batch, label_token_ids)
    top = label_logits(teacher_logits, batch, label_token_ids).argmax(-1)
    if margin <= 0:
        return F.cross_entropy(z, top)
    lead = z.gather(-1, top[:, None]).squeeze(-1)
    others = z.scatter(-1, top[:, None], float("-inf")).amax(-1)
    return F.relu(margin - (lead - others)).mean()


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], fresh: torch.Tensor) -> torch.Tensor:
    """Mean over layers, fresh tokens and dimensions of ``((h_student - h_teacher) / sigma)^2``,
    ``sigma`` being each dimension's spread over the teacher's fresh tokens of the batch.

    The fresh tokens (labels, links, instruction) are all that reuse recomputes; under a plain
    prefill their hidden states already hold the comparison of each item with the history (the
    item's own tokens read the history there). Asking the block-aware forward to reproduce them
    token by token and layer by layer is a signal C x layers x width times denser than the one
    answer label, and it names *where* the comparison has to happen.

    Per-dimension scaling matters: in SmolLM2-135M three of 576 dimensions hold 54-81% of a
    fresh token's squared norm in every layer from the third on, the same on every token, so a
    loss relative to the norm (0.08 there for a causal model read under reuse) is mostly those
    dimensions agreeing, while the centred error that carries the ranking is 0.37."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        s, t = s[fresh].float(), t[fresh].float()
        sigma = t.std(0, keepdim=True).clamp_min(1e-3) if t.shape[0] > 1 else t.abs().clamp_min(1e-3)
        losses.append(((s - t) / sigma).pow(2).mean())
    return torch.stack(losses).mean()


def label_attention(probe: Sequence[torch.Tensor], prompts: Sequence[EncodedPrompt]) -> dict[str, list[float]]:
    """Per layer, the attention mass the label tokens put on their own item block, on the history
    block, on the other items and on the system prefix (means over labels and prompts).

    A model that ranks under reuse must read its own item from the label (or link) token; a
    label whose mass on its own item stays where an untrained model has it learnt nothing there."""
    parts = ("own_item", "history", "other_items", "system")
    out: dict[str, list[float]] = {p: [] for p in parts}
    spans = [(_spans(p.layout, "history")[:1], _spans(p.layout, "item")) for p in prompts]
    for weights in probe:
        sums = dict.fromkeys(parts, 0.0)
        count = 0
        for row, prompt in enumerate(prompts):
            history, items = spans[row]
            start, item = 0, None
            for name, n in prompt.layout:
                if name == "item":
                    item = (start, start + n)
                elif name == "label" and item is not None:
                    w = weights[row, start].float()
                    own = float(w[item[0] : item[1]].sum())
                    sums["own_item"] += own
                    sums["system"] += float(w[: prompt.layout[0][1]].sum())
                    sums["history"] += sum(float(w[a:b].sum()) for a, b in history)
                    sums["other_items"] += sum(float(w[a:b].sum()) for a, b in items if b <= start) - own
                    count += 1
                start += n
        for p in parts:
            out[p].append(sums[p] / max(count, 1))
    return out


def _spans(layout, kind: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for name, n in layout:
        if name == kind:
            spans.append((start, start + n))
        start += n
    return spans


@torch.no_grad()
def probe_label_attention(
    model, prompts: Sequence[EncodedPrompt], inv_freq: torch.Tensor, head_dim: int
) -> dict[str, list[float]]:
    """:func:`label_attention` of ``model`` (in eval mode for the probe) under the block-aware pattern."""
    was_training = model.training
    model.eval()
    try:
        weights: list = []
        batch = collate(prompts, True, next(model.parameters()).device)
        answer_logits(model, batch, inv_freq, head_dim, probe=weights)
        return label_attention(weights, prompts)
    finally:
        model.train(was_training)


@torch.no_grad()
def probe_match(model, prompts: Sequence[EncodedPrompt], inv_freq: torch.Tensor, head_dim: int, match_ids) -> dict:
    """HR@1 of the candidates ranked by their :func:`match_scores`, under a plain prefill and under
    the block-aware pattern (= serving with every block cached and no correction)."""
    was_training = model.training
    model.eval()
    try:
        out = {}
        device = next(model.parameters()).device
        for name, aware in (("plain", False), ("reuse", True)):
            batch, states = collate(prompts, aware, device), []
            answer_logits(model, batch, inv_freq, head_dim, labels=states)
            top = match_scores(model, states[0], match_ids).argmax(-1)
            out[name] = float((top == batch.targets).float().mean())
        return out
    finally:
        model.train(was_training)
