"""The runtime: drives one ``ProtocolCore`` over one byte stream with anyio.

Theory of operation
-------------------
A ``Connection`` runs inside its own task group: one reader task feeds received bytes to the core and
dispatches the messages it returns; one writer task sends what the core has encoded, so that all the
frames produced between two writes leave as one (coalesced) write; and one task per incoming call runs
the exported method.  Closing the connection cancels the task group, so no task outlives it.

Dispatch is synchronous in the reader: a REPLY wakes the waiting caller, an ITEM lands in its stream's
queue, a CALL starts a task.  Frames that start work on this side (the peer's calls and everything
about them) wait behind a *gate* until ``on_connect`` (server) has finished, so nothing the peer sends
early is lost or handled before the handler that should see it is in place.

What this module must not do: decide protocol legality (the core does) or know about URLs (the
transports do).
"""

from __future__ import annotations

import array
import asyncio
import collections
import functools
import contextlib
import contextvars
import dis
import inspect
import logging
import math
import os
import socket
import ssl
import threading
import time
import types
import weakref
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from ._errors import (
    TransportError,
    ConnectionInterrupted,
    ConnectionInvalidated,
    Error,
    LimitExceeded,
    LocalProtocolError,
    MethodNotFound,
    ObjectNotFound,
    PeerRejected,
    RemoteError,
    RemoteProtocolError,
    ValidationError,
)
from ._interface import InterfaceDescription, MethodDescription, MethodKind, _plain_error, describe, is_default
from ._peer import Peer
from ._proxy import check_compat, make_proxy, proxy_target, set_release
from ._protocol import (
    ITEM_OVERHEAD,
    Call,
    CallFlags,
    CallRecord,
    Cancel,
    Credit,
    End,
    ErrorCode,
    ExportInfo,
    Goodbye,
    Hello,
    Item,
    Pong,
    ProtocolCore,
    Ref,
    Release,
    Reply,
    State,
    Welcome,
    conn_window_for,
)
from ._protocol import Error as ErrorFrame

__all__ = (
    "CallContext",
    "Connection",
    "Export",
    "ExportSpec",
    "Limits",
    "Middleware",
    "call_metadata",
    "current_connection",
    "current_metadata",
)

log = logging.getLogger("xrpc")
_T = TypeVar("_T")

_current: contextvars.ContextVar[Connection] = contextvars.ContextVar("xrpc_connection")
_metadata: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("xrpc_metadata", default=None)


def current_metadata() -> dict[str, str]:
    """The call metadata in effect: inside a remote method, what its caller sent (it propagates to
    the calls that method makes); elsewhere, what ``call_metadata()`` set."""
    return dict(_metadata.get() or {})


@contextlib.contextmanager
def call_metadata(**items: str) -> Iterator[dict[str, str]]:
    """Add ``items`` to the metadata of every call made in this block (and in tasks it starts)."""
    merged = {**(_metadata.get() or {}), **items}
    token = _metadata.set(merged)
    try:
        yield merged
    finally:
        _metadata.reset(token)


class CallContext:
    """What a middleware sees of one call: the method, the connection and its peer, the arguments,
    and the metadata (a client middleware may add to it before the call is sent)."""

    __slots__ = ("method", "connection", "args", "kwargs", "metadata", "side")

    def __init__(self, method: MethodDescription, connection: Connection, args: tuple[Any, ...], kwargs: dict[str, Any], metadata: dict[str, str], side: str) -> None:
        self.method = method
        self.connection = connection
        self.args = args
        self.kwargs = kwargs
        self.metadata = metadata
        self.side = side  # "client" or "server"

    @property
    def peer(self) -> Peer:
        return self.connection.peer

    def __repr__(self) -> str:
        return f"<CallContext {self.side} {self.method.qualname} peer={self.connection._peer_name()}>"


Middleware = Callable[[CallContext, Callable[[], Awaitable[Any]]], Awaitable[Any]]


async def _chain(middleware: Sequence[Middleware], ctx: CallContext, last: Callable[[], Awaitable[Any]]) -> Any:
    async def step(i: int) -> Any:
        if i == len(middleware):
            return await last()
        return await middleware[i](ctx, lambda: step(i + 1))

    return await step(0)

ExportSpec = Sequence[Any]  # (Iface, obj) or (Iface, obj, name)


def current_connection() -> Connection:
    """The connection whose call is being served (inside a remote method)."""
    try:
        return _current.get()
    except LookupError:
        raise LookupError("xrpc.current_connection() is only available inside a remote method") from None


class Limits(msgspec.Struct, kw_only=True):
    """Per-connection limits, all configurable.

    ``max_buffered`` is the connection's memory budget: the stream items received and not yet
    consumed, the calls held behind the ``on_connect`` gate and a large frame being reassembled are
    drawn from it.  Above half of it, a stream that still holds items gets no credit back until its
    consumer has taken them; a peer that makes this side hold more than all of it is sent GOODBYE
    (code LIMIT) and the connection ends with ``LimitExceeded``.  A peer that honours its credit never
    gets there, however many streams it fills: the connection window announced to it, for all its
    stream items together, is ``max_buffered - max_frame - 4`` (at least 64 KiB).  An item larger
    than 15/16 of the peer's connection window cannot be sent.  The arguments of calls in flight are
    drawn from the budget too (those over 1 KiB, from the CALL until the call ends): a call whose
    frame and decoded arguments do not fit in what is left is refused with ``LimitExceeded`` before
    it runs, and the connection lives on.  Outgoing data is bounded by
    back-pressure instead: above ``write_buffer_high`` buffered bytes producers wait, and once
    reading has produced more than that of answers the peer has not read, the connection stops
    reading (and serving) what the peer sends until it does.

    ``handshake_max_frame`` bounds what a peer that has not been admitted yet can make a server
    hold: until the client's HELLO has arrived (and so before the server's requirement is checked),
    the largest frame accepted is the smaller of it and ``max_frame``.  A HELLO carries the
    client's export list with a signature per method, a few KiB for a typical client; a larger one
    is refused with GOODBYE saying why.  From HELLO on, ``max_frame`` applies, and a large frame
    being assembled counts against ``max_buffered`` (behind the ``on_connect`` gate too).
    """

    max_frame: int = 16 * 1024 * 1024
    window: int = 1024  # stream credit in items, granted per stream received
    window_bytes: int = 4 * 1024 * 1024  # ... and in bytes
    handshake_timeout: float = 10.0
    handshake_max_frame: int = 1024 * 1024  # the largest frame a server accepts before HELLO (see below)
    max_calls_in_flight: int = 4096  # incoming calls served at once, per connection
    write_buffer_high: int = 1024 * 1024  # producers wait for the writer above this many buffered bytes
    max_objects: int = 10_000  # objects exported by reference on one connection
    max_fds: int = 64  # received file descriptors (SCM_RIGHTS) not yet claimed by a decoded value, per connection
    max_streams: int = 1024  # incoming stream calls open at once, per connection
    idle_timeout: float | None = None  # close a connection that received nothing for this long (seconds)
    max_buffered: int = 32 * 1024 * 1024  # bytes a peer may make this side hold for it (see below)


_GUARD_CACHE_SIZE = 256  # requirement verdicts cached per connection
# Arguments of at most this many bytes are not drawn from the budget while their call runs (the
# frame is let go once they are decoded): max_calls_in_flight of them hold at most 4 MiB.
_SMALL_ARGS = 1024
_NO_PAYLOAD = msgspec.Raw(b"")
_force_setattr = msgspec.structs.force_setattr


def _explain(requirement: Any, peer: Peer) -> str:
    try:
        return str(requirement.explain(peer))
    except Exception as exc:  # a custom requirement that fails to explain itself still refuses
        return f"{requirement} failed ({exc!r})"


class Export:
    """An object exported under a name, with its interface description and bound methods."""

    __slots__ = ("desc", "obj", "name", "methods", "is_async", "guards", "inline")

    def __init__(self, desc: InterfaceDescription, obj: Any, name: str, requirement: Any = None) -> None:
        self.desc = desc
        self.obj = obj
        self.name = name
        self.methods: dict[str, Callable[..., Any]] = {}
        self.is_async: dict[str, bool] = {}
        self.guards: dict[str, Any] = {}  # method name -> the Requirement a caller must satisfy
        self.inline: set[str] = set()  # methods that can run on the reader: plain functions, or coroutines that never await
        if isinstance(requirement, str):
            from ._requirements import requirement as parse

            requirement = parse(requirement)
        missing = []
        for mname in desc.methods:
            fn = getattr(obj, mname, None)
            if fn is None or not callable(fn):
                missing.append(mname)
                continue
            self.methods[mname] = fn
            self.is_async[mname] = inspect.iscoroutinefunction(fn)
            if not self.is_async[mname] or _never_suspends(fn):
                self.inline.add(mname)
            parts = [r for r in (requirement, desc.methods[mname].requirement, getattr(fn, "__xrpc_requires__", None)) if r is not None]
            if parts:
                guard = parts[0]
                for r in parts[1:]:
                    guard = guard & r
                self.guards[mname] = guard
        if missing:
            raise TypeError(f"{type(obj).__qualname__} does not implement {desc.name}: missing {', '.join(missing)}")

    def info(self) -> ExportInfo:
        return ExportInfo(self.name, self.desc.name, self.desc.fingerprint, {m.name: m.signature for m in self.desc.methods.values()})


_SUSPENDING_OPS = frozenset({"YIELD_VALUE", "SEND", "GET_AWAITABLE", "BEFORE_ASYNC_WITH", "GET_AITER", "GET_ANEXT"})


def _never_suspends(fn: Callable[..., Any]) -> bool:
    """Is ``fn`` an ``async def`` whose body has no ``await``, ``async with`` or ``async for``?

    Such a coroutine finishes in one step, so it can run on the reader without a task of its own.
    """
    code = getattr(inspect.unwrap(getattr(fn, "__func__", fn)), "__code__", None)
    if code is None:
        return False
    try:
        return not any(ins.opname in _SUSPENDING_OPS for ins in dis.get_instructions(code))
    except (TypeError, ValueError):
        return False


class _OneShotExport(Export):
    """An export whose one method is already running: ``fn()`` finishes it."""

    def __init__(self, base: Export, name: str, fn: Callable[[], Any]) -> None:  # noqa: D107
        self.desc = base.desc
        self.obj = base.obj
        self.name = base.name
        self.methods = {name: fn}
        self.is_async = {name: True}
        self.guards = {}
        self.inline = set()


def make_export(iface: Any, obj: Any, name: str = "", requirement: Any = None) -> Export:
    if name[:1] in ("#", "^"):  # those name references and pipelined results on the wire
        raise ValueError(f"an export name may not start with {name[0]!r}: {name!r}")
    desc = describe(iface)
    return Export(desc, obj, name or desc.name, requirement)


def _exports_from(specs: Iterable[Any]) -> dict[str, Export]:
    out: dict[str, Export] = {}
    for spec in specs:
        if isinstance(spec, Export):
            out[spec.name] = spec
            continue
        if len(spec) == 2:
            e = make_export(spec[0], spec[1])
        elif len(spec) == 3:
            e = make_export(spec[0], spec[1], spec[2])
        else:
            raise TypeError("exports= takes (Iface, obj) or (Iface, obj, name) tuples")
        out[e.name] = e
    return out


# --------------------------------------------------------------------------- caller-side call states
class _Pending:
    """A call waiting for its answer (an asyncio future on asyncio, an anyio Event elsewhere)."""

    __slots__ = ("fut", "event", "result")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.result: Any = None  # a Reply, an Error frame, or an exception to raise
        if loop is not None:
            self.fut: asyncio.Future[None] | None = loop.create_future()
            self.event: anyio.Event | None = None
        else:
            self.fut = None
            self.event = anyio.Event()

    def deliver(self, value: Any) -> None:
        if self.result is not None:
            return
        self.result = value
        if self.fut is not None:
            if not self.fut.done():
                self.fut.set_result(None)
        else:
            self.event.set()  # type: ignore[union-attr]

    async def wait(self) -> None:
        if self.fut is not None:
            await self.fut
        else:
            await self.event.wait()  # type: ignore[union-attr]


class _EagerPending(_Pending):
    """A pipelined call's answer, decoded as soon as it arrives (so references in it are adopted,
    and released, even if nobody ever awaits the promise)."""

    __slots__ = ("conn", "m", "value", "error")

    def __init__(self, conn: Connection, m: MethodDescription) -> None:
        super().__init__(conn._loop)
        self.conn = conn
        self.m = m
        self.value: Any = None
        self.error: BaseException | None = None

    def deliver(self, value: Any) -> None:
        if self.result is not None:
            return
        try:
            self.value = self.conn._result(self.m, value)
        except BaseException as exc:  # noqa: BLE001 - kept for whoever awaits the promise
            self.error = exc
        super().deliver(value)


class _StreamQueue:
    """Batches of items arriving on one stream, with the receiving side's credit bookkeeping.

    Items arrive as ITEM frames of one or more items.  The consumer decodes a whole batch at once
    (one msgspec call for many items) and returns the credit when it takes the batch.  A batch's
    size is its connection cost (payload plus ``ITEM_OVERHEAD``): the stream's byte credit, the
    budget and the connection credit all count it.  Its connection credit is free again once the
    consumer has taken the whole batch, or once the queue is discarded.
    """

    __slots__ = (
        "conn", "call_id", "batches", "event", "end", "error", "consumed", "consumed_bytes", "threshold", "bytes_threshold", "held",
        "unreturned", "dead",
    )

    def __init__(self, conn: Connection, call_id: int) -> None:
        self.conn = conn
        self.call_id = call_id
        self.batches: collections.deque[tuple[Any, int, int]] = collections.deque()
        self.event: anyio.Event | None = None
        self.end = False
        self.error: Any = None  # an Error frame or an exception
        self.consumed = 0
        self.consumed_bytes = 0
        self.threshold = max(1, conn._core.window // 2)
        self.bytes_threshold = max(1, conn._core.window_bytes // 2)
        self.held = 0  # bytes of the batches queued, drawn from the connection's budget
        self.unreturned = 0  # connection credit of the batches queued or being taken
        self.dead = False

    def push(self, payload: Any, count: int, size: int) -> None:
        if self.dead:
            self.conn._conn_freed(size)
            return
        self.batches.append((payload, count, size))
        self.held += size
        self.unreturned += size
        self.conn._held += size
        if self.event is not None:
            self.event.set()

    def discard(self) -> None:
        """Nobody will consume the rest: give its bytes back to the budget, and its credit to the
        connection."""
        self.dead = True
        self.batches.clear()
        self.conn._deferred_credit.pop(self, None)
        self.conn._release(self.held)
        self.held = 0
        freed = self.unreturned
        self.unreturned = 0
        self.conn._conn_freed(freed)

    def batch_taken(self, nbytes: int) -> None:
        """The consumer has taken the last item of a batch of ``nbytes``: its connection credit is
        free (it goes back with the stream credit if that is due now, else on its own once enough
        has accumulated)."""
        self.consumed_bytes += nbytes
        if self.unreturned:
            freed = min(nbytes, self.unreturned)
            self.unreturned -= freed
            core = self.conn._core
            core.conn_pending += freed
            if core.conn_pending >= core.conn_threshold and not (
                self.consumed >= self.threshold or self.consumed_bytes >= self.bytes_threshold
            ):
                self.conn._return_conn_credit()

    def finish(self, error: Any = None) -> None:
        self.end = True
        if error is not None and self.error is None:
            self.error = error
        if self.event is not None:
            self.event.set()

    async def next_batch(self) -> tuple[Any, int, int]:
        """The next raw batch, its item count and size; ``StopAsyncIteration`` at the end."""
        while not self.batches:
            if self.end:
                raise StopAsyncIteration
            self.event = anyio.Event()
            await self.event.wait()
        batch = self.batches.popleft()
        self.held -= batch[2]
        self.conn._release(batch[2])
        return batch

    def consumed_items(self, count: int, nbytes: int) -> None:
        """The consumer took ``count`` items (and ``nbytes`` of frames, ending a batch): return
        credit when due."""
        self.consumed += count
        if nbytes:
            self.batch_taken(nbytes)
        if self.consumed >= self.threshold or self.consumed_bytes >= self.bytes_threshold:
            conn = self.conn
            if conn._held > conn._credit_mark and self.batches:
                # over half the budget: no credit while this stream still holds items (once its
                # consumer has taken them all, it gets its credit back, so it cannot starve)
                conn._deferred_credit[self] = None
                conn._return_conn_credit()
                return
            if not self.end:
                conn._core.send_credit(self.call_id, self.consumed, self.consumed_bytes)  # with the connection credit
                conn._kick()
            else:
                conn._return_conn_credit()
            self.consumed = 0
            self.consumed_bytes = 0


class _BatchReader:
    """Turns a ``_StreamQueue`` into decoded items, one batch at a time.

    Credit goes back as items are handed out (not when a batch arrives), so a producer is never
    more than one window ahead of its consumer.  If a batch holds a refused item, the valid items
    before it are still handed out, then the ``ValidationError`` is raised.
    """

    __slots__ = ("queue", "slot", "m", "items", "pos", "batch_bytes", "error")

    def __init__(self, queue: _StreamQueue, slot: Any, m: MethodDescription) -> None:
        self.queue = queue
        self.slot = slot
        self.m = m
        self.items: list[Any] = []
        self.pos = 0
        self.batch_bytes = 0
        self.error: BaseException | None = None

    def take(self) -> Any:
        """The next item of the batch already decoded, without suspending (``_EMPTY`` if none);
        it counts as consumed."""
        pos = self.pos
        items = self.items
        if pos >= len(items):
            return _EMPTY
        self.pos = pos + 1
        q = self.queue
        q.consumed += 1
        if pos + 1 == len(items):
            # the batch is all handed out: let go of it, as its connection credit goes back now
            self.items = _NO_ITEMS
            self.pos = 0
            q.batch_taken(self.batch_bytes)
        return items[pos]

    def credit_due(self) -> bool:
        q = self.queue
        return q.consumed >= q.threshold or q.consumed_bytes >= q.bytes_threshold

    async def grant(self) -> None:
        """Return the credit due; a cancelled consumer must not let its producer go on."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        self.queue.consumed_items(0, 0)

    async def next(self) -> Any:
        item = self.take()
        if item is not _EMPTY:
            if self.credit_due():
                await self.grant()
            return item
        if self.error is not None:
            raise self.error
        while True:
            payload, count, size = await self.queue.next_batch()
            try:
                items = self.slot.decode_batch(payload, self.queue.conn)
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError, ValidationError) as exc:
                items = self._salvage(payload, exc)
            else:
                if len(items) != count:
                    self.error = ValidationError(
                        f"stream batch of {self.m.qualname} holds {len(items)} items, not {count}", method=self.m.name
                    )
                    items = []
            self.batch_bytes = size
            if items:
                if len(items) > 1:
                    self.items = items
                    self.pos = 1
                self._consumed(len(items) == 1)
                return items[0]
            self.queue.consumed_items(count, size)
            if self.error is not None:
                raise self.error

    def _consumed(self, last: bool) -> None:
        self.queue.consumed_items(1, self.batch_bytes if last else 0)

    def _salvage(self, payload: Any, exc: BaseException) -> list[Any]:
        """The valid items before the first refused one; remember the refusal for afterwards."""
        good: list[Any] = []
        why: BaseException = exc
        try:
            raws = _raw_list.decode(payload)
            for raw in raws:
                value = self.slot.decode(raw)
                if self.slot.plan is not None:
                    value = self.slot.from_wire(self.queue.conn, value)
                good.append(value)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError, ValidationError) as inner:
            why = inner
        self.error = ValidationError(f"stream item of {self.m.qualname} refused: {why}", method=self.m.name)
        return good


_EMPTY: Any = object()
_NO_ITEMS: list[Any] = []  # never filled
_raw_list: msgspec.msgpack.Decoder[list[msgspec.Raw]] = msgspec.msgpack.Decoder(list[msgspec.Raw])


@types.coroutine
def _resume(step: Any, yielded: Any) -> Any:
    """Finish awaiting ``step``, a coroutine already advanced once that yielded ``yielded``.

    This is what ``await step`` does after its first suspension; it lets a producer take an item
    without suspending (to batch what is ready) and still await properly when it must.
    """
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:
            try:
                yielded = step.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = step.send(sent)
            except StopIteration as stop:
                return stop.value


_size_encoder = msgspec.msgpack.Encoder()
_STOPPED = Exception("the call is over")  # what _send_now returns when the call ended while items were gathered
_BLOCKED = Exception("no connection credit")  # what _send_now returns when the batch must wait (it is kept)
_MAX_BATCH = 256


class _Credit:
    """Sending side of one stream: wakes a producer that waits for credit (of the stream, or of the
    connection: then ``need`` is how much)."""

    __slots__ = ("event", "closed", "need")

    def __init__(self) -> None:
        self.event: anyio.Event | None = None
        self.closed = False
        self.need = 0

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()


class _OutCall:
    """Caller-side state of a stream call (what the reader routes frames to)."""

    __slots__ = ("queue", "credit", "pending")

    def __init__(self, queue: _StreamQueue | None, credit: _Credit | None, pending: _Pending | None) -> None:
        self.queue = queue
        self.credit = credit
        self.pending = pending


class _InCall:
    """Callee-side state of one incoming call.

    Under anyio task groups the call runs in ``scope``; on the asyncio fast path it is the native
    ``task``, cancelled directly, with ``timer`` enforcing the deadline.
    """

    __slots__ = ("scope", "task", "deadline", "queue", "credit", "promise", "held")

    def __init__(self, scope: anyio.CancelScope | None) -> None:
        self.held = 0  # bytes of arguments drawn from the connection's budget while the call runs
        self.promise: _Promise | None = None
        self.scope = scope
        self.task: asyncio.Task[None] | None = None
        self.deadline = math.inf  # asyncio fast path: the deadline a scope in the task enforces
        self.queue: _StreamQueue | None = None
        self.credit: _Credit | None = None

    def cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
        elif self.task is not None:
            self.task.cancel()


class _Promise:
    """The result of an incoming call that returns an object, for calls pipelined on it (``^id``)."""

    __slots__ = ("desc", "obj", "error", "done", "event")

    def __init__(self, desc: InterfaceDescription) -> None:
        self.desc = desc
        self.obj: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.event: anyio.Event | None = None

    def settle(self, obj: Any = None, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.obj = obj
        self.error = error
        self.done = True
        if self.event is not None:
            self.event.set()

    async def wait(self) -> None:
        if not self.done:
            if self.event is None:
                self.event = anyio.Event()
            await self.event.wait()


def _run_inline(fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    """Call ``fn``; if it gives a coroutine that never awaits, run it to its end now."""
    result = fn(*args, **kw)
    if type(result) is types.CoroutineType:
        cvar = _sniffio_cvar
        token = cvar.set("asyncio") if cvar is not None else None
        try:
            yielded = result.send(None)
        except StopIteration as stop:
            return stop.value
        finally:
            if cvar is not None and token is not None:
                cvar.reset(token)
        # it suspended after all (a wrapper hid its awaits): a task finishes what it started
        return _resume(result, yielded)  # pragma: no cover
    return result


_sniffio_cvar: contextvars.ContextVar[str | None] | None
try:  # anyio finds its backend through sniffio; on the reader there is no current task to ask
    from sniffio import current_async_library_cvar as _sniffio_cvar
except ImportError:  # pragma: no cover
    _sniffio_cvar = None


def _refusal(exc: BaseException) -> str:
    """What the log says about a refused value: where, never the value (it may be a secret)."""
    arg = getattr(exc, "argument", "")
    return f"argument {arg!r} does not fit its declared type" if arg else "a value does not fit its declared type"


def _error_from_frame(m: MethodDescription | None, frame: ErrorFrame) -> BaseException:
    code = frame.code
    msg = frame.message
    if code == ErrorCode.DECLARED and m is not None:
        cls = m.interface.error_map.get(frame.type_name)
        if cls is not None:
            args = frame.args if isinstance(frame.args, (list, tuple)) else ()
            if _plain_error(args) is not None:
                # only plain data travels; the frame decoder leaves MessagePack extensions as they are
                return ValidationError(
                    f"error {frame.type_name} of {m.qualname} refused: its arguments hold a MessagePack extension, which is not plain data",
                    method=m.name,
                )
            try:
                return cls(*args)
            except Exception:
                return RemoteError(frame.type_name, msg)
        return RemoteError(frame.type_name, msg)
    if code == ErrorCode.VALIDATION:
        arg = frame.args[0] if isinstance(frame.args, list) and frame.args and isinstance(frame.args[0], str) else ""
        return ValidationError(msg, method=m.name if m else "", argument=arg)
    if code == ErrorCode.METHOD_NOT_FOUND:
        return MethodNotFound(msg)
    if code == ErrorCode.OBJECT_NOT_FOUND:
        return ObjectNotFound(msg)
    if code == ErrorCode.PEER_REJECTED:
        return PeerRejected(msg)
    if code == ErrorCode.TIMEOUT:
        return TimeoutError(msg)
    if code == ErrorCode.LIMIT:
        return LimitExceeded(msg)
    if code == ErrorCode.CANCELLED:
        return ConnectionInterrupted(msg)
    return RemoteError(frame.type_name, msg)


class _FdBudget:
    """Received descriptors not yet claimed, counted over the whole process (every connection, every
    thread): at most half the soft RLIMIT_NOFILE, so that peers can never take the descriptors the
    process needs to accept connections and open files."""

    def __init__(self) -> None:
        self.held = 0
        self._lock = threading.Lock()

    @staticmethod
    def cap() -> int:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return 1 << 20 if soft == resource.RLIM_INFINITY or soft > 1 << 21 else soft // 2

    def take(self, n: int) -> bool:
        with self._lock:
            if self.held + n > self.cap():
                return False
            self.held += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.held -= n


_fd_budget = _FdBudget()


def _encoded_size(value: Any) -> int:
    """About how many bytes ``value`` takes encoded (0 if it cannot be told without exporting
    anything); used only while the peer is behind, to charge a held answer to the budget."""
    try:
        return len(_size_encoder.encode(value))
    except Exception:
        return 0


def _close_all(fds: list[int] | None) -> None:
    for fd in fds or ():
        try:
            os.close(fd)
        except OSError:
            pass


class _WriterWaits:
    """What both asyncio drivers share: producers wait here while the socket is backed up."""

    _resume: asyncio.Future[None] | None
    _loop: asyncio.AbstractEventLoop
    done: asyncio.Future[None]

    def _wake_writers(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None

    async def _wait_while(self, blocked: Callable[[], bool]) -> None:
        while blocked() and not self.done.done():
            if self._resume is None:
                self._resume = self._loop.create_future()
            await self._resume


_local = threading.local()
_SOCKET_BUFFER = 1024 * 1024


def _receive_buffer() -> memoryview:
    """One receive buffer per thread, shared by its connections: every read is copied out (or
    decoded) before the next one, so an idle connection costs no buffer of its own."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(262144))
    return view


class _AsyncioIO(asyncio.BufferedProtocol, _WriterWaits):
    """Drives a connection's socket on asyncio: reads into one reused buffer, writes synchronously."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.view = _receive_buffer()
        self.big = False  # the last buffer handed out was the core's large-frame buffer
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        self._loop = loop
        self._paused = False
        self._reading_paused = False
        self._resume: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=self.conn.limits.write_buffer_high)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self.conn._core.big_target()
        if target is not None:
            self.big = True
            return target
        self.big = False
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.done.done():
            return
        conn = self.conn
        ok = conn._feed_big(nbytes) if self.big else conn._feed(self.view[:nbytes].tobytes())
        if not ok:
            self.close()

    def eof_received(self) -> bool:
        if not self.done.done():
            self.conn._feed(b"")
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        if conn._failure is None:
            conn._failure = ConnectionInterrupted(f"the connection was lost: {exc!r}" if exc else "the peer closed the connection")
        if not self.done.done():
            self.done.set_result(None)
        self._wake_writers()

    def pause_writing(self) -> None:
        self._paused = True  # producers wait; whether reading stops is the connection's call (_peer_behind)

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writers()
        self.conn._resume_input()

    def blocked(self) -> bool:
        return self._paused

    def buffered(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None else 0

    def pause_reading(self) -> None:
        t = self.transport
        if not self._reading_paused and t is not None and not t.is_closing():
            self._reading_paused = True
            t.pause_reading()

    def resume_reading(self) -> None:
        t = self.transport
        if self._reading_paused and t is not None and not t.is_closing():
            self._reading_paused = False
            t.resume_reading()

    async def wait_writable(self) -> None:
        await self._wait_while(lambda: self._paused)

    def write(self, data: bytes | bytearray, fds: list[int] | None = None) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()
        if not self.done.done():
            self.done.set_result(None)


class _UnixIO(_WriterWaits):
    """Drives a Unix socket on asyncio without a transport, so that file descriptors can travel.

    Reads use ``recvmsg_into`` into one reused buffer, collecting SCM_RIGHTS descriptors in arrival
    order; writes go straight to ``sendmsg`` and only what the kernel does not take is buffered.
    Descriptors are attached to the first byte of the chunk whose frames refer to them.
    """

    MAX_FDS = 64

    def __init__(self, conn: Connection, sock: socket.socket) -> None:
        self.conn = conn
        self.sock = sock
        self.fd = sock.fileno()
        self.view = _receive_buffer()
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                if sock.getsockopt(socket.SOL_SOCKET, opt) < _SOCKET_BUFFER:
                    sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)  # fewer, larger writes for big frames
            except OSError:
                pass
        self.transport: Any = None
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self._pending: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._pending_size = 0
        self._high = conn.limits.write_buffer_high
        self._resume: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._ancsize = socket.CMSG_SPACE(self.MAX_FDS * 4)
        loop.add_reader(self.fd, self._readable)

    def _readable(self) -> bool:
        """Read what is there and feed it; True if that was data and the connection goes on."""
        if self.done.done():
            return False
        target = self.conn._core.big_target()
        try:
            n, anc, flags, _ = self.sock.recvmsg_into([target if target is not None else self.view], self._ancsize)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._lost(exc)
            return False
        fds: list[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
        if (fds or flags & socket.MSG_CTRUNC) and not self.conn._fds_received(fds, bool(flags & socket.MSG_CTRUNC)):
            self.close()  # refused: closed, and GOODBYE said why
            return False
        if n == 0:
            self.conn._feed(b"")
            self._lost(None)
            return False
        ok = self.conn._feed_big(n) if target is not None else self.conn._feed(self.view[:n].tobytes())
        if not ok:
            self.close()
        return ok

    def write(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        """Send ``data`` (with ``fds`` attached to its first byte).  Takes ownership of ``fds``:
        they are closed here once the kernel has them (it keeps its own references)."""
        if self.done.done():
            _close_all(fds)
            return
        if fds and len(fds) > self.MAX_FDS and len(data) > 1:
            # the receiver takes at most MAX_FDS per read: attach them MAX_FDS at a time to successive bytes
            self.write(memoryview(data)[:1], fds[: self.MAX_FDS])
            self.write(memoryview(data)[1:], fds[self.MAX_FDS :])
            return
        if self._pending:
            self._queue(memoryview(data), fds or [])
            return
        try:
            if fds:
                sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            _close_all(fds)
            if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                # what the peer said before it closed (a GOODBYE, say) is the better reason: read it
                # first, outside whatever dispatch is writing now
                self._loop.call_soon(self._drain_then_lost, exc)
                return
            self._lost(exc)
            return
        if sent and fds:
            _close_all(fds)
            fds = None
        if sent < len(data):
            self._queue(memoryview(data)[sent:], fds or [])
            self._loop.add_writer(self.fd, self._writable)

    def _queue(self, data: memoryview, fds: list[int]) -> None:
        self._pending.append((data, fds))
        self._pending_size += len(data)  # above _high producers wait; reading stops only by _peer_behind

    def blocked(self) -> bool:
        return self._pending_size > self._high

    def buffered(self) -> int:
        return self._pending_size

    def pause_reading(self) -> None:
        if not self._reading_paused and self.fd >= 0:
            self._reading_paused = True
            self._loop.remove_reader(self.fd)

    def resume_reading(self) -> None:
        if self._reading_paused and self.fd >= 0:
            self._reading_paused = False
            self._loop.add_reader(self.fd, self._readable)

    def _writable(self) -> None:
        while self._pending:
            data, fds = self._pending[0]
            try:
                if fds:
                    sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                    self._drain_then_lost(exc)  # what the peer said before it closed is the better reason
                    return
                self._lost(exc)
                return
            self._pending_size -= sent
            if sent and fds:
                _close_all(fds)
            if sent < len(data):
                self._pending[0] = (data[sent:], [])
                return
            self._pending.popleft()
        self._loop.remove_writer(self.fd)
        self._wake_writers()
        self.conn._resume_input()

    async def wait_writable(self) -> None:
        await self._wait_while(lambda: self._pending_size > self._high)

    def _drain_then_lost(self, exc: BaseException) -> None:
        """The peer closed while we were writing: read what it sent before (a GOODBYE, say), even
        while reading is paused, up to its end, then end the connection."""
        for _ in range(256):  # what a closed peer left is finite; bounded all the same
            if not self._readable():
                break
        self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        conn = self.conn
        if conn._failure is None:
            conn._failure = ConnectionInterrupted(f"the connection was lost: {exc!r}" if exc else "the peer closed the connection")
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            self._loop.remove_reader(self.fd)
            self._loop.remove_writer(self.fd)
            self.fd = -1
            if self._pending:
                # best effort: what is still queued (a GOODBYE, say) goes out if the kernel takes it now
                try:
                    self.sock.setblocking(False)
                    for data, _ in self._pending:
                        self.sock.send(data)
                except OSError:
                    pass
                for _, fds in self._pending:
                    _close_all(fds)
                self._pending.clear()
            self.sock.close()
        if not self.done.done():
            self.done.set_result(None)
        self._wake_writers()


# --------------------------------------------------------------------------- the connection
class Connection:
    """One xrpc connection, client or server side.  Use ``proxy()`` to call, ``export()`` to serve."""

    def __init__(
        self,
        transport: Any,
        *,
        client: bool,
        peer: Peer,
        exports: dict[str, Export] | None = None,
        shared_exports: dict[str, Export] | None = None,
        limits: Limits | None = None,
        on_interrupted: Callable[[], Any] | None = None,
        on_invalidated: Callable[[], Any] | None = None,
        url: str = "",
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        middleware: Sequence[Middleware] = (),
        requirement: Any = None,
    ) -> None:
        # what the peer must satisfy to be served at all: on a server its requirement, on a client
        # what the server must satisfy; checked at the handshake and again by _authorize
        self._requirement = requirement
        self.limits = limits or Limits()
        self._transport = transport  # a connected socket, or an anyio ByteStream
        self._stream: anyio.abc.ByteStream | None = None if isinstance(transport, socket.socket) else transport
        self._aio: _AsyncioIO | _UnixIO | None = None  # set when asyncio drives a socket directly
        self._fds_out: list[int] = []  # descriptors to attach to the next write
        self._fds_in: dict[int, int] = {}  # sequence number -> received descriptor, until claimed
        self._fd_seq_out = 0
        self._fd_seq_in = 0
        self._fds_admitted = client  # a server accepts descriptors once the peer passed its requirement
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self.client = client
        self.peer = peer
        self.url = url
        self._exports: dict[str, Export] = dict(exports or {})
        self._shared = shared_exports if shared_exports is not None else {}
        self._core = ProtocolCore(
            client=client,
            max_frame=self.limits.max_frame,
            window=self.limits.window,
            window_bytes=self.limits.window_bytes,
            exports=[e.info() for e in self._all_exports()],
            handshake_max_frame=self.limits.handshake_max_frame,
            conn_window=conn_window_for(self.limits.max_buffered, self.limits.max_frame),
        )
        self._tg: anyio.abc.TaskGroup | None = None
        self._wake = anyio.Event()
        self._drained: anyio.Event | None = None
        self._writing = False
        self._gate: list[tuple[Any, Any]] | None = None if client else []
        # memory budget and back-pressure (see Limits): bytes held for the peer, events read but
        # held back while the peer does not read our answers, credit held back while over budget
        self._held = 0
        self._calls_held = 0  # the part of _held that is the arguments of calls in flight
        self._gate_held = 0
        self._credit_mark = self.limits.max_buffered // 2
        self._deferred_credit: dict[_StreamQueue, None] = {}
        # stream producers waiting for connection credit, first come first served (see _send_conn)
        self._conn_waiters: collections.deque[_Credit] = collections.deque()
        self._backlog: list[tuple[Any, Any]] | None = None
        self._owed = 0  # bytes of answers reading produced since the peer last caught up (see _peer_behind)
        self._in_send = 0  # anyio writer: bytes of the chunk being sent
        self._gate_opened: anyio.Event | None = None
        self._handshake = anyio.Event()
        self._closed = anyio.Event()
        self._closing = False
        self._failure: BaseException | None = None  # why the connection ended
        self._serving = 0
        self._streams = 0
        self._last_rx = 0.0
        self._on_interrupted = on_interrupted
        self._on_invalidated = on_invalidated
        self._loop_thread = threading.get_ident()
        self._proxies: dict[tuple[int, str, float | None], Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # incoming calls on the asyncio fast path
        self._guard_cache: dict[int, tuple[Any, bool]] = {}  # id(requirement) -> (requirement, verdict)
        self._compat_cache: dict[tuple[int, str], Any] = {}
        self._pings: dict[int, anyio.Event] = {}
        self._handed_out = not client  # a client connection is handed out once connect() returns it
        self._ping_nonce = 0
        self._next_ticket = 0  # calls start in the order they arrived (non-asyncio backends)
        self._started_ticket = 0
        self._ticket_waiters: dict[int, anyio.Event] = {}
        self._middleware = tuple(middleware)
        self._refs: dict[str, list[Any]] = {}  # oid -> [Export, tokens sent and not yet released]
        self._promises: dict[int, _Promise] = {}  # results of the peer's calls, for pipelined calls
        self._promise_of: dict[str, int] = {}  # oid of a returned object -> the call that returned it
        self._journal: list[str] | None = None  # references handed out while encoding one frame
        self._settled_ids: collections.deque[int] = collections.deque()
        self._ref_ids: dict[tuple[int, str], str] = {}  # (id(obj), interface) -> oid
        self._next_oid = 0
        self.remote_refs = 0  # live proxies to objects the peer passed us by reference
        self._ssl = ssl_context
        self._server_hostname = server_hostname

    # -------------------------------------------------------------- public surface
    def proxy(self, iface: Callable[..., _T], name: str = "", timeout: float | None = None) -> _T:
        """A proxy typed as ``iface`` for the object the peer exports under ``name``."""
        desc = describe(iface)
        key = name or desc.name
        cache_key = (id(desc), key, timeout)
        p = self._proxies.get(cache_key)
        if p is None:
            p = make_proxy(self, desc, key, timeout, self._compat(desc, key))
            self._proxies[cache_key] = p
        return p  # type: ignore[no-any-return]

    def _compat(self, desc: InterfaceDescription, key: str) -> dict[str, Any] | None:
        """Compare ``desc`` with what the peer announced for ``key``: None when they agree (or the
        peer said nothing), else per method what ``Proxy`` must check before sending."""
        info = next((e for e in self._core.peer_exports if e.name == key), None)
        if info is None or info.fingerprint == desc.fingerprint or not info.methods:
            return None
        compat: dict[str, Any] = {}
        where_iface = f"{info.interface} at the peer"
        for m in desc.methods.values():
            remote = info.methods.get(m.name)
            if remote is None:
                compat[m.name] = MethodNotFound(
                    f"{where_iface} has no method {m.name!r} (it has: {', '.join(sorted(info.methods)) or 'none'})"
                )
                continue
            verdict = m.compat_with(remote, f"{info.interface}.{m.name}")
            if verdict is not None:
                compat[m.name] = ValidationError(verdict, method=m.name) if isinstance(verdict, str) else verdict
        if compat and all(isinstance(v, BaseException) for v in compat.values()) and len(compat) == len(desc.methods):
            raise ConnectionInvalidated(
                f"{desc.name} here and {info.interface} at the peer (as {key!r}) have no method in common that works: "
                + "; ".join(str(v) for v in compat.values())
            )
        return compat or None

    def check_call(self, m: MethodDescription, obj: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Check a call against what the peer announced for ``obj`` (for callers without a proxy
        of this connection, such as a service connection that reconnects)."""
        key = (id(m.interface), obj)
        compat = self._compat_cache.get(key, _EMPTY)
        if compat is _EMPTY:
            compat = self._compat_cache[key] = self._compat(m.interface, obj)
        if compat is not None:
            check_compat(compat, m, args, kwargs)

    def export(self, iface: Any, obj: Any, name: str = "", *, requirement: Any = None) -> None:
        """Serve ``obj`` as ``iface`` to this connection's peer, under ``name``."""
        e = make_export(iface, obj, name, requirement)
        self._exports[e.name] = e

    def unexport(self, name: str) -> None:
        self._exports.pop(name, None)

    @property
    def closed(self) -> bool:
        return self._closed.is_set() or self._closing

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip a PING to the peer; the time it took, in seconds.  ``TimeoutError`` if no
        PONG comes within ``timeout``; ``ConnectionInterrupted`` if the connection ends meanwhile."""
        self._check_open()
        self._ping_nonce += 1
        nonce = self._ping_nonce
        event = self._pings[nonce] = anyio.Event()
        start = anyio.current_time()
        self._core.send_ping(nonce)
        self._kick()
        try:
            with anyio.fail_after(timeout) if timeout is not None else contextlib.nullcontext():
                await event.wait()
        finally:
            self._pings.pop(nonce, None)
        if self._closed.is_set() and self._failure is not None:
            raise type(self._failure)(*self._failure.args)
        return anyio.current_time() - start

    def interrupt(self, reason: str) -> None:
        """End the connection as interrupted (the peer went silent, say): outstanding calls fail
        with ``ConnectionInterrupted``."""
        self._closing = True
        self._fail_connection(ConnectionInterrupted(reason))
        if self._aio is not None:
            self._aio.close()

    @property
    def in_flight(self) -> int:
        """Calls in progress on this connection, both directions."""
        return self._serving + len(self._core.outgoing)

    @property
    def peer_exports(self) -> list[ExportInfo]:
        return list(self._core.peer_exports)

    async def aclose(self) -> None:
        """Close for good (idempotent).  Outstanding calls fail with ``ConnectionInvalidated``."""
        if self._closed.is_set():
            return
        if not self._closing:
            self._closing = True
            if self._failure is None:
                self._failure = ConnectionInvalidated("the connection was closed")
            try:
                self._core.send_goodbye("closed")
            except Exception:
                pass
            if self._aio is not None:
                self._flush()
                self._aio.close()
            elif self._stream is not None:
                with anyio.move_on_after(1.0, shield=True):
                    data = self._core.data_to_send()
                    if data and not self._writing:
                        try:
                            await self._stream.send(bytes(data))
                        except Exception:
                            pass
                    try:
                        await self._stream.aclose()
                    except Exception:
                        pass
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._closed.wait()

    def _all_exports(self) -> list[Export]:
        merged = dict(self._shared)
        merged.update(self._exports)
        return list(merged.values())

    def _lookup(self, name: str) -> Export | None:
        e = self._exports.get(name)
        if e is None:
            e = self._shared.get(name)
            if e is None and name[:1] == "#":
                entry = self._refs.get(name)
                if entry is not None:
                    e = entry[0]
        return e

    # -------------------------------------------------------------- objects passed by reference
    def _ref_out(self, desc: InterfaceDescription, value: Any) -> Ref:
        """Export ``value`` (an implementation of ``desc``) for the peer; the token to send."""
        target = proxy_target(value)
        if target is not None:
            # Only an object the peer passed us by reference ("#n") goes home as itself; a proxy to
            # one of the peer's named exports is forwarded like a proxy from another connection,
            # because the peer resolves a home reference only in the table of references it sent.
            caller, obj, its = target
            if caller is self and obj[:1] == "#":
                if its.name != desc.name:
                    raise ValueError(f"a proxy of {its.name} is not a {desc.name}")
                return Ref(True, obj, desc.name)
            if not set(desc.methods) <= set(its.methods):
                raise ValueError(f"a proxy of {its.name} is not a {desc.name}")
        else:
            missing = [m for m in desc.methods if not callable(getattr(value, m, None))]
            if missing:
                raise ValueError(f"{type(value).__qualname__} does not implement {desc.name} (missing {', '.join(missing)})")
        key = (id(value), desc.name)
        oid = self._ref_ids.get(key)
        entry = self._refs.get(oid) if oid is not None else None
        if entry is None or entry[0].obj is not value:
            if len(self._refs) >= self.limits.max_objects:
                raise LimitExceeded(f"more than {self.limits.max_objects} objects exported on this connection")
            self._next_oid += 1
            oid = f"#{self._next_oid}"
            entry = [Export(desc, value, oid), 0]
            self._refs[oid] = entry
            self._ref_ids[key] = oid
        entry[1] += 1
        if self._journal is not None:
            self._journal.append(entry[0].name)
        return Ref(False, entry[0].name, desc.name)

    def _ref_in(self, desc: InterfaceDescription, token: Ref) -> Any:
        """A received reference: a proxy to the peer's object, or our own object coming home."""
        if token.interface != desc.name:
            raise ValidationError(f"a reference to a {token.interface} arrived where a {desc.name} is declared")
        if token.home:
            # Only an object this side passed by reference on this connection, and still holds for
            # the peer, may come home: never a named export (its requirement would be bypassed) and
            # never an object of another connection.
            entry = self._refs.get(token.oid)
            if entry is None or entry[0].desc.name != desc.name:
                raise ValidationError(f"a reference to {token.oid!r}, which this side did not pass to this peer as a {desc.name}")
            return entry[0].obj
        p = make_proxy(self, desc, token.oid, None)
        set_release(p, weakref.finalize(p, self._release_remote, token.oid))
        self.remote_refs += 1
        return p

    def _release_remote(self, oid: str) -> None:
        """A proxy to the peer's object ``oid`` is gone: tell the exporter (from any thread)."""
        self.remote_refs -= 1
        if self._closed.is_set() or self._closing:
            return
        if threading.get_ident() != self._loop_thread:
            loop = self._loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._release_remote_now, oid)
                except RuntimeError:
                    pass
            return
        self._release_remote_now(oid)

    def _release_remote_now(self, oid: str) -> None:
        if self._closed.is_set() or self._closing:
            return
        self._core.send_release(oid, 1)
        self._kick()

    # -------------------------------------------------------------- file descriptors (Unix sockets)
    def _fd_out(self, fd: int) -> int:
        """Queue a duplicate of ``fd`` to travel with the next write; its sequence number."""
        if not isinstance(self._aio, _UnixIO):
            raise ValueError("file descriptors and shared buffers travel only over unix:// connections (on asyncio)")
        self._fds_out.append(os.dup(fd))
        self._fd_seq_out += 1
        return self._fd_seq_out

    def _fds_received(self, fds: list[int], truncated: bool = False) -> bool:
        """Descriptors arrived (SCM_RIGHTS).  They wait, numbered in arrival order, for the value that
        refers to them.  Refused (closed at once, GOODBYE, False) when the peer is not admitted yet,
        when the kernel truncated them, or when they would exceed ``Limits.max_fds`` unclaimed on this
        connection or the process's budget."""
        code = ErrorCode.LIMIT
        if truncated:
            why, code = "file descriptors were truncated (too many in one message)", ErrorCode.VALIDATION
        elif not self._fds_admitted:
            why, code = "file descriptors before the connection was admitted", ErrorCode.VALIDATION
        elif len(self._fds_in) + len(fds) > self.limits.max_fds:
            why = f"more than max_fds={self.limits.max_fds} unclaimed file descriptors"
        elif not _fd_budget.take(len(fds)):
            why = f"the process holds its limit of {_fd_budget.cap()} received file descriptors"
        else:
            for fd in fds:
                self._fd_seq_in += 1
                self._fds_in[self._fd_seq_in] = fd
            return True
        _close_all(fds)
        log.warning("xrpc: %s from %s; closing the connection", why, self._peer_name())
        if self._failure is None:
            self._failure = ConnectionInterrupted(f"the connection was closed: {why}")
        self._goodbye_now(why, code)
        return False

    def _fd_in(self, seq: int) -> int:
        fd = self._fds_in.pop(seq, None)
        if fd is None:
            raise ValidationError(f"file descriptor #{seq} did not arrive")
        _fd_budget.give(1)
        return fd

    # the codec's WireContext
    def ref_out(self, desc: InterfaceDescription, value: Any) -> Ref:
        return self._ref_out(desc, value)

    def ref_in(self, desc: InterfaceDescription, token: Ref) -> Any:
        return self._ref_in(desc, token)

    def fd_out(self, fd: int) -> int:
        return self._fd_out(fd)

    def fd_in(self, seq: int) -> int:
        return self._fd_in(seq)

    @property
    def exported_objects(self) -> int:
        """How many objects this side currently exports to the peer by reference."""
        return len(self._refs)

    # -------------------------------------------------------------- lifecycle
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until the connection ends.  Reports started once it can send and receive."""
        _current.set(self)
        try:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None  # another backend (trio): anyio streams
            try:
                if self._ssl is not None or (self._loop is None and isinstance(self._transport, socket.socket)):
                    with anyio.fail_after(self.limits.handshake_timeout):
                        await self._open_transport()
                else:
                    await self._open_transport()  # nothing to wait for: no timer needed
            except (ssl.SSLError, OSError, TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                what = "TLS handshake" if self._ssl is not None else "connection set-up"
                self._failure = TransportError(f"{self.url or self._peer_name()}: {what} failed: {exc}")
                raise self._failure from None
            if self.client and self._requirement is not None and not self._satisfies(self._requirement):
                # checked before HELLO: a refused server never reaches this side's exports
                log.warning("xrpc: the server at %s does not satisfy the requirement: %s", self.url, self._requirement.explain(self.peer))
                self._failure = PeerRejected(f"{self.url}: the server does not satisfy the requirement {self._requirement}")
                raise self._failure
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self._aio is None:
                    tg.start_soon(self._writer)
                if self.client:
                    self._core.exports = self._announced()  # with the server's facts known (TLS)
                    self._core.send_hello()
                    self._kick()
                if self.limits.idle_timeout is not None:
                    tg.start_soon(self._idle_watch, self.limits.idle_timeout)
                task_status.started()
                if self._aio is not None:
                    await self._aio.done
                else:
                    await self._reader()
                tg.cancel_scope.cancel()
        finally:
            self._finish()
            with anyio.CancelScope(shield=True):
                if self._tasks:
                    tasks = list(self._tasks)
                    for t in tasks:
                        t.cancel()
                    await asyncio.wait(tasks)
                if self._aio is not None:
                    self._aio.close()
                elif self._stream is not None:
                    try:
                        await self._stream.aclose()
                    except Exception:
                        pass
                elif isinstance(self._transport, socket.socket):
                    self._transport.close()

    async def _idle_watch(self, idle: float) -> None:
        """Close the connection once nothing has been received for ``idle`` seconds and nothing is in flight."""
        self._last_rx = time.monotonic()
        while True:
            await anyio.sleep(idle / 4)
            quiet = time.monotonic() - self._last_rx
            if quiet >= idle and not self._serving and not self._core.outgoing:
                log.info("xrpc: closing %s after %.1fs without traffic", self._peer_name(), quiet)
                self._core.send_goodbye("idle timeout", ErrorCode.LIMIT)
                await self.aclose()
                return

    async def _open_transport(self) -> None:
        """Wrap the socket for this backend (and run the TLS handshake, filling ``peer``)."""
        transport = self._transport
        if not isinstance(transport, socket.socket):
            return
        timeout = self.limits.handshake_timeout
        if self._loop is not None and transport.family == socket.AF_UNIX:
            self._aio = _UnixIO(self, transport)
        elif self._loop is not None:
            aio = self._aio = _AsyncioIO(self)
            tls_timeout = timeout if self._ssl is not None else None
            if self.client:
                await self._loop.create_connection(
                    lambda: aio,
                    sock=transport,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname if self._ssl else None,
                    ssl_handshake_timeout=tls_timeout,
                )
            else:
                await self._loop.connect_accepted_socket(lambda: aio, transport, ssl=self._ssl, ssl_handshake_timeout=tls_timeout)
            if self._ssl is not None:
                self._tls_peer(aio.transport.get_extra_info("ssl_object"))  # type: ignore[union-attr]
        else:
            if transport.family == socket.AF_UNIX:
                self._stream = await anyio.abc.UNIXSocketStream.from_socket(transport)
            else:
                self._stream = await anyio.abc.SocketStream.from_socket(transport)
            if self._ssl is not None:
                from anyio.streams.tls import TLSAttribute, TLSStream

                tls_stream = await TLSStream.wrap(
                    self._stream,
                    server_side=not self.client,
                    hostname=self._server_hostname if self.client else None,
                    ssl_context=self._ssl,
                    standard_compatible=False,
                )
                self._stream = tls_stream
                self._tls_peer(tls_stream.extra(TLSAttribute.ssl_object))

    def _tls_peer(self, sslobj: Any) -> None:
        """Fill ``peer`` from the verified certificate of a TLS connection."""
        if sslobj is None:
            return
        import dataclasses
        import hashlib

        der = sslobj.getpeercert(binary_form=True)
        info = sslobj.getpeercert() or {}
        from ._tls import cert_subject

        subject = cert_subject(info)  # every value of every attribute: CN=guest/CN=agent keeps both
        sans = tuple(f"{kind}:{value}" for kind, value in info.get("subjectAltName", ()))
        self.peer = dataclasses.replace(
            self.peer,
            transport="tls",
            cert_subject=subject,
            cert_sans=sans,
            cert_fingerprint=hashlib.sha256(der).hexdigest() if der else None,
        )

    def _finish(self) -> None:
        if self._closed.is_set():
            return
        failure = self._failure or ConnectionInterrupted("the connection was lost")
        if not self._closing and self._failure is None:
            self._failure = failure
        interrupted = isinstance(failure, ConnectionInterrupted)
        for rec in list(self._core.outgoing.values()):
            self._fail_outgoing(rec, failure)
        self._core.outgoing.clear()
        self._core.incoming.clear()
        self._refs.clear()
        self._ref_ids.clear()
        _fd_budget.give(len(self._fds_in))
        for fd in list(self._fds_in.values()) + self._fds_out:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds_in.clear()
        self._fds_out.clear()
        if self.peer.pidfd is not None:
            try:
                os.close(self.peer.pidfd)  # valid while the connection is open
            except OSError:
                pass
        if self._gate:
            self._gate.clear()
        self._closed.set()
        self._handshake.set()
        for event in self._pings.values():
            event.set()
        if self._drained is not None:
            self._drained.set()
        if not self._handed_out:
            return  # connect() raised: the caller never had this connection
        if interrupted and self._on_interrupted is not None:
            self._callback(self._on_interrupted)
        if self._on_invalidated is not None:
            self._callback(self._on_invalidated)

    def _callback(self, fn: Callable[[], Any]) -> None:
        try:
            res = fn()
            if inspect.isawaitable(res):
                res.close()  # type: ignore[attr-defined]
                log.warning("xrpc: connection callbacks must be plain functions; %r returned an awaitable", fn)
        except Exception:
            log.exception("xrpc: connection event callback %r failed", fn)

    def _fail_outgoing(self, rec: CallRecord, exc: Any) -> None:
        """End an outgoing call with ``exc`` (an exception, or an ERROR frame from the peer)."""
        h = rec.handler
        if h is None:
            return
        if isinstance(h, _Pending):
            h.deliver(exc)
        elif isinstance(h, _OutCall):
            if h.queue is not None:
                h.queue.finish(exc)
            if h.pending is not None:
                h.pending.deliver(exc)
            if h.credit is not None:
                h.credit.closed = True
                h.credit.wake()

    def _fail_connection(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # -------------------------------------------------------------- writer
    def _kick(self) -> None:
        """Make sure what the core has encoded gets written soon (coalescing all frames until then)."""
        if self._aio is not None:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)  # type: ignore[union-attr]
        elif not self._writing:
            self._wake.set()

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._core.data_to_send()
        if data and self._aio is not None:
            if self._fds_out:
                fds = self._fds_out
                self._fds_out = []
                self._aio.write(data, fds)  # takes the descriptors: closed once sent
            else:
                self._aio.write(data)

    async def _writer(self) -> None:
        stream = self._stream
        assert stream is not None
        core = self._core
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                self._writing = True
                while True:
                    data = core.data_to_send()
                    if not data:
                        break
                    self._in_send = len(data)
                    await stream.send(bytes(data) if type(data) is not bytes else data)
                    self._in_send = 0
                self._writing = False
                if self._drained is not None:
                    self._drained.set()
                    self._drained = None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._writing = False
            self._fail_connection(ConnectionInterrupted(f"the connection was lost while sending: {exc!r}"))

    async def _wait_drained(self) -> None:
        """Wait until the writer has sent what is buffered (producers' backpressure)."""
        if self._closed.is_set():
            raise self._failure or ConnectionInvalidated("the connection is closed")
        aio = self._aio
        if aio is not None:
            self._flush()
            await aio.wait_writable()
            if aio.done.done():
                raise self._failure or ConnectionInterrupted("the connection was lost")
            return
        if len(self._core._out) <= self.limits.write_buffer_high:
            return
        if self._drained is None:
            self._drained = anyio.Event()
        ev = self._drained
        self._kick()
        await ev.wait()

    # -------------------------------------------------------------- reader
    async def _reader(self) -> None:
        stream = self._stream
        assert stream is not None
        core = self._core
        high = self.limits.write_buffer_high
        while True:
            if self._backlog is not None or self._gate_held > high or self._peer_behind():
                # back-pressure: read nothing more until the peer reads what we owe it (or, behind
                # the gate, until on_connect is done)
                try:
                    if self._gate is not None and self._gate_held > high:
                        if self._gate_opened is None:
                            self._gate_opened = anyio.Event()
                        await self._gate_opened.wait()
                    else:
                        await self._wait_drained()
                        if len(core._out) <= high:
                            self._owed = 0  # the peer has caught up
                        backlog = self._backlog
                        if backlog is not None and len(core._out) <= high:
                            self._backlog = None
                            self._handle(backlog)
                            if core.has_data_to_send():
                                self._kick()
                            if not self._within_budget():
                                self._over_budget()
                                return
                except Exception:
                    return  # the connection is over
                continue
            try:
                data = await stream.receive(262144)
            except anyio.EndOfStream:
                data = b""
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                if self._failure is None:
                    self._failure = ConnectionInterrupted(f"the connection was lost: {exc!r}")
                return
            if not self._feed(data):
                return

    def _feed_big(self, n: int) -> bool:
        """``n`` bytes were read straight into the core's large-frame buffer."""
        core = self._core
        size = core._big_size
        start = core.emitted
        try:
            events = core.big_received(n)
        except RemoteProtocolError as exc:
            return self._protocol_error(exc)
        self._owed += core.emitted - start
        return self._dispatch(events, size)

    def _protocol_error(self, exc: RemoteProtocolError) -> bool:
        log.warning("xrpc: protocol error from %s: %s", self._peer_name(), exc)
        if self._failure is None:
            self._failure = ConnectionInterrupted(f"protocol error: {exc}")
        self._goodbye_now(str(exc), ErrorCode.VALIDATION)
        return False

    def _feed(self, data: bytes) -> bool:
        """Process received bytes (``b""``: the peer closed).  False once the connection is over."""
        core = self._core
        self._last_rx = time.monotonic()
        start = core.emitted
        try:
            events = core.receive_data(data)
        except RemoteProtocolError as exc:
            return self._protocol_error(exc)
        self._owed += core.emitted - start  # PONGs and answers the core gave itself
        return self._dispatch(events, len(data))

    def _dispatch(self, events: list[Any], nbytes: int) -> bool:
        """Handle the messages of one read of ``nbytes`` bytes (0: the peer closed)."""
        core = self._core
        gate = self._gate
        if gate is not None and events and any(self._gated(msg) for msg, _ in events):
            # held behind the gate, they keep what was read alive: all of it counts
            self._gate_held += nbytes
            self._held += nbytes
        if self._backlog is not None:
            self._backlog += events  # keep the order
        elif len(events) == 1 and gate is None:  # the common case, without _handle's bookkeeping
            msg, rec = events[0]
            start = core.emitted
            self._handlers[type(msg)](self, msg, rec)
            self._owed += core.emitted - start
        elif events:
            self._handle(events)
        if core.has_data_to_send():
            if self._aio is not None and not self._fds_out:
                self._flush()  # answers produced while reading leave in one write, now
            else:
                self._kick()
        if not nbytes:
            if self._failure is None:
                self._failure = ConnectionInterrupted("the peer closed the connection")
            return False
        if core.state == State.CLOSED:
            backlog = self._backlog
            if backlog is not None:
                # the peer said goodbye: what it sent before still counts (one read at most)
                self._backlog = None
                self._handle(backlog, math.inf)
                if core.has_data_to_send():
                    self._kick()
            if self._failure is None:
                reason = core.close_reason or "closed by the peer"
                if core.close_code == ErrorCode.PEER_REJECTED:
                    self._failure = PeerRejected(f"the peer refused the connection: {reason}")
                elif core.close_code == ErrorCode.LIMIT:
                    self._failure = LimitExceeded(f"the peer closed the connection: {reason}")
                else:
                    self._failure = ConnectionInterrupted(f"the peer closed the connection: {reason}")
            return False
        if (self._held or core._big is not None or gate is not None) and not self._within_budget():
            return self._over_budget()
        high = self.limits.write_buffer_high
        if self._aio is not None and (self._backlog is not None or self._gate_held > high or (self._owed > high and self._peer_behind())):
            self._aio.pause_reading()
            self._resume_input()
        return True

    def _handle(self, events: list[Any], high: float = 0) -> None:
        """Run the handlers of ``events``; once the answers they produced pass the high-water mark,
        keep the rest for later (``_backlog``): a peer that does not read is not served more."""
        gate = self._gate
        handlers = self._handlers
        core = self._core
        high = (high or self.limits.write_buffer_high) - self._owed
        start = core.emitted
        i = 0
        for msg, rec in events:
            i += 1
            if gate is not None and self._gated(msg):
                gate.append((msg, rec))
                continue
            handlers[type(msg)](self, msg, rec)
            if core.emitted - start > high and i < len(events):
                self._backlog = events[i:]
                break
        self._owed += core.emitted - start

    def _peer_behind(self) -> bool:
        """Has reading produced more than ``write_buffer_high`` bytes of answers (replies, errors,
        PONGs) since the peer last caught up with what we send?  Then it is sending requests without
        reading the answers, and is not read until it does.  Our own streams' data does not count:
        their producers wait for the writer themselves, and counting it would make two peers that
        stream to each other both stop reading, each waiting for the other."""
        if self._owed <= self.limits.write_buffer_high:
            return False
        if self._out_full():
            return True
        self._owed = 0  # the peer has caught up
        return False

    def _out_full(self) -> bool:
        """Is what we owe the peer above the high-water mark (the peer does not read fast enough)?"""
        aio = self._aio
        return len(self._core._out) > self.limits.write_buffer_high or (aio is not None and aio.blocked())

    def _resume_input(self) -> None:
        """asyncio drivers: serve what was held back while the peer catches up, then read again."""
        aio = self._aio
        if aio is None or aio.done.done():
            return
        while self._backlog is not None:
            self._flush()
            if self._out_full():
                return  # the driver calls again once the peer has read
            self._owed = 0  # the peer has caught up
            backlog = self._backlog
            self._backlog = None
            self._handle(backlog)
            if not self._within_budget():
                self._cut_off()
                return
        self._flush()
        if not self._peer_behind() and self._gate_held <= self.limits.write_buffer_high:
            aio.resume_reading()

    def _within_budget(self) -> bool:
        """Does what the peer makes us hold (queued stream items, calls behind the gate, the
        arguments of calls in flight, a large frame being received) fit in the connection's
        memory budget?"""
        held = self._held
        core = self._core
        if core._big is not None and held - self._calls_held + core._big_size > self.limits.max_buffered:
            # (a frame being received may be a CALL: one that does not fit beside the calls in
            # flight is refused once it is complete, and the connection lives on)
            return False
        gate = self._gate
        return held <= self.limits.max_buffered and (gate is None or len(gate) <= self.limits.max_calls_in_flight)

    def _over_budget(self) -> bool:
        gate = self._gate
        if gate is not None and len(gate) > self.limits.max_calls_in_flight:
            reason = f"more than {self.limits.max_calls_in_flight} calls sent before on_connect finished"
        else:
            reason = f"the peer made this side hold more than its memory budget of {self.limits.max_buffered} bytes"
        log.warning("xrpc: closing the connection of %s: %s", self._peer_name(), reason)
        if self._failure is None:
            self._failure = LimitExceeded(reason)
        self._goodbye_now(reason, ErrorCode.LIMIT)
        return False

    def _conn_freed(self, n: int) -> None:
        """``n`` bytes of connection credit are free again: return them once enough has gathered."""
        core = self._core
        core.conn_pending += n
        if core.conn_pending >= core.conn_threshold:
            self._return_conn_credit()

    def _return_conn_credit(self) -> None:
        core = self._core
        if core.conn_pending >= core.conn_threshold:
            core.send_conn_credit()
            self._kick()

    def _release(self, n: int) -> None:
        """``n`` bytes held for the peer were consumed: return deferred credit once half is free."""
        held = self._held = self._held - n
        if self._deferred_credit and held <= self._credit_mark // 2:
            queues = list(self._deferred_credit)
            self._deferred_credit.clear()
            for q in queues:
                q.consumed_items(0, 0)

    def _goodbye_now(self, reason: str, code: int) -> None:
        """Tell the peer why we drop the connection (best effort), then let it end."""
        try:
            if self._core.state == State.ERROR:
                self._core.state = State.OPEN
            self._core.send_goodbye(reason[:200], code)
        except Exception:
            return
        data = self._core.data_to_send()
        if not data:
            return
        if self._aio is not None:
            self._aio.write(data)
            return
        stream = self._stream
        if stream is not None and self._tg is not None:

            async def _send_last() -> None:
                with anyio.move_on_after(1.0, shield=True):
                    try:
                        await stream.send(bytes(data) if type(data) is not bytes else data)
                    except Exception:
                        pass

            try:
                self._tg.start_soon(_send_last)
            except RuntimeError:
                pass

    def _gated(self, msg: Any) -> bool:
        """Does ``msg`` start or concern work the peer asked of us (held until the gate opens)?"""
        call_id = getattr(msg, "id", None)
        if call_id is None:
            return type(msg) is Release
        return not self._core.is_local_id(call_id)

    def _open_gate(self) -> None:
        gate = self._gate
        self._gate = None
        self._release(self._gate_held)
        self._gate_held = 0
        if gate:
            if self._backlog is not None:
                gate += self._backlog  # read after the gated frames
                self._backlog = None
            self._handle(gate)
            self._kick()
        if self._gate_opened is not None:
            self._gate_opened.set()
        self._resume_input()

    def _peer_name(self) -> str:
        p = self.peer
        if p.pid is not None:
            return f"{p.transport} pid={p.pid} uid={p.uid}"
        return f"{p.transport} {p.address}".strip()

    # -------------------------------------------------------------- dispatch (synchronous, in the reader)
    def _on_hello(self, msg: Any, rec: Any) -> None:
        self._handshake.set()

    def _on_welcome(self, msg: Any, rec: Any) -> None:
        self._handshake.set()
        if self._conn_waiters:
            self._conn_waiters[0].wake()  # the server's connection window is known now

    def _on_goodbye(self, msg: Any, rec: Any) -> None:
        self._handshake.set()

    def _on_reply(self, msg: Any, rec: CallRecord) -> None:
        h = rec.handler
        if isinstance(h, _Pending):
            h.deliver(msg)
        elif h is not None:
            if h.pending is not None:
                h.pending.deliver(msg)
            if h.credit is not None:
                h.credit.closed = True
                h.credit.wake()

    def _on_error(self, msg: Any, rec: CallRecord) -> None:
        self._fail_outgoing(rec, msg)  # the ERROR frame is raised to the caller as its error

    def _on_item(self, msg: Any, rec: CallRecord) -> None:
        h = rec.handler
        payload = msg.payload
        size = len(payload)
        if h is not None and not isinstance(h, _Pending) and h.queue is not None:
            if size < 65536:
                # a small payload points into the whole read it came in: a copy of its own keeps
                # only what the budget counts alive (large frames have a buffer of their own)
                payload = payload.copy()
            h.queue.push(payload, msg.count, size + ITEM_OVERHEAD)  # its connection cost
        else:
            self._conn_freed(size + ITEM_OVERHEAD)

    def _on_end(self, msg: Any, rec: CallRecord) -> None:
        h = rec.handler
        if h is None or isinstance(h, _Pending):
            return
        if h.queue is not None:
            h.queue.finish()
        if isinstance(h, _OutCall) and h.credit is not None:
            h.credit.closed = True
            h.credit.wake()

    def _on_credit(self, msg: Any, rec: CallRecord | None) -> None:
        if msg.conn and self._conn_waiters:
            self._conn_waiters[0].wake()
        if rec is None:
            return
        h = rec.handler
        if h is not None and not isinstance(h, _Pending) and h.credit is not None:
            h.credit.wake()

    def _on_cancel(self, msg: Any, rec: CallRecord) -> None:
        h = rec.handler
        if h is not None:
            h.cancel()

    def _on_release(self, msg: Any, rec: Any) -> None:
        self._drop_ref(msg.obj, msg.count)

    def _drop_ref(self, oid: str, count: int) -> None:
        entry = self._refs.get(oid)
        if entry is None:
            return
        entry[1] -= count
        if entry[1] <= 0:
            del self._refs[oid]
            export = entry[0]
            key = (id(export.obj), export.desc.name)
            if self._ref_ids.get(key) == oid:
                del self._ref_ids[key]
            # no pipelined call can name the call that returned it any more: frames are ordered
            call_id = self._promise_of.pop(oid, None)
            if call_id is not None:
                self._promises.pop(call_id, None)

    def _on_pong(self, msg: Any, rec: Any) -> None:
        waiter = self._pings.pop(msg.nonce, None)
        if waiter is not None:
            waiter.set()

    def _on_call(self, msg: Call, rec: CallRecord | None) -> None:
        core = self._core
        call_id = msg.id
        if rec is not None and core.incoming.get(call_id) is not rec:
            return  # cancelled in the same read, before it started: nothing to run, nobody to answer
        oneway = msg.flags & CallFlags.ONEWAY
        promise: _Promise | None = None
        export: Export | None
        if msg.obj[:1] == "^":
            # pipelined: the target is the object an earlier call of the peer returns
            try:
                promise = self._promises.get(int(msg.obj[1:]))
            except ValueError:
                promise = None
            export = None
            desc = promise.desc if promise is not None else None
        else:
            export = self._lookup(msg.obj)
            desc = export.desc if export is not None else None
        if desc is None:
            if not oneway:
                core.send_error(call_id, ErrorCode.OBJECT_NOT_FOUND, "ObjectNotFound", f"no object is exported as {msg.obj!r}")
            log.info("xrpc: call to unknown object %r from %s", msg.obj, self._peer_name())
            return
        m = desc.methods.get(msg.method)
        if m is None or m.flags != msg.flags:
            if not oneway:
                what = "has no method" if m is None else "was called with the wrong kind for method"
                core.send_error(call_id, ErrorCode.METHOD_NOT_FOUND, "MethodNotFound", f"{desc.name} {what} {msg.method!r}")
            log.info("xrpc: call to unknown method %s.%s from %s", desc.name, msg.method, self._peer_name())
            return
        # the authorization checkpoint (a pipelined call passes it again once its target is known)
        if (export is None or export.guards or self._requirement is not None) and not self._authorize(export, m):
            if not oneway:
                core.send_error(call_id, ErrorCode.PEER_REJECTED, "PeerRejected", f"{m.qualname}: refused")
            return
        if rec is not None and rec.flags & (CallFlags.STREAM_IN | CallFlags.STREAM_OUT):
            if self._streams >= self.limits.max_streams:
                core.send_error(call_id, ErrorCode.LIMIT, "LimitExceeded", f"more than {self.limits.max_streams} streams open")
                return
        if self._serving >= self.limits.max_calls_in_flight:
            if not oneway:
                core.send_error(call_id, ErrorCode.LIMIT, "LimitExceeded", f"more than {self.limits.max_calls_in_flight} calls in flight")
            return
        deadline = msg.deadline
        loop = self._loop
        # A plain-function implementation runs inline, on the reader, without a task: the quickest
        # path, for methods that do not wait for anything.  Its arguments are gone when it returns.
        inline = (
            export is not None
            and loop is not None
            and m.name in export.inline
            and m.kind in (MethodKind.UNARY, MethodKind.ONEWAY)
            and not self._middleware
            and not m.reply_refs
            and deadline is None
        )
        # A call served in a task holds its decoded arguments until it ends: they are drawn from
        # the memory budget.  Admitted only if the frame and its decoded arguments (both alive
        # while they are decoded) fit beside what is held; small ones are not counted.
        size = 0 if inline else len(msg.payload)
        meta = msg.meta
        if meta and not inline:  # metadata lives as long as the call too
            size += sum(len(k) + len(v) for k, v in meta.items())
        if size > _SMALL_ARGS and self._held + 2 * size > self.limits.max_buffered:
            self._refuse_over_budget(call_id, m, oneway, size)
            return
        # Arguments are decoded now, in frame order: a RELEASE read after this CALL cannot drop an
        # object the arguments carry back before they are decoded.
        try:
            args = m.decode_args(msg.payload, self)
        except ValidationError as exc:
            log.warning("xrpc: refused call %s from %s: %s", m.qualname, self._peer_name(), _refusal(exc))
            if not oneway:
                core.send_error(call_id, ErrorCode.VALIDATION, "ValidationError", str(exc), [exc.argument])
            return
        if inline:
            assert export is not None
            self._serve_inline(msg, m, export, args)
            return
        # the task keeps ``msg``: let go of the frame (or the whole read) its payload points into
        _force_setattr(msg, "payload", _NO_PAYLOAD)
        if loop is None:
            scope = anyio.CancelScope(deadline=anyio.current_time() + deadline if deadline is not None else math.inf)
            inc = _InCall(scope)
        else:
            inc = _InCall(None)
        if rec is not None:
            rec.handler = inc
            if rec.flags & CallFlags.STREAM_IN:
                inc.queue = _StreamQueue(self, call_id)
            if rec.flags & CallFlags.STREAM_OUT:
                inc.credit = _Credit()
            if m.reply_iface is not None:
                inc.promise = self._promises[call_id] = _Promise(describe(m.reply_iface))
        self._serving += 1
        if inc.queue is not None or inc.credit is not None:
            self._streams += 1
        if size > _SMALL_ARGS:
            inc.held = size
            self._held += size
            self._calls_held += size
        if promise is None:
            assert export is not None
            coro = self._serve(msg, m, export, inc, args)
        else:
            coro = self._serve_pipelined(msg, m, promise, inc, args)
        if loop is None:
            assert self._tg is not None
            ticket = self._next_ticket
            self._next_ticket = ticket + 1
            self._tg.start_soon(self._start_in_order, ticket, coro)
        else:
            task = loop.create_task(coro)
            inc.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if inc.held:
                # a task cancelled before its first step never runs its ``finally``
                task.add_done_callback(lambda _: self._release_call(inc))
            if deadline is not None:
                inc.deadline = loop.time() + deadline

    def _refuse_over_budget(self, call_id: int, m: MethodDescription, oneway: int, size: int) -> None:
        reason = (
            f"{m.qualname}: its {size} bytes of arguments do not fit in the memory budget of {self.limits.max_buffered} bytes"
            f" beside the {self._held} bytes held for this connection (calls in flight: {self._calls_held})"
        )
        log.warning("xrpc: refused call from %s: %s", self._peer_name(), reason)
        if not oneway:
            self._core.send_error(call_id, ErrorCode.LIMIT, "LimitExceeded", reason)

    def _release_call(self, inc: _InCall) -> None:
        """The call ended (reply, error, cancel, or the connection closed): its arguments' bytes
        go back to the budget (once)."""
        n = inc.held
        if n:
            inc.held = 0
            self._calls_held -= n
            self._release(n)

    async def _start_in_order(self, ticket: int, coro: Any) -> None:
        """Run ``coro`` once every call received before it has started (the scheduler of a
        non-asyncio backend may start new tasks in any order)."""
        try:
            if self._started_ticket != ticket:
                event = self._ticket_waiters[ticket] = anyio.Event()
                await event.wait()
        except BaseException:
            coro.close()
            raise
        self._started_ticket = ticket + 1
        following = self._ticket_waiters.pop(ticket + 1, None)
        if following is not None:
            following.set()
        await coro

    def _authorize(self, export: Export | None, m: MethodDescription, quiet: bool = False) -> bool:
        """The one authorization checkpoint every incoming call passes, however it is addressed
        (export name, reference ``#id``, pipelined result ``^id``) and however it is served
        (inline or in a task; unary, one-way, stream or client stream).

        It checks the connection's requirement (a server's ``requirement=``; on a client, what its
        server must satisfy) and ``export.guards[m]``: the export's, the interface's and the
        implementation's requirements for ``m`` combined.  ``export`` is None for a pipelined call
        whose target is not known yet: then only the interface's requirement can be checked, and
        the call comes back here with its export once the target is known.  A refusal is logged
        (with the reason, which the peer never sees; not when ``quiet``: what is announced to the
        peer is decided here too) and returns False.
        """
        requirement = self._requirement
        if requirement is None or self._satisfies(requirement):
            requirement = export.guards.get(m.name) if export is not None else m.requirement
            if requirement is None or self._satisfies(requirement):
                return True
        if not quiet:
            log.warning("xrpc: refused call %s from %s: %s", m.qualname, self._peer_name(), _explain(requirement, self.peer))
        return False

    def _satisfies(self, requirement: Any) -> bool:
        """Whether the peer satisfies ``requirement``, cached for the connection (the peer's facts
        do not change).  The cache holds the requirement itself, so its id cannot be reused by
        another object while the verdict is cached."""
        key = id(requirement)
        hit = self._guard_cache.get(key)
        if hit is not None and hit[0] is requirement:
            return hit[1]
        try:
            ok = requirement.check(self.peer) is True
        except Exception:
            log.exception("xrpc: requirement %s failed to evaluate", requirement)
            ok = False
        if len(self._guard_cache) >= _GUARD_CACHE_SIZE:
            self._guard_cache.clear()  # bounded: exports created and dropped in a loop cannot grow it
        self._guard_cache[key] = (requirement, ok)
        return ok

    def _announced(self) -> list[ExportInfo]:
        """What HELLO/WELCOME announces: the exports this peer may call, each with only the methods
        it may call.  The fingerprint stays the whole interface's, so a peer with the same
        interface still skips the compatibility check; an export none of whose methods the peer
        may call is left out."""
        out = []
        for e in self._all_exports():
            info = e.info()
            if e.guards or self._requirement is not None:
                allowed = [name for name, m in e.desc.methods.items() if self._authorize(e, m, quiet=True)]
                if not allowed:
                    continue
                if len(allowed) != len(info.methods):
                    info = ExportInfo(info.name, info.interface, info.fingerprint, {n: info.methods[n] for n in allowed})
            out.append(info)
        return out

    _handlers: dict[type, Callable[..., None]] = {}

    # -------------------------------------------------------------- serving (callee side)
    def _serve_inline(self, msg: Call, m: MethodDescription, export: Export, args: tuple[Any, ...]) -> None:
        call_id = msg.id
        core = self._core
        fn = export.methods[m.name]
        kw: dict[str, Any] = {}
        if m.kwonly:
            args, kw = m.call_args(args)
        try:
            if msg.meta:
                ctx = contextvars.copy_context()
                ctx.run(_metadata.set, msg.meta)
                result = ctx.run(_run_inline, fn, args, kw)
            else:
                result = _run_inline(fn, args, kw)
        except Exception as exc:
            if m.kind is MethodKind.ONEWAY:
                log.warning("xrpc: one-way call %s raised %r", m.qualname, exc)
            else:
                self._send_exception(call_id, m, exc)
            return
        if inspect.isawaitable(result):
            # it returned an awaitable after all: finish it in a task
            async def finish() -> Any:
                return await result

            self._serve_later(msg, m, export, finish)
            return
        if m.kind is MethodKind.ONEWAY:
            return
        self._send_answer(call_id, m, result, None)
        # the reader flushes once it has handled every frame of this read

    def _serve_later(self, msg: Call, m: MethodDescription, export: Export, fn: Callable[[], Any]) -> None:
        """Serve a call whose implementation turned out to need awaiting, in a task of its own."""
        inc = _InCall(None)
        rec = self._core.incoming.get(msg.id)
        if rec is not None:
            rec.handler = inc  # a CANCEL reaches the task
        self._serving += 1
        size = len(msg.payload)
        if size > _SMALL_ARGS:
            # it holds its arguments from now on (it has started: it is not refused)
            inc.held = size
            self._held += size
            self._calls_held += size
        _force_setattr(msg, "payload", _NO_PAYLOAD)
        task = self._loop.create_task(self._serve(msg, m, _OneShotExport(export, m.name, fn), inc, ()))  # type: ignore[union-attr]
        inc.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if inc.held:
            task.add_done_callback(lambda _: self._release_call(inc))

    async def _serve_pipelined(self, msg: Call, m: MethodDescription, promise: _Promise, inc: _InCall, args: tuple[Any, ...]) -> None:
        """A call on the result of an earlier call: wait for that result, pass the authorization
        checkpoint with it (its implementation may carry ``@xrpc.requires``), then serve as usual."""
        await promise.wait()
        export: Export | None = None
        if promise.error is None:
            export = self._pipelined_export(promise, msg.obj)
        if export is None:
            error = (ErrorCode.OBJECT_NOT_FOUND, "ObjectNotFound", f"{msg.obj}: the call it depends on failed ({promise.error!r})")
        elif not self._authorize(export, m):
            error = (ErrorCode.PEER_REJECTED, "PeerRejected", f"{m.qualname}: refused")
        else:
            await self._serve(msg, m, export, inc, args)
            return
        self._serving -= 1
        if inc.held:
            self._release_call(inc)
        if inc.queue is not None or inc.credit is not None:
            self._streams -= 1
        if msg.id in self._core.incoming:
            self._core.send_error(msg.id, *error)
            self._kick()
        if inc.promise is not None:
            inc.promise.settle(error=ObjectNotFound(f"{msg.obj} failed"))
            self._settled(msg.id)

    def _pipelined_export(self, promise: _Promise, name: str) -> Export | None:
        """The object a promise resolved to, as an export: the one it was passed by reference as
        when it still is (its guards, and their cached verdicts, are reused), else a new one."""
        obj = promise.obj
        oid = self._ref_ids.get((id(obj), promise.desc.name))
        entry = self._refs.get(oid) if oid is not None else None
        if entry is not None and entry[0].obj is obj:
            export: Export = entry[0]
            return export
        try:
            return Export(promise.desc, obj, name)
        except TypeError as exc:
            promise.error = exc
            return None

    def _settled(self, call_id: int) -> None:
        """Keep the results of the last few calls for pipelined calls still on their way."""
        self._settled_ids.append(call_id)
        while len(self._settled_ids) > 256:
            self._promises.pop(self._settled_ids.popleft(), None)

    async def _serve(self, msg: Call, m: MethodDescription, export: Export, inc: _InCall, args: tuple[Any, ...]) -> None:
        core = self._core
        call_id = msg.id
        scope = inc.scope
        try:
            if msg.meta:
                _metadata.set(msg.meta)
            fn: Callable[..., Any]
            if m.kwonly:
                args, kw = m.call_args(args)
                fn = functools.partial(export.methods[m.name], **kw)
            else:
                fn = export.methods[m.name]
            if self._middleware:
                fn = self._intercepted(m, fn)
            if inc.queue is not None:
                args = (*args, _InStream(inc.queue, m))
                if m.stream_param is not None:
                    pos = m.params.index(m.stream_param)
                    if pos != len(args) - 1:
                        lst = list(args)
                        lst.insert(pos, lst.pop())
                        args = tuple(lst)
            if scope is not None:
                with scope:
                    await self._invoke(call_id, m, export, fn, args, inc)
                timed_out = scope.cancelled_caught and call_id in core.incoming
            elif inc.deadline != math.inf:
                with anyio.CancelScope(deadline=inc.deadline) as deadline_scope:
                    await self._invoke(call_id, m, export, fn, args, inc)
                timed_out = deadline_scope.cancelled_caught and call_id in core.incoming
            else:
                await self._invoke(call_id, m, export, fn, args, inc)
                timed_out = False
            if timed_out:
                # the deadline passed (a CANCEL from the peer removes the call from the table)
                core.send_error(call_id, ErrorCode.TIMEOUT, "TimeoutError", f"{m.qualname} did not finish before its deadline")
                self._kick()
        finally:
            self._serving -= 1
            if inc.held:
                self._release_call(inc)
            if inc.queue is not None or inc.credit is not None:
                self._streams -= 1
                if inc.queue is not None:
                    inc.queue.discard()
            core.forget_incoming(call_id)
            if inc.promise is not None:
                inc.promise.settle(error=ObjectNotFound(f"call {call_id} returned no object"))
                self._settled(call_id)

    async def _invoke(self, call_id: int, m: MethodDescription, export: Export, fn: Callable[..., Any], args: tuple[Any, ...], inc: _InCall) -> None:
        kind = m.kind
        try:
            if kind.streams_out:
                await self._serve_stream(call_id, m, fn, args, inc)
                return
            if export.is_async[m.name] and not m.kwonly:
                result = await fn(*args)
            else:
                result = fn(*args)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            if kind is MethodKind.ONEWAY:
                log.warning("xrpc: one-way call %s raised %r", m.qualname, exc)
            elif await self._room_for(len(str(exc)) + 64):
                start = self._core.emitted
                self._send_exception(call_id, m, exc)
                self._answered(start)
            return
        if inc.promise is not None:
            inc.promise.settle(result)
        if kind is not MethodKind.ONEWAY:
            if self._out_full() and not await self._room_for(_encoded_size(result)):
                return
            start = self._core.emitted
            self._send_answer(call_id, m, result, inc.promise)
            del result
            self._kick_after_reply()
            self._answered(start)

    async def _room_for(self, size: int) -> bool:
        """Wait while the peer is behind with what we send, holding an answer of about ``size``
        bytes: held answers draw from the memory budget, and a peer that makes us hold more than
        it is cut off.  False if the connection is over."""
        if not self._out_full():
            return True
        self._held += size
        try:
            if not self._within_budget():
                self._cut_off()
                return False
            await self._wait_drained()  # a peer that does not read gets no more answers meanwhile
        except Error:
            return False  # the connection is over
        finally:
            self._held -= size
        return True

    def _cut_off(self) -> None:
        """End a connection whose peer made us hold more than the budget, outside the reader."""
        self._over_budget()
        if self._aio is not None:
            self._aio.close()
        else:
            self._fail_connection(self._failure or LimitExceeded("over the memory budget"))

    def _answered(self, start: int) -> None:
        """A call served in a task has sent its answer (reply or error) since ``start``.  It is owed
        to the peer like the answers reading produces: past ``write_buffer_high`` unread, reading
        stops; past the memory budget unread, the peer is cut off.  (An answer is sent at once
        rather than held until the peer reads: a held result would be memory no budget sees.)"""
        self._owed += self._core.emitted - start
        if self._owed <= self.limits.write_buffer_high:
            return
        aio = self._aio
        if self._unsent() > self.limits.max_buffered:
            self._cut_off()
        elif aio is not None and self._peer_behind():
            aio.pause_reading()
            self._resume_input()  # flushes, and reads on at once if that was all; else the driver calls it again

    def _unsent(self) -> int:
        """Bytes encoded for the peer and not yet taken by the kernel."""
        aio = self._aio
        return len(self._core._out) + (aio.buffered() if aio is not None else self._in_send)

    def _send_answer(self, call_id: int, m: MethodDescription, result: Any, promise: _Promise | None) -> None:
        """Send REPLY for ``result``, or the ERROR that says why it cannot go (objects exported for a
        reply that never leaves are taken back)."""
        core = self._core
        try:
            if m.reply_refs:
                self._journal = []
            try:
                payload = m.encode_reply(result, self)
                core.send_reply(call_id, payload)
            except BaseException:
                self._rollback()
                raise
            if self._journal is not None:
                if promise is not None and type(payload) is Ref and not payload.home:
                    self._promise_of[payload.oid] = call_id
                self._journal = None
        except LimitExceeded as exc:
            log.warning("xrpc: reply of %s refused: %s", m.qualname, _refusal(exc))
            core.send_error(call_id, ErrorCode.LIMIT, "LimitExceeded", str(exc))
        except ValidationError as exc:
            log.warning("xrpc: reply of %s refused: %s", m.qualname, _refusal(exc))
            core.send_error(call_id, ErrorCode.VALIDATION, "ValidationError", str(exc), [""])
        except (TypeError, msgspec.EncodeError, OverflowError) as exc:
            log.warning("xrpc: reply of %s could not be sent: %s", m.qualname, type(exc).__name__)
            core.send_error(call_id, ErrorCode.INTERNAL, type(exc).__name__, f"the reply of {m.qualname} could not be encoded: {exc}")
        except LocalProtocolError as exc:
            if call_id in core.incoming:  # else the call is gone (cancelled, or the connection closed): nobody to answer
                core.send_error(call_id, ErrorCode.LIMIT, "LimitExceeded", f"the reply of {m.qualname} is too large: {exc}")
        except Exception as exc:  # pragma: no cover - never let a reply break the reader or the task
            log.warning("xrpc: reply of %s could not be sent: %s", m.qualname, type(exc).__name__)
            if call_id in core.incoming:
                core.send_error(call_id, ErrorCode.INTERNAL, type(exc).__name__, f"the reply of {m.qualname} could not be sent")

    def _intercepted(self, m: MethodDescription, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` run through the server middleware."""

        async def run(*args: Any) -> Any:
            ctx = CallContext(m, self, args, {}, dict(_metadata.get() or {}), "server")

            async def last() -> Any:
                result = fn(*args)
                if inspect.isawaitable(result):
                    result = await result
                return result

            return await _chain(self._middleware, ctx, last)

        return run

    def _kick_after_reply(self) -> None:
        """Write now if this was the last call being served (no other reply can join this write);
        otherwise leave it to the coalescing flush at the end of the loop iteration."""
        if self._serving == 1 and self._aio is not None and not self._fds_out:
            self._flush()
        else:
            self._kick()

    def _send_exception(self, call_id: int, m: MethodDescription, exc: Exception) -> None:
        core = self._core
        if call_id not in core.incoming:
            return
        if m.interface.errors and isinstance(exc, m.interface.errors):
            try:
                core.send_error(call_id, ErrorCode.DECLARED, type(exc).__qualname__, str(exc), list(exc.args))
            except (TypeError, msgspec.EncodeError, OverflowError, LocalProtocolError):
                core.send_error(call_id, ErrorCode.DECLARED, type(exc).__qualname__, str(exc), [str(exc)])
        elif isinstance(exc, ValidationError):
            core.send_error(call_id, ErrorCode.VALIDATION, "ValidationError", str(exc), [exc.argument])
        elif isinstance(exc, LimitExceeded):  # a limit of this side's (a stream item too large for the peer, say)
            core.send_error(call_id, ErrorCode.LIMIT, "LimitExceeded", str(exc))
        else:
            log.debug("xrpc: %s raised %r", m.qualname, exc)
            core.send_error(call_id, ErrorCode.REMOTE, type(exc).__qualname__, str(exc))
        self._kick()

    async def _serve_stream(self, call_id: int, m: MethodDescription, fn: Callable[..., Any], args: tuple[Any, ...], inc: _InCall) -> None:
        core = self._core
        rec = core.incoming.get(call_id)
        credit = inc.credit
        assert credit is not None
        result = fn(*args)
        if inspect.isawaitable(result) and not hasattr(result, "__aiter__"):
            result = await result
        it = result.__aiter__()
        try:
            alive = lambda: core.incoming.get(call_id) is rec  # noqa: E731
            # items of a plain slot go out as they are: no per-item call
            wrap = functools.partial(m.encode_reply, ctx=self) if (m.reply_refs or m.reply_checked) else None
            if rec is not None and await self._send_stream(rec, it, wrap, credit, alive, m):
                core.send_end(call_id)
                self._kick()
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                with anyio.move_on_after(1.0, shield=True):
                    await aclose()

    async def _send_stream(
        self, rec: CallRecord, it: Any, wrap: Callable[[Any], Any] | None, credit: _Credit, alive: Callable[[], bool], m: MethodDescription
    ) -> bool:
        """Send the items of ``it`` on ``rec`` in batches, within credit.  True once ``it`` is exhausted.

        Items that are ready without suspending are gathered into one ITEM frame (up to the credit
        held and a size estimate); as soon as the producer would suspend, what is gathered is sent,
        so a slow producer's items are never held back.
        """
        batch: list[Any] = []
        cap = 0
        blocked = False
        out = self._core._out  # (the core swaps its buffer when the writer takes it: re-read below)
        high = self.limits.write_buffer_high
        while True:
            if batch and (blocked or rec.send_bytes <= 0 or len(out) > high):
                # What is gathered must be able to go out without waiting once the producer has
                # started a step (see below), so if it cannot, it goes out first.  (It never needs
                # more item credit than is held: a batch is sent as soon as it holds that much.
                # Whether it fits in the connection credit is only known once it is encoded: if it
                # did not, it was kept, and waits here.)
                if not await self._send_batch(rec, batch, credit, alive, m):
                    return False
                batch = []
                blocked = False
            elif not batch:
                if self._out_full():
                    # The peer is behind: no batch starts (so nothing is sent from a step) until it reads.
                    await self._wait_drained()
                out = self._core._out
            step = it.__anext__()
            try:
                yielded = step.send(None)
            except StopIteration as stop:
                item = stop.value
            except StopAsyncIteration:
                break
            except BaseException:
                # the producer failed: what it produced before still goes out, then the error
                if batch:
                    await self._send_batch(rec, batch, credit, alive, m)
                raise
            else:
                # The producer is suspended in the middle of a step.  Until that step is resumed
                # as an ordinary await, awaiting anything else would run inside the producer's
                # cancel scopes, could take its wake-up, and could leave the generator marked as
                # running for good.  So what is gathered is sent now without waiting (the check
                # above made sure it can be), and the step is only ever finished, never dropped:
                # if the call has ended, its owner cancels this task and the step unwinds as any
                # cancelled await does.
                if batch and not blocked:
                    failure = self._send_now(rec, batch, credit, alive, m)
                    if failure is _BLOCKED:
                        blocked = True  # kept: it waits for connection credit once this step is done
                        failure = None
                    else:
                        batch = []
                    if failure is not None:
                        try:
                            await _resume(step, yielded)
                        except StopAsyncIteration:
                            pass
                        if failure is _STOPPED:
                            return False
                        raise failure
                try:
                    item = await _resume(step, yielded)
                except StopAsyncIteration:
                    break
            if wrap is None:
                payload = item
            else:
                try:
                    payload = wrap(item)
                except ValueError as exc:
                    raise ValidationError(f"stream item of {m.qualname}: {exc}", method=m.name) from None
            if not cap:
                try:
                    size = len(_size_encoder.encode(payload)) + 8
                except (TypeError, msgspec.EncodeError, OverflowError) as exc:
                    raise ValidationError(f"stream item of {m.qualname} cannot be encoded: {exc}", method=m.name) from None
                cap = max(1, min(_MAX_BATCH, self._core.peer_window_bytes // (2 * size)))
            batch.append(payload)
            if len(batch) >= cap or len(batch) >= rec.send_credit:
                if not await self._send_batch(rec, batch, credit, alive, m):
                    return False
                batch = []
        if batch and not await self._send_batch(rec, batch, credit, alive, m):
            return False
        return alive()

    def _send_now(
        self, rec: CallRecord, batch: list[Any], credit: _Credit, alive: Callable[[], bool], m: MethodDescription
    ) -> BaseException | None:
        """Send ``batch`` without suspending (``_send_stream`` made sure it can, as far as stream
        credit goes); return what stops the stream instead of raising it (``_STOPPED`` if the call
        is over, ``_BLOCKED`` if the batch must wait for connection credit or be split)."""
        if credit.closed or not alive() or rec.send_credit < len(batch) or rec.send_bytes <= 0:
            return _STOPPED
        if self._conn_waiters:
            return _BLOCKED  # others wait for connection credit: no overtaking them
        try:
            if not self._core.send_items(rec.id, batch):
                return _BLOCKED
        except (TypeError, msgspec.EncodeError, OverflowError) as exc:
            return ValidationError(f"stream item of {m.qualname} cannot be encoded: {exc}", method=m.name)
        except LocalProtocolError as exc:
            if len(batch) > 1:
                return _BLOCKED  # too large as one frame: _send_batch splits it
            return LimitExceeded(f"stream item of {m.qualname}: {exc}")
        self._kick()
        return None

    async def _send_batch(
        self, rec: CallRecord, batch: list[Any], credit: _Credit, alive: Callable[[], bool], m: MethodDescription
    ) -> bool:
        core = self._core
        most = len(batch)  # items per frame: halved while a frame would be too large
        while batch:
            while rec.send_credit <= 0 or rec.send_bytes <= 0:
                if credit.closed or not alive():
                    return False
                credit.event = anyio.Event()
                await credit.event.wait()
            if credit.closed or not alive():
                return False
            n = min(len(batch), rec.send_credit, most)
            if self._out_full():
                await self._wait_drained()  # every stream waits for the peer before it adds a frame
                continue  # credit and liveness may have changed meanwhile
            try:
                if not await self._send_conn(rec, batch if n == len(batch) else batch[:n], credit, alive):
                    return False
            except (TypeError, msgspec.EncodeError, OverflowError) as exc:
                raise ValidationError(f"stream item of {m.qualname} cannot be encoded: {exc}", method=m.name) from None
            except LocalProtocolError as exc:
                if n > 1:
                    most = n // 2
                    continue
                raise LimitExceeded(f"stream item of {m.qualname}: {exc}") from None
            batch = batch[n:]
            if self._out_full():
                await self._wait_drained()
            else:
                self._kick()
        return True

    async def _send_conn(self, rec: CallRecord, items: list[Any], credit: _Credit, alive: Callable[[], bool]) -> bool:
        """Send ``items`` (within the stream's credit) as one ITEM frame once the connection credit
        lets it; False if the stream closed meanwhile.

        Producers that wait for connection credit queue up and are served in order: only the first
        is woken, and nobody overtakes it, so a large frame is not starved by a stream of small ones.
        """
        core = self._core
        waiters = self._conn_waiters
        if not waiters and core.send_items(rec.id, items):
            return True
        credit.need = core.conn_wanted if not waiters else 1
        waiters.append(credit)
        try:
            while True:
                if credit.closed or not alive():
                    return False
                if waiters[0] is credit and (not core.conn_limited or core.conn_send >= credit.need):
                    if core.send_items(rec.id, items):
                        return True
                    credit.need = core.conn_wanted
                    continue
                credit.event = anyio.Event()
                await credit.event.wait()
        finally:
            if waiters and waiters[0] is credit:
                waiters.popleft()
                if waiters:
                    waiters[0].wake()
            else:
                with contextlib.suppress(ValueError):
                    waiters.remove(credit)

    # -------------------------------------------------------------- calling (caller side)
    def _check_open(self) -> None:
        if self._closed.is_set() or self._closing:
            f = self._failure
            if isinstance(f, ConnectionInvalidated):
                raise type(f)(*f.args)
            raise ConnectionInvalidated(f"the connection is closed ({f})" if f else "the connection is closed")

    def _send(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> CallRecord:
        """Encode the arguments and send the CALL; objects exported for it are taken back if it fails."""
        if not m.ref_args:
            return self._start(obj, m, m.encode_args(args, kwargs, self), timeout)
        self._journal = []
        try:
            rec = self._start(obj, m, m.encode_args(args, kwargs, self), timeout)
        except BaseException:
            self._rollback()
            raise
        self._journal = None
        return rec

    def _rollback(self) -> None:
        """Take back the references handed out since the journal started (their frame never left)."""
        journal, self._journal = self._journal, None
        for oid in journal or ():
            self._drop_ref(oid, 1)

    def _start(self, obj: str, m: MethodDescription, payload: Any, timeout: float | None) -> CallRecord:
        self._check_open()
        try:
            rec = self._core.send_call(obj, m.name, payload, m.flags, timeout, _metadata.get())
        except (TypeError, msgspec.EncodeError, OverflowError) as exc:
            raise ValidationError(f"arguments of {m.qualname} cannot be encoded: {exc}", method=m.name) from None
        except LocalProtocolError as exc:
            raise LimitExceeded(f"{m.qualname}: {exc}") from None
        if len(self._core.outgoing) <= 1 and self._aio is not None and not self._fds_out and not self._flush_scheduled:
            self._flush()  # the only call in flight: nothing to coalesce it with
        else:
            self._kick()
        return rec

    async def _client_intercept(self, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], last: Callable[[], Awaitable[Any]]) -> Any:
        ctx = CallContext(m, self, args, kwargs, dict(_metadata.get() or {}), "client")
        token = _metadata.set(ctx.metadata)  # what the middleware adds travels with the call
        try:
            return await _chain(self._middleware, ctx, last)
        finally:
            _metadata.reset(token)

    async def call_unary(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        if self._middleware:
            return await self._client_intercept(m, args, kwargs, lambda: self._call_unary(obj, m, args, kwargs, timeout))
        rec = self._send(obj, m, args, kwargs, timeout)
        pending = _Pending(self._loop)
        rec.handler = pending
        fut = pending.fut
        try:
            if timeout is None:
                if fut is not None:
                    await fut  # the common case: no intermediate coroutine
                else:
                    await pending.wait()
            else:
                with anyio.fail_after(timeout):
                    await pending.wait()
        except BaseException:
            if pending.result is None:
                self._cancel_call(rec.id)
            raise
        res = pending.result
        if type(res) is Reply:
            return m.decode_reply(res.payload, self)
        return self._result(m, res)

    async def _call_unary(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        rec = self._send(obj, m, args, kwargs, timeout)
        pending = _Pending(self._loop)
        rec.handler = pending
        fut = pending.fut
        try:
            if timeout is None:
                if fut is not None:
                    await fut  # the common case: no intermediate coroutine
                else:
                    await pending.wait()
            else:
                with anyio.fail_after(timeout):
                    await pending.wait()
        except BaseException:
            if pending.result is None:
                self._cancel_call(rec.id)
            raise
        res = pending.result
        if type(res) is Reply:
            return m.decode_reply(res.payload, self)
        return self._result(m, res)

    def _result(self, m: MethodDescription, res: Any) -> Any:
        if type(res) is Reply:
            return m.decode_reply(res.payload, self)
        if type(res) is ErrorFrame:
            raise _error_from_frame(m, res)
        raise res

    def call_pipelined(self, target: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Promise:
        return Promise(self, m, target, args, kwargs, timeout)

    def _cancel_call(self, call_id: int) -> None:
        if self._closed.is_set():
            return
        self._core.send_cancel(call_id)
        if threading.get_ident() == self._loop_thread:
            self._kick()

    async def call_oneway(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._middleware:
            await self._client_intercept(m, args, kwargs, lambda: self._call_oneway(obj, m, args, kwargs))
            return
        await self._call_oneway(obj, m, args, kwargs)

    async def _call_oneway(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._send(obj, m, args, kwargs, None)
        await anyio.lowlevel.checkpoint()

    async def call_client_stream(
        self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        if self._middleware:
            return await self._client_intercept(m, args, kwargs, lambda: self._call_client_stream(obj, m, args, kwargs, timeout))
        return await self._call_client_stream(obj, m, args, kwargs, timeout)

    async def _call_client_stream(
        self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        source, args, kwargs = _split_stream_arg(m, args, kwargs)
        with anyio.fail_after(timeout) if timeout is not None else anyio.CancelScope():
            rec = self._send(obj, m, args, kwargs, timeout)
            pending = _Pending(self._loop)
            out = _OutCall(None, _Credit(), pending)
            rec.handler = out
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, rec, m, source, out.credit)
                    await pending.wait()
                    tg.cancel_scope.cancel()
            except BaseException:
                if pending.result is None:
                    self._cancel_call(rec.id)
                raise
        return self._result(m, pending.result)

    async def _pump(self, rec: CallRecord, m: MethodDescription, source: Any, credit: _Credit | None) -> None:
        """Send the items of a client stream, within the credit the peer grants."""
        core = self._core
        call_id = rec.id
        slot = m.stream_item
        assert slot is not None and credit is not None
        it = source.__aiter__()
        try:
            alive = lambda: not credit.closed and core.outgoing.get(call_id) is rec  # noqa: E731
            wrap: Callable[[Any], Any] | None
            if slot.plan is not None:
                wrap = functools.partial(slot.to_wire, self)
            elif slot.classes is not None or slot.any_plain:
                wrap = slot.wrap
            else:
                wrap = None  # a plain slot: items go out as they are
            if await self._send_stream(rec, it, wrap, credit, alive, m):
                core.send_end(call_id)
                self._kick()
        except Exception as exc:
            # the caller's own source failed (or an item was refused): the call ends with that
            # error, raised to the caller as itself; the connection carries on.  A source that
            # fails as it is cancelled because the connection is going away does not stand in for
            # that: the call ends as every other call does.
            if core.outgoing.get(call_id) is rec and self._failure is None and not self._closing:
                self._core.send_cancel(call_id)
                self._kick()
                self._fail_outgoing(rec, exc)
            else:
                log.warning("xrpc: the stream source of %s failed after the call ended", m.qualname, exc_info=True)
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                with anyio.move_on_after(1.0, shield=True):
                    try:
                        await aclose()
                    except Exception:
                        # a source is closed early only once the call's outcome is decided (the
                        # reply came, the call was cancelled, the peer went away): its own failure
                        # to close is reported, not raised in the caller's place
                        log.warning("xrpc: the stream source of %s failed when it was closed", m.qualname, exc_info=True)

    def call_stream(
        self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> CallStream[Any]:
        source = None
        if m.kind is MethodKind.BIDI_STREAM:
            source, args, kwargs = _split_stream_arg(m, args, kwargs)
        if m.ref_args:
            # objects in the arguments are exported when the stream starts, not before
            return CallStream(self, obj, m, None, source, timeout, (args, kwargs))
        payload = m.encode_args(args, kwargs, self)
        return CallStream(self, obj, m, payload, source, timeout)


Connection._handlers = {
    Call: Connection._on_call,
    Reply: Connection._on_reply,
    ErrorFrame: Connection._on_error,
    Item: Connection._on_item,
    End: Connection._on_end,
    Credit: Connection._on_credit,
    Cancel: Connection._on_cancel,
    Release: Connection._on_release,
    Goodbye: Connection._on_goodbye,
    Hello: Connection._on_hello,
    Welcome: Connection._on_welcome,
    Pong: Connection._on_pong,
}


def _split_stream_arg(m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    sp = m.stream_param
    assert sp is not None
    if sp.name in kwargs:
        kwargs = dict(kwargs)
        source = kwargs.pop(sp.name)
    else:
        pos = m.params.index(sp)
        if len(args) <= pos:
            raise ValidationError(f"{m.qualname}() is missing its stream argument {sp.name!r}", method=m.name, argument=sp.name)
        source = args[pos]
        args = args[:pos] + args[pos + 1 :]
    if not hasattr(source, "__aiter__"):
        if hasattr(source, "__iter__"):
            source = _aiter_of(source)
        else:
            raise ValidationError(
                f"argument {sp.name!r} of {m.qualname} must be an async iterable, got {type(source).__qualname__}",
                method=m.name,
                argument=sp.name,
            )
    return source, args, kwargs


async def _aiter_of(iterable: Iterable[Any]) -> AsyncIterator[Any]:
    for x in iterable:
        yield x


class _InStream:
    """What the implementation of a client-stream method receives: an async iterator of items."""

    def __init__(self, queue: _StreamQueue, m: MethodDescription) -> None:
        self._reader = _BatchReader(queue, m.stream_item, m)

    def __aiter__(self) -> _InStream:
        return self

    async def __anext__(self) -> Any:
        return await self._reader.next()


class CallStream(AsyncIterator[_T]):
    """The caller's side of a server or two-way stream: ``async for item in proxy.m(...)``.

    The call starts on the first iteration.  ``aclose()``, leaving an ``async with`` block, a
    ``break`` (once the iterator is dropped), or cancelling the consuming task stops the remote
    producer.  ``timeout`` bounds the whole stream.
    """

    def __init__(
        self,
        conn: Connection,
        obj: str,
        m: MethodDescription,
        payload: Any,
        source: Any,
        timeout: float | None,
        deferred: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    ) -> None:
        self._deferred = deferred
        self._conn = conn
        self._obj = obj
        self._m = m
        self._payload = payload
        self._source = source
        self._timeout = timeout
        self._deadline = math.inf
        self._rec: CallRecord | None = None
        self._reader: _BatchReader | None = None
        self._done = False
        self._pump_scope: anyio.CancelScope | None = None
        self._taken = 0

    def __aiter__(self) -> CallStream[_T]:
        return self

    async def _begin_async(self) -> _BatchReader:
        return self._begin()

    def _begin(self) -> _BatchReader:
        conn = self._conn
        if self._timeout is not None:
            self._deadline = anyio.current_time() + self._timeout
        if self._deferred is not None:
            args, kwargs = self._deferred
            self._deferred = None
            rec = conn._send(self._obj, self._m, args, kwargs, self._timeout)
        else:
            rec = conn._start(self._obj, self._m, self._payload, self._timeout)
        self._payload = None
        queue = _StreamQueue(conn, rec.id)
        credit = _Credit() if self._source is not None else None
        rec.handler = _OutCall(queue, credit, None)
        self._rec = rec
        self._reader = _BatchReader(queue, self._m.reply, self._m)
        if self._source is not None:
            assert conn._tg is not None
            self._pump_scope = anyio.CancelScope()
            conn._tg.start_soon(self._run_pump, rec, credit)
        return self._reader

    async def _run_pump(self, rec: CallRecord, credit: _Credit | None) -> None:
        assert self._pump_scope is not None
        with self._pump_scope:
            await self._conn._pump(rec, self._m, self._source, credit)

    async def __anext__(self) -> _T:
        reader = self._reader
        if reader is not None and self._deadline == math.inf and not self._done:
            # the hot path: an item of a batch already decoded, handed out without suspending
            item = reader.take()
            if item is not _EMPTY:
                self._taken += 1
                if reader.credit_due() or not self._taken & 15:
                    # look for a cancellation now and then, and always before credit is returned
                    try:
                        if reader.credit_due():
                            await reader.grant()
                        else:
                            await anyio.lowlevel.checkpoint_if_cancelled()
                    except BaseException:
                        self._stop()
                        raise
                return item  # type: ignore[no-any-return]
        if self._done:
            raise StopAsyncIteration
        if reader is None:
            if self._conn._middleware:
                # client middleware sees the start of the stream (and what it adds to the metadata
                # travels with the CALL)
                reader = await self._conn._client_intercept(self._m, (), {}, self._begin_async)
            else:
                reader = self._begin()
        try:
            if self._deadline == math.inf:
                return await reader.next()  # type: ignore[no-any-return]
            left = self._deadline - anyio.current_time()
            if left <= 0:
                raise TimeoutError(f"the stream {self._m.qualname} passed its deadline")
            with anyio.fail_after(left):
                await anyio.lowlevel.checkpoint_if_cancelled()
                return await reader.next()  # type: ignore[no-any-return]
        except StopAsyncIteration:
            self._finish()
            err = reader.queue.error
            if err is not None:
                if type(err) is ErrorFrame:
                    raise _error_from_frame(self._m, err) from None
                raise err from None
            raise
        except BaseException:
            self._stop()
            raise

    def _finish(self) -> None:
        self._done = True
        if self._pump_scope is not None:
            self._pump_scope.cancel()

    def _stop(self) -> None:
        if self._done:
            return
        self._done = True
        if self._pump_scope is not None:
            self._pump_scope.cancel()
        rec = self._rec
        if rec is not None and self._conn._core.outgoing.get(rec.id) is rec:
            self._conn._cancel_call(rec.id)
        if self._reader is not None:
            self._reader.queue.discard()

    async def aclose(self) -> None:
        """Stop the stream (the remote producer is cancelled)."""
        self._stop()
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> CallStream[_T]:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not self._done and self._rec is not None:
            try:
                self._stop()
            except Exception:
                pass


class Promise:
    """The pending result of a call made through ``xrpc.pipeline(proxy)``.

    Await it for the result.  If the method returns an object by reference, calling a method on the
    promise sends that call at once, addressed to "the result of that call", without waiting for the
    first answer (promise pipelining): a chain of dependent calls costs one round trip.
    """

    def __init__(self, conn: Connection, m: MethodDescription, target: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> None:
        if m.kind is not MethodKind.UNARY:
            raise TypeError(f"{m.qualname}: only unary calls can be pipelined")
        self._conn = conn
        self._m = m
        self._timeout = timeout
        rec = conn._send(target, m, args, kwargs, timeout)
        self._pending = _EagerPending(conn, m)
        rec.handler = self._pending
        self._id = rec.id

    def __await__(self) -> Any:
        return self._get().__await__()

    async def _get(self) -> Any:
        p = self._pending
        if p.result is None:
            try:
                if self._timeout is None:
                    await p.wait()
                else:
                    with anyio.fail_after(self._timeout):
                        await p.wait()
            except BaseException:
                if p.result is None:
                    self._conn._cancel_call(self._id)
                raise
        if p.error is not None:
            raise p.error
        return p.value

    def __getattr__(self, name: str) -> Callable[..., Promise]:
        iface = self._m.reply_iface
        if iface is None:
            raise AttributeError(f"{self._m.qualname} does not return an object: there is nothing to pipeline on")
        m = describe(iface).methods.get(name)
        if m is None:
            raise AttributeError(f"{describe(iface).name} has no method {name!r}")
        conn = self._conn

        def call(*args: Any, **kwargs: Any) -> Promise:
            p = self._pending
            there = proxy_target(p.value) if p.result is not None and p.error is None else None
            if there is not None and there[0] is conn:
                target = there[1]  # the answer is here already: address the object itself
            else:
                target = f"^{self._id}"
            return Promise(conn, m, target, args, kwargs, self._timeout)

        return call

