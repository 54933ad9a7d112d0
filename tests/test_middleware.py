"""Middleware and call metadata: what a middleware sees, what travels, who refuses, in which order;
and what the ``xrpc`` logger says about it (one line per event, never the payload).

A middleware is ``async def mw(ctx: xrpc.CallContext, call_next)``; ``xrpc.Server(middleware=[...])``
runs it around every incoming call, ``xrpc.connect(url, middleware=[...])`` around outgoing ones.
"""

from __future__ import annotations

import logging
import os
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Protocol

import anyio
import pytest

import xrpc
from conftest import serve_and_connect
from _timeouts import T

SECRET = "hunter2-Sup3rS3cret"

CallNext = Callable[[], Awaitable[Any]]


class Denied(Exception):
    """Declared: a middleware that raises it is seen by the caller as itself."""


@xrpc.interface
class Echo(Protocol):
    async def metadata(self) -> dict[str, str]: ...


@xrpc.interface(errors=(Denied,))
class Svc(Protocol):
    async def add(self, a: int, b: int = 10) -> int: ...

    async def metadata(self) -> dict[str, str]: ...

    async def login(self, user: str, password: str) -> bool: ...

    async def fail(self, declared: bool) -> None: ...

    async def via(self, url: str) -> dict[str, str]: ...

    async def call_back(self, echo: Echo) -> dict[str, str]: ...

    def count(self, n: int) -> AsyncIterator[int]: ...

    def count_then_fail(self, n: int) -> AsyncIterator[int]: ...

    async def total(self, xs: AsyncIterator[int]) -> int: ...

    def tagged(self, prefix: str, xs: AsyncIterator[int], step: int = 1) -> AsyncIterator[str]: ...

    @xrpc.oneway
    async def note(self, text: str) -> None: ...

    async def notes(self) -> list[str]: ...

    @xrpc.requires(xrpc.Requirement.none())
    async def admin(self, password: str) -> None: ...

    async def choose(self, mode: Literal["fast", "slow"]) -> str: ...


class SvcImpl:
    def __init__(self) -> None:
        self.ran: list[str] = []
        self._notes: list[str] = []
        self.noted = anyio.Event()

    async def add(self, a: int, b: int = 10) -> int:
        self.ran.append("add")
        return a + b

    async def metadata(self) -> dict[str, str]:
        self.ran.append("metadata")
        return xrpc.current_metadata()

    async def login(self, user: str, password: str) -> bool:
        self.ran.append("login")
        return password == SECRET

    async def fail(self, declared: bool) -> None:
        self.ran.append("fail")
        if declared:
            raise Denied("declared failure")
        raise KeyError("undeclared failure")

    async def via(self, url: str) -> dict[str, str]:
        """A nested call: this method calls another server (adding one key of its own)."""
        with xrpc.call_metadata(hop="via"):
            async with xrpc.connect(url, timeout=T) as conn:
                return await conn.proxy(Echo).metadata()

    async def call_back(self, echo: Echo) -> dict[str, str]:
        return await echo.metadata()

    async def count(self, n: int) -> AsyncIterator[int]:
        self.ran.append("count")
        for i in range(n):
            yield i

    async def count_then_fail(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise Denied("ran dry")

    async def total(self, xs: AsyncIterator[int]) -> int:
        self.ran.append("total")
        return sum([x async for x in xs])

    async def tagged(self, prefix: str, xs: AsyncIterator[int], step: int = 1) -> AsyncIterator[str]:
        async for x in xs:
            yield f"{prefix}:{x * step}"

    async def note(self, text: str) -> None:
        self._notes.append(text)
        self.noted.set()

    async def notes(self) -> list[str]:
        return list(self._notes)

    async def admin(self, password: str) -> None:
        self.ran.append("admin")

    async def choose(self, mode: str) -> str:
        return mode


class EchoImpl:
    async def metadata(self) -> dict[str, str]:
        return xrpc.current_metadata()


class Recorder:
    """A middleware that records what it sees (a copy, taken before the call goes on)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        self.seen.append(
            {
                "side": ctx.side,
                "method": ctx.method,
                "qualname": ctx.method.qualname,
                "kind": ctx.method.kind,
                "peer": ctx.peer,
                "connection": ctx.connection,
                "metadata": dict(ctx.metadata),
                "args": ctx.args,
                "kwargs": dict(ctx.kwargs),
            }
        )
        return await call_next()


def tracer(name: str, trail: list[str]) -> xrpc.Middleware:
    async def mw(ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        trail.append(f"{name}>")
        try:
            return await call_next()
        finally:
            trail.append(f"<{name}")

    return mw


# --------------------------------------------------------------------------- what a middleware sees
async def test_server_middleware_sees_method_peer_metadata_and_arguments(transport: str) -> None:
    rec = Recorder()
    server = xrpc.Server(middleware=[rec])
    server.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            with xrpc.call_metadata(request_id="r-42"):
                assert await conn.proxy(Svc).add(2, b=3) == 5
    (seen,) = rec.seen
    assert seen["side"] == "server"
    assert seen["method"] is xrpc.describe(Svc).methods["add"]
    assert seen["qualname"] == "Svc.add" and seen["kind"] is xrpc.MethodKind.UNARY
    assert seen["metadata"] == {"request_id": "r-42"}
    assert seen["args"] == (2, 3)
    peer = seen["peer"]
    assert isinstance(peer, xrpc.Peer) and peer is seen["connection"].peer
    if transport.startswith(("unix:", "memory:")):
        assert (peer.uid, peer.pid) == (os.getuid(), os.getpid())
    else:
        assert peer.transport == "tcp" and peer.address


async def test_client_middleware_sees_method_peer_metadata_and_arguments(transport: str) -> None:
    rec = Recorder()
    server = xrpc.Server()
    server.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport, middleware=[rec]) as conn:
            with xrpc.call_metadata(tenant="acme"):
                assert await conn.proxy(Svc).add(1, b=2) == 3
            (seen,) = rec.seen
            assert seen["connection"] is conn
    assert seen["side"] == "client"
    assert seen["method"] is xrpc.describe(Svc).methods["add"]
    assert seen["metadata"] == {"tenant": "acme"}
    assert (seen["args"], seen["kwargs"]) == ((1,), {"b": 2})
    assert seen["peer"].transport == transport.split(":", 1)[0]


async def test_call_context_repr_names_side_method_and_peer() -> None:
    reprs: list[str] = []

    async def mw(ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        reprs.append(repr(ctx))
        return await call_next()

    server = xrpc.Server(middleware=[mw])
    server.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            await conn.proxy(Svc).add(1)
    assert reprs and reprs[0].startswith("<CallContext server Svc.add peer=")


# --------------------------------------------------------------------------- metadata
async def test_metadata_travels_with_each_call_and_only_inside_the_block() -> None:
    server = xrpc.Server()
    server.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            svc = conn.proxy(Svc)
            assert xrpc.current_metadata() == {}
            assert await svc.metadata() == {}
            with xrpc.call_metadata(user="alice") as outer:
                assert outer == {"user": "alice"} == xrpc.current_metadata()
                assert await svc.metadata() == {"user": "alice"}
                with xrpc.call_metadata(request="r-1", user="bob"):
                    assert await svc.metadata() == {"user": "bob", "request": "r-1"}
                assert await svc.metadata() == {"user": "alice"}
            assert await svc.metadata() == {}
            assert xrpc.current_metadata() == {}


async def test_metadata_reaches_tasks_started_inside_the_block() -> None:
    server = xrpc.Server()
    server.export(Svc, SvcImpl())
    results: list[dict[str, str]] = []
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            svc = conn.proxy(Svc)

            async def one() -> None:
                results.append(await svc.metadata())

            with xrpc.call_metadata(batch="b-7"):
                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(one)
    assert results == [{"batch": "b-7"}] * 3


async def test_metadata_propagates_to_nested_calls() -> None:
    backend = xrpc.Server()
    backend.export(Echo, EchoImpl())
    front = xrpc.Server()
    front.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with backend.listen(xrpc.testing.memory_url()) as backend_listener:
            async with xrpc.testing.connect(front) as conn:
                svc = conn.proxy(Svc)
                with xrpc.call_metadata(user="alice", trace="t-1"):
                    assert await svc.via(backend_listener.url) == {"user": "alice", "trace": "t-1", "hop": "via"}
                assert await svc.via(backend_listener.url) == {"hop": "via"}


async def test_metadata_propagates_to_callbacks_into_the_caller() -> None:
    server = xrpc.Server()
    server.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            with xrpc.call_metadata(user="carol"):
                assert await conn.proxy(Svc).call_back(EchoImpl()) == {"user": "carol"}


async def test_client_middleware_adds_metadata_without_leaking_it() -> None:
    async def stamp(ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        ctx.metadata["client"] = "cli/1.0"
        ctx.metadata.setdefault("request_id", f"auto-{ctx.method.name}")
        return await call_next()

    server = xrpc.Server()
    server.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with serve_and_connect(server, xrpc.testing.memory_url(), middleware=[stamp]) as conn:
            svc = conn.proxy(Svc)
            assert await svc.metadata() == {"client": "cli/1.0", "request_id": "auto-metadata"}
            with xrpc.call_metadata(request_id="mine"):
                assert await svc.metadata() == {"client": "cli/1.0", "request_id": "mine"}
                assert xrpc.current_metadata() == {"request_id": "mine"}
            assert xrpc.current_metadata() == {}
            assert await svc.total([1, 2]) == 3  # client streams go through client middleware too


# --------------------------------------------------------------------------- refusing calls
def _gatekeeper(error: Callable[[], Exception]) -> xrpc.Middleware:
    async def gate(ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        if ctx.metadata.get("token") != "let-me-in":
            raise error()
        return await call_next()

    return gate


async def test_server_middleware_refuses_with_a_declared_error() -> None:
    impl = SvcImpl()
    server = xrpc.Server(middleware=[_gatekeeper(lambda: Denied("no token", 401))])
    server.export(Svc, impl)
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            svc = conn.proxy(Svc)
            with pytest.raises(Denied) as info:
                await svc.add(1)
            assert type(info.value) is Denied and info.value.args == ("no token", 401)
            assert impl.ran == []
            with xrpc.call_metadata(token="let-me-in"):
                assert await svc.add(1) == 11
            assert impl.ran == ["add"]


async def test_server_middleware_refuses_with_an_undeclared_error() -> None:
    impl = SvcImpl()
    server = xrpc.Server(middleware=[_gatekeeper(lambda: PermissionError("go away"))])
    server.export(Svc, impl)
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            with pytest.raises(xrpc.RemoteError) as info:
                await conn.proxy(Svc).add(1)
            assert info.value.type_name == "PermissionError" and info.value.message == "go away"
            with pytest.raises(xrpc.RemoteError):
                async for _ in conn.proxy(Svc).count(3):
                    pass
    assert impl.ran == []


async def test_client_middleware_refuses_before_anything_is_sent() -> None:
    impl = SvcImpl()
    server = xrpc.Server()
    server.export(Svc, impl)
    with anyio.fail_after(T):
        async with serve_and_connect(server, xrpc.testing.memory_url(), middleware=[_gatekeeper(lambda: PermissionError("offline mode"))]) as conn:
            svc = conn.proxy(Svc)
            with pytest.raises(PermissionError, match="offline mode"):
                await svc.add(1)
            with pytest.raises(PermissionError):
                await svc.note("dropped")
            with xrpc.call_metadata(token="let-me-in"):
                assert await svc.notes() == []
    assert impl.ran == []


async def test_middleware_may_answer_without_calling_the_method() -> None:
    impl = SvcImpl()

    async def cache(ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        if ctx.method.name == "add" and ctx.args == (40, 2):
            return 42
        return await call_next()

    server = xrpc.Server(middleware=[cache])
    server.export(Svc, impl)
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            assert await conn.proxy(Svc).add(40, 2) == 42
            assert impl.ran == []
            assert await conn.proxy(Svc).add(1, 2) == 3
    assert impl.ran == ["add"]


# --------------------------------------------------------------------------- order
async def test_order_of_several_middleware() -> None:
    trail: list[str] = []
    server = xrpc.Server(middleware=[tracer("s1", trail), tracer("s2", trail)])
    server.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with serve_and_connect(server, xrpc.testing.memory_url(), middleware=[tracer("c1", trail), tracer("c2", trail)]) as conn:
            await conn.proxy(Svc).add(1)
    # the first listed is the outermost, on each side; the client's wrap the server's
    assert trail == ["c1>", "c2>", "s1>", "s2>", "<s2", "<s1", "<c2", "<c1"]


async def test_an_outer_middleware_sees_what_an_inner_one_raises() -> None:
    outcomes: list[str] = []

    async def outer(ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        try:
            return await call_next()
        except Denied as exc:
            outcomes.append(f"outer saw {exc.args[0]}")
            raise

    server = xrpc.Server(middleware=[outer, _gatekeeper(lambda: Denied("inner refused"))])
    server.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            with pytest.raises(Denied):
                await conn.proxy(Svc).add(1)
    assert outcomes == ["outer saw inner refused"]


# --------------------------------------------------------------------------- streams and one-way calls
async def test_server_middleware_wraps_the_creation_of_a_server_stream() -> None:
    trail: list[str] = []
    impl = SvcImpl()
    counted: list[int] = []

    async def count_items(ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        stream = await call_next()  # for a stream method: the async iterator, before any item
        if not ctx.method.kind.streams_out:
            return stream

        async def counting() -> AsyncIterator[Any]:
            n = 0
            try:
                async for item in stream:
                    n += 1
                    yield item
            finally:
                counted.append(n)

        return counting()

    server = xrpc.Server(middleware=[tracer("s", trail), count_items])
    server.export(Svc, impl)
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            got = [x async for x in conn.proxy(Svc).count(4)]
            assert got == [0, 1, 2, 3]
            assert [x async for x in conn.proxy(Svc).count(0)] == []
    # the middleware ran once per stream call, and was done before the first item was sent
    assert trail == ["s>", "<s", "s>", "<s"]
    assert counted == [4, 0]


async def test_an_error_in_the_middle_of_a_stream_passes_the_middleware_by() -> None:
    """Server middleware wraps the creation of a stream: an error raised while it runs reaches the
    caller as usual, but after the middleware has returned."""
    errors: list[str] = []

    async def watch(ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        try:
            return await call_next()
        except Exception as exc:
            errors.append(type(exc).__name__)
            raise

    server = xrpc.Server(middleware=[watch])
    server.export(Svc, SvcImpl())
    got: list[int] = []
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            with pytest.raises(Denied):
                async for x in conn.proxy(Svc).count_then_fail(2):
                    got.append(x)
    assert got == [0, 1]
    assert errors == []


async def test_middleware_on_client_streams_wraps_the_whole_call() -> None:
    server_rec, client_rec = Recorder(), Recorder()
    server = xrpc.Server(middleware=[server_rec])
    server.export(Svc, SvcImpl())
    results: list[Any] = []

    async def outer(ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        results.append(await call_next())
        return results[-1]

    with anyio.fail_after(T):
        async with serve_and_connect(server, xrpc.testing.memory_url(), middleware=[client_rec, outer]) as conn:
            with xrpc.call_metadata(upload="u-1"):
                assert await conn.proxy(Svc).total([1, 2, 3]) == 6
    assert results == [6]
    assert [s["qualname"] for s in server_rec.seen + client_rec.seen] == ["Svc.total", "Svc.total"]
    assert server_rec.seen[0]["kind"] is xrpc.MethodKind.CLIENT_STREAM
    assert server_rec.seen[0]["metadata"] == client_rec.seen[0]["metadata"] == {"upload": "u-1"}


async def test_middleware_on_one_way_calls() -> None:
    server_rec, client_rec = Recorder(), Recorder()
    impl = SvcImpl()
    server = xrpc.Server(middleware=[server_rec])
    server.export(Svc, impl)
    with anyio.fail_after(T):
        async with serve_and_connect(server, xrpc.testing.memory_url(), middleware=[client_rec]) as conn:
            with xrpc.call_metadata(source="test"):
                await conn.proxy(Svc).note("hello")
            await impl.noted.wait()
    assert [s["kind"] for s in client_rec.seen] == [xrpc.MethodKind.ONEWAY]
    assert [(s["kind"], s["metadata"], s["args"]) for s in server_rec.seen] == [(xrpc.MethodKind.ONEWAY, {"source": "test"}, ("hello",))]


async def test_client_middleware_sees_server_stream_calls() -> None:
    async def stamp(ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        ctx.metadata["stamped"] = "yes"
        return await call_next()

    server_rec = Recorder()
    server = xrpc.Server(middleware=[server_rec])
    server.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with serve_and_connect(server, xrpc.testing.memory_url(), middleware=[stamp]) as conn:
            assert [x async for x in conn.proxy(Svc).count(2)] == [0, 1]
    assert server_rec.seen[0]["metadata"] == {"stamped": "yes"}


async def test_client_middleware_sees_the_real_arguments_of_stream_calls(transport: str) -> None:
    """Client middleware on a server stream and a two-way stream sees the arguments as the caller
    passed them (positional and keyword, the stream argument itself included), once per call."""
    rec = Recorder()
    server = xrpc.Server()
    server.export(Svc, SvcImpl())

    async def numbers(*xs: int) -> AsyncIterator[int]:
        for x in xs:
            yield x

    first, second = numbers(1, 2), numbers(3)
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport, middleware=[rec]) as conn:
            svc = conn.proxy(Svc)
            assert [x async for x in svc.count(3)] == [0, 1, 2]
            assert [x async for x in svc.count(n=2)] == [0, 1]
            assert [x async for x in svc.tagged("p", first, step=10)] == ["p:10", "p:20"]
            assert [x async for x in svc.tagged(prefix="q", xs=second)] == ["q:3"]
    seen = [(s["qualname"], s["kind"], s["args"], s["kwargs"]) for s in rec.seen]
    assert seen == [
        ("Svc.count", xrpc.MethodKind.SERVER_STREAM, (3,), {}),
        ("Svc.count", xrpc.MethodKind.SERVER_STREAM, (), {"n": 2}),
        ("Svc.tagged", xrpc.MethodKind.BIDI_STREAM, ("p", first), {"step": 10}),
        ("Svc.tagged", xrpc.MethodKind.BIDI_STREAM, (), {"prefix": "q", "xs": second}),
    ]


# --------------------------------------------------------------------------- a metrics middleware
class Metrics:
    """Counts calls and errors per method and keeps the durations: what a Prometheus exporter reads."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.durations: dict[str, list[float]] = {}

    async def __call__(self, ctx: xrpc.CallContext, call_next: CallNext) -> Any:
        name = ctx.method.qualname
        self.calls[name] = self.calls.get(name, 0) + 1
        start = anyio.current_time()
        try:
            return await call_next()
        except Exception as exc:
            key = (name, type(exc).__name__)
            self.errors[key] = self.errors.get(key, 0) + 1
            raise
        finally:
            self.durations.setdefault(name, []).append(anyio.current_time() - start)


async def test_metrics_middleware_counts_calls_and_errors() -> None:
    server_metrics, client_metrics = Metrics(), Metrics()
    server = xrpc.Server(middleware=[server_metrics])
    server.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with serve_and_connect(server, xrpc.testing.memory_url(), middleware=[client_metrics]) as conn:
            svc = conn.proxy(Svc)
            for i in range(3):
                await svc.add(i)
            with pytest.raises(Denied):
                await svc.fail(True)
            with pytest.raises(xrpc.RemoteError):
                await svc.fail(False)
            with pytest.raises(xrpc.ValidationError):
                await svc.add("three")  # type: ignore[arg-type]  # refused before the method runs
    assert server_metrics.calls == {"Svc.add": 3, "Svc.fail": 2}
    assert server_metrics.errors == {("Svc.fail", "Denied"): 1, ("Svc.fail", "KeyError"): 1}
    assert client_metrics.calls == {"Svc.add": 4, "Svc.fail": 2}
    assert client_metrics.errors == {("Svc.fail", "Denied"): 1, ("Svc.fail", "RemoteError"): 1, ("Svc.add", "ValidationError"): 1}
    assert all(d >= 0 for ds in server_metrics.durations.values() for d in ds)
    assert len(server_metrics.durations["Svc.add"]) == 3


# --------------------------------------------------------------------------- logging
def _xrpc_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "xrpc" or r.name.startswith("xrpc.")]


def _leaks(records: list[logging.LogRecord], secret: str) -> list[str]:
    leaked = []
    for r in records:
        text = r.getMessage() + repr(r.args) + (r.exc_text or "") + repr(getattr(r, "exc_info", None))
        if secret in text:
            leaked.append(r.getMessage())
    return leaked


async def test_log_has_one_line_per_refusal_and_never_the_payload(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="xrpc")
    impl = SvcImpl()
    server = xrpc.Server(middleware=[_gatekeeper(lambda: PermissionError("no token"))])
    server.export(Svc, impl)
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            svc = conn.proxy(Svc)
            with xrpc.call_metadata(token="let-me-in"):
                assert await svc.login("alice", SECRET) is True  # a successful call: no line
                assert _xrpc_records(caplog) == []

                with pytest.raises(xrpc.PeerRejected):
                    await svc.admin(SECRET)  # refused by @xrpc.requires
                records = _xrpc_records(caplog)
                assert len(records) == 1 and records[0].levelno == logging.WARNING
                assert "refused call Svc.admin" in records[0].getMessage()

                caplog.clear()
                with pytest.raises(xrpc.ValidationError):
                    await svc.login(12345, SECRET)  # type: ignore[arg-type]  # refused by the codec
                records = _xrpc_records(caplog)
                assert len(records) == 1 and "refused call Svc.login" in records[0].getMessage()

            caplog.clear()
            with pytest.raises(xrpc.RemoteError):
                await svc.login("alice", SECRET)  # refused by the middleware: no token
            records = _xrpc_records(caplog)
            assert len(records) == 1 and records[0].levelno == logging.DEBUG
            assert "Svc.login raised PermissionError" in records[0].getMessage()

    for refusing, logged in [
        (xrpc.Server(requirement=xrpc.Requirement.none()), "refused connection"),
        (xrpc.Server(on_connect=lambda conn: False), "refused by on_connect"),
    ]:
        caplog.clear()
        refusing.export(Svc, impl)
        with anyio.fail_after(T):
            with pytest.raises(xrpc.PeerRejected):
                async with xrpc.testing.connect(refusing) as conn:
                    await conn.proxy(Svc).login("alice", SECRET)
        records = _xrpc_records(caplog)
        assert len([r for r in records if logged in r.getMessage()]) == 1
    assert impl.ran == ["login"]
    assert _leaks(caplog.records, SECRET) == []


async def test_a_refused_literal_value_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="xrpc")
    server = xrpc.Server()
    server.export(Svc, SvcImpl())
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            with pytest.raises(xrpc.ValidationError):
                await conn.proxy(Svc).choose(SECRET)  # type: ignore[arg-type]
    assert len(_xrpc_records(caplog)) == 1
    assert _leaks(caplog.records, SECRET) == []
