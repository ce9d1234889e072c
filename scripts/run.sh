#!/usr/bin/env bash
# scripts/run.sh — the local demo behind `make run`.
#
# Starts two mock OpenAI-compatible upstreams (primary on :18001, economy on
# :18002) and Envoy with envoy/envoy.yaml (listener :10000, admin :9901, the
# tokenfuse filter from target/wasm32-wasip1/release/tokenfuse.wasm), prints what
# to try, and runs until Ctrl-C (or until one of them dies), then stops all of
# them and waits for them to exit.
#
# Expects the pieces to be built (`make run` does that): the Wasm module, the
# mock_upstream example binary and Envoy. Environment:
#   ENVOY            Envoy binary (default .venv/bin/envoy)
#   MOCK_UPSTREAM    mock binary (default target/debug/examples/mock_upstream)
#   ENVOY_LOG_LEVEL  Envoy's -l level (default info); its log goes to .run/envoy.log
set -euo pipefail

cd "$(dirname "$0")/.."
ENVOY=${ENVOY:-.venv/bin/envoy}
MOCK_UPSTREAM=${MOCK_UPSTREAM:-target/debug/examples/mock_upstream}
ENVOY_LOG_LEVEL=${ENVOY_LOG_LEVEL:-info}
WASM=target/wasm32-wasip1/release/tokenfuse.wasm
RUN_DIR=.run

for f in "$ENVOY" "$MOCK_UPSTREAM" "$WASM"; do
  if [[ ! -x "$f" && ! -f "$f" ]]; then
    echo "run.sh: $f is missing: run \`make run\` (it builds everything first)" >&2
    exit 1
  fi
done
mkdir -p "$RUN_DIR"

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping (pids ${pids[*]:-none})..."
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  echo "stopped."
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

# Waits up to $3 seconds for file $1 to contain $2; fails if process $4 exits.
wait_for_line() {
  local file=$1 needle=$2 timeout=$3 pid=$4
  for ((i = 0; i < timeout * 10; i++)); do
    grep -q "$needle" "$file" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

for spec in primary:18001 economy:18002; do
  name=${spec%%:*} port=${spec##*:}
  # The mock's request log (stderr) stays on the terminal; its stdout announces
  # readiness.
  "$MOCK_UPSTREAM" --name "$name" --port "$port" >"$RUN_DIR/mock-$name.out" &
  pids+=($!)
  if ! wait_for_line "$RUN_DIR/mock-$name.out" "listening on" 10 "$!"; then
    echo "run.sh: mock upstream $name did not start on 127.0.0.1:$port (port in use?)" >&2
    exit 1
  fi
  cat "$RUN_DIR/mock-$name.out"
done

# --use-dynamic-base-id: do not collide with other Envoys on this machine (tests).
"$ENVOY" -c envoy/envoy.yaml --concurrency 2 -l "$ENVOY_LOG_LEVEL" --use-dynamic-base-id \
  >"$RUN_DIR/envoy.log" 2>&1 &
envoy_pid=$!
pids+=("$envoy_pid")
ready=
for ((i = 0; i < 300; i++)); do
  if [[ "$(curl -s --max-time 1 http://127.0.0.1:9901/ready 2>/dev/null)" == LIVE* ]]; then
    ready=1
    break
  fi
  kill -0 "$envoy_pid" 2>/dev/null || break
  sleep 0.1
done
if [[ -z "$ready" ]]; then
  echo "run.sh: Envoy did not become ready; last lines of $RUN_DIR/envoy.log:" >&2
  tail -n 25 "$RUN_DIR/envoy.log" >&2
  exit 1
fi

cat <<'INFO'

tokenfuse demo is up.
  listener  http://127.0.0.1:10000   (Envoy + tokenfuse → primary :18001, or economy :18002
                                      with header x-tokenfuse-route: economy)
  admin     http://127.0.0.1:9901
  Envoy log .run/envoy.log

Try (more in README.md, "Budgets"):
  curl -s http://127.0.0.1:10000/v1/chat/completions -H 'content-type: application/json' \
    -H 'x-tenant: acme' -d '{"model":"gpt-4o","max_tokens":800,"messages":[{"role":"user","content":"Hello!"}]}' -D -

  curl -s http://127.0.0.1:10000/v1/chat/completions -H 'content-type: application/json' \
    -H 'x-tenant: thrifty' -d '{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"Hello!"}]}' -D -

  curl -s http://127.0.0.1:9901/stats/prometheus | grep ^tokenfuse

Ctrl-C stops everything.
INFO

# Until Ctrl-C, or until any child exits (then stop the others too).
set +e
wait -n "${pids[@]}"
status=$?
set -e
echo "run.sh: a process exited (status $status); see $RUN_DIR/envoy.log" >&2
exit 1
