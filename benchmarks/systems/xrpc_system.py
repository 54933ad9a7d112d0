"""xrpc itself, over a unix socket (``xrpc-unix``) or TCP on 127.0.0.1 (``xrpc-tcp``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import xrpc

from ..xrpc_iface import Bench, BenchImpl, Small


def _core() -> str:
    """Which protocol core is imported: ``compiled`` (``XRPC_COMPILE=1 pip install .``) or ``python``."""
    from xrpc import _protocol

    return "compiled" if getattr(_protocol, "COMPILED", False) else "python"


def _bind_url(opts: Any) -> str:
    if opts.transport == "tcp":
        return "tcp://127.0.0.1:0"
    return "unix://" + os.path.join(opts.dir, f"{opts.system}.sock")


async def _serve(opts: Any) -> None:
    from .._common import announce

    server = xrpc.Server()
    server.export(Bench, BenchImpl())
    async with server.listen(_bind_url(opts)) as listener:
        announce(str(listener.url), loop=opts.loop, xrpc=getattr(xrpc, "__version__", "?"), core=_core())
        await asyncio.Event().wait()


def serve(opts: Any) -> None:
    from .._common import run_async

    run_async(lambda: _serve(opts), opts.loop)


class _Conn:
    __slots__ = ("proxy", "release", "task")

    def __init__(self) -> None:
        self.proxy: Any = None
        self.release = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class Adapter:
    """Each connection lives in a task of its own that holds ``async with xrpc.connect(...)``.

    That keeps every connection's context (and any task group or cancel scope inside it) entered
    and exited by one task, in order, however many connections are open at once.
    """

    is_async = True

    def __init__(self, url: str, loop: str) -> None:
        self.url = url
        self.info: dict[str, Any] = {"loop": loop, "xrpc": getattr(xrpc, "__version__", "?"), "core": _core()}

    async def _hold(self, c: _Conn, ready: asyncio.Future[None]) -> None:
        try:
            async with xrpc.connect(self.url) as conn:
                c.proxy = conn.proxy(Bench)
                ready.set_result(None)
                await c.release.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
                return
            raise

    async def open(self) -> _Conn:
        c = _Conn()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        c.task = asyncio.create_task(self._hold(c, ready))
        await ready
        return c

    async def close(self, conn: _Conn) -> None:
        conn.release.set()
        if conn.task is not None:
            await conn.task

    async def add(self, conn: _Conn, a: int, b: int) -> int:
        return await conn.proxy.add(a, b)  # type: ignore[no-any-return]

    async def stream(self, conn: _Conn, n: int, deadline: float) -> int:
        count = 0
        it = conn.proxy.stream(n)
        closer = contextlib.aclosing(it) if hasattr(it, "aclose") else contextlib.nullcontext(it)
        async with closer:
            async for item in it:
                if count == 0 and not isinstance(item, Small):
                    raise TypeError(f"stream item is {type(item).__name__}, expected Small")
                count += 1
                if not count & 1023 and time.perf_counter() > deadline:
                    break
        return count

    async def echo(self, conn: _Conn, data: bytes) -> bytes:
        return await conn.proxy.echo(data)  # type: ignore[no-any-return]


def client(opts: Any) -> Adapter:
    return Adapter(opts.url, opts.loop)


def probe(opts: Any) -> dict[str, Any]:
    for name in ("Server", "connect", "interface"):
        if not hasattr(xrpc, name):
            raise ImportError(f"xrpc has no attribute {name!r}")
    info: dict[str, Any] = {"xrpc": getattr(xrpc, "__version__", "?"), "loop": opts.loop, "core": _core()}
    if opts.loop == "uvloop":
        from importlib.metadata import version

        info["uvloop"] = version("uvloop")
    return info
