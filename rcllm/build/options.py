"""What a build is asked to do (:class:`BuildOptions`) and how it reports progress (:class:`Reporter`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rcllm.data.sampling import DEFAULT_HISTORY
from rcllm.engine.models import DEFAULT_MODEL


class Reporter:
    """Progress of the build's phases; the CLI passes one that draws rich progress bars."""

    def phase(self, name: str, total: int | None) -> Callable[[int], None]:
        return lambda n=1: None

    def log(self, message: str) -> None:
        pass


@dataclass
class BuildOptions:
    out: Path = Path("rcllm-cache")
    nodes: int = 2
    model: str = DEFAULT_MODEL
    users: Path | None = None
    # Stores the history blocks are split into, each built on its own (``--user-blocks --part K``):
    # a user's block goes to part rcllm.store.built.user_part(user id, user_parts); 1: one store, users/.
    user_parts: int = 1
    interactions: Path | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    kv_dtype: str | None = None  # how blocks are stored: fp32 | bf16 | fp16 | int8; None: as computed (dtype)
    embedder: str = "minilm"
    # Item vectors to place by instead of embedding the texts (rcllm.build.vectors); .npy rows are
    # named by ``embedding_ids`` (default: the file's name with .ids.json for .npy).
    embeddings: Path | None = None
    embedding_ids: Path | None = None
    max_item_tokens: int = 256
    history: int = DEFAULT_HISTORY
    batch_size: int = 16
    seed: int = 0
    max_shard_mb: int = 64
