#!/usr/bin/env bash
# The whole test suite: what CI runs (.ci/run calls this). Installs what it needs first.
#   fmt check, clippy -D warnings, build, then every test (unit, property, protocol,
#   end-to-end with real NBD clients, crash tests with kill -9 and failpoints).
# Environment:
#   CRASH_CYCLES=N   kill -9 cycles of the crash test (default 6)
#   TORTURE_CYCLES=N kill -9 cycles of each crash-torture test with the object tier (default 10)
#   FUZZ_SECONDS=N   time per fuzz target (default 20; 0 skips fuzzing)
#   TEST_FILTER=...  passed to cargo nextest as a filter expression
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { printf '\n==> %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

step "setup"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# Link the librocksdb.a clippy built instead of compiling RocksDB a second time.
. scripts/rocksdb-lib.sh
reuse_rocksdb_lib

step "build (debug, all targets: the end-to-end tests run the binaries)"
cargo build --workspace --all-targets --locked

step "tests"
args=(--workspace --locked --no-fail-fast --final-status-level fail)
if [ -n "${TEST_FILTER:-}" ]; then args+=(-E "$TEST_FILTER"); fi
cargo nextest run "${args[@]}"
cargo test --workspace --doc --locked -q

if [ "${FUZZ_SECONDS:-20}" != 0 ]; then
  step "fuzzing: every libFuzzer target for ${FUZZ_SECONDS:-20}s (longer runs: docs/reliability.md)"
  FUZZ_SECONDS=${FUZZ_SECONDS:-20} bash scripts/fuzz.sh
fi

step "done"
