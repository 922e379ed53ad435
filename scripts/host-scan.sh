#!/usr/bin/env bash
# What a make target's run left on this host; exits 1, listing it, if anything.
#
#   scripts/host-scan.sh --pool P [--pool P2] --dirs 'GLOB …'
#
# --pool: a pool the run used that is a cache (kept mounted, its templates kept): its
#   mount and loop device and its templates/ are fine; sandboxes/, snapshots/ and
#   staging snapshots in it are leftovers.
# --dirs: the run's data dirs (globs, e.g. '/tmp/forkbox-e2e-* /var/lib/forkbox-test').
#
# Leftovers: processes of a sandbox (in a forkbox cgroup, or named forkbox-agent or
# forkbox-zygote), QEMU guests, forkbox and PostgreSQL (the tests' throwaway clusters)
# processes naming one of the dirs; mounts under
# the dirs (but the cache pools); loop devices backing files in the dirs (but the cache
# pools' images) or deleted files; forkbox cgroups; forkbox egress network namespaces
# and sandbox veths. Everything belonging to a forkbox server that is running and is
# not one of the run's (`make serve` beside `make test`) is left out.
set -uo pipefail

pools=()
dirs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --pool) pools+=("$(realpath -m "$2")"); shift 2 ;;
    --dirs) read -r -a more <<<"$2"; dirs+=("${more[@]}"); shift 2 ;;
    *) echo "usage: $0 --pool P --dirs 'GLOB …'" >&2; exit 2 ;;
  esac
done

# Does path $1 fall under one of the run's dirs (globs) or pools?
ours() {
  local p=$1 d
  for d in "${dirs[@]}" "${pools[@]}"; do
    # shellcheck disable=SC2053
    [[ $p == $d || $p == $d/* ]] && return 0
  done
  return 1
}

# Servers running now that are not the run's: their data dirs, pools and egress
# namespaces are left alone.
foreign_dirs=()
foreign_netns=()
for pid in $(pgrep -x forkbox 2>/dev/null); do
  args=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null) || continue
  [ "$(sed -n 2p <<<"$args")" = serve ] || continue
  data=$(awk 'f {print; exit} $0 == "--data-dir" {f=1}' <<<"$args")
  data=${data:-/var/lib/forkbox}
  pool=$(awk 'f {print; exit} $0 == "--pool" {f=1}' <<<"$args")
  pool=${pool:-$data/pool}
  ours "$data" && continue
  foreign_dirs+=("$data" "$pool")
  foreign_netns+=("forkbox-egress-$(printf '%s' "$data" | sha256sum | cut -c1-8)")
done
# Is sandbox $1 one of a foreign server's (its root filesystem is in that pool)?
foreign_sandbox() {
  local d
  for d in "${foreign_dirs[@]}"; do [ -e "$d/sandboxes/$1" ] && return 0; done
  return 1
}

left=()
say() { left+=("$1"); }

# Processes.
for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  [ "$pid" = $$ ] && continue
  comm=$(cat "$p/comm" 2>/dev/null) || continue
  # Zombies hold nothing but their pid; init reaps them.
  state=$(awk '{print $3}' "$p/stat" 2>/dev/null)
  [ "$state" = Z ] && continue
  cg=$(grep -m1 -o '/forkbox/[^/]*' "$p/cgroup" 2>/dev/null)
  cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null | cut -c1-160)
  if [ -n "$cg" ] || [[ $comm == forkbox-agent || $comm == forkbox-zygote ]]; then
    id=${cg#/forkbox/}
    [ -n "$id" ] && foreign_sandbox "$id" && continue
    say "process $pid ($comm) of sandbox ${id:-?}"
  elif [[ $comm == qemu-system* || $comm == forkbox || $comm == postgres ]]; then
    mine=0
    for w in $cmd; do ours "$w" && mine=1; done
    [ $mine = 1 ] && say "process $pid: $cmd"
  fi
done

# Mounts.
is_pool() { local p=$1 q; for q in "${pools[@]}"; do [ "$p" = "$q" ] && return 0; done; return 1; }
while read -r _ mnt _; do
  mnt=$(printf '%b' "$mnt")
  ours "$mnt" || continue
  is_pool "$mnt" && continue
  say "mount $mnt"
done </proc/self/mounts

# Loop devices.
while read -r dev file; do
  [ -n "$dev" ] || continue
  img_ok=0
  for q in "${pools[@]}"; do [ "$file" = "$q.img" ] && img_ok=1; done
  [ $img_ok = 1 ] && continue
  if [[ $file == *"(deleted)"* ]] || ours "$file"; then
    say "loop device $dev backing $file"
  fi
done < <(losetup -n -O NAME,BACK-FILE 2>/dev/null)

# Cgroups (every hierarchy; v1 has one per controller): sandboxes' and QEMUs'.
for root in /sys/fs/cgroup/forkbox /sys/fs/cgroup/*/forkbox /sys/fs/cgroup/forkbox-vm /sys/fs/cgroup/*/forkbox-vm; do
  [ -d "$root" ] || continue
  for g in "$root"/*/; do
    [ -d "$g" ] || continue
    id=$(basename "$g")
    foreign_sandbox "$id" && continue
    say "cgroup ${g%/}"
  done
done

# Network.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^forkbox-egress-'); do
  f=0; for n in "${foreign_netns[@]}"; do [ "$n" = "$ns" ] && f=1; done
  [ $f = 1 ] || say "network namespace $ns"
done
for v in $(ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep '^fb'); do
  say "veth $v in the host's network namespace"
done

# Subvolumes in the cache pools.
for q in "${pools[@]}"; do
  for sub in sandboxes snapshots; do
    for e in "$q/$sub"/* "$q/$sub"/.fork-* "$q/$sub"/.snap-*; do
      [ -e "$e" ] && say "subvolume $e"
    done
  done
  for e in "$q/templates"/.snap-*; do
    [ -e "$e" ] && say "subvolume $e"
  done
done

if [ ${#left[@]} -eq 0 ]; then
  echo "host scan: clean"
  exit 0
fi
echo "host scan: ${#left[@]} things of this run are left on the host:" >&2
printf '  %s\n' "${left[@]}" | head -200 >&2
exit 1
