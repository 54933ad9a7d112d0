"""What a type checker sees through xrpc: checked by ``mypy --strict`` in test_typing.py, never run.

Every ``reveal_type`` line ends with a comment "R:" and the type mypy must reveal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterable, AsyncIterator, Iterable, Iterator, Protocol

import msgspec

import xrpc


class Point(msgspec.Struct):
    x: float
    y: float


class NotFound(Exception):
    pass


@xrpc.interface(errors=(NotFound,))
class Geometry(Protocol):
    async def distance(self, a: Point, b: Point) -> float: ...
    def walk(self, start: Point, steps: int) -> AsyncIterator[Point]: ...
    async def centroid(self, points: AsyncIterator[Point]) -> Point: ...
    def chat(self, lines: AsyncIterator[str]) -> AsyncIterator[str]: ...
    async def names(self, prefix: str = "") -> dict[str, list[Point]]: ...
    @xrpc.oneway
    async def log(self, text: str) -> None: ...
    async def total(self, xs: AsyncIterable[float] | Iterable[float]) -> float: ...


@xrpc.blocking.interface(Geometry)
class GeometryBlocking(Protocol):
    def distance(self, a: Point, b: Point) -> float: ...
    def walk(self, start: Point, steps: int) -> Iterator[Point]: ...
    def centroid(self, points: Iterable[Point]) -> Point: ...
    def log(self, text: str) -> None: ...


@xrpc.interface
class Bare(Protocol):
    async def ping(self) -> int: ...


async def _points() -> AsyncIterator[Point]:
    yield Point(0.0, 0.0)


async def _lines() -> AsyncIterator[str]:
    yield "hello"


async def _floats() -> AsyncIterator[float]:
    yield 1.0


if TYPE_CHECKING:

    async def examples(url: str) -> None:
        reveal_type(Geometry)  # R: def () -> typing_examples.Geometry
        async with xrpc.connect(url, timeout=1.0) as conn:
            reveal_type(conn)  # R: xrpc._connection.Connection
            geo = conn.proxy(Geometry)
            reveal_type(geo)  # R: typing_examples.Geometry
            reveal_type(conn.proxy(Geometry, name="other", timeout=0.5))  # R: typing_examples.Geometry
            reveal_type(await geo.distance(Point(0, 0), Point(3, 4)))  # R: builtins.float
            reveal_type(await geo.centroid(_points()))  # R: typing_examples.Point
            reveal_type(await geo.names())  # R: builtins.dict[builtins.str, builtins.list[typing_examples.Point]]
            reveal_type(await geo.log("x"))  # R: None
            reveal_type(geo.walk(Point(0, 0), 3))  # R: typing.AsyncIterator[typing_examples.Point]
            async for p in geo.walk(Point(0, 0), 3):
                reveal_type(p)  # R: typing_examples.Point
            async for line in geo.chat(_lines()):
                reveal_type(line)  # R: builtins.str
            reveal_type(await conn.proxy(Bare).ping())  # R: builtins.int
            # a client stream declared AsyncIterable[T] | Iterable[T] takes a list or an async iterable
            reveal_type(await geo.total([1.0, 2.0]))  # R: builtins.float
            reveal_type(await geo.total(_floats()))  # R: builtins.float
        with xrpc.blocking.connect(url, timeout=1.0) as bconn:
            reveal_type(bconn)  # R: xrpc.blocking.BlockingConnection
            bgeo = bconn.proxy(GeometryBlocking)
            reveal_type(bgeo)  # R: typing_examples.GeometryBlocking
            reveal_type(bgeo.distance(Point(0, 0), Point(3, 4)))  # R: builtins.float
            reveal_type(bgeo.walk(Point(0, 0), 3))  # R: typing.Iterator[typing_examples.Point]
            for q in bgeo.walk(Point(0, 0), 3):
                reveal_type(q)  # R: typing_examples.Point
            reveal_type(bgeo.centroid([Point(0, 0)]))  # R: typing_examples.Point
            reveal_type(bgeo.log("x"))  # R: None
        async with xrpc.connect_service("org.example.geometry") as sconn:
            reveal_type(sconn)  # R: xrpc._services.ServiceConnection
            reveal_type(await sconn.proxy(Geometry).names())  # R: builtins.dict[builtins.str, builtins.list[typing_examples.Point]]
        reveal_type(xrpc.ServiceNotFound("x"))  # R: xrpc._services.ServiceNotFound
        server = xrpc.Server()
        async with server.listen(url) as listener:
            reveal_type(listener.url)  # R: builtins.str
        reveal_type(xrpc.current_connection())  # R: xrpc._connection.Connection
        reveal_type(xrpc.describe(Geometry))  # R: xrpc._interface.InterfaceDescription
        async with xrpc.testing.connect(server) as tconn:
            reveal_type(await tconn.proxy(Geometry).distance(Point(0, 0), Point(1, 1)))  # R: builtins.float
