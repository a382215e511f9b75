"""Start a cluster on this machine: node processes and a coordinator process on loopback.

Used by ``rcllm demo``, the examples and the tests. Every child runs ``python -m rcllm.cli.serve``
with its stdout and stderr appended to ``<logs>/<name>.log``. On Linux each child is asked to
receive SIGTERM when the process that started it dies (``PR_SET_PDEATHSIG``), so even a parent
killed with SIGKILL leaves no server behind; :meth:`LocalCluster.stop` (also on ``with`` exit)
sends SIGTERM — the servers finish their in-flight requests — and kills what has not exited
after ``grace_s``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from rcllm.serve.client import RecommendClient, ServiceError

_PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    """A child process exited, or the cluster did not come up in time; the message holds its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


class LocalCluster:
    """``nodes`` node processes of ``cache`` and a coordinator, each on its own loopback port.

    ``node_ports`` default to free ports (nodes get ``--port`` and ``--peers``, the coordinator
    ``--nodes``: the manifest's addresses are overridden by flags and the cache is not modified); ``node_args`` / ``coordinator_args`` are extra command-line flags.
    """

    def __init__(
        self,
        cache: Path,
        logs: Path,
        nodes: int,
        node_ports: list[int] | None = None,
        coordinator_port: int | None = None,
        token: str | None = None,
        node_args: tuple[str, ...] = (),
        coordinator_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        grace_s: float = 20.0,
    ):
        self.cache, self.logs = Path(cache), Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.n_nodes = nodes
        self.ports = list(node_ports) if node_ports else [free_port() for _ in range(nodes)]
        if len(self.ports) != nodes:
            raise ValueError(f"{len(self.ports)} node ports for {nodes} nodes")
        self.coordinator_port = coordinator_port or free_port()
        self.url = f"http://127.0.0.1:{self.coordinator_port}"
        self.token = token
        self.node_args, self.coordinator_args = tuple(node_args), tuple(coordinator_args)
        self.grace_s = grace_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping: set[str] = set()
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        if token:
            self.env["RCLLM_TOKEN"] = token

    # -- processes -----------------------------------------------------------------------------

    def node_url(self, k: int) -> str:
        return f"http://127.0.0.1:{self.ports[k]}"

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rcllm.cli.serve", *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env, preexec_fn=_die_with_parent,
            )
        self.procs[name] = proc
        self.stopping.discard(name)
        return proc

    def start_node(self, k: int) -> subprocess.Popen:
        peers = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return self._start(
            f"node{k}", "serve", "--node", str(k), "--cache", str(self.cache), "--port", str(self.ports[k]),
            "--peers", peers, *self.node_args,
        )

    def start_coordinator(self) -> subprocess.Popen:
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return self._start(
            "coordinator", "coordinator", "--cache", str(self.cache), "--port", str(self.coordinator_port),
            "--nodes", nodes, *self.coordinator_args,
        )

    def start(self, timeout_s: float = 180.0) -> "LocalCluster":
        """Start every node and the coordinator; return once the coordinator sees all nodes up."""
        for k in range(self.n_nodes):
            self.start_node(k)
        self.start_coordinator()
        self.wait_until(lambda r: r.get("up") == self.n_nodes, f"{self.n_nodes} nodes up", timeout_s)
        return self

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_path(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to a process that is meant to stop (:meth:`check_alive` stops watching it)."""
        self.stopping.add(name)
        self.procs[name].send_signal(sig)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name not in self.stopping and proc.poll() is not None:
                raise ClusterError(f"{name} exited with {proc.returncode}; its log ({self.log_path(name)}):\n"
                                   f"{self.log_tail(name)}")

    def alive(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]

    def stop(self) -> dict[str, int]:
        """SIGTERM every child, wait up to ``grace_s``, then SIGKILL; returns each exit code."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return {name: proc.returncode for name, proc in self.procs.items()}

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the coordinator's view ----------------------------------------------------------------

    async def report_async(self) -> dict:
        async with RecommendClient(self.url, token=self.token, timeout_s=10) as client:
            return await client.get_json("/v1/cluster")

    def report(self) -> dict:
        """The coordinator's ``/v1/cluster`` (nodes up/down, routing counts, replication)."""
        return asyncio.run(self.report_async())

    def wait_until(self, condition, what: str, timeout_s: float = 120.0) -> dict:
        """Poll ``/v1/cluster`` until ``condition(report)``; raises :class:`ClusterError` on timeout
        or when a child exits."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                last = self.report()
                if condition(last):
                    return last
            except (aiohttp.ClientError, ServiceError, OSError, asyncio.TimeoutError):
                pass
            time.sleep(0.25)
        tails = "\n".join(f"--- {name}\n{self.log_tail(name, 10)}" for name in self.procs)
        raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}; last report: {str(last)[:1000]}\n{tails}")
