#!/usr/bin/env bash
# scripts/run.sh — the local demo behind `make run`.
#
# Starts two mock OpenAI-compatible upstreams ("primary" and "economy") and Envoy with
# the tokenfuse filter (target/wasm32-wasip1/release/tokenfuse.wasm), prints what to try,
# and runs until Ctrl-C (or until one of them dies), then stops all of them and waits
# for them to exit.
#
# Ports on 127.0.0.1 (environment; `make run PORT=11000 ADMIN_PORT=11901` passes them):
#   PORT          Envoy's listener (default 10000)
#   ADMIN_PORT    Envoy's admin interface (default 9901)
#   PRIMARY_PORT  mock upstream "primary" (default 18001)
#   ECONOMY_PORT  mock upstream "economy" (default 18002)
# envoy/envoy.yaml holds the defaults; Envoy runs on .run/envoy.yaml, a copy with these
# four ports replaced. A port already in use stops the script before anything starts.
#
# Expects the pieces to be built (`make run` does that): the Wasm module, the
# mock_upstream example binary and Envoy. More environment:
#   ENVOY            Envoy binary (default .venv/bin/envoy)
#   MOCK_UPSTREAM    mock binary (default target/debug/examples/mock_upstream)
#   ENVOY_LOG_LEVEL  Envoy's -l level (default info); its log goes to .run/envoy.log
#   RUN_DIR          where the config copy, logs and admin address go (default .run)
set -euo pipefail

cd "$(dirname "$0")/.."
ENVOY=${ENVOY:-.venv/bin/envoy}
MOCK_UPSTREAM=${MOCK_UPSTREAM:-target/debug/examples/mock_upstream}
ENVOY_LOG_LEVEL=${ENVOY_LOG_LEVEL:-info}
PORT=${PORT:-10000}
ADMIN_PORT=${ADMIN_PORT:-9901}
PRIMARY_PORT=${PRIMARY_PORT:-18001}
ECONOMY_PORT=${ECONOMY_PORT:-18002}
WASM=target/wasm32-wasip1/release/tokenfuse.wasm
CONFIG_SRC=envoy/envoy.yaml
RUN_DIR=${RUN_DIR:-.run}

die() {
  echo "run.sh: $*" >&2
  exit 1
}

for f in "$ENVOY" "$MOCK_UPSTREAM" "$WASM"; do
  if [[ ! -x "$f" && ! -f "$f" ]]; then
    die "$f is missing: run \`make run\` (it builds everything first)"
  fi
done

# The variable, what uses it, and the port in envoy/envoy.yaml it replaces.
PORT_VARS=(PORT ADMIN_PORT PRIMARY_PORT ECONOMY_PORT)
declare -A WHAT=([PORT]="Envoy listener" [ADMIN_PORT]="Envoy admin"
  [PRIMARY_PORT]="mock upstream primary" [ECONOMY_PORT]="mock upstream economy")
declare -A DEFAULT=([PORT]=10000 [ADMIN_PORT]=9901 [PRIMARY_PORT]=18001 [ECONOMY_PORT]=18002)

declare -A seen=()
for var in "${PORT_VARS[@]}"; do
  port=${!var}
  if ! [[ "$port" =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then
    die "$var=$port is not a port number (1-65535)"
  fi
  if [[ -n "${seen[$port]:-}" ]]; then
    die "$var and ${seen[$port]} are both $port: give each its own port"
  fi
  seen[$port]=$var
done

# Something accepting connections on 127.0.0.1:$1 (Envoy's listeners set SO_REUSEPORT,
# so a second Envoy would share a taken listener port silently instead of failing).
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for var in "${PORT_VARS[@]}"; do
  if port_in_use "${!var}"; then
    die "port ${!var} (${WHAT[$var]}) is already in use on 127.0.0.1;" \
      "choose another with $var=..., e.g. \`make run $var=$((${!var} + 1000))\`"
  fi
done

# .run/envoy.yaml: envoy/envoy.yaml with each default port_value replaced. Each must occur
# exactly once, so a changed envoy/envoy.yaml fails here instead of running on a port
# nobody asked for. One substitution per line (sed's `t`), so swapped ports stay swapped.
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
CONFIG=$RUN_DIR/envoy.yaml
ADMIN_ADDRESS_FILE=$RUN_DIR/admin.address
sed_args=()
for var in "${PORT_VARS[@]}"; do
  default=${DEFAULT[$var]}
  pattern="port_value: ${default}([^0-9]|\$)"
  count=$(grep -cE "$pattern" "$CONFIG_SRC" || true)
  if [[ "$count" != 1 ]]; then
    die "$CONFIG_SRC: expected one 'port_value: $default' (${WHAT[$var]}), found $count"
  fi
  sed_args+=(-e "s/port_value: ${default}([^0-9]|\$)/port_value: ${!var}\\1/" -e t)
done
{
  echo "# Written by scripts/run.sh from $CONFIG_SRC: listener $PORT, admin $ADMIN_PORT,"
  echo "# upstreams primary $PRIMARY_PORT and economy $ECONOMY_PORT. Edit $CONFIG_SRC instead."
  sed -E "${sed_args[@]}" "$CONFIG_SRC"
} >"$CONFIG"

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

for spec in "primary:$PRIMARY_PORT" "economy:$ECONOMY_PORT"; do
  name=${spec%%:*} port=${spec##*:}
  # The mock's request log (stderr) stays on the terminal; its stdout announces
  # readiness.
  "$MOCK_UPSTREAM" --name "$name" --port "$port" >"$RUN_DIR/mock-$name.out" &
  pids+=($!)
  if ! wait_for_line "$RUN_DIR/mock-$name.out" "listening on" 10 "$!"; then
    die "mock upstream $name did not start on 127.0.0.1:$port"
  fi
  cat "$RUN_DIR/mock-$name.out"
done

# --use-dynamic-base-id: do not collide with other Envoys on this machine (tests).
# --admin-address-path: Envoy writes its admin address there once bound.
rm -f "$ADMIN_ADDRESS_FILE"
"$ENVOY" -c "$CONFIG" --concurrency 2 -l "$ENVOY_LOG_LEVEL" --use-dynamic-base-id \
  --admin-address-path "$ADMIN_ADDRESS_FILE" >"$RUN_DIR/envoy.log" 2>&1 &
envoy_pid=$!
pids+=("$envoy_pid")

# Ready when this Envoy (not another one on the machine) is: the process is alive, it
# wrote the admin address file, its admin interface says LIVE and reports our config
# file, and it lists the listener on $PORT.
admin=http://127.0.0.1:$ADMIN_PORT
envoy_ready() {
  [[ "$(cat "$ADMIN_ADDRESS_FILE" 2>/dev/null)" == "127.0.0.1:$ADMIN_PORT" ]] || return 1
  [[ "$(curl -s --max-time 1 "$admin/ready")" == LIVE* ]] || return 1
  curl -s --max-time 1 "$admin/server_info" | grep -qF "\"config_path\": \"$CONFIG\"" || return 1
  curl -s --max-time 1 "$admin/listeners" | grep -qx "tokenfuse_listener::127.0.0.1:$PORT"
}
ready=
for ((i = 0; i < 300; i++)); do
  kill -0 "$envoy_pid" 2>/dev/null || break
  if envoy_ready; then
    ready=1
    break
  fi
  sleep 0.1
done
if [[ -z "$ready" ]]; then
  if kill -0 "$envoy_pid" 2>/dev/null; then
    echo "run.sh: Envoy (pid $envoy_pid) did not become ready in 30 s;" \
      "last lines of $RUN_DIR/envoy.log:" >&2
  else
    echo "run.sh: Envoy exited during startup; last lines of $RUN_DIR/envoy.log:" >&2
  fi
  tail -n 25 "$RUN_DIR/envoy.log" >&2
  exit 1
fi

cat <<INFO

tokenfuse demo is up (Envoy pid $envoy_pid, config $CONFIG).
  listener  http://127.0.0.1:$PORT   (Envoy + tokenfuse → mock "primary" on :$PRIMARY_PORT;
            what the filter reroutes goes to mock "economy" on :$ECONOMY_PORT)
  admin     http://127.0.0.1:$ADMIN_PORT
  Envoy log $RUN_DIR/envoy.log

Try (the demo's API keys are in envoy/envoy.yaml; more in README.md and docs/):
  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'content-type: application/json' \\
    -H 'authorization: Bearer demo-key-acme' -d '{"model":"gpt-4o","max_tokens":800,"messages":[{"role":"user","content":"Hello!"}]}' -D -

  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'content-type: application/json' \\
    -H 'authorization: Bearer demo-key-thrifty' -d '{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"Hello!"}]}' -D -

  curl -s http://127.0.0.1:$ADMIN_PORT/stats/prometheus | grep ^tokenfuse

Ctrl-C stops everything.
INFO

# Until Ctrl-C, or until any child exits (then stop the others too).
set +e
wait -n "${pids[@]}"
status=$?
set -e
echo "run.sh: a process exited (status $status); see $RUN_DIR/envoy.log" >&2
exit 1
