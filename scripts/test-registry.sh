#!/usr/bin/env bash
# Puts Debian's OCI distribution registry (package docker-registry) where the registry
# tests run it from, and prints its path:
#
#   scripts/test-registry.sh [DIR]     (default /var/lib/forkbox-test/registry)
#
# The package itself is not installed: its maintainer scripts would start a registry
# service on port 5000 that outlives the tests. Its binary is taken out of the .deb
# instead (cached: a rerun takes no time); the tests start it on a loopback port of
# their own and stop it.
set -euo pipefail
dir=${1:-/var/lib/forkbox-test/registry}
bin=$dir/usr/bin/docker-registry
if [ ! -x "$bin" ]; then
  work=$(mktemp -d)
  chmod 755 "$work"   # (apt downloads as _apt)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download -qq docker-registry) || {
    apt-get update -qq && (cd "$work" && apt-get download -qq docker-registry)
  }
  mkdir -p "$dir"
  dpkg -x "$work"/docker-registry_*.deb "$work/x"
  install -D -m 0755 "$work/x/usr/bin/docker-registry" "$bin"
fi
echo "$bin"
