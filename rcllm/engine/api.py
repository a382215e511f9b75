"""One call from a model name to a ready ranker: what the CLI, eval and serving start from."""

from __future__ import annotations

import os

import torch

from rcllm.engine.forward import BlockEngine
from rcllm.engine.model_policy import gated_label_offsets
from rcllm.engine.models import DEFAULT_MODEL, load_model
from rcllm.engine.prompt import PromptBuilder, PromptTemplate, model_template
from rcllm.engine.ranker import Ranker

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def open_ranker(
    model: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: str = "fp32",
    calibration: str = "contextual",
    template: PromptTemplate | None = None,
    label_offsets: bool = True,
) -> Ranker:
    """The ranker of ``model``. ``label_offsets``: apply the label offsets the gate fitted for this
    model's reuse policies (its policy file, :func:`~rcllm.engine.model_policy.gated_label_offsets`);
    off for work that never ranks with them (building caches) or fits its own (the gate)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    lm = load_model(model, device=device, dtype=parse_dtype(dtype))
    if template is None and os.path.isdir(lm.path):  # a model from rcllm finetune serves the template it learnt
        template = model_template(lm.path)
    ranker = Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer, template), calibration=calibration)
    if label_offsets:
        for policy, offsets in gated_label_offsets(lm.path, lm.fingerprint, calibration).items():
            ranker.label_offsets[policy] = torch.tensor(offsets)
    return ranker
