#!/usr/bin/env bash
# What metrics cost: the same cells against a server that counts every request for its metrics
# listener (`--metrics-addr 127.0.0.1:0`) and one with metrics off (`--metrics-addr off`: no
# listener, and the gate counts nothing), alternating three times, each on a fresh dev
# directory, with a scrape in the middle of each "on" run. Usage: bench/metrics.sh
# [path/to/kms] [seconds per cell]
set -euo pipefail

kms="${1:-kms}"
secs="${2:-5}"
server=""
work=""
cleanup() {
  [ -n "$server" ] && { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
  [ -n "$work" ] && rm -rf "$work"
  return 0
}
trap cleanup EXIT

for mode in on off on off on off; do
  work="$(mktemp -d)"
  cd "$work"
  addr=off
  [ "$mode" = on ] && addr=127.0.0.1:0
  RUST_LOG=warn "$kms" serve --dev --data-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --metrics-addr "$addr" > serve.out 2> serve.log &
  server=$!
  for _ in $(seq 1 600); do
    [ -s serve.out ] && break
    sleep 0.1
  done
  [ -s serve.out ] || { echo "server did not start"; cat serve.log; exit 1; }
  metrics=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["metrics"] or "")' < serve.out)
  for args in \
    "--op generate-data-key --protection software --concurrency 1" \
    "--op generate-data-key --protection software --concurrency 64" \
    "--op generate-data-key --protection hsm --concurrency 64"; do
    scraper=""
    if [ -n "$metrics" ]; then
      (sleep "$((secs / 2))"; curl -s "http://$metrics/metrics" > scrape.txt) &
      scraper=$!
    fi
    # shellcheck disable=SC2086
    "$kms" bench --json --duration "$secs" $args | sed "s/^{/{\"metrics\":\"$mode\",/"
    [ -z "$scraper" ] || wait "$scraper"
  done
  if [ -n "$metrics" ]; then
    echo "{\"metrics\":\"on\",\"series\":$(grep -vc '^#' scrape.txt)}"
  fi
  kill "$server"; wait "$server" || true; server=""
  cd /; rm -rf "$work"; work=""
done
