#!/usr/bin/env bash
# Installs what building and testing sovereign-kms needs on Debian or Ubuntu, if missing:
# SoftHSM2 (the development and test HSM), clang/libclang (RocksDB's bindings), and
# cargo-nextest (the test runner: one process per test, so each test gets its own token), and
# age (custody tests decrypt share files with the standard tool, as a custodian would), and
# opensc's pkcs11-tool (tests read token objects with it, as an auditor would), and
# Prometheus with promtool (the metrics test scrapes a real server with a real Prometheus, on
# loopback, started and stopped by the test itself), and
# cargo-deny (the supply-chain check in .ci/run).
set -euo pipefail

need=()
command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
command -v clang >/dev/null 2>&1 || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
command -v age >/dev/null 2>&1 || need+=(age)
command -v pkcs11-tool >/dev/null 2>&1 || need+=(opensc)

if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]}" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Prometheus without its recommended node exporter. The package enables a system service on
# :9090; the tests start their own on other ports, so a started one is stopped.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "install-deps: installing prometheus" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  "${sudo_cmd[@]}" service prometheus stop >/dev/null 2>&1 || true
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-nextest" >&2
  cargo install cargo-nextest --locked
fi

if ! cargo deny --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-deny" >&2
  cargo install cargo-deny --locked
fi
