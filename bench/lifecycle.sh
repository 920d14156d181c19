#!/bin/bash
# One run of key creation or rotation: a fresh `kms serve --dev` from SERVER_BIN, one
# `kms bench --op create-key|rotate-key` from CLIENT_BIN (which has those ops) for SECS
# seconds, then stop. Prints ops/s, p50 µs and p99 µs. See bench/RESULTS.md.
# usage: lifecycle.sh SERVER_BIN CLIENT_BIN op protection secs
server=$1 client=$2 op=$3 protection=$4 secs=$5
d=$(mktemp -d); cd "$d" || exit 1
(RUST_LOG=warn "$server" serve --dev --data-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 > out.log 2>err.log &)
for _ in $(seq 1 100); do [ -s out.log ] && break; sleep 0.1; done
"$client" bench --op "$op" --protection "$protection" --concurrency 1 --duration "$secs" --json |
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["ops_per_sec"], d["p50_us"], d["p99_us"], "errors", d["errors"], d["first_error"] or "")'
pkill -f "$server serve"; sleep 0.5; rm -rf "$d"
