"""Hostile-peer review: attacks from outside, against a server in a child process.

Every test talks to a real server process over a real Unix socket, most of them with hand-made
frames (4-byte big-endian length, then a msgpack array whose first element is the tag; see
docs/wire.md).  Tests marked ``FAILS TODAY`` reproduce a problem and assert the behaviour the
documentation promises; the others are guards for guarantees that held under attack.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from typing import Any, Iterator

import msgspec
import pytest

import _wire
from _procs import ChildProcess, fd_count, status
from _timeouts import T

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux-only: memfd, SO_PEERCRED, /proc")

SERVER = textwrap.dedent(
    '''
    import asyncio, logging, os, sys
    from typing import Any, AsyncIterator, Protocol
    import anyio, xrpc

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")

    @xrpc.interface(name="Secret")
    class Secret(Protocol):
        async def read(self) -> str: ...

    @xrpc.interface(name="Relay")
    class Relay(Protocol):
        async def peek(self, s: Secret) -> str: ...
        async def ping(self) -> int: ...
        def numbers(self, n: int, size: int) -> AsyncIterator[bytes]: ...
        async def echo(self, x: Any) -> Any: ...
        async def shm(self, b: xrpc.SharedBuffer) -> int: ...
        async def take(self, xs: AsyncIterator[bytes]) -> int: ...
        async def slow(self) -> int: ...

    class SecretImpl:
        async def read(self) -> str:
            await asyncio.sleep(0)
            return "TOP-SECRET"

    class RelayImpl:
        async def peek(self, s):
            # a method that uses a capability the caller hands it
            return await s.read()
        async def ping(self):
            return 1
        async def numbers(self, n, size):
            for i in range(n):
                yield b"x" * size
        async def echo(self, x):
            return x
        async def shm(self, b):
            with b:
                return b.size
        async def slow(self):
            await anyio.sleep(60)  # e.g. waiting for a database
            return 0
        async def take(self, xs):
            n = 0
            async for x in xs:
                n += 1
            return n

    async def main():
        path = sys.argv[1]
        async def on_connect(conn):
            await anyio.sleep(float(os.environ.get("SRV_SLOW_CONNECT") or 0))
        limits = xrpc.Limits(window_bytes=int(os.environ.get("SRV_WINDOW_BYTES") or 4 << 20), max_buffered=1 << 31)
        srv = xrpc.Server(on_connect=on_connect, requirement=os.environ.get("SRV_REQ") or None, limits=limits)
        # only uid 4242 may read the secret
        srv.export(Secret, SecretImpl(), "secret", requirement="uid == 4242")
        srv.export(Relay, RelayImpl(), "relay")
        url = os.environ.get("SRV_URL") or "unix://" + path
        async with srv.listen(url, socket_mode=0o666) as listener:
            print("READY", listener.url, flush=True)
            await anyio.sleep_forever()

    anyio.run(main, backend=os.environ.get("SRV_BACKEND") or "asyncio")
    '''
)


# --------------------------------------------------------------------------- raw peer helpers
def frame(*fields: Any) -> bytes:
    """A frame of the message with these fields."""
    return _wire.frame(list(fields))


class RawPeer:
    """A hand-written client: sends frames, reads frames, nothing else."""

    def __init__(self, path: str, *, hello: bool = True, window: int = 64, window_bytes: int = 4 << 20, timeout: float = 10) -> None:
        if path.startswith("tcp://"):
            host, port = path[6:].rsplit(":", 1)
            self.s = socket.create_connection((host, int(port)), timeout=timeout)
        else:
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.s.settimeout(timeout)
            self.s.connect(path)
        self.buf = b""
        self.welcome: Any = None
        if hello:
            self.s.sendall(frame(0, 1, 16 << 20, [], window, window_bytes))
            self.welcome = self.recv()
            assert self.welcome[0] == 1, self.welcome

    def send(self, *fields: Any) -> None:
        self.s.sendall(frame(*fields))

    def recv(self) -> Any:
        while len(self.buf) < 4:
            d = self.s.recv(1 << 16)
            if not d:
                raise EOFError("the server closed the connection")
            self.buf += d
        n = struct.unpack(">I", self.buf[:4])[0]
        while len(self.buf) < 4 + n:
            d = self.s.recv(1 << 20)
            if not d:
                raise EOFError("the server closed the connection")
            self.buf += d
        body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
        return msgspec.msgpack.decode(body)

    def call(self, cid: int, obj: str, method: str, args: list[Any], flags: int = 0, *extra: Any) -> Any:
        self.send(2, cid, obj, method, args, flags, *extra)
        return self.recv()

    def close(self) -> None:
        self.s.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def rss_mib(pid: int) -> int:
    return status(pid)["VmRSS"] >> 20


def max_rss_over(pid: int, seconds: float) -> int:
    """The largest RSS seen while polling for ``seconds`` (an observation window, not a wait)."""
    end = time.monotonic() + seconds
    peak = rss_mib(pid)
    while time.monotonic() < end:
        peak = max(peak, rss_mib(pid))
        time.sleep(0.05)
    return peak


class Server(ChildProcess):
    """The server above in a child process (``env`` set for it), logging to its stderr."""

    def __init__(self, env: dict[str, str] | None) -> None:
        super().__init__(what="the hostile-review server", log=False, strict=False)
        self.start_script(SERVER, self.path, env=env)
        # what RawPeer connects to: a Unix socket path, or tcp://host:port
        self.path = self.url[len("unix://") :] if self.url.startswith("unix://") else self.url

    def stderr_after_stop(self) -> str:
        return "\n".join(self.stop(kill=True))

    def neighbour_ping(self) -> Any:
        """A well-behaved neighbour's round trip (a refusing server answers HELLO with GOODBYE)."""
        with RawPeer(self.path, hello=False) as p:
            p.send(0, 1, 16 << 20, [], 64, 4 << 20)
            first = p.recv()
            if first[0] == 10:
                return first
            return p.call(1, "relay", "ping", [])


@contextlib.contextmanager
def server(env: dict[str, str] | None = None) -> Iterator[Server]:
    srv = Server(env)
    try:
        yield srv
    finally:
        srv.stop(kill=True)


def relay_client(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a client program in a child process with ``args``; its output.  ``code`` goes on from
    the body of ``class Relay(Protocol)`` (the methods it uses), after ``os``, ``signal``, ``sys``,
    ``anyio`` and ``xrpc`` are imported."""
    header = "import os, signal, sys, anyio, xrpc\nfrom typing import AsyncIterator, Protocol\n@xrpc.interface(name='Relay')\nclass Relay(Protocol):\n"
    return subprocess.run([sys.executable, "-c", header + textwrap.dedent(code), *args], capture_output=True, text=True, timeout=6 * T)


def send_with_fd(peer: RawPeer, data: bytes, fd: int) -> None:
    peer.s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


# =========================================================================== findings (FAIL TODAY)
@pytest.mark.timeout(60)
def test_home_reference_cannot_name_a_guarded_export() -> None:
    """FAILS TODAY.  A Ref with home=true names an object "this side exported earlier"; the server
    resolves it with the same lookup as call targets, so it accepts the *name of a named export*,
    including one whose requirement this peer fails.  The server then hands its own guarded object
    to the method, which uses it locally: the requirement is bypassed (confused deputy)."""
    with server() as srv:
        with RawPeer(srv.path) as p:
            home_reference_attack(srv, p)


def home_reference_attack(srv: Server, p: RawPeer) -> None:
    if True:
        # the peer may not call the secret itself ...
        direct = p.call(1, "secret", "read", [])
        assert direct[0] == 4 and direct[2] == 6, direct  # ERROR, PEER_REJECTED
        # ... and must not get it read by passing it back as "its own" reference
        answer = p.call(3, "relay", "peek", [[True, "secret", "Secret"]])
        assert answer[0] == 4, f"a forged home reference to a guarded export was accepted: {answer!r}"
        assert answer[2] in (3, 5, 6), answer  # refused as invalid / unknown / rejected
        assert srv.neighbour_ping()[0] == 3


@pytest.mark.timeout(60)
def test_unadmitted_peer_cannot_make_server_buffer_a_huge_hello() -> None:
    """FAILS TODAY.  Before HELLO (so before the server's requirement is checked) a frame is
    buffered in full, whatever its size up to max_frame, outside the memory budget: a peer the
    server will refuse makes it hold ~15 MiB per connection (measured: 12 connections -> +180 MiB),
    against the documented ~22 KiB per connection that has not finished its HELLO."""
    with server({"SRV_REQ": "uid == 4242"}) as srv:  # this test runs as a uid the server refuses
        base = rss_mib(srv.pid)
        socks = []
        chunk = b"\0" * (1 << 20)
        try:
            for _ in range(8):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(T)
                s.connect(srv.path)
                socks.append(s)
                try:
                    s.sendall(struct.pack(">I", (16 << 20) - 1))
                    for _ in range(15):
                        s.sendall(chunk)  # returns once the server has read (nearly) all of it
                except (socket.timeout, OSError):
                    pass  # the server stopped reading: what we want
            grown = max_rss_over(srv.pid, 0.5) - base
            assert grown < 40, f"8 unauthenticated connections made the server hold {grown} MiB"
        finally:
            for s in socks:
                s.close()
        assert srv.neighbour_ping()[0] == 10  # refused by requirement: the server still answers


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "backend,url",
    [
        ("asyncio", ""),
        ("asyncio", "tcp://127.0.0.1:0"),
        ("trio", ""),  # holds (about 35 MiB)
    ],
)
def test_non_reading_peer_with_many_server_streams_keeps_server_memory_bounded(backend: str, url: str) -> None:
    """FAILS TODAY on asyncio (Unix and TCP); holds on trio.  Outgoing data should be bounded by back-pressure (write_buffer_high, 1 MiB).
    But each server-stream producer sends one batch before looking at the write buffer, so N
    streams opened in one read buffer about N batches (2 MiB each with the default window) for a
    peer that never reads: 400 streams -> about 1.5 GiB RSS, held as long as the peer stays."""
    with server({"SRV_BACKEND": backend, "SRV_URL": url}) as srv:
        with RawPeer(srv.path) as p:
            non_reading_streams(srv, p)


def non_reading_streams(srv: Server, p: RawPeer) -> None:
    if True:
        p.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        base = rss_mib(srv.pid)
        # 200 server streams of 64 KiB items, in one write (one read on the server); never read
        p.s.sendall(b"".join(frame(2, 1 + 2 * i, "relay", "numbers", [1000, 64 << 10], 4) for i in range(200)))
        assert srv.neighbour_ping()[0] == 3
        grown = max_rss_over(srv.pid, 2.0) - base
        assert grown < 128, f"a peer that never reads made the server hold {grown} MiB"


@pytest.mark.timeout(60)
def test_calls_in_flight_do_not_pin_their_frames_beyond_the_memory_budget() -> None:
    """Failed before the fix: a CALL frame stayed referenced (its payload is a ``msgspec.Raw`` view
    of the frame's buffer, and decoded arguments live as long as the call) for as long as the
    method ran, and none of it was drawn from ``Limits.max_buffered``.  So 20 calls to a method that
    takes no argument at all, each padded with a 15 MiB extra trailing element (then accepted
    silently), made the server hold about 300 MiB while the method awaited; max_calls_in_flight
    (4096) times max_frame (16 MiB) bounded this at 64 GiB per connection, not 32 MiB.  Now extra
    arguments are refused (ValidationError) and calls in flight draw from the budget."""
    with server() as srv, RawPeer(srv.path) as p:
        base = rss_mib(srv.pid)
        blob = b"x" * (15 << 20)
        p.s.settimeout(2 * T)
        try:
            for i in range(20):
                p.send(2, 1 + 2 * i, "relay", "slow", [blob])
        except (socket.timeout, BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading or closed this connection: fine
        neighbour = srv.neighbour_ping()
        assert neighbour[0] == 3, neighbour
        grown = max_rss_over(srv.pid, 0.5) - base
        assert grown < 96, f"calls in flight made the server hold {grown} MiB (budget: 32 MiB)"


@pytest.mark.timeout(90)
def test_large_window_bytes_does_not_break_server_streams() -> None:
    """FAILS TODAY.  The server batches stream items up to ``peer_window_bytes / (2 * item size)``
    (at most 256) into ONE frame, without looking at the peer's max_frame.  A client that grants a
    large byte window (Limits(window_bytes=1 GiB), a legal setting) gets LimitExceeded ("a frame of
    268436745 bytes exceeds the peer's limit") instead of its items, and the server builds a 256 MiB
    frame first; a hostile peer opening such streams makes it do so over and over (CPU and memory
    amplification that starved other connections past their 10 s handshake in a run)."""
    with server() as srv:
        out = relay_client(
            """
                def numbers(self, n: int, size: int) -> AsyncIterator[bytes]: ...
            async def main():
                limits = xrpc.Limits(window_bytes=1 << 30)
                async with xrpc.connect("unix://" + sys.argv[1], limits=limits, timeout=20) as c:
                    n = 0
                    try:
                        async for x in c.proxy(Relay, "relay").numbers(40, 1 << 20):
                            n += 1
                        print("OK", n)
                    except Exception as e:
                        print("FAILED", n, type(e).__name__, e)
            anyio.run(main)
            """,
            srv.path,
        )
        assert out.stdout.strip() == "OK 40", out.stdout + out.stderr[-2000:]


@pytest.mark.timeout(90)
def test_large_server_window_bytes_does_not_break_client_streams() -> None:
    """FAILS TODAY.  The mirror image, on the client: a server that grants a large byte window
    (Limits(window_bytes=1 GiB)) makes every client stream of 1 MiB items fail with LimitExceeded
    ("a frame of 41943247 bytes exceeds the peer's limit of 16777216 bytes"), after the client
    built a 40 MiB frame.  A hostile server can use this to make clients build frames of up to
    256 items each."""
    with server({"SRV_WINDOW_BYTES": str(1 << 30)}) as srv:
        out = relay_client(
            """
                async def take(self, xs: AsyncIterator[bytes]) -> int: ...
            async def gen():
                for i in range(40):
                    yield b"x" * (1 << 20)
            async def main():
                async with xrpc.connect("unix://" + sys.argv[1], timeout=20) as c:
                    try:
                        print("OK", await c.proxy(Relay, "relay").take(gen()))
                    except Exception as e:
                        print("FAILED", type(e).__name__, e)
            anyio.run(main)
            """,
            srv.path,
        )
        assert out.stdout.strip() == "OK 40", out.stdout + out.stderr[-2000:]


@pytest.mark.timeout(60)
def test_refused_write_sealed_shared_buffer_prints_no_traceback() -> None:
    """FAILS TODAY.  A memfd sealed with F_SEAL_WRITE (or a read-only descriptor of a memfd) passes
    the seal/size checks, then ``mmap`` fails inside ``SharedBuffer.__init__``.  The call is refused
    with ValidationError as it should be, but the half-built SharedBuffer's ``__del__`` raises
    AttributeError ('no attribute buffer'), printed as "Exception ignored ... Traceback" on the
    server's stderr for every such message a peer sends.  (Its close() would also close a
    descriptor number that ``_from_wire`` already closed, if it got that far.)"""
    with server() as srv:
        fd = os.memfd_create("xh", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, 4096)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            with RawPeer(srv.path) as p:
                send_with_fd(p, frame(2, 1, "relay", "shm", [[1, 4096]], 0), fd)
                answer = p.recv()
            assert answer[0] == 4 and answer[2] == 3, answer  # ValidationError: this part holds
        finally:
            os.close(fd)
        assert srv.neighbour_ping()[0] == 3
        err = srv.stderr_after_stop()
        assert "Traceback" not in err, err[-2000:]


# =========================================================================== guards (hold today)
@pytest.mark.timeout(60)
def test_guard_extension_nan_deadline_and_unsealed_buffer_are_typed_errors() -> None:
    with server() as srv, RawPeer(srv.path) as p:
        a = p.call(1, "relay", "echo", [msgspec.msgpack.Ext(5, b"abc")])
        assert a[0] == 4 and a[2] == 3, a
        a = p.call(3, "relay", "ping", [], 0, float("nan"))
        assert a[0] == 4 and a[2] == 3, a
        a = p.call(5, "relay", "ping", [], 0, -1.0)
        assert a[0] == 4 and a[2] == 7, a
        # RELEASE of an unknown reference or with a huge count, CANCEL of a finished call: ignored
        # (a RELEASE of fewer than one reference is a protocol error: tests/test_core.py)
        p.send(9, "#1", 5)
        p.send(9, "relay", 2**63)
        p.send(8, 5)
        assert p.call(7, "relay", "ping", []) == [3, 7, 1]
        fd = os.memfd_create("xh", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, 4096)
            send_with_fd(p, frame(2, 9, "relay", "shm", [[1, 4096]], 0), fd)
            a = p.recv()
            assert a[0] == 4 and a[2] == 3 and "sealed" in a[4], a
        finally:
            os.close(fd)
        # a negative CREDIT is a protocol error: GOODBYE, then the connection ends
        p.send(2, 11, "relay", "numbers", [3, 10], 4)
        p.send(7, 11, -1, 0)
        frames = []
        with pytest.raises(EOFError):
            while True:
                frames.append(p.recv())
        assert frames and frames[-1][0] == 10, frames
        assert srv.neighbour_ping()[0] == 3
        assert "Traceback" not in srv.stderr_after_stop()


@pytest.mark.timeout(60)
def test_guard_descriptors_before_admission_end_the_connection() -> None:
    with server({"SRV_REQ": "uid == 4242"}) as srv:
        base = fd_count(srv.pid)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(T)
        s.connect(srv.path)
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(32)]
        try:
            s.sendmsg([frame(0, 1, 16 << 20, [], 64, 4 << 20)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            data = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                data += d
        finally:
            for fd in fds:
                os.close(fd)
            s.close()
        assert msgspec.msgpack.decode(data[4:])[0] == 10, data  # GOODBYE
        assert srv.neighbour_ping()[0] == 10  # refused by requirement: the server still answers
        deadline = time.monotonic() + T
        while fd_count(srv.pid) > base and time.monotonic() < deadline:
            time.sleep(0.02)  # polling for the server to finish closing the refused connections
        assert fd_count(srv.pid) <= base


@pytest.mark.timeout(60)
def test_guard_peer_killed_mid_stream_is_connection_interrupted(tmp_path: Any) -> None:
    """A server killed with SIGKILL while a client is inside a stream: exactly ConnectionInterrupted."""
    with server() as srv:
        out = relay_client(
            """
                def numbers(self, n: int, size: int) -> AsyncIterator[bytes]: ...
            async def main():
                async with xrpc.connect("unix://" + sys.argv[1], timeout=10) as c:
                    try:
                        async for x in c.proxy(Relay, "relay").numbers(10**9, 10):
                            os.kill(int(sys.argv[2]), signal.SIGKILL)
                    except BaseException as e:
                        print(type(e).__module__, type(e).__name__)
            anyio.run(main)
            """,
            srv.path, str(srv.pid),
        )
        assert out.stdout.strip() == "xrpc._errors ConnectionInterrupted", out.stdout + out.stderr[-2000:]


def _throwaway_uid(name: str) -> int:
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True, capture_output=True)
        return pwd.getpwnam(name).pw_uid


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to act as two users")
@pytest.mark.parametrize("plant", ["directory", "symlink"])
def test_guard_planted_tmp_runtime_dir_is_refused(plant: str) -> None:
    """A hostile local user plants /tmp/xrpc-<victim uid> (a directory holding a description whose
    command would run as the victim, or a symbolic link): connect_service refuses it (UntrustedPath)
    and runs nothing."""
    attacker = _throwaway_uid("xrpcattacker")
    victim = _throwaway_uid("xrpcvictim")
    runtime = f"/tmp/xrpc-{victim}"
    other = f"/tmp/xrpc-planted-{victim}"
    pwned = f"/tmp/xrpc-pwned-{victim}"

    def as_user(uid: int, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
            capture_output=True, text=True, timeout=4 * T, cwd="/tmp", **kw,
        )

    probe = as_user(victim, sys.executable, "-c", "import xrpc")
    if probe.returncode != 0:
        pytest.skip(f"this interpreter cannot run as another user here: {probe.stderr.strip()[-200:]}")
    for p in (runtime, other, pwned):
        subprocess.run(["rm", "-rf", p], check=True)
    try:
        target = runtime if plant == "directory" else other
        as_user(attacker, "mkdir", "-p", f"{target}/services")
        as_user(attacker, "chmod", "-R", "0755", target)
        desc = f'name = "evil"\ncommand = ["/bin/sh", "-c", "touch {pwned}"]\nreadiness = "socket"\n'
        as_user(attacker, "sh", "-c", f"cat > {target}/services/evil.toml", input=desc)
        if plant == "symlink":
            as_user(attacker, "ln", "-s", other, runtime)
        code = textwrap.dedent(
            """
            import anyio, xrpc
            async def main():
                try:
                    async with xrpc.connect_service("evil", timeout=5) as sc:
                        await sc.connect()
                        print("CONNECTED")
                except Exception as e:
                    print("REFUSED", type(e).__name__)
            anyio.run(main)
            """
        )
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "XRPC_RUNTIME_DIR", "XRPC_SERVICE_PATH")}
        out = as_user(victim, sys.executable, "-c", code, env=env)
        assert out.stdout.strip() == "REFUSED UntrustedPath", out.stdout + out.stderr[-2000:]
        assert not os.path.exists(pwned)
    finally:
        for p in (runtime, other, pwned):
            subprocess.run(["rm", "-rf", p], check=True)
