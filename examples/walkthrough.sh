#!/usr/bin/env bash
# The four commands against each other, on the bookshop example (examples/bookshop):
#   rcllm build-cache -> rcllm serve --node 0/1 -> rcllm coordinator -> requests and rcllm eval --endpoint.
# Run from anywhere after `bash scripts/setup.sh`. Every server started here is stopped on exit,
# Ctrl-C included. Environment overrides: MODEL (default smollm2-135m), WORK (default: a temp
# folder), PORT (first of four consecutive free ports, default 8100).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RCLLM="${RCLLM:-$ROOT/.venv/bin/rcllm}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
MODEL="${MODEL:-smollm2-135m}"
WORK="${WORK:-$(mktemp -d -t rcllm-walkthrough.XXXXXX)}"
PORT="${PORT:-8100}"
N0=$PORT; N1=$((PORT + 1)); COORD=$((PORT + 2))
PEERS="127.0.0.1:$N0,127.0.0.1:$N1"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. the example data in rcllm's formats"
"$RCLLM" data prepare bookshop --out "$WORK/data"

step "2. build-cache: embed, cluster, place on 2 nodes, precompute item and history blocks"
"$RCLLM" build-cache "$WORK/data/catalog.jsonl" --out "$WORK/cache" --nodes 2 --model "$MODEL" \
    --users "$WORK/data/histories.jsonl" --interactions "$WORK/data/interactions.jsonl"
"$RCLLM" cache info "$WORK/cache"

step "3. serve: one process per node (addresses by flag here; by default the manifest's)"
mkdir -p "$WORK/logs"
for k in 0 1; do
    port=$((PORT + k))
    "$RCLLM" serve --node "$k" --cache "$WORK/cache" --port "$port" --peers "$PEERS" --threads 1 \
        > "$WORK/logs/node$k.log" 2>&1 &
    PIDS+=($!)
done

step "4. coordinator: routes each request to the node with the lowest estimated TTFT"
"$RCLLM" coordinator --cache "$WORK/cache" --port "$COORD" --nodes "$PEERS" > "$WORK/logs/coordinator.log" 2>&1 &
PIDS+=($!)
"$PYTHON" - "$COORD" <<'PY'
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/v1/cluster"
deadline = time.monotonic() + 300
while True:
    try:
        if json.load(urllib.request.urlopen(url, timeout=2)).get("up") == 2:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the cluster did not come up; see the logs folder")
    time.sleep(0.5)
print("2 nodes up")
PY

step "5. a request, as any HTTP client sends it (the user's history comes from the cache)"
"$PYTHON" "$ROOT/examples/http_client.py" --url "http://127.0.0.1:$COORD" --user reader-01 \
    --candidates b01 b09 b17 b25 b33 b41 --top-k 3

step "6. eval against the running cluster: same protocol as in-process, plus throughput"
"$RCLLM" eval --dataset bookshop --endpoint "http://127.0.0.1:$COORD" --concurrency 2 \
    --users 8 --requests-per-user 1 --candidates 10 --systems full,rcllm:boundary:2,rcllm:none

step "cache: $WORK/cache   logs: $WORK/logs   (servers stop now)"
