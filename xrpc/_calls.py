"""The caller side of a connection: outgoing calls of every kind, their answers, and promises.

Every call in flight has a ``CallHandler`` on its core record (``rec.handler``); the connection's
reader routes the frames about the call to it (``on_reply``, ``on_item``, ``on_end``,
``on_credit``, ``on_cancel``), and ``fail`` ends it with an ERROR frame or an exception.  The
handlers of calls this side makes live here (``Pending`` for unary calls, ``EagerPending`` for
pipelined ones, ``OutCall`` for streams); the serving side's ``InCall`` implements the same
contract.  ``Calls`` implements the ``Caller`` contract proxies call through.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import anyio
import anyio.lowlevel
import msgspec

from ._codes import exception_from_error
from ._errors import ConnectionInvalidated, LimitExceeded, LocalProtocolError, ValidationError
from ._interface import InterfaceDescription, MethodDescription, MethodKind, describe
from ._io import Link, Waiter, new_waiter
from ._middleware import Middleware, metadata, run_client_chain
from ._objects import ObjectTable
from ._protocol import ITEM_OVERHEAD, CallRecord, ProtocolCore, Reply
from ._protocol import Error as ErrorFrame
from ._proxy import PromiseBase, pipelined_method, proxy_target
from ._streams import EMPTY, BatchReader, Credit, FlowControl, StreamQueue, StreamSender, split_stream_arg

__all__ = ("CallHandler", "CallStream", "Calls", "Side", "EagerPending", "OutCall", "Pending", "Promise", "StreamHandler", "push_item")

log = logging.getLogger("xrpc")
_T = TypeVar("_T")


class CallHandler:
    """What the reader routes a call's frames to.  Every method is called on the event loop's
    thread, synchronously, as the frame is read; the defaults ignore the frame."""

    __slots__ = ()

    def on_reply(self, msg: Reply) -> None:
        """REPLY: the call's result."""

    def on_item(self, msg: Any) -> bool:
        """ITEM: a batch of stream items; False if nobody takes it (its credit goes back)."""
        return False

    def on_end(self) -> None:
        """END: the peer's side of the stream is over."""

    def on_credit(self) -> None:
        """CREDIT: the peer granted more stream credit."""

    def on_cancel(self) -> None:
        """CANCEL: the peer gave up on the call."""

    def fail(self, error: Any) -> None:
        """ERROR from the peer (the frame), or the connection ended (an exception)."""


def push_item(queue: StreamQueue, msg: Any) -> None:
    """Queue an ITEM frame's payload on ``queue``, charged at its connection cost."""
    payload = msg.payload
    size = len(payload)
    if size < 65536:
        # a small payload points into the whole read it came in: a copy of its own keeps
        # only what the budget counts alive (large frames have a buffer of their own)
        payload = payload.copy()
    queue.push(payload, msg.count, size + ITEM_OVERHEAD)


class Pending(CallHandler):
    """A call waiting for its answer (an asyncio future on asyncio, the backend's event elsewhere)."""

    __slots__ = ("fut", "event", "result")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.result: Any = None  # a Reply, an Error frame, or an exception to raise
        if loop is not None:
            self.fut: asyncio.Future[None] | None = loop.create_future()
            self.event: Waiter | None = None
        else:
            self.fut = None
            self.event = new_waiter()

    def deliver(self, value: Any) -> None:
        if self.result is not None:
            return
        self.result = value
        if self.fut is not None:
            if not self.fut.done():
                self.fut.set_result(None)
        else:
            self.event.set()  # type: ignore[union-attr]

    on_reply = deliver  # type: ignore[assignment]
    fail = deliver  # type: ignore[assignment]

    async def wait(self) -> None:
        if self.fut is not None:
            await self.fut
        else:
            await self.event.wait()  # type: ignore[union-attr]


class EagerPending(Pending):
    """A pipelined call's answer, decoded as soon as it arrives (so references in it are adopted,
    and released, even if nobody ever awaits the promise)."""

    __slots__ = ("calls", "m", "value", "error")

    def __init__(self, calls: Calls, m: MethodDescription) -> None:
        super().__init__(calls.link.loop)
        self.calls = calls
        self.m = m
        self.value: Any = None
        self.error: BaseException | None = None

    def deliver(self, value: Any) -> None:
        if self.result is not None:
            return
        try:
            self.value = self.calls.result(self.m, value)
        except BaseException as exc:  # noqa: BLE001 - kept for whoever awaits the promise
            self.error = exc
        super().deliver(value)

    on_reply = deliver
    fail = deliver


class StreamHandler(CallHandler):
    """A call with streams: ``queue`` receives the peer's items, ``credit`` paces the items sent."""

    __slots__ = ("queue", "credit")

    def __init__(self, queue: StreamQueue | None, credit: Credit | None) -> None:
        self.queue = queue
        self.credit = credit

    def on_item(self, msg: Any) -> bool:
        if self.queue is None:
            return False
        push_item(self.queue, msg)
        return True

    def on_credit(self) -> None:
        if self.credit is not None:
            self.credit.wake()

    def on_end(self) -> None:
        if self.queue is not None:
            self.queue.finish()


class OutCall(StreamHandler):
    """Caller-side state of a stream call: the queue of items received (server and two-way
    streams), the credit of items sent (client and two-way streams), the reply (client streams)."""

    __slots__ = ("pending",)

    def __init__(self, queue: StreamQueue | None, credit: Credit | None, pending: Pending | None) -> None:
        super().__init__(queue, credit)
        self.pending = pending

    def on_reply(self, msg: Reply) -> None:
        if self.pending is not None:
            self.pending.deliver(msg)
        if self.credit is not None:
            self.credit.close()

    def on_end(self) -> None:
        super().on_end()
        if self.credit is not None:
            self.credit.close()  # the call is over: nothing more goes out

    def fail(self, error: Any) -> None:
        if self.queue is not None:
            self.queue.finish(error)
        if self.pending is not None:
            self.pending.deliver(error)
        if self.credit is not None:
            self.credit.close()


class Side:
    """What the calling and the serving side of one connection share: the connection (whose
    ``peer`` they report), the core, the write side, the budget and credit, the stream sender and
    the object table (the codec's wire context), and the middleware of their side."""

    __slots__ = ("connection", "core", "link", "flow", "sender", "objects", "middleware")

    def __init__(
        self,
        connection: Any,  # the Connection: what middleware sees as ctx.connection, and its peer
        core: ProtocolCore,
        link: Link,
        flow: FlowControl,
        sender: StreamSender,
        objects: ObjectTable | None,
        middleware: Sequence[Middleware],
    ) -> None:
        self.connection = connection
        self.core = core
        self.link = link
        self.flow = flow
        self.sender = sender
        self.objects: ObjectTable = objects  # type: ignore[assignment]  # set by the connection
        self.middleware = tuple(middleware)


class Calls(Side):
    """The calls one connection makes: the ``Caller`` its proxies call through."""

    __slots__ = ("url", "loop_thread")

    def __init__(self, *parts: Any, url: str) -> None:
        super().__init__(*parts)
        self.url = url
        self.loop_thread = threading.get_ident()

    # ---------------------------------------------------------------- sending
    def send(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> CallRecord:
        """Encode the arguments and send the CALL; objects exported for it are taken back if it fails."""
        objects = self.objects
        if not m.ref_args:
            return self.start(obj, m, m.encode_args(args, kwargs, objects), timeout)
        objects.begin(call=True)
        try:
            rec = self.start(obj, m, m.encode_args(args, kwargs, objects), timeout)
        except BaseException:
            objects.rollback()
            raise
        objects.commit()
        return rec

    def start(self, obj: str, m: MethodDescription, payload: Any, timeout: float | None) -> CallRecord:
        link = self.link
        if link.closing or link.ended:
            self.check_open()
        core = self.core
        try:
            rec = core.send_call(obj, m.name, payload, m.flags, timeout, metadata.get())
        except (TypeError, msgspec.EncodeError, OverflowError) as exc:
            raise ValidationError(f"arguments of {m.qualname} cannot be encoded: {exc}", method=m.name) from None
        except LocalProtocolError as exc:
            raise LimitExceeded(f"{m.qualname}: {exc}") from None
        if not link.flush_scheduled:
            if len(core.outgoing) <= 1:
                link.send_now()  # the only call in flight: nothing to coalesce it with
            else:
                link.kick()
        return rec

    def check_open(self) -> None:
        link = self.link
        if link.closed.is_set() or link.closing:
            f = link.failure
            if isinstance(f, ConnectionInvalidated):
                raise type(f)(*f.args)
            raise ConnectionInvalidated(f"the connection is closed ({f})" if f else "the connection is closed")

    def cancel(self, call_id: int) -> None:
        """Tell the peer this side gave up on call ``call_id`` (from any thread)."""
        if self.link.closed.is_set():
            return
        self.core.send_cancel(call_id)
        if threading.get_ident() == self.loop_thread:
            self.link.kick()

    def result(self, m: MethodDescription, res: Any) -> Any:
        """The value of an answer (REPLY), or raise its error (ERROR frame or exception)."""
        if type(res) is Reply:
            return m.decode_reply(res.payload, self.objects)
        if type(res) is ErrorFrame:
            raise exception_from_error(m, res)
        raise res

    async def intercept(self, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], last: Callable[[], Awaitable[Any]]) -> Any:
        return await run_client_chain(self.middleware, self.connection, m, args, kwargs, last)

    # ---------------------------------------------------------------- the Caller contract
    async def call_unary(
        self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None, intercepted: bool = False
    ) -> Any:
        if self.middleware and not intercepted:
            return await self.intercept(m, args, kwargs, lambda: self.call_unary(obj, m, args, kwargs, timeout, True))
        if m.ref_args:
            rec = self.send(obj, m, args, kwargs, timeout)
        else:
            rec = self.start(obj, m, m.encode_args(args, kwargs), timeout)
        pending = Pending(self.link.loop)
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
                self.cancel(rec.id)
            raise
        res = pending.result
        if type(res) is Reply:
            return m.decode_reply(res.payload, self.objects)
        return self.result(m, res)

    async def call_oneway(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.middleware:
            await self.intercept(m, args, kwargs, lambda: self._oneway(obj, m, args, kwargs))
            return
        await self._oneway(obj, m, args, kwargs)

    async def _oneway(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.send(obj, m, args, kwargs, None)
        await anyio.lowlevel.checkpoint()

    async def call_client_stream(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        if self.middleware:
            return await self.intercept(m, args, kwargs, lambda: self._client_stream(obj, m, args, kwargs, timeout))
        return await self._client_stream(obj, m, args, kwargs, timeout)

    async def _client_stream(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        source, args, kwargs = split_stream_arg(m, args, kwargs)
        with anyio.fail_after(timeout) if timeout is not None else anyio.CancelScope():
            rec = self.send(obj, m, args, kwargs, timeout)
            pending = Pending(self.link.loop)
            credit = Credit()
            rec.handler = OutCall(None, credit, pending)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.pump, rec, m, source, credit)
                    await pending.wait()
                    tg.cancel_scope.cancel()
            except BaseException:
                if pending.result is None:
                    self.cancel(rec.id)
                raise
        return self.result(m, pending.result)

    def call_stream(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> CallStream[Any]:
        given = (args, kwargs) if self.middleware else None  # what client middleware sees
        source = None
        if m.kind is MethodKind.BIDI_STREAM:
            source, args, kwargs = split_stream_arg(m, args, kwargs)
        if m.ref_args:
            # objects in the arguments are exported when the stream starts, not before
            return CallStream(self, obj, m, None, source, timeout, (args, kwargs), given)
        payload = m.encode_args(args, kwargs, self.objects)
        return CallStream(self, obj, m, payload, source, timeout, None, given)

    def call_pipelined(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Promise:
        return Promise(self, m, obj, args, kwargs, timeout)

    # ---------------------------------------------------------------- client streams
    async def pump(self, rec: CallRecord, m: MethodDescription, source: Any, credit: Credit) -> None:
        """Send the items of a client stream, within the credit the peer grants."""
        core = self.core
        call_id = rec.id
        slot = m.stream_item
        assert slot is not None
        it = source.__aiter__()
        try:
            alive = lambda: not credit.closed and core.outgoing.get(call_id) is rec  # noqa: E731
            wrap: Callable[[Any], Any] | None
            if slot.plan is not None:
                wrap = functools.partial(slot.to_wire, self.objects)
            elif slot.classes is not None or slot.any_plain:
                wrap = slot.wrap
            else:
                wrap = None  # a plain slot: items go out as they are
            if await self.sender.send(rec, it, wrap, credit, alive, m):
                core.send_end(call_id)
                self.link.kick()
        except Exception as exc:
            # the caller's own source failed (or an item was refused): the call ends with that
            # error, raised to the caller as itself; the connection carries on.  A source that
            # fails as it is cancelled because the connection is going away does not stand in for
            # that: the call ends as every other call does.
            if core.outgoing.get(call_id) is rec and self.link.failure is None and not self.link.closing:
                core.send_cancel(call_id)
                self.link.kick()
                if rec.handler is not None:
                    rec.handler.fail(exc)
            else:
                log.warning("the stream source of %s failed after the call ended", m.qualname, exc_info=True)
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
                        log.warning("the stream source of %s failed when it was closed", m.qualname, exc_info=True)


class CallStream(AsyncIterator[_T]):
    """The caller's side of a server or two-way stream: ``async for item in proxy.m(...)``.

    The call starts on the first iteration.  ``aclose()``, leaving an ``async with`` block, a
    ``break`` (once the iterator is dropped), or cancelling the consuming task stops the remote
    producer.  ``timeout`` bounds the whole stream.
    """

    def __init__(
        self,
        calls: Calls,
        obj: str,
        m: MethodDescription,
        payload: Any,
        source: Any,
        timeout: float | None,
        deferred: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
        given: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    ) -> None:
        self._deferred = deferred
        self._given = given
        self._calls = calls
        self._obj = obj
        self._m = m
        self._payload = payload
        self._source = source
        self._timeout = timeout
        self._deadline = math.inf
        self._rec: CallRecord | None = None
        self._reader: BatchReader | None = None
        self._done = False
        self._pump_scope: anyio.CancelScope | None = None
        self._taken = 0

    def __aiter__(self) -> CallStream[_T]:
        return self

    async def _begin_async(self) -> BatchReader:
        return self._begin()

    def _begin(self) -> BatchReader:
        calls = self._calls
        if self._timeout is not None:
            self._deadline = anyio.current_time() + self._timeout
        if self._deferred is not None:
            args, kwargs = self._deferred
            self._deferred = None
            rec = calls.send(self._obj, self._m, args, kwargs, self._timeout)
        else:
            rec = calls.start(self._obj, self._m, self._payload, self._timeout)
        self._payload = None
        queue = StreamQueue(calls.flow, calls.objects, rec.id)
        credit = Credit() if self._source is not None else None
        rec.handler = OutCall(queue, credit, None)
        self._rec = rec
        self._reader = BatchReader(queue, self._m.reply, self._m)
        if credit is not None:
            tg = calls.link.tg
            assert tg is not None
            self._pump_scope = anyio.CancelScope()
            tg.start_soon(self._run_pump, rec, credit)
        return self._reader

    async def _run_pump(self, rec: CallRecord, credit: Credit) -> None:
        assert self._pump_scope is not None
        with self._pump_scope:
            await self._calls.pump(rec, self._m, self._source, credit)

    async def __anext__(self) -> _T:
        reader = self._reader
        if reader is not None and self._deadline == math.inf and not self._done:
            # the hot path: an item of a batch already decoded, handed out without suspending
            item = reader.take()
            if item is not EMPTY:
                self._taken += 1
                q = reader.queue  # (StreamQueue.credit_due, inlined: this runs once per item)
                due = q.taken >= q.threshold or q.taken_bytes >= q.bytes_threshold
                if due or not self._taken & 15:
                    # look for a cancellation now and then, and always before credit is returned
                    try:
                        if due:
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
            given = self._given
            if given is not None:
                # client middleware sees the start of the stream, with the arguments it was called
                # with (and what it adds to the metadata travels with the CALL)
                reader = await self._calls.intercept(self._m, given[0], given[1], self._begin_async)
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
                    raise exception_from_error(self._m, err) from None
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
        calls = self._calls
        if rec is not None and calls.core.outgoing.get(rec.id) is rec:
            calls.cancel(rec.id)
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


class Promise(PromiseBase):
    """The pending result of a call made through ``xrpc.pipeline(proxy)``.

    Await it for the result.  If the method returns an object by reference, calling a method on the
    promise sends that call at once, addressed to "the result of that call", without waiting for the
    first answer (promise pipelining): a chain of dependent calls costs one round trip.  Such a
    promise may also be passed as an argument of another call on the same connection, where that
    object's interface is expected: the peer passes the object its call returned.
    """

    def __init__(self, calls: Calls, m: MethodDescription, target: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> None:
        if m.kind is not MethodKind.UNARY:
            raise TypeError(f"{m.qualname}: only unary calls can be pipelined")
        self._calls = calls
        self._m = m
        self._timeout = timeout
        rec = calls.send(target, m, args, kwargs, timeout)
        self._pending = EagerPending(calls, m)
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
                    self._calls.cancel(self._id)
                raise
        if p.error is not None:
            raise p.error
        return p.value

    def __getattr__(self, name: str) -> Callable[..., Promise]:
        m = pipelined_method(self._m, name)
        calls = self._calls

        def call(*args: Any, **kwargs: Any) -> Promise:
            p = self._pending
            there = proxy_target(p.value) if p.result is not None and p.error is None else None
            if there is not None and there[0] is calls:
                target = there[1]  # the answer is here already: address the object itself
            else:
                target = f"^{self._id}"
            return Promise(calls, m, target, args, kwargs, self._timeout)

        return call

    def __xrpc_argument__(self, caller: Any) -> tuple[str, InterfaceDescription, Any]:
        m = self._m
        if m.reply_iface is None:
            raise ValueError(f"a promise of {m.qualname}, which returns no object, cannot stand for one")
        desc = describe(m.reply_iface)
        if caller is not self._calls:
            raise ValueError(
                f"a promise of {m.qualname} made on another connection ({self._calls.url or 'connection'}):"
                " a promise travels only on the connection its call went to; await it and pass its result"
            )
        p = self._pending
        if p.result is not None and p.error is None:
            return "", desc, p.value  # the answer is here already: pass the object itself
        return f"^{self._id}", desc, None
