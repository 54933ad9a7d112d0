"""Pyro5 over a unix socket with its default thread-pool server.

The serializer is msgpack when Pyro5 can use it (the ``msgpack`` package is installed), otherwise
serpent.  ``stream`` returns a generator, which Pyro5 hands to the client as a remote iterator (item
streaming: one round trip per item).
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

import Pyro5  # type: ignore[import-untyped,unused-ignore]
import Pyro5.api  # type: ignore[import-untyped,unused-ignore]
import Pyro5.serializers  # type: ignore[import-untyped,unused-ignore]


def serializer_name() -> str:
    return "msgpack" if "msgpack" in Pyro5.serializers.serializers else "serpent"


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    import serpent  # type: ignore[import-untyped,unused-ignore]

    # serpent sends bytes as a {'data': base64, 'encoding': 'base64'} dict

    return serpent.tobytes(data)  # type: ignore[no-any-return]


@Pyro5.api.expose
class Bench:
    def add(self, a: int, b: int) -> int:
        return a + b

    def stream(self, n: int) -> Iterator[tuple[int, float, str]]:
        for i in range(n):
            yield (i, 1.5, "x")

    def echo(self, data: Any) -> bytes:
        return _as_bytes(data)


def serve(opts: Any) -> None:
    from .._common import announce

    path = os.path.join(opts.dir, f"{opts.system}.sock")
    # The thread-pool server needs a worker per connection; let it grow past the idle workload.
    Pyro5.config.THREADPOOL_SIZE = max(Pyro5.config.THREADPOOL_SIZE, opts.max_conns + 100)
    Pyro5.config.SERIALIZER = serializer_name()
    daemon = Pyro5.api.Daemon(unixsocket=path)
    uri = daemon.register(Bench(), "bench")
    announce(str(uri), pyro5=Pyro5.__version__, serializer=serializer_name(),
             servertype=Pyro5.config.SERVERTYPE)
    daemon.requestLoop()


class Adapter:
    is_async = False

    def __init__(self, url: str) -> None:
        Pyro5.config.SERIALIZER = serializer_name()
        Pyro5.config.COMMTIMEOUT = 60.0
        self.uri = url
        self.info: dict[str, Any] = {"pyro5": Pyro5.__version__, "serializer": serializer_name()}

    def open(self) -> Any:
        proxy = Pyro5.api.Proxy(self.uri)
        proxy._pyroBind()
        return proxy

    def close(self, conn: Any) -> None:
        conn._pyroRelease()

    def add(self, conn: Any, a: int, b: int) -> int:
        return conn.add(a, b)  # type: ignore[no-any-return]

    def stream(self, conn: Any, n: int, deadline: float) -> int:
        it = conn.stream(n)
        count = 0
        for _item in it:
            count += 1
            if not count & 255 and time.perf_counter() > deadline:
                it.close()
                break
        return count

    def echo(self, conn: Any, data: bytes) -> bytes:
        return _as_bytes(conn.echo(data))


def client(opts: Any) -> Adapter:
    return Adapter(opts.url)


def probe(opts: Any) -> dict[str, Any]:
    return {"pyro5": Pyro5.__version__, "serializer": serializer_name()}
