"""thriftpy2's asyncio API (``thriftpy2.contrib.aio``), over a unix socket.

The schema is [`bench.thrift`](bench.thrift), loaded at run time (no code generation).  The server
is a ``TAsyncServer`` with the default binary protocol and buffered transport; the client uses
``make_client`` with the same.  Timeouts are off on both sides (the server's default ends every
connection after 3 s).

A thriftpy2 connection carries one call at a time (no request ids are matched), so the connection
handed to the workloads is a small pool: it starts with one Thrift connection and opens another
whenever every one it has is busy.  Only ``inflight`` grows it (to 64 connections); the other
workloads use one connection each.

Thrift has no streaming: ``stream`` is one ``items(n)`` call returning a list of ``n`` records,
which cannot stop early.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import thriftpy2  # type: ignore[import-untyped,unused-ignore]
from thriftpy2.contrib.aio.processor import TAsyncProcessor  # type: ignore[import-untyped,unused-ignore]
from thriftpy2.contrib.aio.rpc import make_client  # type: ignore[import-untyped,unused-ignore]
from thriftpy2.contrib.aio.server import TAsyncServer  # type: ignore[import-untyped,unused-ignore]
from thriftpy2.contrib.aio.socket import TAsyncServerSocket  # type: ignore[import-untyped,unused-ignore]

_SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.thrift")
bench_thrift: Any = thriftpy2.load(_SCHEMA_PATH, module_name="bench_thrift")


def _version() -> str:
    return str(getattr(thriftpy2, "__version__", "?"))


class Handler:
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def echo(self, data: bytes) -> bytes:
        return data

    async def items(self, n: int) -> list[Any]:
        item = bench_thrift.Item
        return [item(i=i, f=1.5, s="x") for i in range(n)]


def serve(opts: Any) -> None:
    from .._common import announce

    path = os.path.join(opts.dir, f"{opts.system}.sock")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sock = TAsyncServerSocket(unix_socket=path, client_timeout=None, backlog=1024)
    processor = TAsyncProcessor(bench_thrift.Bench, Handler())  # type: ignore[no-untyped-call,unused-ignore]
    server = TAsyncServer(processor, sock, loop=loop)
    server.init_server()  # type: ignore[no-untyped-call,unused-ignore]
    announce("unix://" + path, thriftpy2=_version(), protocol="binary", transport="buffered")
    loop.run_forever()


class _Pool:
    """Thrift connections of one workload connection; each carries one call at a time."""

    __slots__ = ("idle", "all")

    def __init__(self, first: Any) -> None:
        self.idle: list[Any] = [first]
        self.all: list[Any] = [first]


class Adapter:
    is_async = True

    def __init__(self, url: str) -> None:
        assert url.startswith("unix://")
        self.path = url[len("unix://"):]
        self.info: dict[str, Any] = {"thriftpy2": _version(), "loop": "asyncio"}

    async def _connect(self) -> Any:
        return await make_client(bench_thrift.Bench, unix_socket=self.path, timeout=None, connect_timeout=None)

    async def open(self) -> _Pool:
        return _Pool(await self._connect())

    async def close(self, conn: _Pool) -> None:
        for c in conn.all:
            c.close()
        conn.all.clear()
        conn.idle.clear()

    def connections(self, conn: _Pool) -> int:
        return len(conn.all)

    async def _take(self, conn: _Pool) -> Any:
        if conn.idle:
            return conn.idle.pop()
        c = await self._connect()
        conn.all.append(c)
        return c

    async def add(self, conn: _Pool, a: int, b: int) -> int:
        c = await self._take(conn)
        try:
            return await c.add(a, b)  # type: ignore[no-any-return]
        finally:
            conn.idle.append(c)

    async def stream(self, conn: _Pool, n: int, deadline: float) -> int:
        c = await self._take(conn)
        try:
            return len(await c.items(n))
        finally:
            conn.idle.append(c)

    async def echo(self, conn: _Pool, data: bytes) -> bytes:
        c = await self._take(conn)
        try:
            return await c.echo(data)  # type: ignore[no-any-return]
        finally:
            conn.idle.append(c)


def client(opts: Any) -> Adapter:
    return Adapter(opts.url)


def probe(opts: Any) -> dict[str, Any]:
    return {"thriftpy2": _version(), "schema": os.path.basename(_SCHEMA_PATH)}
