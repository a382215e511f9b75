"""Correction policies: which tokens each layer recomputes over the assembled context.

Pure functions on token masks; the forward pass asks them which positions to compute.
Tokens of fresh segments are always recomputed (they have no cached KV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rcllm.engine.errors import RequestError

POLICY_HELP = "none | boundary:K | tail:K | deviation:R | full"


@dataclass(frozen=True)
class Policy:
    kind: str  # "none" | "boundary" | "tail" | "deviation" | "full"
    k: int = 0  # boundary: first k tokens of every cached block; tail: its last k
    ratio: float = 0.0  # deviation: fraction of cached tokens recomputed after the check layer
    check_layer: int = 1  # deviation: layers 0..check_layer are recomputed in full

    def __str__(self) -> str:
        if self.kind in ("boundary", "tail"):
            return f"{self.kind}:{self.k}"
        if self.kind == "deviation":
            return f"deviation:{self.ratio:g}"
        return self.kind


def parse_policy(text: str | Policy) -> Policy:
    """``none``, ``full``, ``boundary:K`` or ``tail:K`` (K >= 0 tokens) or ``deviation:R`` (0 <= R <= 1)."""
    if isinstance(text, Policy):
        return text
    name, _, arg = str(text).strip().partition(":")
    try:
        if name in ("none", "full") and not arg:
            return Policy(name)
        if name in ("boundary", "tail"):
            k = int(arg)
            if k >= 0:
                return Policy(name, k=k)
        if name == "deviation":
            ratio = float(arg)
            if 0.0 <= ratio <= 1.0:
                return Policy("deviation", ratio=ratio)
    except ValueError:
        pass
    raise RequestError(f"unknown correction policy {text!r}; expected {POLICY_HELP}")


def base_selection(
    policy: Policy,
    fresh: torch.Tensor,
    block_offset: torch.Tensor,
    exact: torch.Tensor | None = None,
    block_remaining: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask [L] of the tokens recomputed from the first layer on.

    ``fresh``: tokens of fresh segments; ``block_offset``: each token's index inside its
    segment; ``block_remaining``: how many tokens of its segment follow it (needed by ``tail``);
    ``exact``: tokens of cached blocks that sit where, and behind what, they were computed (their
    KV already equals a plain prefill's, so no policy spends work on them). Deviation starts from
    every other token and narrows after its check layer. ``tail:K`` recomputes the last K tokens
    of every cached block: the ones next to the fresh tokens that follow it, reading the history
    in place of the block's end, the way ``rcllm finetune --curriculum`` trains a model to use.
    """
    exact = torch.zeros_like(fresh) if exact is None else exact
    if policy.kind == "full":
        return torch.ones_like(fresh)
    if policy.kind == "deviation":
        return ~exact
    if policy.kind == "boundary":
        return fresh | ((block_offset < policy.k) & ~exact)
    if policy.kind == "tail":
        if block_remaining is None:
            raise ValueError("the tail policy needs each token's distance to its block's end")
        return fresh | ((block_remaining < policy.k) & ~exact)
    return fresh.clone()


def deviation_selection(
    policy: Policy, fresh: torch.Tensor, deviation: torch.Tensor, exact: torch.Tensor | None = None
) -> torch.Tensor:
    """Fresh tokens plus the ``ratio`` share of the other non-exact tokens with the largest ``deviation`` [L]."""
    movable = ~fresh if exact is None else ~fresh & ~exact
    n_movable = int(movable.sum())
    # round() first: 0.55 * 100 is 55.000000000000007 in floats, which must pick 55, not 56
    n_pick = min(n_movable, math.ceil(round(policy.ratio * n_movable, 9)))
    selected = fresh.clone()
    if n_pick:
        scores = torch.where(movable, deviation.float(), torch.tensor(float("-inf")))
        selected[torch.topk(scores, n_pick).indices] = True
    return selected
