#!/usr/bin/env bash
# Builds the vm runtime's guest assets from Debian packages, cached in $1 (the assets
# dir, e.g. /var/lib/forkbox/vm):
#   vmlinux                 uncompressed kernel of linux-image-cloud-amd64 (PVH entry)
#   modules/*.ko            virtio modules the initramfs loads
#   busybox                 static busybox (busybox-static) for the initramfs
#   rootfs-<template>.qcow2 the template's root filesystem as ext4 in qcow2, owners
#                           shifted back from the sandbox uid range to 0…
# Usage: scripts/vm-assets.sh <assets dir> <pool dir> [template] [uid_base]
# Reruns only redo what is missing (delete a file to rebuild it).
set -euo pipefail

ASSETS=${1:?assets dir}
POOL=${2:?pool dir}
TEMPLATE=${3:-python}
UID_BASE=${4:-1000000}
MODULES="virtio_ring virtio virtio_mmio virtio_blk virtio_console"

mkdir -p "$ASSETS"
ASSETS=$(cd "$ASSETS" && pwd)
say() { echo "vm-assets: $*" >&2; }

# --- kernel and modules ---------------------------------------------------------------
if [ ! -s "$ASSETS/vmlinux" ] || [ ! -d "$ASSETS/modules" ]; then
  work=$(mktemp -d "$ASSETS/.kernel.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  [ -n "$pkg" ] || { say "cannot resolve linux-image-cloud-amd64 (apt-get update?)"; exit 1; }
  say "downloading $pkg"
  (cd "$work" && apt-get download -qq "$pkg")
  dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"
  vmlinuz=$(ls "$work"/root/boot/vmlinuz-*)
  kver=${vmlinuz##*/vmlinuz-}
  # The bzImage's payload is a compressed ELF: the boot header says where and how long,
  # its magic how it is compressed. QEMU boots the ELF directly through its PVH note.
  out="$work/vmlinux"
  read -r setup poff plen < <(python3 -c '
import struct, sys
d = open(sys.argv[1], "rb").read(4096)
po, pl = struct.unpack_from("<II", d, 0x248)
print(((d[0x1f1] or 4) + 1) * 512, po, pl)' "$vmlinuz")
  payload() { tail -c +$((setup + poff + 1)) "$vmlinuz" | head -c "$plen"; }
  case $(payload | head -c 4 | od -An -tx1 | tr -d ' ') in
    02214c18) dec="lz4 -dc" ;;
    28b52ffd) dec="zstd -dc" ;;
    fd377a58) dec="xz -dc" ;;
    1f8b08*) dec="gzip -dc" ;;
    *) say "unknown kernel compression in $vmlinuz"; exit 1 ;;
  esac
  payload | $dec > "$out" 2>/dev/null || true   # the trailing size word makes it complain
  [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || { say "no ELF payload in $vmlinuz"; exit 1; }
  mkdir -p "$work/modules"
  for m in $MODULES; do
    f=$(find "$work/root/lib/modules/$kver" -name "$m.ko*" | head -n1)
    if [ -z "$f" ]; then
      grep -q "/$m.ko" "$work/root/lib/modules/$kver/modules.builtin" && continue
      say "module $m not found"; exit 1
    fi
    case $f in
      *.xz) xz -dc "$f" > "$work/modules/$m.ko" ;;
      *.zst) zstd -qdc "$f" > "$work/modules/$m.ko" ;;
      *) cp "$f" "$work/modules/$m.ko" ;;
    esac
  done
  echo "$kver" > "$work/modules/VERSION"
  rm -rf "$ASSETS/modules"
  mv "$work/modules" "$ASSETS/modules"
  mv "$out" "$ASSETS/vmlinux"
  rm -rf "$work"
  trap - EXIT
  say "kernel $kver ready"
fi

# --- busybox --------------------------------------------------------------------------
if [ ! -x "$ASSETS/busybox" ]; then
  work=$(mktemp -d "$ASSETS/.busybox.XXXXXX")
  (cd "$work" && apt-get download -qq busybox-static)
  dpkg-deb -x "$work"/busybox-static_*.deb "$work/root"
  cp "$work/root/bin/busybox" "$ASSETS/busybox.tmp"
  mv "$ASSETS/busybox.tmp" "$ASSETS/busybox"
  rm -rf "$work"
  say "busybox ready"
fi

# --- root filesystem ------------------------------------------------------------------
img="$ASSETS/rootfs-$TEMPLATE.qcow2"
src="$POOL/templates/$TEMPLATE"
if [ ! -s "$img" ] || [ "$src.json" -nt "$img" ]; then
  [ -d "$src" ] || { say "template $TEMPLATE not built in $POOL (forkbox template prepare)"; exit 1; }
  work=$(mktemp -d "$ASSETS/.rootfs.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  say "copying template $TEMPLATE"
  cp -a "$src" "$work/tree"
  # Owners were shifted into the sandbox uid range for the jail; the guest is root.
  python3 - "$work/tree" "$UID_BASE" <<'EOF'
import os, sys
root, base = sys.argv[1], int(sys.argv[2])
def fix(p):
    st = os.lstat(p)
    uid = st.st_uid - base if st.st_uid >= base else st.st_uid
    gid = st.st_gid - base if st.st_gid >= base else st.st_gid
    if (uid, gid) != (st.st_uid, st.st_gid):
        mode = st.st_mode
        os.lchown(p, uid, gid)
        if not os.path.islink(p):
            os.chmod(p, mode & 0o7777)  # chown clears setuid bits
fix(root)
for d, dirs, files in os.walk(root):
    for n in dirs + files:
        fix(os.path.join(d, n))
EOF
  size_mb=$(( $(du -sm "$work/tree" | cut -f1) + 1024 ))
  say "making ext4 (${size_mb} MiB, sparse)"
  mkfs.ext4 -q -F -d "$work/tree" -O ^has_journal -L forkbox "$work/rootfs.ext4" "${size_mb}M"
  qemu-img convert -f raw -O qcow2 "$work/rootfs.ext4" "$work/rootfs.qcow2"
  mv "$work/rootfs.qcow2" "$img"
  rm -rf "$work"
  say "$img ready"
fi
