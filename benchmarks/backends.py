"""64 calls in flight over a Unix socket, on asyncio and on trio, side by side in one run.

    python -m benchmarks.backends                  # both backends, 3 rounds each, interleaved
    python -m benchmarks.backends --backends trio --profile server   # cProfile of the trio server

Each measurement runs a server in a child process and a client in another, both with
``anyio.run(..., backend=...)``; the client keeps ``--inflight`` ``add`` calls outstanding on one
connection for ``--calls`` calls, after a warm-up.  Reported: calls/s (client wall clock) and the
CPU time of each process per call (user + system, from ``os.times()`` around the measured calls),
and the ratio of trio's rate to asyncio's, best of the rounds.  ``--profile server|client`` runs
cProfile in that process around the measured calls and prints its top entries.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio

import xrpc

from .xrpc_iface import Bench, BenchImpl


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _profile_start(kind: str, want: str) -> Any:
    if kind != want:
        return None
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    return prof


def _profile_stop(prof: Any, out: Any) -> None:
    if prof is None:
        return
    import io
    import pstats

    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(30)
    out.write(buf.getvalue())
    out.flush()


async def _serve(url: str, profile: str) -> None:
    server = xrpc.Server()
    server.export(Bench, BenchImpl())
    async with server.listen(url) as listener:
        print(json.dumps({"url": listener.url}), flush=True)
        # stdin carries the client's commands: "start" and "stop" bracket the measured calls
        prof = None
        cpu0 = 0.0
        async with anyio.wrap_file(sys.stdin) as stdin:
            async for line in stdin:
                cmd = line.strip()
                if cmd == "start":
                    cpu0 = _cpu()
                    prof = _profile_start("server", profile)
                    print(json.dumps({"started": True}), flush=True)
                elif cmd == "stop":
                    cpu = _cpu() - cpu0
                    _profile_stop(prof, sys.stderr)
                    print(json.dumps({"cpu": cpu}), flush=True)
                else:
                    return


async def _client(url: str, calls: int, inflight: int, warmup: int, profile: str) -> dict[str, float]:
    async with xrpc.connect(url) as conn:
        bench = conn.proxy(Bench)

        async def run(n: int) -> None:
            left = [n]

            async def worker() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    assert await bench.add(1, 2) == 3

            async with anyio.create_task_group() as tg:
                for _ in range(inflight):
                    tg.start_soon(worker)

        await run(warmup)
        # tell the server to start counting (through the parent: stdout line, then wait on stdin)
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
        prof = _profile_start("client", profile)
        cpu0 = _cpu()
        t0 = time.perf_counter()
        await run(calls)
        wall = time.perf_counter() - t0
        cpu = _cpu() - cpu0
        _profile_stop(prof, sys.stderr)
        return {"wall": wall, "cpu": cpu}


def _child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role")
    p.add_argument("--backend")
    p.add_argument("--url")
    p.add_argument("--calls", type=int)
    p.add_argument("--inflight", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--profile", default="")
    a = p.parse_args(argv)
    if a.role == "server":
        anyio.run(_serve, a.url, a.profile, backend=a.backend)
    else:
        res = anyio.run(_client, a.url, a.calls, a.inflight, a.warmup, a.profile, backend=a.backend)
        print(json.dumps(res), flush=True)


def _line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"child exited: {proc.wait()}")
    return dict(json.loads(line))


def measure(backend: str, calls: int, inflight: int, warmup: int, profile: str, tmp: str) -> dict[str, float]:
    url = f"unix://{tmp}/b-{backend}-{os.getpid()}-{time.monotonic_ns()}.sock"
    common = [sys.executable, "-m", "benchmarks.backends"]
    prefix = os.environ.get("XRPC_BENCH_SERVER_PREFIX", "").split()
    server = subprocess.Popen(
        [*prefix, *common, "server", "--backend", backend, "--url", url, "--profile", profile],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        url = _line(server)["url"]
        client = subprocess.Popen(
            [*common, "client", "--backend", backend, "--url", url, "--calls", str(calls),
             "--inflight", str(inflight), "--warmup", str(warmup), "--profile", profile],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert client.stdin is not None and server.stdin is not None
        _line(client)  # warmed up
        server.stdin.write("start\n")
        server.stdin.flush()
        _line(server)
        client.stdin.write("go\n")
        client.stdin.flush()
        res = _line(client)
        server.stdin.write("stop\n")
        server.stdin.flush()
        server_cpu = _line(server)["cpu"]
        client.wait(30)
    finally:
        if server.stdin is not None:
            try:
                server.stdin.write("quit\n")
                server.stdin.close()
            except OSError:
                pass
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    return {
        "calls_per_s": calls / res["wall"],
        "server_us": server_cpu / calls * 1e6,
        "client_us": res["cpu"] / calls * 1e6,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("server", "client"):
        _child_main(sys.argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="asyncio,trio")
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", choices=("", "server", "client"), default="")
    a = p.parse_args()
    backends = a.backends.split(",")
    best: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for b in backends:
                m = measure(b, a.calls, a.inflight, a.warmup, a.profile, tmp)
                print(f"round {r + 1} {b:8} {m['calls_per_s']:9.0f} calls/s  server {m['server_us']:6.1f} µs/call  client {m['client_us']:6.1f} µs/call", flush=True)
                if b not in best or m["calls_per_s"] > best[b]["calls_per_s"]:
                    best[b] = m
    print()
    print(f"| backend | calls/s ({a.inflight} in flight) | server CPU µs/call | client CPU µs/call |")
    print("|---|---|---|---|")
    for b, m in best.items():
        print(f"| {b} | {m['calls_per_s']:.0f} | {m['server_us']:.1f} | {m['client_us']:.1f} |")
    if "asyncio" in best and "trio" in best:
        print(f"\ntrio / asyncio rate: {best['trio']['calls_per_s'] / best['asyncio']['calls_per_s']:.2f}x (best of {a.rounds})")


if __name__ == "__main__":
    main()
