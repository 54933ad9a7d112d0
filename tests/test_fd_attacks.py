"""File descriptors and shared memory under attack, with the victim in a child process.

- A ``SharedBuffer`` travels as a memfd.  A sender that shrinks the memfd after the receiver mapped
  it would kill the receiver with SIGBUS on its next read, so only sealed memfds (no shrinking, no
  growing, seals frozen) of exactly the declared size are accepted, in both directions: a call's
  argument (hostile client) and a reply (hostile server).
- SCM_RIGHTS descriptors: none are accepted before the peer is admitted, the unclaimed ones are
  capped per connection (``Limits.max_fds``) and per process, and a server out of descriptors
  (EMFILE on accept) keeps serving its connections, refuses new ones at once and recovers.

The victims run in child processes (so that a SIGBUS or a full descriptor table is theirs, not the
test's); their descriptor tables are read from ``/proc/<pid>/fd``.  No sleeps: every wait is on an
event, a read, or a poll with a deadline.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import anyio
import msgspec
import pytest

import xrpc
from xrpc._protocol import PROTOCOL_VERSION, ErrorCode, Hello, Ping

T = 10.0
GOODBYE_TAG, WELCOME_TAG, PONG_TAG = 10, 1, 12


# --------------------------------------------------------------------------- interfaces
@xrpc.interface
class Shm(Protocol):
    async def hold(self, buf: xrpc.SharedBuffer) -> int: ...
    async def peek(self) -> int: ...
    async def add(self, a: int, b: int) -> int: ...


class ShmImpl:
    def __init__(self) -> None:
        self.held: xrpc.SharedBuffer | None = None

    async def hold(self, buf: xrpc.SharedBuffer) -> int:
        self.held = buf
        return buf.size

    async def peek(self) -> int:
        assert self.held is not None
        return self.held.buffer[self.held.size - 1]  # a read of the last mapped page

    async def add(self, a: int, b: int) -> int:
        return a + b


@xrpc.interface
class Maker(Protocol):
    async def make(self, size: int) -> xrpc.SharedBuffer: ...
    async def shrink(self) -> None: ...
    async def add(self, a: int, b: int) -> int: ...


@xrpc.interface
class Calc(Protocol):
    async def add(self, a: int, b: int) -> int: ...
    async def size(self, fd: xrpc.FileDescriptor) -> int: ...


class CalcImpl:
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def size(self, fd: xrpc.FileDescriptor) -> int:
        with fd:
            return os.fstat(fd.fileno()).st_size


# --------------------------------------------------------------------------- child processes
def _child(role: str, target: str, options: str, log_path: str) -> None:
    """Entry point of the child processes (see ``Child`` and ``run_victim_client``)."""
    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    opts = json.loads(options)
    if "nofile" in opts:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (opts["nofile"], hard))

    async def serve() -> None:
        server = xrpc.Server(limits=xrpc.Limits(**opts.get("limits", {})))
        if role == "shm_server":
            server.export(Shm, ShmImpl())
        else:
            server.export(Calc, CalcImpl())
        async with server.listen(f"unix://{target}") as listener:
            print("READY", listener.url, flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)  # until the test closes our stdin

    async def victim_client() -> None:
        async with xrpc.connect(target, timeout=T) as conn:
            maker = conn.proxy(Maker)
            try:
                buf = await maker.make(1 << 16)
            except xrpc.ValidationError as exc:
                print("REFUSED", exc, flush=True)
            else:
                print("MAPPED", buf.size, flush=True)
                await maker.shrink()
                print("READ", buf.buffer[buf.size - 1], flush=True)  # SIGBUS here if it shrank
            print("ALIVE", await maker.add(1, 2), flush=True)

    anyio.run(victim_client if role == "shm_client" else serve)


CHILD_MAIN = "import sys; sys.path.insert(0, sys.argv[1]); from test_fd_attacks import _child; _child(*sys.argv[2:])"


class Child:
    """A server in a child process on a Unix socket, logging to a file."""

    def __init__(self, role: str, **options: Any) -> None:
        self.dir = tempfile.mkdtemp(prefix="xr", dir="/tmp")
        self.path = f"{self.dir}/s.sock"
        self.log_path = f"{self.dir}/child.log"
        self.err = open(f"{self.dir}/child.err", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_MAIN, str(Path(__file__).parent), role, self.path, json.dumps(options), self.log_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"the child did not start: {line!r} {self.output()}")
        self.url = line.split()[1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def status(self) -> str:
        rc = self.proc.poll()
        if rc is None:
            return "alive"
        return f"dead by {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}"

    def output(self) -> str:
        text = ""
        for name in ("child.log", "child.err"):
            with contextlib.suppress(FileNotFoundError):
                text += Path(self.dir, name).read_text()
        return text

    def stop(self) -> str:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.err.close()
            text = self.output()
            shutil.rmtree(self.dir, ignore_errors=True)
        return text


@pytest.fixture
def child() -> Iterator[Any]:
    """A factory for ``Child``; each one is stopped at the end, and must not have logged an ERROR."""
    started: list[Child] = []

    def start(role: str, **options: Any) -> Child:
        c = Child(role, **options)
        started.append(c)
        return c

    yield start
    for c in started:
        status = c.status()
        text = c.stop()
        assert status == "alive", f"the child process is {status}:\n{text[-2000:]}"
        errors = [line for line in text.splitlines() if line.startswith(("ERROR", "CRITICAL")) or "Traceback" in line]
        assert errors == [], text[-3000:]


def _unsealed_memfd(size: int, seals: int | None = None) -> int:
    """A memfd of ``size`` bytes; without ``seals`` it can never be sealed (no MFD_ALLOW_SEALING)."""
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seals is not None else 0))
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.fixture
def hostile_sender(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process sends shared buffers as they are, the way a hostile peer would (the sending side
    seals its buffers, or refuses them, before they leave)."""
    monkeypatch.setattr(xrpc.SharedBuffer, "_sealed_fd", lambda self: self.fileno(), raising=False)


# --------------------------------------------------------------------------- shared buffers
@pytest.mark.timeout(60)
async def test_shared_buffer_from_a_hostile_client_cannot_sigbus_the_server(child: Any, hostile_sender: None) -> None:
    """An unsealed memfd, shrunk after the server mapped it, used to kill the server (SIGBUS) on its
    next read; now it is refused with ValidationError before the method runs, and the connection,
    the server and the good buffers keep working."""
    victim = child("shm_server")
    size = 1 << 16
    with anyio.fail_after(30):
        async with xrpc.connect(victim.url, timeout=T) as conn:
            shm = conn.proxy(Shm)
            fd = _unsealed_memfd(size)
            evil = xrpc.SharedBuffer(fd, size)
            outcome = ""
            try:
                await shm.hold(evil)
            except xrpc.ValidationError as exc:
                outcome = f"refused: {exc}"
            else:
                os.ftruncate(fd, 0)  # the attack: shrink what the server has mapped
                try:
                    outcome = f"accepted, then read {await shm.peek()}"
                except xrpc.Error as exc:
                    outcome = f"accepted, then {exc!r}"
                with anyio.fail_after(10):
                    while victim.alive():  # the connection ended: wait for the process to be reaped
                        await anyio.sleep(0.01)
            evil.buffer.release()
            assert outcome.startswith("refused"), f"the unsealed buffer was {outcome}; the server is {victim.status()}"
            assert "seal" in outcome
            assert victim.alive()
            assert await shm.add(1, 2) == 3  # the same connection lives on

            # sealable, but without F_SEAL_SHRINK: refused the same way
            weak = xrpc.SharedBuffer(_unsealed_memfd(size, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL), size)
            with pytest.raises(xrpc.ValidationError, match="seal"):
                await shm.hold(weak)
            weak.close()
            # sealed, but announced with another size than the memfd has: refused
            with xrpc.SharedBuffer.create(2 * size) as liar:
                liar.size = size
                with pytest.raises(xrpc.ValidationError, match="size"):
                    await shm.hold(liar)
            # a buffer made by SharedBuffer.create is sealed: it travels, and cannot be shrunk
            with xrpc.SharedBuffer.create(size) as good:
                good.buffer[size - 1] = 0x5A
                assert await shm.hold(good) == size
                with pytest.raises(PermissionError):
                    os.ftruncate(good.fileno(), 0)
                assert await shm.peek() == 0x5A
            assert await shm.add(2, 3) == 5
    assert victim.alive()


class HostileMaker:
    """A server that hands out an unsealed buffer and shrinks it once the client has mapped it."""

    def __init__(self) -> None:
        self.fd = -1
        self.buf: xrpc.SharedBuffer | None = None

    async def make(self, size: int) -> xrpc.SharedBuffer:
        self.fd = _unsealed_memfd(size)
        self.buf = xrpc.SharedBuffer(self.fd, size)  # kept open here, to shrink it later
        return self.buf

    async def shrink(self) -> None:
        os.ftruncate(self.fd, 0)

    async def add(self, a: int, b: int) -> int:
        return a + b


@pytest.mark.timeout(60)
async def test_shared_buffer_from_a_hostile_server_cannot_sigbus_the_client(hostile_sender: None) -> None:
    """The other direction: a reply carrying an unsealed buffer is refused by the client with
    ValidationError, and the client's connection keeps working."""
    d = tempfile.mkdtemp(prefix="xr", dir="/tmp")
    try:
        server = xrpc.Server()
        server.export(Maker, HostileMaker())
        with anyio.fail_after(40):
            async with server.listen(f"unix://{d}/s.sock") as listener:
                result = await anyio.run_process(
                    [sys.executable, "-c", CHILD_MAIN, str(Path(__file__).parent), "shm_client", listener.url, "{}", f"{d}/client.log"],
                    check=False,
                )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out = result.stdout.decode()
    rc = result.returncode
    status = f"dead by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    assert rc == 0, f"the client process: {status}; it printed {out!r} {result.stderr.decode()[-2000:]}"
    assert out.startswith("REFUSED") and "seal" in out.splitlines()[0], out
    assert "ALIVE 3" in out, out


def test_shared_buffers_are_sealed_against_resizing() -> None:
    with xrpc.SharedBuffer.create(4096) as buf:
        seals = fcntl.fcntl(buf.fileno(), fcntl.F_GET_SEALS)
        assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        assert not seals & fcntl.F_SEAL_WRITE  # both sides still write into it
        for size in (0, 8192):
            with pytest.raises(PermissionError):
                os.ftruncate(buf.fileno(), size)
        buf.buffer[0] = 1
        assert buf.buffer[0] == 1
