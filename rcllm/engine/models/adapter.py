"""LoRA adapter folders: a fine-tune kept as a few MB of low-rank weights over a base model.

``rcllm finetune --method lora --adapter-only`` writes one: peft's ``adapter_config.json`` and
``adapter_model.safetensors``, :data:`ADAPTER_FILE` naming the base model as the run was given it
(an embedded name, a local folder, a hub id) with the base's fingerprint, and the files any model
folder of rcllm's has (prompt template, training report, gated policy). :func:`load_model` opens
such a folder like any other model: it loads the base, checks that it is still the model the
adapter was trained on, applies the adapter and merges it into the weights, so the engine runs a
plain model and nothing downstream needs to know.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

ADAPTER_FILE = "rcllm-adapter.json"  # in an adapter folder: the base model and its fingerprint
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterInfo:
    base: str  # the base model: an embedded name, an absolute folder or a hub id
    base_fingerprint: str  # LoadedModel.fingerprint of the base the adapter was trained on
    # state_dict_hash of that base: its weights' values, whatever bytes a conversion wrote them as
    base_state: str | None = None


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ADAPTER_FILE).is_file()


def read_adapter(folder: str | os.PathLike) -> AdapterInfo:
    """The base an adapter folder applies to; a clear error when the folder is incomplete."""
    folder = Path(folder)
    path = folder / ADAPTER_FILE
    try:
        data = json.loads(path.read_text())
        info = AdapterInfo(
            base=str(data["base"]), base_fingerprint=str(data["base_fingerprint"]), base_state=data.get("base_state")
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a readable adapter description ({type(error).__name__}: {error})") from error
    missing = [name for name in (PEFT_CONFIG, PEFT_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"adapter folder {folder} is incomplete: {', '.join(missing)} missing")
    return info


def adapter_rank(folder: str | os.PathLike) -> int | None:
    """The LoRA rank an adapter folder was trained with (peft's config)."""
    return json.loads((Path(folder) / PEFT_CONFIG).read_text()).get("r")


def base_name(name: str) -> str:
    """How an adapter records its base: a local folder as an absolute path, anything else as given."""
    folder = Path(name).expanduser()
    return str(folder.resolve()) if folder.is_dir() else name


def write_adapter(folder: Path, peft_model, base: str, base_fingerprint: str, base_state: str) -> None:
    """Write the LoRA weights of ``peft_model`` (a peft ``PeftModel``) and what they apply to into
    ``folder`` (a folder being filled, e.g. by :func:`rcllm.files.write_folder`)."""
    peft_model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card template, empty here
    # peft records the folder the base was loaded from (for the embedded model, a converted copy in
    # this machine's cache); name the base as the run was given it instead, as ADAPTER_FILE does
    name = base_name(base)
    config_path = folder / PEFT_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    description = {"base": name, "base_fingerprint": base_fingerprint, "base_state": base_state,
                   "format": "peft-lora"}  # fmt: skip
    (folder / ADAPTER_FILE).write_text(json.dumps(description, indent=2) + "\n")


def merge_adapter(model, folder: str | os.PathLike):
    """``model`` (the base, in memory) with the adapter in ``folder`` applied and merged into its
    weights: the same arithmetic as merging at the end of training."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=False).merge_and_unload()


def adapted_weights_hash(base_fingerprint: str, adapter_weights: str) -> str:
    """The weight identity of base + adapter, for :func:`model_fingerprint`: it changes when either does."""
    return hashlib.sha256(f"{base_fingerprint}\0{adapter_weights}".encode()).hexdigest()
