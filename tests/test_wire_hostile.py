"""Hostile values inside well-formed frames, over real sockets.

* MessagePack extension types (anything but the timestamp, which is how a ``datetime`` travels) have
  no meaning in xrpc: a slot typed ``object``/``Any`` refuses them at any depth, on both sides (the
  server's arguments and client-stream items; the caller's replies, stream items and declared error
  arguments).  The refusal is a ``ValidationError`` for that call; the method never runs and the
  connection carries on.
* A CALL's deadline is the time left, in seconds.  NaN is refused (``ValidationError``); zero or less
  (``-inf`` included) has already passed (``TimeoutError``), and the method does not run; ``+inf`` is
  the same as no deadline.  Either way the connection carries on.

The server side runs as a child process, on asyncio and on trio, and its log must hold no ERROR and
no traceback.  The caller side is a real ``xrpc.connect`` facing a raw, hostile server.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import shutil
from typing import Annotated, Any, AsyncIterator, Iterator, Protocol

import anyio
import anyio.abc
import msgspec
import pytest

import xrpc
from xrpc._protocol import PROTOCOL_VERSION, Call, CallFlags, End, ErrorCode, Hello, Item, Reply, Welcome
from xrpc._protocol import Error as ErrorFrame

from _procs import ChildProcess, errors_in, log_to, serve_until_stdin_closes, short_dir
from _wire import CALL_TAG, ERROR_TAG, REPLY_TAG, WELCOME_TAG, frame, pop_frames
from _timeouts import T

Ext = msgspec.msgpack.Ext

# extension values a hostile peer may send: application codes, reserved negative codes, an empty
# body, and a timestamp code whose body is not a timestamp
BAD_TIMESTAMP = Ext(-1, b"not a timestamp")
EXTS = [Ext(0, b""), Ext(5, b"payload"), Ext(127, b"\x00" * 64), Ext(-2, b"x"), Ext(-128, b"yy"), BAD_TIMESTAMP]


def _nestings(ext: Ext) -> list[Any]:
    return [ext, [1, ext], {"k": [ext]}, [{"a": {"b": [None, ext]}}]]


HOSTILE_VALUES = [v for e in EXTS for v in _nestings(e)]


# --------------------------------------------------------------------------- the service
class Point(msgspec.Struct):
    x: float
    y: float


class Rec(msgspec.Struct):
    name: str
    extra: Any = None


@xrpc.interface
class Hostile(Protocol):
    async def take(self, x: object) -> int: ...
    async def take_nested(self, label: str, x: dict[str, list[Any]]) -> int: ...
    async def take_rec(self, r: Rec) -> int: ...
    async def take_widened(self, x: Annotated[object, xrpc.allow(Point)]) -> int: ...
    async def take_stream(self, xs: AsyncIterator[object]) -> int: ...
    @xrpc.oneway
    async def note(self, x: object) -> None: ...
    async def add(self, a: int, b: int) -> int: ...
    async def runs(self) -> int: ...
    async def when(self, t: object) -> datetime.datetime: ...


class HostileImpl:
    def __init__(self) -> None:
        self.ran = 0

    async def take(self, x: object) -> int:
        self.ran += 1
        return 1

    async def take_nested(self, label: str, x: dict[str, list[Any]]) -> int:
        self.ran += 1
        return 1

    async def take_rec(self, r: Rec) -> int:
        self.ran += 1
        return 1

    async def take_widened(self, x: object) -> int:
        self.ran += 1
        return 1

    async def take_stream(self, xs: AsyncIterator[object]) -> int:
        n = 0
        async for _ in xs:
            n += 1
        self.ran += 1
        return n

    async def note(self, x: object) -> None:
        self.ran += 1

    async def add(self, a: int, b: int) -> int:
        await anyio.sleep(0)  # not served inline: the deadline goes through a task
        self.ran += 1
        return a + b

    async def runs(self) -> int:
        return self.ran

    async def when(self, t: object) -> datetime.datetime:
        assert isinstance(t, datetime.datetime)
        return t


def _server_main(path: str, backend: str, log_path: str) -> None:
    """Entry point of the server child process."""
    log_to(log_path)

    async def main() -> None:
        server = xrpc.Server()
        server.export(Hostile, HostileImpl())
        async with server.listen(f"unix://{path}") as listener:
            await serve_until_stdin_closes(listener.url)

    anyio.run(main, backend=backend)


class ServerProcess(ChildProcess):
    def __init__(self, backend: str) -> None:
        super().__init__()
        self.start("test_wire_hostile", self.path, backend, self.log_path)


@pytest.fixture(params=["asyncio", "trio"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """The ``Hostile`` service in a child process on one backend; its log must stay clean."""
    sp = ServerProcess(request.param)
    try:
        yield sp
    finally:
        alive = sp.alive()
        lines = sp.stop()
    assert alive, f"the server process died: {lines[-20:]}"
    bad = errors_in(lines)
    assert bad == [], "\n".join(lines[-40:])
    assert sp.proc.returncode == 0, lines[-20:]


# --------------------------------------------------------------------------- a raw peer
def payload(*values: Any) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(list(values)))


class RawPeer:
    """One end of an xrpc connection driven frame by frame."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def send(self, *msgs: Any) -> None:
        await self.stream.send(b"".join(frame(m) for m in msgs))

    async def recv(self) -> list[Any]:
        """The next frame, as a plain msgpack array (tag first); EndOfStream once the peer closes."""
        while not (got := pop_frames(self.buf, at_most=1)):
            self.buf += await self.stream.receive()
        return got[0]  # type: ignore[no-any-return]

    async def answer(self, call_id: int) -> list[Any]:
        """The REPLY or ERROR for ``call_id`` (other frames are skipped)."""
        while True:
            f = await self.recv()
            if f[0] in (REPLY_TAG, ERROR_TAG) and f[1] == call_id:
                return f


@contextlib.asynccontextmanager
async def raw_client(path: str) -> AsyncIterator[RawPeer]:
    async with await anyio.connect_unix(path) as stream:
        peer = RawPeer(stream)
        await peer.send(Hello(PROTOCOL_VERSION, 1 << 20))
        assert (await peer.recv())[0] == WELCOME_TAG
        yield peer


def call(call_id: int, method: str, body: msgspec.Raw, flags: int = 0, deadline: float | None = None) -> Call:
    return Call(call_id, "Hostile", method, body, flags, deadline)


async def runs(peer: RawPeer, call_id: int) -> int:
    """How many times a method of the service ran; proves the connection still serves calls."""
    await peer.send(call(call_id, "runs", payload()))
    f = await peer.answer(call_id)
    assert f[0] == REPLY_TAG, f
    return f[2]  # type: ignore[no-any-return]


def assert_validation_error(f: list[Any], argument: str) -> None:
    assert f[0] == ERROR_TAG, f
    assert f[2] == ErrorCode.VALIDATION, f
    assert f[3] == "ValidationError", f
    assert "MessagePack extension" in f[4] or "MessagePack timestamp" in f[4], f
    assert f[5] == [argument], f


# --------------------------------------------------------------------------- extension types, server side
@pytest.mark.timeout(120)
async def test_extension_types_in_arguments_are_refused(server: ServerProcess) -> None:
    with anyio.fail_after(6 * T):
        async with raw_client(server.path) as peer:
            ids = iter(range(1, 1 << 20, 2))
            for value in HOSTILE_VALUES:
                for method, body, argument in [
                    ("take", payload(value), "x"),
                    ("take_nested", payload("label", {"k": [1, value]}), "x"),
                    ("take_rec", payload({"name": "n", "extra": value}), "r"),
                    ("take_widened", payload(["", value]), "x"),
                ]:
                    call_id = next(ids)
                    await peer.send(call(call_id, method, body))
                    assert_validation_error(await peer.answer(call_id), argument)
                # a one-way call is dropped without an answer
                await peer.send(call(next(ids), "note", payload(value), CallFlags.ONEWAY))
            assert await runs(peer, next(ids)) == 0  # nothing ran, and the connection still serves

            # plain data, a datetime (the timestamp extension) included, still goes through
            call_id = next(ids)
            await peer.send(call(call_id, "take", payload([1, {"k": b"bytes"}, datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc)])))
            assert (await peer.answer(call_id))[0] == REPLY_TAG
            assert await runs(peer, next(ids)) == 1

    # and through the API: the same server answers a well-behaved client
    async with xrpc.connect(server.url, timeout=T) as conn:
        p = conn.proxy(Hostile)
        t = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        assert await p.when(t) == t
        assert await p.add(1, 2) == 3


@pytest.mark.timeout(60)
async def test_extension_types_in_client_stream_items_are_refused(server: ServerProcess) -> None:
    with anyio.fail_after(3 * T):
        async with raw_client(server.path) as peer:
            ids = iter(range(1, 1 << 20, 2))
            for value in [Ext(3, b"x"), [Ext(0, b"")], {"k": Ext(-7, b"")}]:
                call_id = next(ids)
                await peer.send(
                    call(call_id, "take_stream", payload(), CallFlags.STREAM_IN),
                    Item(call_id, 2, payload(1, value)),  # type: ignore[arg-type]
                    End(call_id),
                )
                f = await peer.answer(call_id)
                assert f[0] == ERROR_TAG and f[2] == ErrorCode.VALIDATION, f
                assert "MessagePack extension" in f[4], f
            assert await runs(peer, next(ids)) == 0


# --------------------------------------------------------------------------- extension types, caller side
async def _hostile_server(listener: anyio.abc.Listener[Any], value: Any) -> None:
    """Answer one xrpc client with ``value`` (raw msgpack) in every reply, item and error argument;
    ``add`` is answered honestly."""

    async def handle(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            peer = RawPeer(stream)
            assert (await peer.recv())[0] == 0  # HELLO
            await peer.send(Welcome(PROTOCOL_VERSION, 1 << 20))
            raw = msgspec.Raw(msgspec.msgpack.encode(value))
            while True:
                try:
                    f = await peer.recv()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                if f[0] != CALL_TAG:
                    continue
                call_id, method = f[1], f[3]
                if method == "echo":
                    await peer.send(Reply(call_id, raw))
                elif method == "items":
                    await peer.send(Item(call_id, 2, payload(1, value)), End(call_id))  # type: ignore[arg-type]
                elif method == "fail":
                    await peer.send(ErrorFrame(call_id, ErrorCode.DECLARED, "Oops", "oops", [value]))
                elif method == "add":
                    a, b = f[4]
                    await peer.send(Reply(call_id, msgspec.Raw(msgspec.msgpack.encode(a + b))))

    async with listener:
        await listener.serve(handle)


class Oops(Exception):
    pass


@xrpc.interface(name="Hostile", errors=(Oops,))
class Victim(Protocol):
    async def echo(self) -> object: ...
    def items(self) -> AsyncIterator[Any]: ...
    async def fail(self) -> None: ...
    async def add(self, a: int, b: int) -> int: ...


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=[f"{i}" for i in range(len(HOSTILE_VALUES))])
async def test_extension_types_from_a_hostile_server_are_refused(value: Any) -> None:
    d = short_dir()
    try:
        with anyio.fail_after(T):
            listener = await anyio.create_unix_listener(f"{d}/s.sock")
            async with anyio.create_task_group() as tg:
                tg.start_soon(_hostile_server, listener, value)
                async with xrpc.connect(f"unix://{d}/s.sock") as conn:
                    p = conn.proxy(Victim)
                    with pytest.raises(xrpc.ValidationError, match="MessagePack (extension|timestamp)") as info:
                        await p.echo()
                    assert info.value.method == "echo"
                    got = []
                    with pytest.raises(xrpc.ValidationError, match="MessagePack (extension|timestamp)"):
                        async for item in p.items():
                            got.append(item)
                    assert got == [1]  # the valid item before the refused one is still handed out
                    if value not in _nestings(BAD_TIMESTAMP):
                        # (error arguments travel in the envelope: a malformed timestamp there is
                        # a malformed frame, which ends the connection)
                        with pytest.raises(xrpc.ValidationError, match="MessagePack extension") as info:
                            await p.fail()
                        assert info.value.method == "fail"
                    assert await p.add(20, 22) == 42  # the connection carries on
                tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- deadlines
@pytest.mark.timeout(60)
async def test_hostile_deadlines(server: ServerProcess) -> None:
    with anyio.fail_after(3 * T):
        async with raw_client(server.path) as peer:
            ids = iter(range(1, 1 << 20, 2))
            for deadline in (math.nan, -math.nan):
                call_id = next(ids)
                await peer.send(call(call_id, "add", payload(1, 2), deadline=deadline))
                f = await peer.answer(call_id)
                assert f[0] == ERROR_TAG and f[2] == ErrorCode.VALIDATION and f[3] == "ValidationError", f
                assert "deadline" in f[4], f
            for deadline in (0.0, -0.0, -1.0, -1e300, -math.inf):
                call_id = next(ids)
                await peer.send(call(call_id, "add", payload(1, 2), deadline=deadline))
                f = await peer.answer(call_id)
                assert f[0] == ERROR_TAG and f[2] == ErrorCode.TIMEOUT, f
            # a stream call is answered alike, and what the peer sends on it afterwards is ignored
            call_id = next(ids)
            await peer.send(call(call_id, "take_stream", payload(), CallFlags.STREAM_IN, deadline=math.nan))
            f = await peer.answer(call_id)
            assert f[0] == ERROR_TAG and f[2] == ErrorCode.VALIDATION, f
            await peer.send(Item(call_id, 1, payload(1)), End(call_id))  # type: ignore[arg-type]
            # a one-way call is dropped
            await peer.send(call(next(ids), "note", payload(1), CallFlags.ONEWAY, deadline=math.nan))
            await peer.send(call(next(ids), "note", payload(1), CallFlags.ONEWAY, deadline=-1.0))
            assert await runs(peer, next(ids)) == 0  # nothing ran; the connection carries on

            # +inf is no deadline; a huge finite deadline or an integer one is a deadline like any other
            for deadline in (math.inf, 1e300, 2.0**64, 30):
                call_id = next(ids)
                await peer.send(call(call_id, "add", payload(1, 2), deadline=deadline))
                f = await peer.answer(call_id)
                assert f[0] == REPLY_TAG and f[2] == 3, (deadline, f)
            assert await runs(peer, next(ids)) == 4


@pytest.mark.timeout(60)
async def test_an_infinite_timeout_is_no_timeout(server: ServerProcess) -> None:
    with anyio.fail_after(T):
        async with xrpc.connect(server.url, timeout=T) as conn:
            assert await conn.proxy(Hostile, timeout=math.inf).add(2, 3) == 5
