#!/usr/bin/env bash
# scripts/fuzz.sh — the fuzzing run behind `make fuzz` (docs/development.md, "Fuzzing").
#
# Builds the cargo-fuzz targets in fuzz/ once (nightly, debug assertions and overflow
# checks on), then runs each for FUZZ_SECONDS seconds, one after the other, single process:
# the corpus is fuzz/corpus/<target> (grows across runs, not committed) plus the committed
# seeds in fuzz/seeds/<target>. A crash stops that target's run; its input is saved under
# fuzz/artifacts/<target>/ and the script exits non-zero after the summary. Logs go to
# fuzz/logs/<target>.log.
#
# Environment:
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_TARGETS   space-separated targets (default: all of them)
#   CARGO          cargo binary (default cargo; needs rustup's `+nightly`)
set -euo pipefail

cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_TARGETS=${FUZZ_TARGETS:-request_body sse_stream usage_json config bpe_diff exchange cache_shapes}
CARGO=${CARGO:-cargo}
# -timeout: an input slower than this counts as a crash (a hang), so a run lasts at most
# FUZZ_SECONDS + 10 s. No -jobs/-workers: one process, its report on stderr.
LIBFUZZER_FLAGS=(-max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)

"$CARGO" +nightly fuzz build --debug-assertions
mkdir -p fuzz/logs

summary=()
failed=0
for target in $FUZZ_TARGETS; do
  mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
  log="fuzz/logs/$target.log"
  before=$(find "fuzz/artifacts/$target" -type f | wc -l)
  start=$SECONDS
  echo "== $target: ${FUZZ_SECONDS}s (log: $log)"
  status=0
  "$CARGO" +nightly fuzz run --debug-assertions "$target" \
    "fuzz/corpus/$target" "fuzz/seeds/$target" -- "${LIBFUZZER_FLAGS[@]}" >"$log" 2>&1 || status=$?
  elapsed=$((SECONDS - start))
  crashes=$(($(find "fuzz/artifacts/$target" -type f | wc -l) - before))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  # libFuzzer's own clock when it finished its time ("Done N runs in S second(s)"); the wall
  # clock (which includes any rebuild) when it stopped early.
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
  if [[ $status -ne 0 && $crashes -eq 0 ]]; then
    crashes=1 # failed without an artifact (build error, OOM before a unit was saved, ...)
  fi
  if [[ $crashes -gt 0 ]]; then
    failed=1
    grep -E '^(thread .* panicked|panicked at|==[0-9]+==ERROR|SUMMARY|artifact_prefix|Test unit written)' "$log" | head -n 8 >&2 || tail -n 20 "$log" >&2
  fi
  summary+=("$target: ${execs:-?} execs in ${secs:-$elapsed} s, $crashes crashes")
done

echo "== fuzz summary (FUZZ_SECONDS=$FUZZ_SECONDS)"
printf '%s\n' "${summary[@]}"
exit "$failed"
