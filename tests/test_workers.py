"""Serving from several worker processes (``workers=N``), with real processes.

A server script (``xrpc.run(make, url, workers=N)``) or ``xrpc serve --workers N`` runs in a child;
its workers are found as that child's children in ``/proc``.  Every wait is bounded: lines are read
with a timeout, processes are awaited by pidfd, and a state the supervisor reaches on its own (a
replaced worker) is polled with a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import anyio
import anyio.to_thread
import pytest

import xrpc
from _procs import child_env, short_dir
from _timeouts import T

pytestmark = pytest.mark.timeout(180)

SCRIPT = textwrap.dedent(
    """
    import os
    import pathlib
    import sys
    from typing import Protocol

    import anyio

    import xrpc

    HERE = pathlib.Path(__file__).parent
    IMPORTED_IN = os.getpid()


    @xrpc.interface()
    class Probe(Protocol):
        async def pid(self) -> int: ...
        async def origins(self) -> list[int]: ...
        async def slow(self, seconds: float) -> str: ...


    class ProbeService:
        def __init__(self, connected: dict[int, int]) -> None:
            self.made_in = os.getpid()
            self.connected = connected

        async def pid(self) -> int:
            return os.getpid()

        async def origins(self) -> list[int]:
            # where the module was imported, the factory ran, and on_connect ran for this connection
            return [IMPORTED_IN, self.made_in, self.connected[id(xrpc.current_connection())]]

        async def slow(self, seconds: float) -> str:
            (HERE / f"slow.{os.getpid()}").write_text("started")
            await anyio.sleep(seconds)
            return "finished"


    def make() -> xrpc.Server:
        if (HERE / "die").exists():
            with open(HERE / "died", "a") as f:
                f.write(f"{os.getpid()}\\n")
            raise RuntimeError("told to die")
        connected: dict[int, int] = {}

        def on_connect(conn: xrpc.Connection) -> None:
            connected[id(conn)] = os.getpid()

        server = xrpc.Server(on_connect=on_connect)
        server.export(Probe, ProbeService(connected))
        return server


    if __name__ == "__main__":
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s[%(process)d] %(message)s")
        drain = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
        xrpc.run(make, sys.argv[1], ready=print, workers=int(sys.argv[2]), drain_timeout=drain)
        print("stopped cleanly", flush=True)
    """
)


@xrpc.interface()
class Probe(Protocol):
    async def pid(self) -> int: ...
    async def origins(self) -> list[int]: ...
    async def slow(self, seconds: float) -> str: ...


class ProbeService:
    def __init__(self) -> None:
        self.made_in = os.getpid()

    async def pid(self) -> int:
        return os.getpid()

    async def origins(self) -> list[int]:
        return [self.made_in, self.made_in, os.getpid()]

    async def slow(self, seconds: float) -> str:
        await anyio.sleep(seconds)
        return "finished"


def make_server() -> xrpc.Server:
    """The factory of the in-process tests; with ``WK_SLOW_DIR`` set, worker 1 takes its time and
    leaves a file once its server is built."""
    marks = os.environ.get("WK_SLOW_DIR")
    if marks and os.environ.get("XRPC_WORKER_ID") == "1":
        time.sleep(1.0)  # a slow start-up, not a wait for a condition
        Path(marks, f"built.{os.getpid()}").write_text("")
    server = xrpc.Server()
    server.export(Probe, ProbeService())
    return server


# --------------------------------------------------------------------------- helpers
def children(pid: int) -> set[int]:
    """The live (not zombie) children of ``pid``, from ``/proc``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def until(what: str, check: Any, timeout: float = 3 * T) -> Any:
    """Poll ``check()`` until it returns something true (``timeout`` at most)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


def read_line(proc: subprocess.Popen[bytes], timeout: float = 3 * T) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().decode().strip() if ready else ""


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(short_dir())
    (d / "wsrv.py").write_text(SCRIPT)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def served(workdir: Path, argv: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run ``argv`` in ``workdir``; yield it and the URL it printed.  Whatever is still running at
    the end (the process, its workers) is killed, by pid."""
    err = open(workdir / "stderr", "wb")
    proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=child_env({"PYTHONPATH": str(workdir)}))
    err.close()
    workers: set[int] = set()
    try:
        url = read_line(proc)
        if not url:
            proc.kill()
            proc.wait(T)
            raise AssertionError(f"the server did not start: {(workdir / 'stderr').read_text()}")
        workers = children(proc.pid)
        yield proc, url
    finally:
        workers |= children(proc.pid)
        if proc.poll() is None:
            proc.kill()
        proc.wait(2 * T)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert proc.stdout is not None
        proc.stdout.close()


def script(workdir: Path, url: str, workers: int, *more: str) -> list[str]:
    return [sys.executable, str(workdir / "wsrv.py"), url, str(workers), *more]


async def origins_by_worker(url: str, want: int, stack: contextlib.AsyncExitStack, timeout: float = 3 * T, **kw: Any) -> dict[int, list[int]]:
    """Open connections (kept open in ``stack``) until ``want`` different worker pids answered;
    ``{pid: origins}``.  Which worker accepts a connection is the kernel's choice, so this tries
    as many as it takes."""
    seen: dict[int, list[int]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want:
        assert time.monotonic() < deadline, f"only workers {sorted(seen)} answered"
        conn = await stack.enter_async_context(xrpc.connect(url, timeout=T, **kw))  # the connections stay open
        origins = await conn.proxy(Probe, timeout=T).origins()
        seen[origins[-1]] = origins
    return seen


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 3 * T) -> int:
    with anyio.fail_after(timeout):
        return await anyio.to_thread.run_sync(proc.wait)


# --------------------------------------------------------------------------- the tests
async def test_two_workers_serve_from_two_processes_that_built_their_own_server(workdir: Path) -> None:
    with served(workdir, script(workdir, f"unix://{workdir}/s.sock", 2)) as (proc, url):
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        async with contextlib.AsyncExitStack() as stack:
            seen = await origins_by_worker(url, 2, stack)
        assert set(seen) == workers
        for pid, (imported_in, made_in, connected_in) in seen.items():
            # the module, the factory's server and on_connect: all of the worker's own, none the parent's
            assert imported_in == made_in == connected_in == pid != proc.pid


async def test_a_killed_worker_is_replaced_and_calls_keep_working(workdir: Path) -> None:
    with served(workdir, script(workdir, f"unix://{workdir}/s.sock", 2)) as (proc, url):
        first = children(proc.pid)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        now = await until("a replacement worker", lambda: (c := children(proc.pid)) and len(c) == 2 and victim not in c and c)
        (new,) = now - first
        async with contextlib.AsyncExitStack() as stack:
            seen = await origins_by_worker(url, 2, stack)
        assert set(seen) == now
        assert seen[new][1:] == [new, new]
        assert proc.poll() is None
    assert f"(pid {victim}) was killed by SIGKILL; starting another" in (workdir / "stderr").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_stops_everything_after_the_calls_in_flight(workdir: Path, sig: signal.Signals) -> None:
    sock = workdir / "s.sock"
    with served(workdir, script(workdir, f"unix://{sock}", 2)) as (proc, url):
        workers = children(proc.pid)
        async with xrpc.connect(url, timeout=T) as conn:
            probe = conn.proxy(Probe)
            pid = await probe.pid()
            result: list[str] = []
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    result.append(await probe.slow(1.0))

                tg.start_soon(call)
                await until("the call to start", lambda: (workdir / f"slow.{pid}").exists())
                proc.send_signal(sig)
                # stops accepting at once: the socket file goes away, nothing can connect
                await until("the socket to go away", lambda: not sock.exists())
                with pytest.raises((xrpc.TransportError, OSError)):
                    async with xrpc.connect(url, timeout=T):
                        pass
            assert result == ["finished"]  # the call in flight finished
        assert await wait_exit(proc) == 0
        assert read_line(proc) == "stopped cleanly"
    for w in workers:
        assert gone(w), f"worker {w} outlived the server"
    assert "Traceback" not in (workdir / "stderr").read_text()


async def test_the_drain_timeout_bounds_a_call_that_does_not_end(workdir: Path) -> None:
    with served(workdir, script(workdir, f"unix://{workdir}/s.sock", 2, "0.5")) as (proc, url):
        workers = children(proc.pid)
        async with xrpc.connect(url, timeout=T) as conn:
            probe = conn.proxy(Probe)
            pid = await probe.pid()
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    with pytest.raises((xrpc.ConnectionInterrupted, xrpc.ConnectionInvalidated)):
                        await probe.slow(1000.0)

                tg.start_soon(call)
                await until("the call to start", lambda: (workdir / f"slow.{pid}").exists())
                proc.send_signal(signal.SIGTERM)
                assert await wait_exit(proc, 2 * T) == 0
    for w in workers:
        assert gone(w)


async def test_the_server_leaves_no_worker_behind_when_it_is_killed(workdir: Path) -> None:
    with served(workdir, script(workdir, f"unix://{workdir}/s.sock", 2)) as (proc, url):
        workers = children(proc.pid)
        proc.kill()
        await wait_exit(proc)
        # orphaned, each worker sees its control socket close and stops (no call in flight: at once)
        await until("the workers to exit", lambda: all(gone(w) for w in workers))


async def test_a_worker_that_keeps_dying_makes_the_server_give_up(workdir: Path) -> None:
    with served(workdir, script(workdir, f"unix://{workdir}/s.sock", 2)) as (proc, url):
        workers = children(proc.pid)
        (workdir / "die").write_text("")
        os.kill(min(workers), signal.SIGKILL)
        assert await wait_exit(proc, 6 * T) != 0
        alive = children(proc.pid)
    err = (workdir / "stderr").read_text()
    assert "5 workers exited within 10s: giving up" in err, err
    assert len((workdir / "died").read_text().split()) >= 4  # the first exit was the kill
    assert not alive
    for w in workers:
        assert gone(w)


def test_a_factory_that_fails_at_start_up_fails_at_once(workdir: Path) -> None:
    (workdir / "die").write_text("")
    proc = subprocess.Popen(script(workdir, f"unix://{workdir}/s.sock", 2), cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    out, err = proc.communicate(timeout=6 * T)
    assert proc.returncode != 0
    assert b"before it was ready: RuntimeError: told to die" in err, err.decode()
    assert len((workdir / "died").read_text().split()) <= 2  # one per worker: not retried
    assert not (workdir / "s.sock").exists()


async def test_workers_1_serves_in_this_process(workdir: Path) -> None:
    with served(workdir, script(workdir, f"unix://{workdir}/s.sock", 1)) as (proc, url):
        assert not children(proc.pid)
        async with xrpc.connect(url, timeout=T) as conn:
            assert await conn.proxy(Probe).origins() == [proc.pid, proc.pid, proc.pid]
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0


async def test_xrpc_serve_with_workers(workdir: Path) -> None:
    argv = [sys.executable, "-m", "xrpc", "serve", "wsrv:make", "--workers", "2", f"unix://{workdir}/s.sock"]
    with served(workdir, argv) as (proc, url):
        workers = children(proc.pid)
        assert len(workers) == 2
        async with contextlib.AsyncExitStack() as stack:
            seen = await origins_by_worker(url, 2, stack)
        assert set(seen) == workers
        assert all(origins == [pid, pid, pid] for pid, origins in seen.items())
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    for w in workers:
        assert gone(w)
    assert "serving Probe on unix://" in (workdir / "stderr").read_text()
    assert "with 2 workers" in (workdir / "stderr").read_text()


def test_xrpc_serve_with_workers_reports_a_broken_object(workdir: Path) -> None:
    argv = [sys.executable, "-m", "xrpc", "serve", "wsrv:nothing", "--workers", "2", f"unix://{workdir}/s.sock"]
    r = subprocess.run(argv, cwd=workdir, capture_output=True, env=child_env({"PYTHONPATH": str(workdir)}), timeout=3 * T)
    assert r.returncode == 2
    assert b"has no attribute 'nothing'" in r.stderr
    (workdir / "die").write_text("")  # the factory fails in the workers
    argv = [sys.executable, "-m", "xrpc", "serve", "wsrv:make", "--workers", "2", f"unix://{workdir}/s.sock"]
    r = subprocess.run(argv, cwd=workdir, capture_output=True, env=child_env({"PYTHONPATH": str(workdir)}), timeout=6 * T)
    assert r.returncode == 2
    last = r.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("error: worker ") and "before it was ready" in last and last.endswith("RuntimeError: told to die"), last


# --------------------------------------------------------------------------- in this process
async def test_server_serve_with_workers_from_a_running_loop(sock_dir: str) -> None:
    async with anyio.create_task_group() as tg:
        url = await tg.start(functools.partial(xrpc.Server().serve, f"unix://{sock_dir}/s.sock", workers=2, factory=make_server))
        workers = children(os.getpid())
        assert len(workers) == 2
        async with contextlib.AsyncExitStack() as stack:
            seen = await origins_by_worker(url, 2, stack)
        assert set(seen) == workers
        tg.cancel_scope.cancel()
    for w in workers:
        assert gone(w)
    assert not os.path.exists(f"{sock_dir}/s.sock")


async def test_tls_with_workers(tmp_path: Path) -> None:
    from _trust import self_signed

    cert, key = self_signed(tmp_path)
    async with anyio.create_task_group() as tg:
        url = await tg.start(
            functools.partial(
                xrpc.Server().serve,
                "tls://127.0.0.1:0",
                workers=2,
                factory=make_server,
                ssl_context=functools.partial(xrpc.server_ssl_context, cert, key),
            )
        )
        assert url.startswith("tls://127.0.0.1:")
        async with contextlib.AsyncExitStack() as stack:
            seen = await origins_by_worker(url, 2, stack, ssl_context=xrpc.client_ssl_context(cert))
        assert set(seen) == children(os.getpid())
        tg.cancel_scope.cancel()


class NotifySocket:
    """A ``$NOTIFY_SOCKET`` that sees who sends each datagram."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)

    async def next(self) -> tuple[int, str]:
        with anyio.fail_after(6 * T):
            await anyio.wait_readable(self.sock)
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(struct.unpack("3i", d)[0] for level, kind, d in ancdata if kind == socket.SCM_CREDENTIALS)
        return pid, data.decode()


async def test_ready_is_reported_by_the_supervisor_once_every_worker_is_ready(sock_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    notify = NotifySocket(f"{sock_dir}/notify")
    monkeypatch.setenv("NOTIFY_SOCKET", f"{sock_dir}/notify")
    monkeypatch.setenv("WK_SLOW_DIR", sock_dir)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(xrpc.Server().serve, f"unix://{sock_dir}/s.sock", workers=2, factory=make_server))
            pid, text = await notify.next()
            assert pid == os.getpid()
            assert text.split("\n")[0] == "READY=1" and "with 2 workers" in text
            # the slow worker had built its server before READY=1
            assert [p for p in os.listdir(sock_dir) if p.startswith("built.")]
            tg.cancel_scope.cancel()
        assert await notify.next() == (os.getpid(), "STOPPING=1")
    finally:
        notify.sock.close()


async def test_what_cannot_reach_a_worker_is_refused_with_a_clear_error(sock_dir: str) -> None:
    url = f"unix://{sock_dir}/s.sock"
    with pytest.raises(TypeError, match="pass the module-level function that makes it"):
        xrpc.run(xrpc.Server(), url, workers=2)
    with pytest.raises(TypeError, match="module-level function or class"):
        xrpc.run(lambda: xrpc.Server(), url, workers=2)
    with pytest.raises(TypeError, match="pass factory="):
        await xrpc.Server().serve(url, workers=2)
    with pytest.raises(TypeError, match="each worker process builds its own TLS context"):
        await xrpc.Server().serve("tls://127.0.0.1:0", workers=2, factory=make_server, ssl_context=xrpc.client_ssl_context())
    with pytest.raises(TypeError, match="plain data"):
        await xrpc.Server().serve(url, workers=2, factory=functools.partial(make_server, object()))  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="workers=0"):
        await xrpc.Server().serve(url, workers=0, factory=make_server)
    with pytest.raises(ValueError, match="need a socket to share"):
        await xrpc.Server().serve("memory://wk", workers=2, factory=make_server)
    assert not os.path.exists(f"{sock_dir}/s.sock")


def test_a_worker_ahead_leaves_a_waiting_connection_to_the_others_for_a_moment() -> None:
    from xrpc._workers import AcceptBalance, ConnectionCounts, CountedConnections

    counts = ConnectionCounts.create(2)
    assert counts is not None
    try:
        mine = CountedConnections(counts, 0)
        other = CountedConnections(counts, 1)
        balance = AcceptBalance(mine, patience=60.0)
        assert balance.gate() == 0  # even
        mine.add("a")
        assert balance.gate() > 0  # one ahead: wait for the other worker
        other.add("b")
        assert balance.gate() == 0
        other.discard("b")
        counts.set(1, ConnectionCounts.ABSENT)  # no worker in that slot (it died): nobody to wait for
        assert balance.gate() == 0
        other.add("c")
        other.discard("c")
        impatient = AcceptBalance(mine, patience=0.0)
        assert impatient.gate() == 0  # waited long enough (here: not at all): accept
        assert impatient.gate() == 0  # ... and for a while, without waiting again
    finally:
        counts.close()
