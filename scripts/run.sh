#!/usr/bin/env bash
# Runs the whole stack with embedded defaults: blockd (volumes over NBD and vhost-user-blk)
# and sprite-api (the REST API on 127.0.0.1:8400 with the sprite host inside: QEMU VMs on
# those volumes, idle hibernation, the wake-on-request proxy on 127.0.0.1:8480), all data
# under one directory, $SPRITES_DATA (default ./.data); the control plane is replicated to
# blockd's object store directory. Installs what it needs first; builds the base image and
# creates the organization "demo" on the first run. Stop with Ctrl-C (sprites are paused
# cold, blockd flushes everything). Extra arguments go to `blockd serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_PYTHON=0 bash scripts/setup.sh
cargo build --release --locked -p blockd -p vmm-glue -p api
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
setsid "$bin/sprite-api" serve --data-dir "$data/api" --vmm-dir "$data/vmm" \
  --blockd-socket "$data/blockd/admin.sock" --control-store "file://$data/blockd/objects" &
pids+=($!)
wait_sock "$data/vmm/sprited.sock" "${pids[1]}" sprite-api
for _ in $(seq 1 600); do
  (exec 3<>/dev/tcp/127.0.0.1/8400) 2>/dev/null && break
  sleep 0.1
done
admin=$(cat "$data/api/admin-token")
if [ ! -f "$data/demo-token" ]; then
  python3 - "$admin" >"$data/demo-token" <<'PY'
import json, sys, urllib.request
req = urllib.request.Request("http://127.0.0.1:8400/v1/orgs", data=b'{"name":"demo"}', method="POST",
                             headers={"Authorization": "Bearer " + sys.argv[1]})
print(json.load(urllib.request.urlopen(req))["token"])
PY
  chmod 600 "$data/demo-token"
fi

cat <<MSG

The stack is running with its data in $data:
  API      http://127.0.0.1:8400/v1 (OpenAPI: /v1/openapi.json; admin token in $data/api/admin-token)
  proxy    http://127.0.0.1:8480/s/<org>--<sprite>/   metrics: :9490 (blockd), :9491 (API)
In another terminal:
  export SPRITE_CONFIG=$data/sprite-cli.json
  $bin/sprite login --url http://127.0.0.1:8400 --token \$(cat $data/demo-token)
  $bin/sprite create web                       # a VM on an O(1) clone of the base image
  $bin/sprite exec -- sh -c 'echo hello > /root/f; uname -a'
  $bin/sprite exec -- sh -c 'mkdir -p /www; echo hi > /www/index.html; httpd -p 8080 -h /www'
  curl -H "Authorization: Bearer \$(cat $data/demo-token)" http://127.0.0.1:8480/s/demo--web/
  $bin/sprite checkpoint create; $bin/sprite fork v1 web2; $bin/sprite hibernate --cold
  $bin/sprite list; $bin/sprite usage
Operators: $bin/sprited --data-dir $data/vmm list; $bin/blockd --data-dir $data/blockd volume list
Docs: docs/api.md, docs/sprites.md, docs/blockd.md
MSG
wait -n "${pids[@]}"
