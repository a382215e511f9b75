"""The ``rcllm`` command: thin wrappers that parse flags, call the library and print.

Each command lives in its own module of rcllm/cli and adds itself to the app with ``register``.
"""

from __future__ import annotations

import os
import sys

import typer

from rcllm.cli.cache import register as register_cache
from rcllm.cli.check import register as register_check
from rcllm.cli.data import register as register_data
from rcllm.cli.demo import register as register_demo
from rcllm.cli.eval import register as register_eval
from rcllm.cli.finetune import register as register_finetune
from rcllm.cli.model import register as register_model
from rcllm.cli.serve import register as register_serve

app = typer.Typer(
    help="rcllm: reuse the KV cache of any prompt block (history, items) for fast LLM recommendation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# --help lists the commands in the order they are registered here, then the groups in theirs
register_model(app)
register_check(app)
register_demo(app)
register_cache(app)
register_data(app)
register_eval(app)
register_serve(app)
register_finetune(app)


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
