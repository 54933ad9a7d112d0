"""The pidfd of a Unix peer: held only once something reads it.

An accepted Unix connection holds one descriptor (its socket) until ``peer.pidfd`` is read; the
pidfd then opened refers to the process that connected (the kernel keeps it with the socket), never
to another process given the same pid, and it is closed with the connection.  What is read from
/proc at accept time (``exe``, ``groups``) is still checked against a pidfd held while it is read,
so a requirement on it never judges a recycled pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from typing import Protocol

import anyio
import pytest

import xrpc
from _procs import fd_count, kernel_has_peer_pidfd
from _timeouts import T
from xrpc._transports import socket_peer


pytestmark = pytest.mark.skipif(not kernel_has_peer_pidfd(), reason="no SO_PEERPIDFD (Linux < 6.5)")


def _pidfd_pid(fd: int) -> int:
    """The pid a pidfd refers to (-1 once that process is gone), from /proc/self/fdinfo."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise AssertionError(f"descriptor {fd} is not a pidfd")


def _alive(fd: int) -> bool:
    try:
        signal.pidfd_send_signal(fd, 0)
    except ProcessLookupError:
        return False
    return True


@xrpc.interface
class Adder(Protocol):
    async def add(self, a: int, b: int) -> int: ...


class AdderImpl:
    async def add(self, a: int, b: int) -> int:
        return a + b


async def _until(condition: object, what: str) -> None:
    """Poll ``condition()`` until it holds, within the test's deadline."""
    with anyio.fail_after(T):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.005)


async def test_an_idle_unix_connection_holds_one_descriptor_until_its_pidfd_is_read(sock_dir: str) -> None:
    n = 12
    server = xrpc.Server()
    server.export(Adder, AdderImpl())
    with anyio.fail_after(T):
        async with server.listen(f"unix://{sock_dir}/s.sock") as listener:
            before = fd_count(os.getpid())
            async with contextlib.AsyncExitStack() as stack:
                conns = [await stack.enter_async_context(xrpc.connect(listener.url, timeout=T)) for _ in range(n)]
                for c in conns:
                    assert await c.proxy(Adder).add(1, 2) == 3
                await _until(lambda: len(server.connections) == n, "every connection accepted")
                # client and server in this process: one socket on each side, and nothing else
                assert fd_count(os.getpid()) - before == 2 * n
                served = next(iter(server.connections))
                fd = served.peer.pidfd  # opened now, once
                assert fd is not None and served.peer.pidfd == fd
                assert fd_count(os.getpid()) - before == 2 * n + 1
                assert _pidfd_pid(fd) == os.getpid()  # the process that connected: this one
                assert conns[0].peer.pidfd is not None  # the client side can ask for its server's too
                assert fd_count(os.getpid()) - before == 2 * n + 2
            await _until(lambda: not server.connections, "every connection closed")
            assert served.peer.pidfd is None  # closed with its connection, never handed out again
            assert fd_count(os.getpid()) == before


def _connecting_child(path: str, stay: bool) -> subprocess.Popen[bytes]:
    """A process that connects to ``path`` and then either exits or waits for its stdin to close."""
    code = "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nprint('in', flush=True)\n"
    if stay:
        code += "sys.stdin.read()\n"
    return subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def test_a_pidfd_read_later_still_refers_to_the_process_that_connected(sock_dir: str) -> None:
    path = f"{sock_dir}/l.sock"
    with socket.socket(socket.AF_UNIX) as lsock:
        lsock.bind(path)
        lsock.listen()
        lsock.settimeout(T)
        child = _connecting_child(path, stay=True)
        try:
            assert child.stdout is not None and child.stdout.readline() == b"in\n"
            conn, _ = lsock.accept()
            with conn:
                peer = socket_peer(conn, "unix")
                assert peer.pid == child.pid
                assert peer.exe == os.path.realpath(sys.executable)  # read while a pidfd was held
                fd = peer.pidfd
                assert fd is not None and _pidfd_pid(fd) == child.pid and _alive(fd)
        finally:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.close()
            child.stdout.close()
            child.wait(T)
        # the process is gone: its pidfd says so, whatever process gets its pid next
        assert not _alive(fd)
        assert _pidfd_pid(fd) == -1
        os.close(fd)


def test_a_peer_that_exited_before_it_was_looked_at_has_no_exe_and_no_live_pidfd(sock_dir: str) -> None:
    """A requirement on ``exe`` or ``groups`` denies: /proc may describe a process given the pid since."""
    path = f"{sock_dir}/l.sock"
    with socket.socket(socket.AF_UNIX) as lsock:
        lsock.bind(path)
        lsock.listen()
        lsock.settimeout(T)
        child = _connecting_child(path, stay=False)
        child.communicate(timeout=T)  # connected, exited and reaped before the connection is accepted
        conn, _ = lsock.accept()
        with conn:
            peer = socket_peer(conn, "unix")
            assert peer.pid == child.pid
            assert peer.exe is None
            assert not xrpc.requirement(f'exe == "{os.path.realpath(sys.executable)}"').check(peer)
            fd = peer.pidfd  # (None where the kernel gives no pidfd for a process that is gone)
            if fd is not None:
                assert not _alive(fd)
                os.close(fd)
