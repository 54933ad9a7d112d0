"""Third hostile review: the restructured I/O drivers (``xrpc/_io.py``) under attack.

Each test runs a server in a child process (asyncio or trio; unix://, tcp:// or tls://) and attacks
it with raw frames from plain sockets: a peer that never reads, a slow reader, a peer that vanishes
mid-write, a peer cut off for exceeding its memory budget, descriptors on Unix sockets.  It checks
what docs/security.md promises: bounded server memory (peak RSS growth), a GOODBYE that says why,
other connections unaffected, nothing logged at ERROR, descriptors given back.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import msgspec
import pytest

import _wire
from _procs import child_env

pytestmark = pytest.mark.timeout(120)

SERVER = r'''
import logging, os, sys
from typing import AsyncIterator, Protocol
import anyio, xrpc

@xrpc.interface
class Svc(Protocol):
    async def echo(self, x: int) -> int: ...
    async def big(self, n: int) -> bytes: ...
    async def big_now(self, n: int) -> bytes: ...
    def ticks(self, n: int, size: int) -> AsyncIterator[bytes]: ...
    async def shm(self) -> xrpc.SharedBuffer: ...
    @xrpc.oneway
    async def sink(self, data: bytes) -> None: ...
    async def sunk(self) -> int: ...

class Impl:
    def __init__(self):
        self.got = 0
        self.buf = None
    async def echo(self, x):
        return x
    async def big(self, n):
        await anyio.sleep(0)
        return b"x" * n
    async def big_now(self, n):
        return b"x" * n
    async def ticks(self, n, size):
        for i in range(n):
            yield b"t" * size
    async def shm(self):
        await anyio.sleep(0)
        if self.buf is None:
            self.buf = xrpc.SharedBuffer.create(4096)
        return self.buf
    async def sink(self, data):
        self.got += len(data)
    async def sunk(self):
        return self.got

async def main(url, backend):
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    limits = xrpc.Limits(**{k: float(v) if "." in v else int(v) for k, v in
                            (kv.split("=") for kv in os.environ.get("XRPC_TEST_LIMITS", "").split(",") if kv)})
    server = xrpc.Server(limits=limits)
    server.export(Svc, Impl(), "svc")
    kw = {}
    if url.startswith("tls:"):
        kw["ssl_context"] = xrpc.server_ssl_context(os.environ["XRPC_TEST_CERT"], os.environ["XRPC_TEST_KEY"])
    async with server.listen(url, **kw) as listener:
        print(listener.url, os.getpid(), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)

anyio.run(main, sys.argv[1], sys.argv[2], backend=sys.argv[2])
'''

BUDGET_MIB = 32
ALLOWED_GROWTH_MIB = BUDGET_MIB + 16
STOP_AT_MIB = 200  # an attack stops once the server has grown this much: the point is made

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def frame(*fields: object) -> bytes:
    body = _enc.encode(list(fields))
    return struct.pack(">I", len(body)) + body


HELLO = frame(0, 1, 16 << 20, [], 1024, 4 << 20, 1 << 20)


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    raise KeyError(key)


def rss(pid: int) -> int:
    return _status(pid, "VmRSS")


def peak(pid: int) -> int:
    return _status(pid, "VmHWM")


def nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def decode_all(data: bytes) -> tuple[list[Any], bytes]:
    """Every whole frame in ``data``, decoded (raises on garbage), and what is left over."""
    out = []
    pos = 0
    while len(data) - pos >= 4:
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        if len(data) - pos - 4 < n:
            break
        out.append(_dec.decode(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out, data[pos:]


class Srv:
    """The server child: ``url`` it listens on, ``pid``, its stderr log."""

    def __init__(self, tmp: Path, scheme: str, backend: str, limits: str = "") -> None:
        self.tmp, self.scheme, self.backend = tmp, scheme, backend
        script = tmp / "server.py"
        script.write_text(SERVER)
        self.log = tmp / "server.log"
        env = child_env({"XRPC_TEST_LIMITS": limits})
        if scheme == "unix":
            url = f"unix://{tmp}/s.sock"
        elif scheme == "tcp":
            url = "tcp://127.0.0.1:0"
        else:
            from _trust import self_signed  # (cryptography only for tls://)

            self.cert, key = self_signed(tmp)
            env.update(XRPC_TEST_CERT=self.cert, XRPC_TEST_KEY=key)
            url = "tls://127.0.0.1:0"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), url, backend], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env
            )
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().split() if ready else []
        assert line, "the server did not start: " + self.log.read_text()[-2000:]
        self.url, self.pid = line[0], int(line[1])

    def raw(self, *, rcvbuf: int | None = None, hello: bool = True) -> RawPeer:
        return RawPeer(self, rcvbuf=rcvbuf, hello=hello)

    def neighbour_works(self) -> bool:
        n = self.raw()
        try:
            assert n.recv()[0] == 1  # WELCOME
            n.send(2, 1, "svc", "echo", [7])
            return n.recv(20) == [3, 1, 7]
        finally:
            n.close()

    def stop(self) -> str:
        alive = self.proc.poll() is None
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        text = self.log.read_text()
        assert alive, "the server died: " + text[-3000:]
        return text


class RawPeer:
    """A peer that speaks raw frames over a plain (or TLS-wrapped) socket."""

    def __init__(self, srv: Srv, *, rcvbuf: int | None = None, hello: bool = True) -> None:
        addr = srv.url.split("://", 1)[1]
        if srv.scheme == "unix":
            raw = socket.socket(socket.AF_UNIX)
            target: Any = addr
        else:
            raw = socket.socket()
            host, port = addr.rsplit(":", 1)
            target = (host, int(port))
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.connect(target)
        self.tls = srv.scheme == "tls"
        if self.tls:
            ctx = ssl.create_default_context(cafile=srv.cert)
            raw = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.s = raw
        self.buf = b""
        if hello:
            self.s.sendall(HELLO)

    def send(self, *fields: object) -> None:
        self.s.sendall(frame(*fields))

    def recv(self, timeout: float = 10.0) -> Any:
        msg, self.buf = _wire.recv_frame(self.s, self.buf, timeout)
        return msg

    def read_to_end(self, timeout: float) -> tuple[bytes, str]:
        """Everything until the server closes: (bytes, "eof" | "reset" | "timeout")."""
        out = bytearray(self.buf)
        self.buf = b""
        self.s.setblocking(True)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(out), "timeout"
            self.s.settimeout(left)
            try:
                data = self.s.recv(1 << 20)
            except (socket.timeout, TimeoutError):
                return bytes(out), "timeout"
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                return bytes(out), "reset"
            if not data:
                return bytes(out), "eof"
            out += data

    def flood(self, srv: Srv, make: Callable[[int], bytes], *, seconds: float = 20.0, max_calls: int = 10**7, stall: float = 3.0) -> str:
        """Send frames ``make(call_id)`` without reading an answer, until the server stops reading
        (no room to write for ``stall`` s: "stopped"), cuts this peer off ("cut"), ``max_calls`` are
        sent ("sent"), the server has grown by STOP_AT_MIB ("grown") or time is up ("time")."""
        base = rss(srv.pid)
        self.s.setblocking(False)
        pending = b""
        call_id = 1
        end = time.monotonic() + seconds
        while True:
            if time.monotonic() > end:
                return "time"
            if rss(srv.pid) - base > STOP_AT_MIB:
                return "grown"
            if not pending:
                if call_id >= 2 * max_calls:
                    return "sent"
                count = min(64, max_calls - call_id // 2)
                pending = b"".join(make(call_id + 2 * i) for i in range(count))
                call_id += 2 * count
            _, writable, _ = select.select([], [self.s], [], stall)
            if not writable:
                return "stopped"
            try:
                pending = pending[self.s.send(pending) :]
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                continue
            except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
                return "cut"

    def close(self) -> None:
        self.s.close()


def settle_peak(srv: Srv, base: int, seconds: float = 10.0) -> int:
    """Peak RSS growth (MiB) once the server had ``seconds`` to serve what was sent (polled: stops
    early once the growth passes the allowance)."""
    settle = time.monotonic() + seconds
    while peak(srv.pid) - base < ALLOWED_GROWTH_MIB and time.monotonic() < settle:
        select.select([], [], [], 0.05)
    return peak(srv.pid) - base


def no_errors(text: str) -> None:
    assert "ERROR" not in text and "Traceback" not in text, text[-3000:]


def flood_never_reading(srv: Srv, make: Callable[[int], bytes], **flood: Any) -> tuple[str, int]:
    """``RawPeer.flood`` from a peer with a small receive buffer that never reads (stalled: 3 s),
    while a neighbour must still be served; then the server is stopped, having logged no error.
    How the flood ended, and the server's peak RSS growth (MiB) once it had 5 s to settle."""
    base = rss(srv.pid)
    peer = srv.raw(rcvbuf=4096)
    try:
        how = peer.flood(srv, make, stall=3.0, **flood)
        grown = settle_peak(srv, base, 5.0)
        assert srv.neighbour_works()
    finally:
        peer.close()
    no_errors(srv.stop())
    return how, grown


BACKENDS = ["asyncio", "trio"]
SCHEMES = ["unix", "tcp", "tls"]


@pytest.fixture
def make_srv(tmp_path):
    made: list[Srv] = []

    def make(scheme: str, backend: str, limits: str = "") -> Srv:
        srv = Srv(tmp_path, scheme, backend, limits)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        if srv.proc.returncode is None and not srv.proc.stdin.closed:
            srv.proc.kill()
            srv.proc.wait()


# --------------------------------------------------------------------------- a peer that never reads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", ["big", "big_now"])
def test_a_peer_that_never_reads_large_answers_costs_bounded_memory(make_srv, scheme, backend, method):
    """400 calls answered with 1 MiB each (served in a task, or inline as read), never read: the
    server stops reading or cuts the peer off; it grows by at most about twice the budget (the
    documented bound on trio and TLS), and a neighbour keeps being served."""
    how, grown = flood_never_reading(make_srv(scheme, backend), lambda i: frame(2, i, "svc", method, [1 << 20]), max_calls=400)
    assert how != "grown"
    assert grown < 2 * BUDGET_MIB + 16, f"the server grew by {grown} MiB ({how})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_peer_that_never_reads_many_server_streams_costs_bounded_memory(make_srv, scheme, backend):
    """200 server streams of 1024 items of 64 KiB, never read."""
    how, grown = flood_never_reading(make_srv(scheme, backend), lambda i: frame(2, i, "svc", "ticks", [1024, 65536]), max_calls=200)
    assert how != "grown"
    assert grown < 2 * BUDGET_MIB + 16, f"the server grew by {grown} MiB ({how})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_a_ping_flood_that_never_reads_costs_bounded_memory(make_srv, scheme, backend):
    how, grown = flood_never_reading(make_srv(scheme, backend), lambda i: frame(11, i), seconds=15)
    assert how in ("stopped", "cut"), how
    assert grown < 2 * BUDGET_MIB + 16, f"the server grew by {grown} MiB ({how})"


# --------------------------------------------------------------------------- cut off for the budget


def _wait_for_log(srv: Srv, needle: str, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.log.read_text().count(needle) >= count:
            return True
        select.select([], [], [], 0.01)
    return False


BUDGET_WARNING = "more than its memory budget"


def overrun_budget(srv: Srv, peer: RawPeer, cut_offs: int = 1) -> None:
    """``peer`` reads its WELCOME, then asks for 80 answers of 1 MiB (more than its 32 MiB budget)
    without reading them: the server must cut it off (its ``cut_offs``-th cut-off WARNING, in 30 s)."""
    assert peer.recv()[0] == 1
    peer.s.sendall(b"".join(frame(2, 2 * i + 1, "svc", "big", [1 << 20]) for i in range(80)))
    assert _wait_for_log(srv, BUDGET_WARNING, cut_offs, 30), "the peer was never cut off"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_slow_reader_cut_off_for_its_budget_reads_a_goodbye_that_says_why(make_srv, scheme, backend):
    """A peer asks for 80 answers of 1 MiB (more than the 32 MiB budget) and reads only once the
    server has decided to cut it off: it must still read, after the answers sent so far, well-formed
    frames ending in GOODBYE code 9 (LIMIT) with the reason, and then the end of the connection; the
    server logs nothing at ERROR (and the cut-off once)."""
    srv = make_srv(scheme, backend)
    peer = srv.raw(rcvbuf=4096)
    try:
        overrun_budget(srv, peer)
        data, how = peer.read_to_end(20)
        assert srv.neighbour_works()
    finally:
        peer.close()
    text = srv.stop()
    no_errors(text)
    frames, rest = decode_all(data)
    assert frames and frames[-1][0] == 10, (how, len(data), len(rest), [f[:2] for f in frames[-3:]])
    assert frames[-1][2] == 9 and "budget" in frames[-1][1], frames[-1]
    assert rest == b"" and how == "eof", (how, len(rest))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_peer_cut_off_for_its_budget_is_logged_once(make_srv, scheme, backend):
    """One cut-off, one WARNING: every answer that completes after the peer was cut off must not
    log the cut-off again (before: 45-48 identical WARNINGs per connection)."""
    srv = make_srv(scheme, backend)
    peer = srv.raw(rcvbuf=4096)
    try:
        overrun_budget(srv, peer)
        assert srv.neighbour_works()  # the server has done what it does after a cut-off
    finally:
        peer.close()
    text = srv.stop()
    assert text.count(BUDGET_WARNING) == 1, text[-2000:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_connections_cut_off_for_their_budget_are_let_go_though_their_peers_never_read(make_srv, scheme, backend):
    """Four peers each ask for 80 answers of 1 MiB and never read, and keep their sockets open.  Each
    is cut off; the server must then let go of its socket and of what it had buffered for it (a
    closed connection that waits for ever to flush to a peer that never reads is memory and a
    descriptor that no limit counts: ``max_connections`` no longer sees it)."""
    srv = make_srv(scheme, backend)
    fds0 = nfds(srv.pid)
    base = rss(srv.pid)
    peers = []
    try:
        for k in range(4):
            peer = srv.raw(rcvbuf=4096)
            peers.append(peer)
            overrun_budget(srv, peer, k + 1)
        deadline = time.monotonic() + 10
        while nfds(srv.pid) > fds0 and time.monotonic() < deadline:
            select.select([], [], [], 0.05)
        held_fds = nfds(srv.pid) - fds0
        held_mib = rss(srv.pid) - base
        assert srv.neighbour_works()
    finally:
        for peer in peers:
            peer.close()
    no_errors(srv.stop())
    assert held_fds <= 0, f"the server still holds {held_fds} descriptors of closed connections ({held_mib} MiB)"
    assert held_mib < 2 * BUDGET_MIB + 16, f"the server still holds {held_mib} MiB"


# --------------------------------------------------------------------------- aclose, vanishing peers

CLIENT_IFACE = r'''
from typing import AsyncIterator, Protocol
import xrpc

@xrpc.interface
class Svc(Protocol):
    async def echo(self, x: int) -> int: ...
    @xrpc.oneway
    async def sink(self, data: bytes) -> None: ...
    async def sunk(self) -> int: ...
'''


def _svc():
    ns: dict[str, Any] = {}
    exec(compile(CLIENT_IFACE, "<iface>", "exec"), ns)
    return ns["Svc"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_aclose_right_after_a_large_oneway_call_delivers_it(make_srv, scheme, backend):
    """A client sends a one-way call of 8 MiB and closes at once: what was written before aclose()
    goes out first (the driver contract: within a second), so the server receives the call.  On trio
    aclose() used to close the stream under the writer's send (the call was cut off mid-frame)."""
    import anyio

    import xrpc

    Svc = _svc()
    srv = make_srv(scheme, backend)
    kw: dict[str, Any] = {}
    if scheme == "tls":
        kw["ssl_context"] = xrpc.client_ssl_context(cafile=srv.cert)

    async def main() -> int:
        with anyio.fail_after(30):
            async with xrpc.connect(srv.url, **kw) as conn:
                await conn.proxy(Svc, "svc").sink(b"s" * (8 << 20))
                await conn.aclose()
            got = 0
            for _ in range(200):
                async with xrpc.connect(srv.url, **kw) as conn:
                    got = await conn.proxy(Svc, "svc").sunk()
                if got:
                    break
            return got

    got = anyio.run(main, backend=backend)
    no_errors(srv.stop())
    assert got == 8 << 20


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_aclose_towards_a_server_that_never_reads_returns_within_seconds(tmp_path, scheme, backend):
    """A client writes 8 MiB to a peer that never reads, then aclose(): it returns in a few seconds
    (the grace is one second), not never."""
    import anyio

    import xrpc

    if scheme == "tls":
        pytest.skip("a raw never-reading TLS server cannot complete the handshake")
    Svc = _svc()
    if scheme == "unix":
        lsock = socket.socket(socket.AF_UNIX)
        lsock.bind(str(tmp_path / "n.sock"))
        url = f"unix://{tmp_path}/n.sock"
    else:
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{lsock.getsockname()[1]}"
    lsock.listen()
    accepted: list[socket.socket] = []

    async def main() -> float:
        async def server() -> None:
            conn, _ = await anyio.to_thread.run_sync(lsock.accept)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            accepted.append(conn)
            conn.recv(4096)  # the HELLO, then never read again
            conn.sendall(frame(1, 1, 16 << 20, [], 1024, 4 << 20, 1 << 20))

        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            with anyio.fail_after(30):
                async with xrpc.connect(url) as conn:
                    p = conn.proxy(Svc)
                    with anyio.move_on_after(2):
                        for _ in range(8):
                            await p.sink(b"s" * (1 << 20))
                    t0 = time.monotonic()
                    await conn.aclose()
                    return time.monotonic() - t0

    try:
        took = anyio.run(main, backend=backend)
    finally:
        lsock.close()
        for c in accepted:
            c.close()
    assert took < 5, took


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_peer_that_vanishes_mid_write_costs_nothing(make_srv, scheme, backend):
    """Twenty peers ask for 20 answers of 1 MiB each and reset their connection (SO_LINGER 0) while
    the server writes: no ERROR, the descriptors are given back, a neighbour is served."""
    srv = make_srv(scheme, backend)
    srv.neighbour_works()
    fds0 = nfds(srv.pid)
    base = rss(srv.pid)
    for _ in range(20):
        peer = srv.raw(rcvbuf=4096)
        assert peer.recv()[0] == 1
        peer.s.sendall(b"".join(frame(2, 2 * i + 1, "svc", "big", [1 << 20]) for i in range(20)))
        peer.recv()  # the server is writing
        raw = peer.s.unwrap() if False else peer.s
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
    deadline = time.monotonic() + 10
    while nfds(srv.pid) > fds0 and time.monotonic() < deadline:
        select.select([], [], [], 0.05)
    held = nfds(srv.pid) - fds0
    assert srv.neighbour_works()
    grown = peak(srv.pid) - base
    no_errors(srv.stop())
    assert held <= 0, held
    assert grown < 2 * BUDGET_MIB + 16, grown


# --------------------------------------------------------------------------- descriptors (unix, asyncio)


def test_a_peer_that_never_reads_replies_carrying_descriptors_costs_bounded_descriptors(make_srv):
    """A peer calls a method that returns a SharedBuffer, thousands of times, and never reads: each
    reply queued for it holds a descriptor in the server.  Rule 4: a peer costs bounded
    descriptors; the server must stop reading it (or cut it off) long before its table fills."""
    srv = make_srv("unix", "asyncio")
    fds0 = nfds(srv.pid)
    peer = srv.raw(rcvbuf=4096)
    most = 0
    try:
        assert peer.recv()[0] == 1
        peer.s.setblocking(False)
        pending = b""
        call_id = 1
        end = time.monotonic() + 15
        while time.monotonic() < end and call_id < 2 * 20000:
            most = max(most, nfds(srv.pid) - fds0)
            if not pending:
                pending = b"".join(frame(2, call_id + 2 * i, "svc", "shm", []) for i in range(64))
                call_id += 128
            _, writable, _ = select.select([], [peer.s], [], 3.0)
            if not writable:
                break
            try:
                pending = pending[peer.s.send(pending) :]
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        settle = time.monotonic() + 3
        while time.monotonic() < settle:
            most = max(most, nfds(srv.pid) - fds0)
            select.select([], [], [], 0.05)
        assert srv.neighbour_works()
    finally:
        peer.close()
    no_errors(srv.stop())
    assert most < 256, f"the server held {most} more descriptors for one peer"
