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
import inspect
import logging
from typing import Any, AsyncIterator, Callable, Sequence

import anyio
import anyio.abc

from ._connection import Connection, Export, Limits, _exports_from, make_export
from ._errors import PeerRejected, TransportError
from ._peer import Peer
from ._protocol import ErrorCode, State
from ._transports import Listener, connect_stream, open_listener

__all__ = ("Server", "connect", "OnConnect")

log = logging.getLogger("xrpc")

OnConnect = Callable[[Connection], Any]


class Server:
    """Exports objects and serves them on listeners.

    ``on_connect(conn)`` (plain or ``async``) runs for every new connection before any of its calls is
    dispatched; it may inspect ``conn.peer``, ``conn.export(...)`` per-connection objects, call the
    client through ``conn.proxy(...)``, and return ``False`` to refuse the connection.
    """

    def __init__(self, on_connect: OnConnect | None = None, *, limits: Limits | None = None) -> None:
        self.on_connect = on_connect
        self.limits = limits or Limits()
        self._exports: dict[str, Export] = {}
        self.connections: set[Connection] = set()

    def export(self, iface: Any, obj: Any, name: str = "") -> None:
        """Serve ``obj`` as ``iface`` under ``name`` (default: the interface's name) to every client."""
        e = make_export(iface, obj, name)
        self._exports[e.name] = e

    def unexport(self, name: str) -> None:
        self._exports.pop(name, None)

    @contextlib.asynccontextmanager
    async def listen(self, url: str, *, socket_mode: int = 0o600) -> AsyncIterator[Listener]:
        """Listen on ``url`` for the duration of the block; ``listener.url`` is the bound address."""
        listener = await open_listener(url, socket_mode=socket_mode)
        body_exc: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, self._handle)
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

    async def serve(self, url: str, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``url`` until cancelled.  With ``tg.start`` it reports the bound URL."""
        async with self.listen(url) as listener:
            task_status.started(listener.url)
            await anyio.sleep_forever()

    async def _handle(self, stream: Any, peer: Peer) -> None:
        conn = Connection(stream, client=False, peer=peer, shared_exports=self._exports, limits=self.limits)
        self.connections.add(conn)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(conn.run)
                await self._handshake(conn)
        except Exception:  # pragma: no cover - a connection's failure must never reach the listener
            log.exception("xrpc: connection from %s failed", conn._peer_name())
        finally:
            self.connections.discard(conn)

    async def _handshake(self, conn: Connection) -> None:
        with anyio.move_on_after(self.limits.handshake_timeout):
            await conn._handshake.wait()
        core = conn._core
        if not core.peer_version or core.state != State.HANDSHAKE:
            if not conn.closed:
                log.info("xrpc: no handshake from %s within %.1fs; closing", conn._peer_name(), self.limits.handshake_timeout)
                await conn.aclose()
            return
        if self.on_connect is not None:
            try:
                ok = self.on_connect(conn)
                if inspect.isawaitable(ok):
                    ok = await ok
            except Exception:
                log.exception("xrpc: on_connect failed for %s; refusing the connection", conn._peer_name())
                ok = False
            if ok is False:
                log.info("xrpc: connection from %s refused by on_connect", conn._peer_name())
                core.send_goodbye("the connection was refused", ErrorCode.PEER_REJECTED)
                await conn.aclose()
                return
        if conn.closed:
            return
        core.exports = [e.info() for e in conn._all_exports()]
        core.send_welcome()
        conn._open_gate()
        conn._kick()


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    exports: Sequence[Any] = (),
    timeout: float | None = None,
    on_interrupted: Callable[[], Any] | None = None,
    on_invalidated: Callable[[], Any] | None = None,
    limits: Limits | None = None,
) -> AsyncIterator[Connection]:
    """Connect to ``url`` and yield the connection for the block.

    ``exports`` (``(Iface, obj)`` or ``(Iface, obj, name)`` tuples) are in place before the handshake,
    so a server that calls back at once loses nothing.  ``timeout`` bounds connecting and the
    handshake (``TimeoutError``).  ``on_interrupted`` fires once if the peer goes away;
    ``on_invalidated`` once when the connection ends for good.
    """
    limits = limits or Limits()
    export_map = _exports_from(exports)
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
    )
    body_exc: BaseException | None = None
    failed: BaseException | None = None
    async with anyio.create_task_group() as tg:
        await tg.start(conn.run)
        try:
            with anyio.fail_after(limit):
                await conn._handshake.wait()
        except TimeoutError:
            failed = TimeoutError(f"{url}: no answer to the handshake within {limit:.1f}s")
        if failed is None and conn._core.state != State.OPEN:
            failure = conn._failure
            if isinstance(failure, PeerRejected):
                failed = PeerRejected(f"{url}: {failure}")
            else:
                failed = TransportError(f"{url}: the connection closed during the handshake ({failure})")
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
