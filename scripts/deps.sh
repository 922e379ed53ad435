#!/usr/bin/env bash
# Installs the Debian packages forkbox needs, in ONE apt transaction, then checks that
# every tool it needs is actually there (a package being "installed" is not enough: apt
# may have removed another package's tools to resolve a conflict).
#
#   scripts/deps.sh [--vm] [--perf]
#
# Without --vm: the server's and the tests' packages (PostgreSQL: the store's tests run
# on it as well as on SQLite; a server uses it only when given `--database postgres://…`;
# umoci, skopeo and busybox: the OCI image tests make their images with them;
# chromium and its driver: the web console's tests). With
# --vm: those and the vm runtime's (QEMU, …). With --perf: linux-perf (make flamegraph).
#
# QEMU: a machine may come with a newer qemu-utils than its apt sources offer (e.g.
# from backports). qemu-system-x86 from the sources then conflicts with it, and apt
# would silently *remove* qemu-utils (and qemu-img with it) to install QEMU. So when
# qemu-system-x86 is to be installed, qemu-utils is asked for at the very version of
# qemu-system-x86 that will be installed, in the same transaction, downgrades allowed:
# both tools end up present and from one QEMU release.
set -euo pipefail

BASE_PKGS=(btrfs-progs mmdebstrap util-linux mount procps iproute2 e2fsprogs python3
  python3-venv ca-certificates crun bubblewrap nodejs postgresql umoci skopeo busybox-static
  chromium chromium-driver)
BASE_TOOLS=(mkfs.btrfs btrfs mmdebstrap losetup mount umount ps ip mkfs.ext4 python3 crun bwrap node
  umoci skopeo busybox chromium chromedriver)
VM_PKGS=(qemu-system-x86 qemu-utils busybox-static e2fsprogs lz4 zstd xz-utils)
VM_TOOLS=(qemu-system-x86_64 qemu-img busybox lz4 zstd xz)

pkgs=("${BASE_PKGS[@]}")
tools=("${BASE_TOOLS[@]}")
for arg in "$@"; do
  case $arg in
    --vm) pkgs+=("${VM_PKGS[@]}"); tools+=("${VM_TOOLS[@]}") ;;
    --perf) pkgs+=(linux-perf); tools+=(perf) ;; # make flamegraph
    *) echo "deps.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing_tools() {
  local t out=()
  for t in "${tools[@]}"; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null 2>&1 || out+=("$t")
  done
  # PostgreSQL's server tools are not on PATH (the store's tests start a throwaway
  # cluster with them: scripts/with-postgres.sh).
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || out+=(initdb)
  echo "${out[@]:-}"
}

# npm (the TypeScript SDK's `npm pack` check): Debian's own package, unless an npm is
# already there — a nodejs from elsewhere (e.g. NodeSource) bundles one and conflicts
# with Debian's, and apt would remove that nodejs to install it.
tools+=(npm)
command -v npm >/dev/null 2>&1 || pkgs+=(npm)

missing=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ] && [ -z "$(missing_tools)" ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "forkbox needs: ${missing[*]:-} (tools: $(missing_tools)); run make as root to install them" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
want=("${missing[@]}")
if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
  ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
    echo "apt has no qemu-system-x86 to install" >&2
    exit 1
  fi
  # Replace a bare qemu-utils (if asked for) by the matching version.
  want=()
  for p in "${missing[@]}"; do [ "$p" = qemu-utils ] || want+=("$p"); done
  want+=("qemu-utils=$ver")
fi
if [ ${#want[@]} -gt 0 ]; then
  echo "installing: ${want[*]}"
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${want[@]}"
fi

left=$(missing_tools)
if [ -n "$left" ]; then
  echo "after installing, these tools are still missing: $left" >&2
  exit 1
fi
