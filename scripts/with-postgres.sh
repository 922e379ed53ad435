#!/usr/bin/env bash
# Runs "$@" with a throwaway PostgreSQL cluster (Debian's `postgresql`, installed by
# `make deps`): FORKBOX_TEST_DATABASE_URL points at it (a unix socket in a temporary
# dir, no TCP), and the store's tests run on it as well as on SQLite. The cluster and
# its dir are removed when "$@" ends, whatever its outcome. PostgreSQL refuses to run
# as root: as root, the server runs as the `postgres` user the package made.
set -euo pipefail
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[ -x "$PGBIN/initdb" ] || { echo "no PostgreSQL server (apt-get install postgresql)" >&2; exit 1; }
dir=$(mktemp -d /tmp/forkbox-pg-XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
stop() {
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m immediate -s stop 2>/dev/null || true
  rm -rf "$dir"
}
trap stop EXIT
chmod 755 "$dir"
[ "$(id -u)" = 0 ] && chown postgres: "$dir"
as_pg "$PGBIN/initdb" -D "$dir/data" -U forkbox --auth=trust -E UTF8 --no-locale --no-sync >"$dir/initdb.log"
as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w -s -o \
  "-c listen_addresses='' -c unix_socket_directories=$dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" start
export FORKBOX_TEST_DATABASE_URL="postgres://forkbox@localhost/postgres?host=$dir"
# The store's tests must not skip PostgreSQL under this script.
export FORKBOX_REQUIRE_POSTGRES=1
"$@"
