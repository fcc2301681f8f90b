#!/usr/bin/env bash
# Runs the stack with embedded defaults: blockd (volumes over NBD and vhost-user-blk) and
# sprited (sprites: QEMU VMs on those volumes, idle hibernation, wake-on-request proxy), all
# data under one directory, $SPRITES_DATA (default ./.data). Installs what it needs first and
# builds the base image on the first run. Stop with Ctrl-C (sprites are paused cold, blockd
# flushes everything). Extra arguments go to `blockd serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_PYTHON=0 bash scripts/setup.sh
cargo build --release --locked -p blockd -p vmm-glue
data="${SPRITES_DATA:-$PWD/.data}"
mkdir -p "$data"
data="$(cd "$data" && pwd)"
bin="$PWD/target/release"

pids=()
# sprited stops first (it pauses sprites cold, which needs blockd), then blockd.
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

wait_sock() { # PATH PID NAME
  for _ in $(seq 1 600); do
    [ -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || { echo "$3 exited; see its log above" >&2; exit 1; }
    sleep 0.1
  done
  echo "$3 did not start" >&2
  exit 1
}

# Own sessions: Ctrl-C reaches this script only, which stops them in order.
setsid "$bin/blockd" --data-dir "$data/blockd" serve "$@" &
pids+=($!)
wait_sock "$data/blockd/admin.sock" "${pids[0]}" blockd
setsid "$bin/sprited" --data-dir "$data/vmm" serve --blockd-socket "$data/blockd/admin.sock" &
pids+=($!)
wait_sock "$data/vmm/sprited.sock" "${pids[1]}" sprited
if ! "$bin/sprited" --data-dir "$data/vmm" --json image list | grep -q '"name": "base"'; then
  echo "building the base image (once)..."
  "$bin/sprited" --data-dir "$data/vmm" image build --name base >/dev/null
fi

cat <<MSG

blockd and sprited are running with their data in $data.
In another terminal:
  export SPRITED_DATA_DIR=$data/vmm BLOCKD_DATA_DIR=$data/blockd
  $bin/sprited create demo                      # boots a sprite (an O(1) clone of the base image)
  $bin/sprited exec demo -- sh -c 'echo hello > /root/f; uname -a'
  $bin/sprited exec demo -- sh -c 'mkdir -p /www; echo hi > /www/index.html; httpd -p 8080 -h /www'
  curl http://127.0.0.1:8480/s/demo/             # wake-on-request proxy (or Host: demo.sprites.localhost)
  $bin/sprited hibernate demo --cold; $bin/sprited checkpoint create demo; $bin/sprited fork demo v1 demo2
  $bin/sprited list; $bin/sprited usage demo
  $bin/blockd volume list                        # the volumes behind them (NBD: $data/blockd/nbd.sock)
Metrics: curl -s http://127.0.0.1:9490/metrics     Docs: docs/sprites.md, docs/blockd.md
MSG
wait -n "${pids[@]}"
