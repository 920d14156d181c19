#!/usr/bin/env bash
# What governance costs: generate-data-key against a server that skips Cedar (the dev-only
# `--no-policy`: SVID and inventory checks only) and one holding 1,000 extra policies and
# 100,000 registered identities (populated through the admin plane before measuring),
# with one context for every request (decisions reused within a second), with a new context
# per request in an entry the policies read (`--distinct-contexts`: every request evaluated by
# Cedar), and with a new context per request in an entry no policy reads (`--distinct-entry
# message`: decisions reused across contexts), alternating three times, each on a fresh dev
# directory. Policy evaluation times come from inside the server (`kms policy stats`).
# Usage: bench/governance.sh [path/to/kms] [seconds]
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

for mode in nopolicy large nopolicy large nopolicy large; do
  work="$(mktemp -d)"
  cd "$work"
  flags=()
  [ "$mode" = nopolicy ] && flags=(--no-policy)
  RUST_LOG=warn "$kms" serve --dev "${flags[@]}" --data-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 > serve.out 2> serve.log &
  server=$!
  for _ in $(seq 1 600); do
    [ -s serve.out ] && break
    sleep 0.1
  done
  [ -s serve.out ] || { echo "server did not start"; cat serve.log; exit 1; }
  if [ "$mode" = large ]; then
    start=$(date +%s)
    "$kms" bench --json --op health --concurrency 1 --duration 1 \
      --add-policies 1000 --add-identities 100000 > /dev/null
    echo "{\"governance\":\"$mode\",\"populate_s\":$(( $(date +%s) - start ))}"
    sleep 20   # let the store settle (memtable flushes, compaction) before measuring
  fi
  for args in \
    "--op generate-data-key --protection software --concurrency 64" \
    "--op generate-data-key --protection software --concurrency 1" \
    "--op generate-data-key --protection software --concurrency 64 --distinct-contexts" \
    "--op generate-data-key --protection software --concurrency 1 --distinct-contexts" \
    "--op generate-data-key --protection software --concurrency 64 --distinct-contexts --distinct-entry message" \
    "--op generate-data-key --protection software --concurrency 1 --distinct-contexts --distinct-entry message" \
    "--op decrypt --protection software --concurrency 64"; do
    # shellcheck disable=SC2086
    "$kms" bench --json --duration "$secs" $args | sed "s/^{/{\"governance\":\"$mode\",/"
  done
  kill "$server"; wait "$server" || true; server=""
  cd /; rm -rf "$work"; work=""
done
