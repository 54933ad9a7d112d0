"""64 calls in flight over a Unix socket, on asyncio and on trio, side by side in one run.

    python -m benchmarks.backends                  # both backends, 3 rounds each, interleaved
    python -m benchmarks.backends --backends trio --profile server   # cProfile of the trio server
    python -m benchmarks.backends --xrpc /path/to/other/checkout --xrpc .   # two versions, interleaved

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
    from xrpc_iface import Bench, BenchImpl  # (the children run this file as a script)

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
    from xrpc_iface import Bench

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


def measure(xrpc_path: str, backend: str, calls: int, inflight: int, warmup: int, profile: str, tmp: str) -> dict[str, float]:
    url = f"unix://{tmp}/b-{backend}-{os.getpid()}-{time.monotonic_ns()}.sock"
    # the children run this file as a script from an empty directory, with ``xrpc_path`` first on
    # the path: they import that checkout's xrpc (and this directory's xrpc_iface)
    common = [sys.executable, os.path.abspath(__file__)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (xrpc_path, env.get("PYTHONPATH", "")) if p)
    server = subprocess.Popen(
        [*common, "server", "--backend", backend, "--url", url, "--profile", profile],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp,
    )
    try:
        url = _line(server)["url"]
        client = subprocess.Popen(
            [*common, "client", "--backend", backend, "--url", url, "--calls", str(calls),
             "--inflight", str(inflight), "--warmup", str(warmup), "--profile", profile],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp,
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
    p.add_argument("--xrpc", action="append", default=[], help="a checkout whose xrpc to measure (repeatable; default: this one)")
    a = p.parse_args()
    backends = a.backends.split(",")
    paths = a.xrpc or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    best: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for path in paths:
                for b in backends:
                    m = measure(path, b, a.calls, a.inflight, a.warmup, a.profile, tmp)
                    print(f"round {r + 1} {path} {b:8} {m['calls_per_s']:9.0f} calls/s  server {m['server_us']:6.1f} µs/call  client {m['client_us']:6.1f} µs/call", flush=True)
                    if (path, b) not in best or m["calls_per_s"] > best[path, b]["calls_per_s"]:
                        best[path, b] = m
    print()
    print(f"| xrpc | backend | calls/s ({a.inflight} in flight) | server CPU µs/call | client CPU µs/call |")
    print("|---|---|---|---|---|")
    for (path, b), m in best.items():
        print(f"| {path} | {b} | {m['calls_per_s']:.0f} | {m['server_us']:.1f} | {m['client_us']:.1f} |")
    for path in paths:
        if (path, "asyncio") in best and (path, "trio") in best:
            ratio = best[path, "trio"]["calls_per_s"] / best[path, "asyncio"]["calls_per_s"]
            print(f"{path}: trio / asyncio rate {ratio:.2f}x (best of {a.rounds} rounds each)")


if __name__ == "__main__":
    main()
