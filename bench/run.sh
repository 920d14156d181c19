#!/usr/bin/env bash
# Runs the benchmark matrix of bench/RESULTS.md against a fresh `kms serve --dev` on this
# machine (client and server share it). Usage: bench/run.sh [path/to/kms] [seconds per run]
set -euo pipefail

kms="${1:-kms}"
secs="${2:-5}"
work="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT

cd "$work"
RUST_LOG=warn "$kms" serve --dev --data-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 > serve.out 2> serve.log &
server=$!
for _ in $(seq 1 600); do
  [ -s serve.out ] && break
  sleep 0.1
done
[ -s serve.out ] || { echo "server did not start"; cat serve.log; exit 1; }

run() {
  "$kms" bench --json --duration "$secs" "$@"
}

for c in 1 16 64; do run --op health --concurrency "$c"; done
for p in software hsm; do
  for op in generate-data-key decrypt; do
    for c in 1 16 64; do run --op "$op" --protection "$p" --concurrency "$c"; done
  done
done
run --op generate-data-key --protection software --batch 100 --concurrency 8
run --op generate-data-key --protection software --batch 100 --concurrency 64
run --op decrypt --protection software --batch 100 --concurrency 8
