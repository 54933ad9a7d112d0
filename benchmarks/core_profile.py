"""Per-side CPU of 64 calls in flight, and the protocol core's share of it:
``python -m benchmarks.core_profile [--calls N] [--json]``.

It measures the xrpc that the running interpreter imports, pure Python or compiled (``XRPC_COMPILE=1
pip install .``; the output says which), so comparing the two means running it once with each, in
turn (see README.md, "Compiled core"):

- ``inflight``: a server process (this script with ``--serve``) and this process as the client, over
  a unix socket; 64 coroutines each make ``add(a, b)`` calls in turn on one connection.  Reported:
  calls/s, and the CPU time (user + system) each process spent per call, the server's read from
  ``/proc/<pid>/stat`` before and after.
- ``core``: the work the sans-IO core does for the same calls, alone, in this process: a client and a
  server ``ProtocolCore`` exchange 64 calls and their replies at a time, and the time of each side's
  core methods is added up (no event loop, no sockets, no profiler).  Divided by the CPU per call of
  the same side it gives the core's share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

INFLIGHT = 64


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _core_info() -> dict[str, Any]:
    import xrpc._protocol as protocol

    return {"compiled": bool(getattr(protocol, "COMPILED", False)), "core": protocol._core.__file__}


async def _serve(path: str) -> None:
    import xrpc

    from .xrpc_iface import Bench, BenchImpl

    server = xrpc.Server()
    server.export(Bench, BenchImpl())
    async with server.listen(f"unix://{path}") as listener:
        print(json.dumps({"ready": True, "url": str(listener.url), **_core_info()}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def _inflight(url: str, server_pid: int, calls: int) -> dict[str, float]:
    import xrpc

    from .xrpc_iface import Bench

    async with xrpc.connect(url) as conn:
        bench = conn.proxy(Bench)

        async def worker(n: int) -> None:
            for i in range(n):
                await bench.add(i, 1)

        await asyncio.gather(*(worker(2000 // INFLIGHT) for _ in range(INFLIGHT)))  # warm-up
        per = calls // INFLIGHT
        c0, s0, t0 = time.process_time(), _proc_cpu(server_pid), time.perf_counter()
        await asyncio.gather(*(worker(per) for _ in range(INFLIGHT)))
        t1, c1, s1 = time.perf_counter(), time.process_time(), _proc_cpu(server_pid)
    n = per * INFLIGHT
    return {
        "calls_per_s": n / (t1 - t0),
        "client_cpu_us": (c1 - c0) / n * 1e6,
        "server_cpu_us": (s1 - s0) / n * 1e6,
    }


def inflight(calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="xrcp", dir="/tmp") as d:
        path = os.path.join(d, "s.sock")
        server = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.core_profile", "--serve", path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert server.stdout is not None
            ready = json.loads(server.stdout.readline() or "{}")
            if not ready.get("ready"):
                raise RuntimeError("the server did not start")
            out = asyncio.run(asyncio.wait_for(_inflight(ready["url"], server.pid, calls), 600))
            out["server_compiled"] = ready["compiled"]
            return out
        finally:
            if server.stdin is not None:
                server.stdin.close()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def core(calls: int, repeat: int = 5) -> dict[str, float]:
    """The best of ``repeat`` rounds: µs per call of each side's core methods."""
    from xrpc._protocol import ProtocolCore

    best = {"client_core_us": float("inf"), "server_core_us": float("inf")}
    for _ in range(repeat):
        c, s = ProtocolCore(client=True), ProtocolCore(client=False)
        c.send_hello()
        s.receive_data(c.data_to_send())
        s.send_welcome()
        c.receive_data(s.data_to_send())
        client = server = 0.0
        clock = time.perf_counter
        rounds = max(1, calls // INFLIGHT)
        for _ in range(rounds):
            t0 = clock()
            for i in range(INFLIGHT):
                c.send_call("Bench", "add", [i, 1])
            wire = c.data_to_send()
            t1 = clock()
            wire = bytes(wire)  # as a socket delivers it
            t2 = clock()
            for msg, _rec in s.receive_data(wire):
                s.send_reply(msg.id, msg.id)  # type: ignore[union-attr]
            wire = s.data_to_send()
            t3 = clock()
            wire = bytes(wire)
            t4 = clock()
            c.receive_data(wire)
            t5 = clock()
            client += (t1 - t0) + (t5 - t4)
            server += t3 - t2
        n = rounds * INFLIGHT
        best["client_core_us"] = min(best["client_core_us"], client / n * 1e6)
        best["server_core_us"] = min(best["server_core_us"], server / n * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.core_profile")
    p.add_argument("--calls", type=int, default=100_000, help="calls measured in flight (default 100,000)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.serve:
        asyncio.run(_serve(opts.serve))
        return 0
    out: dict[str, Any] = {**_core_info(), **inflight(opts.calls), **core(opts.calls)}
    out["client_core_share"] = out["client_core_us"] / out["client_cpu_us"]
    out["server_core_share"] = out["server_core_us"] / out["server_cpu_us"]
    if opts.json:
        print(json.dumps(out))
    else:
        server = "compiled" if out["server_compiled"] else "pure Python"
        print(f"core: {'compiled' if out['compiled'] else 'pure Python'} ({out['core']}); the server's: {server}")
        print(f"64 in flight: {out['calls_per_s']:,.0f} calls/s")
        for side in ("client", "server"):
            print(
                f"{side}: {out[f'{side}_cpu_us']:.2f} µs CPU per call, of which the core "
                f"{out[f'{side}_core_us']:.2f} µs ({out[f'{side}_core_share']:.0%})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
