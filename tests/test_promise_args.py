"""Promises as arguments: a promise from ``xrpc.pipeline(...)`` passed where the object its call
returns is expected travels as a reference to that call's result (``^id``); the receiver passes the
object its call returned, without it travelling back, once that call is over.

Covers: promises at the top level, in a list, a dict and an Optional, in nested chains (a promise
whose call takes a promise, a pipelined call taking a promise); the call carrying a promise reaching
the server before the first answer (one round trip); an answered promise; a failing promise (the
dependent method never runs, the error names the argument and the earlier call's error); promises
refused at the sender (another connection, a call returning no object, another interface, outside
the arguments of a call); and forged ``^id`` tokens on raw frames (no such call, a call returning no
object, a result no longer kept, the wrong interface), each refused with a typed error while the
connection lives on.  Real connections on memory and Unix sockets, on asyncio and trio.
"""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Protocol

import anyio
import pytest

import xrpc
from xrpc._protocol import Call, ErrorCode

from _timeouts import T
from _wire import ERROR_TAG, HELLO, REPLY_TAG, WELCOME_TAG, frame, pop_frames, raw

pytestmark = pytest.mark.timeout(60)

BACKENDS = ("asyncio", "trio")
TRANSPORTS = ("memory", "unix")


class NotFound(Exception):
    pass


@xrpc.interface
class Doc(Protocol):
    async def read(self) -> str: ...

    async def merge(self, other: Doc) -> str: ...


@xrpc.interface
class Listener(Protocol):
    async def changed(self, text: str) -> None: ...


@xrpc.interface(errors=[NotFound])
class Store(Protocol):
    async def open(self, name: str) -> Doc: ...

    async def copy(self, doc: Doc, name: str) -> Doc: ...

    async def add(self, a: int, b: int) -> int: ...

    async def concat(self, first: Doc, second: Doc) -> str: ...

    async def join(self, docs: list[Doc]) -> str: ...

    async def by_key(self, docs: dict[str, Doc]) -> str: ...

    async def maybe(self, doc: Optional[Doc] = None) -> str: ...

    async def watch(self, listener: Listener) -> None: ...

    async def total(self, docs: AsyncIterator[Doc]) -> str: ...

    async def ping(self) -> int: ...

    async def with_fd(self, doc: Doc, fd: xrpc.FileDescriptor) -> str: ...


class DocImpl:
    def __init__(self, name: str) -> None:
        self.name = name

    async def read(self) -> str:
        return f"doc {self.name}"

    async def merge(self, other: Doc) -> str:
        return f"{self.name}+{_name(other)}"


def _name(doc: Any) -> str:
    """The name of one of the server's own documents ("?" for anything else, e.g. a proxy)."""
    return doc.name if isinstance(doc, DocImpl) else "?"


class StoreImpl:
    def __init__(self) -> None:
        self.docs: dict[str, DocImpl] = {}
        self.ran: list[str] = []  # the methods that ran, besides open
        self.gate: anyio.Event | None = None  # open("gated") waits for it

    async def open(self, name: str) -> Doc:
        if name == "missing":
            raise NotFound(name)
        if name == "gated":
            assert self.gate is not None
            await self.gate.wait()
        doc = self.docs.get(name)
        if doc is None:
            doc = self.docs[name] = DocImpl(name)
        return doc  # type: ignore[return-value]

    def _own(self, doc: Any) -> str:
        """The name of ``doc`` if it is the very object this store handed out."""
        assert isinstance(doc, DocImpl) and self.docs[doc.name] is doc, doc
        return doc.name

    async def copy(self, doc: Doc, name: str) -> Doc:
        self.ran.append("copy")
        new = self.docs[name] = DocImpl(f"{self._own(doc)}/{name}")
        self.docs[new.name] = new
        return new  # type: ignore[return-value]

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def concat(self, first: Doc, second: Doc) -> str:
        self.ran.append("concat")
        return f"{self._own(first)},{self._own(second)}"

    async def join(self, docs: list[Doc]) -> str:
        self.ran.append("join")
        return ",".join(self._own(d) for d in docs)

    async def by_key(self, docs: dict[str, Doc]) -> str:
        self.ran.append("by_key")
        return ",".join(f"{k}={self._own(d)}" for k, d in sorted(docs.items()))

    async def maybe(self, doc: Optional[Doc] = None) -> str:
        self.ran.append("maybe")
        return "none" if doc is None else self._own(doc)

    async def watch(self, listener: Listener) -> None:
        self.ran.append("watch")

    async def total(self, docs: AsyncIterator[Doc]) -> str:
        self.ran.append("total")
        return ",".join([_name(d) async for d in docs])

    def ping(self) -> int:
        return 1

    async def with_fd(self, doc: Doc, fd: xrpc.FileDescriptor) -> str:
        with fd:
            return f"{self._own(doc)}:{os.read(fd.fileno(), 100).decode()}"


def run(backend: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(T * 2):
            return await fn()

    return anyio.run(bounded, backend=backend)


def url_for(transport: str, d: str) -> str:
    return f"memory://promise-args-{id(d)}" if transport == "memory" else f"unix://{d}/s.sock"


@contextlib.asynccontextmanager
async def store_server(impl: StoreImpl, url: str) -> AsyncIterator[tuple[xrpc.Server, xrpc.Connection, Any]]:
    """A server exporting ``impl`` as the Store on ``url``, a connection to it, and its Store."""
    server = xrpc.Server()
    server.export(Store, impl)
    async with server.listen(url) as listener, xrpc.connect(listener.url, timeout=T) as conn:
        yield server, conn, conn.proxy(Store)


async def until(predicate: Callable[[], bool], roundtrip: Callable[[], Awaitable[Any]]) -> None:
    """Poll ``predicate`` with a round-trip call between checks (bounded by the caller's deadline)."""
    while not predicate():
        await roundtrip()


# --------------------------------------------------------------------------- promises as arguments
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_promise_passed_as_an_argument_is_sent_before_the_first_answer(sock_dir: str, transport: str, backend: str) -> None:
    impl = StoreImpl()

    async def main() -> None:
        impl.gate = anyio.Event()
        async with store_server(impl, url_for(transport, sock_dir)) as (server, conn, store):
            (served,) = server.connections
            doc = xrpc.pipeline(store).open("gated")
            other = xrpc.pipeline(store).open("b")
            here = await store.open("c")
            results: dict[str, str] = {}

            async def dependent(name: str, call: Callable[[], Awaitable[str]]) -> None:
                results[name] = await call()

            async with anyio.create_task_group() as tg:
                tg.start_soon(dependent, "concat", lambda: store.concat(doc, other))
                tg.start_soon(dependent, "join", lambda: store.join([here, doc, other, doc]))
                tg.start_soon(dependent, "by_key", lambda: store.by_key({"x": doc, "y": here}))
                # open("gated") cannot answer before the gate opens, and the gate opens only once
                # the calls depending on it are at the server too: they went out at once
                await until(lambda: served.in_flight == 4, store.ping)
                assert impl.ran == []  # the dependent calls wait for the result they name
                impl.gate.set()
            assert results == {"concat": "gated,b", "join": "c,gated,b,gated", "by_key": "x=gated,y=c"}
            assert sorted(impl.ran) == ["by_key", "concat", "join"]
            # the promise still gives its own result, the object the dependent call was passed
            assert await (await doc).read() == "doc gated"

    run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_promises_inside_collections_and_in_chains(sock_dir: str, transport: str, backend: str) -> None:
    impl = StoreImpl()

    async def main() -> None:
        async with store_server(impl, url_for(transport, sock_dir)) as (server, conn, store):
            p = xrpc.pipeline(store)
            a, b = p.open("a"), p.open("b")
            here = await store.open("c")  # a proxy, passed home as the object itself
            assert await store.join([a, b, here, a]) == "a,b,c,a"
            assert await store.by_key({"x": a, "y": here, "z": b}) == "x=a,y=c,z=b"
            assert await store.maybe(b) == "b"
            assert await store.maybe(None) == "none"
            # nested chains: a promise whose call takes a promise, passed on to a third call; a
            # call pipelined on a promise, taking another promise
            c1 = p.copy(p.open("d"), "e")
            c2 = p.copy(c1, "f")
            assert await store.concat(c2, c1) == "d/e/f,d/e"
            assert await p.open("g").merge(p.copy(p.open("h"), "i")) == "g+h/i"
            # an answered promise travels as its result, a reference coming home
            answered = p.open("j")
            await answered
            assert await store.concat(answered, a) == "j,a"
            # keyword arguments and defaults: the same
            assert await store.maybe(doc=p.open("k")) == "k"
            assert impl.ran.count("copy") == 3

    run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_promise_fails_the_call_that_depends_on_it(sock_dir: str, backend: str) -> None:
    impl = StoreImpl()

    async def main() -> None:
        impl.gate = anyio.Event()
        async with store_server(impl, url_for("unix", sock_dir)) as (server, conn, store):
            p = xrpc.pipeline(store)
            missing = p.open("missing")
            with pytest.raises(xrpc.ObjectNotFound, match=r"argument 'second' of Store\.concat: the call \^\d+ it depends on failed \(NotFound\('missing'\)\)"):
                await store.concat(p.open("a"), missing)
            with pytest.raises(xrpc.ObjectNotFound, match="argument 'docs' of Store.join: .*NotFound"):
                await store.join([p.open("a"), missing])
            # already failed on the client when it is passed: the same
            with pytest.raises(NotFound):
                await missing
            with pytest.raises(xrpc.ObjectNotFound, match="argument 'doc' of Store.maybe"):
                await store.maybe(missing)
            # a chain whose first link fails: every call depending on it fails, none runs
            chained = p.copy(p.open("missing"), "x")
            with pytest.raises(xrpc.ObjectNotFound, match="argument 'first' of Store.concat"):
                await store.concat(chained, p.open("b"))
            with pytest.raises(xrpc.ObjectNotFound, match="argument 'doc' of Store.copy: .*NotFound"):
                await chained
            # a pipelined call on a failed promise whose arguments are promises
            with pytest.raises(xrpc.ObjectNotFound):
                await p.open("missing").merge(p.open("a"))
            # the earlier call cancelled by its caller: the call depending on it fails too
            gated = p.open("gated")
            dependent = p.concat(gated, p.open("a"))
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.2):
                    await gated
            with pytest.raises(xrpc.ObjectNotFound, match="argument 'first' of Store.concat"):
                await dependent
            assert impl.ran == []
            assert await store.concat(p.open("a"), p.open("b")) == "a,b"  # the connection lives on
            (served,) = server.connections
            await until(lambda: served.in_flight == 0, store.ping)  # nothing waits any more

    run(backend, main)


async def test_a_promise_is_refused_where_it_cannot_stand_for_the_object(sock_dir: str) -> None:
    impl, other_impl = StoreImpl(), StoreImpl()
    server, other = xrpc.Server(), xrpc.Server()
    server.export(Store, impl)
    other.export(Store, other_impl)
    with anyio.fail_after(T):
        async with (
            server.listen(f"unix://{sock_dir}/a.sock") as la,
            other.listen(f"unix://{sock_dir}/b.sock") as lb,
            xrpc.connect(la.url) as a,
            xrpc.connect(lb.url) as b,
        ):
            store_a, store_b = a.proxy(Store), b.proxy(Store)
            promise = xrpc.pipeline(store_a).open("a")
            # on another connection, answered or not
            for _ in range(2):
                with pytest.raises(xrpc.ValidationError, match="argument 'doc' of Store.maybe: .*another connection") as info:
                    await store_b.maybe(promise)
                assert info.value.argument == "doc"
                with pytest.raises(xrpc.ValidationError, match="argument 'docs' of Store.join: .*another connection"):
                    await store_b.join([promise])
                await promise
            # a promise of a call that returns no object, or another interface
            with pytest.raises(xrpc.ValidationError, match="argument 'doc' .*Store.add, which returns no object"):
                await store_a.maybe(xrpc.pipeline(store_a).add(1, 2))
            with pytest.raises(xrpc.ValidationError, match="argument 'listener' .*a promise of a Doc is not a Listener"):
                await store_a.watch(xrpc.pipeline(store_a).open("a"))
            # not as a stream item (only as an argument of a call)
            async def docs() -> AsyncIterator[Any]:
                yield xrpc.pipeline(store_a).open("a")

            with pytest.raises(xrpc.ValidationError, match="only as an argument of a call"):
                await store_a.total(docs())
            assert impl.ran == ["total"] and other_impl.ran == []  # (total ran: its item was refused)
            assert await store_a.concat(xrpc.pipeline(store_a).open("a"), promise) == "a,a"
            assert a.exported_objects == 0 and b.exported_objects == 0  # nothing was exported instead


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["argument", "pipelined"])
def test_a_call_cancelled_while_it_waits_for_a_promise_gives_back_what_it_held(sock_dir: str, target: str, backend: str) -> None:
    impl = StoreImpl()

    async def main() -> None:
        impl.gate = anyio.Event()
        async with store_server(impl, url_for("unix", sock_dir)) as (server, conn, store):
            (served,) = server.connections
            p = xrpc.pipeline(store)
            gated = p.open("gated")
            waiting = p.concat(gated, p.open("a")) if target == "argument" else gated.merge(p.open("a"))
            await until(lambda: served.in_flight == 2, store.ping)
            with anyio.move_on_after(0.1):
                await waiting  # gives up: the call is cancelled while it waits
            await until(lambda: served.in_flight == 1, store.ping)  # only open("gated") is left
            impl.gate.set()
            await gated
            await until(lambda: served.in_flight == 0, store.ping)
            # a deadline that passes while the call waits: TimeoutError, and nothing is left waiting
            impl.gate = anyio.Event()
            gated = p.open("gated")
            short = xrpc.pipeline(conn.proxy(Store, timeout=0.2))
            with pytest.raises(TimeoutError):
                if target == "argument":
                    await short.concat(gated, p.open("a"))
                else:
                    await short.open("gated").merge(p.open("a"))
            await until(lambda: served.in_flight == 1, store.ping)  # (short.open("gated") timed out too)
            impl.gate.set()
            await until(lambda: served.in_flight == 0, store.ping)
            assert impl.ran == []

    run(backend, main)


def test_nothing_is_left_behind(sock_dir: str) -> None:
    """Results passed as arguments are released like any other: once the client's promises and
    proxies go, the server holds nothing, and nothing waits."""
    impl = StoreImpl()

    async def main() -> None:
        async with store_server(impl, url_for("unix", sock_dir)) as (server, conn, store):
            (served,) = server.connections
            p = xrpc.pipeline(store)
            for i in range(20):
                assert await store.concat(p.open(f"n{i}"), p.copy(p.open(f"m{i}"), f"c{i}")) == f"n{i},m{i}/c{i}"
            del p
            gc.collect()
            await until(lambda: served.exported_objects == 0, store.ping)
            assert served.in_flight == 0 and conn.remote_refs == 0

    run("asyncio", main)


def test_a_descriptor_beside_a_promise_arrives_whole(sock_dir: str) -> None:
    """The arguments of a call waiting for a promise are decoded again once it is known: a
    descriptor among them is the one that arrived, still open, and none is left open after."""
    impl = StoreImpl()

    async def main() -> None:
        impl.gate = anyio.Event()
        async with store_server(impl, url_for("unix", sock_dir)) as (server, conn, store):
            (served,) = server.connections
            before = len(os.listdir("/proc/self/fd"))
            r, w = os.pipe()
            try:
                os.write(w, b"hello")
                doc = xrpc.pipeline(store).open("gated")
                async with anyio.create_task_group() as tg:
                    result: list[str] = []

                    async def dependent() -> None:
                        result.append(await store.with_fd(doc, xrpc.FileDescriptor(r)))

                    tg.start_soon(dependent)
                    await until(lambda: served.in_flight == 2, store.ping)
                    impl.gate.set()
                assert result == ["gated:hello"]
            finally:
                os.close(r)
                os.close(w)
            gc.collect()
            await store.ping()
            assert len(os.listdir("/proc/self/fd")) == before

    run("asyncio", main)


# --------------------------------------------------------------------------- forged tokens on raw frames
def _call(call_id: int, method: str, args: list[Any], obj: str = "Store") -> bytes:
    return frame(Call(call_id, obj, method, raw(args)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forged_promise_tokens_are_refused_and_the_connection_lives_on(sock_dir: str, backend: str) -> None:
    impl = StoreImpl()

    async def main() -> None:
        server = xrpc.Server()
        server.export(Store, impl)
        async with server.listen(f"unix://{sock_dir}/s.sock"), await anyio.connect_unix(f"{sock_dir}/s.sock") as sock:
            buf = bytearray()

            async def answer(data: bytes) -> list[Any]:
                await sock.send(data)
                while True:
                    frames = pop_frames(buf)
                    if frames:
                        return frames
                    buf.extend(await sock.receive())

            (welcome,) = await answer(HELLO)
            assert welcome[0] == WELCOME_TAG
            (reply,) = await answer(_call(1, "open", ["a"]))
            assert reply[0] == REPLY_TAG and reply[2][0] is False  # a reference to the server's "#1"
            (reply,) = await answer(_call(3, "add", [1, 2]))
            assert reply[:3] == [REPLY_TAG, 3, 3]
            # the real thing, by hand: the result of call 1
            (reply,) = await answer(_call(5, "concat", [[True, "^1", "Doc"], [True, "^1", "Doc"]]))
            assert reply[:3] == [REPLY_TAG, 5, "a,a"]
            forged = [
                ([True, "^99", "Doc"], "names no result"),  # no such call
                ([True, "^3", "Doc"], "names no result"),  # a call that returned no object
                ([True, "^2", "Doc"], "names no result"),  # an id of the server's own parity
                ([True, "^x", "Doc"], "names no result"),
                ([True, "^", "Doc"], "names no result"),
                ([True, "^" + "9" * 5000, "Doc"], "names no result"),
                ([True, "^1", "Listener"], "arrived where a Doc is declared"),
            ]
            call_id = 7
            for token, why in forged:
                (err,) = await answer(_call(call_id, "concat", [[True, "^1", "Doc"], token]))
                assert err[0] == ERROR_TAG and err[1] == call_id and err[2] == ErrorCode.VALIDATION, err
                assert "argument 'second'" in err[4] and why in err[4], err
                call_id += 2
            # the wrong interface for the slot: a Doc's promise where a Listener is declared
            (err,) = await answer(_call(call_id, "watch", [[True, "^1", "Listener"]]))
            assert err[2] == ErrorCode.VALIDATION and "is the result of a call returning a Doc, not a Listener" in err[4], err
            call_id += 2
            # an id far in the past: the results of the last 256 calls are kept, not older ones
            first = call_id
            for _ in range(260):
                (reply,) = await answer(_call(call_id, "open", ["b"]))
                assert reply[0] == REPLY_TAG
                call_id += 2
            (err,) = await answer(_call(call_id, "concat", [[True, f"^{first}", "Doc"], [True, "^1", "Doc"]]))
            assert err[2] == ErrorCode.VALIDATION and "argument 'first'" in err[4] and "names no result" in err[4], err
            call_id += 2
            # a promise token in a pipelined target's place is no object name either
            (err,) = await answer(_call(call_id, "read", [], obj="^3"))
            assert err[2] == ErrorCode.OBJECT_NOT_FOUND, err
            call_id += 2
            assert impl.ran == ["concat"]
            # the connection lives on
            last = [True, f"^{call_id - 6}", "Doc"]  # the last open("b"), still kept
            (reply,) = await answer(_call(call_id, "concat", [last, last]))
            assert reply[:3] == [REPLY_TAG, call_id, "b,b"], reply

    run(backend, main)
