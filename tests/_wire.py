"""Raw xrpc wire helpers for tests that play a peer byte by byte: framing, HELLO, decoding."""

from __future__ import annotations

import socket
import time
from typing import Any

import anyio
import anyio.abc
import msgspec

from xrpc._protocol import PROTOCOL_VERSION, Hello


# the message type each frame starts with (docs/wire.md), to read frames decoded as plain lists
(HELLO_TAG, WELCOME_TAG, CALL_TAG, REPLY_TAG, ERROR_TAG, ITEM_TAG, END_TAG, CREDIT_TAG, CANCEL_TAG, RELEASE_TAG, GOODBYE_TAG,
 PING_TAG, PONG_TAG) = range(13)


def body_frame(body: bytes) -> bytes:
    """``body`` behind its 4-byte big-endian length prefix."""
    return len(body).to_bytes(4, "big") + body


def frame(msg: Any) -> bytes:
    """``msg`` encoded as MessagePack, framed."""
    return body_frame(msgspec.msgpack.encode(msg))


HELLO = frame(Hello(PROTOCOL_VERSION, 1 << 20))


def decode_frames(data: bytes | bytearray, *, stop_at_empty: bool = False, stop_at_garbage: bool = False) -> list[Any]:
    """The whole frames at the start of ``data``, decoded (a partial frame at the end is left out).

    An empty frame, or one that is not MessagePack, raises ``msgspec.DecodeError`` unless
    ``stop_at_empty`` / ``stop_at_garbage`` make it end the list instead.
    """
    out: list[Any] = []
    pos = 0
    while len(data) - pos >= 4:
        size = int.from_bytes(data[pos : pos + 4], "big")
        if (size == 0 and stop_at_empty) or len(data) - pos - 4 < size:
            break
        try:
            out.append(msgspec.msgpack.decode(data[pos + 4 : pos + 4 + size]))
        except msgspec.DecodeError:
            if stop_at_garbage:
                break
            raise
        pos += 4 + size
    return out


async def read_to_end(stream: anyio.abc.ByteStream, timeout: float) -> tuple[bytes, str]:
    """Read until the server closes; ``how`` is "eof" or "reset" (TimeoutError if it never does)."""
    received = bytearray()
    try:
        with anyio.fail_after(timeout):
            while True:
                received += await stream.receive()
    except anyio.EndOfStream:
        return bytes(received), "eof"
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return bytes(received), "reset"


def raw(value: Any) -> msgspec.Raw:
    """``value`` encoded as MessagePack, for a payload field (CALL arguments, REPLY, ITEM)."""
    return msgspec.Raw(msgspec.msgpack.encode(value))


def pop_frames(buf: bytearray, at_most: int | None = None) -> list[Any]:
    """The whole frames at the start of ``buf`` (``at_most`` of them), decoded and removed from it."""
    out: list[Any] = []
    while len(buf) >= 4 and (at_most is None or len(out) < at_most):
        size = int.from_bytes(buf[:4], "big")
        if len(buf) - 4 < size:
            break
        out.append(msgspec.msgpack.decode(bytes(buf[4 : 4 + size])))
        del buf[: 4 + size]
    return out


def recv_frame(sock: socket.socket, buf: bytes, timeout: float) -> tuple[Any, bytes]:
    """The first whole frame of ``buf`` and of what the blocking socket ``sock`` receives after it,
    decoded, and the bytes that follow it.  TimeoutError if no frame is whole within ``timeout``
    seconds, EOFError if the peer closes first."""
    deadline = time.monotonic() + timeout
    while True:
        if len(buf) >= 4:
            size = int.from_bytes(buf[:4], "big")
            if len(buf) - 4 >= size:
                return msgspec.msgpack.decode(buf[4 : 4 + size]), buf[4 + size :]
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no frame in time")
        sock.settimeout(left)
        data = sock.recv(1 << 20)
        if not data:
            raise EOFError("connection closed")
        buf += data
