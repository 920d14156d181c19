#!/usr/bin/env bash
# Provider-exit drill time for a deployment with one key of N versions (bench/RESULTS.md).
#   bench/drill.sh BIN SECONDS [PROTECTION]   (as many versions as `kms bench --op rotate-key` makes)
#   bench/drill.sh BIN =N [PROTECTION]        (exactly N versions, by `kms key rotate`)
# PROTECTION is software (the default) or hsm.
# Starts a fresh `kms serve --dev` in a temporary directory, makes the versions, exports a
# bundle (approved by operator2 and operator3), stops the server, and runs
# `kms drill provider-exit` with two development custodians' shares. Prints one JSON line:
# versions, whether the drill passed, and its time per phase.
set -euo pipefail
BIN=$(realpath "$1"); SECS=$2; PROTECTION=${3:-software}
source "$(dirname "$(realpath "$0")")/exported.sh"
C=.kms/custodians
T0=$(date +%s%N)
"$BIN" drill provider-exit --bundle b.bundle \
    --share "$C/alice.share.age" --identity "$C/alice.key" \
    --share "$C/bob.share.age" --identity "$C/bob.key" --report report --json >drill.json \
    2>drill.err || true
T1=$(date +%s%N)
python3 - $(( (T1 - T0) / 1000000 )) <<'PY'
import json, sys
e = json.load(open("export.json")); d = json.load(open("drill.json"))
print(json.dumps({"key_versions": e["key_versions"], "bundle_bytes": e["size"],
    "passed": d["passed"], "verified": d["key_versions_verified"],
    "wall_ms": int(sys.argv[1]), "timings_ms": d["timings_ms"]}))
PY
