#!/usr/bin/env bash
# The supply-chain check (threat-model/threats.md, T31), with deny.toml as its policy.
# Licences, sources and duplicate versions need only crates.io and always run. Advisories
# need the RustSec database from GitHub: when it cannot be fetched, say so and go on, since a
# CI machine may have no route there; a stale local copy is used if one exists.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo deny check bans licenses sources

if cargo deny fetch db >/dev/null 2>&1; then
  cargo deny check advisories
elif ls "$HOME"/.cargo/advisory-dbs/*/crates >/dev/null 2>&1; then
  echo "supply-chain: the advisory database could not be fetched; checking against the local copy" >&2
  # The crates were fetched by the check above, so the graph builds offline too.
  cargo deny --offline check advisories
else
  echo "supply-chain: SKIPPED the advisory check: the RustSec database could not be fetched and no local copy exists (licences, sources and duplicates were checked)" >&2
fi
