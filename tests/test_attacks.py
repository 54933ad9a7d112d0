"""Resource attacks on a live Unix-socket server, each next to a well-behaved client that must keep working.

Where memory is asserted the server runs in a child process (``ServerProcess``), so that its RSS is
its own: the peak (VmHWM) during an attack is compared with the RSS before it.  Those children log
to a file, which is checked for ERROR records at the end of every test.  The other attacks run the
server in this process.

Memory figures are printed (``pytest -s``) as ``MEM <test>: ...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Protocol

import anyio
import msgspec
import pytest

import xrpc
from xrpc._protocol import (
    PROTOCOL_VERSION,
    Call,
    Cancel,
    Credit,
    End,
    ErrorCode,
    Goodbye,
    Hello,
    Item,
    Ping,
    Release,
    Reply,
    Welcome,
)
from xrpc._protocol import Error as ErrorFrame

import _wire
from _procs import ChildProcess, errors_in, fd_count, kernel_has_peer_pidfd, log_to, serve_until_stdin_closes, short_dir
from _wire import ERROR_TAG, GOODBYE_TAG, HELLO, REPLY_TAG, WELCOME_TAG, frame, raw, read_to_end
from _timeouts import T
from _fuzz import Plans, cut_anywhere, mutate, nested, run_jobs, send_and_read_to_end, shuffled_jobs

MiB = 1024 * 1024
MEMORY_BUDGET = 64 * MiB  # the most an attack may add to the server's peak RSS


# --------------------------------------------------------------------------- the service
class WatchedSet(set):  # type: ignore[type-arg]
    """``Server.connections`` that lets a task wait until it holds exactly ``n`` connections."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[tuple[int, anyio.Event]] = []

    def add(self, item: Any) -> None:
        super().add(item)
        self._notify()

    def discard(self, item: Any) -> None:
        super().discard(item)
        self._notify()

    def _notify(self) -> None:
        for n, event in self._waiters:
            if len(self) == n:
                event.set()

    async def wait_len(self, n: int) -> None:
        if len(self) == n:
            return
        entry = (n, anyio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        finally:
            self._waiters.remove(entry)


@xrpc.interface
class Token(Protocol):
    async def value(self) -> int: ...


class TokenImpl:
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    async def value(self) -> int:
        return self.n


@xrpc.interface
class Svc(Protocol):
    async def spawn(self, n: int) -> list[Token]: ...
    async def add(self, a: int, b: int) -> int: ...
    async def echo(self, s: str) -> str: ...
    async def take(self, x: object) -> int: ...
    async def hold(self) -> int: ...
    async def holding(self) -> int: ...
    async def release(self) -> None: ...
    async def settle(self, n: int) -> int: ...


class SvcImpl:
    def __init__(self, connections: WatchedSet) -> None:
        self.gate = anyio.Event()
        self.held = 0
        self.connections = connections

    async def spawn(self, n: int) -> list[TokenImpl]:
        return [TokenImpl(i) for i in range(n)]

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def echo(self, s: str) -> str:
        return s

    async def take(self, x: object) -> int:
        return 1

    async def hold(self) -> int:
        self.held += 1
        try:
            await self.gate.wait()
        finally:
            self.held -= 1
        return 1

    async def holding(self) -> int:
        return self.held

    async def release(self) -> None:
        self.gate.set()

    async def settle(self, n: int) -> int:
        """Wait until the server holds exactly ``n`` connections."""
        await self.connections.wait_len(n)
        return len(self.connections)


def make_server(limits: xrpc.Limits | None = None, max_connections: int = 10000) -> tuple[xrpc.Server, WatchedSet]:
    """A server exporting ``Svc``, and its connection table (which tests can wait on)."""
    server = xrpc.Server(limits=limits, max_connections=max_connections)
    connections = WatchedSet()
    server.connections = connections
    server.export(Svc, SvcImpl(connections))
    return server, connections


def _server_main(path: str, limits: str, max_connections: str, log_path: str) -> None:
    """Entry point of the server child process (see ``ServerProcess``)."""
    log_to(log_path)

    async def main() -> None:
        server, _ = make_server(xrpc.Limits(**json.loads(limits)), int(max_connections))
        async with server.listen(f"unix://{path}") as listener:
            await serve_until_stdin_closes(listener.url)

    anyio.run(main)


class ServerProcess(ChildProcess):
    """An xrpc server in a child process, on a Unix socket, logging to a file."""

    def __init__(self, limits: dict[str, Any] | None = None, max_connections: int = 10000) -> None:
        super().__init__()
        self.start("test_attacks", self.path, json.dumps(limits or {}), str(max_connections), self.log_path)


@pytest.fixture
def server_process(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A factory for ``ServerProcess``; each one is stopped and its log checked for ERRORs."""
    started: list[ServerProcess] = []

    def start(limits: dict[str, Any] | None = None, max_connections: int = 10000) -> ServerProcess:
        sp = ServerProcess(limits, max_connections)
        started.append(sp)
        return sp

    yield start
    for sp in started:
        assert sp.alive(), f"the server process died (exit code {sp.proc.returncode})"
        lines = sp.stop()
        errors = errors_in(lines)
        assert errors == [], "\n".join(errors[:10])
        assert sp.proc.returncode == 0, lines[-20:]


class Memory:
    """The server's RSS before an attack and its peak after."""

    def __init__(self, sp: ServerProcess, name: str) -> None:
        self.sp = sp
        self.name = name
        self.before = sp.rss()
        self.peak_before = sp.peak()
        self.after = self.peak_after = 0

    def measure(self) -> int:
        self.after = self.sp.rss()
        self.peak_after = self.sp.peak()
        growth = self.peak_after - self.before
        print(
            f"\nMEM {self.name}: rss before {self.before / MiB:.1f} MiB, after {self.after / MiB:.1f} MiB, "
            f"peak {self.peak_before / MiB:.1f} -> {self.peak_after / MiB:.1f} MiB, peak growth {growth / MiB:.1f} MiB"
        )
        return growth


# --------------------------------------------------------------------------- the well-behaved client
@dataclasses.dataclass
class GoodReport:
    calls: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    max_latency: float = 0.0


@contextlib.asynccontextmanager
async def good_client(url: str, *, min_calls: int = 20, seed: int = 1) -> AsyncIterator[GoodReport]:
    """Call ``add`` and ``echo`` in a loop for the duration of the block, checking every answer.

    On exit it waits until at least ``min_calls`` round trips were made, so it really ran alongside.
    """
    report = GoodReport()
    stop = anyio.Event()
    enough = anyio.Event()
    async with xrpc.connect(url, timeout=T) as conn:
        svc = conn.proxy(Svc)

        async def loop(rng: random.Random) -> None:
            while not stop.is_set():
                a, b = rng.randint(-(10**9), 10**9), rng.randint(-(10**9), 10**9)
                text = f"{a}/{b}"
                start = time.monotonic()
                try:
                    with anyio.fail_after(T):
                        got = await svc.add(a, b)
                        echoed = await svc.echo(text)
                except Exception as exc:  # asserted on by the test
                    report.failures.append(f"add({a}, {b}): {exc!r}")
                    enough.set()
                    return
                report.max_latency = max(report.max_latency, time.monotonic() - start)
                if got != a + b or echoed != text:
                    report.failures.append(f"add({a}, {b}) -> {got!r}, echo -> {echoed!r}")
                report.calls += 1
                if report.calls >= min_calls:
                    enough.set()

        async with anyio.create_task_group() as tg:
            rng = random.Random(seed)
            for _ in range(2):
                tg.start_soon(loop, random.Random(rng.getrandbits(64)))
            try:
                yield report
                with anyio.fail_after(3 * T):
                    await enough.wait()
            finally:
                stop.set()
    assert report.failures == [], report.failures[:5]
    assert report.calls >= min_calls


# --------------------------------------------------------------------------- raw connections
def decode_frames(data: bytes) -> list[Any]:
    """The frames at the start of ``data``, up to an empty or undecodable one."""
    return _wire.decode_frames(data, stop_at_empty=True, stop_at_garbage=True)


# --------------------------------------------------------------------------- 4 GiB length prefix
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "when, size",
    [
        pytest.param("after HELLO", 0xFFFFFFFF, id="4GiB-after-hello"),
        pytest.param("before HELLO", 0xFFFFFFFF, id="4GiB-before-hello"),
        pytest.param("after HELLO", xrpc.Limits().max_frame + 1, id="max_frame+1-after-hello"),
    ],
)
async def test_huge_length_prefix_is_refused_at_once(server_process: Any, when: str, size: int) -> None:
    sp = server_process()
    mem = Memory(sp, f"length prefix {size:#x} {when}")
    async with good_client(sp.url):
        async with await anyio.connect_unix(sp.path) as stream:
            if when == "after HELLO":
                await stream.send(HELLO)
            start = time.monotonic()
            # the prefix and a few body bytes; no EOF from us: the server must not wait for the body
            await stream.send(size.to_bytes(4, "big") + b"\x00" * 64)
            data, how = await read_to_end(stream, T)
            elapsed = time.monotonic() - start
    frames = decode_frames(data)
    goodbyes = [f for f in frames if f[0] == GOODBYE_TAG]
    assert len(goodbyes) == 1 and frames[-1][0] == GOODBYE_TAG, frames
    assert "exceeds" in goodbyes[0][1] and str(size) in goodbyes[0][1]
    assert how in ("eof", "reset")
    assert elapsed < 5.0  # well before the 10 s handshake timeout: the prefix alone decided
    assert mem.measure() < MEMORY_BUDGET


@pytest.mark.timeout(120)
async def test_a_length_prefix_alone_allocates_nothing(server_process: Any) -> None:
    n = 16
    size = xrpc.Limits().max_frame  # the largest frame the server accepts
    sp = server_process()
    mem = Memory(sp, f"{n} connections announcing {size}-byte frames")
    with anyio.fail_after(6 * T):
        async with good_client(sp.url), contextlib.AsyncExitStack() as stack:
            for _ in range(n):
                stream = await stack.enter_async_context(await anyio.connect_unix(sp.path))
                # one write: the server reads the prefix in the same chunk as the HELLO it answers
                await stream.send(HELLO + size.to_bytes(4, "big") + b"\x91")
                received = bytearray()
                while not any(f[0] == WELCOME_TAG for f in decode_frames(bytes(received))):
                    received += await stream.receive()
            growth = mem.measure()
    assert growth < MEMORY_BUDGET


async def test_a_frame_over_the_handshake_limit_before_hello_is_refused() -> None:
    """Before HELLO the server takes frames of at most ``Limits.handshake_max_frame`` (1 MiB): a
    larger length prefix is answered with GOODBYE saying why, and the connection is closed."""
    limit = xrpc.Limits().handshake_max_frame
    assert limit == 1 << 20
    server, connections = make_server()
    d = short_dir()
    try:
        with anyio.fail_after(3 * T):
            async with server.listen(f"unix://{d}/s.sock") as listener:
                async with good_client(listener.url):
                    async with await anyio.connect_unix(f"{d}/s.sock") as stream:
                        await stream.send((limit + 1).to_bytes(4, "big") + b"\0" * 1000)
                        data, how = await read_to_end(stream, T)
                    assert how in ("eof", "reset")
                    frames = decode_frames(data)
                    assert frames and frames[-1][0] == GOODBYE_TAG, frames
                    assert frames[-1][2] == ErrorCode.VALIDATION
                    assert f"before HELLO exceeds the handshake limit of {limit} bytes" in frames[-1][1], frames[-1]
                    await connections.wait_len(1)  # the good client only
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- slow loris
async def test_slow_loris_is_closed_after_the_handshake_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    timeout = 1.0
    server, connections = make_server(xrpc.Limits(handshake_timeout=timeout))
    d = short_dir()
    sent = 0
    try:
        with anyio.fail_after(3 * T):
            async with server.listen(f"unix://{d}/s.sock") as listener:
                async with good_client(listener.url, min_calls=50):
                    async with await anyio.connect_unix(f"{d}/s.sock") as stream:
                        start = time.monotonic()
                        closed_at = 0.0

                        async def dribble() -> None:
                            nonlocal sent
                            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                                for i in range(len(HELLO)):
                                    await stream.send(HELLO[i : i + 1])
                                    sent += 1
                                    await anyio.sleep(0.2)  # the attacker's pace, not a wait for a condition

                        async with anyio.create_task_group() as tg:
                            tg.start_soon(dribble)
                            data, how = await read_to_end(stream, 10)
                            closed_at = time.monotonic() - start
                            tg.cancel_scope.cancel()
                # only the good client is left (it leaves with the block above)
                await connections.wait_len(0)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert sent < len(HELLO)  # the HELLO was never completed ...
    assert timeout * 0.9 <= closed_at < timeout + 2.0  # ... and the server hung up on its own schedule
    assert data == b"" or all(f[0] == GOODBYE_TAG for f in decode_frames(data))
    assert any("no handshake" in r.getMessage() for r in caplog.records if r.name == "xrpc")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_idle_unauthenticated_connections_are_closed() -> None:
    timeout = 1.0
    server, connections = make_server(xrpc.Limits(handshake_timeout=timeout))
    d = short_dir()
    path = f"{d}/s.sock"
    outcomes: list[tuple[str, float]] = []
    try:
        with anyio.fail_after(6 * T):
            async with server.listen(f"unix://{path}") as listener:
                async with good_client(listener.url, min_calls=50):
                    async with contextlib.AsyncExitStack() as stack:
                        streams = [await stack.enter_async_context(await anyio.connect_unix(path)) for _ in range(300)]
                        start = time.monotonic()
                        # a third say nothing, a third send half a HELLO, a third a HELLO's length prefix only
                        for i, s in enumerate(streams):
                            if i % 3 == 1:
                                await s.send(HELLO[: len(HELLO) // 2])
                            elif i % 3 == 2:
                                await s.send(HELLO[:4])

                        async def watch(s: anyio.abc.ByteStream) -> None:
                            _, how = await read_to_end(s, timeout + 10)
                            outcomes.append((how, time.monotonic() - start))

                        async with anyio.create_task_group() as tg:
                            for s in streams:
                                tg.start_soon(watch, s)
                    await connections.wait_len(1)  # the good client only
                await connections.wait_len(0)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert len(outcomes) == 300
    assert all(how in ("eof", "reset") for how, _ in outcomes)
    assert max(t for _, t in outcomes) < timeout + 5.0


@pytest.mark.timeout(120)
async def test_idle_unauthenticated_connections_cost_little_memory(server_process: Any) -> None:
    """Connections that never finish HELLO must be cheap: a read buffer per connection (256 KiB each,
    once) would let 1000 of them pin ~270 MiB, and the default max_connections ~2.7 GiB."""
    n = 1000
    # a long handshake timeout, so that all of them are open at the moment of measuring
    sp = server_process({"handshake_timeout": 60.0})
    mem = Memory(sp, f"{n} idle connections before HELLO")
    with anyio.fail_after(6 * T):
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(n):
                stream = await stack.enter_async_context(await anyio.connect_unix(sp.path))
                await stream.send(HELLO[:3])
            async with xrpc.connect(sp.url, timeout=T) as conn:
                assert await conn.proxy(Svc).settle(n + 1) == n + 1  # the server holds them all
            growth = mem.measure()
    print(f"MEM per idle connection: {growth / n / 1024:.0f} KiB")
    assert growth < MEMORY_BUDGET


# --------------------------------------------------------------------------- descriptor flood
@pytest.mark.timeout(120)
async def test_descriptor_flood_is_bounded(server_process: Any) -> None:
    """A peer attaching SCM_RIGHTS descriptors that nothing claims cannot exhaust the server's fds: at
    most ``Limits.max_fds`` are held for it, and past that the connection ends with a GOODBYE
    (descriptors before the handshake, and the per-process cap: tests/test_fd_attacks.py)."""
    sp = server_process()
    per_message, messages = 16, 60
    max_fds = xrpc.Limits().max_fds
    with anyio.fail_after(6 * T):
        async with good_client(sp.url), xrpc.connect(sp.url, timeout=T) as admin:
            baseline = fd_count(sp.proc.pid)
            peak = baseline
            with open(os.devnull, "rb") as junk:
                async with await anyio.connect_unix(sp.path) as stream:
                    await stream.send(HELLO)
                    received = bytearray()
                    while not any(f[0] == WELCOME_TAG for f in decode_frames(bytes(received))):
                        received += await stream.receive()
                    try:
                        for nonce in range(1, messages):
                            await stream.send_fds(frame(Ping(nonce)), [junk] * per_message)
                            peak = max(peak, fd_count(sp.proc.pid))
                    except anyio.BrokenResourceError:
                        pass  # the server has closed the connection
                    data, how = await read_to_end(stream, T)
            goodbyes = [f for f in decode_frames(bytes(received) + data) if f[0] == GOODBYE_TAG]
            # the attacker is gone: every descriptor it sent is closed
            assert await admin.proxy(Svc).settle(2) == 2
            after = fd_count(sp.proc.pid)
    print(f"\nFDS sent up to {per_message * messages}; server fds {baseline} before, {peak} at most while connected, {after} after")
    assert goodbyes and goodbyes[0][2] == ErrorCode.LIMIT and "max_fds" in goodbyes[0][1], goodbyes
    # held: at most max_fds; for an instant also what one recvmsg installs before it is looked at (64)
    assert peak - baseline <= max_fds + 64 + 8
    assert after == baseline


# --------------------------------------------------------------------------- calls in flight
@pytest.mark.timeout(180)
async def test_ten_thousand_calls_in_flight(server_process: Any) -> None:
    limit, total = 1000, 10_000
    sp = server_process({"max_calls_in_flight": limit})
    mem = Memory(sp, f"{total} calls in flight, limit {limit}")
    results = {"ok": 0, "limited": 0}
    others: list[str] = []
    all_refused = anyio.Event()
    with anyio.fail_after(12 * T):
        async with xrpc.connect(sp.url, timeout=T) as admin, good_client(sp.url, min_calls=100) as report:
            async with xrpc.connect(sp.url, timeout=T) as attacker:
                svc = attacker.proxy(Svc)

                async def one() -> None:
                    try:
                        answer = await svc.hold()
                        results["ok"] += answer
                    except xrpc.LimitExceeded:
                        results["limited"] += 1
                        if results["limited"] == total - limit:
                            all_refused.set()
                    except Exception as exc:
                        others.append(repr(exc))

                async with anyio.create_task_group() as tg:
                    for _ in range(total):
                        tg.start_soon(one)
                    await all_refused.wait()
                    held = await admin.proxy(Svc).holding()
                    growth = mem.measure()
                    calls_before_release = report.calls
                    await admin.proxy(Svc).release()
                # the attacking connection is still usable once its calls are done
                assert await svc.add(1, 2) == 3
    assert others == []
    assert held == limit
    assert results == {"ok": limit, "limited": total - limit}
    assert calls_before_release > 0  # the other client was served while the limit was reached
    assert growth < MEMORY_BUDGET


# --------------------------------------------------------------------------- deep nesting
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["array", "map", "mixed"])
async def test_deeply_nested_payload(server_process: Any, kind: str) -> None:
    depth = 100_000
    sp = server_process()
    mem = Memory(sp, f"{depth} nested {kind}s")
    payload = msgspec.Raw(b"\x91" + nested(depth, kind))  # the argument list holds one deep value
    async with good_client(sp.url):
        async with await anyio.connect_unix(sp.path) as stream:
            await stream.send(HELLO + frame(Call(1, "Svc", "take", payload)) + frame(Call(3, "Svc", "add", msgspec.Raw(b"\x92\x01\x02"))))
            await stream.send_eof()
            data, how = await read_to_end(stream, T)
    frames = decode_frames(data)
    validation = [f for f in frames if f[0] == ERROR_TAG and f[1] == 1 and f[2] == ErrorCode.VALIDATION]
    goodbye = [f for f in frames if f[0] == GOODBYE_TAG and f[1]]
    assert validation or goodbye, frames  # refused with a ValidationError, or closed with a reason
    if goodbye:
        assert "depth" in goodbye[0][1] or "nest" in goodbye[0][1] or "recursion" in goodbye[0][1], goodbye
    assert how in ("eof", "reset")
    assert not [f for f in frames if f[0] == REPLY_TAG and f[1] == 1]  # the method never ran
    assert mem.measure() < MEMORY_BUDGET


async def test_deep_but_legal_nesting_through_the_api() -> None:
    """A nested value within the codec's depth limit travels; the server is unaffected either way."""
    server, _ = make_server()
    d = short_dir()
    try:
        with anyio.fail_after(3 * T):
            async with server.listen(f"unix://{d}/s.sock") as listener:
                async with xrpc.connect(listener.url, timeout=T) as conn:
                    value: Any = None
                    for _ in range(100):
                        value = [value]
                    assert await conn.proxy(Svc).take(value) == 1
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- max_connections
async def test_max_connections(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    limit = 5
    server, connections = make_server(max_connections=limit)
    d = short_dir()
    try:
        with anyio.fail_after(6 * T):
            async with server.listen(f"unix://{d}/s.sock") as listener:
                async with contextlib.AsyncExitStack() as stack:
                    conns = [await stack.enter_async_context(xrpc.connect(listener.url, timeout=T)) for _ in range(limit)]
                    for i, c in enumerate(conns):
                        assert await c.proxy(Svc).add(i, 1) == i + 1
                    assert len(connections) == limit
                    with pytest.raises(xrpc.Error):
                        async with xrpc.connect(listener.url, timeout=T):
                            pytest.fail(f"connection {limit + 1} was accepted")
                    # the open ones are unaffected
                    for i, c in enumerate(conns):
                        assert await c.proxy(Svc).add(i, 2) == i + 2
                    # one leaves: a new one is accepted
                    await conns[0].aclose()
                    await connections.wait_len(limit - 1)
                    async with xrpc.connect(listener.url, timeout=T) as extra:
                        assert await extra.proxy(Svc).add(40, 2) == 42
                        assert len(connections) == limit
    finally:
        shutil.rmtree(d, ignore_errors=True)
    warnings = [r.getMessage() for r in caplog.records if r.name == "xrpc" and r.levelno == logging.WARNING]
    assert sum(f"already {limit} connections" in m for m in warnings) == 1, warnings
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.skipif(not kernel_has_peer_pidfd(), reason="no SO_PEERPIDFD (Linux < 6.5): no pidfd to leak")
@pytest.mark.timeout(120)
async def test_refused_connections_leak_no_descriptors(server_process: Any) -> None:
    limit, attempts = 2, 50
    sp = server_process(max_connections=limit)
    with anyio.fail_after(6 * T):
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(limit):
                await stack.enter_async_context(xrpc.connect(sp.url, timeout=T))
            before = fd_count(sp.proc.pid)
            for _ in range(attempts):
                with pytest.raises(xrpc.Error):
                    async with xrpc.connect(sp.url, timeout=T):
                        pytest.fail("a connection over max_connections was accepted")
            after = fd_count(sp.proc.pid)
    print(f"\nFDS server fds {before} before {attempts} refused connections, {after} after")
    assert after == before


# --------------------------------------------------------------------------- 100,000 malformed inputs
SEED = 0xA77AC6
CONNECTIONS = 2000
INPUTS_PER_CONNECTION = 50
PARALLEL = 16


def _call(call_id: int, rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.5:
        return frame(Call(call_id, "Svc", "add", raw([rng.randint(-99, 99), rng.randint(-99, 99)])))
    if r < 0.8:
        text = "".join(rng.choice("abcxyz é€\x00") for _ in range(rng.randint(0, 12)))
        return frame(Call(call_id, "Svc", "echo", raw([text])))
    return frame(Call(call_id, "Svc", "take", raw([{"k": [1, 2.5, "x", None, b"\x00"]}])))


def _any_frame(rng: random.Random, call_id: int) -> bytes:
    """A well-formed frame of any type, with ids that may or may not make sense."""
    some_id = rng.choice([call_id, call_id + 1, 0, -1, 2, 2**63 - 1, rng.randint(-(2**31), 2**31)])
    payload = raw(rng.choice([None, 1, "x", [1, 2], {"a": 1}]))
    msg = rng.choice(
        [
            Call(call_id, "Svc", rng.choice(["add", "echo", "take", "nope", ""]), payload, rng.choice([0, 1, 2, 4, 6, 7, 255, -1])),
            Call(call_id, rng.choice(["Svc", "Nope", "", "x" * 300]), "add", payload, 0, rng.choice([None, 0.0, -1.0, 1e308, float("nan")])),
            Reply(some_id, payload),
            ErrorFrame(some_id, rng.randint(-5, 20), "X", "y", None),
            Item(some_id, rng.choice([0, 1, 2**31, -1]), payload),
            End(some_id),
            Credit(some_id, rng.choice([0, 1, -1, 2**40, 2**62]), rng.choice([0, -1, 2**62])),
            Cancel(some_id),
            Release(rng.choice(["Svc", "", "x"]), rng.choice([1, 0, -1, 2**62])),
            Ping(rng.randint(0, 2**63 - 1)),
            Welcome(PROTOCOL_VERSION, 1 << 20),
            Hello(rng.choice([PROTOCOL_VERSION, 0, 2, -1]), rng.choice([1 << 20, 0, 1, 2**62])),
            Goodbye("bye", rng.randint(-1, 12)),
        ]
    )
    return frame(msg)


def plan_hello_then_any_frames(rng: random.Random, n: int) -> tuple[list[bytes], bool]:
    frames = [HELLO]
    for k in range(n - 1):
        f = _any_frame(rng, 2 * k + 1)
        frames.append(mutate(f, rng) if rng.random() < 0.2 else f)
    return frames, False


PLAN = Plans(_call, mutated_share=0.3)


def _wrong_value(rng: random.Random) -> Any:
    return rng.choice([None, True, -1, 2**64 - 1, 1.5, "x", b"\x00", [], {}, {"a": [1]}, [[1, 2], "y"], "\u0000" * 10])


def plan_hello_then_bad_arguments(rng: random.Random, n: int) -> tuple[list[bytes], bool]:
    """Well-formed envelopes whose arguments the method's decoder must refuse (the connection survives)."""
    frames = [HELLO]
    for k in range(n - 1):
        args = [_wrong_value(rng) for _ in range(rng.randint(0, 4))]
        method = rng.choice(["add", "echo", "settle"])
        frames.append(frame(Call(2 * k + 1, "Svc", method, raw(args))))
    return frames, False


def plan_deep_nesting(rng: random.Random, n: int) -> tuple[list[bytes], bool]:
    frames = [HELLO]
    for k in range(n - 1):
        depth = rng.choice([10, 100, 1000, 10_000, 100_000])
        payload = msgspec.Raw(b"\x91" + nested(depth, rng.choice(["array", "map", "mixed"])))
        frames.append(frame(Call(2 * k + 1, "Svc", "take", payload)))
    return frames, False


def plan_bad_utf8(rng: random.Random, n: int) -> tuple[list[bytes], bool]:
    frames = [HELLO]
    for k in range(n - 1):
        f = bytearray(_call(2 * k + 1, rng))
        at = f.find(b"Svc")
        f[at : at + 1] = bytes([rng.choice([0xFF, 0xC0, 0xED, 0x80])])
        frames.append(bytes(f))
    return frames, False


PLANS = [
    PLAN.plan_random_bytes,
    PLAN.plan_random_bodies,
    PLAN.plan_hello_then_random_bodies,
    PLAN.plan_hello_then_mutated_calls,
    PLAN.plan_hello_then_mutated_calls,
    plan_hello_then_any_frames,
    plan_hello_then_any_frames,
    plan_hello_then_bad_arguments,
    PLAN.plan_mutated_hello,
    PLAN.plan_huge_prefix,
    PLAN.plan_zero_length,
    PLAN.plan_truncated,
    PLAN.plan_call_before_hello,
    plan_deep_nesting,
    plan_bad_utf8,
]


@dataclasses.dataclass
class Outcome:
    plan: str
    inputs: int
    how: str


async def _bad_connection(path: str, plan: Any, rng: random.Random) -> Outcome:
    chunks, closes_by_itself = plan(rng, INPUTS_PER_CONNECTION)
    # sometimes glue everything together and cut it anywhere
    to_send = cut_anywhere(b"".join(chunks), rng) if rng.random() < 0.5 else chunks
    _, how = await send_and_read_to_end(path, to_send, eof=not closes_by_itself, timeout=T)
    return Outcome(plan.__name__, len(chunks), how)


@pytest.mark.timeout(240)
async def test_a_hundred_thousand_malformed_inputs(server_process: Any) -> None:
    # max_frame is lowered so that the peak memory asserted here does not depend on how many mutated
    # length prefixes happen to be pending at once (that cost is test_a_length_prefix_alone_allocates_nothing's)
    sp = server_process({"max_frame": 1 << 20})
    mem = Memory(sp, f"{CONNECTIONS * INPUTS_PER_CONNECTION} malformed inputs")
    jobs = shuffled_jobs(PLANS, CONNECTIONS, random.Random(SEED))
    outcomes: list[Outcome] = []
    start = time.monotonic()

    async def one(plan: Any, r: random.Random) -> None:
        outcomes.append(await _bad_connection(sp.path, plan, r))

    with anyio.fail_after(20 * T):
        async with good_client(sp.url, min_calls=200) as report:
            await run_jobs(jobs, PARALLEL, one)
            assert sp.alive()
        elapsed = time.monotonic() - start
        # every attacking connection is gone: the server settles at one (the final check's)
        async with xrpc.connect(sp.url, timeout=T) as conn:
            assert await conn.proxy(Svc).settle(1) == 1
            assert await conn.proxy(Svc).add(20, 22) == 42
    print(f"\nATTACK {sum(o.inputs for o in outcomes)} inputs on {len(outcomes)} connections in {elapsed:.1f} s; "
          f"good client: {report.calls} round trips, max latency {report.max_latency * 1000:.0f} ms")
    assert len(outcomes) == CONNECTIONS
    assert sum(o.inputs for o in outcomes) >= 100_000
    assert {o.plan for o in outcomes} == {p.__name__ for p in PLANS}
    hung = [o for o in outcomes if o.how == "timeout"]
    assert hung == [], hung[:5]
    assert mem.measure() < MEMORY_BUDGET
    lines = Path(sp.log_path).read_text().splitlines()
    assert [line for line in lines if line.startswith(("ERROR xrpc", "CRITICAL xrpc"))] == []
    assert any("protocol error" in line for line in lines if line.startswith("WARNING xrpc"))  # it said why


@pytest.mark.timeout(240)
async def test_requesting_100000_objects_is_bounded(server_process: Any) -> None:
    """A client asks for 100,000 objects by reference and keeps them all: the server exports up to
    its ``max_objects`` limit, refuses the rest with LimitExceeded, stays within bounded memory,
    and keeps serving another client."""
    limit = xrpc.Limits().max_objects  # the default
    sp = server_process()
    held: list[Any] = []
    refused = 0
    with anyio.fail_after(18 * T):
        async with xrpc.connect(sp.url, timeout=T) as attacker, xrpc.connect(sp.url, timeout=T) as other:
            mem = Memory(sp, "100,000 objects requested")
            svc = attacker.proxy(Svc)
            for _ in range(100):  # 100 batches of 1,000
                try:
                    held.extend(await svc.spawn(1000))
                except xrpc.LimitExceeded:
                    refused += 1
                assert await other.proxy(Svc).add(1, 2) == 3  # the other client is unaffected
            growth = mem.measure()
            assert len(held) == limit
            assert refused == 100 - limit // 1000
            assert await held[-1].value() == 999
            assert attacker.remote_refs == limit
            assert growth < 64 * MiB
            # the attacker's connection still works, and dropping the proxies frees the slots
            held.clear()
            import gc

            gc.collect()
            for _ in range(200):
                if await svc.add(0, 0) == 0 and attacker.remote_refs == 0:
                    break
            assert attacker.remote_refs == 0
            assert len(await svc.spawn(1000)) == 1000

