#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian bookworm machine (root).
# Idempotent: each step is skipped when what it installs is already there.
# Used by scripts/run.sh and scripts/test.sh (the README's two commands) and so by CI.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

# bookworm-backports through a private sources list, so the system's sources stay unchanged.
# qemu-system-x86 must come from backports together with qemu-utils: bookworm's QEMU 7.2
# would remove the image's qemu-utils 10 (see ../shared/FACTS.md).
APT_LIST=/tmp/sprites-apt-sources.list
write_apt_list() {
  local mirror
  mirror=$(grep -h '^URIs:' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1 | awk '{print $2}')
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  cat >"$APT_LIST" <<LIST
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $mirror bookworm-backports main
deb http://deb.debian.org/debian-security bookworm-security main
LIST
}
APT_OPTS=(-o "Dir::Etc::sourcelist=$APT_LIST" -o "Dir::Etc::sourceparts=-" -o "APT::Get::List-Cleanup=0")

need_pkgs=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
for p in clang libclang-dev fio nbdkit libnbd-bin busybox-static e2fsprogs util-linux cpio \
         kmod linux-image-amd64 python3-venv curl; do
  have "$p" || need_pkgs+=("$p")
done
need_qemu=0
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null \
   || ! command -v qemu-io >/dev/null || ! command -v qemu-storage-daemon >/dev/null; then
  need_qemu=1
fi

if [ ${#need_pkgs[@]} -gt 0 ] || [ $need_qemu = 1 ]; then
  write_apt_list
  log "apt-get update (with bookworm-backports)"
  $SUDO apt-get "${APT_OPTS[@]}" update -qq
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing: ${need_pkgs[*]}"
    $SUDO apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  fi
  if [ $need_qemu = 1 ]; then
    log "installing qemu-system-x86 + qemu-utils from bookworm-backports"
    $SUDO apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends \
      -t bookworm-backports qemu-system-x86 qemu-utils qemu-block-extra >/dev/null
  fi
fi
qemu-img --version | head -n1 >&2
command -v qemu-io >/dev/null || { log "qemu-io missing after install"; exit 1; }

# Python tools used by the test suite (real S3 server: moto; API fuzzing: schemathesis) in a
# private venv.
VENV=${SPRITES_VENV:-/opt/sprites-venv}
if [ "${SETUP_PYTHON:-1}" = 1 ]; then
  if [ ! -x "$VENV/bin/moto_server" ]; then
    log "creating python venv at $VENV (moto[server])"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5,<6'
  fi
  if [ ! -x "$VENV/bin/st" ]; then
    log "installing schemathesis into $VENV (API fuzzing)"
    "$VENV/bin/pip" install -q --disable-pip-version-check 'schemathesis>=4,<5'
  fi
fi

# Rust tools.
command -v cargo >/dev/null || { log "cargo not found: install Rust (rustup) first"; exit 1; }
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# cargo-fuzz for the libFuzzer targets in fuzz/ (scripts/fuzz.sh; scripts/test.sh runs it).
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  log "no nightly toolchain: scripts/fuzz.sh will build with RUSTC_BOOTSTRAP=1 and without AddressSanitizer (rustup toolchain install nightly --profile minimal adds it)"
fi
log "setup done"
