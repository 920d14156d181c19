# Sourced by bench/recovery.sh and bench/drill.sh: in a new temporary directory (the working
# directory from here on), start `kms serve --dev`, make one key's versions, export a bundle
# to b.bundle (approved by operator2 and operator3) and stop the server.
#   needs BIN, PROTECTION, SECS (SECONDS of `kms bench --op rotate-key`, or =N versions)
#   leaves export.json (the timed download run) and EXPORT_MS
WORK=$(mktemp -d)
trap 'if [ -n "${PID:-}" ]; then kill "$PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT
cd "$WORK"
"$BIN" serve --dev --data-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 >serve.out 2>serve.err &
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
EXPORT_MS=$(( (T1 - T0) / 1000000 ))
kill "$PID"; wait "$PID" || true; PID=
