"""``rcllm model pull``: convert an embedded model once into the user cache."""

from __future__ import annotations

import typer

from rcllm.cli import DEFAULT_MODEL
from rcllm.cli.common import fail

model_app = typer.Typer(help="Manage models (the embedded default and your own).", no_args_is_help=True)


@model_app.command("pull")
def model_pull(name: str = typer.Argument(DEFAULT_MODEL, help="Embedded model to convert to a safetensors folder.")) -> None:
    """Convert an embedded model once into the user cache and print its folder."""
    from rcllm.engine.models import EMBEDDED_MODELS, pull_embedded

    if name not in EMBEDDED_MODELS:
        fail(f"unknown embedded model {name!r}; embedded: {', '.join(EMBEDDED_MODELS)}")
    try:
        path = pull_embedded(name)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    print(path)


def register(app: typer.Typer) -> None:
    """Add the ``model`` group to the ``rcllm`` app."""
    app.add_typer(model_app, name="model")
