"""The reading side of a connection: frames in, handlers called, back-pressure out.

The driver hands what it read to ``Reader.feed`` (or ``feed_big``, for a large frame read straight
into the core's buffer); the core turns it into frames and the reader calls one handler per frame
type: a CALL goes to ``Serving.on_call``, every other frame about a call to that call's
``CallHandler`` (``rec.handler``).  Three things keep a peer from making this side do or hold too
much:

- the *gate*: until ``on_connect`` (server) has finished, frames that start or concern work the
  peer asks of us wait, so nothing sent early is lost or handled before its handler is in place;
- the *backlog*: once reading has produced more than ``write_buffer_high`` bytes of answers the
  peer has not read, the rest of the read waits and reading stops until the peer catches up;
- the *budget*: what the peer makes us hold (``FlowControl.held``) beyond ``max_buffered`` ends the
  connection with GOODBYE (code LIMIT).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import anyio

from ._codes import failure_from_goodbye
from ._errors import ConnectionInterrupted, Error, LimitExceeded, RemoteProtocolError
from ._fds import FdTable
from ._io import Link
from ._limits import Limits
from ._objects import ObjectTable
from ._peer import PeerSource
from ._protocol import (
    ITEM_OVERHEAD,
    Call,
    Cancel,
    Credit,
    End,
    ErrorCode,
    Goodbye,
    Hello,
    Item,
    Pong,
    ProtocolCore,
    Release,
    Reply,
    State,
    Welcome,
)
from ._protocol import Error as ErrorFrame
from ._streams import FlowControl


__all__ = ("Reader",)

log = logging.getLogger("xrpc")


def _no_call(msg: Call, rec: Any) -> None:
    raise AssertionError("a CALL was read before the connection was assembled")


class Reader:
    """The reading side of one connection (see the module's docstring)."""

    __slots__ = (
        "connection", "core", "link", "flow", "objects", "fds", "limits", "on_call", "gate", "gate_held", "backlog", "owed", "last_rx",
        "handshake", "pings", "cut", "admit_now",
    )

    def __init__(
        self, connection: PeerSource, core: ProtocolCore, link: Link, flow: FlowControl, objects: ObjectTable, fds: FdTable, limits: Limits, client: bool
    ) -> None:
        self.connection = connection
        self.core = core
        self.link = link
        self.flow = flow
        self.objects = objects
        self.fds = fds
        self.limits = limits
        self.on_call: Callable[[Call, Any], None] = _no_call  # Serving.on_call, set by the connection
        self.gate: list[tuple[Any, Any]] | None = None if client else []  # frames held until on_connect is done
        self.gate_held = 0  # bytes of the reads those frames keep alive
        self.backlog: list[tuple[Any, Any]] | None = None  # frames read but held while the peer is behind
        self.owed = 0  # bytes of answers reading produced since the peer last caught up (see peer_behind)
        self.last_rx = 0.0
        self.handshake = anyio.Event()  # HELLO, WELCOME or GOODBYE arrived
        self.pings: dict[int, anyio.Event] = {}
        self.cut = False  # the peer was cut off for its budget (GOODBYE sent, logged)
        # a server's admission, run as soon as a read has brought HELLO (see Connection.admit_at_hello)
        self.admit_now: Callable[[], None] | None = None

    # -------------------------------------------------------------- the driver's callbacks (_io.Callbacks)
    def big_target(self) -> memoryview | None:
        return self.core.big_target()

    def writable(self) -> None:
        self.resume_input()

    def lost(self, exc: BaseException | None) -> None:
        if self.link.failure is None:
            self.link.failure = ConnectionInterrupted(f"the connection was lost: {exc!r}" if exc else "the peer closed the connection")

    def fds_received(self, fds: list[int], truncated: bool) -> bool:
        """Descriptors arrived (SCM_RIGHTS); see ``FdTable.received``.  Refused: GOODBYE, False."""
        refused = self.fds.received(fds, truncated)
        if refused is None:
            return True
        why, violation = refused
        log.warning("%s from %s; closing the connection", why, self.connection.peer.describe())
        if self.link.failure is None:
            self.link.failure = ConnectionInterrupted(f"the connection was closed: {why}")
        self.link.goodbye_now(why, ErrorCode.VALIDATION if violation else ErrorCode.LIMIT)
        return False

    def feed_big(self, n: int) -> bool:
        """``n`` bytes were read straight into the core's large-frame buffer."""
        core = self.core
        size = core.big_size
        start = core.emitted
        try:
            events = core.big_received(n)
        except RemoteProtocolError as exc:
            return self.protocol_error(exc)
        self.owed += core.emitted - start
        return self.dispatch(events, size)

    def protocol_error(self, exc: RemoteProtocolError) -> bool:
        log.warning("protocol error from %s: %s", self.connection.peer.describe(), exc)
        if self.link.failure is None:
            self.link.failure = ConnectionInterrupted(f"protocol error: {exc}")
        self.link.goodbye_now(str(exc), ErrorCode.VALIDATION)
        return False

    def feed(self, data: bytes) -> bool:
        """Process received bytes (``b""``: the peer closed).  False once the connection is over."""
        core = self.core
        self.last_rx = time.monotonic()
        start = core.emitted
        try:
            events = core.receive_data(data)
        except RemoteProtocolError as exc:
            return self.protocol_error(exc)
        self.owed += core.emitted - start  # PONGs and answers the core gave itself
        return self.dispatch(events, len(data))

    # -------------------------------------------------------------- dispatch and back-pressure
    def dispatch(self, events: list[Any], nbytes: int) -> bool:
        """Handle the messages of one read of ``nbytes`` bytes (0: the peer closed)."""
        core = self.core
        link = self.link
        gate = self.gate
        if gate is not None and events and any(self.gated(msg) for msg, _ in events):
            # held behind the gate, they keep what was read alive: all of it counts
            self.gate_held += nbytes
            self.flow.held += nbytes
        if self.backlog is not None:
            self.backlog += events  # keep the order
        elif len(events) == 1 and gate is None:  # the common case, without _handle's bookkeeping
            msg, rec = events[0]
            start = core.emitted
            t = type(msg)
            if t is Call:
                self.on_call(msg, rec)  # (the server's one hot frame, without a hop through _HANDLERS)
            elif t is Reply:  # (the client's)
                h = rec.handler
                if h is not None:
                    h.on_reply(msg)
            else:
                _HANDLERS[t](self, msg, rec)
            self.owed += core.emitted - start
        elif events:
            self.handle(events)
        if gate is not None and self.admit_now is not None and core.peer_version and core.state == State.HANDSHAKE:
            # HELLO has arrived: admitted now, the calls read with it are served in this read
            admit, self.admit_now = self.admit_now, None
            if link.failure is None:
                admit()
        if core.has_data_to_send():
            link.send_now()  # answers produced while reading leave in one write
        if not nbytes:
            if link.failure is None:
                link.failure = ConnectionInterrupted("the peer closed the connection")
            return False
        if core.state == State.CLOSED:
            backlog = self.backlog
            if backlog is not None:
                # the peer said goodbye: what it sent before still counts (one read at most)
                self.backlog = None
                self.handle(backlog, math.inf)
                if core.has_data_to_send():
                    link.kick()
            if link.failure is None:
                link.failure = failure_from_goodbye(core.close_code, core.close_reason or "closed by the peer")
            return False
        if (self.flow.held or core.receiving_big or gate is not None) and not self.within_budget():
            return self.over_budget()
        high = self.limits.write_buffer_high
        if self.backlog is not None or self.gate_held > high or ((self.owed > high or self.fds_behind()) and self.peer_behind()):
            link.io.pause_reading()  # type: ignore[union-attr]
            self.resume_input()
        return True

    def handle(self, events: list[Any], high: float = 0) -> None:
        """Run the handlers of ``events``; once the answers they produced pass the high-water mark,
        keep the rest for later (``_backlog``): a peer that does not read is not served more."""
        gate = self.gate
        core = self.core
        high = (high or self.limits.write_buffer_high) - self.owed
        start = core.emitted
        i = 0
        for msg, rec in events:
            i += 1
            if gate is not None and self.gated(msg):
                gate.append((msg, rec))
                continue
            t = type(msg)
            if t is Call:
                self.on_call(msg, rec)
            elif t is Reply:  # (the client's one hot frame: _on_reply without the hop)
                h = rec.handler
                if h is not None:
                    h.on_reply(msg)
            else:
                _HANDLERS[t](self, msg, rec)
            if core.emitted - start > high and i < len(events):
                self.backlog = events[i:]
                break
        self.owed += core.emitted - start

    def peer_behind(self) -> bool:
        """Has reading produced more than ``write_buffer_high`` bytes of answers (replies, errors,
        PONGs) since the peer last caught up with what we send?  Then it is sending requests without
        reading the answers, and is not read until it does.  Our own streams' data does not count:
        their producers wait for the writer themselves, and counting it would make two peers that
        stream to each other both stop reading, each waiting for the other."""
        if self.fds_behind():
            return True
        if self.owed <= self.limits.write_buffer_high:
            return False
        if self.link.out_full():
            return True
        self.owed = 0  # the peer has caught up
        return False

    def fds_behind(self) -> bool:
        """Are more descriptors queued for the peer than it may hold unclaimed (``max_fds``)?  Each
        is open here until the peer reads it: a peer that asks for replies carrying descriptors and
        never reads them would otherwise fill this process's descriptor table."""
        io = self.link.io
        if io is None or not io.passes_fds:
            return False
        held = getattr(io, "fds_held", None)
        return held is not None and held() > self.limits.max_fds

    def resume_input(self) -> None:
        """Serve what was held back while the peer catches up, then read again (the driver calls
        this once what was buffered for writing has gone out)."""
        link = self.link
        io = link.io
        if io is None or io.done():
            return
        while self.backlog is not None:
            link.flush()
            if link.out_full():
                return  # the driver calls again once the peer has read
            self.owed = 0  # the peer has caught up
            backlog = self.backlog
            self.backlog = None
            self.handle(backlog)
            if not self.within_budget():
                self.cut_off()
                return
        link.flush()
        if not self.peer_behind() and self.gate_held <= self.limits.write_buffer_high:
            io.resume_reading()

    def within_budget(self) -> bool:
        """Does what the peer makes us hold (queued stream items, calls behind the gate, the
        arguments of calls in flight, a large frame being received) fit in the connection's
        memory budget?"""
        flow = self.flow
        held = flow.held
        core = self.core
        if core.receiving_big and held - flow.calls_held + core.big_size > self.limits.max_buffered:
            # (a frame being received may be a CALL: one that does not fit beside the calls in
            # flight is refused once it is complete, and the connection lives on)
            return False
        gate = self.gate
        return held <= self.limits.max_buffered and (gate is None or len(gate) <= self.limits.max_calls_in_flight)

    def over_budget(self) -> bool:
        if self.cut:
            return False  # already cut off: said (and logged) once
        self.cut = True
        gate = self.gate
        if gate is not None and len(gate) > self.limits.max_calls_in_flight:
            reason = f"more than {self.limits.max_calls_in_flight} calls sent before on_connect finished"
        else:
            reason = f"the peer made this side hold more than its memory budget of {self.limits.max_buffered} bytes"
        log.warning("closing the connection of %s: %s", self.connection.peer.describe(), reason)
        if self.link.failure is None:
            self.link.failure = LimitExceeded(reason)
        self.link.goodbye_now(reason, ErrorCode.LIMIT)
        return False

    def cut_off(self) -> None:
        """End a connection whose peer made us hold more than the budget, outside the reader."""
        self.over_budget()
        io = self.link.io
        if io is not None:
            io.close()

    async def room_for(self, size: int) -> bool:
        """Wait while the peer is behind with what we send, holding an answer of about ``size``
        bytes: held answers draw from the memory budget, and a peer that makes us hold more than
        it is cut off.  False if the connection is over."""
        link = self.link
        if not link.out_full():
            return True
        flow = self.flow
        flow.held += size
        try:
            if not self.within_budget():
                self.cut_off()
                return False
            while link.out_full():  # (woken together, the first ones may fill it again)
                await link.wait_drained()  # a peer that does not read gets no more answers meanwhile
        except Error:
            return False  # the connection is over
        finally:
            flow.held -= size
        return True

    def answered(self, start: int) -> None:
        """A call served in a task has sent its answer (reply or error) since ``start``.  It is owed
        to the peer like the answers reading produces: past ``write_buffer_high`` unread, reading
        stops; past the memory budget unread, the peer is cut off.  (An answer is sent at once
        rather than held until the peer reads: a held result would be memory no budget sees.)"""
        self.owed += self.core.emitted - start
        if self.owed <= self.limits.write_buffer_high and not self.fds_behind():
            return
        link = self.link
        if link.unsent() > self.limits.max_buffered:
            self.cut_off()
        elif link.io is not None and self.peer_behind():
            link.io.pause_reading()
            self.resume_input()  # flushes, and reads on at once if that was all; else the driver calls it again

    # -------------------------------------------------------------- the on_connect gate
    def gated(self, msg: Any) -> bool:
        """Does ``msg`` start or concern work the peer asked of us (held until the gate opens)?"""
        call_id = getattr(msg, "id", None)
        if call_id is None:
            return type(msg) is Release
        return not self.core.is_local_id(call_id)

    def open_gate(self) -> None:
        gate = self.gate
        self.gate = None
        self.flow.release(self.gate_held)
        self.gate_held = 0
        if gate:
            if self.backlog is not None:
                gate += self.backlog  # read after the gated frames
                self.backlog = None
            self.handle(gate)
            self.link.kick()
        self.resume_input()

    # -------------------------------------------------------------- frame handlers (synchronous, as read)
    def _on_reply(self, msg: Reply, rec: Any) -> None:
        h = rec.handler
        if h is not None:
            h.on_reply(msg)

    def _on_error(self, msg: ErrorFrame, rec: Any) -> None:
        h = rec.handler
        if h is not None:
            h.fail(msg)  # the ERROR frame is raised to the caller as its error

    def _on_item(self, msg: Item, rec: Any) -> None:
        h = rec.handler
        if h is None or not h.on_item(msg):
            self.flow.conn_freed(len(msg.payload) + ITEM_OVERHEAD)

    def _on_end(self, msg: End, rec: Any) -> None:
        h = rec.handler
        if h is not None:
            h.on_end()

    def _on_credit(self, msg: Credit, rec: Any) -> None:
        if msg.conn:
            self.flow.wake_conn_waiter()
        if rec is not None and rec.handler is not None:
            rec.handler.on_credit()

    def _on_cancel(self, msg: Cancel, rec: Any) -> None:
        h = rec.handler
        if h is not None:
            h.on_cancel()

    def _on_release(self, msg: Release, rec: Any) -> None:
        self.objects.drop(msg.obj, msg.count)

    def _on_pong(self, msg: Pong, rec: Any) -> None:
        waiter = self.pings.pop(msg.nonce, None)
        if waiter is not None:
            waiter.set()

    def _on_hello(self, msg: Any, rec: Any) -> None:
        self.handshake.set()

    def _on_welcome(self, msg: Any, rec: Any) -> None:
        self.handshake.set()
        self.flow.wake_conn_waiter()  # the server's connection window is known now

    _on_goodbye = _on_hello


# (a CALL is not in the table: both dispatch loops hand it to ``on_call`` directly)
_HANDLERS: dict[type, Callable[[Reader, Any, Any], None]] = {
    Reply: Reader._on_reply,
    ErrorFrame: Reader._on_error,
    Item: Reader._on_item,
    End: Reader._on_end,
    Credit: Reader._on_credit,
    Cancel: Reader._on_cancel,
    Release: Reader._on_release,
    Goodbye: Reader._on_goodbye,
    Hello: Reader._on_hello,
    Welcome: Reader._on_welcome,
    Pong: Reader._on_pong,
}
