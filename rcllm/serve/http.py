"""What the node and the coordinator share as aiohttp servers: JSON-line logs, JSON errors,
bearer-token auth, request metrics, and a run loop that drains in-flight requests on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import sys
import time

from aiohttp import web

from rcllm.engine.errors import RequestError
from rcllm.serve.metrics import Registry
from rcllm.serve.schema import MAX_BODY_BYTES, error_body

log = logging.getLogger("rcllm.serve")
SHUTDOWN_TIMEOUT_S = 60.0  # how long a draining server waits for its in-flight requests


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, event, and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is at each line: a caller (a test runner) may swap it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str = "info", **context) -> None:
    """Structured logs to stderr; ``context`` (e.g. node=1) is added to every line."""

    class WithContext(JsonLines):
        def format(self, record):
            record.fields = {**context, **getattr(record, "fields", {})}
            return super().format(record)

    handler = _Stderr()
    handler.setFormatter(WithContext())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def event(name: str, level: int = logging.INFO, exc_info: bool = False, **fields) -> None:
    """One log line; ``exc_info``: with the traceback of the exception being handled."""
    log.log(level, name, exc_info=exc_info, extra={"fields": fields})


def json_error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response(error_body(status, message), status=status, headers=headers)


def route_name(request: web.Request) -> str:
    """The route's pattern (``/v1/blocks/{key}``), so metrics don't get a series per key."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "other"


def make_middlewares(metrics: Registry, token: str | None = None, open_paths: tuple[str, ...] = ("/health",)):
    """Errors as JSON, never an HTML page: a RequestError answers its 4xx, any other exception
    (a ValueError included) is a fault of ours and answers 500 with its traceback logged, and
    the server goes on; the bearer token check when ``token`` is set (all paths but
    ``open_paths``), and a metrics/log line per request."""
    requests = metrics.counter("rcllm_http_requests_total", "HTTP requests by route and status", ("route", "status"))
    latency = metrics.histogram("rcllm_http_request_ms", "HTTP request latency in ms by route", ("route",))
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def errors(request: web.Request, handler):
        started = time.perf_counter()
        try:
            if expected is not None and request.path not in open_paths:
                given = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    raise RequestError("missing or wrong bearer token (Authorization: Bearer <token>)", 401)
            response = await handler(request)
        except RequestError as e:
            response = json_error(e.status, str(e))
        except web.HTTPException as e:  # 404, 405, 413 (body over client_max_size), ...
            response = json_error(e.status, e.text if e.text and not e.text.startswith("<") else e.reason)
        except Exception as e:  # a bug of ours: answer JSON, keep serving
            event("internal error", logging.ERROR, path=request.path, error=repr(e), exc_info=True)
            response = json_error(500, f"internal error: {type(e).__name__}: {e}")
        ms = (time.perf_counter() - started) * 1000.0
        route = route_name(request)
        requests.inc(route=route, status=response.status)
        latency.observe(ms, route=route)
        event("request", logging.DEBUG, method=request.method, path=request.path, status=response.status, ms=round(ms, 2))
        return response

    return [errors]


def make_app(metrics: Registry, routes, start, stop, token: str | None = None) -> web.Application:
    """An app with :func:`make_middlewares`, bodies up to MAX_BODY_BYTES, ``routes``
    (``(method, path, handler)``) plus ``GET /metrics`` (``metrics`` in the Prometheus text
    format), ``start(app)`` on startup and ``stop(app)`` on cleanup (after in-flight requests)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=make_middlewares(metrics, token))
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)

    async def render_metrics(request: web.Request) -> web.Response:
        return web.Response(text=metrics.render(), content_type="text/plain", charset="utf-8")

    app.router.add_get("/metrics", render_metrics)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def bearer(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def serve_until_signalled(app: web.Application, host: str, port: int, **fields) -> None:
    """Listen on ``host:port`` until SIGINT or SIGTERM, then stop accepting, let in-flight
    requests finish (up to SHUTDOWN_TIMEOUT_S), run the app's cleanup and return."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0]
    event("listening", host=bound[0], port=bound[1], **fields)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    event("shutting down: draining in-flight requests", **fields)
    await runner.cleanup()
    event("stopped", **fields)


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {text!r} is not host:port")
    return host, int(port)
