"""Socket activation and readiness, with real processes.

The real ``systemd-socket-activate`` starts a service on its first connection.  It execs into the
service, so the tests that start one many times use ``Manager``: like a socket unit with Accept=no,
it holds a listening Unix socket, and whenever a connection waits and no instance runs it starts
one with the socket as descriptor 3 (``LISTEN_FDS=1``, ``LISTEN_PID`` set by the service's own
shell, which then execs the service, so the pid is right).  Readiness is read from a datagram
socket the test owns, as ``$NOTIFY_SOCKET``.  Waits are on events (pidfds, datagrams, output lines),
each bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import anyio
import anyio.to_thread
import pytest

import xrpc
from xrpc._systemd import (
    SocketActivationError,
    check_socket,
    parse_listen_env,
    sd_notify,
    watchdog_interval,
)

from services_fixtures.probe import Client, Probe
from _timeouts import T
from _procs import short_dir, watch

HERE = Path(__file__).parent
NAME = "com.example.probe"
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
# How many cold starts the sequential test makes: each one starts a Python interpreter and imports
# xrpc, 300-370 ms a cycle on a loaded 2-core machine, so 150 keep it under a minute there (200 took
# 73 s); XRPC_TEST_COLD_STARTS=200 runs the full count.
COLD_STARTS = int(os.environ.get("XRPC_TEST_COLD_STARTS", "150"))

# The shell sets LISTEN_PID to its own pid and execs the service (same pid), with the listening
# socket moved from stdin to descriptor 3.
_WRAPPER = 'LISTEN_PID=$$; LISTEN_FDS=1; export LISTEN_PID LISTEN_FDS; exec "$@" 3<&0 </dev/null'


class ClientImpl:
    def __init__(self) -> None:
        self.hellos: list[str] = []

    async def hello(self, token: str) -> str:
        self.hellos.append(token)
        return f"ack {token}"

    async def started(self, what: str) -> None:
        pass


def _description(directory: Path, **fields: Any) -> Path:
    lines = [f'name = "{NAME}"', 'module = "services_fixtures.probe:make_server"']
    lines += [f"{k} = {v!r}" for k, v in fields.items()]
    path = directory / f"{NAME}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _service_argv(description: Path) -> list[str]:
    return [sys.executable, "-m", "xrpc.service", NAME, "--description", str(description)]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_", "XRPC_"))}
    env["PYTHONPATH"] = str(HERE)
    env.update(extra)
    return env


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(short_dir())
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Manager:
    """A socket unit with Accept=no: holds the listening socket, starts ``argv`` when a connection
    waits and no instance runs, and waits for that instance to exit before watching again."""

    def __init__(self, path: str, argv: list[str], env: dict[str, str], fdname: str = "") -> None:
        self.path = path
        self.url = f"unix://{path}"
        self.argv = argv
        self.env = dict(env, **({"LISTEN_FDNAMES": fdname} if fdname else {}))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(128)
        self.starts: list[int] = []
        self.exit_codes: list[int] = []
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._current: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Manager:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(T)
        proc = self._current  # the thread is gone: what it left is ours to finish
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            else:
                self.exit_codes.append(proc.returncode)  # exited; the thread had not recorded it yet
            proc.wait(T)
        self.sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self.sock, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            proc = subprocess.Popen(["sh", "-c", _WRAPPER, "sh", *self.argv], stdin=self.sock.fileno(), env=self.env)
            self._current = proc
            self.starts.append(proc.pid)
            pidfd = os.pidfd_open(proc.pid)
            try:
                ready, _, _ = select.select([pidfd, self._stop_r], [], [])
            finally:
                os.close(pidfd)
            if self._stop_r in ready:
                return
            self.exit_codes.append(proc.wait())
            self._current = None


async def _probe_call(url: str) -> tuple[int, ClientImpl, list[str]]:
    """Connect (with a Client for on_connect to call back), return the service's pid and what
    on_connect got back."""
    client = ClientImpl()
    with anyio.fail_after(3 * T):
        async with xrpc.connect(url, exports=[(Client, client)], timeout=3 * T) as conn:
            p = conn.proxy(Probe)
            pid = await p.pid()
            greetings = await p.greetings()
    return pid, client, greetings


# --------------------------------------------------------------------------- the real launcher
needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed (Debian/Ubuntu: apt-get install systemd)"
)


@contextlib.contextmanager
def socket_activate(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    assert SOCKET_ACTIVATE is not None
    proc = subprocess.Popen([SOCKET_ACTIVATE, *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(T)
        assert proc.stderr is not None and proc.stdout is not None
        proc.stderr.close()
        proc.stdout.close()


def _await_line(proc: subprocess.Popen[bytes], marker: bytes, timeout: float = T) -> bytes:
    """Read the process's stderr until a line containing ``marker``; return what was read."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"no {marker!r} within {timeout}s: {seen!r}"
        chunk = os.read(fd, 4096)
        assert chunk, f"stderr closed before {marker!r}: {seen!r}"
        seen += chunk
    return seen


@needs_socket_activate
async def test_systemd_socket_activate_starts_the_module_service_on_the_first_connection(workdir: Path) -> None:
    desc = _description(workdir, idle_exit=0)
    path = str(workdir / "p.sock")
    args = ["-l", path, "--fdname", NAME, "-E", "PYTHONPATH", *_service_argv(desc)]
    with socket_activate(args, _env()) as proc:
        _await_line(proc, b"Listening on")
        assert proc.poll() is None
        pid, client, greetings = await _probe_call(f"unix://{path}")
        assert pid == proc.pid  # it execs into the service
        assert client.hellos == [str(pid)] and greetings == [f"ack {pid}"]
        with anyio.fail_after(T):
            assert await anyio.to_thread.run_sync(proc.wait) == 0  # idle_exit = 0: gone with its client


@needs_socket_activate
async def test_systemd_socket_activate_starts_xrpc_serve(workdir: Path) -> None:
    path = str(workdir / "p.sock")
    args = ["-l", path, "-E", "PYTHONPATH", sys.executable, "-m", "xrpc", "serve", "services_fixtures.probe:make_server", "systemd:"]
    with socket_activate(args, _env()) as proc:
        _await_line(proc, b"Listening on")
        pid, client, greetings = await _probe_call(f"unix://{path}")
        assert pid == proc.pid
        assert client.hellos == [str(pid)] and greetings == [f"ack {pid}"]
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"unix://{path}".encode()  # the inherited socket's address


# --------------------------------------------------------------------------- a manager of our own
@pytest.mark.timeout(600)
async def test_cold_starts_through_one_socket_lose_no_callback(workdir: Path) -> None:
    desc = _description(workdir, idle_exit=0)
    with Manager(str(workdir / "p.sock"), _service_argv(desc), _env(), fdname=NAME) as mgr:
        pids: list[int] = []
        t0 = time.monotonic()
        for i in range(COLD_STARTS):
            pid, client, greetings = await _probe_call(mgr.url)
            assert client.hellos == [str(pid)], f"start {i}"
            assert greetings == [f"ack {pid}"], f"start {i}"
            with watch(pid) as w:
                await w.exited()  # idle_exit = 0: it exits once its only client is gone
            pids.append(pid)
        total = time.monotonic() - t0
    assert mgr.starts == pids and len(set(pids)) == COLD_STARTS
    assert set(mgr.exit_codes) == {0}
    print(f"\n{COLD_STARTS} cold starts by socket activation in {total:.1f}s ({total / COLD_STARTS * 1000:.0f} ms each)")


async def test_idle_exit_then_restart_through_the_same_socket(workdir: Path) -> None:
    desc = _description(workdir, idle_exit=0.2)
    with Manager(str(workdir / "p.sock"), _service_argv(desc), _env(), fdname=NAME) as mgr:
        first, _, _ = await _probe_call(mgr.url)
        again, _, _ = await _probe_call(mgr.url)  # well within idle_exit: the same instance
        assert again == first
        with watch(first) as w:
            t0 = time.monotonic()
            await w.exited()
            idle = time.monotonic() - t0
        assert os.path.exists(mgr.path)  # the socket unit keeps listening
        second, client, greetings = await _probe_call(mgr.url)
        assert second != first and client.hellos == [str(second)] and greetings == [f"ack {second}"]
        assert mgr.starts == [first, second]
    assert 0.1 < idle < T


async def test_clients_arriving_while_the_service_keeps_exiting_lose_nothing(workdir: Path) -> None:
    # idle_exit = 0: the service stops whenever its last client leaves, so clients keep arriving
    # while an instance is deciding to stop, has stopped accepting, or is exiting.
    desc = _description(workdir, idle_exit=0)
    rounds, clients = 15, 3
    done: list[int] = []
    with Manager(str(workdir / "p.sock"), _service_argv(desc), _env(), fdname=NAME) as mgr:

        async def client_loop(k: int) -> None:
            rng = random.Random(k)
            for i in range(rounds):
                pid, client, greetings = await _probe_call(mgr.url)
                assert client.hellos == [str(pid)] and greetings == [f"ack {pid}"], f"client {k} round {i}"
                done.append(pid)
                await anyio.sleep(rng.random() * 0.05)  # spread the arrivals, not a wait for a condition

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for k in range(clients):
                    tg.start_soon(client_loop, k)
    assert len(done) == rounds * clients
    assert set(done) <= set(mgr.starts)
    print(f"\n{rounds * clients} calls from {clients} clients over {len(mgr.starts)} instances")


async def test_two_clients_at_the_same_moment_start_one_process(workdir: Path) -> None:
    desc = _description(workdir, idle_exit=0.5)
    env = _env(PROBE_START_DELAY="0.3")  # both connections wait in the backlog while it starts
    with Manager(str(workdir / "p.sock"), _service_argv(desc), env, fdname=NAME) as mgr:
        results: list[tuple[int, ClientImpl, list[str]]] = []

        async def one() -> None:
            results.append(await _probe_call(mgr.url))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
        assert results[0][0] == results[1][0]
        assert mgr.starts == [results[0][0]]
        for pid, client, greetings in results:
            assert client.hellos == [str(pid)] and greetings == [f"ack {pid}"]
        with watch(results[0][0]) as w:
            await w.exited()
    assert mgr.exit_codes == [0]


async def test_a_unix_url_of_the_inherited_socket_adopts_it(workdir: Path) -> None:
    # a server configured with its usual address, run from a socket unit listening there, serves
    # the inherited socket instead of failing with "address in use"
    path = str(workdir / "p.sock")
    argv = [sys.executable, "-m", "xrpc", "serve", "services_fixtures.probe:make_server", f"unix://{path}"]
    with Manager(path, argv, _env()) as mgr:
        pid, client, greetings = await _probe_call(mgr.url)
        assert mgr.starts == [pid] and client.hellos == [str(pid)]


# --------------------------------------------------------------------------- readiness
class NotifySocket:
    """A datagram socket standing in for the service manager's ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str) -> None:
        self.env = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[tuple[float, str]] = []

    async def next(self, timeout: float = T) -> str:
        with anyio.fail_after(timeout):
            await anyio.wait_readable(self.sock)
        text = self.sock.recv(4096).decode()
        self.messages.append((time.monotonic(), text))
        return text

    async def until(self, field: str, timeout: float = T) -> list[str]:
        """Messages up to and including the first holding ``field``."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            text = await self.next(max(deadline - time.monotonic(), 0.001))
            seen.append(text)
            if field in text.split("\n"):
                return seen

    def close(self) -> None:
        self.sock.close()


async def test_ready_status_watchdog_and_stopping(workdir: Path) -> None:
    desc = _description(workdir)
    notify = NotifySocket(str(workdir / "notify"))
    env = _env(NOTIFY_SOCKET=notify.env, WATCHDOG_USEC="200000")  # pings every 0.1 s
    env["WATCHDOG_PID"] = ""  # set below by the shell to the service's pid
    path = str(workdir / "p.sock")
    script = 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"'
    argv = ["sh", "-c", script, "sh", *_service_argv(desc), "--socket", path]
    proc = subprocess.Popen(argv, env=env)
    try:
        with anyio.fail_after(3 * T):
            ready = (await notify.until("READY=1", 3 * T))[-1]
        # READY=1 comes once it listens: a client connects at once
        assert any(f.startswith("STATUS=serving ") and path in f for f in ready.split("\n")), ready
        pid, _, _ = await _probe_call(f"unix://{path}")
        assert pid == proc.pid
        pings = []
        while len(pings) < 6:
            text = await notify.next()
            if text == "WATCHDOG=1":
                pings.append(time.monotonic())
        gaps = sorted(b - a for a, b in zip(pings, pings[1:]))
        assert 0.07 < gaps[len(gaps) // 2] < 0.2, gaps  # about half of WATCHDOG_USEC
        proc.send_signal(signal.SIGTERM)
        stopping = (await notify.until("STOPPING=1"))[-1]
        assert "STOPPING=1" in stopping.split("\n")
        with anyio.fail_after(T):
            assert await anyio.to_thread.run_sync(proc.wait) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(T)
        notify.close()


async def test_readiness_of_a_socket_activated_service_to_an_abstract_notify_socket(workdir: Path) -> None:
    desc = _description(workdir, idle_exit=0)
    notify = NotifySocket(f"@xrpc-test-{os.getpid()}-{random.getrandbits(32)}")
    env = _env(NOTIFY_SOCKET=notify.env)
    try:
        with Manager(str(workdir / "p.sock"), _service_argv(desc), env, fdname=NAME) as mgr:
            pid, _, _ = await _probe_call(mgr.url)
            ready = (await notify.until("READY=1", 3 * T))[-1]
            assert f"STATUS=serving {NAME} on {mgr.url}" in ready.split("\n")
            stopping = (await notify.until("STOPPING=1"))[-1]  # idle exit
            assert "STATUS=idle: exiting" in stopping.split("\n")
            with watch(pid) as w:
                await w.exited()
            assert mgr.starts == [pid]
    finally:
        notify.close()


async def test_server_serve_reports_ready_and_stopping(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notify = NotifySocket(str(workdir / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", notify.env)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    try:
        server = xrpc.Server()
        async with anyio.create_task_group() as tg:
            url = await tg.start(server.serve, f"unix://{workdir}/s.sock")
            ready = await notify.next()
            assert ready.split("\n") == ["READY=1", f"STATUS=serving on {url}"]
            async with xrpc.connect(url, timeout=T):
                pass
            tg.cancel_scope.cancel()
        assert await notify.next() == "STOPPING=1"
    finally:
        notify.close()


def test_sd_notify_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert watchdog_interval() is None


def test_the_watchdog_is_only_for_the_process_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
    assert sd_notify("WATCHDOG=1") is False  # nobody listens there: not sent, no exception


# --------------------------------------------------------------------------- bad descriptors
def test_listen_env_parsing() -> None:
    assert parse_listen_env({}, 42) == []
    assert parse_listen_env({"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}, 42) == [(3, "a"), (4, "b")]
    assert parse_listen_env({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, 42) == [(3, "unknown")]
    with pytest.raises(SocketActivationError, match=r"LISTEN_PID=41 names another process \(this is 42\)"):
        parse_listen_env({"LISTEN_PID": "41", "LISTEN_FDS": "1"}, 42)
    with pytest.raises(SocketActivationError, match="LISTEN_PID is not"):
        parse_listen_env({"LISTEN_FDS": "1"}, 42)
    with pytest.raises(SocketActivationError, match="1 names for LISTEN_FDS=2"):
        parse_listen_env({"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}, 42)
    with pytest.raises(SocketActivationError, match="not a number"):
        parse_listen_env({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, 42)
    assert issubclass(SocketActivationError, xrpc.TransportError)


def test_check_socket_names_what_is_wrong(workdir: Path) -> None:
    with contextlib.ExitStack() as stack:
        r, w = os.pipe()
        stack.callback(os.close, r)
        stack.callback(os.close, w)
        with pytest.raises(SocketActivationError, match=r"descriptor \d+ \('web' in LISTEN_FDNAMES\) is a pipe, not a socket"):
            check_socket(r, "web")
        f = stack.enter_context(open(workdir / "file", "wb"))
        with pytest.raises(SocketActivationError, match="is a regular file, not a socket"):
            check_socket(f.fileno())
        unlistened = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        unlistened.bind(str(workdir / "u.sock"))
        with pytest.raises(SocketActivationError, match="not listening.*Accept=no"):
            check_socket(unlistened.fileno())
        dgram = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        with pytest.raises(SocketActivationError, match="is a datagram socket; xrpc needs a stream socket"):
            check_socket(dgram.fileno())
        tcp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        with pytest.raises(SocketActivationError, match=r"is a IPv4 \(AF_INET\) socket; expected unix \(AF_UNIX\)"):
            check_socket(tcp.fileno(), families=(socket.AF_UNIX,))
        good = check_socket(tcp.fileno())
        assert good.url == f"tcp://127.0.0.1:{tcp.getsockname()[1]}" and good.transport == "tcp"
        with pytest.raises(SocketActivationError, match="is not open"):
            check_socket(1000)


def _run_activated(stdin: Any, argv: list[str], **env: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` with ``stdin`` as descriptor 3 and LISTEN_FDS=1 / LISTEN_PID its own pid."""
    return subprocess.run(["sh", "-c", _WRAPPER, "sh", *argv], stdin=stdin, env=_env(**env), capture_output=True, timeout=3 * T)


def test_a_service_given_a_bad_descriptor_says_what_it_got(workdir: Path) -> None:
    desc = _description(workdir)
    r, w = os.pipe()
    try:
        out = _run_activated(r, _service_argv(desc))
    finally:
        os.close(r)
        os.close(w)
    assert out.returncode == 3
    assert b"descriptor 3 is a pipe, not a socket" in out.stderr, out.stderr
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(workdir / "c.sock"))  # bound, never listening (what Accept=yes would not pass either)
        out = _run_activated(s.fileno(), _service_argv(desc))
    assert out.returncode == 3 and b"is a socket that is not listening" in out.stderr, out.stderr


def test_a_service_refuses_sockets_passed_to_another_process(workdir: Path) -> None:
    desc = _description(workdir)
    out = subprocess.run(_service_argv(desc), env=_env(LISTEN_FDS="1", LISTEN_PID="1"), capture_output=True, timeout=3 * T)
    assert out.returncode == 3
    assert b"LISTEN_PID=1 names another process" in out.stderr, out.stderr


def test_xrpc_serve_with_an_unknown_socket_name_lists_the_names(workdir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(workdir / "p.sock"))
        s.listen()
        argv = [sys.executable, "-m", "xrpc", "serve", "services_fixtures.probe:make_server", "systemd:api"]
        out = _run_activated(s.fileno(), argv, LISTEN_FDNAMES="web")
    assert out.returncode == 3
    assert b"no inherited socket is named 'api' (the names passed are: web)" in out.stderr, out.stderr


def test_xrpc_serve_systemd_without_activation_says_so() -> None:
    argv = [sys.executable, "-m", "xrpc", "serve", "services_fixtures.probe:make_server", "systemd:"]
    out = subprocess.run(argv, env=_env(), capture_output=True, timeout=3 * T)
    assert out.returncode == 3 and b"no socket was passed to this process" in out.stderr, out.stderr


async def test_systemd_url_without_activation_is_a_clear_error() -> None:
    server = xrpc.Server()
    with pytest.raises(SocketActivationError, match="no socket was passed to this process"):
        async with server.listen("systemd:"):
            pass
