"""A plain blocking-socket floor for the 1 MiB echo: one thread per connection, sendall/recv_into.

The server echoes each length-prefixed frame verbatim without decoding it; the client encodes the
payload as msgpack bin (like the raw-asyncio client) and decodes the reply.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

_HDR = 4


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return False
        got += k
    return True


def _handle(conn: socket.socket) -> None:
    hdr = bytearray(_HDR)
    buf = bytearray(1 << 20)
    hv = memoryview(hdr)
    try:
        while True:
            if not _recv_exact(conn, hv):
                return
            size = int.from_bytes(hdr, "big")
            if size > len(buf):
                buf = bytearray(size)
            body = memoryview(buf)[:size]
            if not _recv_exact(conn, body):
                return
            conn.sendall(hdr)
            conn.sendall(body)
    except OSError:
        return
    finally:
        conn.close()


def serve(opts: Any) -> None:
    from .._common import announce

    path = os.path.join(opts.dir, f"{opts.system}.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4096)
    announce("unix://" + path)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


class Adapter:
    is_async = False

    def __init__(self, url: str) -> None:
        import msgspec

        assert url.startswith("unix://")
        self.path = url[len("unix://"):]
        self.enc = msgspec.msgpack.Encoder()
        self.dec = msgspec.msgpack.Decoder(bytes)
        self.info: dict[str, Any] = {"threads": "one per connection"}

    def open(self) -> tuple[socket.socket, list[bytearray]]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        return s, [bytearray(_HDR), bytearray(1 << 20)]

    def close(self, conn: tuple[socket.socket, list[bytearray]]) -> None:
        conn[0].close()

    def echo(self, conn: tuple[socket.socket, list[bytearray]], data: bytes) -> bytes:
        s, bufs = conn
        payload = self.enc.encode(data)
        s.sendall(len(payload).to_bytes(_HDR, "big"))
        s.sendall(payload)
        hdr = bufs[0]
        if not _recv_exact(s, memoryview(hdr)):
            raise ConnectionError("connection closed")
        size = int.from_bytes(hdr, "big")
        if size > len(bufs[1]):
            bufs[1] = bytearray(size)
        body = memoryview(bufs[1])[:size]
        if not _recv_exact(s, body):
            raise ConnectionError("connection closed")
        return self.dec.decode(body)

    def add(self, conn: Any, a: int, b: int) -> int:  # pragma: no cover - not measured
        raise NotImplementedError("blocking-socket measures the 1 MiB echo only")

    def stream(self, conn: Any, n: int, deadline: float) -> int:  # pragma: no cover - not measured
        raise NotImplementedError("blocking-socket measures the 1 MiB echo only")


def client(opts: Any) -> Adapter:
    return Adapter(opts.url)


def probe(opts: Any) -> dict[str, Any]:
    return {}
