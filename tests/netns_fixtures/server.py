"""A TLS xrpc server for tests/test_netns.py, run inside the "server" network namespace.

    python server.py --cert CERT --key KEY --host 169.254.77.1 [--port 0]

Prints ``{"event": "ready", "url": ..., "pid": ...}`` once it listens, then one event per
connection (``connected``, with its serial and the peer's address) and per
``hold`` call (``holding``, so the test knows a call is in flight before it cuts the link).
It serves until its stdin closes (or it is killed).
"""

from __future__ import annotations

import argparse
import os
import sys

import anyio

import xrpc
from common import Echo, emit


class Server:
    def __init__(self) -> None:
        self.serials: dict[int, int] = {}
        self.next_serial = 0
        self.xrpc = xrpc.Server(on_connect=self.on_connect)
        self.xrpc.export(Echo, self)

    def on_connect(self, conn: xrpc.Connection) -> None:
        self.next_serial += 1
        self.serials[id(conn)] = self.next_serial
        emit("connected", conn=self.next_serial, address=conn.peer.address, transport=conn.peer.transport)

    def serial(self) -> int:
        return self.serials.get(id(xrpc.current_connection()), 0)

    async def echo(self, value: str) -> str:
        return value

    async def conn_id(self) -> int:
        return self.serial()

    async def hold(self, seconds: float) -> str:
        emit("holding", conn=self.serial(), seconds=seconds)
        await anyio.sleep(seconds)
        return "held"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = Server()
    ctx = xrpc.server_ssl_context(args.cert, args.key)
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    async with server.xrpc.listen(f"tls://{args.host}:{args.port}", ssl_context=ctx) as listener:
        emit("ready", url=listener.url, pid=os.getpid())
        while True:  # until the test closes our stdin
            await anyio.wait_readable(stdin)
            if not os.read(stdin, 4096):
                break
    emit("stopped")


if __name__ == "__main__":
    anyio.run(main)
