"""I/O drivers: how one connection's bytes (and descriptors) move, behind one contract.

A driver moves bytes between a socket (or stream) and the connection, and nothing else: it never
decodes a frame or decides anything about the protocol.  The connection hands it encoded bytes with
``write`` and learns what arrived through the ``Callbacks`` it gave the driver:

- ``feed(data)``: bytes arrived (``b""``: the peer closed); False once the connection is over;
- ``big_target()`` / ``feed_big(n)``: while a large frame is being received, the core offers its own
  buffer and the driver reads straight into it (no copy), then reports how much it read;
- ``fds_received(fds, truncated)``: SCM_RIGHTS descriptors arrived (False: refused, close);
- ``lost(exc)``: the transport failed or the peer went away (None: a clean end of stream);
- ``writable()``: what was buffered for writing has gone out; the connection may read again.

Four implementations: ``AsyncioIO`` (an asyncio ``BufferedProtocol`` over a transport, TCP and TLS),
``UnixIO`` (asyncio without a transport, ``recvmsg_into``/``sendmsg``, so that descriptors travel),
``StreamIO`` (any anyio byte stream: trio, memory streams, TLS on trio) and ``MockIO`` (two
connections wired to each other in memory, for runtime tests without sockets).  ``open_driver``
picks one for a transport.  Adding a transport is adding a class with these methods.
"""

from __future__ import annotations

import array
import asyncio
import collections
import math
import socket
import ssl
import threading
from typing import Any, Callable, Protocol

import anyio
import anyio.abc

from ._errors import ConnectionInterrupted, ConnectionInvalidated
from ._fds import FdTable, close_all
from ._protocol import FrameBuffers, ProtocolCore

__all__ = (
    "IO",
    "AsyncioIO",
    "Callbacks",
    "MockIO",
    "StreamIO",
    "Link",
    "UnixIO",
    "Waiter",
    "frame_buffers",
    "new_waiter",
    "open_driver",
    "receive_buffer",
)

READ_SIZE = 262144  # bytes asked of the kernel per read
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # (a plain int: an IntFlag operand costs the enum machinery on every read)
_GOODBYE_GRACE = 1.0  # seconds a closed connection keeps trying to send its GOODBYE to a slow peer
_SOCKET_BUFFER = 1024 * 1024


class Callbacks(Protocol):
    """What a driver calls on its connection (the connection's ``Reader``), on the event loop's thread."""

    def feed(self, data: bytes) -> bool: ...

    def feed_big(self, n: int) -> bool: ...

    def big_target(self) -> memoryview | None: ...

    def fds_received(self, fds: list[int], truncated: bool) -> bool: ...

    def lost(self, exc: BaseException | None) -> None: ...

    def writable(self) -> None: ...


class IO(Protocol):
    """The contract every driver implements (see the module's docstring)."""

    passes_fds: bool  # can attach descriptors to what it writes (SCM_RIGHTS)
    immediate: bool  # writes synchronously (asyncio drivers): the connection flushes by itself
    open_waits: bool  # open() may wait for the peer (a TLS handshake): it runs under the handshake timeout

    async def open(self) -> None:
        """Set the transport up (a TLS handshake included); called once, in the connection's task."""

    def tls_object(self) -> Any:
        """The ``ssl`` object of a TLS connection once open (for the peer's certificate), else None."""

    def write(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        """Send ``data`` (with ``fds`` attached to its first byte; the driver closes them once sent)."""

    def write_last(self, data: bytes | bytearray) -> None:
        """Send ``data`` (a GOODBYE) as the connection is being dropped, best effort."""

    def flush_soon(self, flush: Callable[[], None]) -> None:
        """Call ``flush`` (which writes what the core has encoded) soon, before anything else is
        sent: a driver that is not ``immediate`` calls it when its writer is about to send, so
        that every frame encoded until then leaves in one write."""

    def blocked(self) -> bool:
        """Is more buffered for writing than the high-water mark (producers wait)?"""

    def buffered(self) -> int:
        """Bytes handed to ``write`` and not yet taken by the kernel."""

    async def wait_writable(self) -> None:
        """Return once ``blocked()`` is over (or the driver is done)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        """Move bytes until the connection's I/O ends (its tasks, if any, go in ``tg``)."""

    def done(self) -> bool:
        """Has the driver stopped (closed, or the transport is gone)?"""

    def close(self) -> None:
        """Stop now: what is buffered goes out if the kernel takes it at once."""

    async def aclose(self) -> None:
        """Close gracefully: what is buffered goes out first (within a second)."""

    async def release(self) -> None:
        """The connection is over: free the transport (idempotent)."""


class Waiter(Protocol):
    """An event (``anyio.Event``, or the backend's own: see ``new_waiter``)."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> None: ...


_waiter_class: Callable[[], Waiter] | None = None


def new_waiter() -> Waiter:
    """A new event for a task of a non-asyncio backend to wait on: trio's own ``Event`` (anyio's
    wrapper around it costs more than the wait itself on the calling hot path)."""
    global _waiter_class
    cls = _waiter_class
    if cls is None:
        try:
            import trio  # only ever asked for while trio runs: no dependency of xrpc
        except ImportError:  # pragma: no cover - anyio knows no other backend
            cls = anyio.Event
        else:
            cls = trio.Event
        _waiter_class = cls
    return cls()


_local = threading.local()


def receive_buffer() -> memoryview:
    """One receive buffer per thread, shared by its connections: every read is copied out (or
    decoded) before the next one, so an idle connection costs no buffer of its own."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_SIZE))
    return view


def frame_buffers() -> FrameBuffers:
    """The buffers of large frames kept for reuse, one set per thread, shared by its connections
    (see ``FrameBuffers``): at most one spare buffer per thread."""
    buffers: FrameBuffers | None = getattr(_local, "frames", None)
    if buffers is None:
        buffers = _local.frames = FrameBuffers()
    return buffers


def _lost_reason(exc: BaseException | None) -> str:
    return f"the connection was lost: {exc!r}" if exc else "the peer closed the connection"


class _LoopDriver:
    """What the asyncio drivers share: producers wait here while the socket is backed up."""

    passes_fds = False
    immediate = True
    open_waits = False
    _resume: asyncio.Future[None] | None
    _loop: asyncio.AbstractEventLoop
    _done: asyncio.Future[None]

    def _wake_writers(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None

    async def _wait_while(self, blocked: Callable[[], bool]) -> None:
        while blocked() and not self._done.done():
            if self._resume is None:
                self._resume = self._loop.create_future()
            await self._resume

    def done(self) -> bool:
        return self._done.done()

    def tls_object(self) -> Any:
        return None

    def write_last(self, data: bytes | bytearray) -> None:
        self.write(data)  # type: ignore[attr-defined]

    def flush_soon(self, flush: Callable[[], None]) -> None:
        self._loop.call_soon(flush)

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        await self._done

    async def aclose(self) -> None:
        self.close()  # type: ignore[attr-defined]

    async def release(self) -> None:
        self.close()  # type: ignore[attr-defined]


class AsyncioIO(asyncio.BufferedProtocol, _LoopDriver):
    """Drives a connection's socket on asyncio: reads into one reused buffer, writes synchronously."""

    def __init__(self, cb: Callbacks, sock: socket.socket, high: int, client: bool, ssl_context: ssl.SSLContext | None, server_hostname: str | None, handshake_timeout: float) -> None:
        self.cb = cb
        self.sock = sock
        self.high = high
        self.client = client
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.handshake_timeout = handshake_timeout
        self.open_waits = ssl_context is not None  # a TLS handshake
        self.view = receive_buffer()
        self.big = False  # the last buffer handed out was the core's large-frame buffer
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = loop.create_future()
        self._loop = loop
        self._paused = False
        self._reading_paused = False
        self._resume: asyncio.Future[None] | None = None
        self._lost = False
        self._gone: asyncio.Future[None] = loop.create_future()  # connection_lost was called
        self._grace_timer: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        tls_timeout = self.handshake_timeout if self.ssl_context is not None else None
        if self.client:
            await self._loop.create_connection(
                lambda: self,
                sock=self.sock,
                ssl=self.ssl_context,
                server_hostname=self.server_hostname if self.ssl_context else None,
                ssl_handshake_timeout=tls_timeout,
            )
        else:
            await self._loop.connect_accepted_socket(lambda: self, self.sock, ssl=self.ssl_context, ssl_handshake_timeout=tls_timeout)

    def tls_object(self) -> Any:
        t = self.transport
        return t.get_extra_info("ssl_object") if t is not None and self.ssl_context is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=self.high)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self.cb.big_target()
        if target is not None:
            self.big = True
            return target
        self.big = False
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self._done.done():
            return
        cb = self.cb
        ok = cb.feed_big(nbytes) if self.big else cb.feed(self.view[:nbytes].tobytes())
        if not ok:
            self.close()

    def eof_received(self) -> bool:
        if not self._done.done():
            self.cb.feed(b"")
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if not self._gone.done():
            self._gone.set_result(None)
        self.cb.lost(exc)
        if not self._done.done():
            self._done.set_result(None)
        self._wake_writers()

    def pause_writing(self) -> None:
        self._paused = True  # producers wait; whether reading stops is the connection's call

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writers()
        self.cb.writable()

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

    def write(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()  # what is buffered goes out first (a GOODBYE, say)...
            if self.ssl_context is not None or t.get_write_buffer_size():
                # ...within a grace: a peer that never reads would otherwise keep the socket and
                # the buffer for ever, after the connection (and every limit on it) is gone.
                # (With nothing buffered, a plain transport is closed already.)
                self._grace_timer = self._loop.call_later(_GOODBYE_GRACE, self._abort)
        if not self._done.done():
            self._done.set_result(None)

    def _abort(self) -> None:
        t = self.transport
        if t is None or self._lost:
            return
        if self.ssl_context is None:
            t.abort()
            return
        # A TLS transport aborted while its closing handshake is under way can be told of its loss
        # twice (asyncio then logs an AttributeError); shutting the socket down instead makes the
        # pending write fail, and the transport ends the ordinary way.
        sock = t.get_extra_info("socket")
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
            else:
                t.abort()
        except OSError:
            pass

    async def release(self) -> None:
        self.close()
        if self.transport is not None and not self._lost:
            # what is buffered (a GOODBYE, say) has the grace to go out; then the socket goes
            with anyio.move_on_after(_GOODBYE_GRACE, shield=True):
                await asyncio.shield(self._gone)
            self._abort()
        if self.transport is None:
            self.sock.close()  # never opened (the TLS handshake failed, say)


class UnixIO(_LoopDriver):
    """Drives a Unix socket on asyncio without a transport, so that file descriptors can travel.

    Reads use ``recvmsg_into`` into one reused buffer, collecting SCM_RIGHTS descriptors in arrival
    order; writes go straight to ``sendmsg`` and only what the kernel does not take is buffered.
    Descriptors are attached to the first byte of the chunk whose frames refer to them.
    """

    passes_fds = True
    MAX_FDS = 64

    def __init__(self, cb: Callbacks, sock: socket.socket, high: int) -> None:
        self.cb = cb
        self.sock = sock
        self.fd = sock.fileno()
        self.view = receive_buffer()
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                if sock.getsockopt(socket.SOL_SOCKET, opt) < _SOCKET_BUFFER:
                    sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)  # fewer, larger writes for big frames
            except OSError:
                pass
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done: asyncio.Future[None] = loop.create_future()
        # what the kernel did not take yet; made on the first short write (an empty deque holds a
        # block of 0.5 KiB, and most connections never fill their socket buffer)
        self._pending: collections.deque[tuple[memoryview, list[int]]] | None = None
        self._pending_size = 0
        self._pending_fds = 0  # descriptors held in _pending until the kernel takes them
        self._high = high
        self._resume: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._ancsize = socket.CMSG_SPACE(self.MAX_FDS * 4)
        self._last = False  # write_last was called: on close, what is queued gets a grace to go out
        self._lingering = False  # closed, but still sending what is queued (until drained or the grace ends)
        self._closed: asyncio.Future[None] = loop.create_future()  # the socket is closed

    async def open(self) -> None:
        self._loop.add_reader(self.fd, self._readable)

    def _readable(self) -> bool:
        """Read what is there and feed it; True if that was data and the connection goes on."""
        if self._done.done():
            return False
        cb = self.cb
        target = cb.big_target()
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
        if (fds or flags & _MSG_CTRUNC) and not cb.fds_received(fds, bool(flags & _MSG_CTRUNC)):
            self.close()  # refused: closed, and GOODBYE said why
            return False
        if n == 0:
            cb.feed(b"")
            self._lost(None)
            return False
        ok = cb.feed_big(n) if target is not None else cb.feed(self.view[:n].tobytes())
        if not ok:
            self.close()
        return ok

    def write(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        """Send ``data`` (with ``fds`` attached to its first byte).  Takes ownership of ``fds``:
        they are closed here once the kernel has them (it keeps its own references)."""
        if self._done.done():
            close_all(fds)
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
            sent = self._send(data, fds)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            close_all(fds)
            if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                # what the peer said before it closed (a GOODBYE, say) is the better reason: read it
                # first, outside whatever dispatch is writing now
                self._loop.call_soon(self._drain_then_lost, exc)
                return
            self._lost(exc)
            return
        if sent and fds:
            close_all(fds)
            fds = None
        if sent < len(data):
            self._queue(memoryview(data)[sent:], fds or [])
            self._loop.add_writer(self.fd, self._writable)

    def write_last(self, data: bytes | bytearray) -> None:
        self.write(data)
        self._last = True

    async def aclose(self) -> None:
        """What is queued goes out first, within a second, then the socket is closed."""
        self._last = True
        self.close()
        with anyio.move_on_after(_GOODBYE_GRACE + 0.5, shield=True):
            await asyncio.shield(self._closed)
        self._close_now()

    def _send(self, data: bytes | bytearray | memoryview, fds: list[int] | None) -> int:
        if fds:
            return self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        return self.sock.send(data)

    def _queue(self, data: memoryview, fds: list[int]) -> None:
        pending = self._pending
        if pending is None:
            pending = self._pending = collections.deque()
        pending.append((data, fds))
        self._pending_size += len(data)  # above _high producers wait; reading stops only if the connection says so
        self._pending_fds += len(fds)

    def blocked(self) -> bool:
        return self._pending_size > self._high or self._pending_fds > self.MAX_FDS

    def buffered(self) -> int:
        return self._pending_size

    def fds_held(self) -> int:
        """Descriptors queued for a peer that has not read them yet (each one open here)."""
        return self._pending_fds

    def pause_reading(self) -> None:
        if not self._reading_paused and self.fd >= 0 and not self._lingering:
            self._reading_paused = True
            self._loop.remove_reader(self.fd)

    def resume_reading(self) -> None:
        if self._reading_paused and self.fd >= 0 and not self._lingering:
            self._reading_paused = False
            self._loop.add_reader(self.fd, self._readable)

    def _writable(self) -> None:
        while self._pending:
            data, fds = self._pending[0]
            try:
                sent = self._send(data, fds)
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
                self._pending_fds -= len(fds)
                close_all(fds)
            if sent < len(data):
                self._pending[0] = (data[sent:], [])
                return
            self._pending.popleft()
        if self._lingering:
            self._close_now()  # the GOODBYE is out
            return
        self._loop.remove_writer(self.fd)
        self._wake_writers()
        self.cb.writable()

    async def wait_writable(self) -> None:
        await self._wait_while(self.blocked)

    def _drain_then_lost(self, exc: BaseException) -> None:
        """The peer closed while we were writing: read what it sent before (a GOODBYE, say), even
        while reading is paused, up to its end, then end the connection."""
        for _ in range(256):  # what a closed peer left is finite; bounded all the same
            if not self._readable():
                break
        self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        if self._lingering:
            self._close_now()
            return
        self.cb.lost(exc)
        self.close()

    def close(self) -> None:
        if self._lingering:
            return  # closes once what is queued is out, or at the end of the grace
        if self.fd >= 0 and self._pending and self._last:
            # a GOODBYE is queued behind what the peer has not read: stop reading, and give the
            # writer a grace to send it before the socket is closed
            self._lingering = True
            if not self._reading_paused:
                self._loop.remove_reader(self.fd)
            self._loop.call_later(_GOODBYE_GRACE, self._close_now)
            if not self._done.done():
                self._done.set_result(None)
            self._wake_writers()
            return
        self._close_now()

    def _close_now(self) -> None:
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
                    close_all(fds)
                self._pending.clear()
                self._pending_fds = 0
            self.sock.close()
        if not self._closed.done():
            self._closed.set_result(None)
        if not self._done.done():
            self._done.set_result(None)
        self._wake_writers()


class StreamIO:
    """Drives any anyio byte stream (trio, memory streams, TLS through anyio) with two tasks: a
    reader that feeds what arrives, and a writer that sends what was written, coalesced."""

    passes_fds = False
    immediate = False
    open_waits = True  # wrapping a socket (and TLS) happens in open()

    def __init__(
        self,
        cb: Callbacks,
        transport: Any,
        high: int,
        client: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.cb = cb
        self.high = high
        self.client = client
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self._sock: socket.socket | None = transport if isinstance(transport, socket.socket) else None
        self.stream: anyio.abc.ByteStream | None = None if self._sock is not None else transport
        self._tls: Any = None
        self._chunks: list[bytes | bytearray | memoryview] = []
        self._size = 0  # bytes in _chunks
        self._in_send = 0  # bytes of the chunk being sent
        self._wake = anyio.Event()
        self._pull: Callable[[], None] | None = None  # writes what the core has encoded (flush_soon)
        self._drained: anyio.Event | None = None
        self._reading = anyio.Event()
        self._reading.set()
        self._scope: anyio.CancelScope | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._done = False
        self._writer_scope: anyio.CancelScope | None = None
        self._flush_by: float | None = None  # once the connection is over, the writer stops by then
        self._writer_over = False
        self._writer_done = anyio.Event()

    async def open(self) -> None:
        sock = self._sock
        if sock is None:
            return
        if sock.family == socket.AF_UNIX:
            self.stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
        else:
            self.stream = await anyio.abc.SocketStream.from_socket(sock)
        if self.ssl_context is not None:
            from anyio.streams.tls import TLSAttribute, TLSStream  # only TLS on a non-asyncio loop needs it

            tls_stream = await TLSStream.wrap(
                self.stream,
                server_side=not self.client,
                hostname=self.server_hostname if self.client else None,
                ssl_context=self.ssl_context,
                standard_compatible=False,
            )
            self.stream = tls_stream
            self._tls = tls_stream.extra(TLSAttribute.ssl_object)

    def tls_object(self) -> Any:
        return self._tls

    def write(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        if self._done:
            return
        self._chunks.append(data)
        self._size += len(data)
        self._wake.set()

    def flush_soon(self, flush: Callable[[], None]) -> None:
        """The writer calls ``flush`` when it next runs, just before it sends: the frames encoded
        until then (every reply of the calls served in one scheduler round) leave in one write."""
        if self._done:
            return
        self._pull = flush
        self._wake.set()

    def _take_pull(self) -> None:
        pull = self._pull
        if pull is not None:
            self._pull = None
            pull()

    def write_last(self, data: bytes | bytearray) -> None:
        """Queue ``data`` (a GOODBYE) behind what is already queued, for the writer: it alone sends,
        so nothing is sent concurrently and no frame is cut in two.  The writer gets a second after
        the connection ends to send it (``_grace``)."""
        if self._writer_over or (self._tg is None and self.stream is None):
            return
        self._take_pull()  # what was encoded before the GOODBYE goes before it
        self._chunks.append(bytes(data))
        self._size += len(data)
        self._wake.set()
        self._grace(_GOODBYE_GRACE)

    def _grace(self, seconds: float) -> None:
        """Let the writer go on for at most ``seconds`` more (from now) once the connection ends."""
        deadline = anyio.current_time() + seconds
        if self._flush_by is None or deadline < self._flush_by:
            self._flush_by = deadline
        scope = self._writer_scope
        if scope is not None and self._done:
            scope.deadline = self._flush_by

    def buffered(self) -> int:
        return self._size + self._in_send

    def blocked(self) -> bool:
        return self._size + self._in_send > self.high

    async def wait_writable(self) -> None:
        while self.blocked() and not self._done:
            if self._drained is None:
                self._drained = anyio.Event()
            await self._drained.wait()

    def pause_reading(self) -> None:
        if self._reading.is_set():
            self._reading = anyio.Event()

    def resume_reading(self) -> None:
        self._reading.set()

    def done(self) -> bool:
        return self._done

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        tg.start_soon(self._writer)
        stream = self.stream
        assert stream is not None
        cb = self.cb
        with anyio.CancelScope() as self._scope:
            try:
                while not self._done:
                    if not self._reading.is_set():
                        await self._reading.wait()
                        continue
                    try:
                        data = await stream.receive(READ_SIZE)
                    except anyio.EndOfStream:
                        data = b""
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.BusyResourceError, OSError) as exc:
                        cb.lost(exc)
                        return
                    if not cb.feed(data):
                        return
            finally:
                self._finished()

    def _finished(self) -> None:
        """The connection's I/O is over: nothing more is queued; the writer stops at once, or once
        it has sent what ``write_last``/``aclose`` asked for, within their grace."""
        if not self._done:
            self._take_pull()  # what was encoded before the end goes out as it would have at once
            self._done = True
            if self._flush_by is None:
                self._flush_by = -math.inf
            if self._writer_scope is not None:
                self._writer_scope.deadline = self._flush_by
        if self._drained is not None:
            self._drained.set()
        self._reading.set()
        self._wake.set()

    async def _writer(self) -> None:
        """The only task that sends.  It is shielded from the connection's cancellation, so that a
        send is never cut in the middle of a frame by it; once the connection is over it stops at
        the deadline ``_finished`` set (at once, or after the grace for a GOODBYE)."""
        stream = self.stream
        assert stream is not None
        with anyio.CancelScope(shield=True) as scope:
            self._writer_scope = scope
            if self._done:
                scope.deadline = self._flush_by if self._flush_by is not None else -math.inf
            try:
                while True:
                    while not self._chunks:
                        if self._pull is not None:
                            self._take_pull()
                            continue
                        if self._done:
                            return
                        await self._wake.wait()
                        self._wake = anyio.Event()
                    chunks, self._chunks = self._chunks, []
                    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    self._size -= len(data)
                    self._in_send = len(data)
                    await stream.send(data if type(data) is bytes else bytes(data))
                    self._in_send = 0
                    if self._drained is not None and not self.blocked():
                        self._drained.set()
                        self._drained = None
                    self._take_pull()
                    if not self._chunks:
                        self.cb.writable()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.BusyResourceError, anyio.EndOfStream, OSError) as exc:
                self._in_send = 0
                self.cb.lost(ConnectionError(f"while sending: {exc!r}"))
                self.close()
            finally:
                self._writer_over = True
                self._chunks = []
                self._size = self._in_send = 0
                self._writer_done.set()

    def close(self) -> None:
        self._finished()
        if self._scope is not None:
            self._scope.cancel()

    async def aclose(self) -> None:
        """What is queued goes out first, within a second, then the stream is closed."""
        self._take_pull()
        if self._tg is not None and not self._writer_over:
            self._grace(1.0)
            self._finished()
            with anyio.move_on_after(1.0, shield=True):
                await self._writer_done.wait()
        elif self._chunks and self.stream is not None:
            chunks, self._chunks = self._chunks, []
            with anyio.move_on_after(1.0, shield=True):
                try:
                    await self.stream.send(b"".join(chunks))
                except Exception:
                    pass
        with anyio.CancelScope(shield=True):
            await self.release()
        self.close()

    async def release(self) -> None:
        self._finished()
        if self.stream is not None:
            try:
                await self.stream.aclose()
            except Exception:
                pass
        elif self._sock is not None:
            self._sock.close()


class MockIO:
    """A driver without a socket: what one side writes is fed to its peer on the next turn of the
    event loop (asyncio), in order.  ``MockIO.pair()`` gives the two ends of one connection.

    It behaves like a socket with a send buffer: what this end wrote and the peer has not taken yet
    (in flight, or waiting while the peer's reading is paused) is ``buffered()``; above the
    high-water mark the writer is ``blocked()`` and producers wait in ``wait_writable()``, until the
    peer has taken enough (then the connection is told ``writable()``).

    For runtime tests: ``written`` keeps what this side wrote (with ``keep_written``),
    ``feed_raw(data)`` feeds bytes as if the peer had sent them, ``sever()`` loses the connection,
    and reading can be paused like a socket's (``reading``; what arrives meanwhile waits, in order).
    """

    passes_fds = False
    immediate = True
    open_waits = False

    def __init__(self, high: int = 1024 * 1024) -> None:
        self.cb: Callbacks | None = None
        self.peer: MockIO | None = None
        self.high = high
        self.written: list[bytes] = []
        self.keep_written = False
        self.reading = True  # False while the connection has paused reading
        self._inbox: collections.deque[tuple[bytes, bool]] = collections.deque()  # (data, written by the peer)
        self._unread = 0  # bytes this end wrote that the peer has not taken yet
        self._drained: anyio.Event | None = None
        self._closed = False
        self._ended: anyio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def pair(cls) -> tuple[MockIO, MockIO]:
        a, b = cls(), cls()
        a.peer, b.peer = b, a
        return a, b

    def bind(self, cb: Callbacks, high: int) -> None:
        """Called by the connection that uses this driver."""
        self.cb = cb
        self.high = high

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ended = anyio.Event()

    def tls_object(self) -> Any:
        return None

    def write(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        if self._closed:
            return
        data = bytes(data)
        if self.keep_written:
            self.written.append(data)
        peer = self.peer
        if peer is not None and self._loop is not None:
            self._unread += len(data)
            self._loop.call_soon(peer._receive, data, True)

    def write_last(self, data: bytes | bytearray) -> None:
        self.write(data)

    def flush_soon(self, flush: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_soon(flush)

    def feed_raw(self, data: bytes) -> None:
        """Bytes as if the peer had sent them (``b""``: it closed); they wait while reading is paused."""
        self._receive(bytes(data), False)

    def _receive(self, data: bytes, from_peer: bool) -> None:
        if self._closed or self.cb is None:
            self._taken_by_peer(data, from_peer)  # dropped, as a closed socket's would be
            return
        if not self.reading or self._inbox:
            self._inbox.append((data, from_peer))  # after what arrived before it
            return
        self._take(data, from_peer)

    def _take(self, data: bytes, from_peer: bool) -> None:
        assert self.cb is not None
        ok = self.cb.feed(data)
        self._taken_by_peer(data, from_peer)
        if not ok or not data:
            self.close()

    def _taken_by_peer(self, data: bytes, from_peer: bool) -> None:
        """``data``, written by the peer, is no longer in its send buffer."""
        peer = self.peer
        if from_peer and peer is not None:
            peer._taken(len(data))

    def _taken(self, n: int) -> None:
        was_blocked = self.blocked()
        self._unread -= n
        if was_blocked and not self.blocked():
            self._wake_writers()
            if self.cb is not None and not self._closed:
                self.cb.writable()

    def _wake_writers(self) -> None:
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    def blocked(self) -> bool:
        return self._unread > self.high

    def buffered(self) -> int:
        return self._unread

    async def wait_writable(self) -> None:
        while self.blocked() and not self._closed:
            if self._drained is None:
                self._drained = anyio.Event()
            await self._drained.wait()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        """Read again; what waited is fed on the next turn of the loop (as a socket becomes readable)."""
        if self.reading:
            return
        self.reading = True
        if self._inbox and self._loop is not None:
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        while self._inbox and self.reading and not self._closed:
            data, from_peer = self._inbox.popleft()
            self._take(data, from_peer)

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        assert self._ended is not None
        await self._ended.wait()

    def done(self) -> bool:
        return self._closed

    def sever(self, exc: BaseException | None = None) -> None:
        """Lose the connection, as a transport failing would (both ends see it)."""
        if self.cb is not None and not self._closed:
            self.cb.lost(exc or ConnectionResetError("severed"))
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ended is not None:
            self._ended.set()
        self._wake_writers()
        inbox = list(self._inbox)
        self._inbox.clear()
        for data, from_peer in inbox:
            self._taken_by_peer(data, from_peer)
        peer = self.peer
        if peer is not None and self._loop is not None:
            self._loop.call_soon(peer._receive, b"", False)

    async def aclose(self) -> None:
        self.close()

    async def release(self) -> None:
        self.close()


def open_driver(
    transport: Any,
    cb: Callbacks,
    *,
    high: int,
    client: bool,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    handshake_timeout: float,
) -> IO:
    """The driver for ``transport`` (a connected socket, an anyio byte stream, or a ``MockIO``) on
    the event loop this runs on."""
    if isinstance(transport, MockIO):
        transport.bind(cb, high)
        return transport
    try:
        asyncio.get_running_loop()
        on_asyncio = True
    except RuntimeError:
        on_asyncio = False  # another backend (trio): anyio streams
    if on_asyncio and isinstance(transport, socket.socket):
        if transport.family == socket.AF_UNIX:
            return UnixIO(cb, transport, high)
        return AsyncioIO(cb, transport, high, client, ssl_context, server_hostname, handshake_timeout)
    return StreamIO(cb, transport, high, client, ssl_context, server_hostname)


class Link:
    """The write side of one connection, shared by its parts (calling, serving, streams).

    Frames the core encodes go out through the driver: ``kick()`` makes sure they are written soon
    (all frames encoded until then leave in one write), ``flush()`` writes them now.  Producers
    wait in ``wait_drained()`` while the peer is behind (``out_full()``).  ``failure`` is why the
    connection ended (or None), ``closing``/``closed`` its state.
    """

    __slots__ = ("core", "io", "fds", "high", "loop", "tg", "flush_scheduled", "failure", "closing", "closed", "ended")

    def __init__(self, core: ProtocolCore, fds: FdTable, high: int) -> None:
        self.core = core
        self.io: IO | None = None  # set once the connection runs
        self.fds = fds
        self.high = high
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tg: anyio.abc.TaskGroup | None = None
        self.flush_scheduled = False
        self.failure: BaseException | None = None
        self.closing = False
        self.closed = anyio.Event()
        self.ended = False  # ``closed`` is set (read on every call, cheaper than asking the event)

    def kick(self) -> None:
        """Write what the core has encoded soon (coalescing every frame encoded until then)."""
        io = self.io
        if io is None:
            return  # written once the connection runs
        if io.immediate:
            if not self.flush_scheduled:
                self.flush_scheduled = True
                self.loop.call_soon(self.flush)  # type: ignore[union-attr]
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            io.flush_soon(self.flush)

    def flush(self) -> None:
        """Write what the core has encoded, now."""
        self.flush_scheduled = False
        io = self.io
        if io is None:
            return
        data = self.core.data_to_send()
        if data:
            io.write(data, self.fds.take_outgoing())

    def send_now(self) -> None:
        """What was just encoded leaves now if nothing could join it, else soon."""
        io = self.io
        if io is not None and io.immediate and not self.fds.outgoing:
            self.flush()
        else:
            self.kick()

    def out_full(self) -> bool:
        """Is what we owe the peer above the high-water mark (the peer does not read fast enough)?"""
        io = self.io
        return self.core.out_size > self.high or (io is not None and io.blocked()) or len(self.fds.outgoing) > UnixIO.MAX_FDS

    def unsent(self) -> int:
        """Bytes encoded for the peer and not yet taken by the kernel."""
        io = self.io
        return self.core.out_size + (io.buffered() if io is not None else 0)

    async def wait_drained(self) -> None:
        """Wait while the peer is behind; raise if the connection ends meanwhile."""
        if self.closed.is_set():
            raise self.failure or _invalidated()
        self.flush()
        io = self.io
        if io is None:
            return
        await io.wait_writable()
        if io.done():
            raise self.failure or _interrupted()

    def fail(self, exc: BaseException) -> None:
        """End the connection with ``exc`` (unless it already failed)."""
        if self.failure is None:
            self.failure = exc
        if self.tg is not None:
            self.tg.cancel_scope.cancel()

    def goodbye_now(self, reason: str, code: int) -> None:
        """Tell the peer why we drop the connection (best effort), then let it end."""
        try:
            self.core.say_goodbye(reason[:200], code)
        except Exception:
            return
        data = self.core.data_to_send()
        if data and self.io is not None:
            self.io.write_last(data)


def _invalidated() -> BaseException:
    return ConnectionInvalidated("the connection is closed")


def _interrupted() -> BaseException:
    return ConnectionInterrupted("the connection was lost")
