"""A stream service that runs as its own process, for the tests that need a real peer to kill.

Usage::

    python tests/stream_service.py unix:///tmp/dir/s.sock

It listens on the URL, prints the bound URL on one line of stdout once it accepts connections, and
serves ``StreamService`` until it is killed or its stdin reaches end of file (so it never outlives
the test that started it).  ``hang()`` prints ``hang`` on stdout when it starts, so the test knows
the call is in flight on this side before it kills the process; ``sink()`` and ``relay()`` print
``flowing`` once a client stream is well under way.

``tests/test_streams.py`` imports ``StreamService`` from here, so both processes share one interface.
"""

from __future__ import annotations

import sys
from typing import AsyncIterator, Protocol

import anyio

import xrpc


@xrpc.interface
class StreamService(Protocol):
    def ticks(self) -> AsyncIterator[int]:
        """0, 1, 2, ... for ever (as fast as the caller's credit allows)."""
        ...

    def blobs(self, count: int, size: int) -> AsyncIterator[bytes]:
        """``count`` items of ``size`` bytes each, all the same object (see ``pattern``)."""
        ...

    async def hang(self) -> None:
        """Never returns (announces itself with a ``hang`` line on stdout)."""
        ...

    async def pid(self) -> int: ...

    async def sink(self, items: AsyncIterator[int]) -> int:
        """Counts what the caller streams (announces ``flowing`` once 100 items have arrived)."""
        ...

    def relay(self, items: AsyncIterator[int]) -> AsyncIterator[int]:
        """Streams back what the caller streams (announces ``flowing`` like ``sink``)."""
        ...


def pattern(size: int) -> bytes:
    """The content of every ``blobs`` item: a repeating 0..255 ramp, ``size`` bytes long."""
    ramp = bytes(range(256))
    return (ramp * (size // 256 + 1))[:size]


async def _flowing(items: AsyncIterator[int]) -> AsyncIterator[int]:
    """``items``, announcing "flowing" on stdout once 100 have passed (the test kills us then)."""
    n = 0
    async for x in items:
        n += 1
        if n == 100:
            print("flowing", flush=True)
        yield x


class StreamServiceImpl:
    async def ticks(self) -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    async def blobs(self, count: int, size: int) -> AsyncIterator[bytes]:
        blob = pattern(size)  # made once: what is measured is the transport, not the producer
        for _ in range(count):
            yield blob

    async def hang(self) -> None:
        print("hang", flush=True)
        await anyio.sleep_forever()

    async def pid(self) -> int:
        import os

        return os.getpid()

    async def sink(self, items: AsyncIterator[int]) -> int:
        n = 0
        async for _ in _flowing(items):
            n += 1
        return n

    async def relay(self, items: AsyncIterator[int]) -> AsyncIterator[int]:
        async for x in _flowing(items):
            yield x


async def _exit_on_stdin_eof(scope: anyio.CancelScope) -> None:
    stdin = anyio.wrap_file(sys.stdin.buffer)
    while await stdin.read(4096):
        pass
    scope.cancel()


async def main(url: str) -> None:
    server = xrpc.Server()
    server.export(StreamService, StreamServiceImpl())
    async with server.listen(url) as listener:
        print(listener.url, flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_exit_on_stdin_eof, tg.cancel_scope)
            await anyio.sleep_forever()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} URL")
    anyio.run(main, sys.argv[1])
