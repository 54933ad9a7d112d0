"""Progress reporting with a server stream.

A long operation reports its progress as a stream of events and ends the stream with its result:

    def convert(self, name: str) -> AsyncIterator[Progress | Done]

The caller iterates with ``async for`` and reacts to each kind of event.  Nothing else is needed:
the stream carries both classes because the annotation names both (a union of two user classes
travels with a class key, so neither needs a msgspec tag); flow control keeps a fast producer from
piling up events; leaving the loop early cancels the conversion on the server; and an exception in
the server ends the stream with that error after the events already sent.

Run it:  python examples/progress.py [name]

It serves the converter in this process over ``memory://`` with ``xrpc.testing.connect``; with a real
server you would write ``async with xrpc.connect("unix:///run/converter.sock") as conn`` instead.
"""

from __future__ import annotations

import sys
from typing import AsyncIterator, Protocol

import anyio
import msgspec

import xrpc


class Progress(msgspec.Struct):
    """How far the conversion has got."""

    percent: int
    stage: str


class Done(msgspec.Struct):
    """The result, always the last event of the stream."""

    output: str
    pages: int


class ConversionFailed(Exception):
    """Declared below, so it reaches the caller as itself."""


@xrpc.interface(errors=(ConversionFailed,))
class Converter(Protocol):
    def convert(self, name: str) -> AsyncIterator[Progress | Done]:
        """Convert a document to PDF: progress events, then one ``Done``."""
        ...


class ConverterService:
    """The server side: an async generator.  ``yield`` waits while the caller has no credit left."""

    STAGES = ("reading", "parsing", "laying out", "rendering", "writing")

    async def convert(self, name: str) -> AsyncIterator[Progress | Done]:
        if not name:
            raise ConversionFailed("no document name")
        pages = 3 + len(name) % 10
        for i, stage in enumerate(self.STAGES):
            await anyio.sleep(0.01)  # the real work would happen here
            yield Progress(percent=(i + 1) * 100 // len(self.STAGES), stage=stage)
        stem = name.rsplit(".", 1)[0]
        yield Done(output=f"{stem}.pdf", pages=pages)


async def convert_with_progress(name: str) -> tuple[list[Progress], Done]:
    """Run one conversion against an in-process server; return the progress events and the result."""
    server = xrpc.Server()
    server.export(Converter, ConverterService())
    events: list[Progress] = []
    async with xrpc.testing.connect(server) as conn:
        converter = conn.proxy(Converter)
        async for event in converter.convert(name):
            if isinstance(event, Progress):
                events.append(event)
            else:
                return events, event
    raise RuntimeError("the stream ended without a result")


async def main(name: str) -> None:
    server = xrpc.Server()
    server.export(Converter, ConverterService())
    async with xrpc.testing.connect(server) as conn:
        converter = conn.proxy(Converter, timeout=30)  # the deadline bounds the whole stream
        print(f"converting {name}")
        async for event in converter.convert(name):
            match event:
                case Progress(percent=percent, stage=stage):
                    print(f"{percent:4d}%  {stage}")
                case Done(output=output, pages=pages):
                    print(f"done: {output} ({pages} pages)")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "report.docx")
