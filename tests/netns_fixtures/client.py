"""The client side of tests/test_netns.py, run inside the "client" network namespace.

    python client.py --mode connect|service --url tls://169.254.77.1:PORT --ca CA.pem [--heartbeat S]

It reads one JSON command per line on stdin and prints JSON event lines on stdout (see
``common.emit``; every event carries ``t``, this process's ``time.monotonic()``):

- ``{"cmd": "connect"}``: connect now; ``connected`` (with the peer's certificate subject) or
  ``connect_failed``;
- ``{"cmd": "call", "id": ID, "method": "echo"|"conn_id"|"hold", "arg": ...}``: run the call in
  its own task; ``result`` or ``error`` (exception type and message, and ``elapsed``) with that id;
- ``{"cmd": "quit"}`` (or end of input): close and exit.

Callbacks print ``interrupted`` (``on_interrupted``) and ``invalidated`` (``on_invalidated``).

``--mode connect`` uses ``xrpc.connect(url, ssl_context=...)``, one connection at a time.  With
``--heartbeat S`` it drives the heartbeat primitives of ``xrpc.Connection`` itself: ``ping(timeout=S)``
every S seconds and ``interrupt(reason)`` on a missed PONG (``heartbeat_missed`` event).  It does
not reconnect: a ``connect`` command opens a new connection.

``--mode service`` is the services layer: ``connect_service(NAME, heartbeat=S, ...)`` with a
description that says where the service is (``{"name": NAME, "url": URL}``) and the client's TLS
trust passed as ``ssl_context=``; heartbeat and reconnection are then the library's.  The services
layer cannot do this yet (it only dials ``unix://<runtime>/sockets/NAME.sock``): the attempt is
reported as an ``unsupported`` event and the program exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

import xrpc
from common import Echo, emit

SERVICE_NAME = "org.xrpc.tests.netns-echo"


def peer_fields(conn: xrpc.Connection) -> dict[str, Any]:
    p = conn.peer
    return {"transport": p.transport, "address": p.address, "cert_subject": p.cert_subject, "cert_sans": list(p.cert_sans)}


async def commands() -> Any:
    """The JSON commands on stdin (non-blocking reads: nothing is left in a thread at exit)."""
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    buf = b""
    while True:
        await anyio.wait_readable(fd)
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


async def run_call(proxy: Any, cmd: dict[str, Any]) -> None:
    start = time.monotonic()
    try:
        method = getattr(proxy, cmd["method"])
        value = await (method() if "arg" not in cmd else method(cmd["arg"]))
    except Exception as exc:
        emit("error", id=cmd["id"], type=type(exc).__name__, mro=[c.__name__ for c in type(exc).__mro__], message=str(exc), elapsed=time.monotonic() - start)
    else:
        emit("result", id=cmd["id"], value=value, elapsed=time.monotonic() - start)


class DirectClient:
    """``--mode connect``: plain ``xrpc.connect`` connections, one at a time."""

    def __init__(self, tg: anyio.abc.TaskGroup, args: argparse.Namespace) -> None:
        self.tg = tg
        self.args = args
        self.ctx = xrpc.client_ssl_context(args.ca)
        self.conn: xrpc.Connection | None = None

    async def connect(self) -> None:
        try:
            self.conn = await self.tg.start(self._hold)
        except Exception as exc:
            emit("connect_failed", type=type(exc).__name__, message=str(exc))
            return
        emit("connected", **peer_fields(self.conn))

    async def _hold(self, *, task_status: anyio.abc.TaskStatus[xrpc.Connection]) -> None:
        ended = anyio.Event()

        def invalidated() -> None:
            emit("invalidated")
            ended.set()

        async with xrpc.connect(
            self.args.url,
            ssl_context=self.ctx,
            timeout=5.0,
            on_interrupted=lambda: emit("interrupted"),
            on_invalidated=invalidated,
        ) as conn:
            task_status.started(conn)
            async with anyio.create_task_group() as tg:
                if self.args.heartbeat:
                    tg.start_soon(self._beat, conn, self.args.heartbeat)
                await ended.wait()
                tg.cancel_scope.cancel()

    @staticmethod
    async def _beat(conn: xrpc.Connection, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                await conn.ping(timeout=interval)
            except TimeoutError:
                emit("heartbeat_missed", interval=interval)
                conn.interrupt(f"the server did not answer a heartbeat within {interval:g}s")
                return
            except xrpc.Error:
                return

    def call(self, cmd: dict[str, Any]) -> None:
        if self.conn is None:
            emit("error", id=cmd["id"], type="NotConnected", mro=[], message="no connect command yet", elapsed=0.0)
            return
        self.tg.start_soon(run_call, self.conn.proxy(Echo), cmd)

    async def aclose(self) -> None:
        if self.conn is not None:
            await self.conn.aclose()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("connect", "service"), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--heartbeat", type=float, default=None)
    args = parser.parse_args()
    if args.mode == "service":
        return await service_main(args)
    async with anyio.create_task_group() as tg:
        client = DirectClient(tg, args)
        emit("started", pid=os.getpid(), mode=args.mode)
        async for cmd in commands():
            if cmd["cmd"] == "connect":
                await client.connect()
            elif cmd["cmd"] == "call":
                client.call(cmd)
            elif cmd["cmd"] == "quit":
                break
        await client.aclose()
        tg.cancel_scope.cancel()
    emit("quit")
    return 0


async def service_main(args: argparse.Namespace) -> int:
    from xrpc._services import connect_service

    ctx = xrpc.client_ssl_context(args.ca)
    with tempfile.TemporaryDirectory(prefix="xrpc-netns-") as d:
        Path(d, f"{SERVICE_NAME}.json").write_text(json.dumps({"name": SERVICE_NAME, "url": args.url}))
        kwargs: dict[str, Any] = {"search_path": [d], "ssl_context": ctx, "heartbeat": args.heartbeat, "timeout": 5.0}
        try:
            cm = connect_service(
                SERVICE_NAME, on_interrupted=lambda: emit("interrupted"), on_invalidated=lambda: emit("invalidated"), **kwargs
            )
            sc = await cm.__aenter__()
        except (TypeError, xrpc.Error) as exc:  # no such keyword / key: the services layer cannot target a URL
            emit("unsupported", type=type(exc).__name__, message=str(exc))
            return 3
        try:
            emit("started", pid=os.getpid(), mode=args.mode)
            async with anyio.create_task_group() as tg:
                async for cmd in commands():
                    if cmd["cmd"] == "connect":
                        try:
                            conn = await sc.connect()
                        except Exception as exc:
                            emit("connect_failed", type=type(exc).__name__, message=str(exc))
                        else:
                            emit("connected", state=sc.state, **peer_fields(conn))
                    elif cmd["cmd"] == "call":
                        tg.start_soon(run_call, sc.proxy(Echo), cmd)
                    elif cmd["cmd"] == "quit":
                        break
                tg.cancel_scope.cancel()
        finally:
            await cm.__aexit__(None, None, None)
    emit("quit")
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
