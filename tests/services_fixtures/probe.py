"""The service most tests launch (``module = "services_fixtures.probe:make_server"``).

It reports its pid and version, calls back every client that exports ``Client`` from ``on_connect``
(the reply is kept per connection, so the client can check that nothing was lost), and has calls
that tell the client when they are in flight on this side, so a test knows when to kill it.

Environment knobs (set in the description's ``environment``):

- ``PROBE_LOG``: a file to which each instance appends its pid when it starts;
- ``PROBE_START_DELAY``: seconds to spend starting up (widens the window two launchers race in);
- ``PROBE_FAIL``: make the factory raise ``RuntimeError`` with this message.
"""

from __future__ import annotations

import os
import time
from typing import AsyncIterator, Protocol

import anyio

import xrpc

VERSION = "1"


@xrpc.interface
class Probe(Protocol):
    async def pid(self) -> int: ...

    async def version(self) -> str: ...

    async def greetings(self) -> list[str]:
        """What this connection's ``on_connect`` callback got back from the client."""
        ...

    async def hang(self) -> None:
        """Call the client's ``started("hang")``, then never return."""
        ...

    async def slow(self, seconds: float) -> str:
        """Call the client's ``started("slow")``, wait ``seconds``, return the version."""
        ...

    def ticks(self) -> AsyncIterator[int]:
        """0, 1, 2 ... for ever."""
        ...


@xrpc.interface
class Client(Protocol):
    """What a test client exports to the service."""

    async def hello(self, token: str) -> str: ...

    async def started(self, what: str) -> None: ...


class ProbeImpl:
    def __init__(self, version: str) -> None:
        self._version = version
        self.replies: dict[xrpc.Connection, list[str]] = {}

    async def pid(self) -> int:
        return os.getpid()

    async def version(self) -> str:
        return self._version

    async def greetings(self) -> list[str]:
        return list(self.replies.get(xrpc.current_connection(), []))

    async def hang(self) -> None:
        await xrpc.current_connection().proxy(Client).started("hang")
        await anyio.sleep_forever()

    async def slow(self, seconds: float) -> str:
        await xrpc.current_connection().proxy(Client).started("slow")
        await anyio.sleep(seconds)
        return self._version

    async def ticks(self) -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1


def _record_start() -> None:
    path = os.environ.get("PROBE_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)


def make_server(version: str = VERSION) -> xrpc.Server:
    _record_start()
    delay = float(os.environ.get("PROBE_START_DELAY") or 0)
    if delay:
        time.sleep(delay)  # a slow start-up, on purpose
    if os.environ.get("PROBE_FAIL"):
        raise RuntimeError(os.environ["PROBE_FAIL"])
    impl = ProbeImpl(version)

    async def on_connect(conn: xrpc.Connection) -> None:
        if any(e.name == "Client" for e in conn.peer_exports):
            impl.replies[conn] = [await conn.proxy(Client).hello(str(os.getpid()))]

    server = xrpc.Server(on_connect=on_connect)
    server.export(Probe, impl)
    return server
