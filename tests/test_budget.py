"""Memory under attack: back-pressure on reading, the on_connect gate, and the per-connection budget.

Each attack runs against a server in a child process (its RSS is its own), over a raw Unix socket,
next to a well-behaved client on the same server whose calls must keep succeeding.  The peak RSS
(VmHWM) of the server during the attack must stay within ``Limits.max_buffered`` plus 16 MiB over
its RSS before the attack.  Figures are printed (``pytest -s``) as ``MEM <test>: ...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import time
from typing import Any, AsyncIterator, Iterator, Protocol

import anyio
import anyio.lowlevel
import msgspec
import pytest

import xrpc
from xrpc._protocol import PROTOCOL_VERSION, Call, CallFlags, Cancel, ErrorCode, Hello, Item, Ping

from _procs import ChildProcess, errors_in, log_to, own_rss, serve_until_stdin_closes
from _wire import ERROR_TAG, GOODBYE_TAG, REPLY_TAG, decode_frames, frame, pop_frames
from _timeouts import T
from conftest import serve_and_connect

MiB = 1024 * 1024
SLACK = 16 * MiB  # what an attack may add to the server's peak RSS beyond the budget
BUDGET = getattr(xrpc.Limits(), "max_buffered", 32 * MiB)
BLOB = 1024 * 1024


@xrpc.interface
class Hog(Protocol):
    async def blob(self) -> bytes: ...
    async def slow_blob(self) -> bytes: ...
    async def sink(self, items: AsyncIterator[bytes]) -> int: ...
    async def add(self, a: int, b: int) -> int: ...
    async def echo(self, s: str) -> str: ...
    async def hold(self, data: bytes, seconds: float) -> int: ...


class HogImpl:
    def __init__(self) -> None:
        self.data = b"x" * BLOB

    async def blob(self) -> bytes:  # never suspends: served inline, on the reader
        return self.data

    async def slow_blob(self) -> bytes:  # served in a task
        await anyio.sleep(0)
        return self.data

    async def sink(self, items: AsyncIterator[bytes]) -> int:  # never drains its stream
        await anyio.sleep_forever()
        return 0

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def echo(self, s: str) -> str:
        return s

    async def hold(self, data: bytes, seconds: float) -> int:  # keeps its argument while it waits
        await anyio.sleep(seconds)
        return len(data)


def _server_main(path: str, options: str, log_path: str) -> None:
    """Entry point of the server child process."""
    log_to(log_path)
    opts = json.loads(options)
    slow_connect = opts.get("slow_connect", 0.0)
    seen = [0]

    async def on_connect(conn: xrpc.Connection) -> None:
        seen[0] += 1
        if seen[0] > 1:  # the first connection (the well-behaved neighbour) is let in at once
            await anyio.sleep(slow_connect)  # a slow on_connect: what it does does not matter here

    async def main() -> None:
        server = xrpc.Server(limits=xrpc.Limits(**opts.get("limits", {})), on_connect=on_connect if slow_connect else None)
        server.export(Hog, HogImpl())
        async with server.listen(f"unix://{path}") as listener:
            await serve_until_stdin_closes(listener.url)

    anyio.run(main, backend=opts.get("backend", "asyncio"))


class ServerProcess(ChildProcess):
    """An xrpc server exporting ``Hog`` in a child process, on a Unix socket, logging to a file."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.start("test_budget", self.path, json.dumps(options), self.log_path)


@pytest.fixture
def server_process() -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(**options: Any) -> ServerProcess:
        sp = ServerProcess(**options)
        started.append(sp)
        return sp

    yield start
    for sp in started:
        assert sp.proc.poll() is None, f"the server process died (exit code {sp.proc.returncode})"
        lines = sp.stop()
        errors = errors_in(lines)
        assert errors == [], "\n".join(errors[:10])


class Memory:
    def __init__(self, sp: ServerProcess, name: str) -> None:
        self.sp = sp
        self.name = name
        self.before = sp.rss()

    def growth(self) -> int:
        peak = self.sp.peak()
        grown = peak - self.before
        print(f"\nMEM {self.name}: rss before {self.before / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, growth {grown / MiB:.1f} MiB")
        return grown


@contextlib.asynccontextmanager
async def neighbour(url: str) -> AsyncIterator[Any]:
    """A well-behaved client; ``check()`` makes a few calls that must succeed within the timeout."""
    async with xrpc.connect(url, timeout=T) as conn:
        hog = conn.proxy(Hog)

        async def check(n: int = 5) -> None:
            for i in range(n):
                with anyio.fail_after(T):
                    assert await hog.add(i, 1) == i + 1
                    assert await hog.echo("x" * 1000) == "x" * 1000

        await check(1)
        yield check


def hello() -> bytes:
    return frame(Hello(PROTOCOL_VERSION, 1 << 26))


def raw_socket(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(T)
    s.connect(path)
    s.setblocking(False)
    return s


@contextlib.asynccontextmanager
async def raw_next_to_neighbour(sp: ServerProcess) -> AsyncIterator[tuple[socket.socket, Any]]:
    """A raw socket to the server of ``sp`` (closed on the way out), next to a well-behaved
    neighbour whose ``check()`` must pass during the attack and again after the socket is closed."""
    async with neighbour(sp.url) as check:
        s = raw_socket(sp.path)
        try:
            yield s, check
        finally:
            s.close()
        await check()


def flood(s: socket.socket, chunk: bytes, limit: int, stalled: float = 1.0) -> tuple[int, str]:
    """Send ``chunk`` again and again without reading, up to ``limit`` bytes; stop early once the
    server has not taken a byte for ``stalled`` seconds (it stopped reading), or closed."""
    sent = 0
    view = memoryview(chunk)
    pos = 0
    while sent < limit:
        try:
            n = s.send(view[pos:])
        except BlockingIOError:
            _, writable, _ = select.select([], [s], [], stalled)
            if not writable:
                return sent, "stalled"
            continue
        except OSError:
            return sent, "closed"
        sent += n
        pos = (pos + n) % len(chunk)
    return sent, "sent"


def read_goodbye(s: socket.socket, timeout: float = T) -> list[Any]:
    """Read until the server closes the connection; the frames it sent (they end in GOODBYE)."""
    s.setblocking(True)
    s.settimeout(timeout)
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(1 << 20):
            data += chunk
    return decode_frames(data)


PADDING = msgspec.msgpack.encode(["p" * (250 * 1024)])


def padding_call(call_id: int) -> bytes:
    """A call to no object with 250 KiB of arguments: the server drops it with an ERROR."""
    return frame(Call(call_id, "nothing", "m", msgspec.Raw(PADDING)))


async def flood_after_hello(s: socket.socket, parts: list[bytes], what: str) -> str:
    """Send HELLO then ``parts`` (as far as the server takes them, see ``flood``); how it ended."""
    data = b"".join([hello(), *parts])
    parts.clear()
    sent, how = await anyio.to_thread.run_sync(flood, s, data, len(data))
    print(f"\n{what}: sent {sent / MiB:.1f} MiB, {how}")
    return how


def calls(method: str, n: int, start: int = 1, payload: bytes = b"\x90") -> bytes:
    return b"".join(frame(Call(start + 2 * i, "Hog", method, msgspec.Raw(payload))) for i in range(n))


# --------------------------------------------------------------------------- a peer that never reads
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("method", ["blob", "slow_blob"])
async def test_a_peer_that_never_reads_stops_being_read(server_process: Any, backend: str, method: str) -> None:
    sp = server_process(backend=backend)
    mem = Memory(sp, f"400 calls returning 1 MiB, never read ({method}, {backend})")
    async with raw_next_to_neighbour(sp) as (s, check):
        s.sendall(hello() + calls(method, 400))  # ~9 KiB asking for 400 MiB
        for _ in range(4):
            await check()  # the server goes on serving others meanwhile
            grown = mem.growth()
            assert grown < BUDGET + SLACK


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_a_ping_flood_that_never_reads_stops_being_read(server_process: Any, backend: str) -> None:
    sp = server_process(backend=backend)
    mem = Memory(sp, f"PING flood, never read ({backend})")
    pings = b"".join(frame(Ping(i)) for i in range(1, 30000))
    async with raw_next_to_neighbour(sp) as (s, check):
        s.sendall(hello())
        sent, how = await anyio.to_thread.run_sync(flood, s, pings, 200 * MiB)
        print(f"\nPING flood: sent {sent / MiB:.1f} MiB, {how}")
        assert how == "stalled"  # the server stopped reading this peer
        await check()
        assert mem.growth() < BUDGET + SLACK


# --------------------------------------------------------------------------- the on_connect gate
@pytest.mark.timeout(120)
async def test_a_call_flood_during_on_connect_is_bounded(server_process: Any) -> None:
    sp = server_process(slow_connect=6.0)
    mem = Memory(sp, "CALL flood during a slow on_connect")
    text = "y" * 60_000
    flood_chunk = calls("echo", 64, payload=msgspec.msgpack.encode([text]))  # ids are rewritten below
    async with raw_next_to_neighbour(sp) as (s, check):
        s.sendall(hello())
        # distinct, increasing call ids: build the flood once, large enough not to repeat
        frames = []
        total = 0
        i = 0
        while total < 300 * MiB:
            f = frame(Call(1 + 2 * i, "Hog", "echo", msgspec.Raw(msgspec.msgpack.encode([text]))))
            frames.append(f)
            total += len(f)
            i += 1
        del flood_chunk
        data = b"".join(frames)
        del frames
        sent, how = await anyio.to_thread.run_sync(flood, s, data, len(data))
        print(f"\nCALL flood behind the gate: sent {sent / MiB:.1f} MiB, {how}")
        assert how == "stalled"
        await check()
        assert mem.growth() < BUDGET + SLACK
        del data


@pytest.mark.timeout(120)
async def test_too_many_calls_behind_the_gate_close_the_connection(server_process: Any) -> None:
    limit = 100
    sp = server_process(slow_connect=6.0, limits={"max_calls_in_flight": limit})
    async with raw_next_to_neighbour(sp) as (s, check):
        s.sendall(hello() + calls("add", 2 * limit, payload=msgspec.msgpack.encode([1, 2])))
        frames = await anyio.to_thread.run_sync(read_goodbye, s)
    assert frames[-1][0] == GOODBYE_TAG, frames[-3:]
    assert frames[-1][2] == ErrorCode.LIMIT and "on_connect" in frames[-1][1], frames[-1]


@pytest.mark.timeout(120)
async def test_large_frames_during_on_connect_count_against_the_budget(server_process: Any) -> None:
    """Large CALL frames behind the gate: each is counted whole against the budget while it is
    being assembled and while it waits, so the server stops reading (or says GOODBYE) in time."""
    sp = server_process(slow_connect=6.0)
    mem = Memory(sp, "15 MiB CALL frames during a slow on_connect")
    text = "y" * (15 * MiB)
    data = b"".join(frame(Call(1 + 2 * i, "Hog", "echo", msgspec.Raw(msgspec.msgpack.encode([text])))) for i in range(10))
    del text
    async with raw_next_to_neighbour(sp) as (s, check):
        s.sendall(hello())
        sent, how = await anyio.to_thread.run_sync(flood, s, data, len(data))
        print(f"\nlarge CALL frames behind the gate: sent {sent / MiB:.1f} MiB, {how}")
        assert how in ("stalled", "closed")
        await check()
        assert mem.growth() < BUDGET + SLACK
    del data


# --------------------------------------------------------------------------- stream windows
@pytest.mark.timeout(120)
async def test_undrained_streams_are_held_to_the_budget(server_process: Any) -> None:
    sp = server_process()
    mem = Memory(sp, "64 client streams, a full window on each, never drained")
    window = xrpc.Limits().window_bytes
    item = msgspec.msgpack.encode([b"z" * (256 * 1024)])
    async with raw_next_to_neighbour(sp) as (s, check):
        parts = [hello()]
        for k in range(64):
            call_id = 1 + 2 * k
            parts.append(frame(Call(call_id, "Hog", "sink", msgspec.Raw(b"\x90"), CallFlags.STREAM_IN)))
            parts += [frame(Item(call_id, 1, msgspec.Raw(item)))] * (window // len(item))
        data = b"".join(parts)
        sent, how = await anyio.to_thread.run_sync(flood, s, data, len(data))
        print(f"\nstreams: sent {sent / MiB:.1f} MiB, {how}")
        frames = await anyio.to_thread.run_sync(read_goodbye, s)
        assert mem.growth() < BUDGET + SLACK
    goodbye = frames[-1]
    assert goodbye[0] == GOODBYE_TAG and goodbye[2] == ErrorCode.LIMIT, goodbye
    assert "memory budget" in goodbye[1]


# --------------------------------------------------------------------------- memory transport (anyio streams)
@pytest.mark.timeout(60)
async def test_memory_transport_stops_reading_a_peer_that_never_reads() -> None:
    from xrpc._transports import connect_stream

    server = xrpc.Server()
    server.export(Hog, HogImpl())
    async with server.listen(f"memory://budget-{os.getpid()}") as listener:
        async with xrpc.connect(listener.url, timeout=T) as good:
            hog = good.proxy(Hog)
            before = own_rss()
            stream, _ = await connect_stream(listener.url)
            try:
                await stream.send(hello() + calls("blob", 400))  # and never read
                with anyio.fail_after(T):
                    for i in range(50):
                        assert await hog.add(i, 1) == i + 1
                grown = own_rss() - before
                print(f"\nMEM memory transport, 400 calls of 1 MiB never read: this process grew {grown / MiB:.1f} MiB")
                assert grown < BUDGET + SLACK
            finally:
                await stream.aclose()


@pytest.mark.timeout(120)
async def test_small_items_do_not_keep_large_reads_alive(server_process: Any) -> None:
    """An item of a few bytes read together with 250 KiB of other frames must not keep the whole
    read in memory: what a stream holds is what the budget counts."""
    sp = server_process()
    mem = Memory(sp, "1000 undrained streams, one tiny item each, padded reads")
    n = 1000
    async with raw_next_to_neighbour(sp) as (s, check):
        parts = [frame(Call(1 + 2 * k, "Hog", "sink", msgspec.Raw(b"\x90"), CallFlags.STREAM_IN)) for k in range(n)]
        for k in range(n):
            # one tiny item, then a call to no object whose payload is dropped with an ERROR
            parts.append(frame(Item(1 + 2 * k, 1, msgspec.Raw(msgspec.msgpack.encode([b"i"])))))
            parts.append(padding_call(1 + 2 * (n + k)))
        await flood_after_hello(s, parts, "padded items")
        await check()
        grown = mem.growth()
    assert grown < BUDGET + SLACK


# --------------------------------------------------------------------------- well-behaved peers are not cut off
@xrpc.interface
class Upload(Protocol):
    async def total(self, chunks: AsyncIterator[bytes]) -> int: ...


class UploadImpl:
    async def total(self, chunks: AsyncIterator[bytes]) -> int:
        n = 0
        async for chunk in chunks:
            n += len(chunk)
            for _ in range(20):  # a slow consumer
                await anyio.lowlevel.checkpoint()
        return n


@pytest.mark.timeout(120)
async def test_concurrent_uploads_to_slow_consumers_stay_within_the_budget(sock_dir: str) -> None:
    streams, size, item = 6, 24 * MiB, 64 * 1024
    server = xrpc.Server()
    server.export(Upload, UploadImpl())
    held: list[int] = []
    async with serve_and_connect(server, f"unix://{sock_dir}/s.sock", timeout=T) as conn:
        up = conn.proxy(Upload)
        results: list[int] = []

        async def source() -> AsyncIterator[bytes]:
            chunk = b"u" * item
            for _ in range(size // item):
                yield chunk
                (sconn,) = server.connections
                held.append(sconn._flow.held)

        async def one() -> None:
            results.append(await up.total(source()))

        with anyio.fail_after(9 * T):
            async with anyio.create_task_group() as tg:
                for _ in range(streams):
                    tg.start_soon(one)
    assert results == [size] * streams
    print(f"\nBUDGET {streams} uploads: the server held at most {max(held) / MiB:.1f} MiB")
    assert max(held) <= xrpc.Limits().max_buffered


# --------------------------------------------------------------------------- calls in flight


def read_frames(s: socket.socket, until: Any, timeout: float = T) -> list[Any]:
    """Read frames (blocking) until ``until(frame)`` is true for one; all the frames read."""
    s.setblocking(True)
    s.settimeout(timeout)
    buf = bytearray()
    out: list[Any] = []
    while True:
        for f in pop_frames(buf):
            out.append(f)
            if until(f):
                return out
        chunk = s.recv(1 << 20)
        if not chunk:
            raise EOFError(f"the server closed the connection after {out[-3:]}")
        buf += chunk


def handshake(s: socket.socket) -> None:
    """Send HELLO on ``s`` (made blocking) and read up to the WELCOME."""
    s.setblocking(True)
    s.sendall(hello())
    read_frames(s, lambda f: f[0] == 1)  # WELCOME


def hold_call(call_id: int, size: int, seconds: float) -> bytes:
    return frame(Call(call_id, "Hog", "hold", msgspec.Raw(msgspec.msgpack.encode([b"h" * size, seconds]))))


def marker_and_wait(s: socket.socket, call_id: int) -> list[Any]:
    """Everything the server answered to the calls sent before call ``call_id`` (an ``add``, answered
    at once: calls are handled in order; a PING would not do, it is answered as soon as it is read)."""
    s.setblocking(True)
    s.sendall(frame(Call(call_id, "Hog", "add", msgspec.Raw(msgspec.msgpack.encode([1, 2])))))
    return read_frames(s, lambda f: f[:2] == [REPLY_TAG, call_id])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_calls_in_flight_are_held_to_the_budget(server_process: Any, backend: str) -> None:
    """20 calls to a slow method, each with 15 MiB of legitimate ``bytes``: the arguments of calls
    in flight are drawn from the budget, the calls past it are refused with LimitExceeded, and the
    connection lives on.  The budget comes back when a call ends (reply or CANCEL)."""
    sp = server_process(backend=backend)
    mem = Memory(sp, f"20 calls in flight with 15 MiB arguments each ({backend})")
    size = 15 * MiB
    async with raw_next_to_neighbour(sp) as (s, check):
        s.setblocking(True)
        s.sendall(hello())

        def attack() -> list[Any]:
            for k in range(20):
                s.sendall(hold_call(1 + 2 * k, size, 3600.0))
            return marker_and_wait(s, 41)

        answers = await anyio.to_thread.run_sync(attack)
        await check()
        grown = mem.growth()
        errors = {f[1]: f for f in answers if f[0] == ERROR_TAG}
        admitted = [1 + 2 * k for k in range(20) if 1 + 2 * k not in errors]
        print(f"\ncalls in flight: {len(admitted)} admitted, {len(errors)} refused")
        assert 1 <= len(admitted) <= BUDGET // size, answers
        assert all(e[2] == ErrorCode.LIMIT and e[3] == "LimitExceeded" and "budget" in e[4] for e in errors.values()), errors
        # the budget, plus the one frame being received: a CALL that does not fit beside the
        # calls in flight is received, then refused (so the connection lives on).  Before: 600 MiB.
        assert grown < BUDGET + xrpc.Limits().max_frame + SLACK

        # the connection lives on, and ending the calls in flight gives their budget back
        # (CANCEL; the server may take a moment to unwind the cancelled tasks: poll)
        def after() -> None:
            s.sendall(b"".join(frame(Cancel(i)) for i in admitted))
            assert marker_and_wait(s, 101)[-1] == [REPLY_TAG, 101, 3]
            call_id = 103
            size = 12 * MiB  # does not fit beside a 15 MiB call, nor beside another one
            deadline = time.monotonic() + T
            while True:  # admitted again once the cancelled calls unwound
                s.sendall(hold_call(call_id, size, 0.0))
                last = read_frames(s, lambda f: f[0] in (REPLY_TAG, ERROR_TAG) and f[1] == call_id)[-1]
                if last[0] == REPLY_TAG:
                    break
                assert last[2] == ErrorCode.LIMIT and time.monotonic() < deadline, last
                call_id += 2
                time.sleep(0.05)
            assert last[2] == size
            for k in range(3):  # ... and again once one has replied
                call_id += 2
                s.sendall(hold_call(call_id, size, 0.0))
                assert read_frames(s, lambda f: f[1] == call_id)[-1][:3] == [REPLY_TAG, call_id, size]

        await anyio.to_thread.run_sync(after)


@pytest.mark.timeout(120)
async def test_a_large_call_arriving_while_calls_fill_the_budget_is_refused(server_process: Any) -> None:
    """Calls in flight fill most of the budget; a large CALL frame then arrives: it is received and
    refused with LimitExceeded (the frame being received does not count against calls in flight, or
    the connection would end before the call could be refused)."""
    sp = server_process(limits={"max_buffered": 8 * MiB})
    async with raw_next_to_neighbour(sp) as (s, check):
        handshake(s)

        def attack() -> list[Any]:
            s.sendall(b"".join(hold_call(1 + 2 * k, 2 * MiB, 3600.0) for k in range(4)))
            s.sendall(hold_call(9, 6 * MiB, 3600.0))
            return marker_and_wait(s, 11)

        answers = await anyio.to_thread.run_sync(attack)
    refused = {f[1]: f for f in answers if f[0] == ERROR_TAG}
    # two calls of a little over 2 MiB admitted (each needs twice its size free: its frame and its
    # decoded arguments); the 6 MiB one does not fit beside them
    assert sorted(refused) == [5, 7, 9], answers
    assert all(f[2] == ErrorCode.LIMIT and "budget" in f[4] for f in refused.values()), refused
    assert answers[-1] == [REPLY_TAG, 11, 3]


@pytest.mark.timeout(120)
async def test_calls_cancelled_as_they_arrive_are_not_held(server_process: Any) -> None:
    """A CANCEL read together with its CALL: the call never starts, holds nothing and is not
    answered; a refused one (unknown object, over the budget) does not break the connection."""
    sp = server_process(limits={"max_calls_in_flight": 100})
    async with raw_next_to_neighbour(sp) as (s, check):
        handshake(s)

        def attack() -> list[Any]:
            # a call refused at once, cancelled in the same read
            s.sendall(frame(Call(1, "nothing", "m", msgspec.Raw(b"\x90"))) + frame(Cancel(1)))
            assert marker_and_wait(s, 3)[-1] == [REPLY_TAG, 3, 3]
            # 500 calls holding 2 KB each, each cancelled in the same read (max 100 in flight)
            s.sendall(b"".join(hold_call(5 + 2 * k, 2000, 3600.0) + frame(Cancel(5 + 2 * k)) for k in range(500)))
            answers = marker_and_wait(s, 1005)
            # nothing of them is held: a call that needs the whole budget is admitted
            s.sendall(hold_call(1007, 15 * MiB, 0.0))
            return answers + read_frames(s, lambda f: f[1] == 1007)

        answers = await anyio.to_thread.run_sync(attack)
    assert answers[-2:] == [[REPLY_TAG, 1005, 3], [REPLY_TAG, 1007, 15 * MiB]], answers[-3:]


@pytest.mark.timeout(120)
async def test_extra_arguments_are_refused(server_process: Any) -> None:
    """A CALL with more arguments than the method has parameters is refused like a local call's
    TypeError (ValidationError, naming the method), before the method runs, and is not held."""
    sp = server_process()
    mem = Memory(sp, "20 calls padded with a 15 MiB extra argument")
    async with raw_next_to_neighbour(sp) as (s, check):
        handshake(s)

        def attack() -> list[Any]:
            pad = msgspec.msgpack.encode([b"", 3600.0, b"p" * (15 * MiB)])
            for k in range(20):
                s.sendall(frame(Call(1 + 2 * k, "Hog", "hold", msgspec.Raw(pad))))
            s.sendall(frame(Call(41, "Hog", "add", msgspec.Raw(msgspec.msgpack.encode([1, 2, 3])))))
            s.sendall(frame(Call(43, "Hog", "add", msgspec.Raw(msgspec.msgpack.encode([1, 2])))))
            return read_frames(s, lambda f: f[1] == 43)

        answers = await anyio.to_thread.run_sync(attack)
        await check()
        grown = mem.growth()
    assert [f[:3] for f in answers[:-1]] == [[ERROR_TAG, 1 + 2 * k, ErrorCode.VALIDATION] for k in range(21)], answers
    assert "Hog.hold" in answers[0][4] and "3 given, it takes at most 2" in answers[0][4], answers[0]
    assert "Hog.add" in answers[-2][4], answers[-2]
    assert answers[-1] == [REPLY_TAG, 43, 3]
    assert grown < BUDGET + SLACK


@pytest.mark.timeout(120)
async def test_small_calls_in_flight_do_not_keep_large_reads_alive(server_process: Any) -> None:
    """A call of a few bytes read together with 250 KiB of other frames must not keep the whole
    read in memory while it waits: 1000 of them would hold 250 MiB."""
    sp = server_process()
    mem = Memory(sp, "1000 small calls in flight, padded reads")
    n = 1000
    async with raw_next_to_neighbour(sp) as (s, check):
        parts = []
        for k in range(n):
            # one small call that waits, then a call to no object whose payload is dropped
            parts.append(hold_call(1 + 4 * k, 8, 3600.0))
            parts.append(padding_call(3 + 4 * k))
        how = await flood_after_hello(s, parts, "padded calls")
        assert how == "sent"
        answers = await anyio.to_thread.run_sync(marker_and_wait, s, 4 * n + 1)
        assert sum(1 for f in answers if f[0] == ERROR_TAG) == n  # the padding calls, and only those
        await check()
        grown = mem.growth()
    assert grown < BUDGET + SLACK


@xrpc.interface
class Big(Protocol):
    async def blob(self, n: int) -> bytes: ...


class BigImpl:
    async def blob(self, n: int) -> bytes:
        await anyio.sleep(0)  # served in a task
        return b"b" * n


@pytest.mark.timeout(60)
@pytest.mark.parametrize("url", ["tcp://127.0.0.1:0", "unix"])
async def test_large_replies_of_concurrent_task_calls_never_stall_a_reading_peer(url: str, tmp_path: Any) -> None:
    """Replies larger than write_buffer_high, sent by tasks to a peer that reads them: reading may
    pause while they are owed, and must go on once they are written, callback or not."""
    server = xrpc.Server()
    server.export(Big, BigImpl())
    if url == "unix":
        url = f"unix://{tmp_path}/s.sock"
    async with server.listen(url) as listener, xrpc.connect(listener.url, timeout=T) as conn:
        big = conn.proxy(Big)
        with anyio.fail_after(3 * T):
            for _ in range(20):
                async with anyio.create_task_group() as tg:
                    for _ in range(4):
                        tg.start_soon(big.blob, 3 << 20)
                assert await big.blob(1) == b"b"
