"""``Limits``: what one connection lets its peer make it do and hold, all configurable."""

from __future__ import annotations

import msgspec

from ._protocol import DEFAULT_HANDSHAKE_MAX_FRAME, DEFAULT_MAX_BUFFERED, DEFAULT_MAX_FRAME, DEFAULT_WINDOW, DEFAULT_WINDOW_BYTES

__all__ = ("Limits",)


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

    max_frame: int = DEFAULT_MAX_FRAME
    window: int = DEFAULT_WINDOW  # stream credit in items, granted per stream received
    window_bytes: int = DEFAULT_WINDOW_BYTES  # ... and in bytes
    handshake_timeout: float = 10.0
    handshake_max_frame: int = DEFAULT_HANDSHAKE_MAX_FRAME  # the largest frame a server accepts before HELLO (see below)
    max_calls_in_flight: int = 4096  # incoming calls served at once, per connection
    write_buffer_high: int = 1024 * 1024  # producers wait for the writer above this many buffered bytes
    max_objects: int = 10_000  # objects exported by reference on one connection
    max_fds: int = 64  # received file descriptors (SCM_RIGHTS) not yet claimed by a decoded value, per connection
    max_streams: int = 1024  # incoming stream calls open at once, per connection
    idle_timeout: float | None = None  # close a connection that received nothing for this long (seconds)
    max_buffered: int = DEFAULT_MAX_BUFFERED  # bytes a peer may make this side hold for it (see below)
