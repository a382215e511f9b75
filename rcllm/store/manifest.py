"""The cache manifest: the single description of a cache folder, and the check that a model may use it.

``CACHE_DIR/manifest.json`` records the model the blocks were computed with, the prompt
template and block context that produced their token ids, the nodes, the placement and what each
store must hold. Serving, eval and a rerun of the build read it; nothing else about a cache is
guessed from its files. Only planning a cache (and growing it) writes it: whether a store is
built is its own record's to say (:mod:`rcllm.store.built`), so N processes building N nodes
never write one file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from rcllm.files import write_file

if TYPE_CHECKING:
    from rcllm.engine.models import LoadedModel

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
BASE_PORT = 8100


class IncompatibleCacheError(ValueError):
    """The cache was built for another model, tokenizer, dtype or prompt template."""


def node_dir(cache_dir: Path, k: int) -> Path:
    return Path(cache_dir) / f"node-{k}"


def users_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "users"


def placement_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "placement"


def default_nodes(n_nodes: int, host: str = "127.0.0.1") -> list[dict]:
    """Node k listens on ``host:8100 + k``."""
    return [{"node": k, "host": host, "port": BASE_PORT + k} for k in range(n_nodes)]


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_record(lm: LoadedModel) -> dict:
    """What the manifest records about the model that computed the blocks."""
    config = lm.model.config
    return {
        "name": lm.name,
        "path": str(lm.path),
        "family": lm.family,
        "fingerprint": lm.fingerprint,
        "tokenizer_hash": lm.tokenizer_hash,
        "dtype": _dtype_name(lm.dtype),
        "n_layers": config.num_hidden_layers,
        "kv_heads": config.num_key_value_heads,
        "head_dim": lm.head_dim,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    version: int = MANIFEST_VERSION
    model: dict = field(default_factory=dict)  # model_record(): name, path, family, fingerprint, ...
    kv_dtype: str = ""  # how the blocks store KV (fp32, bf16, fp16, int8); "": the model's dtype (older caches)
    template: dict = field(default_factory=dict)  # PromptTemplate.to_dict()
    block_context: dict = field(default_factory=dict)  # system prefix token ids and its block key
    nodes: list[dict] = field(default_factory=list)  # {"node": k, "host": ..., "port": ...}
    placement: dict = field(default_factory=dict)  # summary: n_clusters, items and tokens per node
    items: dict = field(default_factory=dict)  # counts
    users: dict = field(default_factory=dict)
    # What each store folder (node-<k>, users) holds once built: blocks, tokens, the sha256 of its
    # sorted keys. Written by the plan only; each store records its own completion (store/built.py).
    stores: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)  # stats: seconds per phase, ...
    created: str = ""  # ISO 8601, UTC
    updated: str = ""
    # Where it was loaded from or saved to; not part of the file.
    cache_dir: Path | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["cache_dir"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        known = {f.name for f in fields(cls)} - {"cache_dir"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown manifest fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def load(cls, cache_dir: Path) -> "Manifest":
        cache_dir = Path(cache_dir)
        path = cache_dir / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no rcllm cache at {cache_dir}: run rcllm build-cache first")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); rebuild with rcllm build-cache") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a manifest (a JSON object); rebuild with rcllm build-cache")
        version = data.get("version")
        if version != MANIFEST_VERSION:
            raise ValueError(
                f"{path} has manifest version {version}, this rcllm reads version {MANIFEST_VERSION}: "
                "rebuild with rcllm build-cache (or use the rcllm that built it)"
            )
        try:
            manifest = cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        manifest.cache_dir = cache_dir
        return manifest

    def save(self, cache_dir: Path) -> Path:
        """Write ``cache_dir/manifest.json`` atomically; sets ``created`` (once) and ``updated``."""
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.updated = _now()
        self.created = self.created or self.updated
        path = cache_dir / MANIFEST_NAME
        write_file(path, json.dumps(self.to_dict(), indent=2) + "\n")
        self.cache_dir = cache_dir
        return path


def _dtype_flag(name: str) -> str:
    from rcllm.engine.api import DTYPES

    flags = {_dtype_name(dtype): flag for flag, dtype in DTYPES.items()}
    return flags.get(name, name)


def stored_kv_dtype(manifest: Manifest) -> str:
    """How the cache's blocks store KV: ``fp32``, ``bf16``, ``fp16`` or ``int8``."""
    return manifest.kv_dtype or _dtype_flag(manifest.model.get("dtype", ""))


LATER_TEMPLATE_FIELDS = {"categories_last": False}  # prompt template fields newer than some caches: their defaults


def check_compatible(manifest: Manifest, lm: LoadedModel, template: dict, kv_dtype: str | None = None) -> None:
    """Raise :class:`IncompatibleCacheError` unless ``lm`` with ``template`` may use the cache's blocks.

    Blocks are only valid for the model weights, tokenizer and dtype that computed them, and
    for the template that produced their token ids. ``kv_dtype``: how a build adding to the
    cache would store KV, which must be how its blocks are stored (serving reads any).
    """
    where = f"the cache at {manifest.cache_dir}" if manifest.cache_dir is not None else "the cache"
    built = manifest.model
    name = built.get("name", "?")
    rebuild = f"rebuild with rcllm build-cache --model {lm.name}"
    if built.get("fingerprint") != lm.fingerprint:
        raise IncompatibleCacheError(
            f"{where} was built for model {name} (fingerprint {str(built.get('fingerprint'))[:12]}) "
            f"but you are running {lm.name} ({lm.fingerprint[:12]}): {rebuild}"
        )
    if built.get("tokenizer_hash") != lm.tokenizer_hash:
        raise IncompatibleCacheError(
            f"{where} was built with the tokenizer of {name} (hash {str(built.get('tokenizer_hash'))[:12]}) "
            f"but {lm.name} has another tokenizer ({lm.tokenizer_hash[:12]}): {rebuild}"
        )
    running = _dtype_name(lm.dtype)
    if built.get("dtype") != running:
        cached = str(built.get("dtype"))
        raise IncompatibleCacheError(
            f"{where} holds {cached} KV of {name} but you are running it in {running}: "
            f"run with --dtype {_dtype_flag(cached)}, or {rebuild} --dtype {_dtype_flag(running)}"
        )
    template = dict(template)
    # a template field added after a cache was built is absent from its manifest: the cache was
    # built with what the field's default does (e.g. categories_last: False)
    built_with = {**{k: v for k, v in LATER_TEMPLATE_FIELDS.items() if k in template}, **manifest.template}
    if built_with != template:
        names = set(built_with) | set(template)
        differ = sorted(k for k in names if built_with.get(k) != template.get(k))
        raise IncompatibleCacheError(
            f"{where} was built with another prompt template (fields that differ: {', '.join(differ)}), "
            f"so its blocks hold other token ids: serve with the cache's template, or {rebuild} and your template"
        )
    stored = stored_kv_dtype(manifest)
    if kv_dtype is not None and kv_dtype != stored:
        raise IncompatibleCacheError(
            f"{where} stores {stored} KV but this build asks for --kv-dtype {kv_dtype}: rerun with --kv-dtype "
            f"{stored}, or build into another --out (or delete the cache) to store {kv_dtype}"
        )
