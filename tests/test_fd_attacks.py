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
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any, Iterator, Protocol

import anyio
import pytest

import xrpc
from xrpc._protocol import ErrorCode, Ping

import _wire
from _procs import TESTS_DIR, ChildProcess, child_main, errors_in, log_to, serve_until_stdin_closes, short_dir
from _wire import GOODBYE_TAG, HELLO, PONG_TAG, WELCOME_TAG, frame
from _timeouts import T



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
    log_to(log_path)
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
            await serve_until_stdin_closes(listener.url)

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


class Child(ChildProcess):
    """A server in a child process on a Unix socket, logging to a file."""

    def __init__(self, role: str, **options: Any) -> None:
        super().__init__(name="child", what="the child", strict=False)
        self.start("test_fd_attacks", role, self.path, json.dumps(options), self.log_path, entry="_child")

    def status(self) -> str:
        rc = self.proc.poll()
        if rc is None:
            return "alive"
        return f"dead by {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}"


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
        lines = c.stop()
        text = "\n".join(lines)
        assert status == "alive", f"the child process is {status}:\n{text[-2000:]}"
        errors = errors_in(lines)
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
    with anyio.fail_after(3 * T):
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
                with anyio.fail_after(T):
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
    d = short_dir()
    try:
        server = xrpc.Server()
        server.export(Maker, HostileMaker())
        with anyio.fail_after(4 * T):
            async with server.listen(f"unix://{d}/s.sock") as listener:
                result = await anyio.run_process(
                    [sys.executable, "-c", child_main("test_fd_attacks", "_child"), TESTS_DIR, "shm_client", listener.url, "{}", f"{d}/client.log"],
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


def _write_sealed_or_read_only(kind: str, size: int, sealed: xrpc.SharedBuffer) -> int:
    """A descriptor that passes the resizing seals but cannot be mapped writable."""
    if kind == "read-only":
        return os.open(f"/proc/self/fd/{sealed.fileno()}", os.O_RDONLY | os.O_CLOEXEC)
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    extra = fcntl.F_SEAL_WRITE if kind == "F_SEAL_WRITE" else 0x10  # F_SEAL_FUTURE_WRITE
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL | extra)
    except OSError:
        os.close(fd)
        pytest.skip(f"this kernel has no {kind}")
    return fd


WRITE_REFUSALS = [("F_SEAL_WRITE", "sealed against writing"), ("F_SEAL_FUTURE_WRITE", "sealed against writing"), ("read-only", "not open for reading and writing")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,why", WRITE_REFUSALS)
async def test_a_shared_buffer_that_cannot_be_mapped_writable_is_refused(child: Any, monkeypatch: pytest.MonkeyPatch, kind: str, why: str) -> None:
    """A memfd sealed against writing, or a read-only descriptor of a sealed memfd, passes the
    resizing seals but cannot be mapped writable: the server refuses it with ValidationError before
    mapping (no traceback on its stderr, no descriptor kept or closed twice), and goes on."""
    victim = child("shm_server")
    size = 1 << 16
    with anyio.fail_after(3 * T), xrpc.SharedBuffer.create(size) as good:
        async with xrpc.connect(victim.url, timeout=T) as conn:
            shm = conn.proxy(Shm)
            assert await shm.add(1, 2) == 3
            fds = victim.fds()
            evil = _write_sealed_or_read_only(kind, size, good)
            try:
                with monkeypatch.context() as m:
                    m.setattr(xrpc.SharedBuffer, "_sealed_fd", lambda self: evil)  # sent as it is
                    for _ in range(3):
                        with pytest.raises(xrpc.ValidationError, match=why):
                            await shm.hold(good)
            finally:
                os.close(evil)
            assert victim.fds() == fds
            assert await shm.hold(good) == size  # the same connection lives on
    # the child fixture checks that the server's stderr and log hold no traceback


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,why", WRITE_REFUSALS)
async def test_a_hostile_server_cannot_reply_with_a_buffer_that_cannot_be_mapped_writable(
    monkeypatch: pytest.MonkeyPatch, kind: str, why: str
) -> None:
    """The other direction: the client refuses such a reply with ValidationError and goes on."""
    size = 1 << 16
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    d = short_dir()
    try:
        with xrpc.SharedBuffer.create(size) as good:
            evil = _write_sealed_or_read_only(kind, size, good)

            class Maker_:
                async def make(self, size: int) -> xrpc.SharedBuffer:
                    return good

                async def shrink(self) -> None: ...

                async def add(self, a: int, b: int) -> int:
                    return a + b

            server = xrpc.Server()
            server.export(Maker, Maker_())
            monkeypatch.setattr(xrpc.SharedBuffer, "_sealed_fd", lambda self: evil)  # sent as it is
            try:
                with anyio.fail_after(3 * T):
                    async with server.listen(f"unix://{d}/s.sock") as listener, xrpc.connect(listener.url, timeout=T) as conn:
                        maker = conn.proxy(Maker)
                        before = len(os.listdir("/proc/self/fd"))
                        with pytest.raises(xrpc.ValidationError, match=why):
                            await maker.make(size)
                        assert len(os.listdir("/proc/self/fd")) == before
                        assert await maker.add(1, 2) == 3
            finally:
                os.close(evil)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert unraisable == []


@pytest.mark.parametrize("kind,why", WRITE_REFUSALS)
def test_a_shared_buffer_that_cannot_be_mapped_leaves_its_descriptor_alone(monkeypatch: pytest.MonkeyPatch, kind: str, why: str) -> None:
    """Received, it is refused with a clear reason before mapping; built directly over it, the
    mapping fails and the half-built buffer neither complains when collected nor closes the
    descriptor, which still belongs to the caller."""
    import gc

    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    size = 4096
    with xrpc.SharedBuffer.create(size) as good:
        fd = _write_sealed_or_read_only(kind, size, good)
        try:
            with pytest.raises(ValueError, match=why):
                xrpc.SharedBuffer._receive(fd, size)
            with pytest.raises(OSError):
                xrpc.SharedBuffer(fd, size)
            gc.collect()
            os.fstat(fd)  # still open: nobody closed it behind the caller's back
        finally:
            os.close(fd)
    assert unraisable == []


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


# --------------------------------------------------------------------------- raw sockets
def decode_frames(data: bytes) -> list[Any]:
    """The frames at the start of ``data``, up to an empty one."""
    return _wire.decode_frames(data, stop_at_empty=True)


def raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    return s


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> bool:
    """Send ``data`` with ``fds`` attached; False once the server has closed the connection."""
    try:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


async def read_until(sock: socket.socket, done: Any, timeout: float) -> tuple[bytes, bool]:
    """Read until ``done(received)`` or the end of the connection; (what came, ended)."""
    received = bytearray()
    with anyio.move_on_after(timeout):
        while not done(bytes(received)):
            await anyio.wait_readable(sock)
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return bytes(received), True
            if not chunk:
                return bytes(received), True
            received += chunk
    return bytes(received), False


async def admitted(path: str) -> socket.socket:
    """A raw connection that has sent HELLO and received WELCOME."""
    s = raw_connect(path)
    s.send(HELLO)
    data, ended = await read_until(s, lambda d: any(f[0] == WELCOME_TAG for f in decode_frames(d)), T)
    assert not ended and any(f[0] == WELCOME_TAG for f in decode_frames(data)), data
    return s


async def legit_call(url: str, timeout: float = T) -> str:
    """Connect, call, and pass a descriptor; "ok" or what went wrong."""
    try:
        with anyio.fail_after(timeout + 2):
            async with xrpc.connect(url, timeout=timeout) as conn:
                calc = conn.proxy(Calc)
                assert await calc.add(20, 22) == 42
                with tempfile.TemporaryFile() as f:
                    f.write(b"x" * 123)
                    f.flush()
                    assert await calc.size(xrpc.FileDescriptor(f)) == 123
        return "ok"
    except Exception as exc:
        return repr(exc)


async def wait_fds_at_most(victim: Child, bound: int, timeout: float = T) -> int:
    """Poll the victim's descriptor count until it is at most ``bound`` (or the deadline passes)."""
    deadline = time.monotonic() + timeout
    n = victim.fds()
    while n > bound and time.monotonic() < deadline:
        await anyio.sleep(0.02)
        n = victim.fds()
    return n


# --------------------------------------------------------------------------- descriptor floods
@pytest.mark.timeout(90)
async def test_descriptors_before_the_handshake_are_refused(child: Any) -> None:
    """Eight connections each attach 240 descriptors to the bytes of their HELLO: the server used to
    park them all and run out of descriptors (RLIMIT_NOFILE 256), so a good client could not
    connect.  Now the descriptors are closed at once and those connections ended."""
    victim = child("fd_server", nofile=256)
    baseline = victim.fds()
    attackers: list[socket.socket] = []
    with open(os.devnull, "rb") as junk:
        with anyio.fail_after(6 * T):
            for _ in range(8):
                s = raw_connect(victim.path)
                attackers.append(s)
                for i in range(4):
                    if not send_fds(s, HELLO[i : i + 1], [junk.fileno()] * 60):
                        break
            try:
                legit = await legit_call(victim.url, timeout=5)
                peak = victim.fds()
                ends = []
                for s in attackers:
                    data, ended = await read_until(s, lambda d: False, 5)
                    ends.append((ended, [f for f in decode_frames(data) if f[0] == GOODBYE_TAG]))
            finally:
                for s in attackers:
                    s.close()
            after = await wait_fds_at_most(victim, baseline)
    print(f"\nFDS before HELLO: 8 x 240 sent; server fds {baseline} before, {peak} during, {after} after")
    assert legit == "ok", f"a good client could not call: {legit}; server fds {peak} (baseline {baseline})"
    assert peak <= baseline + 16
    assert all(ended for ended, _ in ends), ends
    assert all(goodbyes and goodbyes[0][2] == ErrorCode.VALIDATION and "descriptor" in goodbyes[0][1] for _, goodbyes in ends), ends
    assert after == baseline
    assert "descriptors before" in victim.output()


@pytest.mark.timeout(90)
async def test_descriptors_held_are_capped_per_connection_and_per_process(child: Any) -> None:
    """Admitted peers attach descriptors to PINGs (nothing claims them).  One connection may hold at
    most ``Limits.max_fds`` (64), the process at most half its RLIMIT_NOFILE (128 of 256); a
    connection that goes over gets GOODBYE (LIMIT) and is ended, and a good client keeps working."""
    victim = child("fd_server", nofile=256)
    baseline = victim.fds()
    with open(os.devnull, "rb") as junk, anyio.fail_after(6 * T):
        # one connection over its own cap: 4 x 30 > 64
        s = await admitted(victim.path)
        try:
            for nonce in range(1, 5):
                if not send_fds(s, frame(Ping(nonce)), [junk.fileno()] * 30):
                    break
            data, ended = await read_until(s, lambda d: False, T)
        finally:
            s.close()
        goodbyes = [f for f in decode_frames(data) if f[0] == GOODBYE_TAG]
        assert ended and goodbyes and goodbyes[0][2] == ErrorCode.LIMIT and "max_fds" in goodbyes[0][1], (ended, decode_frames(data))
        assert await wait_fds_at_most(victim, baseline) == baseline

        # six connections under their own cap, over the process's: 6 x 50 > 128
        conns = [await admitted(victim.path) for _ in range(6)]
        try:
            outcomes = []
            for i, c in enumerate(conns):
                sent = send_fds(c, frame(Ping(100 + i)), [junk.fileno()] * 50)
                data, ended = await read_until(c, lambda d, i=i: any(f[0] == PONG_TAG and f[1] == 100 + i for f in decode_frames(d)), T)
                outcomes.append("ended" if ended or not sent else "kept")
            during = victim.fds()
            legit = await legit_call(victim.url)
        finally:
            for c in conns:
                c.close()
        after = await wait_fds_at_most(victim, baseline)
    print(f"\nFDS held: 6 x 50 sent after HELLO; outcomes {outcomes}; server fds {baseline} before, {during} during, {after} after")
    assert outcomes[:2] == ["kept", "kept"] and outcomes[2:] == ["ended"] * 4, outcomes
    assert during <= baseline + 128 + 6
    assert legit == "ok", legit
    assert after == baseline


@pytest.mark.timeout(120)
async def test_server_out_of_descriptors_keeps_serving_and_recovers(child: Any) -> None:
    """Plain connections (no HELLO) drive a server with RLIMIT_NOFILE 64 to EMFILE on accept: its
    open connection keeps working, a new client is refused at once (not left hanging), one warning
    is logged, and once the attackers leave new clients are accepted again."""
    victim = child("fd_server", nofile=64, limits={"handshake_timeout": 60.0})
    with anyio.fail_after(10 * T):
        async with xrpc.connect(victim.url, timeout=T) as conn:
            calc = conn.proxy(Calc)
            assert await calc.add(1, 1) == 2
            attackers = []
            try:
                for _ in range(80):
                    attackers.append(raw_connect(victim.path))
                # the server has accepted all it can: it is at its limit
                deadline = time.monotonic() + T
                while victim.fds() < 60 and time.monotonic() < deadline:
                    await anyio.sleep(0.02)
                assert await calc.add(2, 2) == 4  # the open connection keeps working
                start = time.monotonic()
                refused = await legit_call(victim.url, timeout=5)
                waited = time.monotonic() - start
                assert await calc.add(3, 3) == 6
            finally:
                for s in attackers:
                    s.close()
            # the attackers left: new clients are accepted again (polled with a deadline)
            deadline = time.monotonic() + 3 * T
            again = await legit_call(victim.url, timeout=5)
            while again != "ok" and time.monotonic() < deadline:
                await anyio.sleep(0.05)
                again = await legit_call(victim.url, timeout=5)
            assert await calc.add(4, 4) == 8
    warnings = [line for line in victim.output().splitlines() if "descriptor limit" in line and line.startswith("WARNING")]
    print(f"\nEMFILE: new client refused after {waited:.2f}s with {refused}; warnings logged {len(warnings)}")
    assert "TransportError" in refused and "descriptor" in refused, refused
    assert again == "ok", again
    assert 1 <= len(warnings) <= 3, warnings


@xrpc.interface
class Many(Protocol):
    async def count(self, fds: list[xrpc.FileDescriptor]) -> int: ...


class ManyImpl:
    async def count(self, fds: list[xrpc.FileDescriptor]) -> int:
        for fd in fds:
            fd.close()
        return len(fds)


@pytest.mark.timeout(60)
async def test_more_descriptors_than_one_read_takes_travel_in_pieces() -> None:
    """A value with more descriptors than the receiver reads at once (64) goes out 64 at a time, so
    the kernel never truncates them; the receiver's max_fds is what bounds such a value."""
    d = short_dir()
    try:
        server = xrpc.Server(limits=xrpc.Limits(max_fds=256))
        server.export(Many, ManyImpl())
        with anyio.fail_after(3 * T), open(os.devnull, "rb") as f:
            async with server.listen(f"unix://{d}/s.sock") as listener, xrpc.connect(listener.url, timeout=T) as conn:
                many = conn.proxy(Many)
                assert await many.count([xrpc.FileDescriptor(f)] * 200) == 200
                assert await many.count([xrpc.FileDescriptor(f)] * 3) == 3
    finally:
        shutil.rmtree(d, ignore_errors=True)
