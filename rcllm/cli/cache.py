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


# Set when planning; building a node or the history blocks takes them from the plan.
PLANNED_OPTIONS = ("nodes", "users", "user_parts", "interactions", "kv_dtype", "embedder", "embeddings", "embedding_ids",
                   "max_item_tokens", "history", "seed")


def build_cache_command(
    ctx: typer.Context,
    catalog: Optional[Path] = typer.Argument(
        None, help="Catalog: JSON Lines, one item per line (id, title, text, year, categories). Required, but for "
        "--node and --user-blocks: they build from the plan's copy (a catalog given must be the planned one)."),
    out: Path = typer.Option(DEFAULT_CACHE, help="Cache folder (created; a rerun resumes it)."),
    nodes: int = typer.Option(2, min=1, help="Serving nodes to shard the item blocks across."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP + " With --node/--user-blocks: the plan's, unless given."),
    users: Optional[Path] = typer.Option(None, help="histories.jsonl: user histories to precompute (replicated to every node). Default: none, item blocks only."),
    user_parts: int = typer.Option(1, "--user-parts", min=1, help="Split the --users history blocks into N stores "
                                   "(users-0 .. users-<N-1>, by a stable hash of the user id), each built on its own "
                                   "with --user-blocks --part K (set when planning). Default 1: one store, users/."),
    interactions: Optional[Path] = typer.Option(None, help="interactions.jsonl: keeps items that co-occur on one node. Default: none, placement by similarity only."),
    append: bool = typer.Option(False, help="Add new (cold-start) items to an existing cache: no rebuild."),
    plan: bool = typer.Option(False, "--plan", help="Only validate, embed, cluster, place and write the manifest, no KV; "
                              "then build each node with --node K (on any machine sharing or copying --out) and the "
                              "history blocks with --user-blocks."),
    node: Optional[int] = typer.Option(None, min=0, help="Build only node K's item blocks of the cache planned in --out "
                                       "(a rerun resumes). Default: plan, then build every node and the history blocks."),
    user_blocks: bool = typer.Option(False, "--user-blocks", help="Build only the replicated history blocks of the cache "
                                     "planned in --out (the --users histories given when planning): every part in turn, "
                                     "or only --part K."),
    part: Optional[int] = typer.Option(None, "--part", min=0, help="With --user-blocks: build only part K of the history "
                                       "blocks (a plan with --user-parts N has parts 0..N-1; a rerun resumes). Default: every part in turn."),
    embedder: str = typer.Option("minilm", help="Item embedder for placement: minilm | llm | a sentence-encoder folder."),
    embeddings: Optional[Path] = typer.Option(
        None, help="Your item vectors to place by, instead of embedding the texts: .npy (row ids in a JSON list, "
        "FILE.ids.json or --embedding-ids), .npz (arrays id and vector), .parquet (columns id and vector; needs "
        "pyarrow). Default: none, --embedder embeds the item texts."),
    embedding_ids: Optional[Path] = typer.Option(None, help="JSON list of the item id of each row of an --embeddings "
                                                 ".npy. Default: the .npy's name with .ids.json."),
    max_item_tokens: int = typer.Option(256, help="Refuse items whose block would be longer than this."),
    history: int = typer.Option(DEFAULT_HISTORY, help="Most recent history items in a user's history block."),
    batch_size: int = typer.Option(16, help="Blocks computed per forward pass."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16: the dtype the model computes in. With --node/--user-blocks: the plan's, unless given."),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help="fp32 | bf16 | fp16 | int8: how KV blocks are stored (int8: 1 byte per value plus scales, decoded when read). Default: --dtype."),
    seed: int = typer.Option(0, help="Seed for clustering and placement."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: torch's default)."),
) -> None:
    """Validate a catalog, embed, cluster and place it on nodes, precompute item and history KV blocks.

    Or one step at a time: --plan once, then --node K for each node and --user-blocks (or --user-blocks
    --part K for each part of --user-parts), anywhere.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rcllm.build.pipeline import BuildOptions, append_items, build_cache, build_node, build_users, plan_cache, plan_options
    from rcllm.data.jsonl import DataFormatError
    from rcllm.store import IncompatibleCacheError, StoreBusyError

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name).name != "DEFAULT"

    if part is not None and not user_blocks:
        fail(f"--part {part} picks a part of the history blocks: use it with --user-blocks "
             f"(`rcllm build-cache --user-blocks --part {part} --out {out}`)")
    steps = [flag for flag, on in (("--plan", plan), ("--node", node is not None), ("--user-blocks", user_blocks),
                                   ("--append", append)) if on]
    if len(steps) > 1:
        fail(f"{' and '.join(steps)} are separate steps: run one at a time")
    one_store = node is not None or user_blocks
    if one_store:
        fixed = [f"--{name.replace('_', '-')}" for name in PLANNED_OPTIONS if given(name)]
        if fixed:
            fail(f"{', '.join(fixed)}: set when the cache was planned; {steps[0]} builds the plan as it is "
                 f"(plan again with --plan to change it)")
    elif catalog is None:
        fail("missing the catalog (catalog.jsonl): only --node K and --user-blocks build from a planned --out without one")
    set_threads(threads)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    try:
        if one_store:
            options = plan_options(out, model=model if given("model") else None, dtype=dtype if given("dtype") else None,
                                   device=device, batch_size=batch_size)
        else:
            options = BuildOptions(
                out=out, nodes=nodes, model=model, users=users, interactions=interactions, device=device, dtype=dtype,
                kv_dtype=kv_dtype, embedder=embedder, embeddings=embeddings, embedding_ids=embedding_ids,
                max_item_tokens=max_item_tokens, history=history, batch_size=batch_size, seed=seed, user_parts=user_parts,
            )
        with Progress(*columns, console=err) as progress:
            reporter = RichReporter(progress)
            if node is not None:
                report = build_node(out, node, options, reporter, catalog=catalog)
            elif user_blocks:
                report = build_users(out, options, reporter, catalog=catalog, part=part)
            else:
                report = {"--plan": plan_cache, "--append": append_items}.get(steps[0] if steps else "", build_cache)(
                    catalog, options, reporter)
    except (DataFormatError, IncompatibleCacheError, FileNotFoundError, ValueError, StoreBusyError) as e:
        fail(str(e))
    if one_store:
        _print_store_builds(out, report if isinstance(report, list) else [report])
    elif plan:
        _print_plan_report(report)
    else:
        _print_build_report(report)


def _print_quality(quality: dict) -> None:
    table = Table(title="placement quality (higher is better)")
    table.add_column("placement")
    measures = sorted({m for q in quality.values() for m in q})
    for m in measures:
        table.add_column(m, justify="right")
    for name, q in quality.items():
        table.add_row(name, *(f"{q[m]:.3f}" for m in measures))
    console.print(table)


def _print_plan_report(report) -> None:
    table = Table(title=f"plan {report.out}: {report.items} items, {report.users} user histories (nothing computed yet)")
    for column in ("node", "items", "tokens", "blocks to build"):
        table.add_column(column, justify="right")
    for n in report.nodes:
        table.add_row(str(n["node"]), str(n["items"]), str(n["tokens"]), str(n["blocks"]))
    console.print(table)
    _print_quality(report.quality)
    source = report.embeddings
    placed_by = f"the vectors in {source['file']}" if source.get("source") == "file" else f"the {source.get('embedder')} embedder"
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    console.print(f"placed by {placed_by}; token imbalance {report.imbalance:.1%}; {phases}")
    last = len(report.nodes) - 1
    parts = len(report.user_parts)
    if parts > 1:
        console.print("history blocks in " + ", ".join(
            f"{p['store']} ({p['users']} users, {p['blocks']} blocks, {p['tokens']} tokens)" for p in report.user_parts))
        users_step = f"`rcllm build-cache --user-blocks --part P --out {report.out}` for P = 0..{parts - 1}"
    else:
        users_step = f"`rcllm build-cache --user-blocks --out {report.out}`"
    console.print(f"next, on any machines that share or copy {report.out}: `rcllm build-cache --node K --out {report.out}` "
                  f"for K = 0..{last} and {users_step}")


def _print_store_builds(out: Path, builds: list) -> None:
    from rcllm.store import Manifest, store_states

    for build in builds:
        record = build.record
        console.print(
            f"{build.store} built: {record['blocks']} blocks (computed {build.computed}, reused {build.reused}), "
            f"{record['tokens']} tokens, {record['bytes'] / 2**20:.1f} MiB in {build.seconds:.1f}s; "
            f"blocks digest {record['checksums_sha256'][:16]}"
        )
    states = store_states(out, Manifest.load(out))
    waiting = [s.name for s in states if s.needed and not s.built]
    built = [s.name for s in states if s.built]
    console.print(f"cache {out}: built {', '.join(built) or 'nothing'}; " + (
        f"still to build {', '.join(waiting)}" if waiting else "every store is built: ready to serve"))


def _print_build_report(report) -> None:
    table = Table(title=f"cache {report.out}: {report.items} items, {report.users} user histories")
    for column in ("node", "items", "tokens", "blocks", "MiB"):
        table.add_column(column, justify="right")
    for n in report.nodes:
        table.add_row(str(n["node"]), str(n["items"]), str(n["tokens"]), str(n["blocks"]), f"{n['bytes'] / 2**20:.1f}")
    console.print(table)
    _print_quality(report.quality)
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
    """What is in a cache: model, template, nodes, which stores are built, blocks and bytes per store."""
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
    for column in ("store", "address", "state", "blocks", "tokens", "MiB", "bytes/token", "shards"):
        table.add_column(column, justify="right")
    for row in info["stores"]:
        table.add_row(row["name"], row.get("address", ""), row["state"], str(row["blocks"]), str(row["tokens"]),
                      f"{row['bytes'] / 2**20:.1f}", f"{row['bytes_per_token']:.0f}", str(row["shards"]))
    console.print(table)
    for row in info["stores"]:
        if "command" in row:
            console.print(f"{row['name']} not built ({row['reason']}): run `{row['command']}`")


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
