"""Objects passed by reference inside typed records.

Covers: references in the fields of msgspec Structs, dataclasses, TypedDicts and NamedTuples, in
tagged unions of Structs, in recursive types (an expression tree whose calls hold functions) and in
nested collections, in both directions (arguments, replies, stream items); the same lifetimes as
references at the top level (release by garbage collection, ``aclose()`` and disconnection); a
reference coming home inside a record as the original object; nothing left exported when a
record's second reference is refused (on either side); the plain part of a record encoding as the
record itself would; the errors naming the place where a reference cannot travel; and codegen.

Waiting rule: conditions on the peer's tables are awaited with ``until`` (a round-trip call between
checks, within a deadline), never by sleeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple, Optional, Protocol, Union

import anyio
import msgspec
import pytest
from typing_extensions import Annotated, NotRequired, TypedDict

import xrpc

from _hostile import behave, forge_references
from xrpc._interface import RecordPlan, RefPlan, SeqPlan, UnionPlan, plan_of
from xrpc._protocol import Ref
from _procs import short_dir
from _timeouts import T

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- types
@xrpc.interface
class Listener(Protocol):
    async def on(self, n: int) -> int: ...


@xrpc.interface
class Value(Protocol):
    async def read(self) -> float: ...


@xrpc.interface
class Function(Protocol):
    async def call(self, params: list[float]) -> float: ...


class Job(msgspec.Struct):
    id: int
    progress: Listener
    note: str = ""


@dataclasses.dataclass
class Task:
    name: str
    listener: Optional[Listener] = None
    helpers: list[Listener] = dataclasses.field(default_factory=list)


class Order(TypedDict):
    qty: int
    notify: Listener
    backup: NotRequired[Listener]


class Pair(NamedTuple):
    first: Listener
    weight: float


class Pairing(msgspec.Struct):
    a: Listener
    b: Listener


# Cap'n Proto's calculator expression, as records: capabilities sit inside a recursive tagged union.
class Literal(msgspec.Struct, tag="literal"):
    value: float


class PreviousResult(msgspec.Struct, tag="previous"):
    value: Value


class Call(msgspec.Struct, tag="call"):
    function: Function
    params: list[Expression]


Expression = Union[Literal, PreviousResult, Call]


class Tree(msgspec.Struct):
    children: list[Tree]
    label: str


class Wide(msgspec.Struct, tag="wide", array_like=True, rename="camel", omit_defaults=True):
    first_item: int
    the_listener: Listener
    later: Optional[int] = None


@xrpc.interface
class Board(Protocol):
    async def submit(self, job: Job) -> int: ...

    async def run_task(self, task: Task) -> int: ...

    async def place(self, order: Order) -> int: ...

    async def weigh(self, pair: Pair) -> float: ...

    async def evaluate(self, expression: Expression) -> float: ...

    async def groups(self, groups: dict[str, list[Optional[Job]]]) -> int: ...

    async def make(self, n: int) -> Job: ...

    async def make_task(self, n: int) -> Task: ...

    async def make_order(self, n: int) -> Order: ...

    async def make_expression(self, n: float) -> Expression: ...

    def jobs(self, count: int) -> AsyncIterator[Job]: ...

    async def collect(self, jobs: AsyncIterator[Job]) -> int: ...

    def watch(self, job: Job, times: int) -> AsyncIterator[int]: ...

    async def keep(self, job: Job) -> None: ...

    async def kept(self) -> Job: ...

    async def is_kept(self, job: Job) -> bool: ...

    async def take(self, pairing: Pairing) -> int: ...

    async def bad_pairing(self) -> Pairing: ...

    async def wide(self, w: Wide) -> Wide: ...

    async def ping(self) -> int: ...


class ListenerImpl:
    def __init__(self, factor: int = 1) -> None:
        self.factor = factor
        self.seen: list[int] = []

    async def on(self, n: int) -> int:
        self.seen.append(n)
        return n * self.factor


class ValueImpl:
    def __init__(self, v: float) -> None:
        self.v = v

    async def read(self) -> float:
        return self.v


class FunctionImpl:
    def __init__(self, fn: Callable[[list[float]], float]) -> None:
        self.fn = fn

    async def call(self, params: list[float]) -> float:
        return self.fn(params)


class NotAListener:
    async def off(self) -> None: ...


class BoardImpl:
    def __init__(self) -> None:
        self.held: Job | None = None
        self.received: list[Any] = []
        self.pings = 0

    async def submit(self, job: Job) -> int:
        assert isinstance(job, Job) and not isinstance(job.progress, ListenerImpl)
        self.received.append(job)
        return await job.progress.on(job.id)

    async def run_task(self, task: Task) -> int:
        assert isinstance(task, Task)
        total = 0
        if task.listener is not None:
            total += await task.listener.on(len(task.name))
        for h in task.helpers:
            total += await h.on(1)
        return total

    async def place(self, order: Order) -> int:
        assert type(order) is dict
        n = await order["notify"].on(order["qty"])
        if "backup" in order:
            n += await order["backup"].on(100)
        return n

    async def weigh(self, pair: Pair) -> float:
        assert isinstance(pair, Pair)
        return await pair.first.on(2) * pair.weight

    async def evaluate(self, expression: Expression) -> float:
        if isinstance(expression, Literal):
            return expression.value
        if isinstance(expression, PreviousResult):
            return await expression.value.read()
        params = [await self.evaluate(p) for p in expression.params]
        return await expression.function.call(params)

    async def groups(self, groups: dict[str, list[Optional[Job]]]) -> int:
        total = 0
        for jobs in groups.values():
            for job in jobs:
                if job is not None:
                    total += await job.progress.on(job.id)
        return total

    async def make(self, n: int) -> Job:
        return Job(n, ListenerImpl(factor=n), note="made")

    async def make_task(self, n: int) -> Task:
        return Task("t", ListenerImpl(n), [ListenerImpl(i) for i in range(n)])

    async def make_order(self, n: int) -> Order:
        return {"qty": n, "notify": ListenerImpl(2)}

    async def make_expression(self, n: float) -> Expression:
        return Call(FunctionImpl(sum), [Literal(n), PreviousResult(ValueImpl(n * 2))])

    async def jobs(self, count: int) -> AsyncIterator[Job]:
        for i in range(count):
            yield Job(i, ListenerImpl(factor=10))

    async def collect(self, jobs: AsyncIterator[Job]) -> int:
        return sum([await j.progress.on(j.id) async for j in jobs])

    async def watch(self, job: Job, times: int) -> AsyncIterator[int]:
        for i in range(times):
            yield await job.progress.on(i)

    async def keep(self, job: Job) -> None:
        self.held = job

    async def kept(self) -> Job:
        assert self.held is not None
        return self.held

    async def is_kept(self, job: Job) -> bool:
        return self.held is not None and job.progress is self.held.progress

    async def take(self, pairing: Pairing) -> int:
        return await pairing.a.on(1) + await pairing.b.on(1)

    async def bad_pairing(self) -> Pairing:
        return Pairing(ListenerImpl(), NotAListener())  # type: ignore[arg-type]

    async def wide(self, w: Wide) -> Wide:
        return Wide(w.first_item + 1, w.the_listener)

    async def ping(self) -> int:
        self.pings += 1
        return self.pings


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def url(transport: str) -> str:
    """A URL to listen on: memory, unix and tcp (conftest's ``transport``)."""
    return transport


@contextlib.asynccontextmanager
async def served(url: str, impl: BoardImpl | None = None, **limits: Any) -> AsyncIterator[tuple[Any, xrpc.Connection, xrpc.Connection, BoardImpl]]:
    """A Board served on ``url``: (proxy, client connection, server-side connection, implementation)."""
    impl = impl or BoardImpl()
    server = xrpc.Server(limits=xrpc.Limits(**limits)) if limits else xrpc.Server()
    server.export(Board, impl)
    async with server.listen(url) as listener, xrpc.connect(listener.url) as conn:
        (server_conn,) = server.connections
        yield conn.proxy(Board), conn, server_conn, impl


async def until(predicate: Callable[[], bool], roundtrip: Callable[[], Awaitable[Any]], timeout: float = T) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await roundtrip()


def collect() -> None:
    gc.collect()
    gc.collect()


# --------------------------------------------------------------------------- plans
def test_plans_of_records() -> None:
    job = plan_of(Job)
    assert isinstance(job, RecordPlan) and job.fields == (None, RefPlan(Listener), None)
    assert plan_of(list[Job]) == SeqPlan(job, list)
    call = plan_of(Call)
    assert isinstance(call, RecordPlan)
    params = call.fields[1]
    assert isinstance(params, SeqPlan) and isinstance(params.item, UnionPlan)
    assert params.item.members[2] is call  # the recursive type is one cycle of plans
    # walk() visits each record once, however often the type refers to itself
    assert [type(p).__name__ for p in call.walk()] == ["RecordPlan", "RefPlan", "SeqPlan", "UnionPlan", "RecordPlan", "RefPlan"]
    # records without references keep no plan: they stay on the plain path
    assert plan_of(Literal) is None and plan_of(list[Literal]) is None
    assert plan_of(Tree) is None
    m = xrpc.describe(Board).methods
    assert all(p.slot is not None and p.slot.plan is not None for p in m["evaluate"].params)


class RecordingContext:
    """A wire context without a connection: objects go out as numbered references."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}

    def ref_out(self, desc: Any, value: Any) -> Ref:
        oid = f"o{len(self.objects)}"
        self.objects[oid] = value
        return Ref(False, oid, desc.name)

    def ref_in(self, desc: Any, token: Ref) -> Any:
        return self.objects[token.oid]

    def fd_out(self, fd: int) -> int:
        raise AssertionError

    def fd_in(self, seq: int) -> int:
        raise AssertionError


def test_the_plain_part_of_a_record_encodes_as_the_record_itself() -> None:
    ctx = RecordingContext()
    listener = ListenerImpl()
    plan = plan_of(Wide)
    assert plan is not None
    wire = msgspec.msgpack.encode(plan.to_wire(ctx, Wide(3, listener)))
    ref = [False, "o0", "Listener"]
    # the tag first, array-like
    assert msgspec.msgpack.decode(wire) == ["wide", 3, ref, None]

    class Twin(msgspec.Struct, tag="wide", array_like=True, rename="camel", omit_defaults=True):
        first_item: int
        the_listener: Any
        later: Optional[int] = None

    assert wire == msgspec.msgpack.encode(Twin(3, Ref(False, "o0", "Listener")))
    back = plan.from_wire(ctx, msgspec.msgpack.decode(wire, type=plan.wire_type))
    assert back == Wide(3, listener) and back.the_listener is listener
    # a map-shaped record keeps the encoded names
    job_plan = plan_of(Job)
    assert job_plan is not None
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(job_plan.to_wire(ctx, Job(1, listener)))) == {
        "id": 1,
        "progress": [False, "o1", "Listener"],
        "note": "",
    }
    # the sender refuses a value that is not the record
    with pytest.raises(ValueError, match="expected Job, got int"):
        job_plan.to_wire(ctx, 5)


class KwOnly(msgspec.Struct, kw_only=True):
    a: int = 0
    listener: Listener


@dataclasses.dataclass(kw_only=True)
class KwOnlyData:
    a: int = 0
    listener: Listener


class Base(msgspec.Struct):
    listener: Listener


class Derived(Base):
    extra: int = 0


class Checked(msgspec.Struct):
    listener: Listener
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must not be negative")


@pytest.mark.parametrize(
    ("tp", "value"),
    [
        (KwOnly, KwOnly(a=3, listener=ListenerImpl())),
        (KwOnlyData, KwOnlyData(a=3, listener=ListenerImpl())),
        (Base, Derived(ListenerImpl(), 4)),
        (Checked, Checked(ListenerImpl(), 2)),
        (Task, Task("x", None, [ListenerImpl(), ListenerImpl()])),
        (Order, {"qty": 1, "notify": ListenerImpl()}),
        (Pair, Pair(ListenerImpl(), 0.5)),
    ],
)
def test_records_of_every_shape_are_rebuilt(tp: Any, value: Any) -> None:
    ctx = RecordingContext()
    plan = plan_of(tp)
    assert isinstance(plan, RecordPlan)
    payload = msgspec.msgpack.encode(plan.to_wire(ctx, value))
    back = plan.from_wire(ctx, msgspec.msgpack.decode(payload, type=plan.wire_type))
    expected = Base(value.listener) if type(value) is Derived else value
    assert type(back) is type(expected) and back == expected


def test_a_record_the_receiver_refuses_to_build_is_a_validation_error() -> None:
    ctx = RecordingContext()
    plan = plan_of(Checked)
    assert plan is not None
    payload = msgspec.msgpack.encode({"listener": plan.to_wire(ctx, Checked(ListenerImpl(), 1)).listener, "n": -1})
    with pytest.raises(xrpc.ValidationError, match="Checked refused: n must not be negative"):
        plan.from_wire(ctx, msgspec.msgpack.decode(payload, type=plan.wire_type))


# --------------------------------------------------------------------------- both directions
async def test_references_inside_records_travel_both_ways(url: str) -> None:
    with anyio.fail_after(T):
        async with served(url) as (board, conn, server_conn, impl):
            mine = ListenerImpl(factor=3)
            # arguments: a Struct, a dataclass, a TypedDict, a NamedTuple
            assert await board.submit(Job(5, mine)) == 15
            assert await board.run_task(Task("abc", mine, [ListenerImpl(7), ListenerImpl(8)])) == 9 + 7 + 8
            assert await board.run_task(Task("x")) == 0
            assert await board.place({"qty": 4, "notify": mine}) == 12
            assert await board.place({"qty": 4, "notify": mine, "backup": ListenerImpl(1)}) == 112
            assert await board.weigh(Pair(mine, 0.5)) == 3.0
            assert mine.seen == [5, 3, 4, 4, 2]
            # nested collections of optional records
            groups = {"a": [Job(1, mine), None], "b": [Job(2, ListenerImpl(100))], "c": []}
            assert await board.groups(groups) == 3 + 200
            # replies
            job = await board.make(4)
            assert isinstance(job, Job) and job.id == 4 and job.note == "made"
            assert await job.progress.on(2) == 8
            task = await board.make_task(3)
            assert isinstance(task, Task) and task.listener is not None
            assert [await h.on(5) for h in task.helpers] == [0, 5, 10]
            order = await board.make_order(6)
            assert set(order) == {"qty", "notify"} and await order["notify"].on(order["qty"]) == 12
            # stream items, both ways, and a record argument of a stream call
            seen = [await j.progress.on(j.id) async for j in board.jobs(3)]
            assert seen == [0, 10, 20]

            async def feed() -> AsyncIterator[Job]:
                for i in range(3):
                    yield Job(i, ListenerImpl(factor=i))

            assert await board.collect(feed()) == 0 + 1 + 4
            assert [n async for n in board.watch(Job(0, ListenerImpl(factor=5)), 3)] == [0, 5, 10]
            # an array-like, tagged, renamed record and back
            w = await board.wide(Wide(1, mine))
            assert w.first_item == 2 and w.the_listener is mine  # our own object, home again


async def test_an_expression_tree_with_capabilities_inside(url: str) -> None:
    """Cap'n Proto's calculator shape: functions and previous results held inside the records of a
    recursive tagged union, evaluated on the server, the client's function called back."""
    with anyio.fail_after(T):
        async with served(url) as (board, conn, server_conn, impl):
            calls: list[list[float]] = []

            def product(ps: list[float]) -> float:
                calls.append(ps)
                out = 1.0
                for p in ps:
                    out *= p
                return out

            times = FunctionImpl(product)
            plus = FunctionImpl(sum)
            # (2 * (3 + prev)) with prev a value on this side
            tree = Call(times, [Literal(2), Call(plus, [Literal(3), PreviousResult(ValueImpl(4))])])
            assert await board.evaluate(tree) == 14.0
            assert calls == [[2.0, 7.0]]
            assert await board.evaluate(Literal(1.5)) == 1.5
            # the server's own expression, with its function and value, comes back as records of proxies
            expr = await board.make_expression(5)
            assert isinstance(expr, Call) and isinstance(expr.params[1], PreviousResult)
            assert await expr.params[1].value.read() == 10.0
            assert await expr.function.call([1, 2]) == 3.0
            # and evaluated there again: its capabilities go home as the server's own objects
            assert await board.evaluate(expr) == 15.0
            await board.ping()
            assert conn.exported_objects == 0  # every reference sent for the calls was released
            del expr
            collect()
            await until(lambda: server_conn.exported_objects == 0, board.ping)


async def test_a_reference_inside_a_record_comes_home_as_the_original_object(url: str) -> None:
    with anyio.fail_after(T):
        async with served(url) as (board, conn, server_conn, impl):
            mine = ListenerImpl()
            await board.keep(Job(1, mine))
            back = await board.kept()
            assert back.progress is mine
            # the server's object goes home too
            job = await board.make(2)
            await board.keep(job)
            assert await board.is_kept(job)
            assert impl.held is not None and isinstance(impl.held.progress, ListenerImpl)


# --------------------------------------------------------------------------- lifetimes
async def test_release_of_references_found_inside_records(url: str) -> None:
    with anyio.fail_after(T):
        async with served(url) as (board, conn, server_conn, impl):
            # garbage collection
            jobs = [await board.make(i) for i in range(3)]
            task = await board.make_task(2)
            assert server_conn.exported_objects == 3 + 3 and conn.remote_refs == 6
            del jobs[:2]
            collect()
            await until(lambda: server_conn.exported_objects == 4, board.ping)
            del task
            collect()
            await until(lambda: server_conn.exported_objects == 1, board.ping)
            # aclose()
            await jobs[0].progress.aclose()
            assert conn.remote_refs == 0
            await until(lambda: server_conn.exported_objects == 0, board.ping)
            with pytest.raises(xrpc.ObjectNotFound):
                await jobs[0].progress.on(1)
            # the server releases what arrived inside records once it drops them
            await board.submit(Job(1, ListenerImpl()))
            assert conn.exported_objects == 1 and server_conn.remote_refs == 1
            impl.received.clear()
            collect()
            await until(lambda: conn.exported_objects == 0, board.ping)
            # stream items
            async for j in board.jobs(2):
                assert await j.progress.on(1) == 10
            del j
            collect()
            await until(lambda: server_conn.exported_objects == 0, board.ping)


async def test_references_inside_records_are_released_on_disconnect(url: str) -> None:
    impl = BoardImpl()
    server = xrpc.Server()
    server.export(Board, impl)
    with anyio.fail_after(T):
        async with server.listen(url) as listener:
            async with xrpc.connect(listener.url) as conn:
                (server_conn,) = server.connections
                board = conn.proxy(Board)
                job = await board.make(1)
                await board.keep(Job(2, ListenerImpl()))
                assert server_conn.exported_objects == 1 and server_conn.remote_refs == 1
                assert conn.exported_objects == 1 and conn.remote_refs == 1
            assert conn.exported_objects == 0
            async with xrpc.connect(listener.url) as watcher:  # the server notices on its own
                await until(lambda: server_conn.closed, watcher.proxy(Board).ping)
            assert server_conn.exported_objects == 0
            with pytest.raises(xrpc.ConnectionInvalidated):
                await job.progress.on(1)
            assert impl.held is not None
            with pytest.raises(xrpc.ConnectionInvalidated):
                await impl.held.progress.on(1)


async def test_a_record_whose_second_reference_is_refused_exports_nothing(url: str) -> None:
    with anyio.fail_after(T):
        async with served(url) as (board, conn, server_conn, impl):
            with pytest.raises(xrpc.ValidationError, match=r"argument 'pairing'.*Pairing\.b.*NotAListener does not implement Listener"):
                await board.take(Pairing(ListenerImpl(), NotAListener()))  # type: ignore[arg-type]
            assert conn.exported_objects == 0  # the first reference was taken back
            # the same on the replying side
            with pytest.raises(xrpc.Error, match="Pairing.b"):
                await board.bad_pairing()
            assert server_conn.exported_objects == 0
            assert await board.take(Pairing(ListenerImpl(), ListenerImpl())) == 2


async def test_a_record_reference_counts_against_max_objects(url: str) -> None:
    with anyio.fail_after(T):
        async with served(url, max_objects=2) as (board, conn, server_conn, impl):
            with pytest.raises(xrpc.Error, match="more than 2 objects"):
                await board.make_task(2)  # three references in one record
            assert server_conn.exported_objects == 0
            job = await board.make(1)
            assert await job.progress.on(1) == 1


async def test_a_forged_reference_inside_a_record_is_refused(url: str) -> None:
    """A reference naming the wrong interface, or claiming to come home, is refused inside a record
    as at the top level (the client is made hostile by replacing how it writes references)."""
    with anyio.fail_after(T):
        async with served(url) as (board, conn, server_conn, impl):
            for forged, message in ((Ref(False, "#1", "Value"), "a Value arrived where a Listener is declared"), (Ref(True, "#77", "Listener"), "did not pass to this peer")):
                forge_references(conn, lambda desc, value, forged=forged: forged)
                with pytest.raises(xrpc.ValidationError, match="argument 'job'") as info:
                    await board.submit(Job(1, ListenerImpl()))
                assert message in str(info.value)
                with pytest.raises(xrpc.ValidationError, match="argument 'groups'"):
                    await board.groups({"a": [None, Job(1, ListenerImpl())]})
            behave(conn)
            assert impl.received == []  # the method never ran
            assert await board.submit(Job(2, ListenerImpl())) == 2


class Upload(msgspec.Struct):
    name: str
    sink: xrpc.FileDescriptor
    log: Optional[Listener] = None


@xrpc.interface
class Uploads(Protocol):
    async def upload(self, uploads: list[Upload]) -> int: ...

    async def opened(self) -> Upload: ...


class UploadsImpl:
    def __init__(self) -> None:
        self.kept: list[int] = []  # descriptors this side sent, closed by the test

    async def upload(self, uploads: list[Upload]) -> int:
        for u in uploads:
            with u.sink, u.sink.open("wb") as f:
                f.write(u.name.encode())
            if u.log is not None:
                await u.log.on(len(u.name))
        return len(uploads)

    async def opened(self) -> Upload:
        r, w = os.pipe()
        os.write(w, b"from the server")
        os.close(w)
        self.kept.append(r)
        return Upload("r", xrpc.FileDescriptor(r))


async def test_descriptors_inside_records_travel_over_unix() -> None:
    impl = UploadsImpl()
    server = xrpc.Server()
    server.export(Uploads, impl)
    d = short_dir()
    try:
        with anyio.fail_after(T):
            async with server.listen(f"unix://{d}/u.sock") as listener, xrpc.connect(listener.url) as conn:
                uploads = conn.proxy(Uploads)
                pipes = [os.pipe() for _ in range(2)]
                log = ListenerImpl()
                try:
                    n = await uploads.upload([Upload("one", xrpc.FileDescriptor(pipes[0][1]), log), Upload("two!", xrpc.FileDescriptor(pipes[1][1]))])
                    assert n == 2 and log.seen == [3]
                    for (r, w), text in zip(pipes, (b"one", b"two!")):
                        os.close(w)  # the server's duplicate is closed too: the pipe ends
                        with open(r, "rb") as f:
                            assert f.read() == text
                finally:
                    for r, w in pipes:
                        for fd in (r, w):
                            with contextlib.suppress(OSError):
                                os.close(fd)
                got = await uploads.opened()
                with got.sink, got.sink.open("rb") as f:
                    assert f.read() == b"from the server"
    finally:
        for fd in impl.kept:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)


def _deep(depth: int, function: Any) -> Expression:
    e: Expression = Literal(1.0)
    for _ in range(depth):
        e = Call(function, [e])
    return e


async def test_a_record_nested_too_deeply_is_refused_not_crashed(url: str) -> None:
    with anyio.fail_after(T):
        async with served(url) as (board, conn, server_conn, impl):
            f = FunctionImpl(sum)
            assert await board.evaluate(_deep(100, f)) == 1.0
            with pytest.raises(xrpc.ValidationError, match="argument 'expression'.*nested too deeply"):
                await board.evaluate(_deep(5000, f))
            assert conn.exported_objects == 0
            # a peer that sends such a tree (built here with a higher recursion limit) is refused
            # too: by the decoder, or deep enough for it and too deep to rebuild
            m = xrpc.describe(Board).methods["evaluate"]
            ctx = RecordingContext()
            for depth in (300, 5000):
                limit = sys.getrecursionlimit()
                sys.setrecursionlimit(100_000)
                try:
                    payload = msgspec.msgpack.encode(m.encode_args((_deep(depth, f),), {}, ctx))
                except RecursionError:
                    # Python 3.12+ bounds C recursion on its own, whatever the limit: this interpreter
                    # cannot build a tree this deep (a peer in another language can; 300 stands for it)
                    assert sys.version_info >= (3, 12)
                    continue
                finally:
                    sys.setrecursionlimit(limit)
                with pytest.raises(xrpc.ValidationError, match="argument.*(nested too deeply|recursion depth)"):
                    m.decode_args(payload, ctx)
            assert await board.ping() == 1


# --------------------------------------------------------------------------- where a reference cannot travel
class Holder(msgspec.Struct):
    listener: Listener


class KeyedHolder(msgspec.Struct):
    by_listener: dict[Listener, int]


class Either(msgspec.Struct):
    listener: Union[Listener, int]


class A(msgspec.Struct):
    listener: Listener


class B(msgspec.Struct):
    value: Value


class Opaque:
    """A class msgspec cannot rebuild."""

    listener: Listener


def test_a_struct_field_typed_with_an_interface_just_works() -> None:
    @xrpc.interface
    class UsesHolder(Protocol):
        async def put(self, holder: Holder) -> list[Holder]: ...

    m = xrpc.describe(UsesHolder).methods["put"]
    assert m.ref_args and m.reply_refs


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ("list[KeyedHolder]", r"parameter 'x': list\[KeyedHolder\]\[\*\]\.by_listener: a mapping key cannot hold a reference"),
        ("Optional[Either]", r"Optional\[Either\]\.listener: a union may hold a reference only as Optional\[\.\.\.\] or inside the records"),
        ("dict[str, list[type[Listener]]]", r"dict\[str, list\[type\[Listener\]\]\]\[\*\]\[\*\]: a reference cannot travel inside type"),
        ("Union[A, B]", r"Union\[A, B\]<A>: records holding references share a union only as tagged msgspec Structs"),
        ("Opaque", r"type Opaque cannot travel \(use a msgspec Struct"),
    ],
)
def test_where_a_reference_cannot_travel_the_error_names_the_place(annotation: str, message: str) -> None:
    ns: dict[str, Any] = dict(globals())
    exec(  # noqa: S102 - the test's own source text, to declare an interface per case
        textwrap.dedent(
            f"""
            class Bad(Protocol):
                async def put(self, x: {annotation}) -> None: ...
            """
        ),
        ns,
    )
    with pytest.raises(xrpc.InterfaceError, match=message):
        xrpc.interface(ns["Bad"])
        xrpc.describe(ns["Bad"])


def test_allow_cannot_widen_to_a_record_holding_references() -> None:
    with pytest.raises(xrpc.InterfaceError, match="parameter 'h'.*cannot widen a slot to Holder, which holds objects by reference"):

        @xrpc.interface
        class Widened(Protocol):
            async def put(self, h: Annotated[object, xrpc.allow(Holder)]) -> None: ...


# --------------------------------------------------------------------------- codegen
CODEGEN_MODULE = '''
from __future__ import annotations
from typing import Optional, Protocol
import msgspec
import xrpc


@xrpc.interface
class Listener(Protocol):
    async def on(self, n: int) -> int: ...


class Job(msgspec.Struct):
    id: int
    progress: {progress}


@xrpc.interface
class Jobs(Protocol):
    async def submit(self, job: Job) -> Optional[Job]: ...
'''


def test_codegen_describes_references_inside_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import codegen

    (tmp_path / "records_jobs_v1.py").write_text(CODEGEN_MODULE.format(progress="Listener"))
    (tmp_path / "records_jobs_v2.py").write_text(CODEGEN_MODULE.format(progress="int"))
    monkeypatch.syspath_prepend(str(tmp_path))
    v1 = json.loads(json.dumps(codegen.build_schema(codegen.load_targets("records_jobs_v1:Jobs"))))
    v2 = json.loads(json.dumps(codegen.build_schema(codegen.load_targets("records_jobs_v2:Jobs"))))
    # the schema shows the field as a reference to the interface, and describes that interface
    assert v1["$defs"]["Job"]["properties"]["progress"] == {"x-xrpc-interface": "Listener"}
    assert sorted(i["name"] for i in v1["interfaces"]) == ["Jobs", "Listener"]
    assert v1["interfaces"][0]["fingerprint"] != v2["interfaces"][0]["fingerprint"]
    # the stubs declare it
    text = codegen.render_stubs(v1)
    assert "progress: Listener" in text and "class Listener(" in text
    compile(text, "stubs.py", "exec")
    # a field changing between by reference and by value is a breaking change, both ways
    for old, new in ((v1, v2), (v2, v1)):
        changes = codegen.compare(old, new)
        assert codegen.has_breaking(changes), changes
        assert any("progress" in str(c) for c in changes if not c.ok("backward"))
    assert not codegen.has_breaking(codegen.compare(v1, v1))
    # the stubs of a whole interface with records holding references declare a working interface
    board = json.loads(json.dumps(codegen.build_schema([Board])))
    (tmp_path / "records_board_stubs.py").write_text(codegen.render_stubs(board))
    (stub,) = [i for i in codegen.load_targets("records_board_stubs") if i.__name__ == "Board"]
    methods = xrpc.describe(stub).methods
    for name in ("submit", "run_task", "place", "weigh", "evaluate", "groups"):
        assert methods[name].ref_args, name
    for name in ("make", "make_task", "make_order", "make_expression", "jobs", "kept"):
        assert methods[name].reply_refs, name
