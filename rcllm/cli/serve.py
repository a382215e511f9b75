"""``rcllm serve`` and ``rcllm coordinator``: parse flags, open the cache, run the aiohttp app.

Addresses come from the cache manifest (node k listens on ``manifest.nodes[k]``; the coordinator
on 127.0.0.1:8000); flags override them. Nodes bind 127.0.0.1 unless ``--host`` says otherwise.
``--token`` (or ``RCLLM_TOKEN``) guards every call to a node but ``/health``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Optional

import typer

DEFAULT_CACHE = Path("rcllm-cache")
from rcllm.cli import FALLBACK_POLICY, TOKEN_HELP


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def serve(
    node: int = typer.Option(..., "--node", min=0, help="Which node of the cache to serve."),
    cache: Path = typer.Option(DEFAULT_CACHE, help="Cache folder built by rcllm build-cache."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: Optional[int] = typer.Option(None, help="Port (default: the manifest's port for this node; 0: any free port)."),
    model: Optional[str] = typer.Option(None, help="Model folder or name (default: the one the cache was built with)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    cuda_graphs: str = typer.Option(
        "auto", help="auto | on | off: a request that runs alone replays its recompute pass as a CUDA graph (one per "
        "size bucket, captured on first use); auto: on with --device cuda. On CPU `on` runs the same static pass eagerly.",
    ),
    graph_tokens: int = typer.Option(2048, min=1, help="Longest prompt the CUDA-graph buffers hold; longer ones run eagerly."),
    policy: Optional[str] = typer.Option(
        None, help="Policy for requests that name none: none | boundary:K | tail:K | deviation:R | full. Default: the model's "
        f"gated policy (rcllm-policy.json in its folder, written by rcllm check --sweep), else {FALLBACK_POLICY}.",
    ),
    hot_mb: float = typer.Option(256.0, help="Memory budget of the hot block tier, MiB."),
    max_queue: int = typer.Option(64, min=1, help="Requests waiting for the engine before the node answers 503."),
    max_batch: int = typer.Option(
        8, min=1, help="Ranking requests that queued while the engine was busy run as one batched forward, up to "
        "this many (1: one at a time)."
    ),
    peers: Optional[str] = typer.Option(
        None, help="Every node's address host:port,... in node order, for block fetches (default: the manifest's)."
    ),
    token: Optional[str] = typer.Option(None, envvar="RCLLM_TOKEN", help=TOKEN_HELP),
    threads: int = typer.Option(0, help="Torch CPU threads (0: torch's default)."),
    log_level: str = typer.Option("info", help="debug (one line per request) | info | warning."),
) -> None:
    """Serve one node: its item blocks, the replicated history blocks, and the ranking engine."""
    from rcllm.engine.policy import parse_policy
    from rcllm.serve.http import event, parse_address, serve_until_signalled, setup_logging
    from rcllm.serve.node import NodeServer
    from rcllm.serve.runner import NodeRunner
    from rcllm.store import IncompatibleCacheError, Manifest

    setup_logging(log_level, role="node", node=node)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    try:
        if policy is not None:
            parse_policy(policy)
        manifest = Manifest.load(cache)
        runner = NodeRunner.open(
            cache, node, hot_bytes=int(hot_mb * 2**20), policy=policy, model=model, device=device,
            cuda_graphs=cuda_graphs, graph_tokens=graph_tokens,
        )
    except (FileNotFoundError, IncompatibleCacheError, ValueError) as e:
        _fail(str(e))
    if peers:
        addresses = [a.strip() for a in peers.split(",") if a.strip()]
        if len(addresses) != len(manifest.nodes):
            _fail(f"--peers names {len(addresses)} addresses; the cache has {len(manifest.nodes)} nodes")
        try:
            for a in addresses:
                parse_address(a)
        except ValueError as e:
            _fail(f"--peers: {e}")
        urls = {k: f"http://{a}" for k, a in enumerate(addresses)}
    else:
        urls = {n["node"]: f"http://{n['host']}:{n['port']}" for n in manifest.nodes}
    event("default policy", policy=runner.policy, reason=runner.policy_reason)
    server = NodeServer(runner, {k: u for k, u in urls.items() if k != node}, token=token, max_queue=max_queue,
                        max_batch=max_batch)
    listen = manifest.nodes[node]["port"] if port is None else port
    asyncio.run(serve_until_signalled(server.app(), host, listen, role="node", node=node))


def coordinator(
    cache: Path = typer.Option(DEFAULT_CACHE, help="Cache folder built by rcllm build-cache."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="Port (0: any free port)."),
    nodes: Optional[str] = typer.Option(None, help="Node addresses host:port,... in node order (default: the manifest's)."),
    routing: str = typer.Option("affinity", help="affinity | round-robin | user-hash."),
    token: Optional[str] = typer.Option(None, envvar="RCLLM_TOKEN", help=TOKEN_HELP),
    poll_every: float = typer.Option(0.5, help="Seconds between health/state polls of each node."),
    poll_timeout: float = typer.Option(1.0, help="A poll slower than this counts as failed."),
    replicate_every: float = typer.Option(2.0, help="Seconds between hot-item replication rounds."),
    log_level: str = typer.Option("info", help="debug (one line per request) | info | warning."),
) -> None:
    """Route requests to the nodes (affinity to cached blocks against load), fail over, replicate hot items."""
    from rcllm.serve.coordinator import Coordinator
    from rcllm.serve.http import parse_address, serve_until_signalled, setup_logging

    setup_logging(log_level, role="coordinator")
    try:
        addresses = None
        if nodes:
            addresses = [a.strip() for a in nodes.split(",") if a.strip()]
            for a in addresses:
                parse_address(a)
        coord = Coordinator.from_cache(
            cache, addresses, strategy=routing, token=token, poll_every=poll_every, poll_timeout=poll_timeout,
            replicate_every=replicate_every,
        )
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    asyncio.run(serve_until_signalled(coord.app(), host, port, role="coordinator"))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("coordinator")(coordinator)


if __name__ == "__main__":  # `python -m rcllm.cli.serve serve|coordinator ...`, without the rest of the CLI
    standalone = typer.Typer(pretty_exceptions_enable=False, no_args_is_help=True)
    register(standalone)
    standalone()
