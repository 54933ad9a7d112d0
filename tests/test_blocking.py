"""The blocking facade (``xrpc.blocking``): the same matrix as the async proxy, from plain threads.

The server runs on an event loop in a background thread (anyio's blocking portal), over Unix sockets
and TCP, or in a child process; the tests themselves are ordinary functions, with no event loop of
their own.  Server-side facts (a producer stopped, a method ran) are ``threading.Event``s set on the
server's thread and waited on here with a bound.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator, Protocol

import anyio
import anyio.from_thread
import msgspec
import pytest

import xrpc
from _timeouts import T
from _procs import short_dir

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


class Point(msgspec.Struct):
    x: float
    y: float


class NotFound(Exception):
    """Declared: travels as itself."""


@xrpc.interface(errors=(NotFound,))
class Blocky(Protocol):
    async def add(self, a: int, b: int = 10) -> int: ...

    async def midpoint(self, a: Point, b: Point) -> Point: ...

    async def nothing(self) -> None: ...

    async def lookup(self, name: str) -> Point: ...

    async def crash(self, text: str) -> int: ...

    async def hang(self, tag: str) -> None: ...

    async def metadata(self) -> dict[str, str]: ...

    async def ran(self, tag: str) -> bool: ...

    def count(self, n: int, tag: str = "") -> AsyncIterator[int]: ...

    def fail_after(self, n: int, declared: bool) -> AsyncIterator[int]: ...

    def trickle(self, tag: str) -> AsyncIterator[int]: ...

    async def total(self, xs: AsyncIterator[int]) -> int: ...

    def shout(self, lines: AsyncIterator[str]) -> AsyncIterator[str]: ...


# The same interface name with one method the server lacks: the proxy's check refuses it.
@xrpc.interface(name="Blocky", errors=(NotFound,))
class BlockyPlus(Protocol):
    async def add(self, a: int, b: int = 10) -> int: ...

    async def missing(self) -> int: ...


# The blocking form of Blocky (a part of it): what a type checker sees of a blocking proxy.
@xrpc.blocking.interface(Blocky)
class BlockyBlocking(Protocol):
    def add(self, a: int, b: int = 10) -> int: ...

    def lookup(self, name: str) -> Point: ...

    def count(self, n: int, tag: str = "") -> Iterator[int]: ...

    def total(self, xs: Iterable[int]) -> int: ...

    def shout(self, lines: Iterable[str]) -> Iterator[str]: ...


class Events:
    """Named ``threading.Event``s shared by the server thread and the tests."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __getitem__(self, tag: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(tag, threading.Event())


class BlockyService:
    def __init__(self) -> None:
        self.stopped = Events()  # a producer's finally ran
        self.started = Events()  # a method began
        self.calls: dict[str, int] = {}

    async def add(self, a: int, b: int = 10) -> int:
        return a + b

    async def midpoint(self, a: Point, b: Point) -> Point:
        return Point((a.x + b.x) / 2, (a.y + b.y) / 2)

    async def nothing(self) -> None:
        return None

    async def lookup(self, name: str) -> Point:
        raise NotFound(name, 404)

    async def crash(self, text: str) -> int:
        self.calls[text] = self.calls.get(text, 0) + 1
        raise KeyError(text)

    async def hang(self, tag: str) -> None:
        self.started[tag].set()
        try:
            await anyio.sleep_forever()
        finally:
            self.stopped[tag].set()

    async def metadata(self) -> dict[str, str]:
        return xrpc.current_metadata()

    async def ran(self, tag: str) -> bool:
        return tag in self.calls

    async def count(self, n: int, tag: str = "") -> AsyncIterator[int]:
        try:
            for i in range(n):
                yield i
                await anyio.lowlevel.checkpoint()
        finally:
            if tag:
                self.stopped[tag].set()

    async def fail_after(self, n: int, declared: bool) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        if declared:
            raise NotFound("ran dry", n)
        raise ZeroDivisionError("mid-stream")

    async def trickle(self, tag: str) -> AsyncIterator[int]:
        """One item, then nothing until cancelled."""
        try:
            yield 0
            await anyio.sleep_forever()
        finally:
            self.stopped[tag].set()

    async def total(self, xs: AsyncIterator[int]) -> int:
        return sum([x async for x in xs])

    async def shout(self, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        async for line in lines:
            yield line.upper()


class Served:
    def __init__(self, url: str, service: BlockyService) -> None:
        self.url = url
        self.service = service


@pytest.fixture(scope="module", params=["unix", "tcp"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """A server on an event loop in a background thread, over each socket transport."""
    directory = short_dir()
    url = f"unix://{directory}/s.sock" if request.param == "unix" else "tcp://127.0.0.1:0"
    service = BlockyService()
    server = xrpc.Server()
    server.export(Blocky, service)
    try:
        with anyio.from_thread.start_blocking_portal() as portal:
            with portal.wrap_async_context_manager(server.listen(url)) as listener:
                yield Served(listener.url, service)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def proxy(served: Served) -> Iterator[Blocky]:
    with xrpc.blocking.connect(served.url, timeout=T) as conn:
        yield conn.proxy(Blocky)


# --------------------------------------------------------------------------- unary calls
def test_unary_typed_result(proxy: Blocky) -> None:
    got = proxy.midpoint(Point(0, 0), Point(2, 4))
    assert type(got) is Point
    assert got == Point(1, 2)


def test_none_result(proxy: Blocky) -> None:
    assert proxy.nothing() is None


def test_defaults_and_keywords(proxy: Blocky) -> None:
    assert proxy.add(1) == 11
    assert proxy.add(1, 2) == 3
    assert proxy.add(1, b=5) == 6
    assert proxy.add(a=2, b=3) == 5


def test_declared_error_is_raised_as_itself(proxy: Blocky) -> None:
    with pytest.raises(NotFound) as info:
        proxy.lookup("atlantis")
    assert type(info.value) is NotFound
    assert info.value.args == ("atlantis", 404)


def test_undeclared_error_is_a_remote_error(proxy: Blocky) -> None:
    with pytest.raises(xrpc.RemoteError) as info:
        proxy.crash("boom")
    assert info.value.type_name == "KeyError"
    assert "boom" in info.value.message


def test_wrong_argument_type_is_a_validation_error_and_the_method_never_runs(proxy: Blocky) -> None:
    with pytest.raises(xrpc.ValidationError) as info:
        proxy.crash(12345)  # type: ignore[arg-type]
    assert info.value.argument == "text"
    assert "Blocky.crash" in str(info.value)
    assert proxy.ran("12345") is False
    assert proxy.add(1) == 11  # the connection lives on


def test_unknown_object_and_method(served: Served) -> None:
    with xrpc.blocking.connect(served.url, timeout=T) as conn:
        with pytest.raises(xrpc.ObjectNotFound):
            conn.proxy(Blocky, name="nobody").add(1)
        plus = conn.proxy(BlockyPlus)
        with pytest.raises(xrpc.MethodNotFound):
            plus.missing()
        assert plus.add(1, b=1) == 2


def test_timeout_raises_timeout_error_and_cancels_the_remote_call(served: Served) -> None:
    with xrpc.blocking.connect(served.url, timeout=T) as conn:
        impatient = conn.proxy(Blocky, timeout=0.2)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            impatient.hang("timeout")
        assert time.monotonic() - t0 < T
        assert served.service.stopped["timeout"].wait(T), "the remote method was not cancelled"
        assert impatient.add(2) == 12  # a proxy with a timeout still works for quick calls


def test_call_metadata_travels_from_the_calling_thread(proxy: Blocky) -> None:
    assert proxy.metadata() == {}
    with xrpc.call_metadata(user="alice", request="r-1"):
        assert proxy.metadata() == {"user": "alice", "request": "r-1"}
    assert proxy.metadata() == {}


def test_peer_of_a_unix_connection(served: Served) -> None:
    with xrpc.blocking.connect(served.url, timeout=T) as conn:
        if served.url.startswith("unix:"):
            assert conn.peer.uid == os.getuid() and conn.peer.pid == os.getpid()
        else:
            assert conn.peer.transport == "tcp" and conn.peer.uid is None


# --------------------------------------------------------------------------- the blocking form of an interface
def test_a_proxy_of_the_blocking_form_calls_the_interface(served: Served) -> None:
    with xrpc.blocking.connect(served.url, timeout=T) as conn:
        p = conn.proxy(BlockyBlocking)
        assert p.add(1) == 11 and p.add(1, b=2) == 3
        assert list(p.count(3)) == [0, 1, 2]
        assert p.total([1, 2, 3]) == 6
        assert list(p.shout(iter(["a", "b"]))) == ["A", "B"]
        with pytest.raises(NotFound):
            p.lookup("atlantis")
        # the methods the blocking form leaves out are still the interface's, and no others
        assert getattr(p, "midpoint")(Point(0, 0), Point(2, 2)) == Point(1, 1)
        with pytest.raises(AttributeError):
            getattr(p, "no_such_method")
        with pytest.raises(xrpc.ObjectNotFound):
            conn.proxy(BlockyBlocking, name="nobody").add(1)


@pytest.mark.parametrize(
    "body, message",
    [
        ("async def add(self, a: int, b: int = 10) -> int: ...", "a plain def, not async def"),
        ("def add(self, a: int) -> int: ...", "the parameters must be those of Blocky.add: (a, b)"),
        ("def add(self, a: int, b: int = 11) -> int: ...", "the parameters must be those of Blocky.add"),
        ("def add(self, a: int, *, b: int = 10) -> int: ...", "the parameters must be those of Blocky.add"),
        ("def add(self, a: str, b: int = 10) -> int: ...", "parameter 'a' must be annotated int"),
        ("def add(self, a: int, b: int = 10) -> str: ...", "must return int like Blocky.add"),
        ("def add(self, a: int, b: int = 10) -> Any: ...", "must return int like Blocky.add"),
        ("def nothing(self) -> int: ...", "must return None"),
        ("def count(self, n: int, tag: str = '') -> AsyncIterator[int]: ...", "returns a stream: annotate it -> Iterator[int]"),
        ("def count(self, n: int, tag: str = '') -> Iterator[str]: ...", "returns a stream: annotate it -> Iterator[int]"),
        ("def count(self, n: int, tag: str = '') -> int: ...", "returns a stream"),
        ("def total(self, xs: AsyncIterator[int]) -> int: ...", "parameter 'xs' is a client stream: annotate it Iterable[int]"),
        ("def total(self, xs: list[int]) -> int: ...", "is a client stream"),
        ("def missing(self) -> int: ...", "Blocky has no method 'missing'"),
    ],
)
def test_the_blocking_form_must_match_the_interface(body: str, message: str) -> None:
    namespace: dict[str, Any] = dict(globals())
    with pytest.raises(xrpc.InterfaceError) as info:
        exec(f"@xrpc.blocking.interface(Blocky)\nclass Wrong(Protocol):\n    {body}\n", namespace)
    assert message in str(info.value)
    assert "Wrong." in str(info.value)


def test_the_blocking_form_of_a_class_that_is_not_an_interface() -> None:
    class NotAnInterface(Protocol):
        async def add(self, a: int) -> int: ...

    with pytest.raises(xrpc.InterfaceError):
        xrpc.blocking.interface(NotAnInterface)


# --------------------------------------------------------------------------- streams
def test_server_stream_is_an_ordinary_iterator(proxy: Blocky) -> None:
    stream = proxy.count(5)
    assert iter(stream) is stream
    assert list(stream) == [0, 1, 2, 3, 4]
    assert list(stream) == []  # exhausted, like any iterator
    with pytest.raises(StopIteration):
        next(stream)


def test_empty_server_stream(proxy: Blocky) -> None:
    assert list(proxy.count(0)) == []


def test_break_stops_the_producer(served: Served, proxy: Blocky) -> None:
    got = []
    for x in proxy.count(10**9, tag="break"):
        got.append(x)
        if x == 3:
            break
    assert got == [0, 1, 2, 3]
    assert served.service.stopped["break"].wait(T), "the producer did not stop after break"
    assert proxy.add(1) == 11


def test_close_stops_the_producer(served: Served, proxy: Blocky) -> None:
    stream = proxy.count(10**9, tag="close")
    assert next(stream) == 0
    stream.close()  # type: ignore[attr-defined]
    assert served.service.stopped["close"].wait(T), "the producer did not stop after close()"
    assert list(stream) == []
    stream.close()  # type: ignore[attr-defined]  # twice is fine


def test_with_block_stops_the_producer(served: Served, proxy: Blocky) -> None:
    with proxy.count(10**9, tag="with") as stream:  # type: ignore[attr-defined]
        assert [next(stream), next(stream)] == [0, 1]
    assert served.service.stopped["with"].wait(T), "the producer did not stop when the block ended"


def test_stream_error_midway(proxy: Blocky) -> None:
    got: list[int] = []
    with pytest.raises(NotFound) as info:
        for x in proxy.fail_after(3, True):
            got.append(x)
    assert got == [0, 1, 2]
    assert info.value.args == ("ran dry", 3)
    got = []
    with pytest.raises(xrpc.RemoteError) as remote:
        for x in proxy.fail_after(2, False):
            got.append(x)
    assert got == [0, 1]
    assert remote.value.type_name == "ZeroDivisionError"
    assert proxy.add(1) == 11


def test_stream_timeout(served: Served) -> None:
    with xrpc.blocking.connect(served.url, timeout=T) as conn:
        impatient = conn.proxy(Blocky, timeout=0.3)  # bounds the whole stream
        got = []
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            for x in impatient.trickle("stream-timeout"):
                got.append(x)
        assert got == [0]
        assert time.monotonic() - t0 < T
        assert served.service.stopped["stream-timeout"].wait(T), "the producer was not cancelled"
        assert impatient.add(1) == 11


@pytest.mark.parametrize(
    "make",
    [lambda: [1, 2, 3], lambda: (1, 2, 3), lambda: range(1, 4), lambda: iter([1, 2, 3]), lambda: (x for x in [1, 2, 3])],
    ids=["list", "tuple", "range", "iterator", "generator"],
)
def test_client_stream_from_an_ordinary_iterable(proxy: Blocky, make: Any) -> None:
    assert proxy.total(make()) == 6


def test_client_stream_by_keyword_and_empty(proxy: Blocky) -> None:
    assert proxy.total(xs=[10, 20]) == 30
    assert proxy.total([]) == 0


def test_client_stream_items_are_validated(proxy: Blocky) -> None:
    with pytest.raises(xrpc.ValidationError):
        proxy.total([1, "two", 3])  # type: ignore[list-item]
    assert proxy.total([1]) == 1


def test_two_way_stream(proxy: Blocky) -> None:
    assert list(proxy.shout(["a", "bc", "def"])) == ["A", "BC", "DEF"]
    assert list(proxy.shout(iter(()))) == []


def _broken_source() -> Iterator[int]:
    yield 1
    yield 2
    raise ValueError("the source broke")


def test_client_stream_source_error_is_raised_as_itself(proxy: Blocky) -> None:
    with pytest.raises(ValueError, match="the source broke"):
        proxy.total(_broken_source())
    assert proxy.add(1) == 11


def test_two_way_stream_source_error_ends_only_that_stream(served: Served) -> None:
    with xrpc.blocking.connect(served.url, timeout=T) as conn:
        p = conn.proxy(Blocky)
        got: list[str] = []
        with pytest.raises(ValueError, match="the source broke"):
            for line in p.shout(str(x) for x in _broken_source()):
                got.append(line)
        assert p.add(1) == 11


# --------------------------------------------------------------------------- event loops
def _in_thread(fn: Any) -> BaseException | None:
    """Run ``fn`` in a fresh thread with a bound; return what it raised."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # reported to the test below
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(T)
    assert not thread.is_alive(), "blocked instead of raising"
    return outcome[0]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_connect_inside_an_event_loop_raises_at_once(served: Served, backend: str) -> None:
    elapsed: list[float] = []

    async def inside() -> None:
        t0 = time.monotonic()
        try:
            with xrpc.blocking.connect(served.url, timeout=T):
                pass
        finally:
            elapsed.append(time.monotonic() - t0)

    exc = _in_thread(lambda: anyio.run(inside, backend=backend))
    assert isinstance(exc, RuntimeError), exc
    assert "xrpc.connect()" in str(exc)
    assert elapsed[0] < 1.0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_blocking_proxy_used_inside_an_event_loop_raises(served: Served, backend: str) -> None:
    with xrpc.blocking.connect(served.url, timeout=T) as conn:
        p = conn.proxy(Blocky)
        raised: list[BaseException] = []

        async def inside() -> None:
            for attempt in (lambda: p.add(1), lambda: p.count(1), lambda: conn.proxy(Blocky)):
                try:
                    attempt()
                except RuntimeError as exc:
                    raised.append(exc)

        assert _in_thread(lambda: anyio.run(inside, backend=backend)) is None
        assert len(raised) == 3
        assert p.add(1) == 11  # still usable from plain code


# --------------------------------------------------------------------------- a server in another process
def test_blocking_client_of_a_server_process() -> None:
    directory = short_dir()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "serve", f"unix://{directory}/geo.sock"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("unix://"), url
        sys.path.insert(0, str(ROOT / "examples"))
        try:
            import quickstart
        finally:
            sys.path.remove(str(ROOT / "examples"))
        with xrpc.blocking.connect(url, timeout=T) as conn:
            geo = conn.proxy(quickstart.Geometry)
            assert geo.distance(quickstart.Point(0, 0), quickstart.Point(3, 4)) == 5.0
            assert [p.x for p in geo.walk(quickstart.Point(1, 1), 3)] == [1.0, 2.0, 3.0]
            with pytest.raises(quickstart.NotFound):
                geo.lookup("atlantis")
            assert conn.peer.pid == proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=T)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)
