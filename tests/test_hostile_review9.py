"""Hostile review of the unary fast paths: the short path for plain methods of named exports, the
admission at HELLO, proxies whose unary methods return the call's coroutine, and replies handed to
their handler directly.  Real processes and real sockets, timeouts on everything."""

from __future__ import annotations

import asyncio
import inspect
import sys
from typing import Awaitable, Protocol

import anyio
import pytest

import xrpc
from _procs import ChildProcess, errors_in, log_to, serve_until_stdin_closes
from _timeouts import T


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


def _wrapped_main(path: str, log_path: str) -> None:
    """In the child: ``Echo`` on ``path + "b"``, and ``Wrapped`` on ``path``, whose ``forwarded``
    calls that ``Echo`` through a proxy with a timeout."""
    log_to(log_path)

    async def main() -> None:
        backend = xrpc.Server()
        backend.export(Echo, EchoImpl())
        async with anyio.create_task_group() as tg:
            url_b = await tg.start(backend.serve, f"unix://{path}b")
            async with xrpc.connect(url_b) as to_backend:
                server = xrpc.Server()
                server.export(Wrapped, WrappedImpl(to_backend.proxy(Echo, timeout=T)))
                url = await tg.start(server.serve, f"unix://{path}")
                await serve_until_stdin_closes(url)
            tg.cancel_scope.cancel()

    anyio.run(main)


def _relay_main(path: str, log_path: str) -> None:
    """In the child: ``Echo`` served on ``path + "b"``, and on ``path`` a middle server that
    exports a proxy of it (with a timeout) as its own ``Echo``, forwarding each call."""
    log_to(log_path)

    async def main() -> None:
        backend = xrpc.Server()
        backend.export(Echo, EchoImpl())
        async with anyio.create_task_group() as tg:
            url_b = await tg.start(backend.serve, f"unix://{path}b")
            async with xrpc.connect(url_b) as to_backend:
                middle = xrpc.Server()
                middle.export(Echo, to_backend.proxy(Echo, timeout=T))
                middle.export(Echo, to_backend.proxy(Echo), "untimed")
                url = await tg.start(middle.serve, f"unix://{path}")
                await serve_until_stdin_closes(url)
            tg.cancel_scope.cancel()

    anyio.run(main)


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


# ------------------------------------------------------------------------------------ proxies
async def test_a_proxy_with_a_timeout_exported_by_a_middle_process_forwards_its_calls() -> None:
    # A proxy's unary method is a plain function that returns the call's coroutine.  Exported by a
    # middle process (docs/objects.md: "the middle process exports the proxy and forwards each
    # call"), it was taken for a method that runs inline, and its call was started on the reader,
    # outside any task: with a timeout, every forwarded call failed with
    # "TypeError: cannot create weak reference to 'NoneType' object".
    child = ChildProcess(name="relay")
    child.start("test_hostile_review9", child.path, child.log_path, entry="_relay_main")
    try:
        with anyio.fail_after(3 * T):
            async with xrpc.connect(child.url) as conn:
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
    finally:
        lines = child.stop()
    assert errors_in(lines) == [], lines


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in 3.11")
async def test_a_plain_method_that_returns_a_coroutine_runs_it_in_a_task() -> None:
    # A plain function is served inline, on the reader; a coroutine it returned was advanced there,
    # outside any task, to see whether it finished at once.  A coroutine that needs its task (a
    # timeout, asyncio.current_task(), a call through a proxy with a timeout) failed: "cannot
    # create weak reference to 'NoneType' object", "Timeout should be used inside a task".
    child = ChildProcess(name="wrapped")
    child.start("test_hostile_review9", child.path, child.log_path, entry="_wrapped_main")
    try:
        with anyio.fail_after(3 * T):
            async with xrpc.connect(child.url) as conn:
                w = conn.proxy(Wrapped)
                assert await w.with_anyio_timeout(3) == 3
                assert await w.with_asyncio_timeout(4) == 4
                assert await w.in_a_task() is True
                assert await w.forwarded(5) == 6
                # the short path (arguments and nothing else) and the general one (metadata) alike
                with xrpc.call_metadata(k="v"):
                    assert await w.with_anyio_timeout(6) == 6
                    assert await w.in_a_task() is True
    finally:
        lines = child.stop()
    assert errors_in(lines) == [], lines


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
