"""The user-facing entry points: ``Server`` and ``connect``.

A ``Server`` holds the objects it exports and accepts connections on any number of listeners; each
accepted connection runs in the listener's task group and sees the server's exports plus its own.
``connect`` opens a client connection and yields it for an ``async with`` block; leaving the block
closes the connection and everything it owns.

Handshake order on the server: HELLO arrives, ``on_connect`` runs (the peer's calls wait behind the
gate meanwhile; calls ``on_connect`` makes to the peer already work), then WELCOME goes out and the
gate opens.  Refusing the connection sends GOODBYE with the PEER_REJECTED code.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import logging
import shutil
import signal
import ssl
import threading
import tempfile
from typing import Any, AsyncIterator, Callable, Sequence

import anyio
import anyio.abc

from ._connection import Connection, Limits, Middleware, current_connection
from ._objects import Export, exports_from, make_export
from ._errors import PeerRejected, TransportError
from ._peer import Peer, close_pidfd
from ._introspect import INTROSPECT_NAME, ExportDescription, Introspection, describe_export
from ._requirements import Requirement, requirement_of
from ._systemd import adopt_inherited, is_activation_url, open_activated, service_lifecycle
from ._transports import Endpoint, Listener, ParsedURL, connect_stream, open_listener
from ._workers import WorkerPool, check_workers, current_backend, serve_until_signalled, target_of

__all__ = ("Server", "connect", "run", "OnConnect")

log = logging.getLogger("xrpc")

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

OnConnect = Callable[[Connection], Any]


class Server:
    """Exports objects and serves them on listeners.

    ``on_connect(conn)`` (plain or ``async``) runs for every new connection before any of its calls is
    dispatched; it may inspect ``conn.peer``, ``conn.export(...)`` per-connection objects, call the
    client through ``conn.proxy(...)``, and return ``False`` to refuse the connection.
    """

    def __init__(
        self,
        on_connect: OnConnect | None = None,
        *,
        limits: Limits | None = None,
        requirement: Requirement | str | None = None,
        max_connections: int = 10000,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.on_connect = on_connect
        self.middleware = tuple(middleware)
        self.limits = limits or Limits()
        self.requirement = requirement_of(requirement)
        self.max_connections = max_connections
        self._exports: dict[str, Export] = {}
        self.connections: set[Connection] = set()
        self._exports[INTROSPECT_NAME] = make_export(Introspection, _IntrospectionService(), INTROSPECT_NAME)

    def export(self, iface: Any, obj: Any, name: str = "", *, requirement: Requirement | str | None = None) -> None:
        """Serve ``obj`` as ``iface`` under ``name`` (default: the interface's name) to every client.

        ``requirement`` guards every method of this export (on top of the server's requirement).
        """
        e = make_export(iface, obj, name, requirement_of(requirement))
        self._exports[e.name] = e

    def unexport(self, name: str) -> None:
        self._exports.pop(name, None)

    @property
    def export_names(self) -> list[str]:
        """The names this server exports under (the built-in ``xrpc.introspect`` included)."""
        return list(self._exports)

    @contextlib.asynccontextmanager
    async def listen(
        self, url: str, *, socket_mode: int = 0o600, ssl_context: ssl.SSLContext | None = None
    ) -> AsyncIterator[Listener]:
        """Listen on ``url`` for the duration of the block; ``listener.url`` is the bound address.

        ``tls://`` needs ``ssl_context`` (see ``xrpc.server_ssl_context``).  ``systemd:`` serves the
        listening sockets the service manager passed (socket activation), ``systemd:NAME`` those
        named NAME; a ``unix://`` or ``tcp://`` URL of an inherited socket's address adopts it.
        """
        activation = is_activation_url(url)
        if url.startswith("tls:") and ssl_context is None:
            raise ValueError(f"{url}: a tls:// listener needs ssl_context= (xrpc.server_ssl_context(...))")
        if ssl_context is not None and not url.startswith("tls:") and not activation:
            raise ValueError(f"{url}: ssl_context= is only for tls:// and systemd: URLs")
        if activation:
            listener: Listener = open_activated(url, tls=ssl_context is not None)
        else:
            listener = adopt_inherited(url) or await open_listener(url, socket_mode=socket_mode)
        handler = functools.partial(self._handle, ssl_context=ssl_context)
        body_exc: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, handler)
                try:
                    yield listener
                except BaseException as exc:  # re-raised below, outside the task group
                    body_exc = exc
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
        if body_exc is not None:
            raise body_exc

    @contextlib.asynccontextmanager
    async def listen_anonymous(self) -> AsyncIterator[Listener]:
        """Listen on a fresh private Unix socket; hand ``listener.endpoint`` to whoever may connect.

        The socket lives in a new directory only this user can enter, and is removed afterwards.
        """
        directory = tempfile.mkdtemp(prefix="xrpc-")
        try:
            async with self.listen(f"unix://{directory}/endpoint.sock") as listener:
                yield listener
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    async def serve(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None,
        workers: int | None = None,
        factory: Callable[[], Server] | None = None,
        drain_timeout: float = 10.0,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``url`` until cancelled.  With ``tg.start`` it reports the bound URL.

        Under a service manager (``$NOTIFY_SOCKET``) it reports ``READY=1`` once listening, pings
        the watchdog if one is set, and reports ``STOPPING=1`` when cancelled.

        ``workers=N`` (N > 1) serves from N worker processes that accept on the one socket bound
        here; this process supervises them (replaces one that dies, stops them when cancelled,
        each finishing its calls in flight within ``drain_timeout`` seconds).  A worker is a fresh
        interpreter, so it cannot receive this object: each builds its own server by calling
        ``factory``, a module-level function (or a ``functools.partial`` of one with plain
        arguments) that returns a ``Server``; with TLS, ``ssl_context`` is such a function too.
        ``factory`` is only used with ``workers`` > 1.
        """
        if workers is not None and check_workers(workers) > 1:
            if factory is None or isinstance(factory, Server):
                raise TypeError(
                    f"Server.serve(workers={workers}) runs each worker in a fresh process, which cannot receive a Server object: "
                    "pass factory=, a module-level function returning the Server (each worker calls it to build its own "
                    "exports and on_connect)"
                )
            backend, uvloop = current_backend()
            pool = WorkerPool(
                target_of(factory, "Server.serve(factory=...)"),
                workers,
                ssl_context=_ssl_target(ssl_context, workers),
                backend=backend,
                uvloop=uvloop,
                drain_timeout=drain_timeout,
            )
            await pool.serve(url, task_status=task_status)
            return
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            ssl_context = ssl_context()
        async with self.listen(url, ssl_context=ssl_context) as listener:
            async with service_lifecycle(f"serving on {listener.url}"):
                task_status.started(listener.url)
                await anyio.sleep_forever()

    async def _handle(self, stream: Any, peer: Peer, ssl_context: ssl.SSLContext | None = None) -> None:
        if len(self.connections) >= self.max_connections:
            log.warning("refused a connection from %s: already %d connections", peer.address or peer.pid, len(self.connections))
            close_pidfd(peer)
            if hasattr(stream, "close"):
                stream.close()
            else:
                await stream.aclose()
            return
        conn = Connection(
            stream,
            client=False,
            peer=peer,
            shared_exports=self._exports,
            limits=self.limits,
            ssl_context=ssl_context,
            middleware=self.middleware,
            requirement=self.requirement,
        )
        self.connections.add(conn)
        if self.on_connect is None:
            conn.admit_at_hello(self.requirement)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(conn.run)
                await conn.admit(self.requirement, self.on_connect)
        except TransportError as exc:
            log.info("connection from %s failed: %s", conn.peer.describe(), exc)
        except BaseExceptionGroup as group:
            if all(isinstance(e, TransportError) for e in group.exceptions):
                log.info("connection from %s failed: %s", conn.peer.describe(), group.exceptions[0])
            else:
                log.exception("connection from %s failed", conn.peer.describe())
        except Exception:  # pragma: no cover - a connection's failure must never reach the listener
            log.exception("connection from %s failed", conn.peer.describe())
        finally:
            self.connections.discard(conn)


def _ssl_target(ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None, workers: int) -> Any:
    """The TLS context's factory, named for the worker processes (checked by building one here)."""
    if ssl_context is None:
        return None
    if isinstance(ssl_context, ssl.SSLContext):
        raise TypeError(
            f"workers={workers}: each worker process builds its own TLS context: pass ssl_context=, a module-level function "
            "returning an ssl.SSLContext, e.g. functools.partial(xrpc.server_ssl_context, CERTFILE, KEYFILE)"
        )
    target = target_of(ssl_context, "ssl_context=")
    built = ssl_context()  # fail here, at once, on a missing certificate
    if not isinstance(built, ssl.SSLContext):
        raise TypeError(f"ssl_context=: {target.describe()} returned {type(built).__qualname__}, not an ssl.SSLContext")
    return target


def run(
    server: Server | Callable[[], Server],
    url: str,
    *,
    ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None,
    ready: Callable[[str], object] | None = None,
    backend: str = "asyncio",
    workers: int | None = None,
    drain_timeout: float = 10.0,
) -> None:
    """Serve ``server`` on ``url`` until Ctrl-C or SIGTERM, then return: the main of a server script.

    Blocks, running its own event loop (``backend``: ``"asyncio"``, ``"uvloop"`` for asyncio on
    uvloop's faster loop, which needs the ``uvloop`` package (``pip install 'xrpc[uvloop]'``), or
    ``"trio"``).  ``server`` may
    be a function returning the server: it is then called inside that loop (for objects that need
    a running loop when they are made).  ``ready(url)`` is called with the bound URL once the
    server listens (with ``tcp://127.0.0.1:0``, the port chosen), and standard output is flushed
    after it, so ``ready=print`` tells a parent process reading a pipe at once.  Ctrl-C (SIGINT)
    and SIGTERM stop it quietly: the listener closes, the connections end, the socket file is
    removed, and ``run`` returns (no ``KeyboardInterrupt``).  Inside a running event loop, use
    ``await server.serve(url)`` instead.

    ``workers=N`` (N > 1) serves from N worker processes sharing the listening socket (see
    ``Server.serve``): ``server`` must then be the module-level function that makes the server,
    which every worker calls, and ``ssl_context`` (for TLS) a function too.  The first signal
    stops accepting and lets every worker finish its calls in flight (at most ``drain_timeout``
    seconds); a second one cuts that short.
    """
    if not isinstance(server, Server) and not callable(server):
        raise TypeError(f"xrpc.run() serves an xrpc.Server, not {type(server).__qualname__}")
    backend, options = loop_backend(backend)
    if workers is not None and check_workers(workers) > 1:
        if isinstance(server, Server):
            raise TypeError(
                f"xrpc.run(server, url, workers={workers}) runs each worker in a fresh process, which cannot receive a Server "
                "object: pass the module-level function that makes it instead (xrpc.run(make_server, url, workers=...)); "
                "each worker calls it to build its own exports and on_connect"
            )
        pool = WorkerPool(
            target_of(server, "xrpc.run()"),
            workers,
            ssl_context=_ssl_target(ssl_context, workers),
            backend=backend,
            uvloop=bool(options),
            drain_timeout=drain_timeout,
        )

        def announce(bound: str) -> None:
            if ready is not None:
                ready(bound)
                if sys.stdout is not None:
                    sys.stdout.flush()

        async def supervise() -> None:
            if threading.current_thread() is not threading.main_thread():
                await serve_until_signalled(pool, url, None, announce)
                return
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                await serve_until_signalled(pool, url, received, announce)

        anyio.run(supervise, backend=backend, backend_options=options)
        return
    if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
        ssl_context = ssl_context()
    tls = ssl_context

    async def main() -> None:
        srv = server if isinstance(server, Server) else server()
        if not isinstance(srv, Server):
            raise TypeError(f"xrpc.run(): {server!r} returned {type(srv).__qualname__}, not an xrpc.Server")
        if threading.current_thread() is not threading.main_thread():
            signals: Any = contextlib.nullcontext(None)  # signals reach the main thread only
        else:
            signals = anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        with signals as received:
            async with srv.listen(url, ssl_context=tls) as listener:
                log.info("serving %s on %s", ", ".join(n for n in srv.export_names if n != INTROSPECT_NAME), listener.url)
                if ready is not None:
                    ready(listener.url)
                    if sys.stdout is not None:
                        sys.stdout.flush()
                if received is None:
                    await anyio.sleep_forever()
                async for _ in received:
                    break

    anyio.run(main, backend=backend, backend_options=options)


def loop_backend(name: str) -> tuple[str, dict[str, Any]]:
    """anyio's backend and its options for ``name``: ``"asyncio"``, ``"uvloop"`` or ``"trio"``."""
    if name == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise ImportError("the uvloop event loop needs the uvloop package: pip install 'xrpc[uvloop]'") from None
        return "asyncio", {"use_uvloop": True}
    if name not in ("asyncio", "trio"):
        raise ValueError(f"backend={name!r}: the event loop is 'asyncio', 'uvloop' or 'trio'")
    return name, {}


class _IntrospectionService:
    async def exports(self) -> list[ExportDescription]:
        conn = current_connection()
        # only what this peer may call: an export it may not call is left out, and so is a method
        return [describe_export(e.name, e.desc, set(info.methods)) for e, info in conn.visible_exports() if e.name != INTROSPECT_NAME]


@contextlib.asynccontextmanager
async def connect(
    url: str | Endpoint,
    *,
    exports: Sequence[Any] = (),
    timeout: float | None = None,
    on_interrupted: Callable[[], Any] | None = None,
    on_invalidated: Callable[[], Any] | None = None,
    limits: Limits | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    requirement: Requirement | str | None = None,
    middleware: Sequence[Middleware] = (),
) -> AsyncIterator[Connection]:
    """Connect to ``url`` and yield the connection for the block.

    ``exports`` (``(Iface, obj)`` or ``(Iface, obj, name)`` tuples) are in place before the handshake,
    so a server that calls back at once loses nothing.  ``timeout`` bounds connecting and the
    handshake (``TimeoutError``).  ``on_interrupted`` fires once if the peer goes away;
    ``on_invalidated`` once when the connection ends for good.  ``tls://`` URLs use ``ssl_context``
    (default: the system's trusted CAs, with hostname checks).  ``requirement`` is checked against the
    server's identity (kernel credentials or certificate); a server that fails it is refused with
    ``PeerRejected`` before any call is sent.
    """
    if isinstance(url, Endpoint):
        url = url.url
    limits = limits or Limits()
    req = requirement_of(requirement)
    is_tls = url.startswith("tls:")
    if is_tls and ssl_context is None:
        ssl_context = ssl.create_default_context()
    if is_tls and server_hostname is None:
        server_hostname = ParsedURL(url).host
    export_map = exports_from(exports)
    limit = timeout if timeout is not None else limits.handshake_timeout
    with anyio.fail_after(limit):
        stream, peer = await connect_stream(url)
    conn = Connection(
        stream,
        client=True,
        peer=peer,
        exports=export_map,
        limits=limits,
        on_interrupted=on_interrupted,
        on_invalidated=on_invalidated,
        url=url,
        ssl_context=ssl_context if is_tls else None,
        server_hostname=server_hostname,
        middleware=middleware,
        requirement=req,
    )
    body_exc: BaseException | None = None
    failed: BaseException | None = None
    async with anyio.create_task_group() as tg:
        try:
            await tg.start(conn.run)
        except (TransportError, PeerRejected) as exc:
            failed = exc
        except BaseExceptionGroup as group:
            inner = [e for e in group.exceptions if isinstance(e, (TransportError, PeerRejected))]
            if not inner:
                raise
            failed = inner[0]
        if failed is None:
            failed = await conn.handshake(limit)
        if failed is not None:
            await conn.aclose()
            tg.cancel_scope.cancel()
        else:
            try:
                yield conn
            except BaseException as exc:  # re-raised below, outside the task group
                body_exc = exc
            finally:
                await conn.aclose()
                tg.cancel_scope.cancel()
    if failed is not None:
        raise failed
    if body_exc is not None:
        raise body_exc
