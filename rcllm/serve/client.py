"""An asyncio client of a node or the coordinator, speaking :mod:`rcllm.serve.schema`."""

from __future__ import annotations

import json

import aiohttp

from rcllm.serve.http import bearer
from rcllm.serve.schema import RecommendRequest, RecommendResponse


class ServiceError(Exception):
    """A non-200 answer: its status, the server's message, and Retry-After (seconds) when given."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


class RecommendClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 120.0, concurrency: int = 100):
        self.url = url.rstrip("/")
        self.headers = bearer(token)
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s), connector=aiohttp.TCPConnector(limit=concurrency)
        )

    async def __aenter__(self) -> "RecommendClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.session.close()

    async def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        headers = {**self.headers, **({"Content-Type": "application/json"} if body is not None else {})}
        async with self.session.request(method, self.url + path, data=body, headers=headers) as resp:
            payload = await resp.read()
            if resp.status == 200:
                return payload
            try:
                message = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                message = payload[:300].decode(errors="replace")
            retry = resp.headers.get("Retry-After")
            raise ServiceError(resp.status, message, float(retry) if retry and retry.isdigit() else None)

    async def recommend(self, request: RecommendRequest | dict) -> RecommendResponse:
        body = request.to_json() if isinstance(request, RecommendRequest) else json.dumps(request).encode()
        return RecommendResponse.from_dict(json.loads(await self._call("POST", "/v1/recommend", body)))

    async def get_json(self, path: str) -> dict:
        """``/v1/cluster``, ``/v1/state``, ``/health``."""
        return json.loads(await self._call("GET", path))

    async def metrics(self) -> str:
        return (await self._call("GET", "/metrics")).decode()


async def send_all(
    url: str,
    requests,
    concurrency: int = 1,
    token: str | None = None,
    timeout_s: float = 120.0,
    on_done=None,
) -> list[tuple[object, float]]:
    """Send each request once, ``concurrency`` at a time, through one client.

    Returns, in request order, ``(response or the exception it raised, end-to-end ms)``; a failed
    request does not stop the others. ``on_done(n_done)`` is called after each.
    """
    import asyncio
    import time

    results: list = [None] * len(requests)
    gate = asyncio.Semaphore(concurrency)
    done = 0
    async with RecommendClient(url, token=token, timeout_s=timeout_s, concurrency=concurrency) as client:

        async def one(i: int, request) -> None:
            nonlocal done
            async with gate:
                started = time.perf_counter()
                try:
                    answer = await client.recommend(request)
                except (ServiceError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                    answer = e
                results[i] = (answer, (time.perf_counter() - started) * 1e3)
                done += 1
                if on_done:
                    on_done(done)

        await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return results
