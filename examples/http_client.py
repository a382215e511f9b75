"""Call a running rcllm coordinator (or node) over HTTP with nothing but the standard library.

    python examples/http_client.py --url http://127.0.0.1:8000 --user reader-01 --candidates b01 b09 b17

The request and response are documented in the README ("HTTP API"); ``rcllm.serve.client``
is the asyncio client with the same schema, for many requests in flight.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def recommend(url: str, body: dict, token: str | None = None, timeout: float = 60.0) -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/recommend", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:  # 4xx/503 carry {"error": message, "status": code}
        detail = json.loads(e.read() or b"{}").get("error", e.reason)
        retry = e.headers.get("Retry-After")
        sys.exit(f"HTTP {e.code}: {detail}" + (f" (retry after {retry} s)" if retry else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="coordinator or node address")
    parser.add_argument("--user", required=True, help="user id")
    parser.add_argument("--history", nargs="*", help="item ids, oldest first (default: the cached history)")
    parser.add_argument("--candidates", nargs="+", required=True, help="candidate item ids")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--policy", default=None, help="none | boundary:K | deviation:R | full (default: the node's)")
    parser.add_argument("--token", default=None, help="bearer token, when the servers have one")
    args = parser.parse_args()
    body = {"user_id": args.user, "candidates": args.candidates}
    for key, value in (("history", args.history), ("top_k", args.top_k), ("policy", args.policy)):
        if value is not None:
            body[key] = value
    print("request: ", json.dumps(body))
    answer = recommend(args.url, body, args.token)
    print("response:", json.dumps(answer))
    for place, entry in enumerate(answer["ranking"], start=1):
        print(f"  {place}. {entry['item_id']}  score {entry['score']:.3f}")
    cache = answer["cache"]
    print(f"node {answer['node']}, TTFT {answer['ttft_ms']:.1f} ms, user block hit {cache['user_hit']}, "
          f"item blocks {cache['item_hits']} hit / {cache['item_misses']} missed")


if __name__ == "__main__":
    main()
