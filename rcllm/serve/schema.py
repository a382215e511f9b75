"""The request and response of ``POST /v1/recommend``, defined once for node, coordinator and client.

Request::

    {"user_id": "42", "history": ["1193", "661"], "candidates": ["3408", "2355", "1197"],
     "top_k": 10, "policy": "boundary:4", "max_new_tokens": 0}

- ``user_id``: non-empty string.
- ``history``: item ids, oldest first; omitted (or null) when the user's history is in the cache
  (``users/histories.jsonl``). Only the most recent items, as many as the cache's history blocks
  hold (``manifest.users.history``), enter the prompt, so a request that sends a known user's
  whole history hits the precomputed block.
- ``candidates``: 1..1000 distinct items, each an id of the cache's catalog or, for a cold item, an
  inline catalog object ``{"id": ..., "title": ..., "year"?, "categories"?, "text"?}`` (its block
  is computed, not refused). More than 26 are ranked as a tournament of 26-item prompts.
- ``top_k`` (default: all), ``policy`` (default: the node's ``--policy``), ``max_new_tokens``
  (default 0; a greedy continuation after the ranking, returned as ``text``).

Response::

    {"ranking": [{"item_id": "2355", "score": 0.41}], "ttft_ms": 12.3, "node": 1,
     "cache": {"user_hit": true, "item_hits": 19, "item_misses": 1, "recomputed_tokens": 84,
               "prompt_tokens": 612},
     "text": ""}

Errors are ``{"error": message, "status": code}``: a 4xx for anything wrong with the request
(a :class:`~rcllm.engine.errors.RequestError`, raised here, by the node's cache lookups and by
the engine's checks), a 500 only for a fault of the server's own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from rcllm.data.catalog import item_problems
from rcllm.data.jsonl import json_type
from rcllm.engine.errors import RequestError
from rcllm.engine.policy import parse_policy

MAX_BODY_BYTES = 1 << 20
MAX_CANDIDATES = 1000
MAX_NEW_TOKENS = 128
REQUEST_FIELDS = ("user_id", "history", "candidates", "top_k", "policy", "max_new_tokens")


def error_body(status: int, message: str) -> dict:
    return {"error": message, "status": status}


@dataclass(frozen=True)
class Candidate:
    """A candidate item: a catalog id, or a cold item carried inline (``item`` is its catalog object)."""

    id: str
    item: dict | None = None

    def to_json(self) -> str | dict:
        return self.item if self.item is not None else self.id


@dataclass
class RecommendRequest:
    user_id: str
    candidates: list[Candidate]
    history: list[str] | None = None
    top_k: int | None = None
    policy: str | None = None
    max_new_tokens: int = 0

    def to_dict(self) -> dict:
        data: dict = {"user_id": self.user_id, "candidates": [c.to_json() for c in self.candidates]}
        if self.history is not None:
            data["history"] = list(self.history)
        if self.top_k is not None:
            data["top_k"] = self.top_k
        if self.policy is not None:
            data["policy"] = self.policy
        if self.max_new_tokens:
            data["max_new_tokens"] = self.max_new_tokens
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonempty_str(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _candidate(n: int, value) -> Candidate:
    if _nonempty_str(value):
        return Candidate(value)
    if isinstance(value, dict):
        problems = item_problems(value)
        if problems:
            raise RequestError(f"candidates[{n}] is not a valid inline item: {'; '.join(problems)}")
        return Candidate(value["id"], dict(value))
    raise RequestError(
        f"candidates[{n}] must be an item id (non-empty string) or an inline item object with id and "
        f"title, got {json_type(value)}"
    )


def parse_request(body: bytes | str | Mapping) -> RecommendRequest:
    """Parse and validate a request body; raises :class:`RequestError` saying what is wrong."""
    if isinstance(body, Mapping):
        data = body
    else:
        try:
            data = json.loads(body.decode("utf-8") if isinstance(body, bytes) else body)
        except UnicodeDecodeError:
            raise RequestError("the request body is not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise RequestError(f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, Mapping):
        raise RequestError(f"the request must be a JSON object, got {json_type(data)}")
    unknown = sorted(set(data) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"unknown fields: {', '.join(unknown)}; expected {', '.join(REQUEST_FIELDS)}")

    user_id = data.get("user_id")
    if not _nonempty_str(user_id):
        raise RequestError(f"user_id must be a non-empty string, got {json_type(user_id)}")

    history = data.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise RequestError(f"history must be a list of item ids, got {json_type(history)}")
        bad = [n for n, item in enumerate(history) if not _nonempty_str(item)]
        if bad:
            raise RequestError(f"history[{bad[0]}] must be a non-empty string item id")

    raw = data.get("candidates")
    if not isinstance(raw, list):
        raise RequestError(f"candidates must be a list of item ids or inline items, got {json_type(raw)}")
    if not raw:
        raise RequestError("candidates is empty: give at least one item to rank")
    if len(raw) > MAX_CANDIDATES:
        raise RequestError(f"{len(raw)} candidates; at most {MAX_CANDIDATES} per request")
    candidates = [_candidate(n, value) for n, value in enumerate(raw)]
    seen: set[str] = set()
    for c in candidates:
        if c.id in seen:
            raise RequestError(f"candidate {c.id!r} appears twice")
        seen.add(c.id)

    top_k = data.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise RequestError(f"top_k must be a positive integer, got {json_type(top_k)} {top_k!r}")

    policy = data.get("policy")
    if policy is not None:
        if not isinstance(policy, str):
            raise RequestError(f"policy must be a string, got {json_type(policy)}")
        parse_policy(policy)  # a RequestError naming the policies there are

    max_new = data.get("max_new_tokens", 0)
    max_new = 0 if max_new is None else max_new
    if not _is_int(max_new) or not 0 <= max_new <= MAX_NEW_TOKENS:
        raise RequestError(f"max_new_tokens must be an integer in 0..{MAX_NEW_TOKENS}, got {max_new!r}")

    return RecommendRequest(
        user_id=user_id, candidates=candidates, history=history, top_k=top_k, policy=policy, max_new_tokens=max_new
    )


def check_known(request: RecommendRequest, is_item: Callable[[str], bool], is_user: Callable[[str], bool]) -> None:
    """Refuse ids the cache cannot render: a candidate or history id not in the catalog (and
    not inline), a request without history for a user whose history the cache does not hold."""
    for c in request.candidates:
        if c.item is None and not is_item(c.id):
            raise RequestError(
                f"unknown item id {c.id!r}: not in the catalog; send a cold item inline as "
                '{"id": ..., "title": ...}'
            )
    if request.history is None:
        if not is_user(request.user_id):
            raise RequestError(
                f"user {request.user_id!r} has no history in the cache: send the request's history"
            )
        return
    for item in request.history:
        if not is_item(item):
            raise RequestError(f"unknown item id {item!r} in history: not in the catalog")


@dataclass
class CacheStats:
    user_hit: bool | None = None
    item_hits: int = 0
    item_misses: int = 0
    recomputed_tokens: int = 0
    prompt_tokens: int = 0


@dataclass
class RecommendResponse:
    ranking: list[tuple[str, float]]  # (item id, score), best first
    ttft_ms: float
    node: int
    cache: CacheStats = field(default_factory=CacheStats)
    text: str = ""

    def to_dict(self) -> dict:
        return {
            "ranking": [{"item_id": i, "score": s} for i, s in self.ranking],
            "ttft_ms": self.ttft_ms,
            "node": self.node,
            "cache": vars(self.cache).copy(),
            "text": self.text,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "RecommendResponse":
        return cls(
            ranking=[(r["item_id"], float(r["score"])) for r in data["ranking"]],
            ttft_ms=float(data["ttft_ms"]),
            node=int(data["node"]),
            cache=CacheStats(**data["cache"]),
            text=data.get("text", ""),
        )


def make_response(
    request: RecommendRequest, order: list[int], scores: list[float], ttft_ms: float, node: int,
    cache: CacheStats, text: str = "",
) -> RecommendResponse:
    """The response for ``request`` from a ranking: ``order`` (candidate indices, best first) and
    ``scores`` (per candidate, in request order), cut to ``top_k``."""
    top = order if request.top_k is None else order[: request.top_k]
    return RecommendResponse(
        ranking=[(request.candidates[i].id, float(scores[i])) for i in top],
        ttft_ms=round(ttft_ms, 3), node=node, cache=cache, text=text,
    )
