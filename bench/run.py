#!/usr/bin/env python3
"""tokenfuse benchmark: `make bench` runs this (Python 3.11, standard library only).

Side by side, on this machine, in one run:

* Envoy with no filter (the limit), a Wasm floor (holds and reads bodies, counts nothing),
  Envoy + tokenfuse counting only, Envoy + tokenfuse enforcing a budget (every request
  reserves and settles; the budget never trips), and Envoy's Lua filter estimating tokens as
  body bytes / 4 (a cheap peer); all on the shipped envoy/envoy.yaml (rendered with their
  ports, filter and plugin configuration by bench/src/render_envoy.rs, the tests' renderer),
  in front of the same mock upstream (examples/mock_upstream.rs), `--concurrency 2`.
* Load from wrk at fixed concurrency: chat completions with 1 KB, 16 KB and 128 KB prompts
  of mixed English, code and CJK text (max_tokens 16), and a streamed response (1 KB
  prompt, "stream": true). Configurations run one at a time, in an order rotated every
  round; figures are medians over the rounds, ratios are per-round ratios to the no-filter
  run of the same round (then the median).
* The tokenizer against its peers (bench/peers: tiktoken 4.1, tiktoken-rs, bpe-openai, kitoken,
  Hugging Face tokenizers), on generated English, code, CJK, mixed and Zipf-distributed text,
  first-seen and recurring, natively and in V8.
* The filter's own figures (bench/src/count_bench.rs): the throughput of its counter
  (`tokenfuse::tokens`, rank tables compiled in) and of tiktoken-rs (the counter it
  replaced, kept as the reference), natively and compiled to wasm32-wasip1 in V8 (Node), on
  the same text; tokenizer build time per encoding (both counters natively and in Node's
  V8, and the filter's as it logs it inside Envoy); Envoy's RSS growth per added worker VM
  and its time from start to ready.

This file runs the whole; bench/measure.py takes the figures, bench/report.py turns them
into results/bench.{json,md,svg} and the Performance section of docs/performance.md
(between `<!-- bench:start -->` and `<!-- bench:end -->`). Timings belong here, never in
tests.

* Many streams (bench/src/stream_bench.rs): 1,000 and 2,000 chat completion streams held
  open through Envoy at once, each a long answer (64 KB or 1 MB of SSE over ~30 s) from a mock
  that streams slowly, with and without the usage chunk: Envoy's RSS per in-flight stream and
  its CPU per streamed KB, no filter vs the Wasm floor vs tokenfuse. `--only streams` runs
  this scenario alone (and rewrites only its part of the Performance section).

    python3 bench/run.py [--rounds 3] [--duration 5] [--no-lua] [--quick] [--no-docs]
    python3 bench/run.py --only streams [--stream-points 1000x64,1000x1024,2000x64]

Expects (the Makefile's `bench` target builds them): the peer table's peer_bench (bench/peers,
native and wasm32-wasip1, in target/peers), the filter
target/wasm32-wasip1/release/tokenfuse.wasm, the release examples mock_upstream,
render_envoy, count_bench and exchange_bench (native; worst_shapes with --features
testkit), count_bench, exchange_bench, floor_filter and host_calls (wasm32-wasip1), Envoy
(.venv/bin/envoy or $ENVOY), wrk and node on PATH.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import (STREAM_BENCH, STREAM_CONFIGS, STREAM_POINTS, STREAM_TICKS, many_streams,
                     CASES, COUNT_NATIVE, COUNT_WASM, EXCHANGE_NATIVE, EXCHANGE_WASM, FLOOR_WASM,
                     HOST_CALLS_WASM, MOCK, ONE_CONNECTION, PEERS_NATIVE, PEERS_WASM, PLUGINS,
                     RENDER_ENVOY, ROOT, WASM,
                     WORST_SHAPES, Envoy, agent_pool, count_bench, envoy_binary, exchange_bench,
                     FLOOD_POINTS, cache_flood, free_port, host_calls, log, machine, memory, mixed_text,
                     peer_bench,
                     prompt_pool, run_wrk,
                     sanity, start_mock, stop, worst_shapes, wrk_script)
from report import analyse, report, report_streams, summarise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=3, help="seconds per point")
    p.add_argument("--warmup", type=int, default=2,
                   help="warm-up seconds for each fresh Envoy, before its first point (0: none)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-lua", action="store_true", help="leave out the Lua peer")
    p.add_argument("--quick", action="store_true", help="1 round, 2 s points (a smoke run)")
    p.add_argument("--no-docs", "--no-readme", dest="no_docs", action="store_true",
                   help="do not rewrite the Performance section of docs/performance.md")
    p.add_argument("--out", default="results")
    p.add_argument("--only", choices=["streams"],
                   help="run one scenario alone: `streams`, the many-streams scenario")
    p.add_argument("--no-streams", action="store_true", help="leave out the many-streams scenario")
    p.add_argument("--stream-points", default=",".join(f"{n}x{kb}" for n, kb in STREAM_POINTS),
                   help="many streams: STREAMSxANSWER_KB points, comma-separated")
    p.add_argument("--stream-ticks", type=int, default=STREAM_TICKS,
                   help="many streams: ticks of 100 ms per answer (its duration)")
    p.add_argument("--stream-rounds", type=int, default=1,
                   help="many streams: rounds (configurations in rotated order; medians)")
    p.add_argument("--render-only", action="store_true",
                   help="re-render bench.md/svg and docs/performance.md from an existing results/bench.json")
    args = p.parse_args()
    if args.render_only:
        out = ROOT / args.out
        data = json.loads((out / "bench.json").read_text())
        data["summary"] = summarise(data)  # the summary's fields may be newer than the run
        report(data, out, args.no_docs)
        return
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    stream_points = [tuple(int(x) for x in p.split("x")) for p in args.stream_points.split(",") if p]
    if args.quick and args.stream_points == p.get_default("stream_points"):
        stream_points, args.stream_ticks = [(200, 64)], 100
    if args.only == "streams":
        only_streams(args, stream_points)
        return
    t0 = time.monotonic()
    # `make bench` passes its own start (epoch seconds), so the builds count too.
    make_started = float(os.environ.get("BENCH_STARTED", "0")) or None
    envoy = envoy_binary()
    for need in (WASM, FLOOR_WASM, HOST_CALLS_WASM, MOCK, RENDER_ENVOY, COUNT_NATIVE, COUNT_WASM, EXCHANGE_NATIVE,
                 EXCHANGE_WASM, WORST_SHAPES, STREAM_BENCH, PEERS_NATIVE, PEERS_WASM, Path(envoy)):
        if not need.exists():
            sys.exit(f"missing {need}: run `make bench` (it builds everything first)")
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tokenfuse-bench-"))
    envoy_version = subprocess.run([envoy, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", envoy_version)
    envoy_version = m.group(1) if m else envoy_version.strip()

    # Inputs: per case a pool of distinct bodies (see POOL_BYTES), one per line.
    scripts = {}
    bodies = {}
    prompt_files = []
    body_files = {}  # a body of each case (not the one-connection ones), for exchange_bench
    for case, size, stream in CASES:
        if case in ONE_CONNECTION:
            scripts[case] = scripts[ONE_CONNECTION[case]]
            bodies[case] = bodies[ONE_CONNECTION[case]]
            continue
        slug = case.replace(" ", "").lower()
        body_file = out / f"body-{slug}.json"
        body_files[str(body_file.relative_to(ROOT))] = case
        if size == 0:
            pool = agent_pool(seed=7)
            body_file.write_bytes(pool[-1])
        else:
            first = mixed_text(size, seed=size)  # the streamed case reuses the 1 KB text
            if not stream:
                pf = out / f"prompt-{slug}.txt"
                pf.write_text(first)
                prompt_files.append(str(pf.relative_to(ROOT)))
            pool = prompt_pool(size, stream)
            body_file.write_bytes(pool[0])
        bodies[case] = pool[0]
        scripts[case] = wrk_script(workdir, slug, pool, args.threads)
        log(f"{case}: {len(pool)} distinct bodies, {sum(map(len, pool)) / len(pool) / 1024:.1f} KB on average")

    configs = (["none", "floor", "count", "budget", "cache_hit", "cache_miss"]
               + ([] if args.no_lua else ["lua"]))
    data: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "envoy_version": envoy_version,
        "args": vars(args),
        "configs": configs,
        "cases": [c for c, *_ in CASES],
        "load": [],
    }

    upstream_port = free_port()
    mock = start_mock(upstream_port)
    try:
        log(f"mock upstream on :{upstream_port}; wrk straight at it (1 KB case)")
        run_wrk(upstream_port, scripts["1 KB"], args, args.warmup)
        data["mock_direct"] = run_wrk(upstream_port, scripts["1 KB"], args, args.duration)
        log(f"mock alone: {data['mock_direct']['rps']:.0f} req/s")

        for rnd in range(args.rounds):
            order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
            for kind in order:
                e = Envoy(envoy, workdir, kind, upstream_port, PLUGINS[kind])
                try:
                    for i, (case, *_) in enumerate(CASES):
                        headers = sanity(e.listener, kind, bodies[case])
                        # A fresh Envoy warms up once (connections, the Wasm code's first
                        # calls); later cases run on the warm process.
                        if args.warmup > 0 and i == 0:
                            run_wrk(e.listener, scripts[case], args, args.warmup)
                        cpu_before = e.cpu_s()
                        r = run_wrk(e.listener, scripts[case], args, args.duration,
                                    1 if case in ONE_CONNECTION else None)
                        r["envoy_cpu_us"] = 1e6 * (e.cpu_s() - cpu_before) / max(1, r["requests"])
                        r.update(config=kind, case=case, round=rnd, filter_headers=headers)
                        data["load"].append(r)
                        log(f"round {rnd + 1}/{args.rounds} {kind:6} {case:14} {r['rps']:8.0f} req/s "
                            f"p50 {r['p50_us'] / 1e3:6.2f} ms p99 {r['p99_us'] / 1e3:6.2f} ms "
                            f"Envoy {r['envoy_cpu_us']:6.1f} us CPU/req"
                            + (f"  {r['errors']} errors" if r["errors"] else ""))
                finally:
                    e.stop()

        log("host call costs inside Envoy (bench/src/host_calls.rs, 1 KB load)")
        data["host_calls"] = host_calls(envoy, workdir, upstream_port, scripts["1 KB"], args)
        log("host calls, us per call: " + ", ".join(f"{k} {v:.2f}" for k, v in data["host_calls"]["us"].items()))
        concurrencies = [1, 2, 4]
        data["concurrencies"] = concurrencies
        data["memory"] = memory(envoy, workdir, upstream_port, bodies["1 KB"], concurrencies)
        log("response cache memory under a flood of distinct answers")
        data["cache_flood"] = cache_flood(envoy, workdir, upstream_port,
                                          FLOOD_POINTS[:3] if args.quick else FLOOD_POINTS)
    finally:
        stop(mock)
    if not args.no_streams:
        log(f"many streams: {stream_points}, {args.stream_ticks} ticks of 100 ms per answer")
        data["streams"] = {"rows": many_streams(envoy, workdir, stream_points, list(STREAM_CONFIGS),
                                                args.stream_ticks, args.stream_rounds)}

    data["tokenizer"] = count_bench([f for f in prompt_files if "1kb" not in f], rounds=3)
    data["peers"] = peer_bench(rounds=3, encodings=["o200k_base"])
    data["exchange"] = exchange_bench(list(body_files))
    data["worst_shapes"] = worst_shapes(1024 if args.quick else 4096)
    for row in data["exchange"]:
        row["case"] = body_files.get(row["file"], row["file"])
    analyse(data, big_file=max(prompt_files, key=lambda f: (ROOT / f).stat().st_size))
    data["runtime_s"] = time.monotonic() - t0
    data["total_s"] = time.time() - make_started if make_started else None
    (out / "bench.json").write_text(json.dumps(data, indent=1))
    report(data, out, args.no_docs)
    shutil.rmtree(workdir, ignore_errors=True)


def only_streams(args: argparse.Namespace, points: list[tuple[int, int]]) -> None:
    """The many-streams scenario alone: its figures go into results/bench.json (kept with the
    rest when there is one) and its part of the report is rendered on its own."""
    envoy = envoy_binary()
    for need in (WASM, FLOOR_WASM, RENDER_ENVOY, STREAM_BENCH, Path(envoy)):
        if not need.exists():
            sys.exit(f"missing {need}: run `make bench` (it builds everything first)")
    t0 = time.monotonic()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tokenfuse-bench-"))
    log(f"many streams: {points}, {args.stream_ticks} ticks of 100 ms per answer")
    rows = many_streams(envoy, workdir, points, list(STREAM_CONFIGS), args.stream_ticks, args.stream_rounds)
    streams = {"command": "python3 bench/run.py --only streams"
               + (f" --stream-rounds {args.stream_rounds}" if args.stream_rounds != 1 else ""), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine(), "runtime_s": time.monotonic() - t0, "rows": rows}
    report_streams(streams, out, args.no_docs)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
