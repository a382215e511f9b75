"""``rcllm build-cache`` and ``rcllm cache info | add-node``: build, inspect and grow a block cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from rcllm.cli import DEFAULT_HISTORY, DEFAULT_MODEL, MODEL_HELP
from rcllm.cli.common import RichReporter, console, err, fail, set_threads

cache_app = typer.Typer(help="Inspect and grow a block cache.", no_args_is_help=True)
DEFAULT_CACHE = Path("rcllm-cache")


def build_cache_command(
    catalog: Path = typer.Argument(..., help="Catalog: JSON Lines, one item per line (id, title, text, year, categories)."),
    out: Path = typer.Option(DEFAULT_CACHE, help="Cache folder (created; a rerun resumes it)."),
    nodes: int = typer.Option(2, min=1, help="Serving nodes to shard the item blocks across."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    users: Optional[Path] = typer.Option(None, help="histories.jsonl: user histories to precompute (replicated to every node). Default: none, item blocks only."),
    interactions: Optional[Path] = typer.Option(None, help="interactions.jsonl: keeps items that co-occur on one node. Default: none, placement by similarity only."),
    append: bool = typer.Option(False, help="Add new (cold-start) items to an existing cache: no rebuild."),
    embedder: str = typer.Option("minilm", help="Item embedder for placement: minilm | llm | a sentence-encoder folder."),
    max_item_tokens: int = typer.Option(256, help="Refuse items whose block would be longer than this."),
    history: int = typer.Option(DEFAULT_HISTORY, help="Most recent history items in a user's history block."),
    batch_size: int = typer.Option(16, help="Blocks computed per forward pass."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16: the dtype the model computes in."),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help="fp32 | bf16 | fp16 | int8: how KV blocks are stored (int8: 1 byte per value plus scales, decoded when read). Default: --dtype."),
    seed: int = typer.Option(0, help="Seed for clustering and placement."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: torch's default)."),
) -> None:
    """Validate a catalog, embed, cluster and place it on nodes, precompute item and history KV blocks."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rcllm.build.pipeline import BuildOptions, append_items, build_cache
    from rcllm.data.jsonl import DataFormatError
    from rcllm.store import IncompatibleCacheError

    set_threads(threads)
    options = BuildOptions(
        out=out, nodes=nodes, model=model, users=users, interactions=interactions, device=device, dtype=dtype,
        kv_dtype=kv_dtype, embedder=embedder, max_item_tokens=max_item_tokens, history=history, batch_size=batch_size, seed=seed,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=err) as progress:
            run = append_items if append else build_cache
            report = run(catalog, options, RichReporter(progress))
    except (DataFormatError, IncompatibleCacheError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    _print_build_report(report)


def _print_build_report(report) -> None:
    table = Table(title=f"cache {report.out}: {report.items} items, {report.users} user histories")
    for column in ("node", "items", "tokens", "blocks", "MiB"):
        table.add_column(column, justify="right")
    for n in report.nodes:
        table.add_row(str(n["node"]), str(n["items"]), str(n["tokens"]), str(n["blocks"]), f"{n['bytes'] / 2**20:.1f}")
    console.print(table)
    quality = Table(title="placement quality (higher is better)")
    quality.add_column("placement")
    measures = sorted({m for q in report.quality.values() for m in q})
    for m in measures:
        quality.add_column(m, justify="right")
    for name, q in report.quality.items():
        quality.add_row(name, *(f"{q[m]:.3f}" for m in measures))
    console.print(quality)
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    console.print(
        f"blocks computed {report.computed_blocks}, reused {report.reused_blocks}; token imbalance "
        f"{report.imbalance:.1%}; {report.bytes_per_token:.0f} bytes/token on disk (KV alone: "
        f"{report.expected_bytes_per_token} = layers x 2 x kv_heads x head_dim x dtype size); {phases}"
    )
    for note in report.notes:
        console.print(f"[dim]{note}[/]")


@cache_app.command("info")
def cache_info_command(
    cache: Path = typer.Argument(DEFAULT_CACHE, help="Cache folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What is in a cache: model, template, nodes, blocks and bytes per node."""
    from rcllm.store import cache_info

    try:
        info = cache_info(cache)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(info))
        return
    m = info["manifest"]
    console.print(f"[bold]{cache}[/]: model {m['model']['name']} ({m['model']['family']}, {m['model']['dtype']}, "
                  f"fingerprint {m['model']['fingerprint'][:12]}), KV stored as {m.get('kv_dtype') or m['model']['dtype']}, "
                  f"{m['items']['count']} items, {m['users']['count']} users")
    table = Table()
    for column in ("store", "address", "blocks", "tokens", "MiB", "bytes/token", "shards"):
        table.add_column(column, justify="right")
    for row in info["stores"]:
        table.add_row(row["name"], row.get("address", ""), str(row["blocks"]), str(row["tokens"]),
                      f"{row['bytes'] / 2**20:.1f}", f"{row['bytes_per_token']:.0f}", str(row["shards"]))
    console.print(table)


@cache_app.command("add-node")
def cache_add_node_command(
    cache: Path = typer.Argument(DEFAULT_CACHE, help="Cache folder."),
) -> None:
    """Grow the cache by one node: hand it whole clusters from the fullest nodes, moving only their blocks."""
    from rcllm.build.pipeline import add_node

    try:
        moved = add_node(cache)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    console.print(
        f"node {moved['node']} added: {moved['items']} items in {moved['clusters']} clusters moved, "
        f"{moved['bytes_moved'] / 2**20:.1f} MiB of {moved['bytes_total'] / 2**20:.1f} MiB "
        f"({moved['fraction']:.1%}; ideal 1/{moved['nodes']} = {1 / moved['nodes']:.1%}); "
        f"token imbalance {moved['imbalance']:.1%}"
    )


def register(app: typer.Typer) -> None:
    """Add the ``build-cache`` command and the ``cache`` group to the ``rcllm`` app."""
    app.command("build-cache")(build_cache_command)
    app.add_typer(cache_app, name="cache")
