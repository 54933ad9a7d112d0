"""A blocking facade for code that is not async (NSXPC's synchronous proxy).

``with xrpc.blocking.connect(url) as conn:`` runs an event loop in a background thread (anyio's
blocking portal) and gives proxies whose methods block until the reply arrives, and whose streams
are plain iterators.  Client-stream parameters take any ordinary iterable.  Calling it from inside
an event loop raises ``RuntimeError`` at once instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any, Callable, Iterator, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._api import connect as _connect
from ._connection import Connection
from ._interface import describe

__all__ = ("connect", "BlockingConnection")

_T = TypeVar("_T")


def _refuse_inside_event_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("xrpc.blocking is for code that is not async: inside an event loop use xrpc.connect()")
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return
        raise RuntimeError("xrpc.blocking is for code that is not async: inside an event loop use xrpc.connect()")


class BlockingConnection:
    """A connection driven from a background thread; ``proxy()`` gives blocking proxies."""

    def __init__(self, conn: Connection, portal: BlockingPortal) -> None:
        self.connection = conn
        self._portal = portal

    @property
    def peer(self) -> Any:
        return self.connection.peer

    def proxy(self, iface: Callable[..., _T], name: str = "", timeout: float | None = None) -> _T:
        """A proxy typed as ``iface`` whose methods block (streams: ordinary iterators)."""
        _refuse_inside_event_loop()
        inner = self.connection.proxy(iface, name, timeout)
        return _BlockingProxy(inner, describe(iface), self._portal)  # type: ignore[return-value]

    def export(self, iface: Any, obj: Any, name: str = "") -> None:
        self._portal.call(_export, self.connection, iface, obj, name)


async def _export(conn: Connection, iface: Any, obj: Any, name: str) -> None:
    conn.export(iface, obj, name)


class _BlockingProxy:
    def __init__(self, inner: Any, desc: Any, portal: BlockingPortal) -> None:
        self._inner = inner
        self._desc = desc
        self._portal = portal

    def __repr__(self) -> str:
        return f"<xrpc blocking proxy of {self._inner!r}>"

    def __getattr__(self, name: str) -> Any:
        m = self._desc.methods.get(name)
        if m is None:
            raise AttributeError(f"{self._desc.name} has no method {name!r}")
        method = getattr(self._inner, name)
        portal = self._portal
        if m.kind.streams_out:

            def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
                _refuse_inside_event_loop()
                return _BlockingStream(portal, method, args, kwargs)

            return stream

        def call(*args: Any, **kwargs: Any) -> Any:
            _refuse_inside_event_loop()
            return portal.call(lambda: method(*args, **kwargs))

        return call


class _BlockingStream(Iterator[Any]):
    """A server stream as an ordinary iterator; ``close()`` stops the remote producer."""

    def __init__(self, portal: BlockingPortal, method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._portal = portal
        self._stream = portal.call(_make_stream, method, args, kwargs)
        self._done = False

    def __iter__(self) -> _BlockingStream:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        try:
            return self._portal.call(self._stream.__anext__)
        except StopAsyncIteration:
            self._done = True
            raise StopIteration from None
        except BaseException:
            self._done = True
            raise

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._portal.call(self._stream.aclose)

    def __enter__(self) -> _BlockingStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._done:
            try:
                self.close()
            except Exception:
                pass


async def _make_stream(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return method(*args, **kwargs)


@contextlib.contextmanager
def connect(url: Any, **kwargs: Any) -> Iterator[BlockingConnection]:
    """Connect to ``url`` from blocking code (same options as ``xrpc.connect``)."""
    _refuse_inside_event_loop()
    with start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(_connect(url, **kwargs)) as conn:
            yield BlockingConnection(conn, portal)
