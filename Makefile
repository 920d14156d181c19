# sovereign-kms: the two commands of the README, plus a few conveniences.
#
#   make run    install what is missing, build, and start a development KMS (kms serve --dev)
#   make test   install what is missing and run the whole test suite (what CI runs)
#   make drill  a provider-exit drill of the development deployment (docs/DRILL.md)
#   make crash-test [CYCLES=100]  SIGKILL cycles under load (CI runs 10 of them in make test)

# Builds go outside the clone so repeated runs (and CI on the same machine) are incremental.
CARGO_TARGET_DIR ?= $(HOME)/.cache/sovereign-kms/target
export CARGO_TARGET_DIR

.PHONY: deps run test lint doc bench bench-governance bench-metrics build drill crash-test

deps:
	@bash scripts/install-deps.sh

build: deps
	cargo build --workspace --all-targets --locked

# Built exactly as `make test` builds, so the two share one compile of RocksDB.
run: deps
	cargo build --workspace --all-targets --locked
	$(CARGO_TARGET_DIR)/debug/kms serve --dev

# Builds every target first (as `make run` does), so the `kms` binary the README's tour uses
# exists after either command; nextest then reuses those artifacts.
test: deps
	cargo build --workspace --all-targets --locked
	cargo nextest run --workspace --locked --no-fail-fast

# A provider-exit drill of ./.kms: export, drill with two custodians' shares, record the report
# and verify it against the exported audit log (scripts/drill-dev.sh). Uses the running dev
# server, or starts one for the drill.
drill: deps
	cargo build --workspace --all-targets --locked
	bash scripts/drill-dev.sh

# CYCLES rounds of: serve, load from 16 clients (data keys, grants, key creations,
# rotations), SIGKILL at a random moment, restart, find every acknowledged write
# (tests/tests/crash.rs). 100 cycles took 8 minutes here (each cycle re-checks all earlier writes).
CYCLES ?= 100
crash-test: deps
	cargo build --workspace --all-targets --locked
	@KMS_CRASH_CYCLES=$(CYCLES) cargo nextest run --workspace --locked -E 'binary(crash)' \
	  --no-capture > $(CARGO_TARGET_DIR)/crash-test.log 2>&1; status=$$?; \
	  cat $(CARGO_TARGET_DIR)/crash-test.log; \
	  grep '^crash-test: [0-9]* cycles' $(CARGO_TARGET_DIR)/crash-test.log; exit $$status

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

# API docs of the workspace, private items included; warnings (broken links) fail.
doc:
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items --locked

bench: deps
	cargo build --release --locked -p kms-cli
	bash bench/run.sh $(CARGO_TARGET_DIR)/release/kms

# What metrics cost: the same cells with metrics on and off, alternating (bench/RESULTS.md).
bench-metrics: deps
	cargo build --release --locked -p kms-cli
	bash bench/metrics.sh $(CARGO_TARGET_DIR)/release/kms 5

# What policy and the workload inventory cost (about 8 minutes: 1,000 policies, 100,000 ids).
bench-governance: deps
	cargo build --release --locked -p kms-cli
	bash bench/governance.sh $(CARGO_TARGET_DIR)/release/kms 5
