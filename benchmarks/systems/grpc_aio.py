"""grpcio's asyncio API over a unix socket, without protoc: generic handlers and msgpack messages.

Methods of ``/bench.Bench/``: ``Add`` ([a, b] -> int), ``Stream`` (n -> n x [i, 1.5, "x"]),
``Echo`` (bin -> bin); every message is encoded with msgspec.msgpack.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, AsyncIterator

import grpc  # type: ignore[import-untyped,unused-ignore]
import msgspec

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()
_SERVICE = "bench.Bench"
_MAX_MSG = 64 << 20
_COMMON_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MSG),
    ("grpc.max_receive_message_length", _MAX_MSG),
]


def _encode(obj: Any) -> bytes:
    return _enc.encode(obj)


def _decode(data: bytes) -> Any:
    return _dec.decode(data)


async def _add(request: Any, context: Any) -> int:
    return request[0] + request[1]  # type: ignore[no-any-return]


async def _stream(request: Any, context: Any) -> AsyncIterator[Any]:
    for i in range(request):
        yield [i, 1.5, "x"]


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _serve(path: str) -> None:
    from .._common import announce

    handler = grpc.method_handlers_generic_handler(
        _SERVICE,
        {
            "Add": grpc.unary_unary_rpc_method_handler(
                _add, request_deserializer=_decode, response_serializer=_encode
            ),
            "Stream": grpc.unary_stream_rpc_method_handler(
                _stream, request_deserializer=_decode, response_serializer=_encode
            ),
            "Echo": grpc.unary_unary_rpc_method_handler(
                _echo, request_deserializer=_decode, response_serializer=_encode
            ),
        },
    )
    server = grpc.aio.server(options=_COMMON_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    target = "unix:" + path
    server.add_insecure_port(target)
    await server.start()
    announce(target, grpc=grpc.__version__)
    await server.wait_for_termination()


def serve(opts: Any) -> None:
    path = os.path.join(opts.dir, f"{opts.system}.sock")
    asyncio.run(_serve(path))


class _Conn:
    __slots__ = ("channel", "add", "stream", "echo")

    def __init__(self, target: str) -> None:
        # A local subchannel pool gives every channel its own connection (the global pool would
        # share one connection between channels to the same target).
        self.channel = grpc.aio.insecure_channel(
            target, options=_COMMON_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
        )
        self.add = self.channel.unary_unary(
            f"/{_SERVICE}/Add", request_serializer=_encode, response_deserializer=_decode
        )
        self.stream = self.channel.unary_stream(
            f"/{_SERVICE}/Stream", request_serializer=_encode, response_deserializer=_decode
        )
        self.echo = self.channel.unary_unary(
            f"/{_SERVICE}/Echo", request_serializer=_encode, response_deserializer=_decode
        )


class Adapter:
    is_async = True

    def __init__(self, url: str) -> None:
        self.target = url
        self.info: dict[str, Any] = {"grpc": grpc.__version__, "loop": "asyncio"}

    async def open(self) -> _Conn:
        return _Conn(self.target)

    async def close(self, conn: _Conn) -> None:
        await conn.channel.close()

    async def add(self, conn: _Conn, a: int, b: int) -> int:
        return await conn.add([a, b])  # type: ignore[no-any-return]

    async def stream(self, conn: _Conn, n: int, deadline: float) -> int:
        call = conn.stream(n)
        count = 0
        async for _item in call:
            count += 1
            if not count & 1023 and time.perf_counter() > deadline:
                call.cancel()
                break
        return count

    async def echo(self, conn: _Conn, data: bytes) -> bytes:
        return await conn.echo(data)  # type: ignore[no-any-return]


def client(opts: Any) -> Adapter:
    return Adapter(opts.url)


def probe(opts: Any) -> dict[str, Any]:
    return {"grpc": grpc.__version__, "msgspec": msgspec.__version__}
