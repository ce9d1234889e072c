#!/usr/bin/env python3
"""What `make bench` measures (bench/run.py runs it; Python 3.11, standard library only):
the configurations and request cases, the prompt text, the processes (the mock upstream,
Envoy on bootstraps rendered from the shipped envoy/envoy.yaml), wrk's load, and the
benchmark programs of bench/src/ (tokenizer, per-request work, worst shapes, host calls),
plus Envoy's memory and start time. Each function returns raw figures; bench/report.py
turns them into the report. Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
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
STREAM_BENCH = ROOT / "target/release/examples/stream_bench"
# The tokenizer peer table (bench/peers: a package of its own, built into target/peers).
PEERS_NATIVE = ROOT / "target/peers/release/peer_bench"
PEERS_WASM = ROOT / "target/peers/wasm32-wasip1/release/peer_bench.wasm"
WASI_RUN = ROOT / "scripts/wasi-run.mjs"
PATH_CHAT = "/v1/chat/completions"
# Node runs Wasm as Envoy's V8 does: Envoy's host (proxy-wasm-cpp-host) turns Liftoff, V8's
# baseline compiler, off, so every function is optimised before it runs; Node's default tiers
# up from Liftoff, and its timings then jump between tiers.
V8_FLAGS = ["--no-liftoff"]

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
    "cache_hit": "tokenfuse, budget + cache, every request a hit",
    "cache_miss": "tokenfuse, budget + cache, every request a miss",
    "lua": "Lua filter, bytes/4 estimate",
}

COUNT_CONFIG = {"api": "v1"}
BUDGET_CONFIG = {
    "api": "v1",
    "budgets": [
        {"name": "bench", "key": "header:x-tenant", "window": "minute", "base": 1e15}
    ],
}
# The response cache on every request of the pools (`deterministic_only: false`): room for
# every body of a pool, so after the first pass every request is a hit; or four entries for
# pools of 64 and more distinct bodies, so every request misses, goes upstream, and keeps
# its answer (evicting another) — the whole miss path.
CACHE_HIT_CONFIG = dict(BUDGET_CONFIG, cache={
    "scope": "shared", "deterministic_only": False, "ttl_secs": 3600,
    "max_entries": 65536, "max_entry_bytes": 65536, "max_bytes": 1 << 30})
CACHE_MISS_CONFIG = dict(BUDGET_CONFIG, cache={
    "scope": "shared", "deterministic_only": False, "ttl_secs": 3600, "max_entries": 4})
# The plugin configuration of each configuration of the load runs (None: no tokenfuse).
PLUGINS = {"none": None, "lua": None, "floor": None, "count": COUNT_CONFIG, "budget": BUDGET_CONFIG,
           "cache_hit": CACHE_HIT_CONFIG, "cache_miss": CACHE_MISS_CONFIG}
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
                 concurrency: int = 2, spec_extra: dict | None = None):
        self.kind = kind
        self.listener = free_port()
        self.admin = free_port()
        cfg = workdir / f"envoy-{kind}-{concurrency}.json"
        spec = envoy_spec(kind, self.listener, self.admin, upstream, plugin)
        spec.update(spec_extra or {})
        cfg.write_text(render_bootstrap(spec))
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

    def wasm_rss_mb(self) -> tuple[float, int]:
        """The resident part of the Wasm linear memories (MB) and how many there are. V8
        reserves each memory with its guard region: the accessible pages (read-write,
        anonymous) right below an inaccessible reservation of 4 GiB and more; nothing else in
        Envoy maps that shape."""
        try:
            text = Path(f"/proc/{self.proc.pid}/smaps").read_text()
        except OSError:
            return float("nan"), 0
        maps = []  # [start, end, perms, rss kB]
        for line in text.splitlines():
            head = line.split(maxsplit=2)
            if head and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = head[0].split("-")
                maps.append([int(lo, 16), int(hi, 16), head[1], 0])
            elif line.startswith("Rss:") and maps:
                maps[-1][3] = int(line.split()[1])
        total_kb, count = 0, 0
        for a, b in zip(maps, maps[1:]):
            if a[1] == b[0] and a[2].startswith("rw") and b[2] == "---p" and b[1] - b[0] >= 4 << 30:
                total_kb += a[3]
                count += 1
        return total_kb / 1024, count

    def heap_mb(self) -> dict:
        """tcmalloc's figures from the admin /memory endpoint (MB): `allocated` (in use by
        Envoy's C++ heap) and `free` (held by the allocator for reuse: the page heap's free
        pages and the thread caches, resident in RSS but reusable by any later allocation)."""
        try:
            _, text = http_get(self.admin, "/memory")
            m = {k: int(v) for k, v in json.loads(text).items()}
        except (OSError, ValueError):
            return {"allocated": float("nan"), "free": float("nan")}
        return {"allocated": m["allocated"] / 2**20,
                "free": (m["pageheap_free"] + m["total_thread_cache"]) / 2**20}

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
            "floor": "x-floor-body-bytes", "cache_hit": "x-tokenfuse-cache",
            "cache_miss": "x-tokenfuse-cache"}.get(kind)
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


def peer_bench(rounds: int, encodings: list[str]) -> list[dict]:
    """tokenfuse's counter against the public Rust tokenizers (bench/peers/src/main.rs): MB/s
    per text, first-seen (every memo flushed before each timed count) and recurring (warm),
    natively and in Node's V8 with `--no-liftoff`; a peer whose count differs from
    tokenfuse's is reported with the reason, untimed."""
    rows = []
    node = os.environ.get("NODE", "node")
    for label, cmd in (
        ("native", [str(PEERS_NATIVE)]),
        # --no-turbo-fast-api-calls: the peers grow the module's memory by hundreds of MB,
        # which exposes Node 20 to the crash scripts/wasi-run.mjs describes (SIGSEGV here).
        ("wasm32-wasip1 (V8)", [node, *V8_FLAGS, "--no-turbo-fast-api-calls", str(WASI_RUN), str(PEERS_WASM)]),
    ):
        log(f"tokenizer peers: {label}")
        args = ["--rounds", str(rounds)] + [a for e in encodings for a in ("--encoding", e)]
        out = subprocess.run(cmd + args, capture_output=True, text=True, cwd=ROOT, timeout=1800)
        if out.returncode != 0:
            sys.exit(f"peer_bench ({label}) failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
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


# The cache flood: distinct cacheable requests whose answers (~64 KB each, the mock's
# completion repeated) would need far more than the cache's byte bound.
FLOOD_CACHE = {"api": "v1", "cache": {"scope": "shared", "deterministic_only": False,
               "max_entries": 1024, "max_entry_bytes": 262144, "max_bytes": 16 << 20}}
FLOOD_POINTS = [0, 250, 500, 1000, 2000, 3000]
FLOOD_REPEAT = "2000"  # x 32-byte completion: 64 KB answers


def cache_flood(envoy: str, workdir: Path, upstream: int, points: list[int]) -> list[dict]:
    """Envoy RSS (MB) after each count in `points` of distinct cacheable requests, with the
    cache bounded at 16 MiB and without a cache (the same filter, `cache` left out), so the
    growth beyond the filter's own is the cache's."""
    rows = []
    for name, plugin in (("no cache", {"api": "v1"}), ("cache, 16 MiB bound", FLOOD_CACHE)):
        e = Envoy(envoy, workdir, "flood-" + name.split(",")[0].replace(" ", ""), upstream, plugin)
        try:
            sent = 0
            for point in points:
                while sent < point:
                    body = json.dumps({"model": "gpt-4o", "max_tokens": 16, "messages": [
                        {"role": "user", "content": f"flood {sent}"}]}).encode()
                    status, headers, payload = http_post(e.listener, PATH_CHAT, body, {
                        "content-type": "application/json", "x-mock-repeat": FLOOD_REPEAT})
                    if status != 200:
                        sys.exit(f"cache flood: {status}: {payload[:200]!r}")
                    sent += 1
                time.sleep(1.2)  # answers are kept when Envoy ends each stream; the tick reports
                held = 0
                if plugin.get("cache"):
                    _, text = http_get(e.admin, "/stats?filter=tokenfuse_cache_bytes")
                    m = re.search(r"tokenfuse_cache_bytes: (\d+)", text)
                    held = int(m.group(1)) if m else 0
                rows.append({"variant": name, "requests": point, "rss_mb": e.rss_mb(),
                             "cache_bytes": held})
                log(f"cache flood: {name}, {point} requests: {rows[-1]['rss_mb']:.1f} MB, "
                    f"cache holds {held / (1 << 20):.1f} MiB")
        finally:
            e.stop()
    return rows


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


# ---------------------------------------------------------------------------
# Many streams: thousands of slow SSE answers in flight at once
# ---------------------------------------------------------------------------

# Configurations of the many-streams scenario: name -> (Envoy kind, plugin config, usage
# chunk asked for and sent). The last one is the stream whose usage never comes, where the
# filter must count the streamed text itself.
STREAM_CONFIGS = {
    "none": ("none", None, True),
    "floor": ("floor", None, True),
    "budget": ("budget", BUDGET_CONFIG, True),
    "budget_nousage": ("budget", BUDGET_CONFIG, False),
}
STREAM_LABELS = {
    "none": "Envoy, no filter",
    "floor": "Wasm floor",
    "budget": "tokenfuse, counting + budget, usage chunk",
    "budget_nousage": "tokenfuse, counting + budget, no usage chunk (text counted)",
}
# An answer: content events of STREAM_TEXT_BYTES bytes of English text (about ten tokens;
# each event ~217 bytes of SSE), a tick every STREAM_INTERVAL_MS. A long answer streams
# faster (more events per tick), so each lasts about STREAM_TICKS ticks (~20 s).
STREAM_TEXT_BYTES = 48
STREAM_EVENT_BYTES = 217
STREAM_INTERVAL_MS = 100
STREAM_TICKS = 200
# (streams in flight, answer KB): both lengths at 1,000 streams, and 2,000 streams of the
# short one for the slope over N.
STREAM_POINTS = [(1000, 64), (1000, 1024), (2000, 64)]
# Sampled at these fractions of an answer's duration, all streams still in flight.
STREAM_FRACTIONS = (0.25, 0.9)


def stream_shape(answer_kb: int, ticks: int = STREAM_TICKS) -> dict:
    """The mock's controls for an answer of about `answer_kb` KB over `ticks` ticks."""
    events = max(1, answer_kb * 1024 // STREAM_EVENT_BYTES)
    per_tick = max(1, events // ticks)
    return {"events": events, "per_tick": per_tick, "ticks": -(-events // per_tick),
            "duration_s": -(-events // per_tick) * STREAM_INTERVAL_MS / 1e3}


def start_stream_mock() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([str(STREAM_BENCH), "mock"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    if not m:
        stop(proc)
        sys.exit(f"stream mock did not start: {line!r}")
    return proc, int(m.group(1))


def stream_load(port: int, streams: int, shape: dict, usage: bool) -> subprocess.Popen:
    cmd = [str(STREAM_BENCH), "load", "--port", str(port), "--streams", str(streams),
           "--events", str(shape["events"]), "--text-bytes", str(STREAM_TEXT_BYTES),
           "--events-per-tick", str(shape["per_tick"]),
           "--interval-ms", str(shape.get("interval_ms", STREAM_INTERVAL_MS))]
    return subprocess.Popen(cmd + (["--usage"] if usage else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def many_streams(envoy: str, workdir: Path, points: list[tuple[int, int]], configs: list[str],
                 ticks: int = STREAM_TICKS, rounds: int = 1) -> list[dict]:
    """For each configuration and (streams, answer KB) point, a fresh Envoy (`--concurrency
    2`, circuit breakers raised past the streams, route timeout past the answers), warmed
    with a few short streams; its RSS idle, then with every stream in flight at
    STREAM_FRACTIONS of the answer (and the resident Wasm linear memory), and its CPU from
    the moment every stream has its headers to the end, over the KB streamed meanwhile."""
    import queue
    import threading

    mock, port = start_stream_mock()
    rows = []
    try:
        for rnd, (streams, answer_kb) in ((r, p) for r in range(rounds) for p in points):
            shape = stream_shape(answer_kb, ticks)
            for name in configs[rnd % len(configs):] + configs[:rnd % len(configs)]:
                kind, plugin, usage = STREAM_CONFIGS[name]
                e = Envoy(envoy, workdir, kind, port, plugin, spec_extra={
                    "upstream_max_requests": 100_000,
                    "route_timeout_secs": int(shape["duration_s"] * 4 + 60)})
                try:
                    warm = stream_load(e.listener, 20, {"events": 20, "per_tick": 1, "interval_ms": 10}, usage)
                    out, err = warm.communicate(timeout=60)
                    if warm.returncode != 0:
                        sys.exit(f"many streams ({name}): warm-up failed: {out[-500:]} {err[-500:]}")
                    time.sleep(1.0)
                    idle_mb = e.rss_mb()
                    idle_heap = e.heap_mb()
                    wasm_idle_mb, memories = e.wasm_rss_mb()
                    lines: queue.Queue = queue.Queue()
                    t0 = time.monotonic()
                    client = stream_load(e.listener, streams, shape, usage)
                    threading.Thread(target=lambda: [lines.put((time.monotonic(), json.loads(l)))
                                                     for l in client.stdout if l.startswith("{")],
                                     daemon=True).start()
                    events: dict = {}

                    def drain() -> None:
                        while not lines.empty():
                            t, msg = lines.get()
                            for key in ("open", "first_done", "streams"):
                                if key in msg and key not in events:
                                    events[key] = (t, msg)
                            if "progress" in msg:
                                events["progress"] = (t, msg)

                    while "open" not in events and client.poll() is None and time.monotonic() - t0 < 120:
                        drain()
                        time.sleep(0.02)
                    drain()
                    if "open" not in events:
                        client.kill()
                        sys.exit(f"many streams ({name}, {streams}): not all streams opened: "
                                 f"{client.stderr.read()[-1000:] if client.stderr else ''}")
                    t_open, opened = events["open"]
                    cpu_open = e.cpu_s()
                    samples, peak = [], idle_mb
                    for frac in STREAM_FRACTIONS:
                        due = max(t_open, t0 + frac * shape["duration_s"])
                        while time.monotonic() < due:
                            peak = max(peak, e.rss_mb())
                            time.sleep(min(0.5, max(0.0, due - time.monotonic())))
                        drain()
                        rss = e.rss_mb()
                        heap = e.heap_mb()
                        wasm_mb, _ = e.wasm_rss_mb()
                        # How far the client has read: behind the mock's schedule, Envoy
                        # buffers what it has not written yet (its C++ heap grows).
                        received = events.get("progress", (0, {"progress": 0}))[1]["progress"]
                        samples.append({"fraction": frac, "rss_mb": rss, "wasm_mb": wasm_mb,
                                        "received": received / (streams * answer_kb * 1024),
                                        "heap_allocated_mb": heap["allocated"], "heap_free_mb": heap["free"],
                                        "in_flight": "first_done" not in events,
                                        "at_s": time.monotonic() - t0})
                    while client.poll() is None:
                        peak = max(peak, e.rss_mb())
                        time.sleep(0.5)
                    cpu_end = e.cpu_s()
                    time.sleep(0.1)
                    drain()
                    summary = events.get("streams", (0, {}))[1]
                    if not summary:
                        sys.exit(f"many streams ({name}, {streams}): no summary; "
                                 f"{client.stderr.read()[-1000:] if client.stderr else ''}")
                    kb = (summary["bytes"] - opened["bytes"]) / 1024
                    _, stats = http_get(e.admin, "/stats?filter=(cluster\\.primary\\.upstream_(cx_connect_fail|"
                                        "cx_connect_timeout|rq_pending_overflow|rq_5xx|cx_overflow|"
                                        "flow_control_paused_reading_total)|"
                                        "downstream_flow_control_paused_reading_total)")
                    envoy_counters = {k.split(".")[-1]: int(v) for k, v in
                                       re.findall(r"^(\S+): (\d+)$", stats, re.M) if int(v)}
                    row = {"config": name, "round": rnd, "streams": streams, "answer_kb": answer_kb,
                           "envoy_counters": envoy_counters,
                           "usage": usage, "shape": shape, "idle_mb": idle_mb,
                           "idle_heap_allocated_mb": idle_heap["allocated"],
                           "idle_heap_free_mb": idle_heap["free"],
                           "wasm_idle_mb": wasm_idle_mb, "wasm_memories": memories,
                           "samples": samples, "peak_mb": peak, "open_s": opened["elapsed_s"],
                           "ok": summary["ok"], "completed": summary["streams"],
                           "errors": summary["errors"], "bytes": summary["bytes"],
                           "min_bytes": summary["min_bytes"], "usage_seen": summary["usage_seen"],
                           "cpu_s": cpu_end - cpu_open, "kb": kb,
                           "cpu_us_per_kb": 1e6 * (cpu_end - cpu_open) / kb if kb > 0 else float("nan")}
                    rows.append(row)
                    per = ", ".join(f"{s['fraction']:.0%} (client has {s['received']:.0%}): {s['rss_mb']:.0f} MB "
                                    f"({1024 * (s['rss_mb'] - idle_mb) / streams:.1f} KB/stream, in use "
                                    f"{1024 * (s['rss_mb'] - s['heap_free_mb'] - idle_mb + idle_heap['free']) / streams:.1f}, "
                                    f"C++ heap {1024 * (s['heap_allocated_mb'] - idle_heap['allocated']) / streams:.1f}"
                                    f"{'' if s['in_flight'] else ', NOT all in flight'}; wasm {s['wasm_mb']:.1f} MB)"
                                    for s in samples)
                    log(f"many streams: {name:14} {streams} x {answer_kb} KB: idle {idle_mb:.0f} MB "
                        f"(wasm {wasm_idle_mb:.1f} MB in {memories}), {per}; "
                        f"{row['ok']}/{streams} ok, {summary['bytes'] / 2**20:.0f} MiB, "
                        f"Envoy {row['cpu_s']:.2f} s CPU = {row['cpu_us_per_kb']:.2f} us/KB"
                        + (f"; errors {summary['errors']}" if summary["errors"] else "")
                        + (f"; Envoy {envoy_counters}" if envoy_counters else ""))
                finally:
                    e.stop()
    finally:
        stop(mock)
    return rows


# ---------------------------------------------------------------------------
# The machine
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
