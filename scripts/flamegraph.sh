#!/usr/bin/env bash
# Flame graphs of fork n=32 and n=5 and of a cold create (issue 24: where each millisecond
# goes).
#
#   scripts/flamegraph.sh [OUT_DIR]        (make flamegraph; default docs/flame)
#
# Starts a release `forkbox serve` without a warm pool on BENCH_DATA_DIR
# (/var/lib/forkbox-bench), lets bench/flame.py drive it under `perf record` (Debian's
# linux-perf), and renders each profile with inferno (crates.io, installed into
# target/tools): OUT_DIR/{fork32,fork5,create}-{cpu,offcpu}.svg and rounds.json. Ends like the
# other bench targets: the data dir taken down, then the host scan.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/flame}
DATA=${BENCH_DATA_DIR:-/var/lib/forkbox-bench}
BIN=target/release/forkbox
TOOLS=$PWD/target/tools
INFERNO_VERSION=0.12.8
PORT=${FLAME_PORT:-17171}
WORK=target/flame

command -v perf >/dev/null || { echo "perf missing (make deps installs linux-perf)" >&2; exit 1; }
if [[ ! -e $TOOLS/.inferno-$INFERNO_VERSION ]]; then
  cargo install --quiet --locked inferno --version "$INFERNO_VERSION" --root "$TOOLS"
  touch "$TOOLS/.inferno-$INFERNO_VERSION"
fi
"$BIN" template prepare --data-dir "$DATA" >/dev/null
mkdir -p "$WORK" "$OUT"
"$BIN" serve --data-dir "$DATA" --listen "127.0.0.1:$PORT" --warm-pool 0 >"$WORK/serve.log" 2>&1 &
server=$!
finish() {
  rc=$?
  kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  "$BIN" down --data-dir "$DATA" >/dev/null || rc=1
  scripts/host-scan.sh --pool "$DATA/pool" --dirs "$DATA" || rc=1
  exit $rc
}
trap finish EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$PORT/v1/healthz" >/dev/null && break
  sleep 0.1
done
python3 bench/flame.py --url "http://127.0.0.1:$PORT" --out "$WORK" --rounds "${FLAME_ROUNDS:-5}"
for f in "$WORK"/*.folded; do
  name=$(basename "$f" .folded)
  case $name in
    *-cpu) title="$name: on-CPU, every process on the host, samples at 999 Hz"; unit=samples ;;
    *) title="$name: off-CPU, time blocked in the kernel (waits for other user-space work left out)"; unit=us ;;
  esac
  "$TOOLS/bin/inferno-flamegraph" --title "$title" --countname "$unit" --width 1400 --minwidth 1 <"$f" >"$OUT/$name.svg"
done
cp "$WORK/rounds.json" "$OUT/rounds.json"
echo "wrote $OUT/*.svg"
