"""Many idle Unix connections on one server: descriptors and memory each, and the latency of calls.

    python -m benchmarks.idle                        # 10,000 connections, server limited to 20,000 descriptors
    python -m benchmarks.idle --connections 2000 --nofile 5000
    python -m benchmarks.idle --xrpc /path/to/other/checkout   # the same measurement of another xrpc

A server runs in a child process with its descriptor limit (RLIMIT_NOFILE) set to ``--nofile``; a
client process opens a probe connection, times ``--calls`` sequential ``add`` calls on it and
``--connects`` new connections (connect + first call, then closed), then opens ``--connections``
idle connections (each makes one call and then holds still; the default is the server's default
``max_connections``, 10,000, and the server is given room for the probe and the timed ones beside
them), and times the same again.  Reported: how
many idle connections the server took, its descriptors and resident memory (VmRSS) per
connection, and the median and 99th percentile latency with none and with all of them open.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any


def _limit_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(hard, n) if hard != resource.RLIM_INFINITY else hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def _server(url: str, nofile: int, max_connections: int) -> None:
    import anyio

    import xrpc

    from xrpc_iface import Bench, BenchImpl  # (the children run this file as a script)

    _limit_nofile(nofile)

    async def main() -> None:
        server = xrpc.Server(max_connections=max_connections)
        server.export(Bench, BenchImpl())
        async with server.listen(url) as listener:
            print(json.dumps({"url": listener.url, "pid": os.getpid(), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "xrpc": xrpc.__file__}), flush=True)
            await anyio.sleep_forever()

    anyio.run(main)


def _proc(pid: int) -> dict[str, int]:
    out = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
    return out


def _client(url: str, server_pid: int, connections: int, calls: int, connects: int, nofile: int) -> dict[str, Any]:
    import anyio

    import xrpc

    from xrpc_iface import Bench

    _limit_nofile(nofile)

    async def main() -> dict[str, Any]:
        async with xrpc.connect(url) as probe:
            bench = probe.proxy(Bench)

            async def timings() -> dict[str, float]:
                for _ in range(200):
                    await bench.add(1, 2)
                lat = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    await bench.add(1, 2)
                    lat.append(time.perf_counter() - t0)
                conn_t = []
                refused = 0
                for _ in range(connects):
                    t0 = time.perf_counter()
                    try:
                        async with xrpc.connect(url) as c:
                            await c.proxy(Bench).add(1, 2)
                    except xrpc.Error:  # the server is out of descriptors, say
                        refused += 1
                        continue
                    conn_t.append(time.perf_counter() - t0)
                lat.sort()
                return {
                    "call_median_us": statistics.median(lat) * 1e6,
                    "call_p99_us": lat[int(len(lat) * 0.99)] * 1e6,
                    "connect_median_ms": statistics.median(conn_t) * 1e3 if conn_t else float("nan"),
                    "connects_refused": refused,
                }

            before = await timings()
            base = _proc(server_pid)
            idle = connections
            opened = 0
            failed: list[str] = []
            release = anyio.Event()
            t_open = time.perf_counter()

            async def hold(ready: anyio.Event) -> None:
                nonlocal opened
                try:
                    async with xrpc.connect(url, timeout=60) as c:
                        await c.proxy(Bench).add(1, 2)
                        opened += 1
                        ready.set()
                        await release.wait()
                except Exception as exc:  # the server refused it (out of descriptors, say)
                    if len(failed) < 3:
                        failed.append(repr(exc))
                    ready.set()

            async with anyio.create_task_group() as tg:
                batch = 100
                for start in range(0, idle, batch):
                    events = [anyio.Event() for _ in range(min(batch, idle - start))]
                    for ev in events:
                        tg.start_soon(hold, ev)
                    for ev in events:
                        await ev.wait()
                open_s = time.perf_counter() - t_open
                loaded = _proc(server_pid)
                after = await timings()
                release.set()
        n = max(opened, 1)
        return {
            "idle_opened": opened,
            "idle_failed": idle - opened,
            "failures": failed,
            "open_s": open_s,
            "server_fds_per_connection": (loaded["fds"] - base["fds"]) / n,
            "server_rss_kib_per_connection": (loaded["rss"] - base["rss"]) / n / 1024,
            "server_fds": loaded["fds"],
            "before": before,
            "after": after,
        }

    return anyio.run(main)


def measure(xrpc_path: str, connections: int, calls: int, connects: int, nofile: int) -> dict[str, Any]:
    # the children run this file as a script, from an empty directory, with ``xrpc_path`` first
    # on the path: they import that checkout's xrpc (and this directory's xrpc_iface)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (xrpc_path, env.get("PYTHONPATH", "")) if p)
    script = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"unix://{tmp}/idle.sock"
        # room beside the idle ones for the probe and the connections timed (and those closing)
        room = str(connections + 100)
        server = subprocess.Popen([sys.executable, script, "_server", url, str(nofile), room], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp)
        try:
            assert server.stdout is not None
            info = json.loads(server.stdout.readline())
            out = subprocess.run(
                [sys.executable, script, "_client", info["url"], str(info["pid"]), str(connections), str(calls), str(connects), str(3 * connections + 100)],
                stdout=subprocess.PIPE, text=True, env=env, check=True, cwd=tmp,
            )
            res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
            res["server_nofile"] = info["nofile"]
            res["xrpc"] = os.path.dirname(os.path.dirname(info["xrpc"]))
            return res
        finally:
            server.terminate()
            server.wait(30)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        _server(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        a = sys.argv[2:]
        print(json.dumps(_client(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), int(a[5]))), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--nofile", type=int, default=20_000, help="the server's descriptor limit")
    p.add_argument("--calls", type=int, default=2_000)
    p.add_argument("--connects", type=int, default=50)
    p.add_argument("--xrpc", action="append", default=[], help="a checkout whose xrpc to measure (repeatable; default: this one)")
    a = p.parse_args()
    paths = a.xrpc or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    for path in paths:
        r = measure(path, a.connections, a.calls, a.connects, a.nofile)
        b, f = r["before"], r["after"]
        print(f"xrpc from {r['xrpc']} (server RLIMIT_NOFILE {r['server_nofile']}):")
        print(f"  idle connections open: {r['idle_opened']} (refused or failed: {r['idle_failed']}) in {r['open_s']:.1f} s  {r['failures'] or ''}")
        print(f"  server: {r['server_fds_per_connection']:.2f} descriptors and {r['server_rss_kib_per_connection']:.1f} KiB RSS per connection ({r['server_fds']} descriptors open)")
        print(f"  call latency, median / p99: {b['call_median_us']:.0f} / {b['call_p99_us']:.0f} µs with none open, {f['call_median_us']:.0f} / {f['call_p99_us']:.0f} µs with them open")
        print(
            f"  connect + first call, median: {b['connect_median_ms']:.2f} ms with none open, {f['connect_median_ms']:.2f} ms with them open"
            f" (refused: {b['connects_refused']} and {f['connects_refused']} of {a.connects})"
        )


if __name__ == "__main__":
    main()
