"""rpyc: an ``rpyc.Service`` with ``exposed_`` methods on a ThreadedServer over a unix socket.

The client looks up each remote method once per connection (``conn.root.add`` is itself a round
trip) and then calls it, so a measured call is one round trip.  ``stream`` returns a generator; the
client iterates the remote generator through its netref (one round trip per item), and the small
tuples it yields come back by value.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterator

import rpyc  # type: ignore[import-untyped,unused-ignore]
from rpyc.utils.factory import unix_connect  # type: ignore[import-untyped,unused-ignore]
from rpyc.utils.server import ThreadedServer  # type: ignore[import-untyped,unused-ignore]

_CONFIG = {"sync_request_timeout": 60, "allow_public_attrs": False}


class BenchService(rpyc.Service):  # type: ignore[misc]
    def exposed_add(self, a: int, b: int) -> int:
        return a + b

    def exposed_stream(self, n: int) -> Iterator[tuple[int, float, str]]:
        for i in range(n):
            yield (i, 1.5, "x")

    def exposed_echo(self, data: bytes) -> bytes:
        return data


def _quiet_logger() -> logging.Logger:
    log = logging.getLogger("benchmarks.rpyc")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    log.setLevel(logging.ERROR)
    return log


def serve(opts: Any) -> None:
    from .._common import announce

    path = os.path.join(opts.dir, f"{opts.system}.sock")
    server = ThreadedServer(
        BenchService, socket_path=path, protocol_config=dict(_CONFIG), logger=_quiet_logger(),
        auto_register=False,
    )
    announce("unix://" + path, rpyc=rpyc.__version__, server="ThreadedServer")
    server.start()


class _Conn:
    """An rpyc connection plus its remote methods, each looked up on first use."""

    __slots__ = ("conn", "methods")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.methods: dict[str, Any] = {}

    def method(self, name: str) -> Any:
        m = self.methods.get(name)
        if m is None:
            m = self.methods[name] = getattr(self.conn.root, name)
        return m


class Adapter:
    is_async = False

    def __init__(self, url: str) -> None:
        assert url.startswith("unix://")
        self.path = url[len("unix://"):]
        self.info: dict[str, Any] = {"rpyc": rpyc.__version__}

    def open(self) -> _Conn:
        return _Conn(unix_connect(self.path, config=dict(_CONFIG)))

    def close(self, conn: _Conn) -> None:
        conn.conn.close()

    def add(self, conn: _Conn, a: int, b: int) -> int:
        return conn.method("add")(a, b)  # type: ignore[no-any-return]

    def stream(self, conn: _Conn, n: int, deadline: float) -> int:
        count = 0
        for _item in conn.method("stream")(n):
            count += 1
            if not count & 255 and time.perf_counter() > deadline:
                break
        return count

    def echo(self, conn: _Conn, data: bytes) -> bytes:
        return conn.method("echo")(data)  # type: ignore[no-any-return]


def client(opts: Any) -> Adapter:
    return Adapter(opts.url)


def probe(opts: Any) -> dict[str, Any]:
    return {"rpyc": rpyc.__version__}
