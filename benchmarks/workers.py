"""Calls/s of one server with 1 and with 2 worker processes, under 4 client processes.

    python -m benchmarks.workers                    # 4 clients x 64 calls in flight, 5 s a round
    python -m benchmarks.workers --client xrpc      # the clients use xrpc's own client runtime
    python -m benchmarks.workers --workers 1,2,4 --seconds 10 --connections 4

The server is ``xrpc.run(make_server, url, workers=W)`` exporting the benchmarks' ``Bench``; each
client process keeps 64 ``add(a, b)`` calls in flight over a Unix socket (split over
``--connections`` connections) for ``--seconds`` after a warm-up, all clients at once.

Two kinds of client:

* ``pipelined`` (the default) is a load generator, so that the clients leave the CPU to the server:
  it makes the handshake with xrpc's sans-IO core, then writes CALL frames itself (copies of one
  msgspec-encoded ``Call`` with the id changed: the message a real client sends, its id written as
  a 4-byte integer) over a blocking socket, and counts the replies (all of one size) without
  decoding them: each time replies arrive it sends as many new calls, in one ``send``.  About
  0.3 µs of client CPU a call; the server does all its usual work.
* ``xrpc`` is the real thing: ``xrpc.connect`` and 64 coroutines awaiting ``proxy.add``.

The machine has few cores and the clients need CPU too, so the table also shows where the CPU went
(from ``/proc``): per call, in the server's processes and in the clients'.  With 2 workers on 2
cores, the ratio can only approach 2 if the clients cost much less per call than the server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import xrpc

from .xrpc_iface import Bench, BenchImpl

INFLIGHT = 64
CLIENTS = 4


def make_server() -> xrpc.Server:
    """What every worker serves (also the single-process server)."""
    server = xrpc.Server()
    server.export(Bench, BenchImpl())
    return server


# --------------------------------------------------------------------------- server process
def serve(url: str, workers: int) -> None:
    xrpc.run(make_server, url, workers=workers, ready=print)


# --------------------------------------------------------------------------- client processes
def _wait_go() -> None:
    print("ready", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"expected go, got {line!r}")


def pipelined_client(path: str, connections: int, inflight: int, seconds: float, warmup: float) -> None:
    import msgspec

    from xrpc._protocol import Call, ProtocolCore, Reply, Welcome

    args = msgspec.msgpack.encode(xrpc.describe(Bench).methods["add"].encode_args((1, 2), {}))
    # A CALL frame whose id is written as a 4-byte msgpack integer (valid msgpack, if not the
    # shortest), so that each call is a copy of the template with 4 bytes changed.
    first_id = 0x10001  # odd (a client's ids), and every id from here on takes 4 bytes
    template = msgspec.msgpack.encode(Call(first_id, "Bench", "add", msgspec.Raw(args)))
    at = template.index(b"\xce" + first_id.to_bytes(4, "big")) + 1
    head = len(template).to_bytes(4, "big") + template[:at]
    tail = template[at + 4 :]
    # ... and the REPLY to it: [3, id, 3] with the id as 4 bytes, 12 bytes with the length prefix
    reply = msgspec.msgpack.encode(Reply(first_id, msgspec.Raw(msgspec.msgpack.encode(3))))
    reply_size = 4 + len(reply)
    expected = len(reply).to_bytes(4, "big") + reply[:2]  # length prefix, array header, tag
    socks: list[socket.socket] = []
    for _ in range(connections):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        core = ProtocolCore(client=True)  # the handshake as a real client makes it
        core.send_hello()
        s.sendall(core.data_to_send())
        welcomed = False
        while not welcomed:
            data = s.recv(65536)
            if not data:
                raise SystemExit("the server closed the connection during the handshake")
            welcomed = any(isinstance(msg, Welcome) for msg, _ in core.receive_data(data))
        socks.append(s)
    per_conn = [inflight // connections + (1 if i < inflight % connections else 0) for i in range(connections)]
    window = {s.fileno(): n for s, n in zip(socks, per_conn)}
    next_id = {s.fileno(): first_id for s in socks}
    pending = {s.fileno(): 0 for s in socks}  # bytes of a reply not yet complete
    by_fd = {s.fileno(): s for s in socks}
    poller = select.poll()
    for s in socks:
        poller.register(s, select.POLLIN)

    def send_calls(fd: int, n: int) -> None:
        first = next_id[fd]
        next_id[fd] = first + 2 * n
        by_fd[fd].sendall(b"".join([head + i.to_bytes(4, "big") + tail for i in range(first, first + 2 * n, 2)]))

    def replies(fd: int, data: bytes) -> int:
        """How many replies ``data`` completes: every reply has the same size, so they are counted,
        not decoded (the first of each read is checked)."""
        have = pending[fd] + len(data)
        if pending[fd] == 0 and len(data) >= 6 and data[:6] != expected:
            raise SystemExit(f"unexpected frame {data[:32]!r}")
        pending[fd] = have % reply_size
        return have // reply_size

    def run(until: float) -> tuple[int, float, float]:
        """Keep the windows full until ``until``; the replies counted, and when it stopped
        (wall clock and CPU).  Then let the calls still in flight come back."""
        done = 0
        for fd in by_fd:
            send_calls(fd, window[fd])
        while (now := time.perf_counter()) < until:
            for fd, _ in poller.poll(1000):
                data = by_fd[fd].recv(1 << 18)
                if not data:
                    raise SystemExit("the server closed the connection")
                n = replies(fd, data)
                done += n
                if n:
                    send_calls(fd, n)
        cpu = time.process_time()
        for fd in by_fd:
            outstanding = window[fd]
            while outstanding:
                outstanding -= replies(fd, by_fd[fd].recv(1 << 18))
        return done, now, cpu

    run(time.perf_counter() + warmup)
    _wait_go()
    cpu0, t0 = time.process_time(), time.perf_counter()
    done, t1, cpu1 = run(t0 + seconds)
    print(f"{done} {t1 - t0} {cpu1 - cpu0}", flush=True)


def xrpc_client(url: str, connections: int, inflight: int, seconds: float, warmup: float) -> None:
    import anyio

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            proxies = []
            for _ in range(connections):
                conn = await stack.enter_async_context(xrpc.connect(url))
                proxies.append(conn.proxy(Bench))
            counts = [0] * inflight

            async def worker(k: int, until: float) -> None:
                add = proxies[k % connections].add
                n = 0
                while time.perf_counter() < until:
                    await add(k, n)
                    n += 1
                counts[k] += n

            async with anyio.create_task_group() as tg:
                until = time.perf_counter() + warmup
                for k in range(inflight):
                    tg.start_soon(worker, k, until)
            counts[:] = [0] * inflight
            await anyio.to_thread.run_sync(_wait_go)
            cpu0, t0 = time.process_time(), time.perf_counter()
            async with anyio.create_task_group() as tg:
                for k in range(inflight):
                    tg.start_soon(worker, k, t0 + seconds)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            print(f"{sum(counts)} {elapsed} {cpu}", flush=True)

    anyio.run(main)


# --------------------------------------------------------------------------- the orchestra
def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and of its reaped children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[i]) for i in (11, 12)) / ticks


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every core, every process), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
    return found


def _line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise SystemExit(f"no answer from {proc.args!r} within {timeout:g}s")
    return proc.stdout.readline().strip()


@contextlib.contextmanager
def _server(url: str, workers: int) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.workers", "--serve", url, "--workers", str(workers)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if not _line(proc, 60).startswith("unix://"):
            raise SystemExit("the server did not start")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def one_round(url: str, workers: int, args: argparse.Namespace) -> dict[str, float]:
    with _server(url, workers) as server:
        pids = [server.pid] + _children(server.pid)
        clients = [
            subprocess.Popen(
                [
                    sys.executable, "-m", "benchmarks.workers", "--run-client", args.client, "--url", url,
                    "--connections", str(args.connections), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(args.clients)
        ]
        try:
            for c in clients:
                if _line(c, 60) != "ready":
                    raise SystemExit("a client did not start")
            server_cpu0 = {p: _cpu_seconds(p) for p in pids}
            busy0 = _machine_busy()
            for c in clients:
                assert c.stdin is not None
                c.stdin.write("go\n")
                c.stdin.flush()
            results = [_line(c, args.seconds + 60).split() for c in clients]
            server_cpu = {p: _cpu_seconds(p) - server_cpu0[p] for p in pids}
            busy = _machine_busy() - busy0
        finally:
            for c in clients:
                if c.poll() is None:
                    c.kill()
                c.wait()
                for stream in (c.stdin, c.stdout):
                    if stream is not None:
                        stream.close()
    calls = sum(int(r[0]) for r in results)
    rate = sum(int(r[0]) / float(r[1]) for r in results)
    client_cpu = sum(float(r[2]) for r in results)
    worker_cpu = [server_cpu[p] for p in pids[1:]] or [server_cpu[pids[0]]]
    return {
        "rate": rate,
        "server_us": 1e6 * sum(server_cpu.values()) / calls,
        "client_us": 1e6 * client_cpu / calls,
        "busiest_worker": max(worker_cpu) / args.seconds,
        "idlest_worker": min(worker_cpu) / args.seconds,
        "supervisor": server_cpu[pids[0]] / args.seconds if len(pids) > 1 else 0.0,
        # what else ran meanwhile (other programs on a shared machine), in cores
        "others": max(0.0, busy - sum(server_cpu.values()) - client_cpu) / args.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    p.add_argument("--client", choices=("pipelined", "xrpc"), default="pipelined")
    p.add_argument("--clients", type=int, default=CLIENTS, help="client processes (default 4)")
    p.add_argument("--connections", type=int, default=1, help="connections per client (default 1)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of a round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per worker count, alternating (default 3)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--run-client", choices=("pipelined", "xrpc"), help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, int(args.workers))
        return 0
    if args.run_client:
        assert args.url
        if args.run_client == "pipelined":
            pipelined_client(args.url[len("unix://") :], args.connections, INFLIGHT, args.seconds, args.warmup)
        else:
            xrpc_client(args.url, args.connections, INFLIGHT, args.seconds, args.warmup)
        return 0
    counts = [int(w) for w in args.workers.split(",")]
    directory = tempfile.mkdtemp(prefix="xrpc-bench-")
    rates: dict[int, list[float]] = {w: [] for w in counts}
    try:
        print(
            f"{args.clients} {args.client} client processes x {INFLIGHT} calls in flight "
            f"({args.connections} connection(s) each), {args.seconds:g} s a round, unix socket, {os.cpu_count()} CPUs"
        )
        print()
        print(
            "| round | workers | calls/s | server CPU µs/call | client CPU µs/call | busiest / idlest worker CPU "
            "| supervisor CPU | other programs (cores) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k in range(args.rounds):  # alternating, so that a change in the machine's load hits both
            for w in counts:
                r = one_round(f"unix://{directory}/w{w}.sock", w, args)
                rates[w].append(r["rate"])
                print(
                    f"| {k + 1} | {w} | {r['rate']:,.0f} | {r['server_us']:.1f} | {r['client_us']:.1f} "
                    f"| {r['busiest_worker']:.0%} / {r['idlest_worker']:.0%} | {r['supervisor']:.1%} | {r['others']:.2f} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    base = statistics.median(rates[counts[0]])
    print()
    print("| workers | median calls/s | ratio |")
    print("|---:|---:|---:|")
    for w in counts:
        m = statistics.median(rates[w])
        print(f"| {w} | {m:,.0f} | {m / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
