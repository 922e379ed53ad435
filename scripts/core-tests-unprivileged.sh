#!/usr/bin/env bash
# Runs forkbox-core's unit tests as an ordinary user (uid/gid 65534), which is how core
# is meant to be testable: the lifecycle, admission, merge, the reaper and recovery over
# the fake runtime need no root, no btrfs and no cgroups. As root, the test binary is
# copied where that user can run it; as anyone else it simply runs.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
bin=$($CARGO test -p forkbox-core --lib --no-run --message-format=json 2>/dev/null |
	python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "forkbox_core":
        print(m["executable"])')
[ -x "$bin" ] || { echo "forkbox-core's test binary was not built" >&2; exit 1; }
if [ "$(id -u)" != 0 ]; then
	exec "$bin" -q
fi
dir=$(mktemp -d /tmp/forkbox-core-tests.XXXXXX)
trap 'rm -rf "$dir"' EXIT
cp "$bin" "$dir/core-tests"
chmod 755 "$dir" "$dir/core-tests"
chown 65534:65534 "$dir"
cd "$dir"
setpriv --reuid=65534 --regid=65534 --clear-groups env HOME="$dir" TMPDIR="$dir" ./core-tests -q
