"""The runtime without sockets: two ``Connection`` objects wired to each other through ``MockIO``.

Everything above the driver is the real thing (the core, dispatch, serving inline and in tasks,
streams and their credit, cancellation, references, pipelining, back-pressure); only the kernel is
replaced by ``MockIO.pair()``, which hands what one end writes to the other on the next turn of the
loop and counts what the peer has not taken yet as the writer's send buffer.

Waiting rule: a condition is awaited on an event, or polled with a deadline (``until``); an upper
bound ("the producer stopped") is checked once everything in flight has landed (``settle``: round
trips until every task waits for something).  ``MockIO`` runs on asyncio only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
from typing import Any, AsyncIterator, Callable, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

import xrpc
from _wire import decode_frames, frame
from xrpc._io import Callbacks, MockIO
from xrpc._peer import Peer
from xrpc._protocol import ErrorCode

from _timeouts import T

CANCEL_TAG, GOODBYE_TAG, ERROR_TAG = 8, 10, 4


# --------------------------------------------------------------------------- the service
class Boom(Exception):
    """Declared: the caller sees it as itself, with its arguments."""


@xrpc.interface
class Listener(Protocol):
    async def changed(self, total: int) -> int: ...


@xrpc.interface
class Doc(Protocol):
    async def read(self) -> str: ...

    async def watch(self, listener: Listener) -> int:
        """Call ``listener.changed(7)`` back; what it returned."""
        ...


@xrpc.interface(errors=(Boom,))
class Svc(Protocol):
    async def add(self, a: int, b: int = 10, *, scale: int = 1) -> int: ...

    async def slow_add(self, a: int, b: int = 10) -> int: ...

    async def in_task(self) -> bool: ...

    async def in_task_quick(self) -> bool: ...

    async def in_task_awaiting(self) -> bool: ...

    @xrpc.oneway
    async def note(self, text: str) -> None: ...

    async def fail(self, declared: bool) -> None: ...

    async def hang(self) -> None: ...

    def count(self, n: int, step: int = 1) -> AsyncIterator[int]: ...

    def forever(self, size: int = 0, awaits: bool = False) -> AsyncIterator[bytes]: ...

    async def total(self, xs: AsyncIterator[int]) -> int: ...

    def scaled(self, factor: int, xs: AsyncIterator[int]) -> AsyncIterator[int]: ...

    async def blob(self, i: int, size: int) -> bytes: ...

    async def open(self, name: str) -> Doc: ...


class DocImpl:
    def __init__(self, name: str) -> None:
        self.name = name

    async def read(self) -> str:
        return f"doc {self.name}"

    async def watch(self, listener: Listener) -> int:
        return await listener.changed(7)


class SvcImpl:
    def __init__(self) -> None:
        self.ran: list[str] = []
        self.notes: list[str] = []
        self.noted = anyio.Event()
        self.hanging = anyio.Event()
        self.hang_cancelled = anyio.Event()
        self.produced = 0
        self.stopped = anyio.Event()
        self.served: list[int] = []
        self.open_gate: anyio.Event | None = None

    def add(self, a: int, b: int = 10, *, scale: int = 1) -> int:
        """A plain function: served inline, on the reader (no task)."""
        self.ran.append("add")
        return (a + b) * scale

    async def slow_add(self, a: int, b: int = 10) -> int:
        await anyio.lowlevel.checkpoint()  # it awaits: served in a task of its own
        return a + b

    def in_task(self) -> bool:
        return asyncio.current_task() is not None

    async def in_task_quick(self) -> bool:
        return asyncio.current_task() is not None  # never awaits: runs to its end on the reader

    async def in_task_awaiting(self) -> bool:
        await anyio.lowlevel.checkpoint()
        return asyncio.current_task() is not None

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.noted.set()

    async def fail(self, declared: bool) -> None:
        await anyio.lowlevel.checkpoint()
        if declared:
            raise Boom("declared failure", 42)
        raise KeyError("undeclared failure")

    async def hang(self) -> None:
        self.hanging.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.hang_cancelled.set()
            raise

    async def count(self, n: int, step: int = 1) -> AsyncIterator[int]:
        for i in range(0, n * step, step):
            self.produced += 1
            yield i

    async def forever(self, size: int = 0, awaits: bool = False) -> AsyncIterator[bytes]:
        """Numbered items of ``size`` bytes, without end; ``awaits``: the producer suspends before
        each one (so that none are gathered into a batch)."""
        try:
            while True:
                if awaits:
                    await anyio.lowlevel.checkpoint()
                self.produced += 1
                yield self.produced.to_bytes(4, "big") + bytes(max(0, size - 4))
        finally:
            self.stopped.set()

    async def total(self, xs: AsyncIterator[int]) -> int:
        return sum([x async for x in xs])

    async def scaled(self, factor: int, xs: AsyncIterator[int]) -> AsyncIterator[int]:
        async for x in xs:
            yield x * factor

    def blob(self, i: int, size: int) -> bytes:
        self.served.append(i)
        return bytes([i % 256]) * size

    async def open(self, name: str) -> Doc:
        if self.open_gate is not None:
            await self.open_gate.wait()
        if name == "missing":
            raise Boom("no such document", 404)
        return DocImpl(name)


# --------------------------------------------------------------------------- the pair
@dataclasses.dataclass
class Pair:
    client: xrpc.Connection
    server: xrpc.Connection
    client_io: MockIO
    server_io: MockIO
    impl: SvcImpl

    @property
    def svc(self) -> Svc:
        return self.client.proxy(Svc)


@contextlib.asynccontextmanager
async def mock_pair(
    impl: SvcImpl | None = None,
    *,
    limits: xrpc.Limits | None = None,
    keep_written: bool = False,
    on_interrupted: Callable[[], Any] | None = None,
    on_invalidated: Callable[[], Any] | None = None,
) -> AsyncIterator[Pair]:
    """A client connection and the server connection it talks to, over ``MockIO.pair()``, both
    running and past the handshake; both are closed at the end."""
    impl = impl or SvcImpl()
    client_io, server_io = MockIO.pair()
    client_io.keep_written = server_io.keep_written = keep_written
    server = xrpc.Connection(server_io, client=False, peer=Peer("mock", "client"), limits=limits)
    server.export(Svc, impl)
    client = xrpc.Connection(
        client_io,
        client=True,
        peer=Peer("mock", "server"),
        limits=limits,
        on_interrupted=on_interrupted,
        on_invalidated=on_invalidated,
    )
    body_exc: BaseException | None = None
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(T):
            await tg.start(server.run)  # first: what the client sends at once finds it running
            await tg.start(client.run)
            await server.admit(None, None)
            assert await client.handshake(T) is None
        try:
            yield Pair(client, server, client_io, server_io, impl)
        except BaseException as exc:  # re-raised below, outside the task group
            body_exc = exc
        finally:
            with anyio.fail_after(T, shield=True):
                await client.aclose()
                await server.aclose()
            tg.cancel_scope.cancel()
    if body_exc is not None:
        raise body_exc


async def until(cond: Callable[[], bool], conn: xrpc.Connection | None = None) -> None:
    """Wait for ``cond()``: a round trip on ``conn`` at a time, or a turn of the loop if None."""
    with anyio.fail_after(T):
        while not cond():
            if conn is not None:
                await conn.ping(T)
            else:
                await anyio.lowlevel.checkpoint()


async def settle(conn: xrpc.Connection) -> None:
    """Let what is in flight land: round trips on ``conn`` until every task waits for something."""
    with anyio.fail_after(T):
        for _ in range(3):
            await conn.ping(T)
            await anyio.wait_all_tasks_blocked()


def frames_of(io: MockIO) -> list[Any]:
    return decode_frames(b"".join(io.written))


# --------------------------------------------------------------------------- unary calls
async def test_unary_calls_inline_and_in_a_task() -> None:
    async with mock_pair() as p:
        svc = p.svc
        with anyio.fail_after(T):
            assert await svc.add(1, 2) == 3
            assert await svc.slow_add(1, 2) == 3
            # a plain function, or a coroutine that never awaits, runs on the reader; else in a task
            assert await svc.in_task() is False
            assert await svc.in_task_quick() is False
            assert await svc.in_task_awaiting() is True
            results: dict[int, int] = {}

            async def one(i: int) -> None:
                results[i] = await svc.slow_add(i, i)

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i)
            assert results == {i: 2 * i for i in range(20)}


async def test_unary_keyword_arguments() -> None:
    async with mock_pair() as p:
        svc = p.svc
        with anyio.fail_after(T):
            assert await svc.add(1) == 11
            assert await svc.add(1, b=2) == 3
            assert await svc.add(a=4, b=5) == 9
            assert await svc.add(2, scale=3) == 36
            assert await svc.add(2, 1, scale=2) == 6
            assert await svc.slow_add(a=1, b=1) == 2


async def test_one_way_call() -> None:
    async with mock_pair(keep_written=True) as p:
        with anyio.fail_after(T):
            await p.svc.note("hello")
            await p.impl.noted.wait()
            assert p.impl.notes == ["hello"]
            await settle(p.client)
    # never answered: the server wrote no REPLY nor ERROR for it
    assert [f for f in frames_of(p.server_io) if f[0] in (3, ERROR_TAG)] == []


async def test_declared_and_undeclared_errors() -> None:
    async with mock_pair() as p:
        with anyio.fail_after(T):
            with pytest.raises(Boom) as info:
                await p.svc.fail(True)
            assert type(info.value) is Boom and info.value.args == ("declared failure", 42)
            with pytest.raises(xrpc.RemoteError) as remote:
                await p.svc.fail(False)
            assert remote.value.type_name == "KeyError"
            assert await p.svc.add(1, 1) == 2  # the connection lives on


async def test_bad_arguments_are_refused_by_the_server_before_the_method_runs() -> None:
    async with mock_pair(keep_written=True) as p:
        with anyio.fail_after(T):
            with pytest.raises(xrpc.ValidationError) as info:
                await p.svc.add("one", 2)  # type: ignore[arg-type]
            assert info.value.argument == "a"
            with pytest.raises(xrpc.ValidationError):
                await p.svc.slow_add(1, b="two")  # type: ignore[arg-type]
            assert p.impl.ran == []
            assert await p.svc.add(1, 2) == 3
    errors = [f for f in frames_of(p.server_io) if f[0] == ERROR_TAG]
    assert [e[2] for e in errors] == [ErrorCode.VALIDATION, ErrorCode.VALIDATION]


async def test_unknown_object_and_method() -> None:
    async with mock_pair() as p:
        with anyio.fail_after(T):
            with pytest.raises(xrpc.ObjectNotFound):
                await p.client.proxy(Svc, "nobody").add(1)
            with pytest.raises(xrpc.MethodNotFound):  # (a proxy would refuse it before sending)
                await p.client.call_unary("Svc", xrpc.describe(Doc).methods["read"], (), {}, T)
            assert await p.svc.add(1, 1) == 2


# --------------------------------------------------------------------------- streams
async def test_server_stream() -> None:
    async with mock_pair() as p:
        with anyio.fail_after(T):
            assert [x async for x in p.svc.count(5)] == [0, 1, 2, 3, 4]
            assert [x async for x in p.svc.count(3, step=10)] == [0, 10, 20]
            assert [x async for x in p.svc.count(0)] == []
            assert [x async for x in p.svc.count(3000)] == list(range(3000))  # many credit windows


async def test_client_stream() -> None:
    async def numbers(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async with mock_pair() as p:
        with anyio.fail_after(T):
            assert await p.svc.total(numbers(10)) == 45
            assert await p.svc.total([1, 2, 3]) == 6  # type: ignore[arg-type]
            assert await p.svc.total(numbers(0)) == 0
            assert await p.svc.total(numbers(3000)) == sum(range(3000))


async def test_two_way_stream() -> None:
    async def numbers(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async with mock_pair() as p:
        with anyio.fail_after(T):
            assert [x async for x in p.svc.scaled(3, numbers(5))] == [0, 3, 6, 9, 12]
            assert [x async for x in p.svc.scaled(factor=2, xs=numbers(2000))] == [2 * i for i in range(2000)]


@pytest.mark.parametrize(
    ("limits", "size", "ahead"),
    [
        # item credit: at most a window ahead (and one item the producer made and holds)
        (xrpc.Limits(window=8, window_bytes=1 << 20), 0, 8 + 1),
        # byte credit: a window of bytes ahead, and the frame that passes it, and one item held
        (xrpc.Limits(window=1024, window_bytes=16 * 1024), 1024, 16 + 8 + 1),
    ],
    ids=["items", "bytes"],
)
async def test_a_consumer_that_stops_reading_stops_the_producer_within_a_window(limits: xrpc.Limits, size: int, ahead: int) -> None:
    async with mock_pair(limits=limits) as p:
        impl = p.impl
        with anyio.fail_after(T):
            stream: Any = p.svc.forever(size)  # a CallStream
            taken = 0
            async with stream:
                for _ in range(10):
                    await stream.__anext__()
                    taken += 1
                await settle(p.client)
                first = impl.produced
                assert taken < first <= taken + ahead  # ran ahead, but only as far as the credit goes
                await settle(p.client)
                assert impl.produced == first  # and stays there

                # reading on: the producer follows, still within a window
                for _ in range(200):
                    item = await stream.__anext__()
                    taken += 1
                    assert int.from_bytes(item[:4], "big") == taken
                await settle(p.client)
                assert taken < impl.produced <= taken + ahead
            await impl.stopped.wait()  # leaving the block stopped the producer


# --------------------------------------------------------------------------- cancellation
async def test_cancelling_the_callers_task_sends_cancel_and_cancels_the_method() -> None:
    async with mock_pair(keep_written=True) as p:
        with anyio.fail_after(T):
            async with anyio.create_task_group() as tg:
                tg.start_soon(p.svc.hang)
                await p.impl.hanging.wait()
                tg.cancel_scope.cancel()
            await p.impl.hang_cancelled.wait()
            assert await p.svc.add(1, 1) == 2  # the connection lives on
            assert p.server.in_flight == 0
    cancels = [f for f in frames_of(p.client_io) if f[0] == CANCEL_TAG]
    assert len(cancels) == 1


async def test_cancelling_a_consumer_task_stops_the_producer() -> None:
    async with mock_pair(keep_written=True) as p:
        got: list[bytes] = []

        async def consume() -> None:
            async for item in p.svc.forever():
                got.append(item)

        with anyio.fail_after(T):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await until(lambda: len(got) >= 3)
                tg.cancel_scope.cancel()
            await p.impl.stopped.wait()
            await until(lambda: p.server.in_flight == 0, p.client)
    assert [f for f in frames_of(p.client_io) if f[0] == CANCEL_TAG]


@pytest.mark.parametrize("how", ["break", "async with", "aclose"])
async def test_leaving_a_stream_early_stops_the_producer(how: str) -> None:
    async with mock_pair() as p:
        with anyio.fail_after(T):
            if how == "break":
                async for item in p.svc.forever():
                    if item[:4] == (3).to_bytes(4, "big"):
                        break
            elif how == "async with":
                stream: Any = p.svc.forever()
                async with stream:
                    async for item in stream:
                        break
            else:
                stream = p.svc.forever()
                await stream.__anext__()
                await stream.aclose()
            await p.impl.stopped.wait()
            await until(lambda: p.server.in_flight == 0, p.client)
            assert await p.svc.add(1, 1) == 2


# --------------------------------------------------------------------------- failure paths
@dataclasses.dataclass
class Outstanding:
    """A hanging call and a stream being drained, left outstanding while the connection ends: how each
    ended, and what the client's ``on_interrupted`` / ``on_invalidated`` callbacks saw."""

    interrupted: list[str] = dataclasses.field(default_factory=list)
    invalidated: list[str] = dataclasses.field(default_factory=list)
    outcomes: list[BaseException] = dataclasses.field(default_factory=list)

    def on_interrupted(self) -> None:
        self.interrupted.append("x")

    def on_invalidated(self) -> None:
        self.invalidated.append("x")

    async def start(self, p: Pair, tg: anyio.abc.TaskGroup) -> None:
        """Start both in ``tg``; return once the call hangs at the server and the stream has produced."""
        tg.start_soon(self._call, p.svc.hang)
        tg.start_soon(self._call, lambda: self._drain(p))
        await p.impl.hanging.wait()
        await until(lambda: p.impl.produced > 0)

    async def _call(self, fn: Callable[[], Any]) -> None:
        try:
            await fn()
        except Exception as exc:
            self.outcomes.append(exc)

    @staticmethod
    async def _drain(p: Pair) -> None:
        async for _ in p.svc.forever():
            pass


@pytest.mark.parametrize("end", ["client", "server"])
async def test_a_severed_connection_fails_outstanding_calls_as_interrupted(end: str) -> None:
    out = Outstanding()
    async with mock_pair(on_interrupted=out.on_interrupted, on_invalidated=out.on_invalidated) as p:
        with anyio.fail_after(T):
            async with anyio.create_task_group() as tg:
                await out.start(p, tg)
                (p.client_io if end == "client" else p.server_io).sever()
            await p.impl.hang_cancelled.wait()  # the server side gave up on the call too
            await p.impl.stopped.wait()
            assert len(out.outcomes) == 2 and all(type(e) is xrpc.ConnectionInterrupted for e in out.outcomes), out.outcomes
            assert isinstance(p.client.failure, xrpc.ConnectionInterrupted)
            assert p.client.closed
            assert out.interrupted == ["x"] and out.invalidated == ["x"]
            with pytest.raises(xrpc.ConnectionInvalidated):
                await p.svc.add(1, 1)
    assert out.interrupted == ["x"] and out.invalidated == ["x"]  # once


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1",  # not MessagePack (0xc1 is never used)
        frame([99, 1]),  # an unknown frame type
        frame([3, 999_999, b"\x01"]),  # a REPLY to a call nobody made
        b"\xff\xff\xff\xff",  # a frame larger than max_frame
    ],
    ids=["not-msgpack", "unknown-tag", "unknown-call", "too-large"],
)
@pytest.mark.parametrize("end", ["client", "server"])
async def test_garbage_ends_the_connection_with_a_protocol_error_and_goodbye(end: str, garbage: bytes) -> None:
    outcomes: list[BaseException] = []

    async def call() -> None:
        try:
            await p.svc.hang()
        except Exception as exc:
            outcomes.append(exc)

    async with mock_pair(keep_written=True) as p:
        victim, victim_io = (p.client, p.client_io) if end == "client" else (p.server, p.server_io)
        other = p.server if end == "client" else p.client
        with anyio.fail_after(T):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await p.impl.hanging.wait()
                victim_io.feed_raw(garbage)
                await until(lambda: victim.closed)
                await until(lambda: other.closed)
            await p.impl.hang_cancelled.wait()
        failure = victim.failure
        assert isinstance(failure, xrpc.ConnectionInterrupted) and "protocol error" in str(failure)
        # the victim said why, in a GOODBYE, as its last frame
        last = frames_of(victim_io)[-1]
        assert last[0] == GOODBYE_TAG and last[2] == ErrorCode.VALIDATION and last[1]
        assert isinstance(other.failure, xrpc.ConnectionInterrupted) and last[1][:40] in str(other.failure)
        assert len(outcomes) == 1 and type(outcomes[0]) is xrpc.ConnectionInterrupted


async def test_aclose_fails_outstanding_calls_as_invalidated() -> None:
    out = Outstanding()
    async with mock_pair(keep_written=True, on_interrupted=out.on_interrupted, on_invalidated=out.on_invalidated) as p:
        with anyio.fail_after(T):
            async with anyio.create_task_group() as tg:
                await out.start(p, tg)
                await p.client.aclose()
            await p.impl.hang_cancelled.wait()
            await p.impl.stopped.wait()
            await until(lambda: p.server.closed)
            assert len(out.outcomes) == 2 and all(type(e) is xrpc.ConnectionInvalidated for e in out.outcomes), out.outcomes
            assert type(p.client.failure) is xrpc.ConnectionInvalidated
            assert out.interrupted == [] and out.invalidated == ["x"]
            with pytest.raises(xrpc.ConnectionInvalidated):
                await p.svc.add(1, 1)
    last = frames_of(p.client_io)[-1]
    assert last[0] == GOODBYE_TAG and last[2] == 0  # a normal close
    assert out.interrupted == [] and out.invalidated == ["x"]


# --------------------------------------------------------------------------- pipelining and references
async def test_pipelined_calls_reach_the_server_before_the_first_answer() -> None:
    impl = SvcImpl()
    impl.open_gate = anyio.Event()
    async with mock_pair(impl) as p:
        with anyio.fail_after(T):
            promise = xrpc.pipeline(p.svc).open("a")
            read = promise.read()
            # both calls are at the server while the first one is still waiting
            await until(lambda: p.server.in_flight == 2, p.client)
            impl.open_gate.set()
            assert await read == "doc a"
            doc = await promise
            assert await doc.read() == "doc a"
            # a pipelined call on a call that fails: the promise raises the error, the call depending on it fails
            failing = xrpc.pipeline(p.svc).open("missing")
            with pytest.raises(xrpc.ObjectNotFound):
                await failing.read()
            with pytest.raises(Boom):
                await failing
            assert await p.svc.add(1, 1) == 2


class ListenerImpl:
    def __init__(self) -> None:
        self.seen: list[int] = []

    async def changed(self, total: int) -> int:
        self.seen.append(total)
        return total * 2


async def test_objects_by_reference_both_ways_and_released() -> None:
    async with mock_pair() as p:
        with anyio.fail_after(T):
            doc = await p.svc.open("b")
            assert await doc.read() == "doc b"
            assert p.server.exported_objects == 1 and p.client.remote_refs == 1
            listener = ListenerImpl()
            assert await doc.watch(listener) == 14  # the server called back into the client
            assert listener.seen == [7]
            # the server's proxy to the listener was released when the call ended
            await until(lambda: p.client.exported_objects == 0, p.client)
            del doc
            gc.collect()
            await until(lambda: p.server.exported_objects == 0, p.client)
            assert p.client.remote_refs == 0


# --------------------------------------------------------------------------- back-pressure
async def test_a_peer_that_does_not_read_stops_being_read_then_everything_is_answered_in_order() -> None:
    """While the client does not read, the server stops reading once it owes more than
    ``write_buffer_high``; once the client reads, every call is answered, in order."""
    high, size, n = 64 * 1024, 16 * 1024, 40
    async with mock_pair(limits=xrpc.Limits(write_buffer_high=high)) as p:
        results: dict[int, bytes] = {}

        async def call(i: int) -> None:
            results[i] = await p.svc.blob(i, size)

        with anyio.fail_after(T):
            p.client_io.pause_reading()
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(call, i)
                await until(lambda: not p.server_io.reading)
                await anyio.wait_all_tasks_blocked()
                # the server answered a little more than write_buffer_high, then stopped reading
                assert p.server_io.buffered() > high
                served = len(p.impl.served)
                assert high // size <= served <= high // size + 2
                assert not p.server_io.reading
                p.client_io.resume_reading()
            assert sorted(results) == list(range(n))
            assert all(v == bytes([i]) * size for i, v in results.items())
            assert p.impl.served == list(range(n))  # served in the order they were sent
            assert p.server_io.reading and p.server_io.buffered() == 0


async def test_a_stream_producer_waits_while_the_peer_does_not_read() -> None:
    high, size, n = 64 * 1024, 8 * 1024, 100
    limits = xrpc.Limits(write_buffer_high=high, window=1024, window_bytes=4 << 20)
    async with mock_pair(limits=limits) as p:
        got: list[int] = []

        async def consume() -> None:
            async for item in p.svc.forever(size, awaits=True):
                got.append(int.from_bytes(item[:4], "big"))
                if len(got) == n:
                    break

        with anyio.fail_after(T):
            p.client_io.pause_reading()
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await until(lambda: p.server_io.blocked())
                await anyio.wait_all_tasks_blocked()
                produced = p.impl.produced
                # what went out is the high-water mark and the item that passed it (and the
                # producer holds one more); the stream's credit would have let 512 go
                assert high // size < produced <= high // size + 2
                assert got == []
                p.client_io.resume_reading()
            assert got == list(range(1, n + 1))
            await p.impl.stopped.wait()


# --------------------------------------------------------------------------- the driver itself
class _Recorder:
    """Callbacks that record what a driver reports."""

    def __init__(self) -> None:
        self.fed: list[bytes] = []
        self.writable_calls = 0
        self.losses: list[BaseException | None] = []

    def callbacks(self) -> Callbacks:
        return self

    def feed_big(self, n: int) -> bool:
        return True

    def big_target(self) -> memoryview | None:
        return None

    def fds_received(self, fds: list[int], truncated: bool) -> bool:
        return True

    def lost(self, exc: BaseException | None) -> None:
        self.losses.append(exc)

    def feed(self, data: bytes) -> bool:
        self.fed.append(data)
        return True

    def writable(self) -> None:
        self.writable_calls += 1


async def test_mock_io_delivers_in_order_through_a_pause_and_counts_what_the_peer_has_not_taken() -> None:
    a, b = MockIO.pair()
    ra, rb = _Recorder(), _Recorder()
    a.bind(ra.callbacks(), high=10)
    b.bind(rb.callbacks(), high=10)
    await a.open()
    await b.open()
    with anyio.fail_after(T):
        b.pause_reading()
        a.write(b"one-")
        a.write(b"two-")
        await until(lambda: len(b._inbox) == 2)
        b.feed_raw(b"three")  # after what arrived before it
        assert rb.fed == [] and not b.reading
        assert a.buffered() == 8 and not a.blocked()
        a.write(b"four")
        assert a.buffered() == 12 and a.blocked()
        waiter_done = anyio.Event()

        async def writer() -> None:
            await a.wait_writable()
            waiter_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            await anyio.wait_all_tasks_blocked()
            assert not waiter_done.is_set()
            b.resume_reading()
            await waiter_done.wait()
        await until(lambda: len(rb.fed) == 4)
        assert rb.fed == [b"one-", b"two-", b"three", b"four"]
        assert a.buffered() == 0 and not a.blocked() and ra.writable_calls == 1
        a.sever()
        assert ra.losses and isinstance(ra.losses[0], ConnectionResetError) and a.done()
        await until(lambda: b.done())
        assert rb.fed[-1] == b""  # the peer saw the end of the stream
