"""Acceptance tests of the public API (DESIGN.md section 1), over every transport where it matters."""

import contextvars
import dataclasses
import datetime
import decimal
import enum
import itertools
import os
import uuid
from typing import Annotated, Any, AsyncIterable, AsyncIterator, Iterable, Protocol

import anyio
import msgspec
import pytest

import xrpc
from conftest import serve_and_connect
from _timeouts import T



# --------------------------------------------------------------------------- data types
class Point(msgspec.Struct):
    x: float
    y: float


class Shape(msgspec.Struct):
    name: str


class Circle(Shape):
    r: float


class Square(Shape):
    side: float


class Triangle(Shape):
    base: float


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Tag:
    label: str
    color: Color


class Leaf(msgspec.Struct):
    id: uuid.UUID
    when: datetime.datetime
    amount: decimal.Decimal
    blob: bytes
    tag: Tag


class Branch(msgspec.Struct):
    name: str
    leaves: dict[str, list[Leaf]]


class Tree(msgspec.Struct):
    color: Color
    branches: list[Branch]


class NotFound(Exception):
    pass


# --------------------------------------------------------------------------- interfaces
@xrpc.interface(errors=(NotFound,))
class Svc(Protocol):
    async def add(self, a: int, b: int = 10) -> int: ...
    async def mid(self, a: Point, b: Point) -> Point: ...
    async def nothing(self, x: int) -> None: ...
    async def find(self, key: str) -> str: ...
    async def crash(self, text: str) -> int: ...
    async def wrong_reply(self) -> int: ...
    async def echo_any(self, v: Any) -> Any: ...
    async def echo_obj(self, v: object) -> object: ...
    async def store(self, item: Annotated[Shape, xrpc.allow(Circle, Square)]) -> str: ...
    async def pick(self, which: str) -> Circle | Square: ...
    async def tree(self, t: Tree) -> Tree: ...
    async def whoami(self) -> int: ...
    async def block(self) -> None: ...
    async def deadline_left(self) -> float: ...
    async def record(self, i: int) -> None: ...
    async def slow(self) -> str: ...
    async def fast(self) -> str: ...
    async def relay(self, n: int) -> int: ...
    async def greeting(self) -> str: ...
    async def on_connect_done(self) -> bool: ...
    @xrpc.oneway
    async def notify(self, text: str) -> None: ...


@xrpc.interface(name="Svc")
class SvcPlus(Protocol):
    """The same wire name as Svc, with a method the server does not have."""

    async def add(self, a: int, b: int = 10) -> int: ...
    async def extra(self) -> int: ...


@xrpc.interface
class Named(Protocol):
    async def ident(self, i: int) -> str: ...


@xrpc.interface
class Callback(Protocol):
    async def ping(self, n: int) -> int: ...


@xrpc.interface
class Greeter(Protocol):
    async def greet(self, who: str) -> str: ...


@xrpc.interface
class Session(Protocol):
    async def ident(self) -> int: ...


def fresh_registry() -> Any:
    """A new interface with ``put(item: Shape)``, on every call (``set_classes`` changes it)."""

    @xrpc.interface
    class Registry(Protocol):
        async def put(self, item: Shape) -> str: ...

    return Registry


@xrpc.interface
class Replies(Protocol):
    async def any_reply(self, plain: bool) -> Any: ...
    async def allowed_reply(self, which: str) -> Annotated[Shape, xrpc.allow(Circle, Square)]: ...


@xrpc.interface
class KwOnly(Protocol):
    async def scale(self, a: int, *, factor: int, offset: int = 0) -> int: ...


# --------------------------------------------------------------------------- implementations
class SvcImpl:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.nothing_got: list[int] = []
        self.stored: list[Shape] = []
        self.server_conn: xrpc.Connection | None = None
        self.started = anyio.Event()
        self.finally_ran = anyio.Event()
        self.cancelled = False
        self.order: list[int] = []
        self.slow_started = anyio.Event()
        self.release_slow = anyio.Event()
        self.notified: list[str] = []
        self.notify_started = anyio.Event()
        self.notify_gate = anyio.Event()
        self.notify_done = anyio.Event()
        self.greeting_text = ""
        self.connected = False

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def add(self, a: int, b: int = 10) -> int:
        self._count("add")
        return a + b

    async def mid(self, a: Point, b: Point) -> Point:
        return Point((a.x + b.x) / 2, (a.y + b.y) / 2)

    async def nothing(self, x: int) -> None:
        self.nothing_got.append(x)

    async def find(self, key: str) -> str:
        raise NotFound(key, 404)

    async def crash(self, text: str) -> int:
        raise ValueError(text)

    async def wrong_reply(self) -> int:
        return "not an int"  # type: ignore[return-value]

    async def echo_any(self, v: Any) -> Any:
        self._count("echo_any")
        return v

    async def echo_obj(self, v: object) -> object:
        self._count("echo_obj")
        return v

    async def store(self, item: Shape) -> str:
        self.stored.append(item)
        return type(item).__name__

    async def pick(self, which: str) -> Circle | Square:
        return Circle("c", 1.5) if which == "circle" else Square("s", 2.5)

    async def tree(self, t: Tree) -> Tree:
        assert type(t) is Tree
        return t

    async def whoami(self) -> int:
        self.server_conn = xrpc.current_connection()
        return os.getpid()

    async def block(self) -> None:
        try:
            self.started.set()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise
        finally:
            self.finally_ran.set()

    async def deadline_left(self) -> float:
        return anyio.current_effective_deadline() - anyio.current_time()

    async def record(self, i: int) -> None:
        self.order.append(i)
        await anyio.lowlevel.checkpoint()

    async def slow(self) -> str:
        self.slow_started.set()
        await self.release_slow.wait()
        return "slow"

    async def fast(self) -> str:
        return "fast"

    async def relay(self, n: int) -> int:
        back = xrpc.current_connection().proxy(Callback)
        return await back.ping(n) + 1

    async def greeting(self) -> str:
        return self.greeting_text

    async def on_connect_done(self) -> bool:
        return self.connected

    async def notify(self, text: str) -> None:
        self.notified.append(text)
        self.notify_started.set()
        await self.notify_gate.wait()
        self.notify_done.set()


class NamedImpl:
    def __init__(self, name: str) -> None:
        self.name = name

    async def ident(self, i: int) -> str:
        await anyio.lowlevel.checkpoint()
        return f"{self.name}:{i}"


class CallbackImpl:
    def __init__(self) -> None:
        self.got: list[int] = []

    async def ping(self, n: int) -> int:
        self.got.append(n)
        return n * 2


class GreeterImpl:
    def __init__(self) -> None:
        self.greeted: list[str] = []

    async def greet(self, who: str) -> str:
        self.greeted.append(who)
        return f"hello {who}"


class SessionImpl:
    def __init__(self, ident: int) -> None:
        self._ident = ident

    async def ident(self) -> int:
        return self._ident


class RegistryImpl:
    async def put(self, item: Shape) -> str:
        return type(item).__name__


class RepliesImpl:
    async def any_reply(self, plain: bool) -> Any:
        return {"p": [1, 2]} if plain else Point(1.0, 2.0)

    async def allowed_reply(self, which: str) -> Shape:
        return {"circle": Circle("c", 1.0), "square": Square("s", 2.0)}.get(which, Triangle("t", 3.0))


class KwOnlyImpl:
    async def scale(self, a: int, *, factor: int, offset: int = 0) -> int:
        return a * factor + offset


def make_server(impl: SvcImpl | None = None, **kw: Any) -> tuple[xrpc.Server, SvcImpl]:
    impl = impl or SvcImpl()
    server = xrpc.Server(**kw)
    server.export(Svc, impl)
    return server, impl


# --------------------------------------------------------------------------- unary calls
async def test_unary_returns_typed_struct(transport: str) -> None:
    server, _ = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            p = conn.proxy(Svc)
            r = await p.mid(Point(0.0, 2.0), Point(4.0, 6.0))
            assert type(r) is Point
            assert r == Point(2.0, 4.0)


async def test_none_method(transport: str) -> None:
    server, impl = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            assert await conn.proxy(Svc).nothing(7) is None
            assert impl.nothing_got == [7]


async def test_default_and_keyword_arguments() -> None:
    server, impl = make_server()
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            p = conn.proxy(Svc)
            assert await p.add(1) == 11
            assert await p.add(1, 2) == 3
            assert await p.add(1, b=5) == 6
            assert await p.add(a=5, b=6) == 11
            assert await p.add(b=1, a=2) == 3
            assert impl.calls["add"] == 5


# A client stream declared AsyncIterable[T] | Iterable[T]: callers pass a list under a type checker.
@xrpc.interface
class Summing(Protocol):
    async def total(self, xs: AsyncIterable[int] | Iterable[int]) -> int: ...

    def doubled(self, xs: Iterable[int] | AsyncIterable[int], label: str = "") -> AsyncIterator[str]: ...


@xrpc.interface(name="Summing")
class SummingAsyncOnly(Protocol):
    async def total(self, xs: AsyncIterator[int]) -> int: ...

    def doubled(self, xs: AsyncIterator[int], label: str = "") -> AsyncIterator[str]: ...


class SummingImpl:
    async def total(self, xs: AsyncIterator[int]) -> int:
        assert not isinstance(xs, list)
        return sum([x async for x in xs])

    async def doubled(self, xs: AsyncIterator[int], label: str = "") -> AsyncIterator[str]:
        async for x in xs:
            yield f"{label}{2 * x}"


async def test_a_client_stream_declared_as_any_iterable_takes_lists_and_async_iterables() -> None:
    desc = xrpc.describe(Summing)
    assert desc.methods["total"].kind is xrpc.MethodKind.CLIENT_STREAM
    assert desc.methods["doubled"].kind is xrpc.MethodKind.BIDI_STREAM
    assert desc.fingerprint == xrpc.describe(SummingAsyncOnly).fingerprint  # the same on the wire
    server = xrpc.Server()
    server.export(Summing, SummingImpl())

    async def numbers() -> AsyncIterator[int]:
        yield 4
        yield 5

    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            p = conn.proxy(Summing)
            assert await p.total([1, 2, 3]) == 6
            assert await p.total(range(4)) == 6
            assert await p.total(numbers()) == 9
            assert [x async for x in p.doubled([1, 2], label="x")] == ["x2", "x4"]
            assert await conn.proxy(SummingAsyncOnly).total(numbers()) == 9
            with pytest.raises(xrpc.ValidationError):
                await p.total(["a"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "annotation",
    ["AsyncIterable[int] | Iterable[str]", "AsyncIterable[int] | list[int]", "AsyncIterable[int] | Iterable[int] | None"],
)
def test_other_unions_are_not_client_streams(annotation: str) -> None:
    namespace: dict[str, Any] = {"AsyncIterable": AsyncIterable, "Iterable": Iterable, "Protocol": Protocol, "xrpc": xrpc}
    with pytest.raises(xrpc.InterfaceError):
        exec(f"@xrpc.interface\nclass Odd(Protocol):\n    async def total(self, xs: {annotation}) -> int: ...\n", namespace)


async def test_missing_argument_is_refused_locally() -> None:
    server, impl = make_server()
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            with pytest.raises(xrpc.ValidationError):
                await conn.proxy(Svc).add()  # type: ignore[call-arg]
            assert impl.calls.get("add", 0) == 0


async def test_many_proxies_share_one_connection(transport: str) -> None:
    server = xrpc.Server()
    names = ("a", "b", "c")
    for n in names:
        server.export(Named, NamedImpl(n), name=n)
    results: dict[tuple[str, int], str] = {}
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            proxies = {n: conn.proxy(Named, name=n) for n in names}

            async def one(n: str, i: int) -> None:
                results[(n, i)] = await proxies[n].ident(i)

            async with anyio.create_task_group() as tg:
                for i in range(200):
                    n = names[i % 3]
                    tg.start_soon(one, n, i)
            assert len(server.connections) == 1
    assert len(results) == 200
    for (n, i), got in results.items():
        assert got == f"{n}:{i}"


async def test_large_answers_in_flight_together_stay_intact(transport: str) -> None:
    """Large frames are received into buffers that are reused once nothing decoded from them is
    alive: replies that arrive before their callers run (so their payloads are still held) must
    keep their bytes while the next large frames arrive, and reuse must not mix frames up."""
    server, _ = make_server()
    blobs = [bytes([i]) * (100_000 + 70_000 * i) for i in range(8)]  # sizes cross each other
    results: dict[int, Any] = {}
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            p = conn.proxy(Svc)

            async def one(i: int) -> None:
                results[i] = await p.echo_any(blobs[i])

            for _ in range(3):
                async with anyio.create_task_group() as tg:
                    for i in range(len(blobs)):
                        tg.start_soon(one, i)
                assert results == dict(enumerate(blobs))
                results.clear()
                for i in reversed(range(len(blobs))):  # one at a time: each buffer reused, larger then smaller
                    assert await p.echo_any(blobs[i]) == blobs[i]


# --------------------------------------------------------------------------- one-way
async def test_oneway_reaches_server_without_waiting(transport: str) -> None:
    server, impl = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            # The server's method blocks on notify_gate, which only the test sets after the call
            # returned: a one-way call that waited for completion would dead-lock here.
            assert await conn.proxy(Svc).notify("hi") is None
            await impl.notify_started.wait()
            assert not impl.notify_done.is_set()
            impl.notify_gate.set()
            await impl.notify_done.wait()
            assert impl.notified == ["hi"]


# --------------------------------------------------------------------------- errors
async def test_declared_error_travels_as_itself(transport: str) -> None:
    server, _ = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            with pytest.raises(NotFound) as ei:
                await conn.proxy(Svc).find("missing")
            assert type(ei.value) is NotFound
            assert ei.value.args == ("missing", 404)


async def test_undeclared_error_is_remote_error(transport: str) -> None:
    server, _ = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            with pytest.raises(xrpc.RemoteError) as ei:
                await conn.proxy(Svc).crash("kaboom")
            e = ei.value
            assert e.type_name == "ValueError"
            assert e.message == "kaboom"
            for text in (e.message, str(e)):
                assert "Traceback" not in text
                assert 'File "' not in text
            # the connection survives
            assert await conn.proxy(Svc).add(1, 1) == 2


async def test_errors_leave_the_connect_block_unwrapped(transport: str) -> None:
    """An exception from the body of ``listen``/``connect`` blocks is not wrapped in an ExceptionGroup."""
    server, _ = make_server()
    with anyio.fail_after(T):
        with pytest.raises(NotFound) as ei:
            async with serve_and_connect(server, transport) as conn:
                await conn.proxy(Svc).find("gone")
    assert ei.value.args == ("gone", 404)


async def test_method_not_found() -> None:
    server, _ = make_server()
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            with pytest.raises(xrpc.MethodNotFound):
                await conn.proxy(SvcPlus).extra()
            assert await conn.proxy(Svc).add(2, 3) == 5


async def test_object_not_found() -> None:
    server, _ = make_server()
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            with pytest.raises(xrpc.ObjectNotFound):
                await conn.proxy(Svc, name="nobody-exported-this").add(1)
            assert await conn.proxy(Svc).add(2, 3) == 5


# --------------------------------------------------------------------------- validation
async def test_wrong_argument_type_is_refused(transport: str) -> None:
    server, impl = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            p = conn.proxy(Svc)
            with pytest.raises(xrpc.ValidationError) as ei:
                await p.add("one", 2)  # type: ignore[arg-type]
            assert ei.value.argument == "a"
            assert ei.value.method == "add"
            with pytest.raises(xrpc.ValidationError) as ei:
                await p.add(1, b="two")  # type: ignore[arg-type]
            assert ei.value.argument == "b"
            assert ei.value.method == "add"
            assert impl.calls.get("add", 0) == 0
            assert await p.add(1, 2) == 3
            assert impl.calls["add"] == 1


async def test_wrong_reply_type_is_refused_on_caller(transport: str) -> None:
    server, _ = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            with pytest.raises(xrpc.ValidationError) as ei:
                await conn.proxy(Svc).wrong_reply()
            assert ei.value.method == "wrong_reply"
            assert await conn.proxy(Svc).add(1, 2) == 3


@pytest.mark.parametrize("method", ["echo_any", "echo_obj"])
async def test_any_slot_refuses_custom_classes_but_carries_plain_data(method: str) -> None:
    server, impl = make_server()
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            call = getattr(conn.proxy(Svc), method)
            for bad in (Point(1.0, 2.0), [1, {"k": Point(1.0, 2.0)}], {"deep": [[Tag("x", Color.RED)]]}):
                with pytest.raises(xrpc.ValidationError) as ei:
                    await call(bad)
                assert ei.value.argument == "v"
                assert ei.value.method == method
            assert impl.calls.get(method, 0) == 0
            plain = {"a": [1, {"b": [None, True, 1.5, "s", b"\x00bytes"]}], "n": -(2**40), "e": {}, "l": []}
            got = await call(plain)
            assert got == plain
            assert type(got["a"][1]["b"][4]) is bytes
            assert impl.calls[method] == 1


async def test_allow_annotation_widens_to_exactly_those_classes(transport: str) -> None:
    server, impl = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            p = conn.proxy(Svc)
            assert await p.store(Circle("c", 1.0)) == "Circle"
            assert await p.store(Square("s", 2.0)) == "Square"
            assert [type(s) for s in impl.stored] == [Circle, Square]
            assert impl.stored == [Circle("c", 1.0), Square("s", 2.0)]
            for bad in (Triangle("t", 3.0), Shape("plain")):
                with pytest.raises(xrpc.ValidationError) as ei:
                    await p.store(bad)
                assert ei.value.argument == "item"
                assert ei.value.method == "store"
            assert len(impl.stored) == 2


@pytest.mark.parametrize("argument", ["item", 0], ids=["by-name", "by-index"])
async def test_set_classes_widens_programmatically(argument: str | int) -> None:
    iface = fresh_registry()
    xrpc.describe(iface).set_classes("put", argument, [Circle, Square])
    server = xrpc.Server()
    server.export(iface, RegistryImpl())
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            p = conn.proxy(iface)
            assert await p.put(Circle("c", 1.0)) == "Circle"
            assert await p.put(Square("s", 1.0)) == "Square"
            with pytest.raises(xrpc.ValidationError) as ei:
                await p.put(Triangle("t", 1.0))
            assert ei.value.argument == "item"
            assert ei.value.method == "put"


async def test_union_reply_of_untagged_structs(transport: str) -> None:
    server, _ = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            p = conn.proxy(Svc)
            c = await p.pick("circle")
            s = await p.pick("square")
            assert type(c) is Circle and c == Circle("c", 1.5)
            assert type(s) is Square and s == Square("s", 2.5)


async def test_allowed_reply_classes() -> None:
    server = xrpc.Server()
    server.export(Replies, RepliesImpl())
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            p = conn.proxy(Replies)
            c, s = await p.allowed_reply("circle"), await p.allowed_reply("square")
            assert type(c) is Circle and c == Circle("c", 1.0)
            assert type(s) is Square and s == Square("s", 2.0)
            assert await p.any_reply(True) == {"p": [1, 2]}


@pytest.mark.parametrize("method,arg", [("any_reply", False), ("allowed_reply", "triangle")])
async def test_reply_refused_on_the_callee_is_a_validation_error(method: str, arg: Any) -> None:
    server = xrpc.Server()
    server.export(Replies, RepliesImpl())
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            with pytest.raises(xrpc.ValidationError) as ei:
                await getattr(conn.proxy(Replies), method)(arg)
            assert ei.value.method == method


async def test_keyword_only_parameters() -> None:
    server = xrpc.Server()
    server.export(KwOnly, KwOnlyImpl())
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            p = conn.proxy(KwOnly)
            assert await p.scale(2, factor=10) == 20
            assert await p.scale(2, factor=3, offset=1) == 7


def _tree() -> Tree:
    when = datetime.datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=datetime.timezone.utc)

    def leaf(i: int) -> Leaf:
        return Leaf(
            id=uuid.UUID(int=i * 7919 + 1),
            when=when + datetime.timedelta(days=i),
            amount=decimal.Decimal(f"{i}.{i:02d}"),
            blob=bytes(range(i, i + 5)),
            tag=Tag(f"t{i}", Color.BLUE if i % 2 else Color.RED),
        )

    branches = [
        Branch(name=f"b{b}", leaves={f"k{k}": [leaf(b * 10 + k * 3 + j) for j in range(3)] for k in range(2)}) for b in range(3)
    ]
    return Tree(color=Color.RED, branches=branches)


async def test_nested_typed_data_round_trips(transport: str) -> None:
    server, _ = make_server()
    sent = _tree()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            got = await conn.proxy(Svc).tree(sent)
    assert got == sent
    assert type(got) is Tree and type(got.color) is Color
    for br in got.branches:
        assert type(br) is Branch
        for key, leaves in br.leaves.items():
            assert type(key) is str and type(leaves) is list
            for lf in leaves:
                assert type(lf) is Leaf
                assert type(lf.id) is uuid.UUID
                assert type(lf.when) is datetime.datetime and lf.when.tzinfo is not None
                assert type(lf.amount) is decimal.Decimal
                assert type(lf.blob) is bytes
                assert type(lf.tag) is Tag and type(lf.tag.color) is Color


# --------------------------------------------------------------------------- connections
async def test_current_connection_is_the_server_side(transport: str) -> None:
    server, impl = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            assert await conn.proxy(Svc).whoami() == os.getpid()
            sc = impl.server_conn
            assert sc is not None and sc is not conn
            assert sc in server.connections
            if transport.startswith("unix"):
                assert sc.peer.transport == "unix"
                assert sc.peer.uid == os.getuid()
                assert sc.peer.gid == os.getgid()
                assert sc.peer.pid == os.getpid()


def test_current_connection_outside_a_call_raises() -> None:
    with pytest.raises(LookupError):
        xrpc.current_connection()


async def test_on_connect_completes_before_first_dispatch() -> None:
    impl = SvcImpl()

    async def on_connect(conn: xrpc.Connection) -> None:
        ready = anyio.Event()

        async def later() -> None:
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            ready.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(later)
            await ready.wait()
        impl.connected = True

    server, _ = make_server(impl, on_connect=on_connect)
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            assert await conn.proxy(Svc).on_connect_done() is True


async def test_calls_sent_during_on_connect_wait_for_it(transport: str) -> None:
    """A call the client sends while on_connect is still running is dispatched only after it."""
    impl = SvcImpl()
    early: list[bool] = []
    early_sent = anyio.Event()
    early_done = anyio.Event()

    async with anyio.create_task_group() as tg:

        class EarlyGreeter:
            async def greet(self, who: str) -> str:
                client_conn = xrpc.current_connection()

                async def early_call() -> None:
                    early_sent.set()
                    early.append(await client_conn.proxy(Svc).on_connect_done())
                    early_done.set()

                tg.start_soon(early_call)
                await early_sent.wait()
                return f"hello {who}"

        async def on_connect(conn: xrpc.Connection) -> None:
            impl.greeting_text = await conn.proxy(Greeter).greet("server")
            for _ in range(20):  # leave time for the early call to arrive
                await anyio.lowlevel.checkpoint()
            impl.connected = True

        server, _ = make_server(impl, on_connect=on_connect)
        with anyio.fail_after(T):
            async with serve_and_connect(server, transport, exports=[(Greeter, EarlyGreeter())]) as conn:
                await early_done.wait()
                assert early == [True]
                assert await conn.proxy(Svc).greeting() == "hello server"


async def test_on_connect_calls_client_exports(transport: str) -> None:
    impl = SvcImpl()
    greeter = GreeterImpl()

    async def on_connect(conn: xrpc.Connection) -> None:
        impl.greeting_text = await conn.proxy(Greeter).greet("server")

    server, _ = make_server(impl, on_connect=on_connect)
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport, exports=[(Greeter, greeter)]) as conn:
            assert await conn.proxy(Svc).greeting() == "hello server"
    assert greeter.greeted == ["server"]


async def test_client_exports_with_explicit_name() -> None:
    greeter = GreeterImpl()
    impl = SvcImpl()

    async def on_connect(conn: xrpc.Connection) -> None:
        impl.greeting_text = await conn.proxy(Greeter, name="g2").greet("named")

    server, _ = make_server(impl, on_connect=on_connect)
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server, exports=[(Greeter, greeter, "g2")]) as conn:
            assert await conn.proxy(Svc).greeting() == "hello named"


@pytest.mark.parametrize("style", ["sync", "async"])
async def test_on_connect_false_rejects(transport: str, style: str) -> None:
    seen: list[xrpc.Connection] = []

    def sync_reject(conn: xrpc.Connection) -> bool:
        seen.append(conn)
        return False

    async def async_reject(conn: xrpc.Connection) -> bool:
        seen.append(conn)
        await anyio.lowlevel.checkpoint()
        return False

    server, impl = make_server(on_connect=sync_reject if style == "sync" else async_reject)
    with anyio.fail_after(T):
        async with server.listen(transport) as listener:
            with pytest.raises(xrpc.PeerRejected):
                async with xrpc.connect(listener.url) as conn:
                    await conn.proxy(Svc).add(1, 2)
    assert len(seen) == 1
    assert impl.calls.get("add", 0) == 0


async def test_on_connect_per_connection_exports() -> None:
    counter = itertools.count(1)

    def on_connect(conn: xrpc.Connection) -> None:
        conn.export(Session, SessionImpl(next(counter)), name="session")

    server, _ = make_server(on_connect=on_connect)
    with anyio.fail_after(T):
        async with server.listen(f"memory://per-conn-{os.getpid()}") as listener:
            async with xrpc.connect(listener.url) as c1, xrpc.connect(listener.url) as c2:
                s1 = c1.proxy(Session, name="session")
                s2 = c2.proxy(Session, name="session")
                a, b = await s1.ident(), await s2.ident()
                assert {a, b} == {1, 2}
                assert await s1.ident() == a
                assert await s2.ident() == b


async def test_bidirectional_callback_during_a_call(transport: str) -> None:
    server, _ = make_server()
    cb = CallbackImpl()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport, exports=[(Callback, cb)]) as conn:
            assert await conn.proxy(Svc).relay(20) == 41
            assert await conn.proxy(Svc).relay(1) == 3
    assert cb.got == [20, 1]


# --------------------------------------------------------------------------- peer goes away
async def failure_of_a_blocked_call(p: Any, impl: Any, cut: Any) -> BaseException:
    """Call ``p.block()`` in a task and, once the server runs it, ``await cut()``: what the call
    raised (it must raise)."""
    outcome: list[BaseException] = []
    done = anyio.Event()

    async def call() -> None:
        try:
            await p.block()
        except Exception as exc:
            outcome.append(exc)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await impl.started.wait()
        await cut()
        await done.wait()
    assert len(outcome) == 1, outcome
    return outcome[0]


@pytest.mark.parametrize("how", ["server_conn_aclose", "listener_exits"])
async def test_peer_vanishes_fails_outstanding_call(transport: str, how: str) -> None:
    server, impl = make_server()
    events: list[str] = []
    stop_listener = anyio.Event()

    async def run_listener(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with server.listen(transport) as listener:
            task_status.started(listener.url)
            await stop_listener.wait()

    with anyio.fail_after(T):
        async with anyio.create_task_group() as outer:
            url = await outer.start(run_listener)
            async with xrpc.connect(
                url,
                on_interrupted=lambda: events.append("interrupted"),
                on_invalidated=lambda: events.append("invalidated"),
            ) as conn:
                p = conn.proxy(Svc)

                async def cut() -> None:
                    if how == "server_conn_aclose":
                        (sc,) = server.connections
                        await sc.aclose()
                    else:
                        stop_listener.set()  # the listener block exits: its connections are torn down

                failure = await failure_of_a_blocked_call(p, impl, cut)
                assert isinstance(failure, xrpc.ConnectionInterrupted), repr(failure)
                assert failure.can_retry
                await impl.finally_ran.wait()  # the server-side method was cancelled too
                assert impl.cancelled
                with pytest.raises(xrpc.ConnectionInvalidated):
                    await p.add(1, 2)
                assert events.count("interrupted") == 1
            stop_listener.set()
    assert events.count("interrupted") == 1
    assert events.count("invalidated") == 1


async def test_client_aclose_fails_outstanding_call_and_later_calls(transport: str) -> None:
    server, impl = make_server()
    events: list[str] = []
    with anyio.fail_after(T):
        async with serve_and_connect(
            server,
            transport,
            on_interrupted=lambda: events.append("interrupted"),
            on_invalidated=lambda: events.append("invalidated"),
        ) as conn:
            p = conn.proxy(Svc)
            failure = await failure_of_a_blocked_call(p, impl, conn.aclose)
            assert isinstance(failure, xrpc.ConnectionInvalidated), repr(failure)
            assert not isinstance(failure, xrpc.ConnectionInterrupted)
            await conn.aclose()  # twice is fine
            with pytest.raises(xrpc.ConnectionInvalidated):
                await p.add(1, 2)
            with pytest.raises(xrpc.ConnectionInvalidated):
                await conn.proxy(Svc).notify("late")
            await impl.finally_ran.wait()  # the server noticed and cancelled the method
    assert events == ["invalidated"]


# --------------------------------------------------------------------------- cancellation, timeouts, ordering
async def test_cancelling_the_caller_cancels_the_remote_method(transport: str) -> None:
    server, impl = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            p = conn.proxy(Svc)
            async with anyio.create_task_group() as tg:
                tg.start_soon(p.block)
                await impl.started.wait()
                tg.cancel_scope.cancel()
            await impl.finally_ran.wait()
            assert impl.cancelled
            assert await p.add(1, 2) == 3  # the connection is fine


async def test_proxy_timeout_raises_and_cancels_remote(transport: str) -> None:
    server, impl = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            p = conn.proxy(Svc, timeout=0.2)
            t0 = anyio.current_time()
            with pytest.raises(TimeoutError):
                await p.block()
            assert anyio.current_time() - t0 < 5.0
            await impl.finally_ran.wait()
            assert impl.cancelled
            assert await p.add(1, 2) == 3


async def test_deadline_travels_on_the_wire(transport: str) -> None:
    """The callee runs under the caller's deadline: the remote method sees it as its effective deadline."""
    server, _ = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            left = await conn.proxy(Svc, timeout=1.0).deadline_left()
            assert 0.0 < left <= 1.0
            # without a timeout there is no such deadline (only, at most, this test's own fail_after)
            assert await conn.proxy(Svc).deadline_left() > 2.0


async def test_calls_start_in_send_order(transport: str) -> None:
    server, impl = make_server()
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            # promises send their CALL frame at once, so the send order is exactly 0..99
            pending = [xrpc.pipeline(conn.proxy(Svc)).record(i) for i in range(100)]
            for promise in pending:
                await promise
    assert impl.order == list(range(100))


@xrpc.interface
class Starts(Protocol):
    async def enter(self, i: int, wait: bool) -> int: ...


class StartsImpl:
    """Records the order calls start in, and whether a context variable set by an earlier call
    is visible to a later one (it must not be: each call runs in a context of its own)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.started: list[int] = []
        self.leaked: list[int] = []
        self.all_started = anyio.Event()
        self.var: contextvars.ContextVar[int | None] = contextvars.ContextVar("starts", default=None)

    async def enter(self, i: int, wait: bool) -> int:
        self.started.append(i)
        if self.var.get() is not None:
            self.leaked.append(i)
        self.var.set(i)
        if len(self.started) == self.n:
            self.all_started.set()
        if wait:
            await self.all_started.wait()  # held until every later call has started
        return i


async def test_calls_that_suspend_and_calls_that_do_not_start_in_send_order_each_in_its_own_context(transport: str) -> None:
    n = 120
    impl = StartsImpl(n)
    server = xrpc.Server()
    server.export(Starts, impl)
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            # every third call waits until all the others have started: none may hold them up
            pending = [xrpc.pipeline(conn.proxy(Starts)).enter(i, i % 3 == 0) for i in range(n)]
            assert [await promise for promise in pending] == list(range(n))
    assert impl.started == list(range(n))
    assert impl.leaked == []


async def test_slow_call_does_not_hold_up_fast_call(transport: str) -> None:
    server, impl = make_server()
    results: list[str] = []
    with anyio.fail_after(T):
        async with serve_and_connect(server, transport) as conn:
            p = conn.proxy(Svc)

            async def slow() -> None:
                results.append(await p.slow())

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await impl.slow_started.wait()
                assert await p.fast() == "fast"
                assert results == []
                impl.release_slow.set()
    assert results == ["slow"]


# --------------------------------------------------------------------------- testing helper
async def test_testing_connect_in_memory() -> None:
    server, _ = make_server()
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server) as conn:
            assert conn.peer.transport == "memory"
            assert await conn.proxy(Svc).add(40, 2) == 42
            assert len(server.connections) == 1
