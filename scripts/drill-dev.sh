#!/usr/bin/env bash
# `make drill`: a provider-exit drill of the development deployment in ./.kms, in one command.
# Uses the running `kms serve --dev` (or starts one for the drill and stops it after), exports
# a bundle (operator1 asks, operator2 and operator3 approve), runs
#   kms --as operator1 drill provider-exit --bundle ... --share alice --share bob --record --compare-live
# into drill-reports/TIMESTAMP/, and checks the report against the exported audit log.
set -euo pipefail
KMS=${KMS:-${CARGO_TARGET_DIR:-$HOME/.cache/sovereign-kms/target}/debug/kms}
cd "$(dirname "$0")/.."
STARTED=
cleanup() { if [ -n "$STARTED" ]; then kill "$STARTED" 2>/dev/null || true; wait "$STARTED" 2>/dev/null || true; fi; }
trap cleanup EXIT
if ! "$KMS" status --json >/dev/null 2>&1; then
    echo "no development server answers in ./.kms: starting one for the drill" >&2
    "$KMS" serve --dev >.kms-drill-serve.log 2>&1 &
    STARTED=$!
    for _ in $(seq 1 300); do
        "$KMS" status --json >/dev/null 2>&1 && break
        kill -0 "$STARTED" 2>/dev/null || break
        sleep 0.2
    done
    if ! "$KMS" status --json >/dev/null 2>&1; then
        echo "the development server did not start; its log (.kms-drill-serve.log) ends:" >&2
        tail -5 .kms-drill-serve.log >&2
        exit 1
    fi
fi
if [ "$("$KMS" key list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["keys"]))')" = 0 ]; then
    echo "the deployment has no key: creating one (alias drill-demo) so the drill has a version to prove" >&2
    "$KMS" key create --alias drill-demo --json >/dev/null
fi
OUT=drill-reports/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
ID=$("$KMS" --as operator1 backup export --out "$OUT/deployment.bundle" --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["approval_id"])')
"$KMS" --as operator2 approval approve "$ID" --json >/dev/null
"$KMS" --as operator3 approval approve "$ID" --json >/dev/null
"$KMS" --as operator1 backup export --out "$OUT/deployment.bundle" --json >/dev/null
C=.kms/custodians
status=0
"$KMS" --as operator1 drill provider-exit --bundle "$OUT/deployment.bundle" \
    --share "$C/alice.share.age" --identity "$C/alice.key" \
    --share "$C/bob.share.age" --identity "$C/bob.key" \
    --report "$OUT" --record --compare-live || status=$?
"$KMS" audit export --out "$OUT/audit.jsonl"
"$KMS" audit public-key --out "$OUT/signer.pem"
"$KMS" drill verify-report "$OUT/report.json" --audit-export "$OUT/audit.jsonl" \
    --public-key "$OUT/signer.pem" || status=$?
rm -f "$OUT/deployment.bundle"
echo "report: $OUT/report.md" >&2
exit "$status"
