"""Call context, metadata and middleware chains, for both sides of a connection.

Metadata travels with a call (CALL's ``meta``): ``call_metadata()`` adds to what the calls made in
a block carry; inside a remote method, ``current_metadata()`` is what its caller sent.  A middleware
is ``async def mw(ctx, call_next)``; client middleware runs around every call a connection makes
(unary, one-way, client stream, and the start of a server or two-way stream, with the real
arguments), server middleware around every call it serves in a task.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Awaitable, Callable, Iterator, Sequence

from ._interface import MethodDescription
from ._peer import Peer

__all__ = ("CallContext", "Middleware", "call_metadata", "current_metadata", "metadata", "run_chain", "run_client_chain")

metadata: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("xrpc_metadata", default=None)


def current_metadata() -> dict[str, str]:
    """The call metadata in effect: inside a remote method, what its caller sent (it propagates to
    the calls that method makes); elsewhere, what ``call_metadata()`` set."""
    return dict(metadata.get() or {})


@contextlib.contextmanager
def call_metadata(**items: str) -> Iterator[dict[str, str]]:
    """Add ``items`` to the metadata of every call made in this block (and in tasks it starts)."""
    merged = {**(metadata.get() or {}), **items}
    token = metadata.set(merged)
    try:
        yield merged
    finally:
        metadata.reset(token)


class CallContext:
    """What a middleware sees of one call: the method, the connection and its peer, the arguments,
    and the metadata (a client middleware may add to it before the call is sent)."""

    __slots__ = ("method", "connection", "args", "kwargs", "metadata", "side")

    def __init__(self, method: MethodDescription, connection: Any, args: tuple[Any, ...], kwargs: dict[str, Any], metadata: dict[str, str], side: str) -> None:
        self.method = method
        self.connection = connection
        self.args = args
        self.kwargs = kwargs
        self.metadata = metadata
        self.side = side  # "client" or "server"

    @property
    def peer(self) -> Peer:
        peer: Peer = self.connection.peer
        return peer

    def __repr__(self) -> str:
        return f"<CallContext {self.side} {self.method.qualname} peer={self.connection.peer.describe()}>"


Middleware = Callable[[CallContext, Callable[[], Awaitable[Any]]], Awaitable[Any]]


async def run_chain(middleware: Sequence[Middleware], ctx: CallContext, last: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``middleware`` in order around ``last``."""

    async def step(i: int) -> Any:
        if i == len(middleware):
            return await last()
        return await middleware[i](ctx, lambda: step(i + 1))

    return await step(0)


async def run_client_chain(
    middleware: Sequence[Middleware], connection: Any, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], last: Callable[[], Awaitable[Any]]
) -> Any:
    """Run client middleware around ``last`` (which sends the call): what a middleware adds to
    ``ctx.metadata`` travels with the call."""
    ctx = CallContext(m, connection, args, kwargs, dict(metadata.get() or {}), "client")
    token = metadata.set(ctx.metadata)
    try:
        return await run_chain(middleware, ctx, last)
    finally:
        metadata.reset(token)
