#!/usr/bin/env bash
# What an npm user of the TypeScript SDK gets: `npm pack` of sdk/typescript installed
# (offline: it has no dependencies) into a scratch project, imported there, and its
# types checked by tsc against a small program using them.
#
#   scripts/check-ts-package.sh TS_DEPS   (a dir with typescript installed: make ts-deps)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=$(cd "${1:?usage: check-ts-package.sh TS_DEPS}" && pwd)
tmp=$(mktemp -d /tmp/forkbox-npm-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
(cd "$root/sdk/typescript" && npm pack --silent --pack-destination "$tmp" >/dev/null)
tgz=$(ls "$tmp"/forkbox-*.tgz)
mkdir "$tmp/app"
cd "$tmp/app"
echo '{"name": "app", "version": "0.0.0", "private": true, "type": "module"}' >package.json
npm install --silent --offline --no-audit --no-fund "$tgz"
node --input-type=module -e '
import * as m from "forkbox";
for (const n of ["Sandbox", "Client", "Execution", "ForkboxError", "NotFound", "Gone"]) {
  if (typeof m[n] !== "function") throw new Error(`forkbox exports no ${n}`);
}'
cp "$root/sdk/typescript/test/usage.ts" .
"$deps/node_modules/.bin/tsc" --noEmit --strict --module nodenext --moduleResolution nodenext \
  --target es2022 --lib es2022,dom,dom.iterable,esnext.disposable usage.ts
echo "forkbox npm package: installs, imports, type-checks ($(basename "$tgz"))"
