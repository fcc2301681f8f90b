#!/usr/bin/env bash
# Runs blockd with embedded defaults: all data (metadata, segments, sockets) under one
# directory, $SPRITES_DATA (default ./.data). Installs what it needs first.
# Stop with Ctrl-C (clean shutdown: everything is flushed).
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_PYTHON=0 bash scripts/setup.sh
cargo build --release -p blockd --locked
data="${SPRITES_DATA:-$PWD/.data}"
mkdir -p "$data"
data="$(cd "$data" && pwd)"
bin="$PWD/target/release/blockd"
cat <<MSG

blockd is starting with its data in $data/blockd.
In another terminal:
  export BLOCKD_DATA_DIR=$data/blockd
  $bin volume create demo --size 1G
  qemu-io -f raw 'nbd+unix:///demo?socket=$data/blockd/nbd.sock' -c 'write -P 0xab 0 1M'
  $bin checkpoint create demo --comment first
  $bin volume stat demo
  $bin volume sync demo        # data + manifest into the object store ($data/blockd/objects)
VMs: QEMU -device vhost-user-blk-pci on $data/blockd/vhost/demo.sock (see docs/blockd.md)
Metrics: curl -s http://127.0.0.1:9490/metrics
MSG
exec "$bin" --data-dir "$data/blockd" serve "$@"
