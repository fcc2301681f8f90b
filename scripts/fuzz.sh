#!/usr/bin/env bash
# Runs the libFuzzer targets in fuzz/ (cargo-fuzz): each for FUZZ_SECONDS (default 20), from
# the committed seeds (fuzz/seeds/<target>) plus the local corpus (fuzz/corpus/<target>,
# not committed, grows run after run). Fails on the first crash, leak, timeout or
# out-of-memory; the input is left in fuzz/artifacts/<target>/.
#
# Environment:
#   FUZZ_SECONDS=N       time per target (CI: 20; longer runs: 600 or more)
#   FUZZ_TARGETS="a b"   subset of targets (default: all)
#   FUZZ_JOBS=N          parallel fuzzing processes per target (default 1)
#   FUZZ_TARGET_DIR=DIR  cargo target directory of the fuzz build (default fuzz/target)
#   FUZZ_SANITIZER=s     address (default) or none
#   FUZZ_TOOLCHAIN=t     build on toolchain t instead of nightly (RUSTC_BOOTSTRAP=1, no sanitizer)
# Needs cargo-fuzz (scripts/setup.sh installs it) and a nightly toolchain; without nightly
# it builds on the default toolchain with RUSTC_BOOTSTRAP=1 and no sanitizer (coverage-
# guided fuzzing still works; memory errors in unsafe code are then not detected).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[fuzz] %s\n' "$*" >&2; }

secs=${FUZZ_SECONDS:-20}
targets=${FUZZ_TARGETS:-"nbd_server nbd_proto virtio_blk_request chunk_object metadata_records api_bodies"}
jobs=${FUZZ_JOBS:-1}
target_dir=${FUZZ_TARGET_DIR:-fuzz/target}
sanitizer=${FUZZ_SANITIZER:-address}

command -v cargo-fuzz >/dev/null || { log "cargo-fuzz not found: run scripts/setup.sh (cargo install cargo-fuzz)"; exit 1; }
toolchain=()
if [ -n "${FUZZ_TOOLCHAIN:-}" ] && [ "${FUZZ_TOOLCHAIN}" != nightly ]; then
  log "FUZZ_TOOLCHAIN=$FUZZ_TOOLCHAIN: building with RUSTC_BOOTSTRAP=1 and --sanitizer none"
  toolchain=(+"$FUZZ_TOOLCHAIN")
  export RUSTC_BOOTSTRAP=1
  sanitizer=none
elif rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  log "no nightly toolchain: building with RUSTC_BOOTSTRAP=1 and --sanitizer none (install one with: rustup toolchain install nightly --profile minimal)"
  export RUSTC_BOOTSTRAP=1
  sanitizer=none
fi

# RocksDB's C++ takes ~10 min to build: reuse the library the workspace build produced.
. scripts/rocksdb-lib.sh
reuse_rocksdb_lib >&2

opts=(--fuzz-dir fuzz --target-dir "$target_dir" -s "$sanitizer")
start=$(date +%s)
cargo "${toolchain[@]}" fuzz build "${opts[@]}"
log "built in $(( $(date +%s) - start )) s"

total=0
for t in $targets; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  out="fuzz/artifacts/$t/last-run.log"
  par=()
  if [ "$jobs" -gt 1 ]; then par=(-jobs="$jobs" -workers="$jobs"); fi
  if ! cargo "${toolchain[@]}" fuzz run "${opts[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
      -print_final_stats=1 "${par[@]}" >"$out" 2>&1; then
    tail -n 60 "$out" >&2
    log "$t FAILED: see $out and the input in fuzz/artifacts/$t/"
    exit 1
  fi
  execs=$( { grep -h 'stat::number_of_executed_units' "$out" fuzz-*.log 2>/dev/null || true; } | awk '{s+=$2} END {print s+0}')
  rm -f fuzz-*.log
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  total=$((total + execs))
  log "$t: $execs inputs in ${secs}s, 0 crashes (corpus $corpus inputs)"
done
log "all targets: $total inputs, 0 crashes"
