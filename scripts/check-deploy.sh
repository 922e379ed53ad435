#!/usr/bin/env bash
# Checks the deployment files in deploy/ (part of `make test`, `make deploy-check`):
# the Kubernetes manifests against the Kubernetes schema (kubernetes-validate, strict:
# unknown fields fail), custom resources as well-formed YAML, the systemd unit with
# `systemd-analyze verify` (any complaint fails), pointed at this build's binary.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DEPLOY_VENV:-target/deploy-venv}
"$venv/bin/kubernetes-validate" --strict --quiet deploy/kubernetes/forkbox.yaml
"$venv/bin/python" -c 'import sys, yaml
for f in sys.argv[1:]:
    docs = [d for d in yaml.safe_load_all(open(f)) if d]
    assert docs and all("apiVersion" in d and "kind" in d for d in docs), f' \
  deploy/kubernetes/postgres-cnpg.yaml
if command -v systemd-analyze >/dev/null; then
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  sed -e "s|/usr/local/bin/forkbox|$PWD/target/debug/forkbox|" \
    -e "s|/etc/forkbox/forkbox.env|$PWD/deploy/systemd/forkbox.env|" \
    deploy/systemd/forkbox.service >"$dir/forkbox.service"
  out=$(systemd-analyze verify "$dir/forkbox.service" 2>&1 || echo "systemd-analyze failed")
  if [ -n "$out" ]; then
    echo "deploy/systemd/forkbox.service: $out" >&2
    exit 1
  fi
fi
echo "deploy: manifests and unit valid"
