"""The prompt as a list of segments, each fresh (token ids) or cached (KV from earlier)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


def context_hash(token_ids) -> str:
    """Identity of the token ids a block was computed after (its block context)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().cpu()
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:32]


@dataclass
class BlockKV:
    """KV of one block, computed after a block context, for every layer.

    ``keys`` and ``values`` are [layers, kv_heads, n, head_dim]; keys carry RoPE at positions
    ``base_pos .. base_pos + n - 1`` (where the block sat when it was computed).
    ``fingerprint`` names the model that computed it, so that a block is never spliced into
    another model's forward. ``context`` is the :func:`context_hash` of the ids it was computed
    after: placed at ``base_pos`` behind exactly those ids, the block is what a plain prefill
    computes (a prefix-cache hit) and needs no correction. None: unknown, never exact.
    """

    token_ids: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    base_pos: int
    fingerprint: str
    context: str | None = None

    def __post_init__(self) -> None:
        self.token_ids = torch.as_tensor(self.token_ids, dtype=torch.long).flatten().cpu()
        n = self.token_ids.numel()
        if self.keys.dim() != 4 or self.keys.shape != self.values.shape or self.keys.shape[2] != n:
            raise ValueError(
                f"block KV shapes {tuple(self.keys.shape)} / {tuple(self.values.shape)} do not match "
                f"[layers, kv_heads, {n} tokens, head_dim]"
            )
        if self.base_pos < 0:
            raise ValueError(f"block base position must be >= 0, got {self.base_pos}")

    @property
    def n_tokens(self) -> int:
        return self.token_ids.numel()

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass
class Segment:
    """One piece of a prompt. ``kv`` is None for a fresh segment (computed every time)."""

    token_ids: torch.Tensor
    kv: BlockKV | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.token_ids = torch.as_tensor(self.token_ids, dtype=torch.long).flatten().cpu()
        if self.kv is not None and not torch.equal(self.kv.token_ids, self.token_ids):
            raise ValueError(f"segment {self.name!r}: cached KV was computed for other token ids")

    @classmethod
    def fresh(cls, token_ids, name: str = "") -> "Segment":
        return cls(token_ids=token_ids, name=name)

    @classmethod
    def cached(cls, kv: BlockKV, name: str = "") -> "Segment":
        return cls(token_ids=kv.token_ids, kv=kv, name=name)

    @property
    def n_tokens(self) -> int:
        return self.token_ids.numel()

    @property
    def is_cached(self) -> bool:
        return self.kv is not None


def uncached(segments: list[Segment]) -> list[Segment]:
    """The same prompt with every segment fresh: what a plain prefill computes."""
    return [Segment.fresh(s.token_ids, s.name) for s in segments]
