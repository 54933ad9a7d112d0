"""The interface the xrpc benchmarks export and call."""

from __future__ import annotations

from typing import AsyncIterator, Protocol

import msgspec

import xrpc


class Small(msgspec.Struct):
    i: int
    f: float
    s: str


@xrpc.interface
class Bench(Protocol):
    async def add(self, a: int, b: int) -> int: ...

    def stream(self, n: int) -> AsyncIterator[Small]: ...

    async def echo(self, data: bytes) -> bytes: ...


class BenchImpl:
    """Server-side implementation of ``Bench``."""

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def stream(self, n: int) -> AsyncIterator[Small]:
        for i in range(n):
            yield Small(i, 1.5, "x")

    async def echo(self, data: bytes) -> bytes:
        return data
