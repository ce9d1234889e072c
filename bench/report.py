#!/usr/bin/env python3
"""The report of `make bench` (bench/run.py runs it; Python 3.11, standard library only):
from the raw figures bench/measure.py took, the summary (medians over rounds, ratios to the
no-filter run), the filter's figures (memory per worker VM, VM start, V8 against native) and
the targets met; then results/bench.{json,md,svg} and the Performance section of
docs/performance.md, between `<!-- bench:start -->` and `<!-- bench:end -->`.

    python3 bench/run.py --render-only     # re-render from an existing results/bench.json
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from measure import CASES, CONFIGS, ROOT, log

COMMAND = "make bench"
# Where the Performance section goes (between the markers; `--no-docs` leaves it alone).
PERFORMANCE_DOC = ROOT / "docs/performance.md"
MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else float("nan")


def summarise(data: dict) -> dict:
    """Medians over rounds; ratios and added latency per round against `none`, then median."""
    runs = data["load"]
    out: dict = {}
    for kind in data["configs"]:
        for case, *_ in CASES:
            mine = [r for r in runs if r["config"] == kind and r["case"] == case]
            if not mine:
                continue
            base = {r["round"]: r for r in runs if r["config"] == "none" and r["case"] == case}
            paired = [(r, base[r["round"]]) for r in mine if r["round"] in base]
            out[f"{kind}|{case}"] = {
                "config": kind,
                "case": case,
                "rps": statistics.median(r["rps"] for r in mine),
                "p50_ms": statistics.median(r["p50_us"] for r in mine) / 1e3,
                "p99_ms": statistics.median(r["p99_us"] for r in mine) / 1e3,
                "ratio": statistics.median(r["rps"] / b["rps"] for r, b in paired),
                "added_p50_ms": statistics.median((r["p50_us"] - b["p50_us"]) / 1e3 for r, b in paired),
                "added_p99_ms": statistics.median((r["p99_us"] - b["p99_us"]) / 1e3 for r, b in paired),
                "envoy_cpu_us": statistics.median(r.get("envoy_cpu_us", float("nan")) for r in mine),
                "added_cpu_us": statistics.median(r.get("envoy_cpu_us", float("nan"))
                                                  - b.get("envoy_cpu_us", float("nan")) for r, b in paired),
                "errors": sum(r["errors"] for r in mine),
                "rounds": len(mine),
            }
    return out


def analyse(data: dict, big_file: str) -> None:
    """Adds the summary and the filter's figures to `data` (`big_file`: the largest prompt
    file, whose counting rates compare V8 with native)."""
    data["summary"] = summarise(data)
    mem = data["memory"]
    per_worker = {}
    raw_slope = {v: slope([(r["concurrency"], r["rss_mb"]) for r in mem if r["variant"] == v])
                 for v in ("none", "both", "o200k", "cl100k")}
    per_worker["none"] = raw_slope["none"]
    for v in ("both", "o200k", "cl100k"):  # growth over the no-filter Envoy
        per_worker[v] = raw_slope[v] - raw_slope["none"]
    per_worker["o200k_enc"] = per_worker["o200k"]
    per_worker["cl100k_enc"] = per_worker["cl100k"]
    tok = data["tokenizer"]
    v8_over_native = {}
    vm_start = {}
    for enc in ("o200k_base", "cl100k_base"):
        # The filter's counter in V8 over the reference (tiktoken-rs) natively.
        rates = {(r.get("counter", "tokenfuse"), r["target"]): r["median_mb_s"] for r in tok
                 if r["kind"] == "count" and r["encoding"] == enc and r["file"] == big_file}
        v8_over_native[enc] = (rates.get(("tokenfuse", "wasm32-wasip1"), float("nan"))
                               / rates.get(("tiktoken-rs", "native"), float("nan")))
    for variant, enc in (("o200k", "o200k_base"), ("cl100k", "cl100k_base"), ("both", "both")):
        logged = [b for r in mem if r["variant"] == variant and r["concurrency"] == 1 for b in r["build_ms"]]
        vm_start[enc] = statistics.median(logged) if logged else float("nan")
    data["filter_figures"] = {"per_worker_mb": per_worker, "v8_over_native": v8_over_native,
                              "vm_start_ms": vm_start}


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:+.{digits}f}" if x == x else "n/a"


def render_md(data: dict) -> str:
    s = data["summary"]
    m = data["machine"]
    a = data["args"]
    f = data["filter_figures"]
    lines = [
        f"Measured {data['date']} with `{COMMAND}{' BENCH_ARGS=--quick' if a.get('quick') else ''}` "
        + (f"({data['total_s'] / 60:.1f} min including builds, {data['runtime_s'] / 60:.1f} min measuring) "
           if data.get("total_s") else f"({data['runtime_s'] / 60:.1f} min measuring) ")
        + f"on "
        f"{m['nproc']} × {m['cpu']}, Linux {m['kernel']}; Envoy {data['envoy_version']}, "
        f"`--concurrency 2`; wrk {a['threads']} threads, {a['connections']} connections, "
        f"{a['duration']} s per point (a fresh Envoy per configuration and round, warmed up for "
        f"{a['warmup']} s), {a['rounds']} rounds in "
        f"rotated order, medians; the case \"1 KB, 1 connection\" sends the 1 KB bodies over a single "
        f"connection, so Envoy is not saturated and the added latency is the filter's own. Load generator, mock upstream and Envoy share the machine's "
        f"cores. Noisy machine: treat differences under ~10% as noise.",
        "",
        "| configuration | case | requests/s | ratio to no filter | p50 ms | p99 ms | added p50 ms | added p99 ms "
        "| Envoy CPU µs/request | added CPU µs/request |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in data["configs"]:
        for case, *_ in CASES:
            r = s.get(f"{kind}|{case}")
            if not r:
                continue
            added = (("—", "—", "—") if kind == "none" else
                     (fmt(r["added_p50_ms"]), fmt(r["added_p99_ms"]), fmt(r.get("added_cpu_us", float("nan")), 0)))
            err = f" ({r['errors']} errors)" if r["errors"] else ""
            lines.append(
                f"| {CONFIGS[kind]} | {case} | {r['rps']:.0f}{err} | "
                f"{r['ratio']:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added[0]} | {added[1]} | "
                f"{r.get('envoy_cpu_us', float('nan')):.0f} | {added[2]} |")
    lines += ["", "Envoy CPU µs/request: user + system CPU of the Envoy process (all threads) during the "
              "point, over the requests served (under load, so it includes the cost of contention). "
              "The Wasm floor is a filter that holds each request until its body is complete, reads the "
              "body, adds a response header and reads the response body — what any body-reading Wasm "
              "filter costs (`bench/src/floor_filter.rs`); tokenfuse's own work is what it adds beyond it. "
              "The cache configurations add the response cache (docs/cache.md) to the budget one, on "
              "every request of the pools: with room for every body, every request after the first pass "
              "is answered by the filter (a hit: the upstream is not asked, so the ratio can pass 1); "
              "with four entries for 64 and more distinct bodies, every request misses, goes upstream and "
              "keeps its answer (the whole miss path: lookup, claim, copy of the answer, store, eviction)."]
    mock = data.get("mock_direct")
    if mock:
        lines += ["", f"Mock upstream alone (wrk straight at it, 1 KB case): {mock['rps']:.0f} requests/s, "
                  f"p50 {mock['p50_us'] / 1e3:.2f} ms, p99 {mock['p99_us'] / 1e3:.2f} ms — "
                  + ("well above Envoy's no-filter figure, so the upstream is not the bottleneck."
                     if mock["rps"] > 1.5 * s.get("none|1 KB", {}).get("rps", 0)
                     else "**not** far above Envoy's no-filter figure: the mock may limit the no-filter run.")]

    hc = data.get("host_calls")
    if hc:
        lines += ["", "Host calls inside Envoy (`bench/src/host_calls.rs`, loaded in place of tokenfuse under the "
                  "1 KB load): each kind of call tokenfuse makes, ten in a row per request, timed from inside "
                  "the VM with the host clock; µs per call, median over "
                  f"{hc['reports']} reports of {hc['requests_per_report']} requests. A call's time includes "
                  "Envoy's side and, for calls that return data, the host's call back into the VM to allocate "
                  "the returned buffer (shared data get cas: a read and its compare-and-swap write); back to back, so warm "
                  "figures. A 1 KB request with a budget makes about "
                  "15 (the request header map, the request body, two clock reads, a shared-data read and "
                  "compare-and-swap write to reserve and two more to settle, four response header sets, the "
                  "cluster property, the response header map, the response body); the floor makes three.", "",
                  "| " + " | ".join(k.replace("_", " ") for k in hc["us"]) + " |",
                  "|" + "---:|" * len(hc["us"]),
                  "| " + " | ".join(f"{v:.2f}" for v in hc["us"].values()) + " |"]

    ex = data.get("exchange", [])
    if ex:
        lines += ["", "The filter's whole work per request outside Envoy (`bench/src/exchange_bench.rs`: request "
                  "headers, body parse, count, reservation, response headers, usage (a streamed answer: one "
                  "SSE event per body chunk), settlement, against an "
                  "in-memory host, in Node's V8 with `--no-liftoff`; every request's prompt is new to the count cache; "
                  "µs per request, medians; host calls and calls into the VM are not included, "
                  "Envoy's side of them is in the Envoy CPU column above):", "",
                  "| configuration | request | native µs | V8 µs | V8 µs, caches evicted (4 MB) | heap allocations |",
                  "|---|---|---:|---:|---:|---:|"]
        for name in ("count", "budget"):
            for row in [r for r in ex if r["variant"] == "native" and r["config"] == name]:
                def pick(variant: str) -> float:
                    return next((x["median_us"] for x in ex if x["variant"] == variant and x["config"] == name
                                 and x["file"] == row["file"]), float("nan"))
                what = f"{row.get('case', row['file'])} ({row['bytes']} bytes"
                what += f"; answer: {row['stream_events']} SSE events)" if row.get("stream_events") else ")"
                lines.append(f"| {CONFIGS[name]} | {what} | {row['median_us']:.1f} | "
                             f"{pick('V8'):.1f} | {pick('V8, caches evicted'):.1f} | "
                             f"{row.get('allocations_per_request', float('nan')):.0f} |")
        events = next((r["stream_events"] for r in ex if r.get("stream_events")), 0)
        lines += ["", "Heap allocations per request count the host's copies as well, as the Wasm host makes "
                  "them: each header value and body chunk read is a fresh buffer"
                  + (f" ({events} of the streamed case's are its chunks)." if events else ".")]

    shapes = data.get("worst_shapes", [])
    if shapes:
        sizes = sorted({r["kb"] for r in shapes})
        prose = {r["kb"]: r["us_per_kb"] for r in shapes if r["shape"] == "prose"}
        lines += ["", "Work per request for the worst body shapes (`bench/src/worst_shapes.rs`, natively, "
                  "counting uncached, budgets on; the whole exchange: parse, count, truncation where a "
                  "cap asks for it, response metering, settlement): µs per KiB of request and response, "
                  "and in brackets the multiple of prose of the same size. Linear work keeps a row flat; "
                  "single pieces (one run of letters, spaces or one character, with no split point) go "
                  "through the byte-pair merge's heap, O(n log n), and slow down further as the merge "
                  "outgrows the CPU caches.", "",
                  "| shape | " + " | ".join(f"{k} KiB" for k in sizes) + " |",
                  "|---|" + "---:|" * len(sizes)]
        for name in dict.fromkeys(r["shape"] for r in shapes):
            cells = []
            for k in sizes:
                row = next((r for r in shapes if r["shape"] == name and r["kb"] == k), None)
                if row is None:
                    cells.append("")
                    continue
                times = row["us_per_kb"] / prose[k] if prose.get(k) else float("nan")
                cells.append(f"{row['us_per_kb']:.1f} ({times:.0f}×)")
            lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")

    # Tokenizer figures.
    tok = data["tokenizer"]
    lines += ["", "Tokenizer (`bench/src/count_bench.rs`, medians): the filter's counter (`tokenfuse::tokens`, "
              "tables compiled in) and tiktoken-rs 0.12.1 (the counter it replaced, kept as its reference) "
              "on the same prompt text, natively and as wasm32-wasip1 in Node's V8 (`--no-liftoff`, as Envoy runs it); "
              "each counts the same text again and again, so tokenfuse's memo of merged pieces is warm (text seen "
              "for the first time is in the peer table below):", "",
              "| encoding | text | tokens | tiktoken-rs native MB/s | tiktoken-rs V8 MB/s | tokenfuse native MB/s "
              "| tokenfuse V8 MB/s | tokenfuse V8 / tiktoken-rs native |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    counts = [r for r in tok if r["kind"] == "count"]

    def rate(counter: str, native: bool, enc: str, file: str) -> dict | None:
        return next((x for x in counts if x.get("counter", "tokenfuse") == counter
                     and (x["target"] == "native") == native and x["encoding"] == enc
                     and x["file"] == file), None)

    for r in counts:
        if r["target"] != "native" or r.get("counter", "tokenfuse") != "tokenfuse":
            continue
        enc, file = r["encoding"], r["file"]
        cells = [rate(c, n, enc, file) for c, n in (("tiktoken-rs", True), ("tiktoken-rs", False),
                                                    ("tokenfuse", True), ("tokenfuse", False))]
        mb = [c["median_mb_s"] if c else float("nan") for c in cells]
        tokens = f"{r['tokens']}"
        if any(c and c["tokens"] != r["tokens"] for c in cells):
            tokens += " (**counts differ**: " + ", ".join(str(c["tokens"]) for c in cells if c) + ")"
        size = Path(file).stem.replace("prompt-", "").upper().replace("KB", " KB")
        lines.append(f"| {enc} | {size} | {tokens} | " + " | ".join(f"{x:.1f}" for x in mb)
                     + f" | {mb[3] / mb[0]:.2f} |")
    builds = [r for r in tok if r["kind"] == "build"]

    def build_ms(counter: str, native: bool, enc: str) -> str:
        ms = next((r["median_ms"] for r in builds if r.get("counter", "tokenfuse") == counter
                   and (r["target"] == "native") == native and r["encoding"] == enc), float("nan"))
        return "n/a" if ms != ms else f"{ms:.1f}" if ms >= 1 else f"{ms:.4f}"

    lines += ["", "| encoding | tiktoken-rs build, native ms | tiktoken-rs build, V8 ms | tokenfuse build, native ms "
              "| tokenfuse build, V8 ms | tokenfuse build in Envoy's V8 at VM start (filter log, 1 ms resolution, "
              "`--concurrency 1`) ms |",
              "|---|---:|---:|---:|---:|---:|"]
    for enc in ("o200k_base", "cl100k_base"):
        ms = f["vm_start_ms"].get(enc, float("nan"))
        envoy_ms = f"{ms:.0f}" if ms == ms else "n/a"
        lines.append(f"| {enc} | {build_ms('tiktoken-rs', True, enc)} | {build_ms('tiktoken-rs', False, enc)} | "
                     f"{build_ms('tokenfuse', True, enc)} | {build_ms('tokenfuse', False, enc)} | {envoy_ms} |")
    both = f["vm_start_ms"].get("both", float("nan"))
    lines.append(f"| both (the default configuration) | | | | | {both:.0f} |")

    lines += render_peers(data.get("peers", []))

    mem = data["memory"]

    lines += ["", "Memory: Envoy RSS 1.5 s after start and a few requests (MB), by `--concurrency`:", "",
              "| | " + " | ".join(str(c) for c in data["concurrencies"]) + " | per added worker |",
              "|---|" + "---:|" * (len(data["concurrencies"]) + 1)]
    for variant, label in (("none", "no filter"), ("both", "tokenfuse, both encodings (default)"),
                           ("o200k", "tokenfuse, o200k_base only"), ("cl100k", "tokenfuse, cl100k_base only")):
        row = [next((r["rss_mb"] for r in mem if r["variant"] == variant and r["concurrency"] == c), float("nan"))
               for c in data["concurrencies"]]
        growth = "—" if variant == "none" else f"{f['per_worker_mb'][variant]:.1f} MB"
        lines.append(f"| {label} | " + " | ".join(f"{x:.0f}" for x in row) + f" | {growth} |")
    lines += ["", "Per added worker: least-squares slope of RSS over `--concurrency`, minus the "
              "no-filter slope (each worker runs its own Wasm VM with its own tokenizers)."]
    lines += ["", "Envoy from start to ready (listener accepting; s), the same runs — an outside view of "
              "VM start (module load and instantiation included):", "",
              "| | " + " | ".join(str(c) for c in data["concurrencies"]) + " |",
              "|---|" + "---:|" * len(data["concurrencies"])]
    for variant, label in (("none", "no filter"), ("both", "tokenfuse, both encodings (default)"),
                           ("o200k", "tokenfuse, o200k_base only"), ("cl100k", "tokenfuse, cl100k_base only")):
        row = [next((r["ready_s"] for r in mem if r["variant"] == variant and r["concurrency"] == c), float("nan"))
               for c in data["concurrencies"]]
        lines.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
    flood = data.get("cache_flood") or []
    if flood:
        points = sorted({r["requests"] for r in flood})
        lines += ["", "Response cache memory under a flood (`bench/measure.py` `cache_flood`): Envoy RSS (MB) "
                  "after N distinct cacheable requests whose ~64 KB answers would need far more than the "
                  "cache's bound (`max_bytes` 16 MiB, 1,024 entries), against the same filter without a "
                  "cache; in brackets the bytes the cache holds (`tokenfuse_cache_bytes`, MiB). RSS "
                  "grows by less than the cache holds (the allocator reuses memory Envoy freed after "
                  "start); what the flood shows is that it stops growing once the bound is reached:", "",
                  "| | " + " | ".join(str(p) for p in points) + " |",
                  "|---|" + "---:|" * len(points)]
        for variant in dict.fromkeys(r["variant"] for r in flood):
            cells = []
            for p in points:
                r = next((x for x in flood if x["variant"] == variant and x["requests"] == p), None)
                if r is None:
                    cells.append("")
                elif r["cache_bytes"]:
                    cells.append(f"{r['rss_mb']:.0f} ({r['cache_bytes'] / (1 << 20):.1f})")
                else:
                    cells.append(f"{r['rss_mb']:.0f}")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (from the performance issue):", "",
              "| target | measured | met |", "|---|---|---|"]
    for t in data["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    floor = {case: s.get(f"floor|{case}") for case in ("1 KB", "16 KB")}
    budget = {case: s.get(f"budget|{case}") for case in ("1 KB", "16 KB")}
    none = {case: s.get(f"none|{case}") for case in ("1 KB", "16 KB")}
    if all(floor.values()) and all(budget.values()) and all(none.values()):
        lines += ["", "For scale: the Wasm floor — a filter that only holds and reads the body — reaches "
                  f"{floor['1 KB']['ratio']:.2f} of passthrough at 1 KB and {floor['16 KB']['ratio']:.2f} at 16 KB "
                  "in this run. Envoy CPU per request beyond the floor, tokenfuse counting + budget: "
                  f"{budget['1 KB']['envoy_cpu_us'] - floor['1 KB']['envoy_cpu_us']:.0f} µs at 1 KB, "
                  f"{budget['16 KB']['envoy_cpu_us'] - floor['16 KB']['envoy_cpu_us']:.0f} µs at 16 KB."]
        # With the cores the limit (wrk, mock and Envoy all busy), a request costs the machine
        # cores / throughput: Envoy's CPU plus the load generator's and the mock's, which no
        # filter changes. A ratio r then allows Envoy at most total / r - others.
        cores = data["machine"]["nproc"] or 1
        allow = []
        for case, target in (("1 KB", 0.8), ("16 KB", 0.5)):
            total = cores * 1e6 / none[case]["rps"]
            others = total - none[case]["envoy_cpu_us"]
            allowed = total / target - others
            allow.append(f"{target} at {case} allows Envoy {allowed:.0f} µs per request, "
                         f"{allowed - floor[case]['envoy_cpu_us']:.0f} µs beyond the floor")
        lines += ["", "What the throughput targets leave a filter, if the cores are the limit (as under this "
                  "load, where wrk, the mock and Envoy share them): a request costs the machine "
                  "cores / requests per second — Envoy's CPU plus wrk's and the mock's, which no filter "
                  "changes — so a ratio of " + "; ".join(allow) + ". Compare the host call costs above "
                  "and the V8 times of the filter's work."]
    lines += ["", "Reproduce: `make bench` (about 10 minutes on this machine, builds included; "
              "`make bench BENCH_ARGS='--rounds 5'` for more rounds, `--no-lua` without the Lua peer). "
              "It writes `results/bench.md` (this text), `results/bench.svg` (throughput ratios as a "
              "bar chart) and `results/bench.json` (every run's raw numbers); `results/` is not committed. "
              "Where Envoy's CPU goes within one configuration (Wasm code, host calls, Envoy, kernel; "
              "sampled with perf): `python3 bench/profile.py budget --size 1024` after `make bench`."]
    return "\n".join(lines) + "\n"


def targets(data: dict) -> list[dict]:
    s = data["summary"]
    f = data["filter_figures"]
    out = []

    def add(target: str, measured: str, met: bool) -> None:
        out.append({"target": target, "measured": measured, "met": bool(met)})

    for case, floor in (("1 KB", 0.8), ("16 KB", 0.5)):
        r = s.get(f"budget|{case}")
        if r:
            add(f"throughput ratio, counting + budget, {case} ≥ {floor}", f"{r['ratio']:.2f}", r["ratio"] >= floor)
    for case, how in (("1 KB", f"{data['args']['connections']} connections, Envoy saturated"),
                      ("1 KB, 1 connection", "1 connection, nothing queues")):
        r = s.get(f"budget|{case}")
        if r:
            add(f"p99 added latency, counting + budget, 1 KB < 1 ms ({how})", f"{r['added_p99_ms']:.2f} ms",
                r["added_p99_ms"] < 1.0)
    for enc, v in f["v8_over_native"].items():
        add(f"V8 counting ≥ native tiktoken-rs ({enc}, 128 KB text)", f"{v:.2f}× native tiktoken-rs", v >= 1.0)
    for enc, ms in f["vm_start_ms"].items():
        if enc in ("o200k_base", "cl100k_base"):
            add(f"VM start < 50 ms ({enc}; tokenizer build logged in Envoy)", f"{ms:.0f} ms", ms < 50)
    add("memory < 16 MB per worker VM per encoding (o200k_base)", f"{f['per_worker_mb']['o200k_enc']:.1f} MB",
        f["per_worker_mb"]["o200k_enc"] < 16)
    add("memory < 16 MB per worker VM per encoding (cl100k_base)", f"{f['per_worker_mb']['cl100k_enc']:.1f} MB",
        f["per_worker_mb"]["cl100k_enc"] < 16)
    return out


PEER_TEXTS = {
    "english": "English prose, varied vocabulary",
    "code": "code, fresh identifiers",
    "cjk": "CJK, characters drawn uniformly",
    "mixed": "mixed text of recurring sentences",
    "zipf": "Zipf-distributed words",
}


def render_peers(rows: list[dict]) -> list[str]:
    """The tokenizer peer tables (bench/peers), V8 first, then native; empty without rows."""
    figures = [r for r in rows if r["kind"] == "peer"]
    if not figures:
        return []
    peers = list(dict.fromkeys(r["peer"] for r in figures))
    others = [p for p in peers if p != "tokenfuse"]
    texts = list(dict.fromkeys(r["text"] for r in figures))
    flushed = {r["peer"]: r["flushed"] for r in rows if r["kind"] == "peer_flush"}
    rounds = "3"
    lines = ["", "The tokenizer against its peers (`bench/peers/`, a package of its own: tiktoken-rs 0.12, "
             "the crates.io `tiktoken` 4.1, GitHub's `bpe-openai` 0.3, `kitoken` 0.11 and Hugging Face "
             "`tokenizers` 0.22, whose `tokenizer.json` the bench builds from the tiktoken vocabulary: "
             "byte-level BPE, merges derived from the ranks, `ignore_merges`, the encoding's regex), "
             "on ~64 KiB of generated text per kind, MB/s, medians of " + rounds + " rounds. Every peer's "
             "count is checked equal to tokenfuse's before it is timed. *First seen*: before each timed "
             "count, untimed, each peer forgets what earlier counts left: " + "; ".join(
                 f"{p}: {flushed[p]}" for p in peers if p in flushed) + ". *Recurring*: the same "
             "instance counts the same text again and again, every memo warm. The last column is "
             "tokenfuse over the fastest peer of the row."]
    for target, title in (("wasm32-wasip1", "In Node's V8 (wasm32-wasip1, `--no-liftoff`, as Envoy runs it)"),
                          ("native", "Natively")):
        mine = [r for r in figures if r["target"] == target]
        if not mine:
            continue
        for enc in dict.fromkeys(r["encoding"] for r in mine):
            lines += ["", f"{title}, {enc}, MB/s:", "",
                      "| text | seen | tokens | " + " | ".join(peers) + " | tokenfuse / fastest peer |",
                      "|---|---|---:|" + "---:|" * (len(peers) + 1)]
            problems: dict[str, int] = {}
            for text in texts:
                for mode in ("first-seen", "recurring"):
                    cells, rates = [], {}
                    tokens = ""
                    for peer in peers:
                        r = next((x for x in mine if x["encoding"] == enc and x["peer"] == peer
                                  and x["text"] == text and x["mode"] == mode), None)
                        if r is None:
                            cells.append("")
                        elif "error" in r:
                            n = problems.setdefault(f"{peer}, {text}: {r['error']}", len(problems) + 1)
                            cells.append(f"✗ ({n})")
                        else:
                            rates[peer] = r["median_mb_s"]
                            cells.append(f"{r['median_mb_s']:.1f}")
                            tokens = tokens or str(r["tokens"])
                    best = max((rates[p] for p in others if p in rates), default=float("nan"))
                    lead = rates.get("tokenfuse", float("nan")) / best if best == best else float("nan")
                    lines.append(f"| {PEER_TEXTS.get(text, text)} | {mode} | {tokens} | " + " | ".join(cells)
                                 + (f" | {lead:.2f}× |" if lead == lead else " | n/a |"))
            if problems:
                lines += [""] + [f"({n}) {problem}" for problem, n in problems.items()]
    builds = {(r["peer"], r["target"], r["encoding"]): r["build_ms"] for r in rows if r["kind"] == "peer_build"}
    if builds:
        enc = next(iter(builds))[2]
        lines += ["", f"Build time of one instance ({enc}), ms, native / V8: " + "; ".join(
            f"{p} " + " / ".join(f"{builds[(p, t, enc)]:.0f}" if (p, t, enc) in builds else "n/a"
                                 for t in ("native", "wasm32-wasip1"))
            for p in peers) + "."]
    return lines


def render_svg(data: dict) -> str:
    s = data["summary"]
    kinds = [k for k in data["configs"] if k != "none"]
    colours = {"floor": "#bab0ac", "count": "#4e79a7", "budget": "#e15759", "cache_hit": "#59a14f",
               "cache_miss": "#edc948", "lua": "#76b7b2"}
    w, h, left, top, bottom = max(720, 80 + 150 * len(kinds)), 360, 60, 40, 60
    plot_h = h - top - bottom
    group_w = (w - left - 20) / len(CASES)
    bar_w = group_w * 0.8 / len(kinds)
    ymax = 1.2
    y = lambda v: top + plot_h * (1 - min(v, ymax) / ymax)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">Throughput relative to Envoy without a filter (median of {data["args"]["rounds"]} rounds)</text>']
    for tick in (0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2):
        parts.append(f'<line x1="{left}" x2="{w - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="{"#333" if tick == 1.0 else "#ddd"}"/>')
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.1f}</text>')
    for i, (case, *_) in enumerate(CASES):
        gx = left + i * group_w + group_w * 0.1
        for j, kind in enumerate(kinds):
            r = s.get(f"{kind}|{case}")
            if not r:
                continue
            x = gx + j * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{y(r["ratio"]):.1f}" width="{bar_w - 2:.1f}" '
                         f'height="{top + plot_h - y(r["ratio"]):.1f}" fill="{colours[kind]}"/>')
            parts.append(f'<text x="{x + bar_w / 2 - 1:.1f}" y="{y(r["ratio"]) - 3:.1f}" text-anchor="middle" font-size="10">{r["ratio"]:.2f}</text>')
        parts.append(f'<text x="{left + i * group_w + group_w / 2:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{case}</text>')
    lx = left
    for kind in kinds:
        parts.append(f'<rect x="{lx}" y="{h - 22}" width="12" height="12" fill="{colours[kind]}"/>')
        label = CONFIGS[kind].split(" (")[0].replace("tokenfuse, budget + cache, every request a ", "cache ")
        parts.append(f'<text x="{lx + 16}" y="{h - 12}">{label}</text>')
        lx += (w - left) / len(kinds)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def update_section(doc: Path, md: str) -> None:
    """Writes `md` between the markers of `doc` (created with a heading if missing; the block
    appended if the markers are)."""
    start, end = MARKERS
    block = f"{start}\n<!-- generated by `{COMMAND}` (bench/run.py); edits here are overwritten -->\n{md}{end}"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def report(data: dict, out: Path, no_docs: bool) -> None:
    """results/bench.{json,md,svg} and, unless `no_docs`, the Performance section."""
    data["targets"] = targets(data)
    md = render_md(data)
    (out / "bench.json").write_text(json.dumps(data, indent=1))
    (out / "bench.md").write_text("# tokenfuse benchmark\n\n" + md)
    (out / "bench.svg").write_text(render_svg(data))
    if not no_docs:
        update_section(PERFORMANCE_DOC, md)
    print()
    print(md)
    log(f"done in {data['runtime_s']:.0f} s: {out}/bench.md, bench.svg, bench.json"
        + ("" if no_docs else f", {PERFORMANCE_DOC.relative_to(ROOT)}"))
