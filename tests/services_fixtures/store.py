"""A service that returns objects (``module = "services_fixtures.store:make_server"``), for the
tests of what a proxy does through either caller (``tests/test_caller.py``): promise pipelining,
timeouts, compatibility checks, one-way calls and streams both ways.

Every call it serves is written to a log the client can read (``Store.log``), so a test sees each
call arrive once.  ``Store.open(name, wait_for_chained=True)`` answers only once a call pipelined
on its result has arrived: the proof that the chain was sent without waiting for the answer.

Environment knobs (set in the description's ``environment``):

- ``PROBE_LOG``: a file to which each instance appends its pid when it starts;
- ``STORE_START_DELAY``: seconds to spend starting up.
"""

from __future__ import annotations

import os
import time
from typing import AsyncIterator, Protocol

import anyio

import xrpc

from services_fixtures.probe import _record_start

CHAINED_WAIT = 5.0  # how long ``open(wait_for_chained=True)`` waits for the pipelined call


class NoSuchFile(Exception):
    pass


@xrpc.interface
class File(Protocol):
    async def read(self) -> str: ...

    async def slow_read(self, seconds: float) -> str:
        """``read`` after ``seconds``."""
        ...

    async def hang(self) -> None:
        """Never return (logs "hang cancelled" when cancelled)."""
        ...


@xrpc.interface(errors=(NoSuchFile,))
class Store(Protocol):
    async def open(self, name: str, wait_for_chained: bool = False) -> File:
        """``NoSuchFile`` for a name starting with "missing"."""
        ...

    async def pid(self) -> int: ...

    async def log(self) -> list[str]:
        """The calls served so far, in order (``log`` itself excepted)."""
        ...

    async def hang(self) -> None: ...

    @xrpc.oneway
    async def note(self, text: str) -> None: ...

    async def total(self, numbers: AsyncIterator[int]) -> int: ...

    def count(self, n: int) -> AsyncIterator[int]: ...


class FileImpl:
    def __init__(self, name: str, log: list[str]) -> None:
        self._name = name
        self._log = log

    async def read(self) -> str:
        self._log.append(f"read {self._name}")
        return f"contents of {self._name}"

    async def slow_read(self, seconds: float) -> str:
        self._log.append(f"slow_read {self._name}")
        await anyio.sleep(seconds)
        return f"contents of {self._name}"

    async def hang(self) -> None:
        self._log.append(f"hang {self._name}")
        try:
            await anyio.sleep_forever()
        finally:
            self._log.append("hang cancelled")


class StoreImpl:
    def __init__(self) -> None:
        self._log: list[str] = []

    async def open(self, name: str, wait_for_chained: bool = False) -> File:
        self._log.append(f"open {name}")
        if wait_for_chained:
            # a call pipelined on this one's result is in flight beside it on this connection
            conn = xrpc.current_connection()
            with anyio.move_on_after(CHAINED_WAIT):
                while conn.in_flight < 2:
                    await anyio.sleep(0.005)
            self._log.append(f"chained seen: {conn.in_flight >= 2}")
        if name.startswith("missing"):
            raise NoSuchFile(name)
        return FileImpl(name, self._log)  # type: ignore[return-value]

    async def pid(self) -> int:
        return os.getpid()

    async def log(self) -> list[str]:
        return list(self._log)

    async def hang(self) -> None:
        self._log.append("hang")
        try:
            await anyio.sleep_forever()
        finally:
            self._log.append("hang cancelled")

    async def note(self, text: str) -> None:
        self._log.append(f"note {text}")

    async def total(self, numbers: AsyncIterator[int]) -> int:
        got = [n async for n in numbers]
        self._log.append(f"total {got}")
        return sum(got)

    async def count(self, n: int) -> AsyncIterator[int]:
        self._log.append(f"count {n}")
        for i in range(n):
            yield i


def make_server() -> xrpc.Server:
    _record_start()
    delay = float(os.environ.get("STORE_START_DELAY") or 0)
    if delay:
        time.sleep(delay)  # a slow start-up, on purpose
    server = xrpc.Server()
    server.export(Store, StoreImpl())
    return server
