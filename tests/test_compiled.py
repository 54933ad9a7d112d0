"""The compiled protocol core (``XRPC_COMPILE=1 pip install .``, see setup.py).

These tests run when the imported ``xrpc._protocol`` is the compiled one and are skipped otherwise
(the pure-Python package, a checkout).  ``.ci/compiled`` builds it and runs the whole suite against
it with ``XRPC_EXPECT_COMPILED=1``, which makes them fail instead of skipping if the core imported is
not the compiled one.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, AsyncIterator, Protocol

import anyio
import msgspec
import pytest

import xrpc
import xrpc._protocol as protocol
from conftest import serve_and_connect
from _procs import child_env, ROOT_DIR
from _timeouts import T

EXPECTED = os.environ.get("XRPC_EXPECT_COMPILED", "") not in ("", "0")

pytestmark = pytest.mark.skipif(
    not protocol.COMPILED and not EXPECTED,
    reason="the protocol core imported is the pure-Python one (build the compiled one with XRPC_COMPILE=1 pip install .)",
)


def _is_extension(path: str) -> bool:
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_the_core_is_an_extension_module() -> None:
    core = protocol._core
    assert protocol.COMPILED and _is_extension(core.__file__ or "")
    # its classes are native: their methods are C functions, not Python functions
    for cls in (protocol.ProtocolCore, protocol.FrameBuffers, protocol.CallRecord):
        assert not inspect.isfunction(cls.__dict__["__init__"]), cls
    assert not inspect.isfunction(protocol.ProtocolCore.receive_data)
    # the wire messages stay Python (msgspec Structs, already C)
    assert not _is_extension(protocol._frames.__file__ or "")


def test_child_processes_import_the_compiled_core_too() -> None:
    """A child a test starts with the checkout on PYTHONPATH (``child_env``) runs the same core."""
    code = "import xrpc._protocol as p; print(p.COMPILED, p._core.__file__)"
    res = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), cwd=ROOT_DIR, capture_output=True, text=True, timeout=6 * T
    )
    assert res.returncode == 0, res.stderr
    compiled, path = res.stdout.split()
    assert compiled == "True" and path == protocol._core.__file__


def _pure_core() -> ModuleType:
    """``_core.py``, the source the extension was compiled from, loaded as a Python module of its own
    (beside the compiled one, sharing its ``_frames``)."""
    source = Path(protocol._core.__file__ or "").parent / "_core.py"
    spec = importlib.util.spec_from_file_location("xrpc._protocol._core_source", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert inspect.isfunction(module.ProtocolCore.receive_data)
    return module


def _exchange(core: Any) -> list[Any]:
    """A scripted conversation between a client and a server core: every chunk of bytes sent and
    every event received, as plain values to compare."""
    log: list[Any] = []
    c, s = core.ProtocolCore(client=True), core.ProtocolCore(client=False, window=4)
    s.buffers = core.FrameBuffers()

    def pump(src: Any, dst: Any, step: int = 0) -> None:
        data = bytes(src.data_to_send())
        log.append(data)
        pieces = [data[i : i + step] for i in range(0, len(data), step)] if step else [data]
        for piece in pieces:
            for msg, rec in dst.receive_data(piece):
                log.append((msgspec.msgpack.encode(msg), None if rec is None else rec.id))

    c.send_hello()
    pump(c, s)
    s.send_welcome()
    pump(s, c)
    for i in range(5):  # unary calls, one with a deadline and call metadata
        c.send_call("obj", "method", [i, "x" * i], 0, 2.5 if i == 3 else None, {"k": "v"} if i == 4 else None)
    pump(c, s, step=7)  # frames split at every place
    for call_id in sorted(s.incoming):
        if call_id % 4 == 1:
            s.send_error(call_id, protocol.ErrorCode.DECLARED, "KeyError", "missing", ["a"])
        else:
            s.send_reply(call_id, {"id": call_id})
    pump(s, c)
    rec = c.send_call("obj", "upload", [], protocol.CallFlags.STREAM_IN | protocol.CallFlags.STREAM_OUT)
    pump(c, s)
    assert c.send_items(rec.id, [b"a", b"b"])
    assert c.send_items(rec.id, [b"\xff" * 200_000])  # a large frame: received into a buffer of its own
    pump(c, s, step=65_536)
    s.send_credit(rec.id, 3, 200_100)
    assert s.send_items(rec.id, list(range(4)))
    s.send_end(rec.id)
    pump(s, c)
    c.send_end(rec.id)
    c.send_ping(12345)
    c.send_release("obj", 2)
    pump(c, s)
    pump(s, c)
    c.send_goodbye("done")
    pump(c, s)
    log.append((c.state, s.state, s.close_reason, c.emitted, s.emitted, c.conn_send, s.conn_recv, s.conn_pending))
    return log


def test_the_compiled_core_says_what_its_source_says() -> None:
    assert _exchange(protocol) == _exchange(_pure_core())


def test_the_compiled_core_refuses_what_its_source_refuses() -> None:
    pure = _pure_core()
    frames = [
        b"\x00\x00\x00\x00",  # an empty frame
        b"\x00\x00\x00\x03\x93\x02\x01",  # a CALL cut short
        b"\x00\x00\x00\x02\x91\x0b",  # a PING without its nonce
        b"\xff\xff\xff\xff",  # beyond the frame limit
    ]
    for frame in frames:
        reasons = []
        for core in (protocol, pure):
            s = core.ProtocolCore(client=False)
            with pytest.raises(xrpc.RemoteProtocolError) as info:
                s.receive_data(frame)
            reasons.append((str(info.value), s.state))
        assert reasons[0] == reasons[1]


def test_a_python_subclass_of_the_compiled_core_overrides_its_methods() -> None:
    calls: list[int] = []

    class Older(protocol.ProtocolCore):
        def _peer_conn_window(self, window: int) -> None:
            calls.append(window)
            self.conn_known = True

    c, s = Older(client=True), protocol.ProtocolCore(client=False)
    c.send_hello()
    s.receive_data(c.data_to_send())
    s.send_welcome()
    c.receive_data(s.data_to_send())  # the compiled receive_data calls the Python override
    assert calls == [s.conn_window] and c.conn_known and c.state == protocol.State.OPEN


@xrpc.interface
class Echo(Protocol):
    async def echo(self, value: bytes) -> bytes: ...

    def count(self, n: int) -> AsyncIterator[int]: ...

    async def total(self, values: AsyncIterator[int]) -> int: ...


class EchoImpl:
    async def echo(self, value: bytes) -> bytes:
        return value

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def total(self, values: AsyncIterator[int]) -> int:
        return sum([v async for v in values])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme", ["unix", "memory"])
async def test_round_trips_over_the_compiled_core(scheme: str, sock_dir: str) -> None:
    url = f"unix://{sock_dir}/s.sock" if scheme == "unix" else f"memory://xrpc-compiled-{os.getpid()}"
    server = xrpc.Server()
    server.export(Echo, EchoImpl())
    with anyio.fail_after(6 * T):
        async with serve_and_connect(server, url) as conn:
            assert conn._core.__class__ is protocol.ProtocolCore
            echo = conn.proxy(Echo)
            assert await echo.echo(b"hi") == b"hi"
            big = bytes(range(256)) * 4096  # 1 MiB: a large frame each way
            assert await echo.echo(big) == big
            async with anyio.create_task_group() as tg:  # many calls in flight
                results: dict[int, bytes] = {}

                async def one(i: int) -> None:
                    results[i] = await echo.echo(str(i).encode())

                for i in range(64):
                    tg.start_soon(one, i)
            assert results == {i: str(i).encode() for i in range(64)}
            assert [i async for i in echo.count(3000)] == list(range(3000))  # beyond the stream window

            async def values() -> AsyncIterator[int]:
                for i in range(3000):
                    yield i

            assert await echo.total(values()) == sum(range(3000))
