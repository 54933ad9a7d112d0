"""Connection-level flow control: a peer that honours the credit it was granted never trips the
receiver's memory budget, however many streams it fills at once.

Uploads run against a server in a child process (its RSS is its own); downloads are consumed here,
by a client that has a budget of its own.  Figures are printed (``pytest -s``) as ``MEM``/``HELD``.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Iterator, Protocol

import anyio
import anyio.lowlevel
import msgspec
import pytest

import xrpc
from xrpc._protocol import PROTOCOL_VERSION, Call, CallFlags, ErrorCode, Hello, Item

from _procs import ChildProcess, own_rss, serve_until_stdin_closes
from _wire import GOODBYE_TAG, decode_frames, frame
from _timeouts import T
from conftest import serve_and_connect

MiB = 1024 * 1024
SLACK = 16 * MiB
BUDGET = xrpc.Limits().max_buffered
CHUNK = 64 * 1024


def chunk(stream: int, i: int) -> bytes:
    """The ``i``-th chunk of stream ``stream``: its content says where it belongs."""
    return (stream * 1_000_000 + i).to_bytes(8, "big") * (CHUNK // 8)


@xrpc.interface
class Bulk(Protocol):
    async def upload(self, stream: int, chunks: AsyncIterator[bytes]) -> list[int]: ...
    def download(self, stream: int, count: int) -> AsyncIterator[bytes]: ...
    async def sink(self, chunks: AsyncIterator[bytes]) -> int: ...
    async def add(self, a: int, b: int) -> int: ...


class BulkImpl:
    def __init__(self) -> None:
        self.max_held = 0

    async def upload(self, stream: int, chunks: AsyncIterator[bytes]) -> list[int]:
        """Check every chunk, slowly; answer [chunks, bad chunks, most bytes the connection held]."""
        conn = xrpc.current_connection()
        n = bad = 0
        async for c in chunks:
            if c != chunk(stream, n):
                bad += 1
            n += 1
            self.max_held = max(self.max_held, conn._flow.held)
            for _ in range(20):  # a slow consumer
                await anyio.lowlevel.checkpoint()
        return [n, bad, self.max_held]

    async def download(self, stream: int, count: int) -> AsyncIterator[bytes]:
        for i in range(count):
            yield chunk(stream, i)

    async def sink(self, chunks: AsyncIterator[bytes]) -> int:  # never drains its stream
        await anyio.sleep_forever()
        return 0

    async def add(self, a: int, b: int) -> int:
        return a + b


def _server_main(path: str) -> None:
    async def main() -> None:
        server = xrpc.Server()
        server.export(Bulk, BulkImpl())
        async with server.listen(f"unix://{path}") as listener:
            await serve_until_stdin_closes(listener.url)

    anyio.run(main)


class ServerProcess(ChildProcess):
    def __init__(self) -> None:
        super().__init__(log=False, strict=False)  # the child logs nothing; its stderr is read
        self.start("test_conn_window", self.path)
        self.before = self.rss()

    def growth(self, name: str) -> int:
        peak = self.peak()
        print(f"\nMEM {name}: server rss before {self.before / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, growth {(peak - self.before) / MiB:.1f} MiB")
        return peak - self.before

    def log(self) -> str:
        return self.output()


@pytest.fixture
def server_process() -> Iterator[ServerProcess]:
    sp = ServerProcess()
    try:
        yield sp
    finally:
        alive = sp.alive()
        err = "\n".join(sp.stop())
        assert alive, f"the server process died: {err}"
        assert "Traceback" not in err, err


# --------------------------------------------------------------------------- well-behaved peers are never cut off
@pytest.mark.timeout(300)
@pytest.mark.parametrize("streams", [12, 32])
async def test_many_uploads_to_slow_consumers_complete(server_process: ServerProcess, streams: int) -> None:
    """``streams`` client streams of 24 MiB each at once, towards a server that consumes slowly:
    all complete intact, no GOODBYE, and the server stays within its budget."""
    count = 24 * MiB // CHUNK
    async with xrpc.connect(server_process.url, timeout=T) as conn:
        bulk = conn.proxy(Bulk)
        results: dict[int, list[int]] = {}

        async def source(k: int) -> AsyncIterator[bytes]:
            for i in range(count):
                yield chunk(k, i)

        async def one(k: int) -> None:
            results[k] = await bulk.upload(k, source(k))

        with anyio.fail_after(24 * T):
            async with anyio.create_task_group() as tg:
                for k in range(streams):
                    tg.start_soon(one, k)
        assert await bulk.add(1, 2) == 3  # the connection is still there
    assert sorted(results) == list(range(streams))
    assert all(r[:2] == [count, 0] for r in results.values()), results
    held = max(r[2] for r in results.values())
    print(f"\nHELD {streams} uploads: the server held at most {held / MiB:.1f} MiB of a {BUDGET / MiB:.0f} MiB budget")
    assert held <= BUDGET
    assert server_process.growth(f"{streams} uploads of 24 MiB to slow consumers") < BUDGET + SLACK
    assert "memory budget" not in server_process.log()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("streams", [12, 32])
async def test_many_downloads_to_a_slow_consumer_complete(server_process: ServerProcess, streams: int) -> None:
    """The other direction: ``streams`` server streams of 24 MiB each, consumed slowly by this client
    (whose budget is the default one): all complete intact, within the client's budget."""
    count = 24 * MiB // CHUNK
    before = own_rss()
    peak = [before]
    async with xrpc.connect(server_process.url, timeout=T) as conn:
        bulk = conn.proxy(Bulk)
        got: dict[int, tuple[int, int]] = {}
        held = [0]

        async def one(k: int) -> None:
            n = bad = 0
            async for c in bulk.download(k, count):
                if c != chunk(k, n):
                    bad += 1
                n += 1
                held[0] = max(held[0], conn._flow.held)
                if not n & 63:
                    peak[0] = max(peak[0], own_rss())
                for _ in range(20):  # a slow consumer
                    await anyio.lowlevel.checkpoint()
            got[k] = (n, bad)

        with anyio.fail_after(24 * T):
            async with anyio.create_task_group() as tg:
                for k in range(streams):
                    tg.start_soon(one, k)
        assert await bulk.add(1, 2) == 3
    assert got == {k: (count, 0) for k in range(streams)}
    grown = peak[0] - before
    print(f"\nHELD {streams} downloads: this client held at most {held[0] / MiB:.1f} MiB; its rss grew {grown / MiB:.1f} MiB")
    assert held[0] <= BUDGET
    assert grown < BUDGET + SLACK


# --------------------------------------------------------------------------- a peer that ignores connection credit
def read_all(path: str, data: bytes, timeout: float = T) -> list[Any]:
    """Connect, send ``data`` (as far as the server takes it), and return the frames the server sent
    until it closed the connection."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(data)
    received = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while piece := s.recv(1 << 20):
            received += piece
    s.close()
    return decode_frames(received)


@pytest.mark.timeout(120)
async def test_a_peer_that_ignores_connection_credit_is_cut_off(server_process: ServerProcess) -> None:
    """A raw peer that announces connection flow control, then fills stream after stream within each
    stream's own window but beyond the connection's: GOODBYE, and a neighbour is not disturbed."""
    window = xrpc.Limits().window_bytes
    item = msgspec.msgpack.encode([b"z" * (256 * 1024)])
    hello = Hello(PROTOCOL_VERSION, 1 << 26, [], 1024, 1 << 22, 1 << 24)
    parts = [frame(hello)]
    for k in range(16):
        call_id = 1 + 2 * k
        parts.append(frame(Call(call_id, "Bulk", "sink", msgspec.Raw(b"\x90"), CallFlags.STREAM_IN)))
        parts += [frame(Item(call_id, 1, msgspec.Raw(item)))] * (window // len(item) - 1)
    data = b"".join(parts)
    async with xrpc.connect(server_process.url, timeout=T) as good:
        bulk = good.proxy(Bulk)
        frames = await anyio.to_thread.run_sync(read_all, server_process.path, data)
        assert await bulk.add(2, 3) == 5
    goodbye = frames[-1]
    assert goodbye[0] == GOODBYE_TAG and goodbye[2] in (ErrorCode.VALIDATION, ErrorCode.LIMIT), goodbye
    assert "connection credit" in goodbye[1], goodbye
    assert server_process.growth("a peer beyond its connection credit") < BUDGET + SLACK


# --------------------------------------------------------------------------- the sans-IO core
from xrpc._errors import LocalProtocolError, RemoteProtocolError  # noqa: E402
from xrpc._protocol import ITEM_OVERHEAD, MIN_CONN_WINDOW, Credit, ProtocolCore, Welcome, conn_window_for  # noqa: E402


def open_pair(client_conn: int = 1 << 20, server_conn: int = 1 << 20, window_bytes: int = 1 << 30) -> tuple[ProtocolCore, ProtocolCore]:
    """A client and a server core after the handshake; stream byte windows large enough not to matter."""
    c = ProtocolCore(client=True, conn_window=client_conn, window_bytes=window_bytes)
    s = ProtocolCore(client=False, conn_window=server_conn, window_bytes=window_bytes)
    c.send_hello()
    s.receive_data(c.data_to_send())
    s.send_welcome()
    c.receive_data(s.data_to_send())
    return c, s


def messages(data: bytes | bytearray) -> list[Any]:
    out, pos = [], 0
    while pos < len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        out.append(msgspec.msgpack.decode(data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return out


def blob(n: int) -> bytes:
    return b"b" * n


def cost_of(payloads: list[Any]) -> int:
    return len(msgspec.msgpack.encode(payloads)) + ITEM_OVERHEAD


def test_core_windows_are_announced_and_derived_from_the_budget() -> None:
    c, s = open_pair(client_conn=300_000, server_conn=500_000)
    assert (c.peer_conn_window, c.conn_send, c.conn_limited, c.conn_enforce) == (500_000, 500_000, True, True)
    assert (s.peer_conn_window, s.conn_send, s.conn_limited, s.conn_enforce) == (300_000, 300_000, True, True)
    # the default leaves room for one frame of max_frame being received within the budget
    assert conn_window_for(32 * MiB, 16 * MiB) == 16 * MiB - 4
    assert conn_window_for(1 * MiB, 16 * MiB) == MIN_CONN_WINDOW  # never below the least window
    assert ProtocolCore(client=True, conn_window=10).conn_window == MIN_CONN_WINDOW


def test_core_sender_stops_at_the_connection_window_and_resumes_on_credit() -> None:
    c, s = open_pair(server_conn=MIN_CONN_WINDOW)
    recs = [c.send_call("o", "up", msgspec.Raw(b"\x90"), CallFlags.STREAM_IN) for _ in range(4)]
    s.receive_data(c.data_to_send())
    item = [blob(10_000)]
    sent = 0
    # four streams, each with plenty of stream credit: together they stop at the connection window
    for rec in recs * 4:
        if c.send_items(rec.id, item):
            sent += cost_of(item)
    assert sent == c.peer_conn_window - c.conn_send and c.conn_send < cost_of(item)
    assert c.conn_wanted == cost_of(item)
    assert sent > MIN_CONN_WINDOW - cost_of(item)  # it used the window up, and never overdrew it
    events = s.receive_data(c.data_to_send())
    assert s.conn_recv == MIN_CONN_WINDOW - sent
    # a stream CREDIT returns the connection credit freed so far with it
    s.conn_pending += 3 * cost_of(item)
    s.send_credit(events[0][1].id, 1, 100)
    (credit,) = messages(s.data_to_send())
    assert credit == [7, events[0][1].id, 1, 100, 3 * cost_of(item)]
    c.receive_data(frame(Credit(*credit[1:])))
    assert c.conn_send >= cost_of(item) and c.send_items(recs[0].id, item)
    # ... and a CREDIT for id 0 returns it on its own, once there is at least a threshold of it
    s.conn_pending += 100
    s.send_conn_credit(s.conn_threshold)
    assert s.data_to_send() == b""
    s.conn_pending += s.conn_threshold
    s.send_conn_credit(s.conn_threshold)
    assert messages(s.data_to_send()) == [[7, 0, 0, 0, s.conn_threshold + 100]]


def test_core_receiver_refuses_items_beyond_the_connection_credit() -> None:
    c, s = open_pair(server_conn=MIN_CONN_WINDOW)
    rec = c.send_call("o", "up", msgspec.Raw(b"\x90"), CallFlags.STREAM_IN)
    s.receive_data(c.data_to_send())
    payload = msgspec.msgpack.encode([blob(20_000)])
    item = frame(Item(rec.id, 1, msgspec.Raw(payload)))  # framed by hand: the peer ignores its credit
    s.receive_data(item * 3)  # 3 x 20 KiB: within the 64 KiB window
    assert s.conn_recv == MIN_CONN_WINDOW - 3 * (len(payload) + ITEM_OVERHEAD)
    with pytest.raises(RemoteProtocolError, match="connection credit"):
        s.receive_data(item)  # a fourth does not fit


def test_core_items_dropped_on_arrival_give_their_credit_back() -> None:
    c, s = open_pair(server_conn=MIN_CONN_WINDOW)
    rec = c.send_call("o", "up", msgspec.Raw(b"\x90"), CallFlags.STREAM_IN)
    s.receive_data(c.data_to_send())
    s.send_reply(rec.id, msgspec.Raw(b"\xc0"))  # the callee answered early: later items are dropped
    item = [blob(5_000)]
    n = 0
    while c.send_items(rec.id, item):
        n += 1
    assert s.receive_data(c.data_to_send()) == []
    frames = messages(s.data_to_send())
    returned = sum(f[4] for f in frames if f[0] == 7)
    assert frames[0][0] == 3 and returned >= s.conn_threshold  # the REPLY, then connection credit
    c.receive_data(frame(Credit(0, 0, 0, returned)))
    assert c.send_items(rec.id, item)  # the sender goes on


def test_core_a_frame_larger_than_the_window_allows_is_refused_locally() -> None:
    c, s = open_pair(server_conn=MIN_CONN_WINDOW)
    rec = c.send_call("o", "up", msgspec.Raw(b"\x90"), CallFlags.STREAM_IN)
    most = MIN_CONN_WINDOW - MIN_CONN_WINDOW // 16
    assert c.conn_max_cost == most
    big = [blob(most)]
    c.data_to_send()
    with pytest.raises(LocalProtocolError, match="connection window"):
        c.send_items(rec.id, big)
    assert c.data_to_send() == b"" and rec.send_credit == xrpc.Limits().window  # nothing was sent
    fits = [blob(most - ITEM_OVERHEAD - 10)]
    assert cost_of(fits) <= most and c.send_items(rec.id, fits)


def test_core_credit_beyond_what_was_used_is_a_protocol_error() -> None:
    c, s = open_pair()
    with pytest.raises(RemoteProtocolError, match="more than was used"):
        c.receive_data(frame(Credit(0, 0, 0, 1)))  # nothing was sent yet: nothing to return
    c, s = open_pair()
    with pytest.raises(RemoteProtocolError):
        c.receive_data(frame(Credit(0, 5, 0, 0)))  # the connection has no stream credit


def test_core_an_older_peer_is_neither_limited_nor_sent_connection_credit() -> None:
    """A peer that announces no connection window: we send to it without a connection limit, we do
    not enforce ours on it (it does not know it), and we never send it a CREDIT for id 0."""
    s = ProtocolCore(client=False, conn_window=MIN_CONN_WINDOW, window_bytes=1 << 30)
    s.receive_data(frame(Hello(PROTOCOL_VERSION, 1 << 24, [], 1024, 1 << 30)))  # an older client
    s.send_welcome()
    assert not s.conn_limited and not s.conn_enforce
    s.data_to_send()
    s.receive_data(frame(Call(1, "o", "up", msgspec.Raw(b"\x90"), CallFlags.STREAM_IN | CallFlags.STREAM_OUT)))
    payload = msgspec.msgpack.encode([blob(30_000)])
    events = s.receive_data(b"".join(frame(Item(1, 1, msgspec.Raw(payload))) for _ in range(5)))  # 150 KB > 64 KiB
    assert len(events) == 5
    s.conn_pending += 1 << 20
    s.send_conn_credit()
    s.send_credit(1, 5, 5 * len(payload))
    assert messages(s.data_to_send()) == [[7, 1, 5, 5 * len(payload), 0]]  # no connection credit (it ignores the field)
    for _ in range(5):
        assert s.send_items(1, [blob(30_000)])  # no connection limit towards it


def test_core_client_assumes_the_least_window_until_the_welcome() -> None:
    c = ProtocolCore(client=True, conn_window=1 << 20)
    c.send_hello()
    c.data_to_send()
    # the server calls the client before its WELCOME; the client answers with a stream
    c.receive_data(frame(Call(2, "cb", "feed", msgspec.Raw(b"\x90"), CallFlags.STREAM_OUT)))
    item = [blob(20_000)]
    n = 0
    while c.send_items(2, item):
        n += 1
    assert n == MIN_CONN_WINDOW // cost_of(item)
    c.receive_data(frame(Welcome(PROTOCOL_VERSION, 1 << 24, [], 1024, 1 << 30, 1 << 20)))
    assert c.conn_send == (1 << 20) - n * cost_of(item)  # what it sent before still counts
    assert c.send_items(2, item)


# --------------------------------------------------------------------------- an older peer
class _OlderCore(ProtocolCore):
    """A client core as it was before connection flow control: it announces no connection window,
    ignores the server's, and returns no connection credit."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.conn_window = 0
        self.conn_limited = False

    def _peer_conn_window(self, window: int) -> None:
        self.conn_known = True


@pytest.mark.timeout(120)
async def test_an_older_client_and_a_newer_server_still_stream(monkeypatch: pytest.MonkeyPatch, sock_dir: str) -> None:
    import xrpc._connection as connection

    made: list[ProtocolCore] = []

    def core(*, client: bool, **kw: Any) -> ProtocolCore:
        made.append(_OlderCore(client=client, **kw) if client else ProtocolCore(client=client, **kw))
        return made[-1]

    monkeypatch.setattr(connection, "ProtocolCore", core)
    count = 4 * MiB // CHUNK
    server = xrpc.Server()
    server.export(Bulk, BulkImpl())
    async with serve_and_connect(server, f"unix://{sock_dir}/s.sock", timeout=T) as conn:
        bulk = conn.proxy(Bulk)
        (sconn,) = server.connections
        assert type(conn._core) is _OlderCore and not sconn._core.conn_enforce and not sconn._core.conn_limited

        async def source(k: int) -> AsyncIterator[bytes]:
            for i in range(count):
                yield chunk(k, i)

        async def up(k: int) -> None:
            assert (await bulk.upload(k, source(k)))[:2] == [count, 0]

        async def down(k: int) -> None:
            n = 0
            async for c in bulk.download(k, count):
                assert c == chunk(k, n)
                n += 1
            assert n == count

        with anyio.fail_after(6 * T):
            for direction in (up, down):
                async with anyio.create_task_group() as tg:
                    for k in range(6):
                        tg.start_soon(direction, k)


@pytest.mark.timeout(120)
async def test_an_older_client_cut_off_by_the_budget_learns_why(monkeypatch: pytest.MonkeyPatch, sock_dir: str) -> None:
    """Towards a peer that ignores connection credit the budget stays the last line: the server sends
    GOODBYE(LIMIT) and closes.  The client, busy writing, reports that reason as ``LimitExceeded``,
    not as the broken pipe it ran into."""
    import xrpc._connection as connection

    monkeypatch.setattr(connection, "ProtocolCore", lambda *, client, **kw: (_OlderCore if client else ProtocolCore)(client=client, **kw))
    count = 24 * MiB // CHUNK
    server = xrpc.Server()
    server.export(Bulk, BulkImpl())
    errors: list[BaseException] = []
    async with serve_and_connect(server, f"unix://{sock_dir}/s.sock", timeout=T) as conn:
        bulk = conn.proxy(Bulk)

        async def source(k: int) -> AsyncIterator[bytes]:
            for i in range(count):
                yield chunk(k, i)

        async def up(k: int) -> None:
            try:
                await bulk.upload(k, source(k))
            except xrpc.Error as exc:
                errors.append(exc)

        with anyio.fail_after(6 * T):
            async with anyio.create_task_group() as tg:
                for k in range(12):
                    tg.start_soon(up, k)
    assert len(errors) == 12
    assert all(isinstance(e, xrpc.LimitExceeded) and "memory budget" in str(e) for e in errors), errors


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pairs", [3, 8])
async def test_uploads_and_downloads_at_once_on_one_connection_complete(server_process: ServerProcess, pairs: int) -> None:
    """Streams in both directions at once: each side's own stream traffic fills its outgoing buffer,
    and neither side may stop reading because of it (both would wait for the other for ever)."""
    count = 4 * MiB // CHUNK
    async with xrpc.connect(server_process.url, timeout=T) as conn:
        bulk = conn.proxy(Bulk)
        up: dict[int, list[int]] = {}
        down: dict[int, int] = {}

        async def source(k: int) -> AsyncIterator[bytes]:
            for i in range(count):
                yield chunk(k, i)

        async def upload(k: int) -> None:
            up[k] = await bulk.upload(k, source(k))

        async def download(k: int) -> None:
            n = 0
            async for c in bulk.download(k, count):
                assert c == chunk(k, n)
                n += 1
            down[k] = n

        with anyio.fail_after(6 * T):
            async with anyio.create_task_group() as tg:
                for k in range(pairs):
                    tg.start_soon(upload, k)
                    tg.start_soon(download, 100 + k)
        assert await bulk.add(1, 2) == 3
    assert all(r[:2] == [count, 0] for r in up.values()) and len(up) == pairs, up
    assert down == {100 + k: count for k in range(pairs)}
