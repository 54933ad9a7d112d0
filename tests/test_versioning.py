"""Version negotiation: an old client meets a new server and the other way round.

The handshake announces each export's fingerprint and a typed signature per method (its kind and
parameter names).  A compatible difference works; a call the other side cannot take fails at once
with an error that names the method and the difference, never silently.  A signature that does not
decode is a protocol error.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Protocol

import anyio
import msgspec
import pytest

import xrpc
from xrpc._protocol import PROTOCOL_VERSION, ErrorCode, Hello, MethodSig

from _wire import body_frame, decode_frames, frame, read_to_end
from _timeouts import T


# --------------------------------------------------------------------------- two versions of "Svc"
@xrpc.interface(name="Svc")
class SvcV1(Protocol):
    async def add(self, a: int, b: int) -> int: ...

    async def greet(self, name: str) -> str: ...


@xrpc.interface(name="Svc")
class SvcV2(Protocol):
    async def add(self, a: int, b: int, scale: int = 1) -> int: ...  # new optional parameter

    async def greet(self, name: str) -> str: ...

    async def shout(self, text: str) -> str: ...  # new method


@xrpc.interface(name="Svc")
class SvcRequiresMore(Protocol):
    async def add(self, a: int, b: int, scale: int) -> int: ...  # a new *required* parameter

    async def greet(self, name: str) -> str: ...


@xrpc.interface(name="Svc")
class SvcKindChanged(Protocol):
    def add(self, a: int, b: int) -> AsyncIterator[int]: ...  # unary became a stream

    async def greet(self, name: str) -> str: ...


@xrpc.interface(name="Svc")
class SvcTypeChanged(Protocol):
    async def add(self, a: str, b: str) -> str: ...  # same names, other types

    async def greet(self, name: str) -> str: ...


@xrpc.interface(name="Svc")
class SvcUnrelated(Protocol):
    async def frobnicate(self, x: int) -> int: ...


class V1:
    def __init__(self) -> None:
        self.calls = 0

    async def add(self, a: int, b: int) -> int:
        self.calls += 1
        return a + b

    async def greet(self, name: str) -> str:
        return f"hello {name}"


class V2(V1):
    async def add(self, a: int, b: int, scale: int = 1) -> int:  # type: ignore[override]
        self.calls += 1
        return (a + b) * scale

    async def shout(self, text: str) -> str:
        return text.upper()


class RequiresMore(V1):
    async def add(self, a: int, b: int, scale: int) -> int:  # type: ignore[override]
        self.calls += 1
        return (a + b) * scale


class KindChanged(V1):
    async def add(self, a: int, b: int) -> AsyncIterator[int]:  # type: ignore[override]
        self.calls += 1
        yield a + b


class TypeChanged(V1):
    async def add(self, a: str, b: str) -> str:  # type: ignore[override]
        self.calls += 1
        return a + b


def serve(iface: type, impl: object) -> xrpc.Server:
    server = xrpc.Server()
    server.export(iface, impl, name="svc")
    return server


@contextlib.asynccontextmanager
async def proxy_to(served: type, impl: object, used: type) -> AsyncIterator[Any]:
    """A proxy of interface ``used`` to ``impl``, exported as ``served`` under the name "svc" on an
    in-memory connection; the whole block bounded by ``T``."""
    with anyio.fail_after(T):
        async with xrpc.testing.connect(serve(served, impl)) as conn:
            yield conn.proxy(used, name="svc")


async def test_fingerprints_differ_between_versions() -> None:
    assert xrpc.describe(SvcV1).fingerprint != xrpc.describe(SvcV2).fingerprint
    assert xrpc.describe(SvcV1).fingerprint != xrpc.describe(SvcTypeChanged).fingerprint


async def test_old_client_new_server_compatible() -> None:
    impl = V2()
    async with proxy_to(SvcV2, impl, SvcV1) as old:
        assert await old.add(2, 3) == 5  # the new optional parameter takes its default
        assert await old.greet("ada") == "hello ada"
    assert impl.calls == 1


async def test_new_client_old_server_compatible_calls_work() -> None:
    impl = V1()
    async with proxy_to(SvcV1, impl, SvcV2) as new:
        assert await new.add(2, 3) == 5  # the optional parameter left at its default is not sent
        assert await new.greet("bob") == "hello bob"


async def test_new_client_old_server_argument_passed_at_its_default_is_not_sent() -> None:
    impl = V1()
    async with proxy_to(SvcV1, impl, SvcV2) as new:
        # the old server refuses arguments it has no parameter for; at its default, it is not sent
        assert await new.add(2, 3, scale=1) == 5
        assert await new.add(2, 3, 1) == 5
    assert impl.calls == 2


async def test_extra_arguments_are_refused_by_the_server() -> None:
    impl = V1()
    with anyio.fail_after(T):
        async with xrpc.testing.connect(serve(SvcV1, impl)) as conn:
            m = xrpc.describe(SvcV2).methods["add"]
            with pytest.raises(xrpc.ValidationError) as info:
                await conn.call_unary("svc", m, (2, 3, 10), {}, None)  # without the proxy's check
            assert "add" in str(info.value) and "3 given, it takes at most 2" in str(info.value)
            assert await conn.proxy(SvcV1, name="svc").add(2, 3) == 5  # the connection carries on
    assert impl.calls == 1


async def test_new_client_old_server_new_method_fails_at_once() -> None:
    impl = V1()
    async with proxy_to(SvcV1, impl, SvcV2) as new:
        with pytest.raises(xrpc.MethodNotFound) as info:
            await new.shout("hi")
        msg = str(info.value)
        assert "shout" in msg and "Svc" in msg
        assert "add" in msg and "greet" in msg  # says what the peer does have
        assert await new.greet("still") == "hello still"  # the connection carries on


async def test_new_client_old_server_new_parameter_with_a_value_is_refused() -> None:
    impl = V1()
    async with proxy_to(SvcV1, impl, SvcV2) as new:
        with pytest.raises(xrpc.ValidationError) as info:
            await new.add(2, 3, scale=10)  # the old server would silently ignore it
        assert info.value.argument == "scale"
        assert "scale" in str(info.value) and "add" in str(info.value)
        with pytest.raises(xrpc.ValidationError):
            await new.add(2, 3, 10)  # positionally too
    assert impl.calls == 0


@pytest.mark.parametrize(
    "served, impl_type, refusal",
    [
        pytest.param(SvcRequiresMore, RequiresMore, lambda e: "scale" in str(e) and "requires" in str(e), id="server-requires-a-parameter-the-client-lacks"),
        pytest.param(SvcKindChanged, KindChanged, lambda e: "stream" in str(e) and "unary" in str(e), id="method-kind-changed"),
        pytest.param(SvcTypeChanged, TypeChanged, lambda e: e.argument == "a", id="type-changed"),
    ],
)
async def test_a_changed_method_is_refused_by_the_server_not_silently(served: type, impl_type: type[V1], refusal: Any) -> None:
    impl = impl_type()
    async with proxy_to(served, impl, SvcV1) as old:
        with pytest.raises(xrpc.ValidationError) as info:
            await old.add(1, 2)
        assert refusal(info.value), info.value
        assert await old.greet("x") == "hello x"  # the connection carries on
    assert impl.calls == 0


async def test_fully_incompatible_interface_invalidates_with_a_reason() -> None:
    with anyio.fail_after(T):
        async with xrpc.testing.connect(serve(SvcUnrelated, object.__new__(type("U", (), {"frobnicate": V1.add})))) as conn:
            with pytest.raises(xrpc.ConnectionInvalidated) as info:
                conn.proxy(SvcV1, name="svc")
            msg = str(info.value)
            assert "no method in common" in msg and "add" in msg


async def test_server_calling_an_older_client() -> None:
    """The same negotiation runs for the client's exports (announced in HELLO)."""
    seen: list[str] = []

    async def on_connect(conn: xrpc.Connection) -> None:
        client = conn.proxy(SvcV2, name="svc")
        seen.append(await client.greet("server"))
        try:
            await client.shout("x")
        except xrpc.MethodNotFound as exc:
            seen.append(type(exc).__name__)

    server = xrpc.Server(on_connect=on_connect)
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server, exports=[(SvcV1, V1(), "svc")]):
            pass
    assert seen == ["hello server", "MethodNotFound"]


# --------------------------------------------------------------------------- typed signatures
WELCOME_TAG, GOODBYE_TAG = 1, 10


@xrpc.interface(name="Sink")
class Sink(Protocol):
    async def upload(self, label: str, chunks: AsyncIterator[bytes], *, level: int = 0) -> int: ...


def test_signatures_are_typed_values() -> None:
    assert xrpc.describe(SvcV2).methods["add"].signature == MethodSig("unary", ("a", "b", "scale"), (2,), None)
    assert xrpc.describe(Sink).methods["upload"].signature == MethodSig("client_stream", ("label", "chunks", "level"), (2,), 1)
    assert xrpc.describe(SvcKindChanged).methods["add"].signature == MethodSig("server_stream", ("a", "b"))


def test_compat_with_compares_typed_signatures() -> None:
    add = xrpc.describe(SvcV2).methods["add"]
    where = "Svc.add"
    assert add.compat_with(MethodSig("unary", ("a", "b", "scale"), (2,)), where) is None
    assert add.compat_with(MethodSig("unary", ("a", "b")), where) == (2,)  # a call passing scale fails
    assert add.compat_with(MethodSig("unary", ("a", "b", "scale", "extra"), (2, 3)), where) is None
    assert add.compat_with(MethodSig("unary", ("a", "b", "scale", "extra"), (2,)), where) == (
        "Svc.add requires parameter 'extra' there, which this side's interface lacks"
    )
    assert add.compat_with(MethodSig("unary", ("a", "c")), where) == "Svc.add: parameter 2 is 'c' there, 'b' here"
    assert add.compat_with(MethodSig("server_stream", ("a", "b", "scale"), (2,)), where) == (
        "Svc.add is a server stream call there, a unary call here"
    )
    assert add.compat_with(MethodSig("teleport", ()), where) == "Svc.add is a teleport call there, a unary call here"


async def test_welcome_carries_typed_signatures(sock_dir: str) -> None:
    server = xrpc.Server()
    server.export(SvcV2, V2(), name="svc")
    server.export(Sink, object.__new__(type("S", (), {"upload": lambda *a: 0})), name="sink")
    path = f"{sock_dir}/s.sock"
    with anyio.fail_after(T):
        async with server.listen(f"unix://{path}"):
            async with await anyio.connect_unix(path) as stream:
                await stream.send(frame(Hello(PROTOCOL_VERSION, 1 << 20)))
                received = bytearray()
                while not decode_frames(received):
                    received += await stream.receive()
    welcome = decode_frames(received)[0]
    assert welcome[0] == WELCOME_TAG
    exports = {e[0]: e for e in welcome[3]}
    # [kind, parameter names, indexes of the optional ones, index of the stream parameter or nil]
    assert exports["svc"][3] == {
        "add": ["unary", ["a", "b", "scale"], [2], None],
        "greet": ["unary", ["name"], [], None],
        "shout": ["unary", ["text"], [], None],
    }
    assert exports["sink"][3] == {"upload": ["client_stream", ["label", "chunks", "level"], [2], 1]}


MALFORMED_SIGNATURES = [
    pytest.param("unary:a,b?", id="the-old-string-form"),
    pytest.param([], id="no-kind"),
    pytest.param([7, ["a"]], id="kind-not-a-string"),
    pytest.param(["unary", "a,b"], id="names-not-an-array"),
    pytest.param(["unary", [1, 2]], id="names-not-strings"),
    pytest.param(["unary", ["a", "a"]], id="repeated-name"),
    pytest.param(["unary", [""]], id="empty-name"),
    pytest.param(["unary", ["a", "b"], [2]], id="optional-index-out-of-range"),
    pytest.param(["unary", ["a", "b"], [-1]], id="optional-index-negative"),
    pytest.param(["unary", ["a", "b"], [1, 0]], id="optional-indexes-unordered"),
    pytest.param(["unary", ["a", "b"], [True]], id="optional-index-a-bool"),
    pytest.param(["client_stream", ["a", "xs"], [], 2], id="stream-index-out-of-range"),
    pytest.param(["client_stream", ["a", "xs"], [1], 1], id="stream-parameter-optional"),
]


@pytest.mark.parametrize("bad", MALFORMED_SIGNATURES)
async def test_a_malformed_signature_in_hello_is_refused(sock_dir: str, bad: Any) -> None:
    """A HELLO whose export announces a signature that does not decode is a protocol error: the
    server says which export in a GOODBYE (code 3), closes, and goes on serving other clients."""
    impl = V1()
    path = f"{sock_dir}/s.sock"
    hello = [
        0,
        PROTOCOL_VERSION,
        1 << 20,
        [["cb", "Callback", "0" * 16, {"ping": ["unary", ["x"]]}], ["svc", "Svc", "1" * 16, {"add": bad}]],
    ]
    with anyio.fail_after(T):
        async with serve(SvcV1, impl).listen(f"unix://{path}"):
            async with await anyio.connect_unix(path) as stream:
                await stream.send(body_frame(msgspec.msgpack.encode(hello)))
                data, how = await read_to_end(stream, T)
            ((tag, reason, code),) = decode_frames(data)
            assert (tag, code) == (GOODBYE_TAG, ErrorCode.VALIDATION)
            assert reason.startswith("undecodable HELLO: a method signature of export 1 is malformed: "), reason
            async with xrpc.connect(f"unix://{path}", timeout=T) as conn:
                assert await conn.proxy(SvcV1, name="svc").add(2, 3) == 5
    assert impl.calls == 1


# --------------------------------------------------------------------------- plain-function implementations
class SyncV1:
    """Plain functions run inline on the reader, without a task."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def add(self, a: int, b: int) -> int:
        self.seen.append(xrpc.current_metadata())
        if a < 0:
            raise ValueError("negative")
        return a + b

    def greet(self, name: str) -> str:
        return f"hi {name}"


async def test_plain_function_implementations_run_inline() -> None:
    impl = SyncV1()
    async with proxy_to(SvcV1, impl, SvcV1) as p:
        assert await p.add(1, 2) == 3
        with xrpc.call_metadata(trace="t-1"):
            assert await p.add(2, 2) == 4
        assert await p.add(3, 3) == 6  # metadata does not leak into later calls
        with pytest.raises(xrpc.RemoteError) as info:
            await p.add(-1, 0)
        assert info.value.type_name == "ValueError"
        results = await _gather([p.greet(str(i)) for i in range(50)])
        assert results == [f"hi {i}" for i in range(50)]
    assert impl.seen[:3] == [{}, {"trace": "t-1"}, {}]


async def _gather(coros: list) -> list:  # type: ignore[type-arg]
    out: list = [None] * len(coros)  # type: ignore[type-arg]

    async def run(i: int, c) -> None:  # type: ignore[no-untyped-def]
        out[i] = await c

    async with anyio.create_task_group() as tg:
        for i, c in enumerate(coros):
            tg.start_soon(run, i, c)
    return out


class NeverAwaits:
    """``async def`` bodies without ``await`` run inline too; anyio and the connection still work."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bool]] = []

    async def add(self, a: int, b: int) -> int:
        conn = xrpc.current_connection()
        anyio.current_time()  # anyio can tell its backend here
        self.seen.append((conn.peer.transport, xrpc.current_metadata(), a < 0))
        if a < 0:
            raise ValueError("negative")
        return a + b

    async def greet(self, name: str) -> str:
        await anyio.lowlevel.checkpoint()  # this one awaits: it runs in a task
        return f"hello {name}"


async def test_coroutines_that_never_await_run_inline(transport: str) -> None:
    impl = NeverAwaits()
    server = serve(SvcV1, impl)
    with anyio.fail_after(T):
        async with server.listen(transport) as listener, xrpc.connect(listener.url) as conn:
            p = conn.proxy(SvcV1, name="svc")
            assert await p.add(1, 2) == 3
            with xrpc.call_metadata(trace="t-2"):
                assert await p.add(2, 2) == 4
            with pytest.raises(xrpc.RemoteError):
                await p.add(-1, 0)
            assert await p.greet("ada") == "hello ada"
            export = next(iter(server.connections))._serving.lookup("svc")
            assert export is not None and "add" in export.inline and "greet" not in export.inline
    kind = transport.split(":")[0]
    assert [s[0] for s in impl.seen] == [kind] * 3
    assert [s[1] for s in impl.seen] == [{}, {"trace": "t-2"}, {}]
