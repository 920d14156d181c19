#!/bin/bash
# One interleavable A/B run: a fresh `kms serve --dev` from BIN, one `kms bench` of OP at the given
# protection and concurrency for 5 s, then stop. Prints ops/s and p99 µs. See bench/RESULTS.md.
# usage: ab.sh BIN op protection concurrency
bin=$1; shift
d=$(mktemp -d); cd $d
(RUST_LOG=warn $bin serve --dev --data-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 > out.log 2>err.log &)
for i in $(seq 1 50); do [ -s out.log ] && break; sleep 0.1; done
$bin bench --op $1 --protection $2 --concurrency $3 --duration 5 --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["ops_per_sec"]), d["p99_us"])'
pkill -f "$bin serve"; sleep 0.5; rm -rf $d
