#!/usr/bin/env bash
# Builds the busybox initramfs the guest tests boot (tests/tests/guest.rs):
#   build-initramfs.sh OUT.cpio.gz KERNEL_VERSION
# Contents: busybox-static (the shell and small tools), the kernel modules a vhost-user-blk
# disk with ext4 needs, inserted by /init in dependency order (modprobe --show-depends;
# crc32c before ext4), the real mkfs.ext4 / e2fsck / fstrim with their shared libraries
# (found with ldd) under /usr/sbin (busybox's shell prefers its own applets for bare names,
# so the tests call these by full path), and /init (tests/guest/init).
# Needs: busybox-static, kmod, e2fsprogs, util-linux, cpio, gzip (scripts/setup.sh).
set -euo pipefail
out=$1
kver=$2
here=$(cd "$(dirname "$0")" && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,mnt,etc,tmp,run}
busybox=$(command -v busybox)
if ldd "$busybox" >/dev/null 2>&1; then
  echo "build-initramfs: $busybox is not static (install busybox-static)" >&2
  exit 1
fi
cp "$busybox" "$root/bin/busybox"

# Kernel modules, in the order they must be inserted.
: >"$root/modules.order"
modprobe -S "$kver" --show-depends -a virtio_pci virtio_blk crc32c_generic ext4 \
  | awk '$1 == "insmod" { print $2 }' | awk '!seen[$0]++' \
  | while read -r m; do
      mkdir -p "$root$(dirname "$m")"
      cp "$m" "$root$m"
      echo "$m" >>"$root/modules.order"
    done
for m in virtio_blk.ko virtio_pci.ko ext4.ko; do
  grep -q "/$m\$" "$root/modules.order" || { echo "build-initramfs: module $m not found for $kver" >&2; exit 1; }
done

# Real e2fsprogs / util-linux tools and their libraries.
copy_with_libs() { # SRC DEST-NAME
  local src dest lib
  src=$(readlink -f "$1")
  dest=$2
  cp "$src" "$root$dest"
  for lib in $(ldd "$src" | awk '/=> \// { print $3 } /^[ \t]*\// { print $1 }'); do
    mkdir -p "$root$(dirname "$lib")"
    [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
  done
}
copy_with_libs "$(command -v mkfs.ext4 || echo /sbin/mkfs.ext4)" /usr/sbin/mkfs.ext4
copy_with_libs "$(command -v e2fsck || echo /sbin/e2fsck)" /usr/sbin/e2fsck
copy_with_libs "$(command -v fstrim || echo /sbin/fstrim)" /usr/sbin/fstrim
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"

cp "$here/init" "$root/init"
chmod 755 "$root/init"
tmp="$out.tmp.$$"
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 >"$tmp"
mv "$tmp" "$out"
