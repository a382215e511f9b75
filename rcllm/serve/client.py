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
