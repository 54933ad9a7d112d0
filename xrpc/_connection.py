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
import ssl
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

import anyio
import anyio.abc

from ._calls import Calls, CallStream, Promise
from ._errors import (
    ConnectionInterrupted,
    ConnectionInvalidated,
    LocalProtocolError,
    MethodNotFound,
    PeerRejected,
    TransportError,
    ValidationError,
)
from ._fds import FdTable
from ._interface import InterfaceDescription, MethodDescription
from ._io import Link, frame_buffers, open_driver
from ._middleware import CallContext, Middleware, call_metadata, current_metadata
from ._objects import Export, ObjectTable, make_export
from ._peer import Peer, close_pidfd
from ._limits import Limits
from ._protocol import ErrorCode, ExportInfo, ProtocolCore, State, conn_window_for
from ._proxy import cached_proxy, check_compat
from ._reading import Reader
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


def event_callback(fn: Callable[[], Any], where: str) -> None:
    """Call an ``on_interrupted``/``on_invalidated`` callback: a plain function; what it raises is logged."""
    try:
        res = fn()
        if inspect.isawaitable(res):
            res.close()  # type: ignore[attr-defined]
            log.warning("connection callbacks must be plain functions; %r returned an awaitable", fn)
    except Exception:
        log.exception("%s: callback %r failed", where, fn)


def current_connection() -> Connection:
    """The connection whose call is being served (inside a remote method)."""
    try:
        return _current.get()
    except LookupError:
        raise LookupError("xrpc.current_connection() is only available inside a remote method") from None


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
        calls = self._calls = Calls(self, core, link, flow, sender, None, middleware, url=url)
        objects = self._objects = ObjectTable(calls, limits.max_objects, self._fds, self._release_remote)
        calls.objects = objects
        # what the peer must satisfy to be served at all: on a server its requirement, on a client
        # what the server must satisfy; checked at the handshake and again by Serving.authorize
        reader = self._reader = Reader(self, core, link, flow, objects, self._fds, limits, client)
        self._serving = Serving(
            self, core, link, flow, sender, objects, middleware,
            limits=limits,
            exports=dict(exports or {}),
            shared=shared_exports if shared_exports is not None else {},
            requirement=requirement,
            room_for=reader.room_for,
            answered=reader.answered,
        )
        reader.on_call = self._serving.on_call
        core.exports = [e.info() for e in self._serving.all_exports()]
        self._requirement = requirement
        self._loop_thread = threading.get_ident()
        self._proxies: dict[tuple[int, str, float | None], Any] = {}
        self._compat_cache: dict[tuple[int, str], Any] = {}
        self._ping_nonce = 0
        self._admitted = False  # (server) WELCOME sent by admit_at_hello
        # (server) admit_at_hello's admission, handed to the reader once the peer's facts are final
        self._admit_now: Callable[[], None] | None = None

    # -------------------------------------------------------------- public surface
    def proxy(self, iface: Callable[..., _T], name: str = "", timeout: float | None = None) -> _T:
        """A proxy typed as ``iface`` for the object the peer exports under ``name``."""
        return cached_proxy(self._proxies, self._calls, iface, name, timeout, self._compat)  # type: ignore[no-any-return]

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
        pings = self._reader.pings
        event = pings[nonce] = anyio.Event()
        start = anyio.current_time()
        self._core.send_ping(nonce)
        self._link.kick()
        try:
            with anyio.fail_after(timeout) if timeout is not None else contextlib.nullcontext():
                await event.wait()
        finally:
            pings.pop(nonce, None)
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
    def admit_at_hello(self, requirement: Any) -> None:
        """Server side, for a server without ``on_connect``: admit the peer in the read that brings
        its HELLO (WELCOME goes out in the same write as the answers to the calls read with it),
        rather than once ``admit`` has been woken.  Anything but a plain admission (no HELLO, a
        requirement the peer fails, a WELCOME that does not fit) is left to ``admit``."""

        def now() -> None:
            core = self._core
            if requirement is not None and not self._serving.satisfies(requirement):
                return
            core.exports = self._serving.announced()
            try:
                core.send_welcome()
            except LocalProtocolError:
                return  # refused by ``admit``
            self._fds.admitted = True  # (only once WELCOME went out)
            self._admitted = True
            self._reader.open_gate()

        # The reader gets it once ``run`` has the peer's certificate: a TLS driver may hand over
        # the HELLO read with the last handshake message before that.  A HELLO read earlier is
        # admitted by ``admit``.
        self._admit_now = now

    async def admit(self, requirement: Any, on_connect: Callable[[Connection], Any] | None) -> None:
        """Server side, once the connection runs: wait for HELLO, check the peer against
        ``requirement``, run ``on_connect`` (False refuses), then answer WELCOME and open the gate.
        A peer that is refused gets GOODBYE and the connection is closed."""
        core = self._core
        name = self.peer.describe()
        if not self._admitted:
            with anyio.move_on_after(self.limits.handshake_timeout):
                await self._reader.handshake.wait()
        self._reader.admit_now = None  # from here on, admitted (or refused) here
        if self._admitted:
            return
        if not core.peer_version or core.state != State.HANDSHAKE:
            if not self.closed:
                log.info("no handshake from %s within %.1fs; closing", name, self.limits.handshake_timeout)
                await self.aclose()
            else:
                log.info("connection from %s ended before its handshake: %s", name, self._link.failure)
            return
        if requirement is not None and not self._serving.satisfies(requirement):
            log.warning("refused connection from %s: %s", name, requirement.explain(self.peer))
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
                log.exception("on_connect failed for %s; refusing the connection", name)
                ok = False
            if ok is False:
                log.info("connection from %s refused by on_connect", name)
                core.send_goodbye("the connection was refused", ErrorCode.PEER_REJECTED)
                await self.aclose()
                return
        if self.closed:
            return
        core.exports = self._serving.announced()  # only what this peer may call
        try:
            core.send_welcome()
        except LocalProtocolError as exc:  # the peer announced a max_frame too small for our WELCOME
            log.warning("connection from %s refused: %s", name, exc)
            core.send_goodbye(f"the WELCOME does not fit the peer's max_frame: {exc}", ErrorCode.LIMIT)
            await self.aclose()
            return
        self._reader.open_gate()
        self._link.kick()

    async def handshake(self, limit: float) -> BaseException | None:
        """Client side, once the connection runs: wait up to ``limit`` seconds for WELCOME.  None
        once the connection is open (it is handed out), else why it failed."""
        try:
            with anyio.fail_after(limit):
                await self._reader.handshake.wait()
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
        reader = self._reader
        try:
            try:
                link.loop = asyncio.get_running_loop()
            except RuntimeError:
                link.loop = None  # another backend (trio)
            serving = self._serving
            serving.plain = link.loop is not None and not serving.middleware and serving.requirement is None
            io = open_driver(
                self._transport,
                reader,
                high=self.limits.write_buffer_high,
                client=self.client,
                ssl_context=self._ssl,
                server_hostname=self._server_hostname,
                handshake_timeout=self.limits.handshake_timeout,
            )
            link.io = io
            core.buffers = frame_buffers()  # this thread's: the connection reads on it from now on
            self._fds.passes = io.passes_fds
            try:
                if io.open_waits:
                    with anyio.fail_after(self.limits.handshake_timeout):
                        await io.open()
                else:
                    await io.open()  # nothing to wait for: no timer (it costs a connection's set-up)
            except (ssl.SSLError, OSError, TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                what = "TLS handshake" if self._ssl is not None else "connection set-up"
                link.failure = TransportError(f"{self.url or self.peer.describe()}: {what} failed: {exc}")
                raise link.failure from None
            self.peer = peer_with_certificate(self.peer, io.tls_object())
            if self._admit_now is not None:
                reader.admit_now, self._admit_now = self._admit_now, None
            req = self._requirement
            if self.client and req is not None and not self._serving.satisfies(req):
                # checked before HELLO: a refused server never reaches this side's exports
                log.warning("the server at %s does not satisfy the requirement: %s", self.url, req.explain(self.peer))
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
        reader = self._reader
        reader.last_rx = time.monotonic()
        while True:
            await anyio.sleep(idle / 4)
            quiet = time.monotonic() - reader.last_rx
            if quiet >= idle and not self.in_flight:
                log.info("closing %s after %.1fs without traffic", self.peer.describe(), quiet)
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
        close_pidfd(self.peer)  # (if it was opened) valid while the connection is open
        reader = self._reader
        if reader.gate:
            reader.gate.clear()
        link.ended = True
        link.closed.set()
        reader.handshake.set()
        for event in reader.pings.values():
            event.set()
        if not self._handed_out:
            return  # connect() raised: the caller never had this connection
        if interrupted and self._on_interrupted is not None:
            event_callback(self._on_interrupted, "connection")
        if self._on_invalidated is not None:
            event_callback(self._on_invalidated, "connection")

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
