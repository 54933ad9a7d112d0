"""A small service with one method of every kind, served by ``xrpc serve`` in the CLI tests."""

from __future__ import annotations

from typing import Annotated, AsyncIterator, Optional, Protocol

import anyio
import msgspec

import xrpc


class Point(msgspec.Struct):
    x: float
    y: float


class Circle(msgspec.Struct):
    radius: float


class Square(msgspec.Struct):
    side: float


class NotFound(Exception):
    """A declared error: it reaches the caller as itself."""


@xrpc.interface(errors=(NotFound,))
class Geometry(Protocol):
    async def distance(self, a: Point, b: Point) -> float:
        """The Euclidean distance between two points."""
        ...

    def walk(self, start: Point, steps: int = 3) -> AsyncIterator[Point]:
        """``steps`` points from ``start``, one unit right each time."""
        ...

    async def centroid(self, points: AsyncIterator[Point]) -> Point:
        """The mean of the points streamed in."""
        ...

    def chat(self, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        """Every line back, upper-cased."""
        ...

    @xrpc.oneway
    async def log(self, text: str) -> None: ...

    async def history(self) -> list[str]:
        """What ``log`` received, in order."""
        ...

    async def lookup(self, name: str) -> Point:
        """A named point; raises NotFound for any name but 'origin'."""
        ...

    async def scale(self, factor: float, offset: float = 0.0, label: Optional[str] = None) -> str: ...

    async def area(self, shape: Annotated[object, xrpc.allow(Circle, Square)]) -> float: ...

    async def crash(self) -> None:
        """Raises an undeclared exception (a RemoteError on the caller)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Returns after ``seconds``."""
        ...


@xrpc.interface(name="cli.Counter")
class Counter(Protocol):
    async def add(self, n: int) -> int: ...


class NotAnInterface(Protocol):
    async def nothing(self) -> None: ...


class GeometryImpl:
    def __init__(self) -> None:
        self.logged: list[str] = []

    async def distance(self, a: Point, b: Point) -> float:
        return float(((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5)

    async def walk(self, start: Point, steps: int = 3) -> AsyncIterator[Point]:
        for i in range(1, steps + 1):
            yield Point(start.x + i, start.y)

    async def centroid(self, points: AsyncIterator[Point]) -> Point:
        xs: list[Point] = [p async for p in points]
        if not xs:
            return Point(0.0, 0.0)
        return Point(sum(p.x for p in xs) / len(xs), sum(p.y for p in xs) / len(xs))

    async def chat(self, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        async for line in lines:
            yield line.upper()

    async def log(self, text: str) -> None:
        self.logged.append(text)

    async def history(self) -> list[str]:
        return list(self.logged)

    async def lookup(self, name: str) -> Point:
        if name == "origin":
            return Point(0.0, 0.0)
        raise NotFound(f"no point named {name!r}")

    async def scale(self, factor: float, offset: float = 0.0, label: Optional[str] = None) -> str:
        return f"{label or 'x'}*{factor}+{offset}"

    async def area(self, shape: object) -> float:
        if isinstance(shape, Circle):
            return 3.0 * shape.radius**2
        if isinstance(shape, Square):
            return shape.side**2
        raise TypeError(type(shape).__name__)

    async def crash(self) -> None:
        raise RuntimeError("boom")

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class CounterImpl:
    def __init__(self) -> None:
        self.total = 0

    async def add(self, n: int) -> int:
        self.total += n
        return self.total


def make_geometry() -> GeometryImpl:
    return GeometryImpl()


instance = GeometryImpl()


def make_server() -> xrpc.Server:
    """Two exports (for ``xrpc serve cli_fixtures.geometry:make_server`` and the services tests)."""
    server = xrpc.Server()
    server.export(Geometry, GeometryImpl())
    server.export(Counter, CounterImpl(), "counter")
    return server
