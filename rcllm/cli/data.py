"""``rcllm data prepare``: a dataset written in rcllm's formats."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rcllm.cli import DATA_DIR_HELP, DATASET_HELP
from rcllm.cli.common import console, fail

data_app = typer.Typer(help="Datasets in rcllm's formats.", no_args_is_help=True)


@data_app.command("prepare")
def data_prepare(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    out: Path = typer.Option(..., "--out", help="Folder to write catalog.jsonl, interactions.jsonl, histories.jsonl."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
) -> None:
    """Write a dataset in rcllm's formats: the build-cache catalog, interactions and histories."""
    from rcllm.data.loaders import load_dataset, prepare

    try:
        data = load_dataset(dataset, data_dir=data_dir)
        written = prepare(data, out)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    console.print(f"{data.name}: {len(data.items)} items, {len(data.interactions)} interactions -> {out}")
    for path in written:
        print(path)


def register(app: typer.Typer) -> None:
    """Add the ``data`` group to the ``rcllm`` app."""
    app.add_typer(data_app, name="data")
