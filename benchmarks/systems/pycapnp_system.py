"""pycapnp (Cap'n Proto RPC) on its asyncio integration, over a unix socket.

The schema is [`bench.capnp`](bench.capnp).  Both sides run inside ``capnp.kj_loop()`` on an
asyncio loop; the server uses ``capnp.AsyncIoStream.create_unix_server`` with a
``capnp.TwoPartyServer`` per connection, the client a ``capnp.TwoPartyClient`` and the bootstrap
capability cast to ``Bench``.

``stream`` is Cap'n Proto's idiomatic server-to-client stream: the client passes a ``Sink``
capability and the server calls ``sink.push(i, f, s)`` once per record (the method is declared
``-> stream``).  pycapnp's dynamic API sends such calls as ordinary calls, without the C++ flow
control, so the server keeps at most ``WINDOW`` pushes outstanding itself.  To stop a stream early
the client's sink raises, which ends the server's loop.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from typing import Any

import capnp  # type: ignore[import-untyped,unused-ignore]

WINDOW = 64
"""Pushes a server keeps outstanding on one stream."""

_SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.capnp")
# `-> stream` imports /capnp/stream.capnp, which pycapnp ships inside its package.
_IMPORTS = [os.path.dirname(os.path.dirname(os.path.abspath(capnp.__file__)))]
schema: Any = capnp.load(_SCHEMA_PATH, imports=_IMPORTS)


def _version() -> str:
    return str(getattr(capnp, "__version__", "?"))


class _StopStream(Exception):
    pass


class BenchImpl(schema.Bench.Server):  # type: ignore[misc,unused-ignore]
    async def add(self, a: int, b: int, **kwargs: Any) -> int:
        return a + b

    async def echo(self, data: bytes, **kwargs: Any) -> bytes:
        return data

    async def stream(self, n: int, sink: Any, **kwargs: Any) -> int:
        pending: collections.deque[Any] = collections.deque()
        sent = 0
        try:
            for i in range(n):
                if len(pending) >= WINDOW:
                    await pending.popleft()
                pending.append(sink.push(i, 1.5, "x"))
                sent += 1
            while pending:
                await pending.popleft()
        except capnp.KjException:
            # the client's sink refused (it stopped early) or went away
            for p in pending:
                try:
                    await p
                except capnp.KjException:
                    pass
        return sent


async def _serve(path: str) -> None:
    from .._common import announce

    impl = BenchImpl()

    async def on_connection(stream: Any) -> None:
        server = capnp.TwoPartyServer(stream, bootstrap=impl)
        try:
            await server.on_disconnect()
        finally:
            server.close()

    async with capnp.kj_loop():
        server = await capnp.AsyncIoStream.create_unix_server(on_connection, path)
        announce("unix://" + path, pycapnp=_version(), stream="Sink capability, -> stream pushes")
        async with server:
            await asyncio.Event().wait()


def serve(opts: Any) -> None:
    path = os.path.join(opts.dir, f"{opts.system}.sock")
    asyncio.run(_serve(path))


class _Sink(schema.Bench.Sink.Server):  # type: ignore[misc,unused-ignore]
    def __init__(self, deadline: float) -> None:
        self.count = 0
        self.deadline = deadline
        self.stopped = False

    async def push(self, i: int, f: float, s: str, **kwargs: Any) -> None:
        if self.stopped:
            raise _StopStream("stream stopped")
        self.count += 1
        if not self.count & 1023 and time.perf_counter() > self.deadline:
            self.stopped = True


class _Conn:
    __slots__ = ("stream", "client", "bench")

    def __init__(self, stream: Any, client: Any, bench: Any) -> None:
        self.stream = stream
        self.client = client
        self.bench = bench


class Adapter:
    is_async = True

    def __init__(self, url: str) -> None:
        assert url.startswith("unix://")
        self.path = url[len("unix://"):]
        self.info: dict[str, Any] = {"pycapnp": _version(), "loop": "asyncio"}

    def loop_context(self) -> Any:
        """The workloads run inside this (pycapnp needs its KJ loop on top of asyncio's)."""
        return capnp.kj_loop()

    async def open(self) -> _Conn:
        stream = await capnp.AsyncIoStream.create_unix_connection(self.path)
        client = capnp.TwoPartyClient(stream)
        return _Conn(stream, client, client.bootstrap().cast_as(schema.Bench))

    async def close(self, conn: _Conn) -> None:
        conn.client.close()
        conn.stream.close()

    async def add(self, conn: _Conn, a: int, b: int) -> int:
        return (await conn.bench.add(a, b)).sum  # type: ignore[no-any-return]

    async def stream(self, conn: _Conn, n: int, deadline: float) -> int:
        sink = _Sink(deadline)
        res = await conn.bench.stream(n, sink)
        if not sink.stopped and res.sent != sink.count:
            raise RuntimeError(f"server sent {res.sent} records, the sink got {sink.count}")
        return sink.count

    async def echo(self, conn: _Conn, data: bytes) -> bytes:
        return (await conn.bench.echo(data)).data  # type: ignore[no-any-return]


def client(opts: Any) -> Adapter:
    return Adapter(opts.url)


def probe(opts: Any) -> dict[str, Any]:
    return {"pycapnp": _version(), "schema": os.path.basename(_SCHEMA_PATH)}
