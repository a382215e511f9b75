"""``rcllm eval --endpoint URL``: the eval's request stream sent to a running coordinator (or one
node) over HTTP, ``concurrency`` requests at a time, instead of ranked in-process.

The requests are the in-process mode's (:func:`~rcllm.eval.runner.sample_eval_requests` on the
dataset loaded here), sent as catalog item ids with their history, so the served cache must have
been built from the same dataset. ``full`` is sent as policy ``full``, ``rcllm:<policy>`` as that
policy; ``prefix`` has no server-side counterpart and is skipped. Quality, fidelity and baselines
are assembled by the in-process mode's :func:`~rcllm.eval.runner.assemble_result` from the
returned rankings; each system adds its client-side end-to-end latency, throughput, error count
and how many requests each node answered.

The servers are not reset between systems: a system that runs after another finds in the hot
tiers what the earlier one brought there (as in production, unlike the in-process mode where
each rcllm system starts with its own cold hot tier).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence

import aiohttp

from rcllm.data.dataset import Dataset
from rcllm.data.sampling import RankingRequest
from rcllm.engine.ranker import Ranking
from rcllm.eval.runner import EvalSettings, assemble_result, percentiles, sample_eval_requests
from rcllm.eval.systems import parse_systems
from rcllm.serve.client import RecommendClient, ServiceError, send_all
from rcllm.serve.schema import Candidate, RecommendRequest, RecommendResponse

SERVER_CALIBRATION = "contextual"  # what `rcllm serve` ranks with (open_cache_ranker's default)
UNSUPPORTED = {"prefix": "prefix caching is an in-process baseline; a server has no such mode"}


class EndpointError(Exception):
    """The endpoint cannot run this eval: unreachable, or refusing the dataset's requests."""


def endpoint_systems(spec: str | Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The systems a server can run, and the skipped ones with the reason; refuses a list
    left empty (e.g. ``prefix`` alone)."""
    names = parse_systems(spec)
    kept = [n for n in names if n not in UNSUPPORTED]
    skipped = {n: UNSUPPORTED[n] for n in names if n in UNSUPPORTED}
    if not kept:
        reasons = "; ".join(f"{n}: {why}" for n, why in skipped.items())
        raise ValueError(
            f"--endpoint: no system to run against a server ({reasons}); "
            "ask for full and/or rcllm:<policy>, or drop --endpoint to run prefix in-process"
        )
    return kept, skipped


def policy_of(system: str) -> str:
    return "full" if system == "full" else system.removeprefix("rcllm:")


def to_request(r: RankingRequest, policy: str) -> RecommendRequest:
    """The eval request as the service's request: item ids, the history the eval chose, every
    candidate back (no top_k) so metrics and fidelity see the whole ranking."""
    return RecommendRequest(
        user_id=r.user_id, candidates=[Candidate(i) for i in r.candidates], history=list(r.history), policy=policy
    )


def to_ranking(r: RankingRequest, response: RecommendResponse, policy: str) -> Ranking:
    """A service response read back as the engine's :class:`Ranking` of ``r``'s candidates."""
    index = {item: n for n, item in enumerate(r.candidates)}
    order, scores = [], [0.0] * len(r.candidates)
    for item, score in response.ranking:
        if item not in index:
            raise EndpointError(f"the server ranked {item!r}, which request for user {r.user_id} did not send")
        order.append(index[item])
        scores[index[item]] = score
    if sorted(order) != list(range(len(r.candidates))):
        raise EndpointError(
            f"the server returned {len(order)} of the {len(r.candidates)} candidates of user {r.user_id}'s request"
        )
    c = response.cache
    return Ranking(
        order=order, scores=scores, label_logprobs=[], calibration=SERVER_CALIBRATION, policy=policy,
        ttft_ms=response.ttft_ms, prompt_tokens=c.prompt_tokens, recomputed_tokens=c.recomputed_tokens,
        recomputed_fraction=c.recomputed_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
        user_hit=c.user_hit, item_hits=c.item_hits, item_misses=c.item_misses,
    )


def _refusal(url: str, dataset: Dataset, r: RankingRequest, error: ServiceError) -> EndpointError:
    """A 4xx: the request's fault, so every request of the stream would get it; say why."""
    if error.status in (401, 403):
        return EndpointError(
            f"{url} refused the request (HTTP {error.status}: {error.message}); pass its token with --token "
            "(or RCLLM_TOKEN)"
        )
    message = error.message
    if "unknown item id" in message:
        item = message.split("'")[1] if message.count("'") >= 2 else "?"
        message = (
            f"the server's cache does not hold item {item!r} of dataset {dataset.name}: was it built from this "
            f"dataset (rcllm data prepare, then rcllm build-cache on its catalog.jsonl)? Server said: {message}"
        )
    return EndpointError(f"{url} refused the request of user {r.user_id} (HTTP {error.status}): {message}")


async def _probe(url: str, timeout_s: float) -> dict:
    async with RecommendClient(url, timeout_s=timeout_s, concurrency=1) as client:
        return await client.get_json("/health")


def check_reachable(url: str, timeout_s: float = 10.0) -> dict:
    """``GET /health`` of a coordinator or node (no token needed); raises :class:`EndpointError`
    saying what is wrong when it does not answer."""
    if not url.startswith(("http://", "https://")):
        raise EndpointError(f"--endpoint {url!r}: expected an http:// or https:// URL, e.g. http://127.0.0.1:8000")
    try:
        return asyncio.run(_probe(url, timeout_s))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, ServiceError) as e:
        reason = str(e) or type(e).__name__
        raise EndpointError(
            f"cannot reach {url} ({reason}): is `rcllm coordinator` (or `rcllm serve`) running there?"
        ) from None


def run_stream(
    url: str, requests: Sequence[RankingRequest], policy: str, concurrency: int, token: str | None = None,
    timeout_s: float = 120.0, on_done: Callable[[int], None] | None = None,
) -> tuple[list[tuple[object, float]], float]:
    """Every request once with ``policy``, ``concurrency`` at a time: (response or exception,
    end-to-end ms) per request in order, and the stream's wall seconds."""
    payloads = [to_request(r, policy) for r in requests]
    started = time.perf_counter()
    results = asyncio.run(send_all(url, payloads, concurrency, token=token, timeout_s=timeout_s, on_done=on_done))
    return results, time.perf_counter() - started


def run_endpoint_eval(
    url: str,
    dataset: Dataset,
    systems: str | Sequence[str],
    settings: EvalSettings,
    concurrency: int = 1,
    token: str | None = None,
    timeout_s: float = 120.0,
    requests: list[RankingRequest] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> dict:
    """Run ``systems`` against ``url``; returns the ``--json`` object of the in-process mode plus,
    per system, ``latency_ms`` (client end to end), ``throughput_rps``, ``errors`` and ``nodes``
    (requests answered per node), and top-level ``endpoint`` and ``concurrency``.

    ``progress(system, done, total)`` after each answer; ``note(message)`` for what is skipped.
    Raises :class:`EndpointError` when the endpoint is unreachable, refuses a request (4xx: the
    same request would be refused for every system) or answers none of a system's requests.
    """
    if concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    names, skipped = endpoint_systems(systems)
    for name, why in skipped.items():
        if note:
            note(f"{name} skipped: {why}")
    if requests is None:
        requests = sample_eval_requests(dataset, settings)
    if not requests:
        raise ValueError(f"{dataset.name}: no user qualifies for a leave-one-out request")
    check_reachable(url, min(timeout_s, 10.0))
    url = url.rstrip("/")

    # fidelity is measured against full prefill: without `full` in the list it runs first, unreported
    run = names if "full" in names else ["full", *names]
    if "full" not in names and note:
        note("full runs first, unreported, as the reference for fidelity (the servers keep what it brought to memory)")
    rankings: dict[str, list[Ranking | None]] = {}
    extra: dict[str, dict] = {}
    for name in run:
        policy = policy_of(name)
        on_done = (lambda done, name=name: progress(name, done, len(requests))) if progress else None
        results, wall_s = run_stream(url, requests, policy, concurrency, token, timeout_s, on_done)
        answers: list[Ranking | None] = []
        latencies, failures, nodes = [], [], Counter()
        for r, (answer, ms) in zip(requests, results):
            if isinstance(answer, RecommendResponse):
                answers.append(to_ranking(r, answer, policy))
                latencies.append(ms)
                nodes[answer.node] += 1
                continue
            if isinstance(answer, ServiceError) and 400 <= answer.status < 500:
                raise _refusal(url, dataset, r, answer)
            answers.append(None)
            failures.append(answer)
        if not latencies:
            first = failures[0]
            raise EndpointError(
                f"{url} answered none of the {len(requests)} requests of {name}; the first failed with "
                f"{type(first).__name__}: {first}"
            )
        rankings[name] = answers
        extra[name] = {
            "latency_ms": percentiles(latencies),
            "throughput_rps": len(latencies) / wall_s,
            "errors": len(failures),
            "nodes": {str(k): n for k, n in sorted(nodes.items())},
        }
        if failures and note:
            note(f"{name}: {len(failures)} of {len(requests)} requests failed (left out of its metrics); "
                 f"first: {type(failures[0]).__name__}: {failures[0]}")

    result = assemble_result(
        dataset, requests, settings, names, rankings, model_name="served", device="server",
        calibration=SERVER_CALIBRATION,
    )
    for name in names:
        result["systems"][name].update(extra[name])
    result["endpoint"] = url
    result["concurrency"] = concurrency
    return result
