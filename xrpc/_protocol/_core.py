"""The sans-IO protocol core: bytes in, messages out; messages in, bytes out.

Theory of operation
-------------------
``ProtocolCore`` owns everything that decides whether a frame is legal: the framing (a 4-byte
big-endian length, then one msgpack message), the frame size limit (checked from the length prefix,
before the body is buffered), the handshake, the call-id tables and the stream credits.  It performs
no I/O and never imports an event loop: the runtime feeds it bytes with ``receive_data`` and gets back
the validated messages, and it asks it to ``send_*`` messages, which are encoded into an outgoing
buffer that the runtime drains with ``data_to_send``.  Many frames sent between two drains leave as
one write: that is the coalescing writer.

Call ids: the connecting side (client) numbers its calls 1, 3, 5 ...; the accepting side 2, 4, 6 ...
So every frame that carries an id says by its parity which side started that call, and a stream can
flow both ways on one id.  A call id is never reused on a connection.

Flow control: each side announces in HELLO/WELCOME how many stream items (and bytes) it grants for
every stream it receives, and how many bytes of ITEM frames it accepts outstanding on the whole
connection (``conn_window``).  A sender may send an ITEM only while it holds credit for it on the
stream and on the connection; the receiver returns credit (CREDIT frames) as its consumer takes items.
A peer that sends beyond its credit breaks the protocol.

Connection credit is counted in *cost*: an ITEM frame costs the length of its payload plus
``ITEM_OVERHEAD`` (the largest envelope of an ITEM frame), so the receiver can account for a frame
from the payload alone.  The connection window is never overdrawn: a frame goes out only if its cost
fits in the credit held.  The receiver returns the cost of what it no longer holds (consumed,
discarded, or dropped on arrival) with the next stream CREDIT it sends (the ``conn`` field), or on its
own in a CREDIT for id 0 once ``conn_window // 16`` has accumulated.  So an idle receiver keeps back
less than a sixteenth of the window, and a frame costing at most ``conn_window - conn_window // 16``
always gets through eventually; a larger one is refused locally.  A side that announced no
connection window (an older peer) neither grants nor honours connection credit: towards it nothing
is limited or returned, and what it sends is left to the receiver's memory budget.  Until the client
has the server's WELCOME it assumes a window of ``MIN_CONN_WINDOW``, the least a window may be.

Any exception raised by ``receive_data`` is a ``RemoteProtocolError`` and moves the core to ERROR;
misuse by the local side raises ``LocalProtocolError``.
"""

from __future__ import annotations

import sys
from typing import Any, Final

import msgspec

from .._errors import LocalProtocolError, RemoteProtocolError
from ._frames import (
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    DEFAULT_WINDOW_BYTES,
    PROTOCOL_VERSION,
    Call,
    CallFlags,
    Cancel,
    Credit,
    End,
    Error,
    ErrorCode,
    ExportInfo,
    Goodbye,
    Hello,
    Item,
    Message,
    Ping,
    Pong,
    Release,
    Reply,
    Welcome,
)

__all__ = (
    "ProtocolCore",
    "CallRecord",
    "FrameBuffers",
    "State",
    "DEFAULT_HANDSHAKE_MAX_FRAME",
    "DEFAULT_MAX_BUFFERED",
    "DEFAULT_CONN_WINDOW",
    "MIN_CONN_WINDOW",
    "ITEM_OVERHEAD",
    "conn_window_for",
)

# The largest frame the accepting side takes before HELLO has arrived (HELLO itself, or anything a
# peer sends instead): a peer not yet admitted makes the server buffer at most this much.
DEFAULT_HANDSHAKE_MAX_FRAME = 1024 * 1024
# The bytes a peer may make a side hold for it (its memory budget); the connection window follows.
DEFAULT_MAX_BUFFERED = 32 * 1024 * 1024
MIN_MAX_FRAME = 1024  # a peer must accept frames at least this large
_HEADER = 4
ITEM_OVERHEAD = 16  # added to an ITEM payload's length to give its connection cost
MIN_CONN_WINDOW = 64 * 1024  # the least connection window; assumed until the peer's is known
_MAX_CONN_WINDOW = 1 << 40

try:  # read by mypyc when it compiles this module (``XRPC_COMPILE=1``, see setup.py)
    from mypy_extensions import mypyc_attr
except ImportError:  # a build dependency only: at run time the decorator does nothing

    def _no_attrs(*attrs: str, **kwattrs: object) -> Any:
        return lambda cls: cls

    mypyc_attr = _no_attrs


def conn_window_for(max_buffered: int, max_frame: int) -> int:
    """The connection window a receiver with memory budget ``max_buffered`` can grant: what is left
    once one frame of ``max_frame`` bytes (plus its length prefix) being received is set aside, so
    that a sender within its credit never makes it hold more than ``max_buffered``."""
    return max(MIN_CONN_WINDOW, min(_MAX_CONN_WINDOW, max_buffered - max_frame - _HEADER))


DEFAULT_CONN_WINDOW = conn_window_for(DEFAULT_MAX_BUFFERED, DEFAULT_MAX_FRAME)


def _uint_len(n: int) -> int:
    """Bytes msgpack takes for the non-negative integer ``n``."""
    return 1 if n < 128 else 2 if n < 256 else 3 if n < 65536 else 5 if n < 4294967296 else 9


class State:
    HANDSHAKE: Final = "HANDSHAKE"
    OPEN: Final = "OPEN"
    CLOSED: Final = "CLOSED"  # GOODBYE sent or received
    ERROR: Final = "ERROR"


class CallRecord:
    """The core's bookkeeping for one call, in either direction.

    ``handler`` belongs to the runtime: the core stores it and never looks at it.
    """

    __slots__ = (
        "id", "flags", "send_credit", "send_bytes", "recv_allowance", "recv_bytes", "sent_end", "recv_end", "handler"
    )

    def __init__(self, call_id: int, flags: int) -> None:
        self.id = call_id
        self.flags = flags
        self.send_credit = 0  # items we may still send on this call
        self.send_bytes = 0  # bytes of ITEM frames we may still send (one frame may overdraw it)
        self.recv_allowance = 0  # items the peer may still send us
        self.recv_bytes = 0
        self.sent_end = False
        self.recv_end = False
        self.handler: Any = None


_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Message)
_pack_len = int.to_bytes
_DROP: Any = object()
_BIG_FRAME = 64 * 1024  # frames at least this large are assembled in a buffer of their own
_SENDABLE = (State.HANDSHAKE, State.OPEN)
_HANDSHAKE_NAMES = {0: "HELLO", 1: "WELCOME"}  # the tags of Hello and Welcome
_METHODS_AT = "`$[3]["  # where msgspec's error path enters HELLO/WELCOME's exports ...
_METHODS_FIELD = "[3]["  # ... and then an ExportInfo's methods


def _undecodable(body: memoryview, exc: BaseException) -> str:
    """Why a frame was refused.  A HELLO or WELCOME is named, and so is the export whose method
    signatures are malformed (the usual culprit when a peer's handshake does not decode)."""
    name = _HANDSHAKE_NAMES.get(body[1]) if len(body) >= 2 and 0x90 <= body[0] <= 0x9F else None
    if name is None:
        return f"undecodable frame: {exc}"
    text = str(exc)
    at = text.find(_METHODS_AT)
    if at >= 0:
        index, _, rest = text[at + len(_METHODS_AT) :].partition("]")
        if index.isdigit() and rest.startswith(_METHODS_FIELD):
            return f"undecodable {name}: a method signature of export {index} is malformed: {text}"
    return f"undecodable {name}: {text}"


def _refs(lent: list[tuple[bytearray, memoryview]], i: int) -> int:
    return sys.getrefcount(lent[i][1])


# the count of a view that only its entry holds, taken the way ``take`` takes it (compiled code may
# hold references of its own while it looks, so the count is only compared with one taken alike)
_ALONE = _refs([(bytearray(), memoryview(b""))], 0)


class FrameBuffers:
    """Buffers of large frames, kept to receive the next ones into.

    A large frame is received into a buffer of its own and decoded in place: its payloads
    (``msgspec.Raw``) point into the buffer and keep it alive while anything holds them.  Freeing a
    buffer of a MiB after every frame and allocating one for the next makes the C allocator give
    the memory back to the system and fault it in afresh each time (glibc trims its heap once more
    than twice its mmap threshold lies free at its top), which costs more than receiving the frame.
    So the core *lends* a decoded frame's buffer here, with the view its payloads hold; once
    nothing but this entry holds that view, the buffer is spare and the next large frame reuses it
    (growing it if it is too small).  One spare is kept, of at most ``keep`` bytes; the runtime
    shares one ``FrameBuffers`` between the connections of a thread.
    """

    __slots__ = ("keep", "spare", "lent")

    LENT: Final = 4  # frames whose payloads may still be in use, tracked at most

    def __init__(self, keep: int = 4 * 1024 * 1024) -> None:
        self.keep = keep
        self.spare: bytearray | None = None
        self.lent: list[tuple[bytearray, memoryview]] = []

    def take(self) -> bytearray | None:
        """A spare buffer (of any size), or None."""
        lent = self.lent
        i = 0
        while i < len(lent):
            if _refs(lent, i) <= _ALONE:  # nothing decoded from it is alive: it is spare
                buf = lent.pop(i)[0]
                if self.spare is None or len(buf) > len(self.spare):
                    self.spare = buf
            else:
                i += 1
        spare = self.spare
        self.spare = None
        return spare

    def lend(self, buf: bytearray, body: memoryview) -> None:
        """``body``, a view of ``buf``, was just decoded: ``buf`` is spare once nothing holds ``body``."""
        if len(buf) > self.keep:
            return
        lent = self.lent
        if len(lent) >= self.LENT:
            del lent[0]  # its payloads are still in use: it is freed with the last of them
        lent.append((buf, body))


@mypyc_attr(allow_interpreted_subclasses=True)  # compiled, it may still be subclassed (tests model older peers so)
class ProtocolCore:
    """One side of one xrpc connection, without I/O."""

    # one per connection on each side: slots keep its fields out of a per-instance dict, which at
    # this many fields is a table of its own (about 1.5 KiB a connection)
    __slots__ = (
        "client", "state", "max_frame", "handshake_max_frame", "_recv_limit", "peer_max_frame", "window",
        "peer_window", "window_bytes", "peer_window_bytes", "conn_window", "conn_recv", "conn_pending",
        "conn_threshold", "conn_enforce", "peer_conn_window", "conn_send", "conn_limited", "conn_known",
        "conn_max_cost", "conn_wanted", "exports", "peer_exports", "peer_version", "outgoing", "incoming",
        "_local_parity", "_next_id", "_last_peer_id", "_in", "_out", "emitted", "_big", "_big_filled",
        "_big_size", "close_reason", "close_code", "_hello_done", "_said_goodbye", "buffers",
    )

    def __init__(
        self,
        *,
        client: bool,
        max_frame: int = DEFAULT_MAX_FRAME,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        exports: list[ExportInfo] | None = None,
        handshake_max_frame: int = DEFAULT_HANDSHAKE_MAX_FRAME,
        conn_window: int = DEFAULT_CONN_WINDOW,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.client = client
        self.state = State.HANDSHAKE
        self.max_frame = max_frame  # the largest frame we accept (announced in HELLO/WELCOME)
        # the largest frame we accept before the peer's HELLO (server side only; then max_frame)
        self.handshake_max_frame = min(max_frame, handshake_max_frame)
        self._recv_limit = max_frame if client else self.handshake_max_frame
        self.peer_max_frame = DEFAULT_MAX_FRAME  # the largest the peer accepts (known after handshake)
        self.window = window  # credit we grant for each stream we receive
        self.peer_window = DEFAULT_WINDOW  # credit the peer grants us
        self.window_bytes = window_bytes
        self.peer_window_bytes = DEFAULT_WINDOW_BYTES
        # connection credit, receiving: what we grant, what the peer still holds as far as we know,
        # what we no longer hold and have not returned yet; enforced once the peer announced a window
        self.conn_window = max(MIN_CONN_WINDOW, min(_MAX_CONN_WINDOW, conn_window))
        self.conn_recv = self.conn_window
        self.conn_pending = 0
        self.conn_threshold = self.conn_window // 16
        self.conn_enforce = False
        # ... sending: the peer's window (tentative until known), the credit we hold, the largest
        # cost a frame may have, and what the last frame that did not fit needed
        self.peer_conn_window = MIN_CONN_WINDOW if client else 0
        self.conn_send = self.peer_conn_window
        self.conn_limited = client
        self.conn_known = False
        self.conn_max_cost = 0
        self.conn_wanted = 0
        self.exports = exports or []
        self.peer_exports: list[ExportInfo] = []
        self.peer_version = 0
        self.outgoing: dict[int, CallRecord] = {}  # calls we started
        self.incoming: dict[int, CallRecord] = {}  # calls the peer started
        self._local_parity = 1 if client else 0
        self._next_id = 1 if client else 2
        self._last_peer_id = 0
        self._in = bytearray()
        self._out = bytearray()
        self.emitted = 0  # bytes of every frame encoded so far (the runtime tells what a read produced)
        self._big: bytearray | None = None  # a large frame being received into its own buffer
        self._big_filled = 0
        self._big_size = 0  # the frame's size, prefix included (the buffer may be longer, if reused)
        self.buffers: FrameBuffers | None = None  # where large frames' buffers are reused from (the runtime's)
        self.close_reason = ""
        self.close_code = 0
        self._hello_done = False  # client: HELLO sent; server: HELLO received
        self._said_goodbye = False  # a GOODBYE is in the outgoing buffer: it is the last frame, and the only one

    # ------------------------------------------------------------------ helpers
    def is_local_id(self, call_id: int) -> bool:
        return (call_id & 1) == self._local_parity

    def data_to_send(self) -> bytes | bytearray:
        """Everything encoded since the last call, as one chunk (possibly empty).

        The chunk is handed over, not copied: the core starts a new buffer.
        """
        out = self._out
        if not out:
            return b""
        self._out = bytearray()
        return out

    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def out_buffer(self) -> bytearray:
        """The buffer frames are being encoded into, until ``data_to_send`` hands it over (then a new
        one starts): ``len()`` of it is ``out_size`` without a call, for a sender's inner loop."""
        return self._out

    @property
    def out_size(self) -> int:
        """Bytes encoded and not yet taken by ``data_to_send`` (what the next write would carry)."""
        return len(self._out)

    @property
    def receiving_big(self) -> bool:
        """True while a large frame is being received into its own buffer (see ``big_target``)."""
        return self._big is not None

    @property
    def big_size(self) -> int:
        """The whole size (length prefix included) of the large frame being received, which the
        runtime counts against its memory budget while it arrives; 0 when none is."""
        return self._big_size if self._big is not None else 0

    def _emit(self, msg: Any) -> int:
        """Encode ``msg`` as one frame at the end of the outgoing buffer; return its size."""
        out = self._out
        start = len(out)
        out += b"\0\0\0\0"
        try:
            _encoder.encode_into(msg, out, start + _HEADER)
        except BaseException:
            del out[start:]
            raise
        size = len(out) - start - _HEADER
        if size > self.peer_max_frame:
            del out[start:]
            raise LocalProtocolError(f"a frame of {size} bytes exceeds the peer's limit of {self.peer_max_frame} bytes")
        out[start : start + _HEADER] = _pack_len(size, 4, "big")
        self.emitted += size + _HEADER
        return size

    # ------------------------------------------------------------------ handshake
    def send_hello(self) -> None:
        if not self.client or self.state != State.HANDSHAKE or self._hello_done:
            raise LocalProtocolError("only a client in HANDSHAKE sends HELLO, once")
        self._emit(Hello(PROTOCOL_VERSION, self.max_frame, self.exports, self.window, self.window_bytes, self.conn_window))
        self._hello_done = True

    def send_welcome(self) -> None:
        if self.client or self.state != State.HANDSHAKE or not self.peer_version:
            raise LocalProtocolError("WELCOME answers a HELLO")
        self._emit(Welcome(PROTOCOL_VERSION, self.max_frame, self.exports, self.window, self.window_bytes, self.conn_window))
        self.state = State.OPEN

    def send_goodbye(self, reason: str = "", code: int = 0) -> None:
        if self.state in (State.CLOSED, State.ERROR):
            return
        try:
            if not self._said_goodbye:
                self._emit(Goodbye(reason, code))
                self._said_goodbye = True
        finally:
            self.state = State.CLOSED
            if not self.close_reason:
                self.close_reason = reason
                self.close_code = code

    def say_goodbye(self, reason: str, code: int) -> None:
        """GOODBYE as this side drops the connection, also after the peer's protocol error (to say why)."""
        if self.state == State.ERROR:
            self.state = State.OPEN
        self.send_goodbye(reason, code)

    # ------------------------------------------------------------------ calls we make
    def send_call(
        self, obj: str, method: str, payload: Any, flags: int = 0, deadline: float | None = None, meta: dict[str, str] | None = None
    ) -> CallRecord:
        if self.state != State.OPEN and not (self.state == State.HANDSHAKE and self._hello_done):
            raise LocalProtocolError(f"cannot start a call in state {self.state}")
        call_id = self._next_id
        self._emit(Call(call_id, obj, method, payload, flags, deadline, meta))
        self._next_id = call_id + 2
        if not flags:
            rec = self.outgoing[call_id] = CallRecord(call_id, 0)  # a unary call: no stream, no credit
            return rec
        # the caller sends the client stream and receives the reply stream
        rec = self._record(call_id, flags, sends=bool(flags & CallFlags.STREAM_IN), receives=bool(flags & CallFlags.STREAM_OUT))
        if not flags & CallFlags.ONEWAY:
            self.outgoing[call_id] = rec
        return rec

    def _record(self, call_id: int, flags: int, *, sends: bool, receives: bool) -> CallRecord:
        """A call's record, with the credit this side holds for the stream it sends (the peer's
        window) and grants for the stream it receives (its own)."""
        rec = CallRecord(call_id, flags)
        if sends:
            rec.send_credit = self.peer_window
            rec.send_bytes = self.peer_window_bytes
        if receives:
            rec.recv_allowance = self.window
            rec.recv_bytes = self.window_bytes
        return rec

    def send_cancel(self, call_id: int) -> None:
        if self.outgoing.pop(call_id, None) is not None and self.state in _SENDABLE:
            self._emit(Cancel(call_id))

    # ------------------------------------------------------------------ answers to the peer's calls
    def send_reply(self, call_id: int, payload: Any) -> None:
        if call_id not in self.incoming:
            raise LocalProtocolError(f"no incoming call {call_id} to reply to")
        if self.state in _SENDABLE:
            self._emit(Reply(call_id, payload))  # if this raises, the call can still be answered
        del self.incoming[call_id]

    def send_error(self, call_id: int, code: int, type_name: str, message: str, args: Any = None) -> None:
        if call_id not in self.incoming:
            raise LocalProtocolError(f"no incoming call {call_id} to answer")
        if self.state in _SENDABLE:
            try:
                self._emit(Error(call_id, code, type_name, message[:4096], args))
            except LocalProtocolError:
                # over the peer's max_frame (a message that repeats a long name, large arguments):
                # the same error in fewer words and without arguments, which any max_frame fits
                self._emit(Error(call_id, code, type_name[:100], message[:100]))
        del self.incoming[call_id]

    def forget_incoming(self, call_id: int) -> None:
        """Drop an incoming call without answering (one-way calls, cancelled calls)."""
        self.incoming.pop(call_id, None)

    # ------------------------------------------------------------------ streams, either direction
    def _stream_record(self, call_id: int) -> CallRecord:
        rec = (self.outgoing if self.is_local_id(call_id) else self.incoming).get(call_id)
        if rec is None:
            raise LocalProtocolError(f"no open stream {call_id}")
        return rec

    def send_items(self, call_id: int, payloads: list[Any]) -> bool:
        """Send a batch of stream items as one ITEM frame (within the credit held).

        False if the frame does not fit in the connection credit held: nothing was sent, and
        ``conn_wanted`` says how much credit it needs (send it again once ``conn_send`` has that).
        ``LocalProtocolError`` if it never can: its cost exceeds ``conn_max_cost``.
        """
        rec = self._stream_record(call_id)
        count = len(payloads)
        if rec.sent_end:
            raise LocalProtocolError(f"stream {call_id} already ended")
        if count < 1 or rec.send_credit < count or rec.send_bytes <= 0:
            raise LocalProtocolError(f"stream {call_id} has no credit for {count} items")
        if self.state in _SENDABLE:
            out = self._out
            start = len(out)
            size = self._emit(Item(call_id, count, payloads))  # type: ignore[arg-type]
            if self.conn_limited:
                # the payload's length: the frame less its envelope (array header, tag, id, count)
                cost = size - 2 - _uint_len(call_id) - _uint_len(count) + ITEM_OVERHEAD
                if cost > self.conn_send or (self.conn_known and cost > self.conn_max_cost):
                    del out[start:]
                    if self.conn_known and cost > self.conn_max_cost:
                        raise LocalProtocolError(
                            f"an ITEM frame of {size} bytes exceeds what the peer's connection window of "
                            f"{self.peer_conn_window} bytes lets through ({self.conn_max_cost - ITEM_OVERHEAD} bytes of items)"
                        )
                    self.conn_wanted = cost
                    return False
                self.conn_send -= cost
            rec.send_bytes -= size
        rec.send_credit -= count
        return True

    def send_end(self, call_id: int) -> None:
        """End the stream we send on ``call_id``.  For a server stream this completes the call."""
        if self.is_local_id(call_id):
            rec = self.outgoing.get(call_id)
            if rec is None or rec.sent_end:
                return
            rec.sent_end = True
        else:
            rec = self.incoming.pop(call_id, None)
            if rec is None:
                raise LocalProtocolError(f"no incoming call {call_id} to end")
        if self.state in _SENDABLE:
            self._emit(End(call_id))

    def send_credit(self, call_id: int, items: int, nbytes: int) -> None:
        """Return stream credit on ``call_id``, and with it the connection credit freed so far."""
        rec = (self.outgoing if self.is_local_id(call_id) else self.incoming).get(call_id)
        if rec is None or rec.recv_end:
            return
        rec.recv_allowance += items
        rec.recv_bytes += nbytes
        if self.state in _SENDABLE:
            conn = self.conn_pending if self.conn_enforce else 0
            self._emit(Credit(call_id, items, nbytes, conn))
            if conn:
                self.conn_pending = 0
                self.conn_recv += conn

    def send_conn_credit(self, at_least: int = 1) -> None:
        """Return the connection credit freed so far (``conn_pending``) in a CREDIT of its own, if it
        is at least ``at_least`` bytes and the peer takes part in connection flow control."""
        conn = self.conn_pending
        if conn >= at_least and conn and self.conn_enforce and self.state in _SENDABLE:
            self._emit(Credit(0, 0, 0, conn))
            self.conn_pending = 0
            self.conn_recv += conn

    def send_release(self, obj: str, count: int = 1) -> None:
        if self.state in _SENDABLE:
            self._emit(Release(obj, count))

    def send_ping(self, nonce: int) -> None:
        if self.state in _SENDABLE:
            self._emit(Ping(nonce))

    # ------------------------------------------------------------------ receiving
    def receive_data(self, data: bytes | bytearray | memoryview) -> list[tuple[Message, CallRecord | None]]:
        """Feed received bytes; return the complete, validated messages they finish.

        ``b""`` means the peer closed its side: a frame left half-received is a protocol error.
        """
        if self.state == State.ERROR:
            raise RemoteProtocolError("the connection is already in ERROR")
        if not data:
            if self._in or self._big is not None:
                self._fail("the peer closed the connection in the middle of a frame")
            return []
        if self._big is not None:
            # the rest of a large frame: into its own buffer, then carry on with what follows
            take = min(self._big_size - self._big_filled, len(data))
            self._grow_big(self._big_filled + take)
            memoryview(self._big)[self._big_filled : self._big_filled + take] = memoryview(data)[:take]
            done = self.big_received(take)
            if take < len(data) and self.state not in (State.CLOSED, State.ERROR):
                done.extend(self.receive_data(data[take:]))
            return done
        if self._in:
            self._in += data
            buf: bytes | bytearray | memoryview = self._in
        else:
            buf = data
        total = len(buf)
        if total < _HEADER:
            if buf is data:
                self._in = bytearray(data)
            return []
        events: list[tuple[Message, CallRecord | None]] = []
        pos = 0
        mv: memoryview | None = None
        max_frame = self._recv_limit
        while total - pos >= _HEADER:
            size = int.from_bytes(buf[pos : pos + _HEADER], "big")
            if size > max_frame:
                max_frame = self._recv_limit  # HELLO may have arrived earlier in this read
                if size > max_frame:
                    if not self.client and not self._hello_done:
                        self._fail(
                            f"frame of {size} bytes before HELLO exceeds the handshake limit of {max_frame} bytes"
                        )
                    self._fail(f"frame of {size} bytes exceeds the limit of {max_frame} bytes")
            if size == 0:
                self._fail("empty frame")
            end = pos + _HEADER + size
            if end > total:
                if size >= _BIG_FRAME and self._hello_done:
                    # a large frame: give it a buffer of its own, filled in place from now on.  It
                    # grows as the bytes arrive, so a length prefix alone reserves little memory,
                    # and the runtime counts it against its budget while it is being assembled
                    # (on a server also behind the on_connect gate, once HELLO has arrived).
                    have = total - pos
                    spare = self.buffers.take() if self.buffers is not None else None
                    big = self._big = spare if spare is not None else bytearray(min(_HEADER + size, max(2 * have, _BIG_FRAME)))
                    self._big_size = _HEADER + size
                    self._grow_big(have)
                    memoryview(big)[:have] = memoryview(buf)[pos:total]
                    self._big_filled = have
                    pos = total
                break
            if mv is None:
                mv = memoryview(buf)
            try:
                msg = _decoder.decode(mv[pos + _HEADER : end])
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError, OverflowError) as exc:
                self._fail(_undecodable(mv[pos + _HEADER : end], exc))
            pos = end
            rec = self._accept(msg, size)
            if rec is not _DROP:
                events.append((msg, rec))
            if self.state == State.CLOSED:
                pos = total
                break
        if pos:
            # Never resize a buffer that decoded payloads may still point into.
            self._in = bytearray(buf[pos:]) if pos < total else bytearray()
        elif buf is data:
            self._in = bytearray(data)
        return events

    def big_target(self) -> memoryview | None:
        """Where the next received bytes should go when a large frame is half received (so the
        transport can read straight into it), else None."""
        big = self._big
        if big is None:
            return None
        filled = self._big_filled
        if filled == len(big):
            self._grow_big(filled + 1)
        return memoryview(big)[filled : self._big_size]

    def _grow_big(self, at_least: int) -> None:
        """Make the buffer at least ``at_least`` bytes long: it doubles as the frame arrives, so a
        length prefix alone reserves little memory."""
        big = self._big
        assert big is not None
        if len(big) < at_least:
            big += bytes(min(self._big_size, max(at_least, 2 * len(big))) - len(big))

    def big_received(self, n: int) -> list[tuple[Message, CallRecord | None]]:
        """``n`` bytes were written into ``big_target()``; the frame's message once it is complete."""
        big = self._big
        assert big is not None
        self._big_filled += n
        if self._big_filled < self._big_size:
            return []
        self._big = None
        self._big_filled = 0
        body = memoryview(big)[_HEADER : self._big_size]
        try:
            msg = _decoder.decode(body)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError, OverflowError) as exc:
            self._fail(_undecodable(body, exc))
        if self.buffers is not None:
            self.buffers.lend(big, body)  # reused once what was decoded from it is gone
        rec = self._accept(msg, self._big_size - _HEADER)
        return [] if rec is _DROP else [(msg, rec)]

    def _fail(self, why: str) -> Any:
        self.state = State.ERROR
        self.close_reason = why
        raise RemoteProtocolError(why)

    def _accept(self, msg: Message, size: int) -> Any:
        """Check ``msg`` against the state and tables and update them.

        Returns the call record the message belongs to (or None for connection-level messages), or
        ``_DROP`` for a message that is legal but moot (an answer to a call already cancelled).
        """
        state = self.state
        if state == State.CLOSED:
            return _DROP
        cls = type(msg)
        if state == State.HANDSHAKE:
            if cls is Hello:
                if self.client or self.peer_version:
                    self._fail("unexpected HELLO")
                self._on_hello(msg)  # type: ignore[arg-type]
                return None
            if cls is Welcome:
                if not self.client:
                    self._fail("unexpected WELCOME")
                if msg.version != PROTOCOL_VERSION:  # type: ignore[union-attr]
                    self._fail(f"the server speaks protocol version {msg.version}, not {PROTOCOL_VERSION}")  # type: ignore[union-attr]
                if msg.max_frame < MIN_MAX_FRAME:  # type: ignore[union-attr]
                    self._fail(f"the server's max_frame of {msg.max_frame} is below {MIN_MAX_FRAME}")  # type: ignore[union-attr]
                self.state = State.OPEN
                self.peer_version = msg.version  # type: ignore[union-attr]
                self.peer_max_frame = msg.max_frame  # type: ignore[union-attr]
                self.peer_exports = msg.exports  # type: ignore[union-attr]
                self.peer_window = max(1, msg.window)  # type: ignore[union-attr]
                self.peer_window_bytes = max(1, msg.window_bytes)  # type: ignore[union-attr]
                self._peer_conn_window(msg.conn_window)  # type: ignore[union-attr]
                return None
            if not self.client and not self.peer_version and cls is not Goodbye:
                self._fail(f"expected HELLO, got {cls.__name__.upper()}")
        elif cls is Hello or cls is Welcome:
            self._fail(f"unexpected {cls.__name__.upper()} after the handshake")
        if cls is Call:
            call_id = msg.id  # type: ignore[union-attr]
            if self.is_local_id(call_id) or call_id <= self._last_peer_id:
                self._fail(f"CALL with an invalid id {call_id}")
            self._last_peer_id = call_id
            flags = msg.flags  # type: ignore[union-attr]
            deadline = msg.deadline  # type: ignore[union-attr]
            if deadline is not None and not deadline > 0.0:
                return self._refuse_deadline(call_id, flags, deadline)
            if not flags:
                rec = self.incoming[call_id] = CallRecord(call_id, 0)  # a unary call: no stream, no credit
                return rec
            if flags & CallFlags.ONEWAY:
                return None
            # the callee sends the reply stream and receives the client stream
            rec = self._record(call_id, flags, sends=bool(flags & CallFlags.STREAM_OUT), receives=bool(flags & CallFlags.STREAM_IN))
            self.incoming[call_id] = rec
            return rec
        if cls is Reply or cls is Error:
            call_id = msg.id  # type: ignore[union-attr]
            if call_id <= 0 or (call_id & 1) != self._local_parity or call_id >= self._next_id:
                self._check_issued(call_id)  # (it fails, saying why)
            done = self.outgoing.pop(call_id, None)
            return _DROP if done is None else done
        if cls is Item:
            call_id = msg.id  # type: ignore[union-attr]
            streamed = self._peer_stream(call_id)
            cost = len(msg.payload) + ITEM_OVERHEAD  # type: ignore[union-attr]
            if cost > self.conn_recv and self.conn_enforce:
                self._fail(f"ITEM of {cost} bytes beyond the connection credit ({self.conn_recv} bytes left)")
            self.conn_recv -= cost
            if streamed is None:
                # dropped unread: its cost is free again at once
                self.conn_pending += cost
                self.send_conn_credit(self.conn_threshold)
                return _DROP
            rec = streamed
            if rec.recv_end:
                self._fail(f"ITEM after END on stream {call_id}")
            count = msg.count  # type: ignore[union-attr]
            if count < 1 or rec.recv_allowance < count or rec.recv_bytes <= 0:
                self._fail(f"ITEM of {count} beyond the granted credit on stream {call_id}")
            rec.recv_allowance -= count
            rec.recv_bytes -= size
            return rec
        if cls is End:
            call_id = msg.id  # type: ignore[union-attr]
            ended: CallRecord | None
            if self.is_local_id(call_id):
                self._check_issued(call_id)
                ended = self.outgoing.get(call_id)
                if ended is not None:
                    if not ended.flags & CallFlags.STREAM_OUT:
                        self._fail(f"END for call {call_id}, which has no reply stream")
                    del self.outgoing[call_id]  # a server stream is complete
            else:
                if call_id <= 0 or call_id > self._last_peer_id:
                    self._fail(f"END for call {call_id}, which the peer never started")
                ended = self.incoming.get(call_id)
                if ended is not None:
                    if not ended.flags & CallFlags.STREAM_IN:
                        self._fail(f"END for call {call_id}, which has no client stream")
                    if ended.recv_end:
                        self._fail(f"second END on stream {call_id}")
            if ended is None:
                return _DROP
            ended.recv_end = True
            return ended
        if cls is Credit:
            call_id = msg.id  # type: ignore[union-attr]
            conn = msg.conn  # type: ignore[union-attr]
            if conn:
                if conn < 0 or (self.conn_limited and self.conn_send + conn > self.peer_conn_window):
                    self._fail(f"CREDIT returns {conn} bytes of connection credit, more than was used")
                if self.conn_limited:
                    self.conn_send += conn
            if call_id == 0:
                if msg.items or msg.nbytes:  # type: ignore[union-attr]
                    self._fail("a CREDIT for the connection grants no stream credit")
                return None
            credited = self._peer_stream(call_id)
            if credited is None:
                return None if conn else _DROP
            rec = credited
            sending = CallFlags.STREAM_IN if self.is_local_id(call_id) else CallFlags.STREAM_OUT
            if not rec.flags & sending:
                self._fail(f"CREDIT for call {call_id}, on which this side sends no stream")
            items = msg.items  # type: ignore[union-attr]
            nbytes = msg.nbytes  # type: ignore[union-attr]
            if items < 0 or nbytes < 0 or rec.send_credit + items > 1 << 31 or rec.send_bytes + nbytes > 1 << 40:
                self._fail(f"invalid CREDIT of {items} items, {nbytes} bytes on stream {call_id}")
            rec.send_credit += items
            rec.send_bytes += nbytes
            return rec
        if cls is Cancel:
            call_id = msg.id  # type: ignore[union-attr]
            if call_id <= 0 or self.is_local_id(call_id) or call_id > self._last_peer_id:
                self._fail(f"CANCEL of a call the peer did not start ({call_id})")
            gone = self.incoming.pop(call_id, None)
            return _DROP if gone is None else gone
        if cls is Goodbye:
            self._closed_by_peer(msg)  # type: ignore[arg-type]
            return None
        if cls is Ping:
            self._emit(Pong(msg.nonce))  # type: ignore[union-attr]
            return _DROP
        if cls is Release:
            if msg.count < 1:  # type: ignore[union-attr]
                self._fail(f"RELEASE of {msg.count} references")  # type: ignore[union-attr]
            return None
        if cls is Pong:
            return None
        self._fail(f"unexpected {cls.__name__.upper()} in state {state}")  # pragma: no cover

    def _refuse_deadline(self, call_id: int, flags: int, deadline: float) -> Any:
        """Answer a CALL whose deadline is NaN (refused) or zero or less (already passed) here:
        the call never reaches the runtime.  (+inf passes: it is the same as no deadline.)"""
        if not flags & CallFlags.ONEWAY:
            if deadline != deadline:
                self._emit(Error(call_id, ErrorCode.VALIDATION, "ValidationError", f"the deadline of call {call_id} is not a number"))
            else:
                self._emit(Error(call_id, ErrorCode.TIMEOUT, "TimeoutError", f"the deadline of call {call_id} had passed when it arrived"))
        return _DROP

    def _on_hello(self, msg: Hello) -> None:
        if msg.version != PROTOCOL_VERSION:
            # a protocol error like any other (one GOODBYE, code 3), but said here, with the versions
            why = f"unsupported protocol version {msg.version} (this side speaks {PROTOCOL_VERSION})"
            self._emit(Goodbye(why, ErrorCode.VALIDATION))
            self._said_goodbye = True
            self._fail(why)
        if msg.max_frame < MIN_MAX_FRAME:
            self._fail(f"the client's max_frame of {msg.max_frame} is below {MIN_MAX_FRAME}")
        self.peer_version = msg.version
        self.peer_max_frame = msg.max_frame
        self.peer_exports = msg.exports
        self.peer_window = max(1, msg.window)
        self.peer_window_bytes = max(1, msg.window_bytes)
        self._peer_conn_window(msg.conn_window)
        self._hello_done = True
        self._recv_limit = self.max_frame  # HELLO is in: the limit we announce from now on

    def _peer_conn_window(self, window: int) -> None:
        """The peer's HELLO/WELCOME said what connection window it grants (0: it predates them)."""
        if window < 0 or window > _MAX_CONN_WINDOW:
            self._fail(f"invalid connection window {window}")
        if window:
            window = max(MIN_CONN_WINDOW, window)
            self.conn_send += window - self.peer_conn_window  # what was sent meanwhile still counts
            self.peer_conn_window = window
            self.conn_max_cost = window - window // 16
            self.conn_limited = True
            self.conn_enforce = True  # the peer knows the rules: it honours ours
        else:
            self.conn_limited = False
        self.conn_known = True

    def _closed_by_peer(self, msg: Goodbye) -> None:
        self.state = State.CLOSED
        self.close_reason = msg.reason
        self.close_code = msg.code

    def _check_issued(self, call_id: int) -> None:
        if call_id <= 0 or not self.is_local_id(call_id) or call_id >= self._next_id:
            self._fail(f"answer to call {call_id}, which this side never made")

    def _peer_stream(self, call_id: int) -> CallRecord | None:
        """The record a stream frame from the peer refers to; None if that call is already over."""
        if self.is_local_id(call_id):
            self._check_issued(call_id)
            return self.outgoing.get(call_id)
        if call_id <= 0 or call_id > self._last_peer_id:
            self._fail(f"stream frame for call {call_id}, which the peer never started")
        return self.incoming.get(call_id)
