"""A proxy behaves the same through either ``Caller``: a ``Connection`` or a ``ServiceConnection``.

Promise pipelining through a service connection (the chain waits for a connection, then costs one
round trip; errors, timeouts, reconnecting), and the proxy features both callers must share:
compatibility checks, per-proxy timeouts, one-way calls, streams both ways.  Every test runs a real
service process (``tests/services_fixtures/store.py``) under a private runtime directory.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, AsyncIterator, Protocol

import anyio
import pytest

import xrpc
from xrpc._services import connect_service

from services_fixtures.store import File, NoSuchFile, Store
from test_services import Env, Events, env, watch  # noqa: F401 - ``env`` is a fixture

from _timeouts import T
NAME = "com.example.store"
MODULE = "services_fixtures.store:make_server"
CALLERS = ["connection", "service"]


@xrpc.interface(name="Store")
class NewerStore(Protocol):
    """A client built against a newer Store: parameters the running service does not have."""

    async def open(self, name: str, wait_for_chained: bool = False, mode: str = "r") -> File: ...

    async def log(self) -> list[str]: ...

    @xrpc.oneway
    async def note(self, text: str, loud: bool = False) -> None: ...

    async def total(self, numbers: AsyncIterator[int], scale: int = 1) -> int: ...

    def count(self, n: int, step: int = 1) -> AsyncIterator[int]: ...


def describe_store(env: Env, **environment: str) -> None:
    env.describe(NAME, module=MODULE, environment=environment)


async def logged(store: Any, entry: str) -> list[str]:
    """The service's call log, once it holds ``entry`` (polled, within ``T``)."""
    with anyio.fail_after(T):
        while True:
            log: list[str] = await store.log()
            if entry in log:
                return log
            await anyio.sleep(0.01)


@pytest.fixture
async def caller(request: pytest.FixtureRequest, env: Env) -> AsyncIterator[Any]:
    """The store service, and a caller to it of the kind ``on_either_caller`` picks: a
    ``ServiceConnection``, or a plain ``Connection`` to the same service."""
    describe_store(env)
    async with connect_service(NAME, search_path=env.search_path) as sc:
        if request.param == "service":
            yield sc
            return
        with anyio.fail_after(T):
            await sc.connect()  # launches it
        async with xrpc.connect(sc.url, timeout=T) as conn:
            yield conn


on_either_caller = pytest.mark.parametrize("caller", CALLERS, indirect=True)


async def numbers() -> AsyncIterator[int]:
    for i in (1, 2, 3):
        yield i


# --------------------------------------------------------------------------- pipelining on a service connection
async def test_a_chain_through_a_service_connection_costs_one_round_trip(env: Env) -> None:
    describe_store(env)
    async with connect_service(NAME, search_path=env.search_path) as sc:
        store = xrpc.pipeline(sc.proxy(Store))
        # not connected yet: the chain waits for its first await, which launches the service; the
        # service answers open() only once read() has arrived, addressed to open()'s result
        assert sc.state == "idle"
        with anyio.fail_after(T):
            assert await store.open("a", wait_for_chained=True).read() == "contents of a"
        assert sc.launches == 1
        # connected: sent at once, as on a plain connection
        with anyio.fail_after(T):
            assert await store.open("b", wait_for_chained=True).read() == "contents of b"
            first = store.open("c")
            chained = first.read()
            assert "open c" in await logged(sc.proxy(Store), "open c")  # before anything awaited them
            assert await chained == "contents of c"
            assert await sc.proxy(Store).log() == [
                "open a", "chained seen: True", "read a",
                "open b", "chained seen: True", "read b",
                "open c", "read c",
            ]  # fmt: skip


async def test_the_promises_of_one_chain_send_each_call_once(env: Env) -> None:
    describe_store(env)
    async with connect_service(NAME, search_path=env.search_path) as sc:
        store = xrpc.pipeline(sc.proxy(Store))
        got: dict[str, Any] = {}

        async def get(key: str, promise: Any) -> None:
            got[key] = await promise

        with anyio.fail_after(T):
            opened = store.open("a")
            read = opened.read()
            async with anyio.create_task_group() as tg:  # both wait for the one launch
                tg.start_soon(get, "read", read)
                tg.start_soon(get, "file", opened)
            assert got["read"] == "contents of a"
            assert await read == "contents of a"  # awaited again: the answer, not another call
            assert await got["file"].read() == "contents of a"  # open()'s result is the File
            assert await opened.read() == "contents of a"  # chained on an answered promise
            assert sc.launches == 1
            assert await sc.proxy(Store).log() == ["open a", "read a", "read a", "read a"]


async def test_an_error_of_the_first_call_fails_the_chained_call(env: Env) -> None:
    describe_store(env)
    async with connect_service(NAME, search_path=env.search_path) as sc:
        with anyio.fail_after(T):
            # an error of the service
            opened = xrpc.pipeline(sc.proxy(Store)).open("missing")
            chained = opened.read()
            with pytest.raises(xrpc.ObjectNotFound, match="the call it depends on failed"):
                await chained
            with pytest.raises(NoSuchFile):
                await opened
            # a call refused here, against the version of the service running (never sent)
            opened = xrpc.pipeline(sc.proxy(NewerStore)).open("b", mode="w")
            chained = opened.read()
            with pytest.raises(xrpc.ValidationError, match="no parameter 'mode'"):
                await chained
            with pytest.raises(xrpc.ValidationError, match="no parameter 'mode'"):
                await opened
            assert await sc.proxy(Store).log() == ["open missing"]


async def test_timeouts_apply_to_a_pipelined_chain(env: Env) -> None:
    describe_store(env)
    async with connect_service(NAME, search_path=env.search_path) as sc:
        store = xrpc.pipeline(sc.proxy(Store, timeout=0.3))
        with anyio.fail_after(T):
            await sc.connect()  # launching may take longer than the timeout
            assert await store.open("a").read() == "contents of a"
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await store.open("b").hang()
            assert time.monotonic() - t0 < 3.0
            await logged(sc.proxy(Store), "hang cancelled")  # and the call was cancelled there


async def test_a_pipelined_chain_s_timeout_counts_the_launch(env: Env) -> None:
    # launching takes > 0.8 s and the chained call 1.2 s: each fits in 2 s, both together do not
    describe_store(env, STORE_START_DELAY="0.8")
    async with connect_service(NAME, search_path=env.search_path) as sc:
        with anyio.fail_after(T):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await xrpc.pipeline(sc.proxy(Store, timeout=2.0)).open("a").slow_read(1.2)
            assert time.monotonic() - t0 < 3.0
            assert await xrpc.pipeline(sc.proxy(Store)).open("b").read() == "contents of b"


async def test_a_pipelined_call_after_the_service_restarted_reconnects(env: Env) -> None:
    describe_store(env)
    events = Events()
    async with connect_service(NAME, search_path=env.search_path, **events.kwargs()) as sc:
        store = xrpc.pipeline(sc.proxy(Store))
        with anyio.fail_after(T):
            pid = await sc.proxy(Store).pid()
            old = store.open("a")
            assert await old.read() == "contents of a"
        with watch(pid) as w:
            os.kill(pid, signal.SIGKILL)
            await w.exited()
        await events.wait_for(1)
        assert sc.state == "interrupted"
        with anyio.fail_after(T):
            # the object was in the instance that is gone: a call on it fails ...
            with pytest.raises((xrpc.ConnectionInterrupted, xrpc.ConnectionInvalidated)):
                await old.read()
            assert sc.state == "interrupted"
            # ... and a new chain reconnects (here: launches the service again), in one round trip
            assert await store.open("b", wait_for_chained=True).read() == "contents of b"
            assert await sc.proxy(Store).pid() != pid
            assert await sc.proxy(Store).log() == ["open b", "chained seen: True", "read b"]
        assert sc.launches == 2
    assert events.seen == ["interrupted", "invalidated"]


# --------------------------------------------------------------------------- the same on both callers
@on_either_caller
async def test_pipelining_on_either_caller(caller: Any) -> None:
    store = xrpc.pipeline(caller.proxy(Store))
    with anyio.fail_after(T):
        assert await store.open("a", wait_for_chained=True).read() == "contents of a"
        with pytest.raises(xrpc.ObjectNotFound):
            await store.open("missing").read()
        assert await caller.proxy(Store).log() == ["open a", "chained seen: True", "read a", "open missing"]


@on_either_caller
async def test_a_parameter_the_peer_lacks_is_refused_on_either_caller(caller: Any) -> None:
    newer = caller.proxy(NewerStore)
    with anyio.fail_after(T):
        with pytest.raises(xrpc.ValidationError, match="no parameter 'mode'"):
            await newer.open("a", mode="w")
        with pytest.raises(xrpc.ValidationError, match="no parameter 'mode'"):
            await xrpc.pipeline(newer).open("a", mode="w").read()
        with pytest.raises(xrpc.ValidationError, match="no parameter 'loud'"):
            await newer.note("hi", loud=True)
        with pytest.raises(xrpc.ValidationError, match="no parameter 'scale'"):
            await newer.total(numbers(), scale=2)
        with pytest.raises(xrpc.ValidationError, match="no parameter 'step'"):
            async for _ in newer.count(3, step=2):
                pytest.fail("refused before it is sent")  # pragma: no cover
        # at their defaults the new parameters are not sent, and every call works
        assert await (await newer.open("a")).read() == "contents of a"
        assert await xrpc.pipeline(newer).open("b").read() == "contents of b"
        await newer.note("hi")
        assert await newer.total(numbers()) == 6
        assert [x async for x in newer.count(3)] == [0, 1, 2]
        assert await logged(newer, "count 3") == [
            "open a", "read a", "open b", "read b", "note hi", "total [1, 2, 3]", "count 3",
        ]  # fmt: skip


@on_either_caller
async def test_a_per_proxy_timeout_on_either_caller(caller: Any) -> None:
    quick = caller.proxy(Store, timeout=0.3)
    with anyio.fail_after(T):
        assert await caller.proxy(Store).pid() > 0  # connected (launching may take longer than 0.3 s)
        assert await quick.pid() > 0
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await quick.hang()
        assert time.monotonic() - t0 < 3.0
        await logged(caller.proxy(Store), "hang cancelled")  # cancelled on the service too
        assert await caller.proxy(Store).pid() > 0  # the caller carries on


@on_either_caller
async def test_a_oneway_call_on_either_caller(caller: Any) -> None:
    store = caller.proxy(Store)
    with anyio.fail_after(T):
        assert await store.note("first") is None
        await store.note("second")
        log = await logged(store, "note second")
        assert log == ["note first", "note second"]


@on_either_caller
async def test_streams_both_ways_on_either_caller(caller: Any) -> None:
    store = caller.proxy(Store)
    with anyio.fail_after(T):
        assert await store.total(numbers()) == 6
        assert [x async for x in store.count(4)] == [0, 1, 2, 3]
        assert await store.log() == ["total [1, 2, 3]", "count 4"]
