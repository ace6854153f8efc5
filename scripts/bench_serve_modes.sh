#!/usr/bin/env bash
# `specpipe serve` in each mode, loaded by `specpipe bench-serve` at each concurrency: the README's serving table.
#   scripts/bench_serve_modes.sh [OUT_DIR] [REQUESTS] [MAX_NEW_TOKENS]
# One server at a time on 127.0.0.1 (a free port each), stopped with SIGTERM before the next starts;
# every run's figures go to OUT_DIR/<mode>-c<concurrency>.json. Extra serve options: SERVE_OPTIONS="...".
set -euo pipefail
out=${1:-docs/bench/serve}
requests=${2:-48}
max_new_tokens=${3:-64}
modes=${MODES:-"target-only overlap"}
concurrencies=${CONCURRENCIES:-"1 4"}
mkdir -p "$out"

for mode in $modes; do
    log=$(mktemp)
    # shellcheck disable=SC2086
    specpipe serve --port 0 --mode "$mode" --max-new-tokens "$max_new_tokens" ${SERVE_OPTIONS:-} >"$log" 2>&1 &
    server=$!
    url=""
    for _ in $(seq 600); do  # the workers load in seconds; the port is logged once uvicorn listens
        url=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log" | head -1 || true)
        [ -n "$url" ] && break
        kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
        sleep 0.2
    done
    [ -n "$url" ] || { echo "serve did not start: $log"; kill "$server"; exit 1; }
    for concurrency in $concurrencies; do
        echo "== $mode, concurrency $concurrency ($url)"
        specpipe bench-serve --url "$url" --requests "$requests" --concurrency "$concurrency" --warmup "$concurrency" \
            --max-new-tokens "$max_new_tokens" --json-out "$out/$mode-c$concurrency.json"
    done
    kill -TERM "$server"
    wait "$server" || true
    rm -f "$log"
done
