"""Hostile review of the unary fast paths: the short path for plain methods of named exports, the
admission at HELLO, proxies whose unary methods return the call's coroutine, and replies handed to
their handler directly.  Real processes and real sockets, timeouts on everything."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import socket
import ssl
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Protocol

import anyio
import pytest

import xrpc
from _procs import ChildProcess, errors_in, log_to, serve_until_stdin_closes
from _timeouts import T
from _wire import HELLO, REPLY_TAG, WELCOME_TAG, frame, pop_frames, raw

from xrpc._protocol import Call


@xrpc.interface()
class Echo(Protocol):
    async def ping(self, x: int) -> int: ...

    async def slow(self, x: int) -> int: ...


class EchoImpl:
    def ping(self, x: int) -> int:
        return x + 1

    async def slow(self, x: int) -> int:
        await anyio.sleep(0)
        return 2 * x


@xrpc.interface()
class Wrapped(Protocol):
    async def with_anyio_timeout(self, x: int) -> int: ...

    async def with_asyncio_timeout(self, x: int) -> int: ...

    async def in_a_task(self) -> bool: ...

    async def forwarded(self, x: int) -> int: ...


class WrappedImpl:
    """Plain functions that return coroutines which need a task (a wrapper, a forwarder)."""

    def __init__(self, remote: Echo) -> None:
        self.remote = remote

    def with_anyio_timeout(self, x: int) -> Awaitable[int]:
        async def run() -> int:
            with anyio.fail_after(T):
                await anyio.sleep(0)
            return x

        return run()

    def with_asyncio_timeout(self, x: int) -> Awaitable[int]:
        async def run() -> int:
            async with asyncio.timeout(T):  # type: ignore[attr-defined,unused-ignore]
                await asyncio.sleep(0)
            return x

        return run()

    def in_a_task(self) -> Awaitable[bool]:
        async def run() -> bool:
            return asyncio.current_task() is not None

        return run()

    def forwarded(self, x: int) -> Awaitable[int]:
        return self.remote.ping(x)


def _behind_a_proxy(path: str, log_path: str, front: Any) -> None:
    """In the child: ``Echo`` served on ``path + "b"``, and on ``path`` the server that
    ``front(echo_proxy_with_timeout, echo_proxy)`` builds from two proxies of it."""
    log_to(log_path)

    async def main() -> None:
        backend = xrpc.Server()
        backend.export(Echo, EchoImpl())
        async with anyio.create_task_group() as tg:
            url_b = await tg.start(backend.serve, f"unix://{path}b")
            async with xrpc.connect(url_b) as to_backend:
                server = front(to_backend.proxy(Echo, timeout=T), to_backend.proxy(Echo))
                url = await tg.start(server.serve, f"unix://{path}")
                await serve_until_stdin_closes(url)
            tg.cancel_scope.cancel()

    anyio.run(main)


def _wrapped_main(path: str, log_path: str) -> None:
    """``Wrapped`` on ``path``, whose ``forwarded`` calls ``Echo`` through a proxy with a timeout."""

    def front(timed: Any, untimed: Any) -> xrpc.Server:
        server = xrpc.Server()
        server.export(Wrapped, WrappedImpl(timed))
        return server

    _behind_a_proxy(path, log_path, front)


def _relay_main(path: str, log_path: str) -> None:
    """A middle server on ``path`` that exports proxies of ``Echo`` (with a timeout, and without
    as "untimed") as its own, forwarding each call."""

    def front(timed: Any, untimed: Any) -> xrpc.Server:
        middle = xrpc.Server()
        middle.export(Echo, timed)
        middle.export(Echo, untimed, "untimed")
        return middle

    _behind_a_proxy(path, log_path, front)


def _server_main(path: str, log_path: str) -> None:
    """In the child: ``Echo`` served on ``path``."""
    log_to(log_path)

    async def main() -> None:
        server = xrpc.Server()
        server.export(Echo, EchoImpl())
        async with anyio.create_task_group() as tg:
            url = await tg.start(server.serve, f"unix://{path}")
            await serve_until_stdin_closes(url)
            tg.cancel_scope.cancel()

    anyio.run(main)


def _tls_main(certs: str, log_path: str) -> None:
    """In the child: over mutual TLS, a server that admits only the certificate ``CN=client``, and
    serves ``Echo`` under its name and as ``guarded``, for organisation ``t`` only."""
    log_to(log_path)

    async def main() -> None:
        server = xrpc.Server(requirement='cert.subject.CN == "client"')
        server.export(Echo, EchoImpl())
        server.export(Echo, EchoImpl(), "guarded", requirement='cert.subject.O == "t"')
        ctx = xrpc.server_ssl_context(f"{certs}/server.pem", f"{certs}/server.key", cafile=f"{certs}/ca.pem")
        async with anyio.create_task_group() as tg:
            url = await tg.start(lambda task_status: server.serve("tls://127.0.0.1:0", ssl_context=ctx, task_status=task_status))
            await serve_until_stdin_closes(url)
            tg.cancel_scope.cancel()

    anyio.run(main)


def _pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate ``CN=client, O=t``."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from _trust import cn_name, make_ca, make_leaf, write_pem

    ca = make_ca(cn_name("ca", "t"))
    write_pem(d, "ca", None, ca[1])
    server = make_leaf(ca, cn_name("server", "t"), [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], ExtendedKeyUsageOID.SERVER_AUTH)
    write_pem(d, "server", *server)
    client = make_leaf(ca, cn_name("client", "t"), [], ExtendedKeyUsageOID.CLIENT_AUTH)
    write_pem(d, "client", *client)


def _tls_exchange(url: str, certs: str, data: bytes, want: int) -> list[Any]:
    """Complete a TLS handshake with the server at ``url`` as the client ``CN=client``, send ``data``
    in the very segment that carries the client's last handshake message, and return the frames
    received (``want`` of them, or up to the server's close)."""
    host, port = url[len("tls://") :].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=f"{certs}/ca.pem")
    ctx.load_cert_chain(f"{certs}/client.pem", f"{certs}/client.key")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    frames: list[Any] = []
    with socket.create_connection((host, int(port)), timeout=T) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    sock.sendall(pending)
                chunk = sock.recv(65536)
                if not chunk:
                    raise EOFError("the server closed during the TLS handshake") from None
                incoming.write(chunk)
        tls.write(data)
        sock.sendall(outgoing.read())  # the client's Finished, then ``data``: one segment
        buf = bytearray()
        while len(frames) < want:
            chunk = sock.recv(65536)
            if not chunk:
                break
            incoming.write(chunk)
            try:
                while True:
                    plain = tls.read(65536)
                    if not plain:
                        break
                    buf += plain
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                frames += pop_frames(buf)
                break
            frames += pop_frames(buf)
    return frames


# ------------------------------------------------------------------------------ admission at HELLO
def test_a_hello_read_with_the_tls_handshake_is_judged_by_the_peers_certificate(tmp_path: Path) -> None:
    # The TLS driver hands the application data read with the client's last handshake message to
    # the reader before the connection has taken the peer's certificate; admitted at HELLO, the
    # peer was judged without it: a client with the right certificate was refused ("refused
    # connection ...: cert.subject.CN == "client" passed"), the verdict kept for the connection.
    _pki(tmp_path)
    certs = str(tmp_path)
    child = ChildProcess(name="tls")
    child.start("test_hostile_review9", certs, child.log_path, entry="_tls_main")
    try:
        for _ in range(3):
            data = HELLO + frame(Call(1, "Echo", "ping", raw([1]))) + frame(Call(3, "guarded", "ping", raw([2])))
            frames = _tls_exchange(child.url, certs, data, 3)
            assert [f[0] for f in frames] == [WELCOME_TAG, REPLY_TAG, REPLY_TAG], frames
            assert sorted(e[0] for e in frames[0][3]) == ["Echo", "guarded", "xrpc.introspect"], frames[0]
            assert [f[1:] for f in frames[1:]] == [[1, 2], [3, 3]], frames
    finally:
        lines = child.stop()
    assert not [line for line in lines if "refused" in line], lines
    assert errors_in(lines) == [], lines


# ------------------------------------------------------------------------------------ proxies
@contextlib.asynccontextmanager
async def _child_connection(name: str, entry: str) -> AsyncIterator[xrpc.Connection]:
    """A connection to a server run by ``entry`` of this file in a child process; the child's log
    must show no error once it has stopped."""
    child = ChildProcess(name=name)
    child.start("test_hostile_review9", child.path, child.log_path, entry=entry)
    try:
        with anyio.fail_after(3 * T):
            async with xrpc.connect(child.url) as conn:
                yield conn
    finally:
        lines = child.stop()
    assert errors_in(lines) == [], lines


async def test_a_proxy_with_a_timeout_exported_by_a_middle_process_forwards_its_calls() -> None:
    # A proxy's unary method is a plain function that returns the call's coroutine.  Exported by a
    # middle process (docs/objects.md: "the middle process exports the proxy and forwards each
    # call"), it was taken for a method that runs inline, and its call was started on the reader,
    # outside any task: with a timeout, every forwarded call failed with
    # "TypeError: cannot create weak reference to 'NoneType' object".
    async with _child_connection("relay", "_relay_main") as conn:
        for name in ("Echo", "untimed"):
            relay = conn.proxy(Echo, name)
            assert await relay.ping(1) == 2
            assert await relay.slow(5) == 10
            # many at once: each still forwarded and answered
            results: dict[int, int] = {}

            async def one(i: int) -> None:
                results[i] = await relay.ping(i)  # noqa: B023

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
            assert results == {i: i + 1 for i in range(50)}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in 3.11")
async def test_a_plain_method_that_returns_a_coroutine_runs_it_in_a_task() -> None:
    # A plain function is served inline, on the reader; a coroutine it returned was advanced there,
    # outside any task, to see whether it finished at once.  A coroutine that needs its task (a
    # timeout, asyncio.current_task(), a call through a proxy with a timeout) failed: "cannot
    # create weak reference to 'NoneType' object", "Timeout should be used inside a task".
    async with _child_connection("wrapped", "_wrapped_main") as conn:
        w = conn.proxy(Wrapped)
        assert await w.with_anyio_timeout(3) == 3
        assert await w.with_asyncio_timeout(4) == 4
        assert await w.in_a_task() is True
        assert await w.forwarded(5) == 6
        # the short path (arguments and nothing else) and the general one (metadata) alike
        with xrpc.call_metadata(k="v"):
            assert await w.with_anyio_timeout(6) == 6
            assert await w.in_a_task() is True


async def test_a_unary_proxy_method_is_a_coroutine_function() -> None:
    # Code that decides whether to await a callable (a framework's handler registry, a test double,
    # xrpc's own export of a proxy) asks inspect/asyncio.iscoroutinefunction.  On Python 3.10 and
    # 3.11, which lack inspect.markcoroutinefunction, a unary proxy method had become a plain
    # function there.
    child = ChildProcess()
    child.start("test_hostile_review9", child.path, child.log_path)
    try:
        with anyio.fail_after(3 * T):
            async with xrpc.connect(child.url) as conn:
                proxy = conn.proxy(Echo)
                for fn in (proxy.ping, type(proxy).ping, conn.proxy(Echo, timeout=T).slow):
                    assert inspect.iscoroutinefunction(fn), (sys.version_info, fn)
                    if sys.version_info < (3, 14):  # (asyncio.iscoroutinefunction is deprecated from 3.14)
                        assert asyncio.iscoroutinefunction(fn), (sys.version_info, fn)
                assert await proxy.ping(1) == 2
                assert await asyncio.create_task(proxy.slow(2)) == 4
    finally:
        lines = child.stop()
    assert errors_in(lines) == [], lines


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
