"""Where the microseconds of one call go, per side: ``python -m benchmarks.profile``.

Runs an xrpc server and a client in two processes over a unix socket (or TCP), profiles one side
with cProfile while the client drives one workload, and prints the CPU per call grouped by layer
(event loop, socket system calls, xrpc's sans-IO core, xrpc's runtime, msgspec ...) and the
costliest functions.  cProfile slows Python functions more than C ones, so the shares lean towards
Python code; the call counts per operation are exact.

Workloads: ``latency`` (one call at a time), ``inflight`` (64 calls in flight on one connection),
``stream`` (a stream of small records), ``connect`` (connect, one call, close).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

WORKLOADS = ("latency", "inflight", "stream", "connect")


# ------------------------------------------------------------------------------------ the two sides
async def _serve(url: str, url_file: str) -> None:
    import xrpc

    from .xrpc_iface import Bench, BenchImpl

    server = xrpc.Server()
    server.export(Bench, BenchImpl())
    async with server.listen(url) as listener:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        with open(url_file + ".tmp", "w") as f:
            f.write(str(listener.url))
        os.replace(url_file + ".tmp", url_file)
        await stop.wait()


async def _drive(url: str, workload: str, n: int) -> int:
    """Run ``workload`` ``n`` times; return the number of operations (calls, items, connections)."""
    import xrpc

    from .xrpc_iface import Bench

    if workload == "connect":
        for _ in range(n):
            async with xrpc.connect(url) as conn:
                await conn.proxy(Bench).add(1, 2)
        return n
    async with xrpc.connect(url) as conn:
        p = conn.proxy(Bench)
        if workload == "latency":
            for i in range(n):
                await p.add(i, 1)
            return n
        if workload == "inflight":
            per = max(1, n // 64)

            async def worker() -> None:
                for i in range(per):
                    await p.add(i, 1)

            await asyncio.gather(*(worker() for _ in range(64)))
            return per * 64
        count = 0
        while count < n:
            async for _item in p.stream(min(100_000, n - count)):
                count += 1
        return count


def _run(coro_fn: Any, loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro_fn())
    return asyncio.run(coro_fn())


def _side(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=("server", "client"))
    p.add_argument("--url", required=True)
    p.add_argument("--url-file", required=True)
    p.add_argument("--workload", default="inflight")
    p.add_argument("--n", type=int, default=0)
    p.add_argument("--loop", default="asyncio")
    p.add_argument("--profile-to", default="")
    a = p.parse_args(argv)
    prof = cProfile.Profile() if a.profile_to else None
    if a.role == "server":
        if prof:
            prof.enable()
        _run(lambda: _serve(a.url, a.url_file), a.loop)
        if prof:
            prof.disable()
            prof.dump_stats(a.profile_to)
        return 0
    with open(a.url_file) as f:
        url = f.read()
    warm = _run(lambda: _drive(url, a.workload, max(1, a.n // 20)), a.loop)  # warm up (the client's profile leaves it out)
    if prof:
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    ops = _run(lambda: _drive(url, a.workload, a.n), a.loop)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if prof:
        prof.disable()
        prof.dump_stats(a.profile_to)
    print(f"{ops} {warm} {wall} {cpu}", flush=True)
    return 0


# ------------------------------------------------------------------------------------ the report
def _group(filename: str, name: str) -> str:
    if "/xrpc/_protocol/" in filename:
        return "xrpc sans-IO core (frames, call records)"
    if "/xrpc/_interface.py" in filename:
        return "xrpc codec glue (arguments, replies)"
    if "/xrpc/" in filename:
        return "xrpc runtime (calls, serving, reading, drivers)"
    if filename == "~" and ("encode" in name or "decode" in name):
        return "msgspec encode/decode"
    if filename == "~" and ("'_socket.socket'" in name):
        return "socket system calls"
    if "poll" in name:
        return "(waiting in epoll)"
    if "asyncio" in filename or "selectors" in filename or "uvloop" in filename or "_asyncio.Future" in name or "Context" in name or "'coroutine'" in name:
        return "event loop (tasks, futures, callbacks)"
    if "anyio" in filename or "sniffio" in filename:
        return "anyio"
    if "/benchmarks/" in filename:
        return "benchmark code (method, caller)"
    return "other (builtins, sniffio, contextlib ...)"


def report(path: str, ops: int, top: int) -> str:
    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    groups: collections.Counter[str] = collections.Counter()
    funcs = []
    for (filename, line, name), (_cc, nc, tt, _ct, _callers) in stats.items():
        groups[_group(filename, name)] += tt
        short = filename.split("/site-packages/")[-1].split("/work/")[-1]
        funcs.append((tt, nc, f"{short}:{line}({name})" if filename != "~" else name))
    busy = sum(v for k, v in groups.items() if not k.startswith("("))
    lines = [f"{busy / ops * 1e6:.1f} µs of profiled CPU per operation (waiting in epoll left out)", ""]
    lines += ["| layer | µs per op | share |", "|---|---:|---:|"]
    for k, v in groups.most_common():
        if not k.startswith("("):
            lines.append(f"| {k} | {v / ops * 1e6:.2f} | {v / busy * 100:.0f}% |")
    lines += ["", "| function | µs per op | calls per op |", "|---|---:|---:|"]
    for tt, nc, name in sorted(funcs, reverse=True)[:top]:
        if "poll" in name:
            continue
        lines.append(f"| `{name}` | {tt / ops * 1e6:.2f} | {nc / ops:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("server", "client"):
        return _side(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=WORKLOADS, default="inflight")
    p.add_argument("--side", choices=("client", "server", "none"), default="server", help="the side to profile (none: just time it)")
    p.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--n", type=int, default=0, help="operations (default: per workload)")
    p.add_argument("--top", type=int, default=25, help="functions listed")
    a = p.parse_args(argv)
    n = a.n or {"latency": 20_000, "inflight": 64_000, "stream": 500_000, "connect": 2_000}[a.workload]
    with tempfile.TemporaryDirectory(prefix="xrpc-profile-") as d:
        url = f"unix://{d}/bench.sock" if a.transport == "unix" else "tcp://127.0.0.1:0"
        url_file = os.path.join(d, "url")
        prof = os.path.join(d, "profile")
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cmd = [sys.executable, "-m", "benchmarks.profile"]
        common = ["--url", url, "--url-file", url_file, "--loop", a.loop]
        server = subprocess.Popen(cmd + ["server", *common] + (["--profile-to", prof] if a.side == "server" else []), cwd=here)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(url_file):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.02)
            out = subprocess.run(
                cmd + ["client", *common, "--workload", a.workload, "--n", str(n)] + (["--profile-to", prof] if a.side == "client" else []),
                cwd=here, check=True, capture_output=True, text=True, timeout=600,
            ).stdout.split()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        ops, warm, wall, cpu = int(out[0]), int(out[1]), float(out[2]), float(out[3])
        print(f"# {a.workload}, {a.transport}, {a.loop}: {ops:,} operations in {wall:.2f} s; client CPU {cpu / ops * 1e6:.1f} µs per operation")
        if a.side != "none":
            print(f"\n## profile of the {a.side}\n")
            print(report(prof, ops + warm if a.side == "server" else ops, a.top))  # the server's profile has the warm-up too
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
