"""The floor: a raw asyncio protocol speaking 4-byte big-endian length-prefixed msgpack frames.

Messages (all msgpack, decoded with msgspec):

* ``[id, a, b]``  -> ``[id, a + b]``                       (add)
* ``[id, n]``     -> n frames ``[i, 1.5, "x"]``, then ``[id]`` (stream)
* ``bin``         -> the same ``bin``                       (echo)

The client pipelines: any number of adds may be outstanding, replies are matched by id.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()
_HDR = 4
_BATCH = 64 * 1024
_RECV_MIN = 1024
_RECV_MAX = 256 * 1024


def _frame(obj: Any) -> bytes:
    payload = _enc.encode(obj)
    return len(payload).to_bytes(4, "big") + payload


class FrameProtocol(asyncio.BufferedProtocol):
    """Splits the byte stream into frames and hands each decoded message to ``on_message``.

    The socket is read straight into one receive buffer.  It starts small (an idle connection costs
    little), doubles while reads keep filling it, and is replaced by one big enough for the whole
    frame when a large frame is on its way, so a frame is never copied while it is assembled.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(_RECV_MIN)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received data
        self._paused = False
        self._resume: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(self, msg: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self.transport = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    async def drain(self) -> None:
        if self._paused and self.transport is not None:
            self._resume = asyncio.get_running_loop().create_future()
            await self._resume

    def send(self, obj: Any) -> None:
        assert self.transport is not None
        out = bytearray(_HDR)
        _enc.encode_into(obj, out, _HDR)
        out[:_HDR] = (len(out) - _HDR).to_bytes(_HDR, "big")
        self.transport.write(out)

    # receiving

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._end == len(self._buf):
            self._relocate(min(2 * len(self._buf), _RECV_MAX))
        return memoryview(self._buf)[self._end:]

    def _relocate(self, size: int) -> None:
        """Move the unparsed bytes to the front of a buffer of at least ``size`` bytes.

        The event loop may still hold a view of the current buffer, so it is never resized: a
        bigger one replaces it, or the bytes move within it.
        """
        pending = self._end - self._start
        size = max(size, pending + _RECV_MIN)
        if size > len(self._buf):
            fresh = bytearray(size)
            fresh[:pending] = self._buf[self._start:self._end]
            self._buf = fresh
        elif self._start:
            self._buf[:pending] = self._buf[self._start:self._end]
        self._start, self._end = 0, pending

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        start, end = self._start, self._end
        on_message = self.on_message
        decode = _dec.decode
        need = 0
        with memoryview(self._buf) as mv:
            while end - start >= _HDR:
                stop = start + _HDR + int.from_bytes(mv[start:start + _HDR], "big")
                if stop > end:
                    need = stop - start
                    break
                msg = decode(mv[start + _HDR:stop])
                start = stop
                on_message(msg)
        if start == end:
            self._start = self._end = 0
            return
        self._start = start
        if need > len(self._buf) - start:
            self._relocate(need)


# --------------------------------------------------------------------------------------------------
# server


class ServerProtocol(FrameProtocol):
    def on_message(self, msg: Any) -> None:
        if type(msg) is bytes:
            self.send(msg)
        elif len(msg) == 3:
            self.send([msg[0], msg[1] + msg[2]])
        else:
            asyncio.get_running_loop().create_task(self._stream(msg[0], msg[1]))

    async def _stream(self, ident: int, n: int) -> None:
        encode = _enc.encode
        batch = bytearray()
        for i in range(n):
            payload = encode([i, 1.5, "x"])
            batch += len(payload).to_bytes(4, "big")
            batch += payload
            if len(batch) >= _BATCH:
                if self.transport is None:
                    return
                self.transport.write(batch)
                batch = bytearray()
                await self.drain()
        if self.transport is None:
            return
        batch += _frame([ident])
        self.transport.write(batch)


async def _serve(path: str, announce_info: dict[str, Any]) -> None:
    from .._common import announce

    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(ServerProtocol, path, backlog=4096)
    async with server:
        announce("unix://" + path, **announce_info)
        await server.serve_forever()


def serve(opts: Any) -> None:
    from .._common import run_async

    path = os.path.join(opts.dir, f"{opts.system}.sock")
    run_async(lambda: _serve(path, {"loop": opts.loop}), opts.loop)


# --------------------------------------------------------------------------------------------------
# client


class ClientProtocol(FrameProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0
        self.stream_count = 0
        self.stream_done: asyncio.Future[int] | None = None
        self.echo_waiter: asyncio.Future[bytes] | None = None

    def on_message(self, msg: Any) -> None:
        if type(msg) is bytes:
            w, self.echo_waiter = self.echo_waiter, None
            if w is not None and not w.done():
                w.set_result(msg)
            return
        n = len(msg)
        if n == 3:
            self.stream_count += 1
        elif n == 2:
            fut = self.pending.pop(msg[0], None)
            if fut is not None and not fut.done():
                fut.set_result(msg[1])
        else:
            done = self.stream_done
            if done is not None and not done.done():
                done.set_result(self.stream_count)

    def connection_lost(self, exc: Exception | None) -> None:
        err = ConnectionError("connection lost")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()
        for w in (self.stream_done, self.echo_waiter):
            if w is not None and not w.done():
                w.set_exception(err)
        super().connection_lost(exc)

    def call_add(self, a: int, b: int) -> asyncio.Future[Any]:
        self.next_id += 1
        ident = self.next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[ident] = fut
        self.send([ident, a, b])
        return fut


class Adapter:
    is_async = True

    def __init__(self, url: str, loop: str) -> None:
        assert url.startswith("unix://")
        self.path = url[len("unix://"):]
        self.info = {"loop": loop, "msgspec": msgspec.__version__}

    async def open(self) -> ClientProtocol:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_unix_connection(ClientProtocol, self.path)
        return proto

    async def close(self, conn: ClientProtocol) -> None:
        if conn.transport is not None:
            conn.transport.close()
        await conn.closed

    async def add(self, conn: ClientProtocol, a: int, b: int) -> int:
        return await conn.call_add(a, b)  # type: ignore[no-any-return]

    async def stream(self, conn: ClientProtocol, n: int, deadline: float) -> int:
        conn.next_id += 1
        conn.stream_count = 0
        conn.stream_done = asyncio.get_running_loop().create_future()
        conn.send([conn.next_id, n])
        return await conn.stream_done

    async def echo(self, conn: ClientProtocol, data: bytes) -> bytes:
        conn.echo_waiter = asyncio.get_running_loop().create_future()
        conn.send(data)
        return await conn.echo_waiter


def client(opts: Any) -> Adapter:
    return Adapter(opts.url, opts.loop)


def probe(opts: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"msgspec": msgspec.__version__, "loop": opts.loop}
    if opts.loop == "uvloop":
        from importlib.metadata import version

        info["uvloop"] = version("uvloop")
    return info

