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
* The filter's own figures (bench/src/count_bench.rs): the throughput of its counter
  (`tokenfuse::tokens`, rank tables compiled in) and of tiktoken-rs (the counter it
  replaced, kept as the reference), natively and compiled to wasm32-wasip1 in V8 (Node), on
  the same text; tokenizer build time per encoding (both counters natively and in Node's
  V8, and the filter's as it logs it inside Envoy); Envoy's RSS growth per added worker VM
  and its time from start to ready.

Writes results/bench.{json,md,svg} and rewrites README.md between
`<!-- bench:start -->` and `<!-- bench:end -->`. Timings belong here, never in tests.

    python3 bench/run.py [--rounds 3] [--duration 5] [--no-lua] [--quick] [--no-readme]

Expects (the Makefile's `bench` target builds them): the filter
target/wasm32-wasip1/release/tokenfuse.wasm, the release examples mock_upstream,
render_envoy, count_bench and exchange_bench (native; worst_shapes with --features
testkit), count_bench, exchange_bench, floor_filter and host_calls (wasm32-wasip1), Envoy
(.venv/bin/envoy or $ENVOY), wrk and node on PATH.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target/wasm32-wasip1/release/tokenfuse.wasm"
MOCK = ROOT / "target/release/examples/mock_upstream"
COUNT_NATIVE = ROOT / "target/release/examples/count_bench"
COUNT_WASM = ROOT / "target/wasm32-wasip1/release/examples/count_bench.wasm"
EXCHANGE_NATIVE = ROOT / "target/release/examples/exchange_bench"
EXCHANGE_WASM = ROOT / "target/wasm32-wasip1/release/examples/exchange_bench.wasm"
WORST_SHAPES = ROOT / "target/release/examples/worst_shapes"
FLOOR_WASM = ROOT / "target/wasm32-wasip1/release/examples/floor_filter.wasm"
HOST_CALLS_WASM = ROOT / "target/wasm32-wasip1/release/examples/host_calls.wasm"
RENDER_ENVOY = ROOT / "target/release/examples/render_envoy"
WASI_RUN = ROOT / "scripts/wasi-run.mjs"
PATH_CHAT = "/v1/chat/completions"
# Node runs Wasm as Envoy's V8 does: Envoy's host (proxy-wasm-cpp-host) turns Liftoff, V8's
# baseline compiler, off, so every function is optimised before it runs; Node's default tiers
# up from Liftoff, and its timings then jump between tiers.
V8_FLAGS = ["--no-liftoff"]
COMMAND = "make bench"

CASES = [  # name, prompt bytes, stream (size 0: the agent loop pool)
    ("1 KB", 1024, False),
    ("16 KB", 16 * 1024, False),
    ("128 KB", 128 * 1024, False),
    ("1 KB streamed", 1024, True),
    ("agent loop", 0, False),
    ("1 KB, 1 connection", 1024, False),
]
# Cases that send another case's bodies over a single connection: Envoy is not saturated,
# nothing queues, and the added latency is the filter's own time per request.
ONE_CONNECTION = {"1 KB, 1 connection": "1 KB"}

CONFIGS = {
    "none": "Envoy, no filter",
    "floor": "Wasm floor (holds and reads bodies, counts nothing)",
    "count": "tokenfuse, counting only",
    "budget": "tokenfuse, counting + budget",
    "lua": "Lua filter, bytes/4 estimate",
}

COUNT_CONFIG = {"api": "v1"}
BUDGET_CONFIG = {
    "api": "v1",
    "budgets": [
        {"name": "bench", "key": "header:x-tenant", "window": "minute", "base": 1e15}
    ],
}
# The plugin configuration of each configuration of the load runs (None: no tokenfuse).
PLUGINS = {"none": None, "lua": None, "floor": None, "count": COUNT_CONFIG, "budget": BUDGET_CONFIG}
O200K_ONLY_CONFIG = {
    "api": "v1",
    "tokenizer": {"builtin_models": False, "fallback_encoding": "o200k_base"},
}
CL100K_ONLY_CONFIG = {
    "api": "v1",
    "tokenizer": {"builtin_models": False, "fallback_encoding": "cl100k_base"},
}

LUA_SOURCE = """
function envoy_on_request(handle)
  local body = handle:body()
  local n = 0
  if body then n = body:length() end
  handle:headers():add("x-estimated-tokens", tostring(math.floor(n / 4)))
end
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# Prompt text: deterministic mix of English prose, code and CJK
# ---------------------------------------------------------------------------

ENGLISH = [
    "The quarterly report shows that revenue grew by twelve percent, driven mostly by the "
    "new subscription tier and a steady decline in churn among small business customers.",
    "Before you deploy the service, make sure the health checks pass and the configuration "
    "has been reviewed by someone who did not write it.",
    "She walked along the river at dusk, counting the lanterns that drifted past, and "
    "wondered whether anyone upstream was counting them too.",
    "Please summarise the following document in three bullet points, keeping the tone "
    "neutral and avoiding any speculation about future plans.",
    "Latency budgets are easy to state and hard to keep: every layer adds a little, and "
    "nobody owns the sum.",
]
CODE = [
    "fn fib(n: u64) -> u64 {\n    if n < 2 { return n; }\n    fib(n - 1) + fib(n - 2)\n}\n",
    "def merge(a, b):\n    out = []\n    while a and b:\n        out.append((a if a[0] < b[0] else b).pop(0))\n    return out + a + b\n",
    "SELECT tenant, SUM(tokens) AS used FROM usage WHERE ts > now() - interval '1 day' GROUP BY tenant;\n",
    "const res = await fetch(`/v1/chat/completions`, { method: 'POST', body: JSON.stringify(req) });\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product\n",
]
CJK = [
    "今天天气很好，我们去公园散步吧。请把这份文件翻译成英文，并保持原来的格式。",
    "東京の天気は晴れのち曇り、午後から雨が降るでしょう。会議は三時に始まります。",
    "인공지능 모델은 입력된 텍스트를 토큰 단위로 나누어 처리합니다. 오늘 회의는 취소되었습니다.",
    "机器学习模型的推理成本取决于输入和输出的令牌数量，因此需要对每个租户设置预算。",
]


def mixed_text(size: int, seed: int) -> str:
    """About `size` UTF-8 bytes (never more) of interleaved prose, code and CJK."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size:
        kind = rng.random()
        pool = ENGLISH if kind < 0.5 else CODE if kind < 0.8 else CJK
        piece = rng.choice(pool)
        if pool is ENGLISH:
            piece = piece.replace("twelve", str(rng.randint(2, 99)))
        piece += "\n" if rng.random() < 0.3 else " "
        parts.append(piece)
        total += len(piece.encode())
    data = "".join(parts).encode()[:size]
    return data.decode("utf-8", errors="ignore")


def chat_body(prompt: str, stream: bool) -> bytes:
    body = {
        "model": "gpt-4o",
        "max_tokens": 16,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, ensure_ascii=False).encode()


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def http_post(port: int, path: str, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def envoy_binary() -> str:
    """$ENVOY, as make passes it, or the Envoy `make envoy` installs."""
    return os.environ.get("ENVOY", str(ROOT / ".venv/bin/envoy"))


def start_mock(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(MOCK), "--name", "primary", "--port", str(port), "--quiet"],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if "listening" not in line:
        stop(proc)
        sys.exit(f"mock upstream did not start: {line!r}")
    return proc


# The Lua peer, in the Wasm filter's place.
LUA_FILTER = {
    "name": "envoy.filters.http.lua",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": LUA_SOURCE},
    },
}


def envoy_spec(kind: str, listener: int, admin: int, upstream: int, plugin: dict | None) -> dict:
    """What a configuration changes in the shipped envoy/envoy.yaml (its fields are those of
    the tests' EnvoySpec, tests/support/envoy_config.rs): the ports, and no filter, the Lua
    peer in the Wasm filter's place, or the Wasm filter with a module (tokenfuse, the floor,
    the host-call timer) and its plugin configuration. The rest is as shipped and as tested,
    less the identity edge (the requests carry x-tenant themselves)."""
    # One mock serves both clusters: nothing here is sent to the economy route.
    spec: dict = {"listener_port": listener, "admin_port": admin, "primary_port": upstream,
                  "economy_port": upstream}
    if kind == "none":
        spec["no_filter"] = True
    elif kind == "lua":
        spec["http_filter_yaml"] = "- " + json.dumps(LUA_FILTER)  # JSON is YAML
    else:
        spec["wasm"] = str({"floor": FLOOR_WASM, "calls": HOST_CALLS_WASM}.get(kind, WASM))
        spec["plugin_config"] = json.dumps(plugin) if plugin is not None else ""
    return spec


def render_bootstrap(spec: dict) -> str:
    """The bootstrap (JSON) for `spec`, rendered by bench/src/render_envoy.rs."""
    out = subprocess.run([str(RENDER_ENVOY), json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"render_envoy refused {spec}:\n{out.stderr.strip()}")
    return out.stdout


class Envoy:
    def __init__(self, envoy: str, workdir: Path, kind: str, upstream: int, plugin: dict | None,
                 concurrency: int = 2):
        self.kind = kind
        self.listener = free_port()
        self.admin = free_port()
        cfg = workdir / f"envoy-{kind}-{concurrency}.json"
        cfg.write_text(render_bootstrap(envoy_spec(kind, self.listener, self.admin, upstream, plugin)))
        self.log_path = workdir / f"envoy-{kind}-{concurrency}.log"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [envoy, "-c", str(cfg), "--concurrency", str(concurrency), "-l", "warning",
             "--component-log-level", "wasm:info", "--use-dynamic-base-id",
             "--log-path", str(self.log_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"Envoy ({kind}) exited with {self.proc.returncode}:\n"
                         + self.log_path.read_text(errors="replace")[-3000:])
            try:
                status, body = http_get(self.admin, "/ready", timeout=0.5)
                if status == 200 and "LIVE" in body:
                    with socket.create_connection(("127.0.0.1", self.listener), timeout=0.5):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                sys.exit(f"Envoy ({kind}) not ready after 60 s; log: {self.log_path}")
            time.sleep(0.05)
        self.ready_s = time.monotonic() - self.started

    def cpu_s(self) -> float:
        """User + system CPU seconds Envoy has used so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def build_times_ms(self) -> list[int]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [int(m) for m in re.findall(r"built in (\d+) ms", text)]

    def stop(self) -> None:
        stop(self.proc)


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------

WRK_SCRIPT = """
-- Bodies, one per line, sent in turn; each wrk thread starts at its own offset.
local path = "{pool}"
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

local requests = {{}}
local n = 0

function init(args)
  local headers = {{["content-type"] = "application/json", ["x-tenant"] = "bench"}}
  local f = assert(io.open(path, "rb"))
  for line in f:lines() do
    requests[#requests + 1] = wrk.format("POST", nil, headers, line)
  end
  f:close()
  n = (id or 0) * math.floor(#requests / {threads})
end

function request()
  n = n + 1
  if n > #requests then n = 1 end
  return requests[n]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""

# Distinct prompts per case: the pool holds more text than the count cache of a VM (4 MiB)
# can keep, cycled in order, so no prompt is counted from the cache: every request pays for
# counting text it has not seen lately (the worst case). The agent loop case is the other
# end: conversations resent step after step, each step adding one turn.
POOL_BYTES = 16 << 20
AGENT_CONVERSATIONS = 16
AGENT_STEPS = 32


def prompt_pool(size: int, stream: bool) -> list[bytes]:
    """The chat bodies of a case with `size`-byte prompts: enough distinct prompts to fill
    POOL_BYTES (at least 64), the first of them `mixed_text(size, seed=size)`."""
    count = max(64, POOL_BYTES // size)
    return [chat_body(mixed_text(size, seed=size), stream)] + [
        chat_body(mixed_text(size, seed=size * 1_000_003 + i), stream) for i in range(1, count)]


def wrk_script(workdir: Path, slug: str, pool: list[bytes], threads: int) -> Path:
    """A wrk script sending `pool`'s bodies in turn (written with the pool under `workdir`)."""
    pf = workdir / f"pool-{slug}.jsonl"
    pf.write_bytes(b"\n".join(pool) + b"\n")
    sf = workdir / f"wrk-{slug}.lua"
    sf.write_text(WRK_SCRIPT.format(pool=pf, threads=threads))
    return sf


def agent_pool(seed: int) -> list[bytes]:
    """Agent loops: AGENT_CONVERSATIONS conversations of AGENT_STEPS steps, sent step by
    step with the conversations interleaved (step 1 of each, then step 2 of each, ...); step
    k resends the system prompt and the k turns so far."""
    rng = random.Random(seed)
    conversations = []
    for c in range(AGENT_CONVERSATIONS):
        system = f"Agent {c}. " + mixed_text(1024, seed=rng.randrange(1 << 30))
        turns = []
        for k in range(AGENT_STEPS):
            turns.append({"role": "user", "content": f"Step {k}: " + mixed_text(400, seed=rng.randrange(1 << 30))})
            turns.append({"role": "assistant", "content": mixed_text(300, seed=rng.randrange(1 << 30))})
        conversations.append((system, turns))
    pool = []
    for k in range(1, AGENT_STEPS + 1):
        for system, turns in conversations:
            body = {"model": "gpt-4o", "max_tokens": 16,
                    "messages": [{"role": "system", "content": system}] + turns[:2 * k - 1]}
            pool.append(json.dumps(body, ensure_ascii=False).encode())
    return pool


def run_wrk(port: int, script: Path, args: argparse.Namespace, duration: float,
            connections: int | None = None) -> dict:
    conns = connections or args.connections
    cmd = ["wrk", f"-t{min(args.threads, conns)}", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency",
           "-s", str(script), f"http://127.0.0.1:{port}{PATH_CHAT}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        # A point that cannot finish is reported as such, not the end of the whole run.
        log(f"wrk did not finish within {duration + 60:.0f} s: point recorded as failed")
        return {"requests": 0, "duration_us": int(duration * 1e6), "bytes": 0, "connect": 0,
                "read": 0, "write": 0, "status": 0, "timeout": 1, "p50_us": 0, "p99_us": 0,
                "mean_us": 0.0, "rps": 0.0, "errors": 1, "failed": True}
    m = re.search(r"^BENCH (\{.*\})$", out.stdout, re.M)
    if not m:
        sys.exit(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return r


def sanity(port: int, kind: str, body: bytes) -> dict:
    """One request by hand: 200, and the filter under test really did its work."""
    status, headers, payload = http_post(
        port, PATH_CHAT, body, {"content-type": "application/json", "x-tenant": "bench"})
    if status != 200:
        sys.exit(f"{kind}: sanity request got {status}: {payload[:300]!r}")
    want = {"count": "x-tokenfuse-prompt-tokens", "budget": "x-ratelimit-remaining-tokens",
            "floor": "x-floor-body-bytes"}.get(kind)
    if want and want not in headers:
        sys.exit(f"{kind}: response lacks {want}: {headers}")
    return {k: v for k, v in headers.items() if k.startswith(("x-tokenfuse", "x-ratelimit", "x-floor"))}


# ---------------------------------------------------------------------------
# Filter figures
# ---------------------------------------------------------------------------


def count_bench(files: list[str], rounds: int) -> list[dict]:
    rows = []
    for label, cmd in (
        ("native", [str(COUNT_NATIVE)]),
        ("wasm32-wasip1 (V8)", [os.environ.get("NODE", "node"), *V8_FLAGS, str(WASI_RUN), str(COUNT_WASM)]),
    ):
        log(f"tokenizer benchmark: {label}")
        out = subprocess.run(cmd + ["--rounds", str(rounds)] + files, capture_output=True,
                             text=True, cwd=ROOT, timeout=600)
        if out.returncode != 0:
            sys.exit(f"count_bench ({label}) failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def exchange_bench(files: list[str]) -> list[dict]:
    """The filter's whole per-request work outside Envoy (bench/src/exchange_bench.rs): natively,
    in Node's V8 with warm caches, and in V8 with 4 MB of memory written between requests
    (Envoy's own work between two requests of a worker evicts the caches likewise)."""
    rows = []
    node = os.environ.get("NODE", "node")
    for label, cmd in (
        ("native", [str(EXCHANGE_NATIVE)]),
        ("V8", [node, *V8_FLAGS, str(WASI_RUN), str(EXCHANGE_WASM)]),
        ("V8, caches evicted", [node, *V8_FLAGS, str(WASI_RUN), str(EXCHANGE_WASM), "--thrash-kb", "4096"]),
    ):
        log(f"per-request work: {label}")
        out = subprocess.run(cmd + ["--rounds", "5", "--min-ms", "200"] + files, capture_output=True,
                             text=True, cwd=ROOT, timeout=600)
        if out.returncode != 0:
            sys.exit(f"exchange_bench ({label}) failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                row["variant"] = label
                rows.append(row)
    return rows


def worst_shapes(max_kb: int) -> list[dict]:
    """The work of the worst request shapes against prose of the same size
    (bench/src/worst_shapes.rs, natively): µs per KB of body at sizes from 16 KiB up."""
    log(f"worst request shapes, up to {max_kb} KiB")
    out = subprocess.run([str(WORST_SHAPES), "--max-kb", str(max_kb)], capture_output=True,
                         text=True, cwd=ROOT, timeout=900)
    if out.returncode != 0:
        sys.exit(f"worst_shapes failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def host_calls(envoy: str, workdir: Path, upstream: int, script: Path, args: argparse.Namespace) -> dict:
    """What each kind of host call costs inside Envoy (bench/src/host_calls.rs), under the 1 KB
    load: the medians of the averages the filter logs (µs per call, per 2,000 requests of a VM)."""
    e = Envoy(envoy, workdir, "calls", upstream, None)
    try:
        run_wrk(e.listener, script, args, args.warmup + 2 * args.duration)
    finally:
        e.stop()
    reports = [json.loads(m) for m in re.findall(r"host_calls (\{.*\})", e.log_path.read_text(errors="replace"))]
    if not reports:
        sys.exit(f"host_calls: no report in {e.log_path}")
    kinds = list(reports[0]["us"])
    return {"reports": len(reports), "requests_per_report": reports[0]["requests"],
            "us": {k: statistics.median(r["us"][k] for r in reports) for k in kinds}}


def memory(envoy: str, workdir: Path, upstream: int, body: bytes, concurrencies: list[int]) -> list[dict]:
    rows = []
    variants = [("none", None), ("both", COUNT_CONFIG), ("o200k", O200K_ONLY_CONFIG),
                ("cl100k", CL100K_ONLY_CONFIG)]
    for conc in concurrencies:
        for name, plugin in variants:
            e = Envoy(envoy, workdir, "none" if plugin is None else f"mem-{name}", upstream,
                      plugin, concurrency=conc)
            try:
                for _ in range(2 * conc):
                    http_post(e.listener, PATH_CHAT, body, {"content-type": "application/json"})
                time.sleep(1.5)
                rows.append({"variant": name, "concurrency": conc, "rss_mb": e.rss_mb(),
                             "ready_s": e.ready_s, "build_ms": e.build_times_ms()})
            finally:
                e.stop()
            log(f"memory: {name} --concurrency {conc}: {rows[-1]['rss_mb']:.1f} MB, "
                f"ready {rows[-1]['ready_s']:.2f} s, builds {rows[-1]['build_ms']}")
    return rows


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else float("nan")


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release()}


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
              "filter costs (`bench/src/floor_filter.rs`); tokenfuse's own work is what it adds beyond it."]
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
              "on the same prompt text, natively and as wasm32-wasip1 in Node's V8 (`--no-liftoff`, as Envoy runs it):", "",
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


def render_svg(data: dict) -> str:
    s = data["summary"]
    kinds = [k for k in data["configs"] if k != "none"]
    colours = {"floor": "#bab0ac", "count": "#4e79a7", "budget": "#e15759", "lua": "#76b7b2"}
    w, h, left, top, bottom = 720, 360, 60, 40, 60
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
        parts.append(f'<text x="{lx + 16}" y="{h - 12}">{CONFIGS[kind].split(" (")[0]}</text>')
        lx += 180
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def update_readme(readme: Path, md: str) -> None:
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    block = f"{start}\n<!-- generated by `{COMMAND}` (bench/run.py); edits here are overwritten -->\n{md}{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        section = f"## Performance\n\n{block}\n\n"
        anchor = "## Development"
        text = text.replace(anchor, section + anchor, 1) if anchor in text else text + "\n" + section
    readme.write_text(text)


# ---------------------------------------------------------------------------


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
    p.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
    p.add_argument("--out", default="results")
    p.add_argument("--render-only", action="store_true",
                   help="re-render bench.md/svg and README from an existing results/bench.json")
    args = p.parse_args()
    if args.render_only:
        out = ROOT / args.out
        report(json.loads((out / "bench.json").read_text()), out, args.no_readme)
        return
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    t0 = time.monotonic()
    # `make bench` passes its own start (epoch seconds), so the builds count too.
    make_started = float(os.environ.get("BENCH_STARTED", "0")) or None
    envoy = envoy_binary()
    for need in (WASM, FLOOR_WASM, HOST_CALLS_WASM, MOCK, RENDER_ENVOY, COUNT_NATIVE, COUNT_WASM, EXCHANGE_NATIVE,
                 EXCHANGE_WASM, WORST_SHAPES, Path(envoy)):
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

    configs = ["none", "floor", "count", "budget"] + ([] if args.no_lua else ["lua"])
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
    finally:
        stop(mock)

    data["tokenizer"] = count_bench([f for f in prompt_files if "1kb" not in f], rounds=3)
    data["exchange"] = exchange_bench(list(body_files))
    data["worst_shapes"] = worst_shapes(1024 if args.quick else 4096)
    for row in data["exchange"]:
        row["case"] = body_files.get(row["file"], row["file"])
    data["summary"] = summarise(data)

    # Filter figures.
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
    big = max(prompt_files, key=lambda f: (ROOT / f).stat().st_size)
    v8_over_native = {}
    vm_start = {}
    for enc in ("o200k_base", "cl100k_base"):
        # The filter's counter in V8 over the reference (tiktoken-rs) natively.
        rates = {(r.get("counter", "tokenfuse"), r["target"]): r["median_mb_s"] for r in tok
                 if r["kind"] == "count" and r["encoding"] == enc and r["file"] == big}
        v8_over_native[enc] = (rates.get(("tokenfuse", "wasm32-wasip1"), float("nan"))
                               / rates.get(("tiktoken-rs", "native"), float("nan")))
    for variant, enc in (("o200k", "o200k_base"), ("cl100k", "cl100k_base"), ("both", "both")):
        logged = [b for r in mem if r["variant"] == variant and r["concurrency"] == 1 for b in r["build_ms"]]
        vm_start[enc] = statistics.median(logged) if logged else float("nan")
    data["filter_figures"] = {"per_worker_mb": per_worker, "v8_over_native": v8_over_native,
                              "vm_start_ms": vm_start}
    data["runtime_s"] = time.monotonic() - t0
    data["total_s"] = time.time() - make_started if make_started else None
    (out / "bench.json").write_text(json.dumps(data, indent=1))
    report(data, out, args.no_readme)
    shutil.rmtree(workdir, ignore_errors=True)


def report(data: dict, out: Path, no_readme: bool) -> None:
    data["targets"] = targets(data)
    md = render_md(data)
    (out / "bench.json").write_text(json.dumps(data, indent=1))
    (out / "bench.md").write_text("# tokenfuse benchmark\n\n" + md)
    (out / "bench.svg").write_text(render_svg(data))
    if not no_readme:
        update_readme(ROOT / "README.md", md)
    print()
    print(md)
    log(f"done in {data['runtime_s']:.0f} s: {out}/bench.md, bench.svg, bench.json"
        + ("" if no_readme else ", README.md (## Performance)"))


if __name__ == "__main__":
    main()
