#!/usr/bin/env bash
# scripts/demo.sh — the README's demo, run against a live `make run`, printed as the
# transcript the README shows (`scripts/demo.sh > transcript.txt`, then paste it between
# the ```console fences). Regenerate it whenever the demo config or a reply changes.
#
# Waits for the start of a minute first, so the per-minute budget is fresh and the figures
# come out the same on every run. Headers that change from run to run or say nothing about
# tokenfuse (date, server, timings, lengths) are left out, and response bodies are cut at 60
# characters, except the filter's own answers, which are shown whole.
#
# Environment: PORT (listener, default 10000), ADMIN_PORT (default 9901).
set -euo pipefail

PORT=${PORT:-10000}
ADMIN_PORT=${ADMIN_PORT:-9901}
ADMIN_TOKEN=demo-admin-token-change-me

if ! curl -s --max-time 2 "http://127.0.0.1:$ADMIN_PORT/ready" | grep -q LIVE; then
  echo "demo.sh: no Envoy ready on admin port $ADMIN_PORT: start \`make run\` first" >&2
  exit 1
fi
# A fresh minute (the demo's per-minute budget), with 40 s left to run in.
while (( $(date +%S | sed 's/^0//') > 15 )); do sleep 1; done

body() {
  printf '{"model":"gpt-4o","max_tokens":%s,"messages":[{"role":"user","content":"Hello!"}]}' "$1"
}

# Print the request as a curl line with the listener's default port, then the response.
show() {
  local key=$1 max_tokens=$2 keep_body=$3 path=${4:-/v1/chat/completions}
  local shown="curl -s -D - localhost:10000$path -H 'authorization: Bearer $key' -d '$(body "$max_tokens")'"
  echo "\$ $shown"
  local out
  out=$(curl -s -D - "http://127.0.0.1:$PORT$path" -H "authorization: Bearer $key" \
    -H 'content-type: application/json' -d "$(body "$max_tokens")" | tr -d '\r')
  local head=${out%%$'\n\n'*} rest=${out#*$'\n\n'}
  echo "$head" | grep -viE '^(date|server|x-envoy-upstream-service-time|content-length|transfer-encoding|x-request-id|x-mock-include-usage):'
  echo
  if [[ $keep_body == whole ]]; then
    echo "$rest"
  else
    echo "${rest:0:60}…"
  fi
  echo
  sleep 0.3 # settlement lands when Envoy ends the stream
}

show demo-key-acme 100 cut
show demo-key-acme 800 cut
show demo-key-acme 900 whole
show demo-key-acme-oncall 900 cut
show demo-key-thrifty 100 cut

echo "\$ curl -s 'localhost:10000/tokenfuse/admin?key=acme&budget=tenant-minute' -H 'authorization: Bearer $ADMIN_TOKEN'"
curl -s "http://127.0.0.1:$PORT/tokenfuse/admin?key=acme&budget=tenant-minute" \
  -H "authorization: Bearer $ADMIN_TOKEN"
echo
echo
echo "\$ curl -s 'localhost:10000/tokenfuse/admin/keys?budget=tenant-minute' -H 'authorization: Bearer $ADMIN_TOKEN'"
curl -s "http://127.0.0.1:$PORT/tokenfuse/admin/keys?budget=tenant-minute" \
  -H "authorization: Bearer $ADMIN_TOKEN"
echo
echo
echo "\$ curl -s localhost:9901/stats/prometheus | grep -E '^tokenfuse_(decisions|tokens)\\{'"
curl -s "http://127.0.0.1:$ADMIN_PORT/stats/prometheus" | grep -E '^tokenfuse_(decisions|tokens)\{'
echo

# The response cache: a deterministic request (temperature 0) twice. The first goes
# upstream (miss) and its answer is kept; the second is answered by the filter (hit),
# charged nothing; what it saved is counted.
cached='{"model":"gpt-4o","temperature":0,"max_tokens":50,"messages":[{"role":"user","content":"What is a token?"}]}'
for _ in 1 2; do
  echo "\$ curl -s -D - localhost:10000/v1/chat/completions -H 'authorization: Bearer demo-key-acme' -d '$cached'"
  out=$(curl -s -D - "http://127.0.0.1:$PORT/v1/chat/completions" -H 'authorization: Bearer demo-key-acme' \
    -H 'content-type: application/json' -d "$cached" | tr -d '\r')
  head=${out%%$'\n\n'*} rest=${out#*$'\n\n'}
  echo "$head" | grep -viE '^(date|server|x-envoy-upstream-service-time|content-length|transfer-encoding|x-request-id|x-mock-include-usage):'
  echo
  echo "${rest:0:60}…"
  echo
  sleep 0.3 # the answer is kept when Envoy ends the first stream
done
echo "\$ curl -s localhost:9901/stats/prometheus | grep -E '^tokenfuse_cache_(lookups|saved_tokens)\\{'"
curl -s "http://127.0.0.1:$ADMIN_PORT/stats/prometheus" | grep -E '^tokenfuse_cache_(lookups|saved_tokens)\{'
