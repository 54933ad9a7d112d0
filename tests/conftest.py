"""Shared fixtures: a listen URL per transport, a directory for Unix sockets, and a server+client helper."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from typing import Any, AsyncIterator, Iterator

import pytest

import xrpc
from _procs import short_dir

_memory_names = itertools.count(1)

TRANSPORTS = ("memory", "unix", "tcp")


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL to listen on, one per transport."""
    kind = request.param
    if kind == "memory":
        yield f"memory://xrpc-tests-{os.getpid()}-{next(_memory_names)}"
    elif kind == "unix":
        # AF_UNIX paths are limited to ~108 bytes: keep the directory short.
        d = short_dir()
        try:
            yield f"unix://{d}/s.sock"
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield "tcp://127.0.0.1:0"


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short, fresh directory for Unix sockets (AF_UNIX paths are limited to ~108 bytes)."""
    d = short_dir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def serve_and_connect(server: xrpc.Server, url: str, **connect_kwargs: Any) -> AsyncIterator[xrpc.Connection]:
    """Listen on ``url`` with ``server`` and yield a client connection to it."""
    async with server.listen(url) as listener:
        async with xrpc.connect(listener.url, **connect_kwargs) as conn:
            yield conn


# --------------------------------------------------------------------------- event loop backends
# Async tests run through anyio's pytest plugin (anyio_mode = auto).  The core suites run on both
# asyncio and trio; the others, which reach for asyncio-only facilities, on asyncio alone.
BOTH_BACKENDS = {"test_api", "test_versioning", "test_streams", "test_middleware"}


@pytest.fixture(scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "anyio_backend" in metafunc.fixturenames:
        module = metafunc.module.__name__.rsplit(".", 1)[-1]
        backends = ["asyncio", "trio"] if module in BOTH_BACKENDS else ["asyncio"]
        metafunc.parametrize("anyio_backend", backends, indirect=True, scope="module")
