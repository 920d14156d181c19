#!/usr/bin/env bash
# What auditing costs: the same cells against a server that records every request in the audit
# log (the default) and one started with the dev-only `--unaudited`, alternating three times, each on
# a fresh dev directory. Usage: bench/audit.sh [path/to/kms] [seconds per cell]
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

cells() {
  local mode="$1"
  local run=("$kms" bench --json --duration "$secs")
  for args in \
    "--op generate-data-key --protection software --concurrency 1" \
    "--op generate-data-key --protection software --concurrency 64" \
    "--op generate-data-key --protection hsm --concurrency 64" \
    "--op generate-data-key --protection software --batch 100 --concurrency 8"; do
    # shellcheck disable=SC2086
    "${run[@]}" $args | sed "s/^{/{\"audit\":\"$mode\",/"
  done
}

for mode in on off on off on off; do
  work="$(mktemp -d)"
  cd "$work"
  flags=()
  [ "$mode" = off ] && flags=(--unaudited)
  RUST_LOG=warn "$kms" serve --dev "${flags[@]}" --data-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 > serve.out 2> serve.log &
  server=$!
  for _ in $(seq 1 600); do
    [ -s serve.out ] && break
    sleep 0.1
  done
  [ -s serve.out ] || { echo "server did not start"; cat serve.log; exit 1; }
  cells "$mode"
  if [ "$mode" = on ]; then
    kill "$server"; wait "$server" || true; server=""
    "$kms" audit verify --json | sed 's/^{/{"verify":true,/'
  else
    kill "$server"; wait "$server" || true; server=""
  fi
  cd /; rm -rf "$work"; work=""
done
