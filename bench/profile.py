#!/usr/bin/env python3
"""Where Envoy's CPU goes per request, by `perf` sampling: one configuration of `make bench`
under wrk, with Envoy's CPU split into the filter's Wasm code, host calls (Envoy frames
called from the Wasm code), Envoy outside the VM, the kernel and libc.

    python3 bench/profile.py budget --size 1024       # after `make bench` built everything
    python3 bench/profile.py floor --size 16384 --seconds 8

Configurations: none, floor, count, budget (as in bench/run.py). Needs `perf` (Debian
package linux-perf) and permission to sample Envoy (root, or kernel.perf_event_paranoid
<= 1). Envoy's binary is stripped and V8 writes no symbol map for the Wasm code, so the split
is by code region, not by function. Sampling slows Envoy: compare configurations profiled
the same way, not with `make bench`'s figures. A diagnostic, not part of `make bench` or
`make test`.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure as bench  # noqa: E402  (bench/measure.py: the same Envoy, mock, bodies and wrk script)

CONFIGS = ("none", "floor", "count", "budget")


def region(dso: str) -> str:
    if "perf-" in dso or "[JIT]" in dso:
        return "wasm"
    if "kernel" in dso:
        return "kernel"
    if "/envoy" in dso:
        return "envoy"
    if "libc" in dso:
        return "libc"
    return "other"


def split(data: Path) -> collections.Counter:
    """Samples by where they were taken: the leaf frame's region, and for a leaf outside the
    Wasm code whether a Wasm frame is below it (a host call, or a fault or interrupt taken in
    the VM)."""
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,dso"],
                         capture_output=True, text=True, check=True).stdout
    counts: collections.Counter = collections.Counter()
    for sample in out.strip().split("\n\n"):
        frames = [line.split(None, 1)[1] for line in sample.strip().splitlines() if len(line.split(None, 1)) == 2]
        if not frames:
            continue
        leaf = region(frames[0])
        if leaf == "wasm":
            counts["Wasm code"] += 1
        elif any(region(f) == "wasm" for f in frames[1:]):
            counts["called from the Wasm code (host calls, faults): " + leaf] += 1
        else:
            counts[leaf + " (outside the VM)"] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", choices=CONFIGS)
    p.add_argument("--size", type=int, default=1024, help="prompt bytes (default 1024)")
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--frequency", type=int, default=2000, help="samples per second")
    args = p.parse_args()
    if not shutil.which("perf"):
        sys.exit("perf not found: apt-get install -y linux-perf")
    envoy = bench.envoy_binary()
    for need in (bench.WASM, bench.FLOOR_WASM, bench.MOCK, bench.RENDER_ENVOY, Path(envoy)):
        if not need.exists():
            sys.exit(f"missing {need}: run `make bench` first (it builds everything)")
    work = Path(tempfile.mkdtemp(prefix="tokenfuse-profile-"))
    load = argparse.Namespace(threads=2, connections=16)  # make bench's defaults
    pool = bench.prompt_pool(args.size, stream=False)
    script = bench.wrk_script(work, "profile", pool, load.threads)
    upstream = bench.free_port()
    mock = bench.start_mock(upstream)
    try:
        e = bench.Envoy(envoy, work, args.config, upstream, bench.PLUGINS[args.config])
        try:
            bench.sanity(e.listener, args.config, pool[0])
            bench.run_wrk(e.listener, script, load, 2)
            cpu_before = e.cpu_s()
            perf = subprocess.Popen(
                ["perf", "record", "-F", str(args.frequency), "-g", "-p", str(e.proc.pid),
                 "-o", str(work / "perf.data"), "--", "sleep", str(args.seconds)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            r = bench.run_wrk(e.listener, script, load, args.seconds)
            _, err = perf.communicate()
            if perf.returncode != 0:
                sys.exit(f"perf record failed ({perf.returncode}): {err.strip()[-500:]}")
            cpu_us = 1e6 * (e.cpu_s() - cpu_before) / max(1, r["requests"])
        finally:
            e.stop()
    finally:
        bench.stop(mock)
    counts = split(work / "perf.data")
    total = sum(counts.values())
    print(f"{args.config}, {args.size}-byte prompts: {r['rps']:.0f} requests/s under perf, "
          f"Envoy CPU {cpu_us:.0f} µs/request, {total} samples")
    for name, n in counts.most_common():
        print(f"  {name:56} {100 * n / total:5.1f}%  {cpu_us * n / total:6.1f} µs/request")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
