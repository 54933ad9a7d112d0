"""Hostile review of two changes: a Unix peer's pidfd opened only when read, and how a trio server
starts incoming calls.

The attackers: a local client that connects, hands its socket to another process and exits, so that
a process of its choosing takes its pid before the server looks, while the server is at its
descriptor limit; and a peer that speaks raw frames to a trio server (cancels, deadlines, floods).
Each test runs real processes or raw sockets and failed before the fix it names.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Iterator, Protocol

import anyio
import pytest
from _procs import ChildProcess, errors_in, log_to, serve_until_stdin_closes
from _timeouts import T
from _wire import ERROR_TAG, HELLO, REPLY_TAG, WELCOME_TAG, frame, raw, recv_frame

import xrpc
from xrpc._protocol import Call

pytestmark = pytest.mark.timeout(120)


@xrpc.interface
class Who(Protocol):
    async def who(self) -> list[Any]: ...

    async def pidfd_pid(self) -> int | None: ...

    async def hog(self, free: int) -> int: ...

    async def release(self) -> None: ...


class WhoImpl:
    def __init__(self) -> None:
        self.held: list[int] = []

    async def who(self) -> list[Any]:
        peer = xrpc.current_connection().peer
        return [peer.pid, peer.exe, None if peer.groups is None else list(peer.groups)]

    async def pidfd_pid(self) -> int | None:
        """The pid the peer's pidfd refers to (from /proc/self/fdinfo), None without a pidfd."""
        fd = xrpc.current_connection().peer.pidfd
        if fd is None:
            return None
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
        raise AssertionError("not a pidfd")

    async def hog(self, free: int) -> int:
        """Open descriptors until none is left, then give ``free`` of them back."""
        while True:
            try:
                self.held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                break
        for _ in range(free):
            os.close(self.held.pop())
        return len(self.held)

    async def release(self) -> None:
        while self.held:
            os.close(self.held.pop())


def _who_server_main(path: str, backend: str, log_path: str) -> None:
    log_to(log_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))

    async def main() -> None:
        server = xrpc.Server()
        server.export(Who, WhoImpl())
        async with server.listen(f"unix://{path}") as listener:
            await serve_until_stdin_closes(listener.url)

    anyio.run(main, backend=backend)


@contextlib.contextmanager
def who_server(backend: str) -> Iterator[ChildProcess]:
    sp = ChildProcess()
    sp.start("test_hostile_review8", sp.path, backend, sp.log_path, entry="_who_server_main")
    try:
        yield sp
    finally:
        os.kill(sp.pid, signal.SIGCONT)
        alive = sp.proc.poll() is None
        lines = sp.stop()
        assert alive, lines[-20:]
        assert errors_in(lines) == [], "\n".join(lines[-40:])


def _raw_call(sock: socket.socket, call_id: int, method: str, *args: Any) -> list[Any]:
    """One CALL (a client's ids are odd) and its answer; HELLO was sent before."""
    sock.sendall(frame(Call(call_id, "Who", method, raw(list(args)), 0, None)))
    buf = b""
    while True:
        f, buf = recv_frame(sock, buf, T)
        if f[0] in (REPLY_TAG, ERROR_TAG) and f[1] == call_id:
            return f  # type: ignore[no-any-return]


HANDOFF = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
channel = socket.socket(fileno=int(sys.argv[2]))
socket.send_fds(channel, [b"s"], [s.fileno()])
"""


def _take_pid(pid: int, argv: list[str]) -> subprocess.Popen[bytes] | None:
    """Start ``argv`` as process ``pid`` (ns_last_pid; root only), or None if others keep taking it."""
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
        if os.path.exists(f"/proc/{pid}"):
            return None  # someone else took it
    return None


def _can_choose_pids() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/kernel/ns_last_pid", os.W_OK)


@pytest.mark.skipif(not _can_choose_pids(), reason="choosing the next pid needs root")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("at_limit", [False, True], ids=["descriptors-spare", "at-descriptor-limit"])
def test_a_recycled_pid_does_not_lend_its_executable_to_the_peer(backend: str, at_limit: bool) -> None:
    """The client connects, hands its socket to another process and exits; while the server is
    stopped, a process running another executable takes its pid.  The server must not report that
    executable as the peer's, even when it has no descriptor to spare for the pidfd that tells."""
    sleep = shutil.which("sleep")
    assert sleep is not None
    with who_server(backend) as sp:
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control.connect(sp.path)
        control.settimeout(T)
        control.sendall(HELLO)
        f, _ = recv_frame(control, b"", T)
        assert f[0] == WELCOME_TAG
        if at_limit:
            # exactly one descriptor left: the next accept takes it, and nothing is left for a pidfd
            assert _raw_call(control, 1, "hog", 1)[0] == REPLY_TAG
        os.kill(sp.pid, signal.SIGSTOP)
        ours, theirs = socket.socketpair()
        with ours, theirs:
            handoff = subprocess.Popen([sys.executable, "-c", HANDOFF, sp.path, str(theirs.fileno())], pass_fds=[theirs.fileno()])
            assert handoff.wait(timeout=3 * T) == 0
            ours.settimeout(T)
            _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        sock = socket.socket(fileno=fds[0])
        impostor = _take_pid(handoff.pid, [sleep, "60"])
        if impostor is None:
            os.kill(sp.pid, signal.SIGCONT)
            pytest.skip("could not recycle the pid")
        try:
            assert os.readlink(f"/proc/{handoff.pid}/exe") == os.path.realpath(sleep)
            os.kill(sp.pid, signal.SIGCONT)
            with sock:
                sock.settimeout(T)
                sock.sendall(HELLO)
                f, _ = recv_frame(sock, b"", T)
                assert f[0] == WELCOME_TAG
                reply = _raw_call(sock, 1, "who")
                assert reply[0] == REPLY_TAG, reply
                pid, exe, groups = reply[2]
                assert pid == handoff.pid
                assert exe is None, f"the peer was reported as running {exe}"
                assert groups is None
        finally:
            impostor.kill()
            impostor.wait()
            control.close()


def _raw_client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(T)
    sock.sendall(HELLO)
    f, _ = recv_frame(sock, b"", T)
    assert f[0] == WELCOME_TAG
    return sock


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_pidfd_refused_for_want_of_descriptors_is_opened_once_some_are_free(backend: str) -> None:
    """``peer.pidfd`` read while the server has no descriptor to spare reads None; it must not stay
    None for the rest of the connection once descriptors are free again."""
    with who_server(backend) as sp, _raw_client(sp.path) as sock:
        assert _raw_call(sock, 1, "hog", 0)[0] == REPLY_TAG
        assert _raw_call(sock, 3, "pidfd_pid")[2] is None  # nothing to open it with
        assert _raw_call(sock, 5, "release")[0] == REPLY_TAG
        reply = _raw_call(sock, 7, "pidfd_pid")
        assert reply[0] == REPLY_TAG, reply
        assert reply[2] == os.getpid()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_reading_pidfds_on_many_connections_leaks_no_descriptor(backend: str) -> None:
    with who_server(backend) as sp:
        with _raw_client(sp.path) as first:
            assert _raw_call(first, 1, "pidfd_pid")[2] == os.getpid()
        deadline = time.monotonic() + T
        baseline = len(os.listdir(f"/proc/{sp.pid}/fd"))
        for _ in range(3):
            socks = [_raw_client(sp.path) for _ in range(40)]
            for sock in socks:
                for i in range(3):
                    assert _raw_call(sock, 2 * i + 1, "pidfd_pid")[2] == os.getpid()
            for sock in socks:
                sock.close()
        while (now := len(os.listdir(f"/proc/{sp.pid}/fd"))) > baseline:
            assert time.monotonic() < deadline + 2 * T, f"{now - baseline} descriptors left open"
            time.sleep(0.02)


# --------------------------------------------------------------------------- trio: starting calls
@xrpc.interface
class Queue(Protocol):
    async def hold(self) -> None: ...

    async def step(self, n: int) -> int: ...

    async def started(self) -> list[int]: ...


class QueueImpl:
    def __init__(self) -> None:
        self.seen: list[int] = []
        self.never = anyio.Event()

    async def hold(self) -> None:
        await self.never.wait()

    async def step(self, n: int) -> int:
        self.seen.append(n)
        await anyio.sleep(0)
        return n

    async def started(self) -> list[int]:
        import trio

        return [len(self.seen), trio.lowlevel.current_statistics().tasks_living]


def _queue_server_main(path: str, log_path: str) -> None:
    log_to(log_path)

    async def main() -> None:
        server = xrpc.Server()
        server.export(Queue, QueueImpl())
        async with server.listen(f"unix://{path}") as listener:
            await serve_until_stdin_closes(listener.url)

    anyio.run(main, backend="trio")


def _queue_call(call_id: int, method: str, *args: Any) -> bytes:
    return frame(Call(call_id, "Queue", method, raw(list(args)), 0, None))


def _started(path: str) -> list[int]:
    with _raw_client(path) as sock:
        sock.sendall(_queue_call(1, "started"))
        buf = b""
        while True:
            f, buf = recv_frame(sock, buf, T)
            if f[0] == REPLY_TAG and f[1] == 1:
                return f[2]  # type: ignore[no-any-return]


def test_trio_calls_queued_when_the_peer_goes_away_are_not_started() -> None:
    """A peer sends a call that never ends and thousands behind it, each of which suspends, and
    closes.  The server used to start every queued call after the connection was over, one per
    scheduler round in a task of its own (each Cancelled kept by the task group until the last):
    twice the time and ten times the memory of serving them."""
    n = 2000
    sp = ChildProcess()
    sp.start("test_hostile_review8", sp.path, sp.log_path, entry="_queue_server_main")
    try:
        ran, baseline = _started(sp.path)
        sock = _raw_client(sp.path)
        sock.sendall(_queue_call(1, "hold") + b"".join(_queue_call(2 * i + 3, "step", i) for i in range(n)))
        sock.close()
        deadline = time.monotonic() + 3 * T
        while (state := _started(sp.path))[1] > baseline:  # until the connection's tasks are gone
            assert time.monotonic() < deadline, state
        assert state[0] < n // 2, f"{state[0]} of the {n} calls queued were started after the peer went away"
    finally:
        alive = sp.proc.poll() is None
        lines = sp.stop()
    assert alive, lines[-20:]
    assert errors_in(lines) == [], "\n".join(lines[-40:])
