"""From a Protocol to a running service: a server process and a client, with a unary call,
a stream, a declared error, and a refused argument.

    python examples/quickstart.py            # starts the server as a child process, then calls it
    python examples/quickstart.py serve URL  # just the server
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from typing import AsyncIterator, Protocol

import anyio
import msgspec

import xrpc


class Point(msgspec.Struct):
    x: float
    y: float


class NotFound(Exception):
    """A declared error: it reaches the caller as itself."""


@xrpc.interface(errors=(NotFound,))
class Geometry(Protocol):
    async def distance(self, a: Point, b: Point) -> float: ...

    def walk(self, start: Point, steps: int) -> AsyncIterator[Point]: ...

    async def lookup(self, name: str) -> Point: ...


class GeometryService:
    places = {"origin": Point(0, 0)}

    async def distance(self, a: Point, b: Point) -> float:
        return float(((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5)

    async def walk(self, start: Point, steps: int) -> AsyncIterator[Point]:
        for i in range(steps):
            yield Point(start.x + i, start.y)

    async def lookup(self, name: str) -> Point:
        if name not in self.places:
            raise NotFound(name)
        return self.places[name]


async def serve(url: str) -> None:
    server = xrpc.Server()
    server.export(Geometry, GeometryService())
    async with server.listen(url) as listener:
        print(listener.url, flush=True)  # tells the parent we are ready
        await anyio.sleep_forever()


async def client(url: str) -> None:
    async with xrpc.connect(url) as conn:
        geo = conn.proxy(Geometry)
        print("distance:", await geo.distance(Point(0, 0), Point(3, 4)))
        async for p in geo.walk(Point(1, 1), 3):
            print("walked to", p)
        try:
            await geo.lookup("atlantis")
        except NotFound as exc:
            print("NotFound:", exc.args)
        try:
            await geo.distance("here", Point(1, 1))  # type: ignore[arg-type]
        except xrpc.ValidationError as exc:
            print("refused before the method ran:", exc)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        anyio.run(serve, sys.argv[2])
        return
    with tempfile.TemporaryDirectory(prefix="xrpc-") as tmp:
        url = f"unix://{tmp}/geometry.sock"
        proc = subprocess.Popen([sys.executable, __file__, "serve", url], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline().strip()
            if not ready:
                raise SystemExit("the server did not start")
            anyio.run(client, ready)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


if __name__ == "__main__":
    main()
