"""Streams: the memory budget and credit, receiving queues, batch reading, and the sending loop.

Receiving: items arrive as ITEM frames of one or more items into a ``StreamQueue``; a
``BatchReader`` decodes a whole batch at once (one msgspec call for many items) and hands items out
one by one.  Credit goes back as items are consumed (``StreamQueue.consumed``, the one path), so a
producer is never more than one window ahead of its consumer.  Every byte queued is drawn from the
connection's ``FlowControl`` budget; above half of it, a stream that still holds items gets no
credit back until its consumer has taken them.

Sending: ``StreamSender.send`` runs a producer (an async iterator), gathers the items that are ready
without suspending into one ITEM frame, and sends within the stream's credit, the connection's
credit (producers waiting for it are served in order) and the peer's reading pace.
"""

from __future__ import annotations

import collections
import contextlib
import types
from typing import Any, AsyncIterator, Callable, Iterable

import anyio
import anyio.lowlevel
import msgspec

from ._errors import ArgumentError, LimitExceeded, LocalProtocolError, ValidationError
from ._interface import MethodDescription
from ._io import Link
from ._protocol import CallRecord, ProtocolCore

__all__ = (
    "EMPTY",
    "BatchReader",
    "Credit",
    "FlowControl",
    "InStream",
    "StreamQueue",
    "StreamSender",
    "aiter_of",
    "resume",
    "split_stream_arg",
)

EMPTY: Any = object()  # what BatchReader.take returns when no decoded item is at hand
_NO_ITEMS: list[Any] = []  # never filled
_raw_list: msgspec.msgpack.Decoder[list[msgspec.Raw]] = msgspec.msgpack.Decoder(list[msgspec.Raw])
_size_encoder = msgspec.msgpack.Encoder()
_STOPPED = Exception("the call is over")  # what send_now returns when the call ended while items were gathered
_BLOCKED = Exception("no connection credit")  # what send_now returns when the batch must wait (it is kept)
_MAX_BATCH = 256
_DECODE_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError, ValidationError)
_ENCODE_ERRORS = (TypeError, msgspec.EncodeError, OverflowError)


class FlowControl:
    """One connection's memory budget (see ``Limits.max_buffered``) and connection credit.

    ``held`` is what the peer makes this side hold: queued stream items, calls behind the
    ``on_connect`` gate, the arguments of calls in flight (``calls_held``).  Credit of streams that
    still hold items is deferred while more than half the budget is held.
    """

    __slots__ = ("core", "link", "max_buffered", "held", "calls_held", "credit_mark", "deferred", "conn_waiters")

    def __init__(self, core: ProtocolCore, link: Link, max_buffered: int) -> None:
        self.core = core
        self.link = link
        self.max_buffered = max_buffered
        self.held = 0
        self.calls_held = 0
        self.credit_mark = max_buffered // 2
        self.deferred: dict[StreamQueue, None] = {}
        # stream producers waiting for connection credit, first come first served (see StreamSender);
        # a list, not a deque: it is mostly empty, and an empty deque holds a block of 0.5 KiB
        self.conn_waiters: list[Credit] = []

    def release(self, n: int) -> None:
        """``n`` bytes held for the peer were consumed: return deferred credit once half is free."""
        held = self.held = self.held - n
        if self.deferred and held <= self.credit_mark // 2:
            queues = list(self.deferred)
            self.deferred.clear()
            for q in queues:
                q.grant()

    def hold_call(self, n: int) -> None:
        """A call in flight holds ``n`` bytes of arguments until it ends."""
        self.held += n
        self.calls_held += n

    def release_call(self, n: int) -> None:
        self.calls_held -= n
        self.release(n)

    def conn_freed(self, n: int) -> None:
        """``n`` bytes of connection credit are free again: return them once enough has gathered."""
        core = self.core
        core.conn_pending += n
        if core.conn_pending >= core.conn_threshold:
            self.return_conn_credit()

    def return_conn_credit(self) -> None:
        core = self.core
        if core.conn_pending >= core.conn_threshold:
            core.send_conn_credit()
            self.link.kick()

    def wake_conn_waiter(self) -> None:
        """Connection credit arrived (or the peer's window became known): the first waiter may go."""
        if self.conn_waiters:
            self.conn_waiters[0].wake()


class StreamQueue:
    """Batches of items arriving on one stream, with the receiving side's credit bookkeeping.

    A batch's size is its connection cost (payload plus ``ITEM_OVERHEAD``): the stream's byte
    credit, the budget and the connection credit all count it.  Its connection credit is free again
    once the consumer has taken the whole batch, or once the queue is discarded.  ``ctx`` is the
    wire context the items are decoded with.
    """

    __slots__ = (
        "flow", "ctx", "call_id", "batches", "event", "end", "error", "taken", "taken_bytes", "threshold", "bytes_threshold", "held",
        "unreturned", "dead",
    )

    def __init__(self, flow: FlowControl, ctx: Any, call_id: int) -> None:
        self.flow = flow
        self.ctx = ctx
        self.call_id = call_id
        self.batches: collections.deque[tuple[Any, int, int]] = collections.deque()
        self.event: anyio.Event | None = None
        self.end = False
        self.error: Any = None  # an Error frame or an exception
        self.taken = 0  # items consumed since credit last went back
        self.taken_bytes = 0
        self.threshold = max(1, flow.core.window // 2)
        self.bytes_threshold = max(1, flow.core.window_bytes // 2)
        self.held = 0  # bytes of the batches queued, drawn from the connection's budget
        self.unreturned = 0  # connection credit of the batches queued or being taken
        self.dead = False

    def push(self, payload: Any, count: int, size: int) -> None:
        if self.dead:
            self.flow.conn_freed(size)
            return
        self.batches.append((payload, count, size))
        self.held += size
        self.unreturned += size
        self.flow.held += size
        if self.event is not None:
            self.event.set()

    def discard(self) -> None:
        """Nobody will consume the rest: give its bytes back to the budget, and its credit to the
        connection."""
        self.dead = True
        self.batches.clear()
        flow = self.flow
        flow.deferred.pop(self, None)
        flow.release(self.held)
        self.held = 0
        freed = self.unreturned
        self.unreturned = 0
        flow.conn_freed(freed)

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
        self.flow.release(batch[2])
        return batch

    def credit_due(self) -> bool:
        return self.taken >= self.threshold or self.taken_bytes >= self.bytes_threshold

    def took(self, count: int, nbytes: int) -> None:
        """The consumer took ``count`` items, and ``nbytes`` of frames ending a batch: that batch's
        connection credit is free (it goes back with the stream credit if that is due, else on its
        own once enough has gathered).  Every item consumed is counted here or in
        ``BatchReader.take``'s inline increment; every credit goes back through ``grant``."""
        self.taken += count
        if nbytes:
            self.taken_bytes += nbytes
            if self.unreturned:
                freed = min(nbytes, self.unreturned)
                self.unreturned -= freed
                core = self.flow.core
                core.conn_pending += freed
                if core.conn_pending >= core.conn_threshold and not self.credit_due():
                    self.flow.return_conn_credit()

    def grant(self) -> None:
        """Return the stream's credit if it is due (deferred while the budget is over half full)."""
        if not self.credit_due():
            return
        flow = self.flow
        if flow.held > flow.credit_mark and self.batches:
            # over half the budget: no credit while this stream still holds items (once its
            # consumer has taken them all, it gets its credit back, so it cannot starve)
            flow.deferred[self] = None
            flow.return_conn_credit()
            return
        if not self.end:
            flow.core.send_credit(self.call_id, self.taken, self.taken_bytes)  # with the connection credit
            flow.link.kick()
        else:
            flow.return_conn_credit()
        self.taken = 0
        self.taken_bytes = 0

    def consumed(self, count: int, nbytes: int) -> None:
        self.took(count, nbytes)
        self.grant()


class BatchReader:
    """Turns a ``StreamQueue`` into decoded items, one batch at a time.

    If a batch holds a refused item, the valid items before it are still handed out, then the
    ``ValidationError`` is raised.
    """

    __slots__ = ("queue", "slot", "m", "items", "pos", "batch_bytes", "error")

    def __init__(self, queue: StreamQueue, slot: Any, m: MethodDescription) -> None:
        self.queue = queue
        self.slot = slot
        self.m = m
        self.items: list[Any] = []
        self.pos = 0
        self.batch_bytes = 0
        self.error: BaseException | None = None

    def take(self) -> Any:
        """The next item of the batch already decoded, without suspending (``EMPTY`` if none);
        it counts as consumed (credit is returned by ``grant`` when ``credit_due``)."""
        pos = self.pos
        items = self.items
        if pos >= len(items):
            return EMPTY
        self.pos = pos + 1
        q = self.queue
        if pos + 1 == len(items):
            # the batch is all handed out: let go of it, as its connection credit goes back now
            self.items = _NO_ITEMS
            self.pos = 0
            q.took(1, self.batch_bytes)
        else:
            q.taken += 1
        return items[pos]

    async def grant(self) -> None:
        """Return the credit due; a cancelled consumer must not let its producer go on."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        self.queue.grant()

    async def next(self) -> Any:
        item = self.take()
        if item is not EMPTY:
            if self.queue.credit_due():
                await self.grant()
            return item
        if self.error is not None:
            raise self.error
        while True:
            payload, count, size = await self.queue.next_batch()
            try:
                items = self.slot.decode_batch(payload, self.queue.ctx)
            except _DECODE_ERRORS as exc:
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
                self.queue.consumed(1, size if len(items) == 1 else 0)
                return items[0]
            self.queue.consumed(count, size)
            if self.error is not None:
                raise self.error

    def _salvage(self, payload: Any, exc: BaseException) -> list[Any]:
        """The valid items before the first refused one; remember the refusal for afterwards."""
        good: list[Any] = []
        why: BaseException = exc
        try:
            for raw in _raw_list.decode(payload):
                value = self.slot.decode(raw)
                if self.slot.plan is not None:
                    value = self.slot.from_wire(self.queue.ctx, value)
                good.append(value)
        except _DECODE_ERRORS as inner:
            why = inner
        self.error = ValidationError(f"stream item of {self.m.qualname} refused: {why}", method=self.m.name)
        return good


class InStream:
    """What the implementation of a client-stream method receives: an async iterator of items."""

    def __init__(self, queue: StreamQueue, m: MethodDescription) -> None:
        self._reader = BatchReader(queue, m.stream_item, m)

    def __aiter__(self) -> InStream:
        return self

    async def __anext__(self) -> Any:
        return await self._reader.next()


class Credit:
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

    def close(self) -> None:
        self.closed = True
        self.wake()


@types.coroutine
def resume(step: Any, yielded: Any) -> Any:
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


class StreamSender:
    """Sends a producer's items on a stream call, in batches, within every kind of credit."""

    __slots__ = ("core", "link", "flow")

    def __init__(self, core: ProtocolCore, link: Link, flow: FlowControl) -> None:
        self.core = core
        self.link = link
        self.flow = flow

    async def send(
        self, rec: CallRecord, it: Any, wrap: Callable[[Any], Any] | None, credit: Credit, alive: Callable[[], bool], m: MethodDescription
    ) -> bool:
        """Send the items of ``it`` on ``rec`` in batches, within credit.  True once ``it`` is exhausted.

        Items that are ready without suspending are gathered into one ITEM frame (up to the credit
        held and a size estimate); as soon as the producer would suspend, what is gathered is sent,
        so a slow producer's items are never held back.
        """
        link = self.link
        core = self.core
        high = link.high
        out = core.out_buffer()  # (the core hands its buffer over when it is written: re-read below)
        io_blocked = link.io.blocked if link.io is not None else _never
        batch: list[Any] = []
        cap = 0
        blocked = False
        # Has the loop run since the driver was last asked?  Its own buffer only changes while
        # this task is suspended, or when a batch is sent (after which the next batch starts with
        # ``out_full``), so a producer that never suspends costs one len() per item.
        stale = False
        while True:
            if batch and (blocked or rec.send_bytes <= 0 or len(out) > high or (stale and io_blocked())):
                # What is gathered must be able to go out without waiting once the producer has
                # started a step (see below), so if it cannot, it goes out first.  (It never needs
                # more item credit than is held: a batch is sent as soon as it holds that much.
                # Whether it fits in the connection credit is only known once it is encoded: if it
                # did not, it was kept, and waits here.)
                if not await self._send_batch(rec, batch, credit, alive, m):
                    return False
                batch = []
                blocked = False
                stale = True
            elif not batch:
                stale = False
                if link.out_full():
                    # The peer is behind: no batch starts (so nothing is sent from a step) until it reads.
                    await link.wait_drained()
                out = core.out_buffer()
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
                            await resume(step, yielded)
                        except StopAsyncIteration:
                            pass
                        if failure is _STOPPED:
                            return False
                        raise failure
                stale = True
                try:
                    item = await resume(step, yielded)
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
                except _ENCODE_ERRORS as exc:
                    raise ValidationError(f"stream item of {m.qualname} cannot be encoded: {exc}", method=m.name) from None
                cap = max(1, min(_MAX_BATCH, self.core.peer_window_bytes // (2 * size)))
            batch.append(payload)
            if len(batch) >= cap or len(batch) >= rec.send_credit:
                if not await self._send_batch(rec, batch, credit, alive, m):
                    return False
                batch = []
        if batch and not await self._send_batch(rec, batch, credit, alive, m):
            return False
        return alive()

    def _send_now(self, rec: CallRecord, batch: list[Any], credit: Credit, alive: Callable[[], bool], m: MethodDescription) -> BaseException | None:
        """Send ``batch`` without suspending (``send`` made sure it can, as far as stream credit
        goes); return what stops the stream instead of raising it (``_STOPPED`` if the call is
        over, ``_BLOCKED`` if the batch must wait for connection credit or be split)."""
        if credit.closed or not alive() or rec.send_credit < len(batch) or rec.send_bytes <= 0:
            return _STOPPED
        if self.flow.conn_waiters:
            return _BLOCKED  # others wait for connection credit: no overtaking them
        try:
            if not self.core.send_items(rec.id, batch):
                return _BLOCKED
        except _ENCODE_ERRORS as exc:
            return ValidationError(f"stream item of {m.qualname} cannot be encoded: {exc}", method=m.name)
        except LocalProtocolError as exc:
            if len(batch) > 1:
                return _BLOCKED  # too large as one frame: _send_batch splits it
            return LimitExceeded(f"stream item of {m.qualname}: {exc}")
        self.link.kick()
        return None

    async def _send_batch(self, rec: CallRecord, batch: list[Any], credit: Credit, alive: Callable[[], bool], m: MethodDescription) -> bool:
        link = self.link
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
            if link.out_full():
                await link.wait_drained()  # every stream waits for the peer before it adds a frame
                continue  # credit and liveness may have changed meanwhile
            try:
                if not await self._send_conn(rec, batch if n == len(batch) else batch[:n], credit, alive):
                    return False
            except _ENCODE_ERRORS as exc:
                raise ValidationError(f"stream item of {m.qualname} cannot be encoded: {exc}", method=m.name) from None
            except LocalProtocolError as exc:
                if n > 1:
                    most = n // 2
                    continue
                raise LimitExceeded(f"stream item of {m.qualname}: {exc}") from None
            batch = batch[n:]
            if link.out_full():
                await link.wait_drained()
            else:
                link.kick()
        return True

    async def _send_conn(self, rec: CallRecord, items: list[Any], credit: Credit, alive: Callable[[], bool]) -> bool:
        """Send ``items`` (within the stream's credit) as one ITEM frame once the connection credit
        lets it; False if the stream closed meanwhile.

        Producers that wait for connection credit queue up and are served in order: only the first
        is woken, and nobody overtakes it, so a large frame is not starved by a stream of small ones.
        """
        core = self.core
        waiters = self.flow.conn_waiters
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
                del waiters[0]
                if waiters:
                    waiters[0].wake()
            else:
                with contextlib.suppress(ValueError):
                    waiters.remove(credit)


def _never() -> bool:
    return False


def split_stream_arg(m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Take the stream argument out of a call's arguments: the source (an async iterator) and the rest."""
    sp = m.stream_param
    assert sp is not None
    if sp.name in kwargs:
        kwargs = dict(kwargs)
        source = kwargs.pop(sp.name)
    else:
        pos = m.params.index(sp)
        if len(args) <= pos:
            raise ArgumentError(f"{m.qualname}() missing a required argument: {sp.name!r}", method=m.name, argument=sp.name)
        source = args[pos]
        args = args[:pos] + args[pos + 1 :]
    if not hasattr(source, "__aiter__"):
        if hasattr(source, "__iter__"):
            source = aiter_of(source)
        else:
            raise ValidationError(
                f"argument {sp.name!r} of {m.qualname} must be an async iterable, got {type(source).__qualname__}",
                method=m.name,
                argument=sp.name,
            )
    return source, args, kwargs


async def aiter_of(iterable: Iterable[Any]) -> AsyncIterator[Any]:
    for x in iterable:
        yield x
