"""Interface validation at decoration time, ``xrpc.describe``, and a round-trip property test."""

import dataclasses
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Optional, Protocol, Union

import anyio
import anyio.from_thread
import anyio.to_thread
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xrpc
from xrpc._interface import (
    BufferPlan,
    DictPlan,
    FdPlan,
    InterfaceDescription,
    OptionalPlan,
    Plan,
    RefPlan,
    SeqPlan,
    TuplePlan,
    WireContext,
    plan_of,
)
from xrpc._protocol import Ref
from _timeouts import T

ROOT = Path(__file__).resolve().parent.parent


class Point(msgspec.Struct):
    x: float
    y: float


class Opaque:
    """A plain class msgspec cannot carry."""


class Oops(Exception):
    pass


@xrpc.interface(errors=(Oops,))
class Geometry(Protocol):
    async def distance(self, a: Point, b: Point, scale: float = 1.0) -> float: ...
    def walk(self, start: Point, steps: int) -> AsyncIterator[Point]: ...
    async def centroid(self, points: AsyncIterator[Point]) -> Point: ...
    def chat(self, lines: AsyncIterator[str]) -> AsyncIterator[str]: ...
    @xrpc.oneway
    async def log(self, text: str) -> None: ...


# --------------------------------------------------------------------------- InterfaceError at decoration time
def _declare(body: Callable[[], Any]) -> xrpc.InterfaceError:
    with pytest.raises(xrpc.InterfaceError) as ei:
        body()
    return ei.value


def test_interface_error_is_an_xrpc_error() -> None:
    assert issubclass(xrpc.InterfaceError, xrpc.Error)


# methods an interface may not declare, and what the refusal must name
async def _unannotated_parameter(self, widget) -> int: ...  # type: ignore[no-untyped-def]
async def _missing_return_annotation(self, widget: int): ...  # type: ignore[no-untyped-def]
def _sync_def_that_is_not_a_stream(self: Any, widget: int) -> int: ...
async def _async_def_returning_a_stream(self: Any, widget: int) -> AsyncIterator[int]: ...
async def _reply_type_the_codec_cannot_carry(self: Any, widget: int) -> Opaque: ...


@pytest.mark.parametrize(
    "method, named",
    [
        pytest.param(_unannotated_parameter, ["frobnicate", "widget"], id="unannotated-parameter"),
        pytest.param(_missing_return_annotation, ["frobnicate", "return"], id="missing-return-annotation"),
        pytest.param(_sync_def_that_is_not_a_stream, ["frobnicate"], id="sync-def-that-is-not-a-stream"),
        pytest.param(_async_def_returning_a_stream, ["frobnicate"], id="async-def-returning-a-stream"),
        pytest.param(_reply_type_the_codec_cannot_carry, ["frobnicate"], id="reply-type-the-codec-cannot-carry"),
    ],
)
def test_a_method_that_cannot_be_declared_is_refused(method: Any, named: list[str]) -> None:
    msg = str(_declare(lambda: xrpc.interface(type("Bad", (Protocol,), {"frobnicate": method}))))
    assert all(word in msg for word in named), msg


@pytest.mark.parametrize(
    "annotation",
    [
        pytest.param(Opaque, id="class"),
        pytest.param(lambda: 1, id="lambda"),
        pytest.param(dict[Opaque, int], id="dict-key"),
        pytest.param(list[Opaque], id="list-item"),
    ],
)
def test_type_the_codec_cannot_carry(annotation: Any) -> None:
    def body() -> None:
        async def frobnicate(self: Any, widget: int) -> int: ...

        frobnicate.__annotations__["widget"] = annotation
        ns = {"frobnicate": frobnicate}
        cls = type("Bad", (Protocol,), ns)
        xrpc.interface(cls)

    msg = str(_declare(body))
    assert "frobnicate" in msg and "widget" in msg


def test_two_stream_parameters() -> None:
    def body() -> None:
        @xrpc.interface
        class Bad(Protocol):
            async def frobnicate(self, left: AsyncIterator[int], right: AsyncIterator[int]) -> int: ...

    msg = str(_declare(body))
    assert "frobnicate" in msg and "left" in msg and "right" in msg


def test_oneway_with_a_return_type() -> None:
    def body() -> None:
        @xrpc.interface
        class Bad(Protocol):
            @xrpc.oneway
            async def frobnicate(self, widget: int) -> int: ...

    assert "frobnicate" in str(_declare(body))


@pytest.mark.parametrize("kind", ["args", "kwargs"])
def test_star_args(kind: str) -> None:
    def body() -> None:
        if kind == "args":

            @xrpc.interface
            class Bad(Protocol):
                async def frobnicate(self, *widgets: int) -> int: ...

        else:

            @xrpc.interface
            class Bad2(Protocol):
                async def frobnicate(self, **widgets: int) -> int: ...

    msg = str(_declare(body))
    assert "frobnicate" in msg and "widgets" in msg


def test_allow_takes_subclasses_of_the_base() -> None:
    from typing import Annotated

    class Base(msgspec.Struct):
        a: int

    class Other(msgspec.Struct):
        b: int

    def body() -> None:
        @xrpc.interface
        class Bad(Protocol):
            async def frobnicate(self, widget: Annotated[Base, xrpc.allow(Other)]) -> None: ...

    msg = str(_declare(body))
    assert "frobnicate" in msg and "widget" in msg


def test_struct_default_argument_is_accepted() -> None:
    @xrpc.interface
    class WithDefault(Protocol):
        async def frobnicate(self, origin: Point = Point(0.0, 0.0)) -> float: ...

    (p,) = xrpc.describe(WithDefault).methods["frobnicate"].params
    assert p.default == Point(0.0, 0.0)


def test_required_keyword_only_after_a_default_is_accepted() -> None:
    @xrpc.interface
    class KwOnly(Protocol):
        async def frobnicate(self, a: int = 0, *, widget: int) -> int: ...

    assert [p.name for p in xrpc.describe(KwOnly).methods["frobnicate"].params] == ["a", "widget"]


def test_describe_refuses_a_plain_class() -> None:
    class NotAnInterface(Protocol):
        async def m(self) -> None: ...

    with pytest.raises(xrpc.InterfaceError):
        xrpc.describe(NotAnInterface)


# --------------------------------------------------------------------------- describe
def test_interface_returns_the_class_unchanged() -> None:
    class Plain(Protocol):
        async def m(self, x: int) -> int: ...

    attrs = {k: v for k, v in vars(Plain).items() if not k.startswith("__")}
    assert xrpc.interface(Plain) is Plain
    assert xrpc.interface(errors=(Oops,), name="Other")(Plain) is Plain
    assert {k: v for k, v in vars(Plain).items() if not k.startswith("__")} == attrs
    assert getattr(Plain, "_is_protocol", False) is True


def test_describe_lists_methods_kinds_and_params() -> None:
    desc = xrpc.describe(Geometry)
    assert isinstance(desc, xrpc.InterfaceDescription)
    assert xrpc.describe(Geometry) is desc
    assert desc.name == "Geometry"
    assert set(desc.methods) == {"distance", "walk", "centroid", "chat", "log"}
    kinds = {name: m.kind for name, m in desc.methods.items()}
    assert kinds == {
        "distance": xrpc.MethodKind.UNARY,
        "walk": xrpc.MethodKind.SERVER_STREAM,
        "centroid": xrpc.MethodKind.CLIENT_STREAM,
        "chat": xrpc.MethodKind.BIDI_STREAM,
        "log": xrpc.MethodKind.ONEWAY,
    }
    assert [k.value for k in xrpc.MethodKind] == ["unary", "oneway", "server_stream", "client_stream", "bidi_stream"]

    def params(name: str) -> list[tuple[str, Any]]:
        return [(p.name, p.annotation) for p in desc.methods[name].params]

    assert params("distance") == [("a", Point), ("b", Point), ("scale", float)]
    assert params("walk") == [("start", Point), ("steps", int)]
    assert params("centroid") == [("points", AsyncIterator[Point])]
    assert params("chat") == [("lines", AsyncIterator[str])]
    assert params("log") == [("text", str)]
    dist = desc.methods["distance"]
    assert isinstance(dist, xrpc.MethodDescription)
    assert [p.has_default for p in dist.params] == [False, False, True]
    assert dist.params[2].default == 1.0
    assert [p.stream for p in desc.methods["centroid"].params] == [True]
    assert desc.errors == (Oops,)

    # the plain-data form, as the CLI and codegen read it
    d = desc.describe()
    assert d["name"] == "Geometry"
    assert d["fingerprint"] == desc.fingerprint
    by_name = {m["name"]: m for m in d["methods"]}
    assert by_name["walk"]["kind"] == "server_stream"
    assert [p["name"] for p in by_name["walk"]["params"]] == ["start", "steps"]
    assert by_name["log"]["kind"] == "oneway"


def _geometry_variant(distance_returns: str) -> Any:
    """The Geometry interface declared afresh (new class, new function objects with their own annotations),
    with ``distance`` returning ``distance_returns``."""
    body: dict[str, Any] = {}
    for name in ("distance", "walk", "centroid", "chat", "log"):
        fn = vars(Geometry)[name]
        again = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        again.__dict__.update(fn.__dict__)  # keeps the @xrpc.oneway mark
        again.__annotations__ = dict(fn.__annotations__)
        body[name] = again
    body["distance"].__annotations__["return"] = distance_returns
    GeometryAgain = types.new_class("GeometryAgain", (Protocol,), exec_body=lambda ns: ns.update(body))
    return xrpc.interface(errors=(Oops,), name="Geometry")(GeometryAgain)


def test_fingerprint_is_stable_and_tracks_signatures() -> None:
    fp = xrpc.describe(Geometry).fingerprint
    assert isinstance(fp, str) and fp
    assert xrpc.describe(Geometry).fingerprint == fp
    # an identical declaration (built afresh) has the same fingerprint; a changed signature does not
    assert xrpc.describe(_geometry_variant("float")).fingerprint == fp
    assert xrpc.describe(_geometry_variant("int")).fingerprint != fp


def test_fingerprint_changes_with_parameters() -> None:
    @xrpc.interface(name="Same")
    class V1(Protocol):
        async def m(self, x: int) -> int: ...

    @xrpc.interface(name="Same")
    class V2(Protocol):
        async def m(self, x: int, y: int) -> int: ...

    @xrpc.interface(name="Same")
    class V3(Protocol):
        async def m(self, x: str) -> int: ...

    @xrpc.interface(name="Same")
    class V4(Protocol):
        async def m(self, renamed: int) -> int: ...

    fps = [xrpc.describe(c).fingerprint for c in (V1, V2, V3, V4)]
    assert len(set(fps)) == 4


def test_fingerprint_is_stable_across_processes() -> None:
    code = "import sys; sys.path.insert(0, 'tests'); import test_codec, xrpc; print(xrpc.describe(test_codec.Geometry).fingerprint)"
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=6 * T)
        assert r.returncode == 0, r.stderr
        outs.add(r.stdout.strip())
    assert outs == {xrpc.describe(Geometry).fingerprint}


# --------------------------------------------------------------------------- round-trip property
@xrpc.interface
class Echo(Protocol):
    async def echo(self, v: Any) -> Any: ...


class EchoImpl:
    def __init__(self) -> None:
        self.calls = 0

    async def echo(self, v: Any) -> Any:
        self.calls += 1
        return v


plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


def _assert_same(got: Any, want: Any) -> None:
    """Equal, and of the same types all the way down (so 1 is not 1.0 nor True)."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _assert_same(got[k], want[k])
    elif isinstance(want, float):
        assert got == want and math.copysign(1.0, got) == math.copysign(1.0, want)
    else:
        assert got == want


async def test_plain_values_round_trip_through_any() -> None:
    """Hypothesis drives one connection from a worker thread (so shrinking works), calls go via the loop."""
    server = xrpc.Server()
    impl = EchoImpl()
    server.export(Echo, impl)
    examples = 0

    with anyio.fail_after(6 * T):
        async with xrpc.testing.connect(server) as conn:
            proxy = conn.proxy(Echo)

            @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
            @given(plain_values)
            def check(value: Any) -> None:
                nonlocal examples
                examples += 1
                _assert_same(anyio.from_thread.run(proxy.echo, value), value)

            await anyio.to_thread.run_sync(check)
    assert examples >= 50
    assert impl.calls == examples


# --------------------------------------------------------------------------- reference plans and the wire context
@xrpc.interface(name="test.Cell")
class Cell(Protocol):
    async def get(self) -> int: ...


@xrpc.interface(name="test.Grid")
class Grid(Protocol):
    async def fill(self, cells: list[Cell], named: dict[str, tuple[Cell, int]], spare: Optional[Cell] = None) -> frozenset[Cell]: ...
    async def pipe(self, fd: xrpc.FileDescriptor, label: str) -> xrpc.SharedBuffer: ...


class RecordingContext:
    """A ``WireContext`` without a connection: objects go out as numbered references and come back
    as themselves; descriptor numbers are shifted by 100 on the way out."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.calls: list[tuple[str, Any]] = []

    def ref_out(self, desc: InterfaceDescription, value: Any) -> Ref:
        oid = f"o{len(self.objects)}"
        self.objects[oid] = value
        self.calls.append(("ref_out", desc.name))
        return Ref(False, oid, desc.name)

    def ref_in(self, desc: InterfaceDescription, token: Ref) -> Any:
        self.calls.append(("ref_in", desc.name))
        return self.objects[token.oid]

    def fd_out(self, fd: int) -> int:
        self.calls.append(("fd_out", fd))
        return fd + 100

    def fd_in(self, seq: int) -> int:
        self.calls.append(("fd_in", seq))
        return seq - 100


def test_slots_hold_typed_plans() -> None:
    fill = xrpc.describe(Grid).methods["fill"]
    cells, named, spare = (p.slot.plan for p in fill.params)  # type: ignore[union-attr]
    assert cells == SeqPlan(RefPlan(Cell), list)
    assert named == DictPlan(str, TuplePlan((RefPlan(Cell), None), (Cell, int)))
    assert spare == OptionalPlan(RefPlan(Cell))
    assert fill.reply is not None and fill.reply.plan == SeqPlan(RefPlan(Cell), frozenset)
    assert [type(p).__name__ for p in named.walk()] == ["DictPlan", "TuplePlan", "RefPlan"]
    pipe = xrpc.describe(Grid).methods["pipe"]
    assert [p.slot.plan for p in pipe.params] == [FdPlan(), None]  # type: ignore[union-attr]
    assert pipe.reply is not None and pipe.reply.plan == BufferPlan()
    assert plan_of(list[int]) is None and plan_of(dict[str, Point]) is None
    assert plan_of(tuple[Cell, ...]) == SeqPlan(RefPlan(Cell), tuple)
    assert plan_of(Annotated[set[Cell], "doc"]) == SeqPlan(RefPlan(Cell), set)
    with pytest.raises(xrpc.InterfaceError, match="only as Optional"):
        plan_of(Union[Cell, int])


def test_the_codec_passes_references_through_a_wire_context() -> None:
    ctx = RecordingContext()
    a, b, c = object(), object(), object()
    fill = xrpc.describe(Grid).methods["fill"]
    payload = msgspec.msgpack.encode(fill.encode_args(([a, b], {"x": (c, 3)}), {}, ctx))
    ref = lambda oid: [False, oid, "test.Cell"]  # noqa: E731
    assert msgspec.msgpack.decode(payload) == [[ref("o0"), ref("o1")], {"x": [ref("o2"), 3]}]  # spare, at its default, is not sent
    assert fill.decode_args(payload, ctx) == ([a, b], {"x": (c, 3)}, None)
    reply = msgspec.msgpack.encode(fill.encode_reply(frozenset({a}), ctx))
    assert fill.decode_reply(reply, ctx) == frozenset({a})
    assert ctx.calls == [("ref_out", "test.Cell")] * 3 + [("ref_in", "test.Cell")] * 3 + [("ref_out", "test.Cell"), ("ref_in", "test.Cell")]
    # a slot with references needs a context; plain slots do not
    with pytest.raises(xrpc.ValidationError, match="argument 'cells' .* travel only on a connection"):
        fill.encode_args(([a], {}), {})
    with pytest.raises(xrpc.ValidationError, match="argument 'cells' .* travel only on a connection"):
        fill.decode_args(payload)
    distance = xrpc.describe(Geometry).methods["distance"]
    assert distance.decode_args(msgspec.msgpack.encode(distance.encode_args((Point(0, 0), Point(3, 4)), {}))) == (Point(0, 0), Point(3, 4), 1.0)


class Ticket:
    """A value of a kind xrpc does not know: it travels as a number the wire context hands out."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ticket) and other.n == self.n

    __hash__ = None  # type: ignore[assignment]


def test_a_new_kind_of_plan_is_one_class() -> None:
    @dataclasses.dataclass(frozen=True)
    class TicketPlan(Plan):
        @classmethod
        def match(cls, tp: Any) -> Plan | None:
            return cls() if tp is Ticket else None

        @property
        def wire_type(self) -> Any:
            return int

        def to_wire(self, ctx: WireContext, value: Any) -> Any:
            return ctx.fd_out(value.n)

        def from_wire(self, ctx: WireContext, value: Any) -> Any:
            return Ticket(ctx.fd_in(value))

    try:

        @xrpc.interface(name="test.Booth")
        class Booth(Protocol):
            async def swap(self, tickets: list[Ticket], label: str) -> Optional[Ticket]: ...

        swap = xrpc.describe(Booth).methods["swap"]
        assert swap.params[0].slot is not None and swap.params[0].slot.plan == SeqPlan(TicketPlan(), list)
        ctx = RecordingContext()
        payload = msgspec.msgpack.encode(swap.encode_args(([Ticket(1), Ticket(2)], "x"), {}, ctx))
        assert msgspec.msgpack.decode(payload) == [[101, 102], "x"]
        assert swap.decode_args(payload, ctx) == ([Ticket(1), Ticket(2)], "x")
        assert swap.decode_reply(msgspec.msgpack.encode(swap.encode_reply(Ticket(5), ctx)), ctx) == Ticket(5)
        assert swap.decode_reply(msgspec.msgpack.encode(swap.encode_reply(None, ctx)), ctx) is None
    finally:
        Plan.kinds.remove(TicketPlan)
    assert plan_of(Ticket) is None
