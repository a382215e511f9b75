"""The attention pattern of cached reuse, as masks and positions for a training forward.

Under reuse without correction (the ``none`` policy) a history or item block was computed alone,
right after the system prefix: its tokens saw only the system prefix and the block itself, at
positions ``len(system), len(system) + 1, ...``. Labels and the instruction are fresh and see
everything before them. These pure functions describe that pattern for one prompt layout, a list
of ``(segment name, token count)`` as :meth:`Ranker.segments` names them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BLOCK_KINDS = ("history", "item")  # segments that serving may take from the block cache

Layout = Sequence[tuple[str, int]]


def block_aware_step(mode: str, step: int) -> bool:
    """Whether training step ``step`` (from 0) uses this pattern under ``--block-aware`` ``mode``:
    every step with ``on``, the even ones with ``mix``, none with ``off``."""
    return mode == "on" or (mode == "mix" and step % 2 == 0)


def with_recomputed_tails(layout: Layout, share: float, floor: int = 0) -> list[tuple[str, int]]:
    """``layout`` with the last ``max(floor, ceil(share * n))`` tokens (at most ``n``) of every
    item block of ``n`` tokens recomputed: split off as an ``item_tail`` segment, which is not a block kind and so sees the
    whole prompt before it at its real position, as the engine's recomputed tokens do.

    ``share`` 1 is a plain causal prefill of the items (the history follows the system prefix,
    where its cached KV is exact anyway); 0 is reuse without correction. Training along that path
    (``rcllm finetune --curriculum``) moves the comparison of each item with the history from
    all of the item's tokens towards the fresh tokens after it, a few tokens at a time. ``floor``
    K keeps the last K tokens recomputed whatever the share: the pattern the engine's ``tail:K``
    policy serves."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"a recomputed share of {share} is not within [0, 1]")
    if floor < 0:
        raise ValueError(f"a tail floor of {floor} tokens is negative")
    out: list[tuple[str, int]] = []
    for name, n in layout:
        k = min(n, max(floor, math.ceil(round(share * n, 9)))) if name == "item" else 0
        if n - k:
            out.append((name, n - k))
        if k:
            out.append(("item_tail", k))
    return out


def _segment_index(layout: Layout) -> torch.Tensor:
    """Per token, the index of the segment it belongs to."""
    if not layout or layout[0][0] != "system":
        raise ValueError("a prompt layout starts with its system segment")
    if any(n < 1 for _, n in layout):
        raise ValueError("every segment of a layout has at least one token")
    return torch.cat([torch.full((n,), k) for k, (_, n) in enumerate(layout)])


def _is_block_segment(layout: Layout) -> torch.Tensor:
    return torch.tensor([name in BLOCK_KINDS for name, _ in layout])


def block_attention_mask(layout: Layout) -> torch.Tensor:
    """Bool [L, L]: may token ``i`` attend to token ``j`` under cached reuse?

    Causal everywhere; in addition, a token of a history or item block sees only the system
    prefix and the earlier tokens of its own block.
    """
    seg = _segment_index(layout)
    n = seg.numel()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    system = (seg == 0)[None, :]
    own_block = seg[:, None] == seg[None, :]
    in_block = _is_block_segment(layout)[seg][:, None]
    return causal & (~in_block | system | own_block)


def block_positions(layout: Layout) -> torch.Tensor:
    """Long [L]: the position each token was computed at in serving.

    A block's tokens sit at ``len(system) + offset`` (its base position, where the cache
    computed it); every other token at its place in the prompt.
    """
    seg = _segment_index(layout)
    positions = torch.arange(seg.numel())
    base = layout[0][1]
    start = 0
    for name, n in layout:
        if name in BLOCK_KINDS:
            positions[start : start + n] = torch.arange(base, base + n)
        start += n
    return positions


def block_token_flags(layout: Layout) -> torch.Tensor:
    """Bool [L]: the token belongs to a history or item block."""
    return _is_block_segment(layout)[_segment_index(layout)]
