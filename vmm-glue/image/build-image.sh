#!/usr/bin/env bash
# Builds a sprite base image (run by `sprited image build`; see docs/sprites.md):
#   build-image.sh OUTDIR KERNEL_VERSION AGENT_BINARY SIZE_MIB
# Writes into OUTDIR:
#   vmlinuz            the host's Debian kernel (linux-image-amd64)
#   initramfs.cpio.gz  busybox + the modules a sprite needs (virtio-pci, virtio-blk,
#                      virtio-console, ext4); its /init mounts /dev/vda and switches root
#   rootfs.ext4        the root filesystem (ext4, made with mkfs.ext4 -d): busybox, busybox
#                      init, sprite-agent and sprite-env (with their shared libraries),
#                      curl when the host has it, /etc
# Needs: busybox-static, kmod, e2fsprogs, cpio, gzip (scripts/setup.sh).
set -euo pipefail
out=$1
kver=$2
agent=$3
size_mib=$4
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

busybox=$(command -v busybox)
if ldd "$busybox" >/dev/null 2>&1; then
  echo "build-image: $busybox is not static (install busybox-static)" >&2
  exit 1
fi
[ -f "/boot/vmlinuz-$kver" ] || { echo "build-image: /boot/vmlinuz-$kver missing (install linux-image-amd64)" >&2; exit 1; }
cp "/boot/vmlinuz-$kver" "$out/vmlinuz"

# --- initramfs -------------------------------------------------------------------------
ird="$work/initramfs"
mkdir -p "$ird"/{bin,dev,proc,sys,newroot}
cp "$busybox" "$ird/bin/busybox"
: >"$ird/modules.order"
modprobe -S "$kver" --show-depends -a virtio_pci virtio_blk virtio_console crc32c_generic ext4 \
  | awk '$1 == "insmod" { print $2 }' | awk '!seen[$0]++' \
  | while read -r m; do
      mkdir -p "$ird$(dirname "$m")"
      cp "$m" "$ird$m"
      echo "$m" >>"$ird/modules.order"
    done
for m in virtio_blk.ko virtio_pci.ko virtio_console.ko ext4.ko; do
  grep -q "/$m" "$ird/modules.order" || { echo "build-image: module $m not found for $kver" >&2; exit 1; }
done
cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
# sprite initramfs: load the modules, mount the root volume, switch to its init.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
if grep -q sprite.probe /proc/cmdline; then
  echo SPRITE-PROBE-OK
  poweroff -f
fi
while read -r m; do
  insmod "$m" 2>/dev/null || echo "sprite-init: insmod $m failed"
done </modules.order
n=0
while [ ! -b /dev/vda ] && [ $n -lt 600 ]; do
  sleep 0.05
  n=$((n + 1))
done
if ! mount -t ext4 -o rw /dev/vda /newroot; then
  echo "sprite-init: cannot mount the root volume /dev/vda"
  poweroff -f
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
INIT
chmod 755 "$ird/init"
(cd "$ird" && find . | cpio -o -H newc --quiet) | gzip -1 >"$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"

# --- root filesystem ---------------------------------------------------------------------
r="$work/rootfs"
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,root,etc/init.d,var/log,mnt,home,srv}
chmod 1777 "$r/tmp"
chmod 700 "$r/root"
cp "$busybox" "$r/bin/busybox"
for app in $("$busybox" --list-full); do
  [ -e "$r/$app" ] || ln -s /bin/busybox "$r/$app"
done
copy_with_libs() { # SRC DEST
  local src dest lib
  src=$(readlink -f "$1")
  dest=$2
  mkdir -p "$r$(dirname "$dest")"
  cp "$src" "$r$dest"
  for lib in $(ldd "$src" 2>/dev/null | awk '/=> \// { print $3 } /^[ \t]*\// { print $1 }'); do
    mkdir -p "$r$(dirname "$lib")"
    [ -e "$r$lib" ] || cp -L "$lib" "$r$lib"
  done
}
copy_with_libs "$agent" /usr/bin/sprite-agent
# sprite-env (the management API's CLI) is built next to the agent.
envbin="$(dirname "$agent")/sprite-env"
[ -x "$envbin" ] || { echo "build-image: $envbin missing (cargo build -p vmm-glue)" >&2; exit 1; }
copy_with_libs "$envbin" /usr/bin/sprite-env
# curl for `sprite-env curl` (and for users), with its libraries, when the host has it.
if command -v curl >/dev/null; then copy_with_libs "$(command -v curl)" /usr/bin/curl; fi
# Debug builds carry ~50 MB of symbols the guest does not need.
if command -v strip >/dev/null; then
  strip "$r/usr/bin/sprite-agent" "$r/usr/bin/sprite-env" 2>/dev/null || true
fi
# /lib64 -> the loader path the agent was linked against.
cat >"$r/etc/inittab" <<'TAB'
::sysinit:/etc/init.d/rcS
::respawn:/usr/bin/sprite-agent
::ctrlaltdel:/sbin/poweroff
::shutdown:/bin/sync
TAB
cat >"$r/etc/init.d/rcS" <<'RCS'
#!/bin/sh
# sprite boot: filesystems, hostname (sprite.name= on the kernel command line), loopback.
mount -t proc proc /proc
mount -t sysfs sys /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=755 tmpfs /run
mount -o remount,rw / 2>/dev/null
for w in $(cat /proc/cmdline); do
  case "$w" in sprite.name=*) hostname "${w#sprite.name=}" ;; esac
done
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
[ -x /etc/rc.local ] && /etc/rc.local
exit 0
RCS
chmod 755 "$r/etc/init.d/rcS"
echo 'root:x:0:0:root:/root:/bin/sh' >"$r/etc/passwd"
echo 'root:x:0:' >"$r/etc/group"
printf 'tty:x:5:\n' >>"$r/etc/group"
echo sprite >"$r/etc/hostname"
printf '127.0.0.1 localhost\n' >"$r/etc/hosts"
printf 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nexport HOME=/root\n' >"$r/etc/profile"
rm -f "$out/rootfs.ext4"
mkfs.ext4 -q -F -L sprite-root -E root_owner=0:0 -d "$r" "$out/rootfs.ext4" "${size_mib}M"
echo "build-image: done ($out)"
