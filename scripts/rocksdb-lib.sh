# Sourced by scripts/test.sh and scripts/fuzz.sh. RocksDB's C++ takes ~8-10 min to build on
# 2 cores, and `cargo clippy` (check mode), `cargo build` and the fuzz build each give
# librocksdb-sys's build script a different hash, so each would compile it again.
# reuse_rocksdb_lib points ROCKSDB_LIB_DIR at the newest librocksdb.a a debug build of the
# workspace produced (unless ROCKSDB_LIB_DIR is set already); prints what it reuses.
# The path is absolute: librocksdb-sys hands it to rustc as a link-search path, and rustc
# runs in the crate's own directory, where a relative path does not resolve (CI failed so).
reuse_rocksdb_lib() {
  [ -z "${ROCKSDB_LIB_DIR:-}" ] || return 0
  local lib
  lib=$(ls -t "${CARGO_TARGET_DIR:-target}"/debug/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -n1 || true)
  [ -n "$lib" ] || return 0
  ROCKSDB_LIB_DIR=$(cd "$(dirname "$lib")" && pwd)
  export ROCKSDB_LIB_DIR ROCKSDB_STATIC=1
  echo "reusing $lib"
}
