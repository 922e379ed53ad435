# forkbox — one entry point for every task. CI runs `.ci/run`, which runs `make test`.
#
#   make serve   install missing system packages (as root), build, prepare the default
#                template and the vm runtime's guest assets, start the server on
#                127.0.0.1:7070 with the jail and vm runtimes
#   make test    the same preparation, then lint and the whole test suite
#   make bench   build release binaries and write docs/performance.md and .png
#   make density 1000 idle sandboxes, then 200 with a warm REPL: memory per sandbox
#   make flamegraph  perf flame graphs of forks and of a cold create (docs/flame)
#   make load    LOAD_SECONDS (default 600) of load on execute and exec: throughput, p99, RSS
#   make test-vm the vm runtime's end-to-end tests (QEMU, TCG here; see docs/vm.md;
#                also the last step of `make test`)
#   make fuzz    run every fuzz target for FUZZ_SECONDS (default 300) each; `make test`
#                runs them for FUZZ_SMOKE_SECONDS (default 6) each (`make fuzz-smoke`)

SHELL := /bin/bash
CARGO ?= cargo
# System packages: scripts/deps.sh installs what is missing in one apt transaction and
# checks the tools afterwards (`--vm`: also QEMU and busybox for the vm runtime).
AGENT := $(CURDIR)/target/agent/forkbox-agent
PROBE := $(CURDIR)/target/probe/forkbox-probe
TEST_POOL ?= /var/lib/forkbox-test/pool
export FORKBOX_AGENT_BIN := $(AGENT)
export FORKBOX_PROBE_BIN := $(PROBE)

.PHONY: flamegraph ui ui-deps test-ui ts-deps test-ts disk-check bench-cluster bench-vm test-cluster deploy-check vm-deps vm-assets test-vm soak all deps agent probe build build-release serve test lint unit e2e bench density load bench-deps sdk-deps clients-deps fmt clean fuzz-deps fuzz-build fuzz-lint fuzz-smoke fuzz

all: build

deps:
	scripts/deps.sh

# The agent is PID 1 inside every sandbox: a static executable (glibc, crt-static).
agent:
	$(CARGO) rustc --release -p forkbox-agent --bin forkbox-agent -- -C target-feature=+crt-static -C relocation-model=static -C strip=debuginfo
	@mkdir -p target/agent && cp -f target/release/forkbox-agent $(AGENT).tmp && mv -f $(AGENT).tmp $(AGENT)

# The escape probes (crates/probe) run inside sandboxes: static like the agent, so they
# need nothing from the sandbox's filesystem. crates/cli/tests/escape.rs uploads them.
probe:
	$(CARGO) rustc --release -p forkbox-probe --bin forkbox-probe -- -C target-feature=+crt-static -C relocation-model=static -C strip=debuginfo
	@mkdir -p target/probe && cp -f target/release/forkbox-probe $(PROBE).tmp && mv -f $(PROBE).tmp $(PROBE)

build-release: ui
	$(CARGO) build --release -p forkbox --bin forkbox

build: ui
	$(CARGO) build -p forkbox --bin forkbox

# The web console (/ui, docs/ui.md): its JavaScript dependencies (xterm.js, esbuild)
# from npm, pinned in ui/package-lock.json (installed again only when the lockfile
# changed), bundled by esbuild into ui/dist, which the binary embeds (crates/api/build.rs).
# Bundled again only when a source or the lockfile is newer than the bundle (an
# unchanged bundle keeps the binary's build from running again).
ui: deps ui/dist/app.js
ui/dist/app.js: $(wildcard ui/src/*) ui/package-lock.json
	@cd ui && cmp -s package-lock.json node_modules/.forkbox-lock 2>/dev/null || \
	  (npm ci --no-audit --no-fund --silent && cp package-lock.json node_modules/.forkbox-lock)
	cd ui && node_modules/.bin/esbuild src/app.js --bundle --minify --target=es2020 \
	  --outfile=dist/app.js --log-level=warning && cp src/index.html dist/index.html

# `make serve`: the packages (QEMU included), the agent and a release build, the python
# template and the vm runtime's guest assets in SERVE_DATA (each cached: a rerun takes
# seconds), then the server on 127.0.0.1:7070 with both runtimes (`jail` the default;
# `{"runtime": "vm"}` for a QEMU microvm).
SERVE_DATA ?= /var/lib/forkbox
serve: vm-deps agent build-release
	./target/release/forkbox template prepare --data-dir $(SERVE_DATA)
	scripts/vm-assets.sh $(SERVE_DATA)/vm $(SERVE_DATA)/pool python
	./target/release/forkbox serve --data-dir $(SERVE_DATA)

lint: fuzz-lint
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The Python SDK's tests and the API fuzzing run in a venv with the SDK installed from
# sdk/python (PyPI: httpx, pytest, schemathesis).
SDK_VENV := $(CURDIR)/target/sdk-venv
sdk-deps: deps
	@[ -x $(SDK_VENV)/bin/python ] || python3 -m venv $(SDK_VENV)
	@$(SDK_VENV)/bin/pip install -q -e 'sdk/python[test]' schemathesis

# The TypeScript SDK (sdk/typescript) has no dependencies; its type check uses a pinned
# TypeScript from npm, in target/ts-deps, beside the LSP test's client (tests/lsp: the
# WebSocket LSP client stack Monaco uses).
TS_DEPS := $(CURDIR)/target/ts-deps
TS_PACKAGES := typescript@5.6.3 vscode-ws-jsonrpc@3.3.1 vscode-languageserver-protocol@3.17.5 ws@8.18.3
ts-deps: deps
	@cd $(TS_DEPS) 2>/dev/null && node -e 'for (const p of process.argv.slice(1)) { const i = p.lastIndexOf("@"); if (require("./node_modules/" + p.slice(0, i) + "/package.json").version !== p.slice(i + 1)) process.exit(1) }' $(TS_PACKAGES) 2>/dev/null || \
	  (mkdir -p $(TS_DEPS) && cd $(TS_DEPS) && echo '{"private": true}' >package.json && \
	   npm install --silent --no-audit --no-fund $(TS_PACKAGES))

# The TypeScript SDK: its node --test suite against a real server, then `npm pack`
# installed, imported and type-checked (scripts/check-ts-package.sh).
test-ts: ts-deps agent build
	FORKBOX_TEST_POOL=$(TEST_POOL) FORKBOX_BIN=$(CURDIR)/target/debug/forkbox FORKBOX_AGENT_BIN=$(CURDIR)/target/agent/forkbox-agent node --test sdk/typescript/test/
	scripts/check-ts-package.sh $(TS_DEPS)

# The web console in a real headless Chromium (Debian's chromium and chromium-driver,
# scripts/deps.sh), driven by PyPI's selenium, pinned, in a venv of its own: tests/ui.
# It rewrites the screenshots in docs/ui/.
UI_VENV := $(CURDIR)/target/ui-venv
ui-deps: deps
	@[ -x $(UI_VENV)/bin/python ] || python3 -m venv $(UI_VENV)
	@$(UI_VENV)/bin/python -c "import importlib.metadata as m; assert m.version('selenium') == '4.27.1' and m.version('pytest') == '8.3.4'" 2>/dev/null || \
	  $(UI_VENV)/bin/pip install -q 'selenium==4.27.1' 'pytest==8.3.4'

test-ui: ui-deps agent build
	FORKBOX_TEST_POOL=$(TEST_POOL) FORKBOX_BIN=$(CURDIR)/target/debug/forkbox FORKBOX_AGENT_BIN=$(AGENT) $(UI_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/ui

# The real third-party clients from PyPI, pinned, in a venv of their own (forkbox's
# SDK ships a `podflare` alias module that would shadow the real one): tests/clients.
CLIENTS_VENV := $(CURDIR)/target/clients-venv
clients-deps: deps
	@[ -x $(CLIENTS_VENV)/bin/python ] || python3 -m venv $(CLIENTS_VENV)
	@$(CLIENTS_VENV)/bin/python -c "import podflare, pandastack, pytest, httpx, h2, importlib.metadata as m; assert podflare.__version__ == '0.0.22' and pandastack.__version__ == '0.10.0' and m.version('declaw') == '1.7.0' and m.version('websockets') == '15.0.1' and m.version('mcp') == '1.23.1'" 2>/dev/null || \
	  $(CLIENTS_VENV)/bin/pip install -q 'podflare==0.0.22' 'pandastack==0.10.0' 'declaw==1.7.0' pytest 'httpx[http2]' 'websockets==15.0.1' 'mcp==1.23.1'

# The deployment files (deploy/): Kubernetes manifests validated against the schema
# (kubernetes-validate from PyPI, in a venv of its own), the systemd unit verified.
DEPLOY_VENV := $(CURDIR)/target/deploy-venv
deploy-check: deps build
	@[ -x $(DEPLOY_VENV)/bin/python ] || python3 -m venv $(DEPLOY_VENV)
	@$(DEPLOY_VENV)/bin/python -c "import importlib.metadata as m; assert m.version('kubernetes-validate') == '1.37.0'" 2>/dev/null || \
	  $(DEPLOY_VENV)/bin/pip install -q 'kubernetes-validate==1.37.0'
	DEPLOY_VENV=$(DEPLOY_VENV) scripts/check-deploy.sh

# Fuzzing: cargo-fuzz (libFuzzer) on stable Rust with `--sanitizer none`; the crate in
# fuzz/ is its own workspace. Why and what the targets check: docs/reliability.md.
TOOLS := $(CURDIR)/target/tools
CARGO_FUZZ := $(TOOLS)/bin/cargo-fuzz
CARGO_FUZZ_VERSION := 0.13.2
FUZZ_TARGETS := pty_decode pty_roundtrip agent_json ndjson_roundtrip path_normalize path_resolve lsp_decode dockerfile_read oci_layer
FUZZ_SMOKE_SECONDS ?= 6
FUZZ_SECONDS ?= 300
FUZZ_TARGET_DIR := $(CURDIR)/target/fuzz
FUZZ_CORPUS := $(CURDIR)/target/fuzz-corpus
# The path_resolve target builds its escape-attempt tree under TMPDIR.
FUZZ_TMP := $(CURDIR)/target/fuzz-tmp
FUZZ := TMPDIR=$(FUZZ_TMP) $(CARGO_FUZZ) fuzz

fuzz-deps:
	@$(CARGO_FUZZ) --version 2>/dev/null | grep -qx 'cargo-fuzz $(CARGO_FUZZ_VERSION)' || \
	  $(CARGO) install --locked --root $(TOOLS) --version $(CARGO_FUZZ_VERSION) cargo-fuzz

fuzz-lint:
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	$(CARGO) clippy --manifest-path fuzz/Cargo.toml --target-dir $(CURDIR)/target/fuzz-clippy -- -D warnings

fuzz-build: fuzz-deps
	$(FUZZ) build -s none --target-dir $(FUZZ_TARGET_DIR)

# Runs each target for $(1) seconds on its kept corpus (target/fuzz-corpus/<target>, grown
# by every run) plus the committed seeds; a crash stops with the input saved under
# fuzz/artifacts/<target>/ and the fuzzer's report on stderr.
define fuzz_all
	@rm -rf $(FUZZ_TMP) && mkdir -p $(FUZZ_TMP)
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_CORPUS)/$$t; \
	  seeds=""; [ -d fuzz/seeds/$$t ] && seeds=fuzz/seeds/$$t; \
	  dict=""; case $$t in path_*) dict=-dict=fuzz/dicts/path.dict;; esac; \
	  log=$(FUZZ_TMP)/$$t.log; \
	  if $(FUZZ) run -s none --target-dir $(FUZZ_TARGET_DIR) $$t $(FUZZ_CORPUS)/$$t $$seeds -- \
	       -max_total_time=$(1) -timeout=10 $$dict >$$log 2>&1; then \
	    echo "fuzz $$t: ok, $$(grep -o 'Done [0-9]* runs in [0-9]* second(s)' $$log)"; \
	  else \
	    tail -n 60 $$log >&2; echo "fuzz $$t: FAILED (log: $$log)" >&2; exit 1; \
	  fi; \
	done
	@rm -rf $(FUZZ_TMP)/forkbox-fuzz-root-*
endef

fuzz-smoke: fuzz-build
	$(call fuzz_all,$(FUZZ_SMOKE_SECONDS))

fuzz: fuzz-build
	$(call fuzz_all,$(FUZZ_SECONDS))

# What a run left on the host (scripts/host-scan.sh): the test servers' data dirs are
# temporary (/tmp/forkbox-{e2e,py,soak}-*), the test pool and vm assets a cache.
TEST_DIR := $(patsubst %/,%,$(dir $(TEST_POOL)))
TEST_SCAN := scripts/host-scan.sh --pool $(TEST_POOL) --dirs '/tmp/forkbox-e2e-* /tmp/forkbox-py-* /tmp/forkbox-soak-* /tmp/forkbox-pg-* $(TEST_DIR)'

# Tests share one cached template pool; each test server gets its own data dir, taken
# down (`forkbox down --purge`) and deleted when the test ends. The last step fails the
# run if anything of it is left on the host.
# A clean run builds once: incremental caches would only take disk.
test: export CARGO_INCREMENTAL = 0
test: disk-check vm-deps agent probe build lint deploy-check sdk-deps ts-deps clients-deps ui-deps fuzz-smoke
	./target/debug/forkbox template prepare --data-dir $(TEST_DIR) --pool $(TEST_POOL)
	./target/debug/forkbox template prepare --data-dir $(TEST_DIR) --pool $(TEST_POOL) base
	./target/debug/forkbox template prepare --data-dir $(TEST_DIR) --pool $(TEST_POOL) code-interpreter
	./target/debug/forkbox template prepare --data-dir $(TEST_DIR) --pool $(TEST_POOL) lsp
	FORKBOX_TEST_POOL=$(TEST_POOL) scripts/with-postgres.sh $(CARGO) test --workspace -- --test-threads=4
	CARGO="$(CARGO)" scripts/with-postgres.sh scripts/core-tests-unprivileged.sh
	FORKBOX_TEST_POOL=$(TEST_POOL) FORKBOX_BIN=$(CURDIR)/target/debug/forkbox $(SDK_VENV)/bin/python -m pytest -q sdk/python/tests
	FORKBOX_TEST_POOL=$(TEST_POOL) FORKBOX_BIN=$(CURDIR)/target/debug/forkbox FORKBOX_AGENT_BIN=$(CURDIR)/target/agent/forkbox-agent node --test sdk/typescript/test/
	scripts/check-ts-package.sh $(TS_DEPS)
	FORKBOX_TEST_POOL=$(TEST_POOL) FORKBOX_BIN=$(CURDIR)/target/debug/forkbox FORKBOX_AGENT_BIN=$(CURDIR)/target/agent/forkbox-agent TS_DEPS=$(TS_DEPS) node --test tests/lsp/
	FORKBOX_TEST_POOL=$(TEST_POOL) FORKBOX_BIN=$(CURDIR)/target/debug/forkbox $(CLIENTS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/clients
	FORKBOX_TEST_POOL=$(TEST_POOL) FORKBOX_BIN=$(CURDIR)/target/debug/forkbox SDK_VENV=$(SDK_VENV) $(SDK_VENV)/bin/python tests/fuzz/schemathesis_run.py
	FORKBOX_TEST_POOL=$(TEST_POOL) FORKBOX_BIN=$(CURDIR)/target/debug/forkbox FORKBOX_AGENT_BIN=$(AGENT) $(UI_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/ui
	$(MAKE) test-vm
	-fstrim $(TEST_POOL) 2>/dev/null
	$(TEST_SCAN)

# Three nodes on one throwaway PostgreSQL (docs/cluster.md); `make test` runs it too,
# with the rest of the suite.
test-cluster: agent build
	FORKBOX_TEST_POOL=$(TEST_POOL) scripts/with-postgres.sh $(CARGO) test -p forkbox --test cluster --test database

# Cluster figures (docs/cluster.md): exec through another node vs direct, creates/s
# with 1, 2 and 3 nodes, on a throwaway PostgreSQL.
bench-cluster: deps agent build-release
	FORKBOX_TEST_POOL=$(BENCH_DATA_DIR)/pool FORKBOX_BIN=$(CURDIR)/target/release/forkbox FORKBOX_AGENT_BIN=$(CURDIR)/target/agent/forkbox-agent \
	  scripts/with-postgres.sh python3 scripts/cluster-bench.py

# A clean `make test` needs about 5 GiB (debug builds, fuzz targets, venvs, the test
# pool's templates); say so up front rather than failing on ENOSPC minutes in.
disk-check:
	@avail=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	if [ "$$avail" -lt 5242880 ]; then \
		echo "only $$((avail / 1024)) MiB free under $(CURDIR); make test needs about 5 GiB" >&2; exit 1; \
	fi

# The Jupyter reference row needs ipykernel + jupyter_client, the chart matplotlib
# (PyPI), in a venv. The crun and bwrap rows need the Debian packages (`deps`).
BENCH_VENV := $(CURDIR)/target/bench-venv
bench-deps: deps
	@[ -x $(BENCH_VENV)/bin/python ] || python3 -m venv $(BENCH_VENV)
	@$(BENCH_VENV)/bin/python -c "import ipykernel, jupyter_client, matplotlib" 2>/dev/null || \
	  $(BENCH_VENV)/bin/pip install -q ipykernel jupyter_client matplotlib

# Each benchmark target ends like `make test`: its data dir taken down, then the host
# scan (BENCH_DATA_DIR's pool is a cache).
BENCH_DATA_DIR ?= /var/lib/forkbox-bench
BENCH_END = ./target/release/forkbox down --data-dir $(BENCH_DATA_DIR) >/dev/null; \
	scripts/host-scan.sh --pool $(BENCH_DATA_DIR)/pool --dirs '$(BENCH_DATA_DIR)'
# Runs $(1), then BENCH_END whatever $(1) did; fails if either failed.
define bench_run
	@set +e; $(1); rc=$$?; $(BENCH_END) || rc=1; exit $$rc
endef

bench: deps agent build-release bench-deps vm-assets
	$(call bench_run,./target/release/forkbox bench --data-dir $(BENCH_DATA_DIR) --markdown docs/performance.md --json target/bench.json --jupyter-python $(BENCH_VENV)/bin/python)
	$(BENCH_VENV)/bin/python bench/chart.py target/bench.json docs/performance.png
	$(call bench_run,./target/release/forkbox bench --vm --data-dir $(BENCH_DATA_DIR) --vm-assets $(VM_ASSETS) --markdown docs/performance.md)

# Flame graphs (perf + inferno) of fork n=32 and n=5 and of a cold create into docs/flame/
# (docs/performance.md links them); not part of `make test`.
flamegraph: agent build-release
	scripts/deps.sh --perf
	scripts/flamegraph.sh docs/flame

# The vm runtime's rows alone (TCG here; part of `make bench`).
bench-vm: agent build-release vm-assets
	$(call bench_run,./target/release/forkbox bench --vm --data-dir $(BENCH_DATA_DIR) --vm-assets $(VM_ASSETS) --markdown docs/performance.md)

# Density and load run against a `forkbox serve` child process with a data dir (and so
# a pool) of their own, BENCH_DATA_DIR; both write their section of
# docs/performance.md. Neither is part of `make test` (minutes each).
DENSITY_N ?= 1000
DENSITY_REPL ?= 200
density: deps agent build-release
	./target/release/forkbox template prepare --data-dir $(BENCH_DATA_DIR)
	$(call bench_run,./target/release/forkbox bench --data-dir $(BENCH_DATA_DIR) --density $(DENSITY_N) --density-repl $(DENSITY_REPL) --markdown docs/performance.md)

LOAD_SECONDS ?= 600
LOAD_SANDBOXES ?= 50
load: deps agent build-release
	./target/release/forkbox template prepare --data-dir $(BENCH_DATA_DIR)
	$(call bench_run,./target/release/forkbox bench --data-dir $(BENCH_DATA_DIR) --load $(LOAD_SECONDS) --load-sandboxes $(LOAD_SANDBOXES) --markdown docs/performance.md)

# Bounded soak (SOAK_MINUTES, default 30): random operations with server restarts and
# agent kills against a release server; invariants in tests/soak/soak.py.
SOAK_MINUTES ?= 30
soak: deps agent build-release sdk-deps
	./target/release/forkbox template prepare --data-dir $(TEST_DIR) --pool $(TEST_POOL)
	FORKBOX_TEST_POOL=$(TEST_POOL) FORKBOX_BIN=$(CURDIR)/target/release/forkbox SOAK_MINUTES=$(SOAK_MINUTES) $(SDK_VENV)/bin/python tests/soak/soak.py
	$(TEST_SCAN)

# The vm runtime (crates/vm, docs/vm.md): QEMU, and guest assets made from Debian packages
# (kernel, busybox) and the python template, cached in VM_ASSETS (reruns take seconds).
# `make test-vm` (the last step of `make test`) runs its end-to-end tests, TCG here.
VM_ASSETS ?= $(TEST_DIR)/vm
VM_POOL ?= $(TEST_POOL)
vm-deps:
	scripts/deps.sh --vm

vm-assets: vm-deps build
	./target/debug/forkbox template prepare --data-dir $(patsubst %/,%,$(dir $(VM_POOL))) --pool $(VM_POOL)
	scripts/vm-assets.sh $(VM_ASSETS) $(VM_POOL) python

test-vm: agent vm-assets
	FORKBOX_TEST_POOL=$(TEST_POOL) FORKBOX_TEST_VM_ASSETS=$(VM_ASSETS) $(CARGO) test -p forkbox --test vm --test spine --test commands --test orphans --test egress --test hibernate -- --ignored --test-threads=2 vm

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
