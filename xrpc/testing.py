"""Test your own services without sockets.

``async with xrpc.testing.connect(server) as conn:`` serves ``server`` on a private in-memory address
and yields a client connection to it, exactly as a real client would see it (handshake, on_connect,
exports, validation, streams), minus the kernel.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, AsyncIterator, Callable, Sequence

from ._api import Server
from ._api import connect as _connect
from ._connection import Connection, Limits

__all__ = ("connect", "memory_url")

_counter = itertools.count(1)


def memory_url() -> str:
    """A fresh ``memory://`` address, unique in this process."""
    return f"memory://xrpc-test-{os.getpid()}-{next(_counter)}"


@contextlib.asynccontextmanager
async def connect(
    server: Server,
    *,
    exports: Sequence[Any] = (),
    timeout: float | None = None,
    on_interrupted: Callable[[], Any] | None = None,
    on_invalidated: Callable[[], Any] | None = None,
    limits: Limits | None = None,
) -> AsyncIterator[Connection]:
    """Serve ``server`` in memory and yield a client connection to it."""
    async with server.listen(memory_url()) as listener:
        async with _connect(
            listener.url,
            exports=exports,
            timeout=timeout,
            on_interrupted=on_interrupted,
            on_invalidated=on_invalidated,
            limits=limits,
        ) as conn:
            yield conn
