#!/usr/bin/env bash
# Export and recovery time for a deployment with one key of N versions (bench/RESULTS.md).
#   bench/recovery.sh BIN PROTECTION SECONDS
#   bench/recovery.sh BIN PROTECTION =N        (exactly N versions, by `kms key rotate`)
# Starts a fresh `kms serve --dev` in a temporary directory, rotates one key for SECONDS
# (`kms bench --op rotate-key`), or makes one key with exactly N versions, exports a bundle (approved by operator2 and operator3),
# stops the server, and recovers the bundle with two development custodians' shares into a
# new directory. Prints one JSON line: versions, export time and the recovery's phases.
set -euo pipefail
BIN=$(realpath "$1"); PROTECTION=$2; SECS=$3
WORK=$(mktemp -d)
trap 'if [ -n "${PID:-}" ]; then kill "$PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT
cd "$WORK"
"$BIN" serve --dev --data-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 >serve.out 2>serve.err &
PID=$!
for _ in $(seq 1 300); do [ -s .kms/endpoints.json ] && break; sleep 0.2; done
if [[ $SECS == =* ]]; then
    N=${SECS#=}
    "$BIN" key create --alias bench --protection "$PROTECTION" --json >/dev/null
    for _ in $(seq 2 "$N"); do "$BIN" key rotate bench --json >/dev/null; done
else
    "$BIN" bench --op rotate-key --protection "$PROTECTION" --concurrency 1 --duration "$SECS" --json >bench.json
fi
json() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))$2)" "$1"; }
"$BIN" --as operator1 backup export --out b.bundle --json >ask.json
ID=$(json ask.json "['approval_id']")
"$BIN" --as operator2 approval approve "$ID" --json >/dev/null
"$BIN" --as operator3 approval approve "$ID" --json >/dev/null
T0=$(date +%s%N)
"$BIN" --as operator1 backup export --out b.bundle --json >export.json
T1=$(date +%s%N)
kill "$PID"; wait "$PID" || true; PID=
C=.kms/custodians
mkdir new
(cd new && "$BIN" ceremony recover --bundle ../b.bundle \
    --share "../$C/alice.share.age" --identity "../$C/alice.key" \
    --share "../$C/bob.share.age" --identity "../$C/bob.key" --dev --json >../recover.json)
python3 - "$PROTECTION" $(( (T1 - T0) / 1000000 )) <<'PY'
import json, os, sys
e = json.load(open("export.json")); r = json.load(open("recover.json"))
print(json.dumps({"protection": sys.argv[1], "key_versions": e["key_versions"],
    "bundle_bytes": e["size"], "export_ms": int(sys.argv[2]),
    "restored": r["key_versions_restored"], "recover_ms": r["timings_ms"]}))
PY
