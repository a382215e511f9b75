"""What the commands share: the consoles, errors users can act on, torch threads, build progress."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

# Tables are wide: when output is piped, don't squeeze them into rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


class RichReporter:
    """Build progress as rich bars, one per phase, with ETA."""

    def __init__(self, progress):
        self.progress = progress

    def phase(self, name, total):
        task = self.progress.add_task(name, total=total)
        return lambda n=1: self.progress.advance(task, n)

    def log(self, message):
        self.progress.console.print(f"[dim]{message}[/]")
