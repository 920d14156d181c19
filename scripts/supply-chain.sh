#!/usr/bin/env bash
# The supply-chain check (threat-model/threats.md, T31), with deny.toml as its policy.
# Licences, sources and duplicate versions need only crates.io and always run. Advisories need
# the RustSec database: fetched from GitHub when that works; otherwise the offline copy in
# ../shared/advisory-db (a git clone, see its README) is unpacked where cargo-deny looks, its
# HEAD commit's age is printed, and the check runs offline. A copy more than 180 days old fails
# the check, more than 90 days old warns.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo deny check bans licenses sources

CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
# Where cargo-deny keeps the database of its default URL.
db="$CARGO_HOME/advisory-dbs/advisory-db-3157b0e258782691"
offline_copy="../shared/advisory-db/advisory-db.tar.gz"

fetched=true
if ! cargo deny fetch db >/dev/null 2>&1; then
  fetched=false
  echo "supply-chain: the RustSec database could not be fetched; using the offline copy" >&2
  if [ ! -d "$db/crates" ]; then
    [ -f "$offline_copy" ] || {
      echo "supply-chain: the RustSec database could not be fetched and $offline_copy is missing" >&2
      exit 1
    }
    tmp=$(mktemp -d)
    tar xzf "$offline_copy" -C "$tmp"
    mkdir -p "$(dirname "$db")"
    rm -rf "$db"
    mv "$tmp/advisory-db" "$db"
    rmdir "$tmp"
  fi
fi
# cargo-deny judges staleness by file times, which an unpack makes new: the HEAD commit's
# date is what says how old the database is.
commit=$(git -C "$db" log -1 --format=%H)
committed=$(git -C "$db" log -1 --format=%cI)
age_days=$(( ( $(date +%s) - $(git -C "$db" log -1 --format=%ct) ) / 86400 ))
echo "advisory database: $commit (committed ${committed%%T*}, $age_days days old)"
if [ "$age_days" -gt 180 ]; then
  echo "supply-chain: the advisory database is $age_days days old (more than 180): refresh ../shared/advisory-db" >&2
  exit 1
elif [ "$age_days" -gt 90 ]; then
  echo "supply-chain: warning: the advisory database is $age_days days old (more than 90)" >&2
fi
if $fetched; then
  cargo deny check advisories
else
  # The crates were fetched by the check above, so the graph builds offline too.
  cargo deny --offline check advisories
fi
