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
source "$(dirname "$(realpath "$0")")/exported.sh"
C=.kms/custodians
mkdir new
(cd new && "$BIN" ceremony recover --bundle ../b.bundle \
    --share "../$C/alice.share.age" --identity "../$C/alice.key" \
    --share "../$C/bob.share.age" --identity "../$C/bob.key" --dev --json >../recover.json)
python3 - "$PROTECTION" "$EXPORT_MS" <<'PY'
import json, os, sys
e = json.load(open("export.json")); r = json.load(open("recover.json"))
print(json.dumps({"protection": sys.argv[1], "key_versions": e["key_versions"],
    "bundle_bytes": e["size"], "export_ms": int(sys.argv[2]),
    "restored": r["key_versions_restored"], "recover_ms": r["timings_ms"]}))
PY
