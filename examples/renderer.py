"""Out-of-process rendering: frames travel through shared memory, only notifications through the socket.

A worker process renders frames into an ``xrpc.SharedBuffer`` that the client created and passed to
it.  The buffer is a memfd: passing it sends a file descriptor (SCM_RIGHTS over the Unix socket), and
both processes map the same pages.  For every finished frame the worker yields a small ``FrameReady``
notification on a server stream; the client reads the frame through a ``memoryview`` of its own
mapping -- no copy on either side, whatever the frame size::

    def render(self, frames: int, width: int, height: int, buf: xrpc.SharedBuffer) -> AsyncIterator[FrameReady]

Who may write where, and when:  the buffer holds ``SLOTS`` (3) frames, and frame ``n`` goes into
slot ``n % 3``.  The client connects with ``xrpc.Limits(window=1)``, so the worker may have at most
one notification in flight: it sends frame ``n + 1`` only once the client has taken frame ``n`` (that
is, finished with frame ``n - 1``), and while the client reads frame ``n`` the worker can be drawing
frame ``n + 2`` at most -- always in another slot.  Stream credit is the synchronisation; no locks,
no extra messages.

Each notification carries a CRC-32 of the frame computed by the worker; the client recomputes it over
its view of the shared pages, so a frame overwritten too early would be noticed.

Run it:  python examples/renderer.py [frames]

``main()`` starts the worker as a child process (``python examples/renderer.py serve URL``), connects
over a Unix socket and prints one line per frame.  Shared buffers and file descriptors travel only
over ``unix://`` connections: over TCP the call fails with ``xrpc.ValidationError`` before anything
is sent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from typing import AsyncIterator, Protocol

import anyio
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

import xrpc

SLOTS = 3


class FrameReady(msgspec.Struct, frozen=True):
    """Frame ``index`` is complete in ``buf[offset : offset + size]``."""

    index: int
    offset: int
    size: int
    crc32: int


@xrpc.interface
class Renderer(Protocol):
    def render(self, frames: int, width: int, height: int, buf: xrpc.SharedBuffer) -> AsyncIterator[FrameReady]:
        """Draw ``frames`` frames of ``width`` x ``height`` grey pixels into ``buf``, ``SLOTS`` frames
        deep; yield a notification once each frame is complete."""
        ...

    async def pid(self) -> int:
        """The worker's process id."""
        ...


def draw(frame: memoryview, index: int, width: int, height: int) -> None:
    """Draw frame ``index`` into ``frame`` (``width * height`` bytes): a diagonal ramp that moves."""
    ramp = bytes(range(256)) * (width // 256 + 2)
    for y in range(height):
        start = (y + 7 * index) % 256
        frame[y * width : (y + 1) * width] = ramp[start : start + width]


# --------------------------------------------------------------------------- the worker
class RendererImpl:
    async def render(self, frames: int, width: int, height: int, buf: xrpc.SharedBuffer) -> AsyncIterator[FrameReady]:
        size = width * height
        with buf:  # our mapping of the client's buffer; unmapped when the stream ends
            if frames < 0 or size <= 0 or SLOTS * size > buf.size:
                raise ValueError(f"{SLOTS} frames of {width}x{height} do not fit in {buf.size} bytes")
            for index in range(frames):
                offset = (index % SLOTS) * size
                with buf.buffer[offset : offset + size] as frame:
                    draw(frame, index, width, height)
                    crc = zlib.crc32(frame)
                yield FrameReady(index, offset, size, crc)

    async def pid(self) -> int:
        return os.getpid()


async def serve(url: str) -> None:
    """Serve a ``Renderer`` on ``url``; print the bound URL; stop when stdin reaches end of file."""
    server = xrpc.Server()
    server.export(Renderer, RendererImpl())
    async with server.listen(url) as listener:
        print(listener.url, flush=True)
        stdin = anyio.wrap_file(sys.stdin.buffer)
        while await stdin.read(4096):
            pass


# --------------------------------------------------------------------------- the client
class FrameStats(msgspec.Struct):
    index: int
    crc32: int
    first_pixels: bytes  # a few bytes copied out, for display


async def render_frames(url: str, frames: int, width: int = 640, height: int = 480) -> list[FrameStats]:
    """Have the worker at ``url`` render ``frames`` frames; check each one in place; return their stats."""
    stats: list[FrameStats] = []
    with xrpc.SharedBuffer.create(SLOTS * width * height, name="frames") as buf:
        async with xrpc.connect(url, limits=xrpc.Limits(window=1)) as conn:
            renderer = conn.proxy(Renderer, timeout=60)
            async for ready in renderer.render(frames, width, height, buf):
                with buf.buffer[ready.offset : ready.offset + ready.size] as frame:  # a view: no copy
                    crc = zlib.crc32(frame)
                    if crc != ready.crc32:
                        raise RuntimeError(f"frame {ready.index} changed under the reader: crc32 {crc:#010x} != {ready.crc32:#010x}")
                    stats.append(FrameStats(ready.index, crc, bytes(frame[:4])))
    return stats


@contextlib.asynccontextmanager
async def worker_process() -> AsyncIterator[str]:
    """Start ``serve`` in a child process on a fresh Unix socket; yield its URL; stop it afterwards."""
    directory = tempfile.mkdtemp(prefix="xr", dir="/tmp")  # short: Unix socket paths are limited
    try:
        proc = await anyio.open_process(
            [sys.executable, __file__, "serve", f"unix://{directory}/render.sock"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            with anyio.fail_after(30):
                url = (await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 4096)).decode().strip()
            yield url
            await proc.stdin.aclose()  # the child stops at end of file
            with anyio.move_on_after(10):
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.aclose()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def main(frames: int = 30, width: int = 640, height: int = 480) -> list[FrameStats]:
    async with worker_process() as url:
        started = time.perf_counter()
        stats = await render_frames(url, frames, width, height)
        elapsed = time.perf_counter() - started
    for s in stats:
        print(f"frame {s.index:3d}: crc32 {s.crc32:#010x} ok, first pixels {s.first_pixels.hex(' ')}")
    mib = frames * width * height / 2**20
    print(f"{frames} frames of {width}x{height} ({mib:.1f} MiB) in {elapsed:.3f}s; none of it crossed the socket")
    return stats


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        anyio.run(serve, sys.argv[2])
    elif len(sys.argv) <= 2:
        anyio.run(main, int(sys.argv[1]) if len(sys.argv) == 2 else 30)
    else:
        sys.exit(f"usage: {sys.argv[0]} [frames] | serve URL")
