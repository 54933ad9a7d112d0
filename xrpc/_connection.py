"""The runtime: one ``Connection`` drives one ``ProtocolCore`` over one I/O driver.

Theory of operation
-------------------
A connection is a small assembly of parts, each in its own module:

- the driver (``_io``) moves bytes and calls back ``_feed``/``_feed_big`` as they arrive;
- the sans-IO core (``_protocol``) turns bytes into frames and frames into bytes, and keeps the
  protocol legal;
- ``Link`` (``_io``) is the write side every part shares: frames encoded between two writes leave
  as one (coalesced) write;
- ``Calls`` (``_calls``) makes calls, ``Serving`` (``_serving``) serves the peer's, streams and
  credit live in ``_streams``, objects passed by reference in ``_objects``;
- this module keeps the lifecycle, the reading side (dispatch, back-pressure, the memory budget,
  the ``on_connect`` gate) and the public surface.

Dispatch is synchronous as bytes arrive: every frame about a call goes to its ``CallHandler``
(``rec.handler``), a CALL to ``Serving.on_call``.  Frames that start work on this side (the peer's
calls and everything about them) wait behind a *gate* until ``on_connect`` (server) has finished,
so nothing the peer sends early is lost or handled before the handler that should see it is in
place.  A peer that sends requests without reading the answers stops being read.

What this module must not do: decide protocol legality (the core does), know about sockets (the
drivers do) or URLs (the transports do).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import math
import os
import ssl
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

import anyio
import anyio.abc
import msgspec

from ._calls import Calls, CallStream, Promise
from ._codes import failure_from_goodbye
from ._errors import (
    ConnectionInterrupted,
    ConnectionInvalidated,
    Error,
    LimitExceeded,
    LocalProtocolError,
    MethodNotFound,
    PeerRejected,
    RemoteProtocolError,
    TransportError,
    ValidationError,
)
from ._fds import FdTable
from ._interface import InterfaceDescription, MethodDescription, describe
from ._io import Callbacks, Link, open_driver
from ._middleware import CallContext, Middleware, call_metadata, current_metadata
from ._objects import Export, ObjectTable, make_export
from ._peer import Peer
from ._protocol import (
    ITEM_OVERHEAD,
    Call,
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
    Release,
    Reply,
    State,
    Welcome,
    conn_window_for,
)
from ._protocol import Error as ErrorFrame
from ._proxy import check_compat, make_proxy
from ._serving import Serving
from ._streams import FlowControl, StreamSender
from ._tls import peer_with_certificate

__all__ = (
    "CallContext",
    "CallStream",
    "Connection",
    "Limits",
    "Middleware",
    "Promise",
    "call_metadata",
    "current_connection",
    "current_metadata",
)

log = logging.getLogger("xrpc")
_T = TypeVar("_T")

_current: contextvars.ContextVar[Connection] = contextvars.ContextVar("xrpc_connection")


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


_EMPTY: Any = object()


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
        limits = self.limits = limits or Limits()
        self.client = client
        self.peer = peer
        self.url = url
        self._transport = transport  # a connected socket, an anyio ByteStream, or a MockIO
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._on_interrupted = on_interrupted
        self._on_invalidated = on_invalidated
        self._handed_out = not client  # a client connection is handed out once connect() returns it
        core = self._core = ProtocolCore(
            client=client,
            max_frame=limits.max_frame,
            window=limits.window,
            window_bytes=limits.window_bytes,
            handshake_max_frame=limits.handshake_max_frame,
            conn_window=conn_window_for(limits.max_buffered, limits.max_frame),
        )
        # a server accepts descriptors once the peer passed its requirement
        self._fds = FdTable(limits.max_fds, admitted=client)
        link = self._link = Link(core, self._fds, limits.write_buffer_high)
        flow = self._flow = FlowControl(core, link, limits.max_buffered)
        sender = StreamSender(core, link, flow)
        calls = self._calls = Calls(self, core, link, flow, sender, None, middleware, url)
        objects = self._objects = ObjectTable(calls, limits.max_objects, self._fds, self._release_remote)
        calls.objects = objects
        # what the peer must satisfy to be served at all: on a server its requirement, on a client
        # what the server must satisfy; checked at the handshake and again by Serving.authorize
        self._serving = Serving(
            self, core, link, flow, sender, objects, limits, dict(exports or {}),
            shared_exports if shared_exports is not None else {}, requirement, middleware, self._room_for, self._answered,
        )
        core.exports = [e.info() for e in self._serving.all_exports()]
        self._requirement = requirement
        # reading: frames behind the gate, frames read but held back while the peer does not read
        # our answers, bytes of answers owed since the peer last caught up (see _peer_behind)
        self._gate: list[tuple[Any, Any]] | None = None if client else []
        self._gate_held = 0
        self._backlog: list[tuple[Any, Any]] | None = None
        self._owed = 0
        self._handshake = anyio.Event()
        self._last_rx = 0.0
        self._loop_thread = threading.get_ident()
        self._proxies: dict[tuple[int, str, float | None], Any] = {}
        self._compat_cache: dict[tuple[int, str], Any] = {}
        self._pings: dict[int, anyio.Event] = {}
        self._ping_nonce = 0

    # -------------------------------------------------------------- public surface
    def proxy(self, iface: Callable[..., _T], name: str = "", timeout: float | None = None) -> _T:
        """A proxy typed as ``iface`` for the object the peer exports under ``name``."""
        desc = describe(iface)
        key = name or desc.name
        cache_key = (id(desc), key, timeout)
        p = self._proxies.get(cache_key)
        if p is None:
            p = make_proxy(self._calls, desc, key, timeout, self._compat(desc, key))
            self._proxies[cache_key] = p
        return p  # type: ignore[no-any-return]

    def _compat(self, desc: InterfaceDescription, key: str) -> dict[str, Any] | None:
        """Compare ``desc`` with what the peer announced for ``key``: None when they agree (or the
        peer said nothing), else per method what ``check_compat`` must check before sending."""
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

    # the Caller contract (proxies of this connection call ``Calls`` directly)
    async def call_unary(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        """A unary call to the peer's object ``obj``: its decoded reply."""
        return await self._calls.call_unary(obj, m, args, kwargs, timeout)

    async def call_oneway(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A one-way call: sent, never answered."""
        await self._calls.call_oneway(obj, m, args, kwargs)

    async def call_client_stream(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        """A call whose stream argument is sent item by item: its decoded reply."""
        return await self._calls.call_client_stream(obj, m, args, kwargs, timeout)

    def call_stream(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> CallStream[Any]:
        """A server or two-way stream; the call starts on the first iteration."""
        return self._calls.call_stream(obj, m, args, kwargs, timeout)

    def call_pipelined(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Promise:
        """A unary call sent now whose result can be pipelined on (``xrpc.pipeline``)."""
        return self._calls.call_pipelined(obj, m, args, kwargs, timeout)

    def export(self, iface: Any, obj: Any, name: str = "", *, requirement: Any = None) -> None:
        """Serve ``obj`` as ``iface`` to this connection's peer, under ``name``."""
        e = make_export(iface, obj, name, requirement)
        self._serving.exports[e.name] = e

    def unexport(self, name: str) -> None:
        self._serving.exports.pop(name, None)

    def visible_exports(self) -> list[tuple[Export, ExportInfo]]:
        """The exports this connection's peer may call, each with what is announced of it (only the
        methods the peer may call)."""
        announced = {info.name: info for info in self._serving.announced()}
        return [(e, announced[e.name]) for e in self._serving.all_exports() if e.name in announced]

    @property
    def closed(self) -> bool:
        return self._link.closed.is_set() or self._link.closing

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip a PING to the peer; the time it took, in seconds.  ``TimeoutError`` if no
        PONG comes within ``timeout``; ``ConnectionInterrupted`` if the connection ends meanwhile."""
        self._calls.check_open()
        self._ping_nonce += 1
        nonce = self._ping_nonce
        event = self._pings[nonce] = anyio.Event()
        start = anyio.current_time()
        self._core.send_ping(nonce)
        self._link.kick()
        try:
            with anyio.fail_after(timeout) if timeout is not None else contextlib.nullcontext():
                await event.wait()
        finally:
            self._pings.pop(nonce, None)
        failure = self._link.failure
        if self._link.closed.is_set() and failure is not None:
            raise type(failure)(*failure.args)
        return anyio.current_time() - start

    def interrupt(self, reason: str) -> None:
        """End the connection as interrupted (the peer went silent, say): outstanding calls fail
        with ``ConnectionInterrupted``."""
        link = self._link
        link.closing = True
        link.fail(ConnectionInterrupted(reason))
        if link.io is not None:
            link.io.close()

    @property
    def in_flight(self) -> int:
        """Calls in progress on this connection, both directions."""
        return self._serving.serving + len(self._core.outgoing)

    @property
    def peer_exports(self) -> list[ExportInfo]:
        return list(self._core.peer_exports)

    @property
    def exported_objects(self) -> int:
        """How many objects this side currently exports to the peer by reference."""
        return len(self._objects)

    @property
    def remote_refs(self) -> int:
        """How many live proxies this side holds to objects the peer passed by reference."""
        return self._objects.remote_refs

    @property
    def failure(self) -> BaseException | None:
        """Why the connection ended (None while it is open)."""
        return self._link.failure

    async def aclose(self) -> None:
        """Close for good (idempotent).  Outstanding calls fail with ``ConnectionInvalidated``."""
        link = self._link
        if link.closed.is_set():
            return
        if not link.closing:
            link.closing = True
            if link.failure is None:
                link.failure = ConnectionInvalidated("the connection was closed")
            try:
                self._core.send_goodbye("closed")
            except Exception:
                pass
            link.flush()
            if link.io is not None:
                await link.io.aclose()
            if link.tg is not None:
                link.tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await link.closed.wait()

    # -------------------------------------------------------------- admission (the handshake)
    async def admit(self, requirement: Any, on_connect: Callable[[Connection], Any] | None) -> None:
        """Server side, once the connection runs: wait for HELLO, check the peer against
        ``requirement``, run ``on_connect`` (False refuses), then answer WELCOME and open the gate.
        A peer that is refused gets GOODBYE and the connection is closed."""
        core = self._core
        name = self.peer.describe()
        with anyio.move_on_after(self.limits.handshake_timeout):
            await self._handshake.wait()
        if not core.peer_version or core.state != State.HANDSHAKE:
            if not self.closed:
                log.info("xrpc: no handshake from %s within %.1fs; closing", name, self.limits.handshake_timeout)
                await self.aclose()
            else:
                log.info("xrpc: connection from %s ended before its handshake: %s", name, self._link.failure)
            return
        if requirement is not None and not self._serving.satisfies(requirement):
            log.warning("xrpc: refused connection from %s: %s", name, requirement.explain(self.peer))
            core.send_goodbye("the connection was refused", ErrorCode.PEER_REJECTED)
            await self.aclose()
            return
        self._fds.admitted = True  # descriptors the peer sent before this point ended the connection
        if on_connect is not None:
            try:
                ok = on_connect(self)
                if inspect.isawaitable(ok):
                    ok = await ok
            except Exception:
                log.exception("xrpc: on_connect failed for %s; refusing the connection", name)
                ok = False
            if ok is False:
                log.info("xrpc: connection from %s refused by on_connect", name)
                core.send_goodbye("the connection was refused", ErrorCode.PEER_REJECTED)
                await self.aclose()
                return
        if self.closed:
            return
        core.exports = self._serving.announced()  # only what this peer may call
        try:
            core.send_welcome()
        except LocalProtocolError as exc:  # the peer announced a max_frame too small for our WELCOME
            log.warning("xrpc: connection from %s refused: %s", name, exc)
            core.send_goodbye(f"the WELCOME does not fit the peer's max_frame: {exc}", ErrorCode.LIMIT)
            await self.aclose()
            return
        self._open_gate()
        self._link.kick()

    async def handshake(self, limit: float) -> BaseException | None:
        """Client side, once the connection runs: wait up to ``limit`` seconds for WELCOME.  None
        once the connection is open (it is handed out), else why it failed."""
        try:
            with anyio.fail_after(limit):
                await self._handshake.wait()
        except TimeoutError:
            return TimeoutError(f"{self.url}: no answer to the handshake within {limit:.1f}s")
        if self._core.state != State.OPEN:
            failure = self._link.failure
            if isinstance(failure, PeerRejected):
                return PeerRejected(f"{self.url}: {failure}")
            return TransportError(f"{self.url}: the connection closed during the handshake ({failure})")
        self._handed_out = True
        return None

    # -------------------------------------------------------------- lifecycle
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until the connection ends.  Reports started once it can send and receive."""
        _current.set(self)
        link = self._link
        core = self._core
        try:
            try:
                link.loop = asyncio.get_running_loop()
            except RuntimeError:
                link.loop = None  # another backend (trio)
            io = open_driver(
                self._transport,
                Callbacks(self._feed, self._feed_big, core.big_target, self._fds_received, self._lost, self._resume_input),
                high=self.limits.write_buffer_high,
                client=self.client,
                ssl_context=self._ssl,
                server_hostname=self._server_hostname,
                handshake_timeout=self.limits.handshake_timeout,
            )
            link.io = io
            self._fds.passes = io.passes_fds
            try:
                with anyio.fail_after(self.limits.handshake_timeout):
                    await io.open()
            except (ssl.SSLError, OSError, TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                what = "TLS handshake" if self._ssl is not None else "connection set-up"
                link.failure = TransportError(f"{self.url or self.peer.describe()}: {what} failed: {exc}")
                raise link.failure from None
            self.peer = peer_with_certificate(self.peer, io.tls_object())
            req = self._requirement
            if self.client and req is not None and not self._serving.satisfies(req):
                # checked before HELLO: a refused server never reaches this side's exports
                log.warning("xrpc: the server at %s does not satisfy the requirement: %s", self.url, req.explain(self.peer))
                link.failure = PeerRejected(f"{self.url}: the server does not satisfy the requirement {req}")
                raise link.failure
            async with anyio.create_task_group() as tg:
                link.tg = tg
                if self.client:
                    core.exports = self._serving.announced()  # with the server's facts known (TLS)
                    core.send_hello()
                link.kick()
                if self.limits.idle_timeout is not None:
                    tg.start_soon(self._idle_watch, self.limits.idle_timeout)
                task_status.started()
                await io.run(tg)
                tg.cancel_scope.cancel()
        finally:
            self._finish()
            with anyio.CancelScope(shield=True):
                tasks = self._serving.tasks
                if tasks:
                    for t in list(tasks):
                        t.cancel()
                    await asyncio.wait(list(tasks))
                if link.io is not None:
                    await link.io.release()
                elif hasattr(self._transport, "close"):
                    self._transport.close()

    async def _idle_watch(self, idle: float) -> None:
        """Close the connection once nothing has been received for ``idle`` seconds and nothing is in flight."""
        self._last_rx = time.monotonic()
        while True:
            await anyio.sleep(idle / 4)
            quiet = time.monotonic() - self._last_rx
            if quiet >= idle and not self.in_flight:
                log.info("xrpc: closing %s after %.1fs without traffic", self.peer.describe(), quiet)
                self._core.send_goodbye("idle timeout", ErrorCode.LIMIT)
                await self.aclose()
                return

    def _finish(self) -> None:
        link = self._link
        if link.closed.is_set():
            return
        failure = link.failure or ConnectionInterrupted("the connection was lost")
        if not link.closing and link.failure is None:
            link.failure = failure
        interrupted = isinstance(failure, ConnectionInterrupted)
        core = self._core
        for rec in list(core.outgoing.values()):
            if rec.handler is not None:
                rec.handler.fail(failure)
        core.outgoing.clear()
        core.incoming.clear()
        self._objects.clear()
        self._fds.clear()
        if self.peer.pidfd is not None:
            try:
                os.close(self.peer.pidfd)  # valid while the connection is open
            except OSError:
                pass
        if self._gate:
            self._gate.clear()
        link.closed.set()
        self._handshake.set()
        for event in self._pings.values():
            event.set()
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

    def _release_remote(self, oid: str) -> None:
        """A proxy to the peer's object ``oid`` is gone: tell the exporter (from any thread)."""
        link = self._link
        if link.closed.is_set() or link.closing:
            return
        if threading.get_ident() != self._loop_thread:
            loop = link.loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._release_remote_now, oid)
                except RuntimeError:
                    pass
            return
        self._release_remote_now(oid)

    def _release_remote_now(self, oid: str) -> None:
        link = self._link
        if link.closed.is_set() or link.closing:
            return
        self._core.send_release(oid, 1)
        link.kick()

    # -------------------------------------------------------------- the driver's callbacks
    def _lost(self, exc: BaseException | None) -> None:
        if self._link.failure is None:
            self._link.failure = ConnectionInterrupted(f"the connection was lost: {exc!r}" if exc else "the peer closed the connection")

    def _fds_received(self, fds: list[int], truncated: bool) -> bool:
        """Descriptors arrived (SCM_RIGHTS); see ``FdTable.received``.  Refused: GOODBYE, False."""
        refused = self._fds.received(fds, truncated)
        if refused is None:
            return True
        why, violation = refused
        log.warning("xrpc: %s from %s; closing the connection", why, self.peer.describe())
        if self._link.failure is None:
            self._link.failure = ConnectionInterrupted(f"the connection was closed: {why}")
        self._link.goodbye_now(why, ErrorCode.VALIDATION if violation else ErrorCode.LIMIT)
        return False

    def _feed_big(self, n: int) -> bool:
        """``n`` bytes were read straight into the core's large-frame buffer."""
        core = self._core
        size = core.big_size
        start = core.emitted
        try:
            events = core.big_received(n)
        except RemoteProtocolError as exc:
            return self._protocol_error(exc)
        self._owed += core.emitted - start
        return self._dispatch(events, size)

    def _protocol_error(self, exc: RemoteProtocolError) -> bool:
        log.warning("xrpc: protocol error from %s: %s", self.peer.describe(), exc)
        if self._link.failure is None:
            self._link.failure = ConnectionInterrupted(f"protocol error: {exc}")
        self._link.goodbye_now(str(exc), ErrorCode.VALIDATION)
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

    # -------------------------------------------------------------- dispatch and back-pressure
    def _dispatch(self, events: list[Any], nbytes: int) -> bool:
        """Handle the messages of one read of ``nbytes`` bytes (0: the peer closed)."""
        core = self._core
        link = self._link
        gate = self._gate
        if gate is not None and events and any(self._gated(msg) for msg, _ in events):
            # held behind the gate, they keep what was read alive: all of it counts
            self._gate_held += nbytes
            self._flow.held += nbytes
        if self._backlog is not None:
            self._backlog += events  # keep the order
        elif len(events) == 1 and gate is None:  # the common case, without _handle's bookkeeping
            msg, rec = events[0]
            start = core.emitted
            _HANDLERS[type(msg)](self, msg, rec)
            self._owed += core.emitted - start
        elif events:
            self._handle(events)
        if core.has_data_to_send():
            link.send_now()  # answers produced while reading leave in one write
        if not nbytes:
            if link.failure is None:
                link.failure = ConnectionInterrupted("the peer closed the connection")
            return False
        if core.state == State.CLOSED:
            backlog = self._backlog
            if backlog is not None:
                # the peer said goodbye: what it sent before still counts (one read at most)
                self._backlog = None
                self._handle(backlog, math.inf)
                if core.has_data_to_send():
                    link.kick()
            if link.failure is None:
                link.failure = failure_from_goodbye(core.close_code, core.close_reason or "closed by the peer")
            return False
        if (self._flow.held or core.receiving_big or gate is not None) and not self._within_budget():
            return self._over_budget()
        high = self.limits.write_buffer_high
        if self._backlog is not None or self._gate_held > high or (self._owed > high and self._peer_behind()):
            link.io.pause_reading()  # type: ignore[union-attr]
            self._resume_input()
        return True

    def _handle(self, events: list[Any], high: float = 0) -> None:
        """Run the handlers of ``events``; once the answers they produced pass the high-water mark,
        keep the rest for later (``_backlog``): a peer that does not read is not served more."""
        gate = self._gate
        core = self._core
        high = (high or self.limits.write_buffer_high) - self._owed
        start = core.emitted
        i = 0
        for msg, rec in events:
            i += 1
            if gate is not None and self._gated(msg):
                gate.append((msg, rec))
                continue
            _HANDLERS[type(msg)](self, msg, rec)
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
        if self._link.out_full():
            return True
        self._owed = 0  # the peer has caught up
        return False

    def _resume_input(self) -> None:
        """Serve what was held back while the peer catches up, then read again (the driver calls
        this once what was buffered for writing has gone out)."""
        link = self._link
        io = link.io
        if io is None or io.done():
            return
        while self._backlog is not None:
            link.flush()
            if link.out_full():
                return  # the driver calls again once the peer has read
            self._owed = 0  # the peer has caught up
            backlog = self._backlog
            self._backlog = None
            self._handle(backlog)
            if not self._within_budget():
                self._cut_off()
                return
        link.flush()
        if not self._peer_behind() and self._gate_held <= self.limits.write_buffer_high:
            io.resume_reading()

    def _within_budget(self) -> bool:
        """Does what the peer makes us hold (queued stream items, calls behind the gate, the
        arguments of calls in flight, a large frame being received) fit in the connection's
        memory budget?"""
        flow = self._flow
        held = flow.held
        core = self._core
        if core.receiving_big and held - flow.calls_held + core.big_size > self.limits.max_buffered:
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
        log.warning("xrpc: closing the connection of %s: %s", self.peer.describe(), reason)
        if self._link.failure is None:
            self._link.failure = LimitExceeded(reason)
        self._link.goodbye_now(reason, ErrorCode.LIMIT)
        return False

    def _cut_off(self) -> None:
        """End a connection whose peer made us hold more than the budget, outside the reader."""
        self._over_budget()
        io = self._link.io
        if io is not None:
            io.close()

    async def _room_for(self, size: int) -> bool:
        """Wait while the peer is behind with what we send, holding an answer of about ``size``
        bytes: held answers draw from the memory budget, and a peer that makes us hold more than
        it is cut off.  False if the connection is over."""
        link = self._link
        if not link.out_full():
            return True
        flow = self._flow
        flow.held += size
        try:
            if not self._within_budget():
                self._cut_off()
                return False
            await link.wait_drained()  # a peer that does not read gets no more answers meanwhile
        except Error:
            return False  # the connection is over
        finally:
            flow.held -= size
        return True

    def _answered(self, start: int) -> None:
        """A call served in a task has sent its answer (reply or error) since ``start``.  It is owed
        to the peer like the answers reading produces: past ``write_buffer_high`` unread, reading
        stops; past the memory budget unread, the peer is cut off.  (An answer is sent at once
        rather than held until the peer reads: a held result would be memory no budget sees.)"""
        self._owed += self._core.emitted - start
        if self._owed <= self.limits.write_buffer_high:
            return
        link = self._link
        if link.unsent() > self.limits.max_buffered:
            self._cut_off()
        elif link.io is not None and self._peer_behind():
            link.io.pause_reading()
            self._resume_input()  # flushes, and reads on at once if that was all; else the driver calls it again

    # -------------------------------------------------------------- the on_connect gate
    def _gated(self, msg: Any) -> bool:
        """Does ``msg`` start or concern work the peer asked of us (held until the gate opens)?"""
        call_id = getattr(msg, "id", None)
        if call_id is None:
            return type(msg) is Release
        return not self._core.is_local_id(call_id)

    def _open_gate(self) -> None:
        gate = self._gate
        self._gate = None
        self._flow.release(self._gate_held)
        self._gate_held = 0
        if gate:
            if self._backlog is not None:
                gate += self._backlog  # read after the gated frames
                self._backlog = None
            self._handle(gate)
            self._link.kick()
        self._resume_input()

    # -------------------------------------------------------------- frame handlers (synchronous, as read)
    def _on_call(self, msg: Call, rec: Any) -> None:
        self._serving.on_call(msg, rec)

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
            self._flow.conn_freed(len(msg.payload) + ITEM_OVERHEAD)

    def _on_end(self, msg: End, rec: Any) -> None:
        h = rec.handler
        if h is not None:
            h.on_end()

    def _on_credit(self, msg: Credit, rec: Any) -> None:
        if msg.conn:
            self._flow.wake_conn_waiter()
        if rec is not None and rec.handler is not None:
            rec.handler.on_credit()

    def _on_cancel(self, msg: Cancel, rec: Any) -> None:
        h = rec.handler
        if h is not None:
            h.on_cancel()

    def _on_release(self, msg: Release, rec: Any) -> None:
        self._objects.drop(msg.obj, msg.count)

    def _on_pong(self, msg: Pong, rec: Any) -> None:
        waiter = self._pings.pop(msg.nonce, None)
        if waiter is not None:
            waiter.set()

    def _on_hello(self, msg: Any, rec: Any) -> None:
        self._handshake.set()

    def _on_welcome(self, msg: Any, rec: Any) -> None:
        self._handshake.set()
        self._flow.wake_conn_waiter()  # the server's connection window is known now

    _on_goodbye = _on_hello


_HANDLERS: dict[type, Callable[[Connection, Any, Any], None]] = {
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
