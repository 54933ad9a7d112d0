"""Hostile review of references inside records and of promises passed as arguments.

A peer plays byte by byte (raw frames) against a real server process, or abuses the public API.
Every attack asserts the promised behaviour: a typed xrpc error, nothing leaked (exports, proxies,
descriptors, calls in flight, budget), and the connection and the server live on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import tempfile
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Protocol, Union

import anyio
import msgspec
import pytest

import xrpc
from _procs import ChildProcess, errors_in, log_to, serve_until_stdin_closes
from _timeouts import T
from _wire import CALL_TAG, CANCEL_TAG, ERROR_TAG, GOODBYE_TAG, ITEM_TAG, RELEASE_TAG, REPLY_TAG, WELCOME_TAG, frame, pop_frames
from xrpc._protocol import PROTOCOL_VERSION, Hello

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- the interfaces
@xrpc.interface
class Thing(Protocol):
    async def name(self) -> str: ...


@xrpc.interface
class Other(Protocol):
    async def other(self) -> int: ...


class Box(msgspec.Struct):
    label: str
    thing: Thing
    more: list[Thing] = []


class Lit(msgspec.Struct, tag="lit"):
    value: int


class Node(msgspec.Struct, tag="node"):
    thing: Optional[Thing]
    kids: list[Expr]


Expr = Union[Lit, Node]


class Checked(msgspec.Struct):
    thing: Thing
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must not be negative")


@dataclasses.dataclass
class FdBox:
    fd: xrpc.FileDescriptor
    thing: Optional[Thing] = None
    n: int = 0


@xrpc.interface
class Source(Protocol):
    async def box(self) -> Box: ...

    def boxes(self) -> AsyncIterator[Box]: ...


@xrpc.interface
class Hub(Protocol):
    async def make(self, name: str) -> Thing: ...

    async def same(self) -> Thing: ...

    async def fail(self) -> Thing: ...

    async def hang(self) -> Thing: ...

    async def put(self, box: Box) -> str: ...

    async def put_many(self, boxes: list[Box]) -> int: ...

    async def count(self, e: Expr) -> int: ...

    async def check(self, c: Checked) -> str: ...

    async def fdbox(self, b: FdBox) -> int: ...

    async def ask(self, src: Source) -> str: ...

    async def sink(self, boxes: AsyncIterator[Box]) -> str: ...

    async def many(self, n: int) -> Box: ...

    async def stats(self) -> dict[str, int]: ...


# --------------------------------------------------------------------------- the server process
class ThingImpl:
    def __init__(self, label: str) -> None:
        self.label = label

    async def name(self) -> str:
        return self.label


SAME = ThingImpl("same")


class HubImpl:
    runs = 0

    async def make(self, name: str) -> Thing:
        return ThingImpl(name)

    async def same(self) -> Thing:
        return SAME

    async def fail(self) -> Thing:
        raise KeyError("missing")

    async def hang(self) -> Thing:
        await anyio.sleep_forever()
        raise AssertionError

    async def put(self, box: Box) -> str:
        HubImpl.runs += 1
        things = [box.thing, *box.more]
        return ",".join(f"local:{t.label}" if isinstance(t, ThingImpl) else "remote" for t in things)

    async def put_many(self, boxes: list[Box]) -> int:
        HubImpl.runs += 1
        return len(boxes)

    async def count(self, e: Expr) -> int:
        HubImpl.runs += 1
        n, todo = 0, [e]
        while todo:
            x = todo.pop()
            n += 1
            if isinstance(x, Node):
                todo.extend(x.kids)
        return n

    async def check(self, c: Checked) -> str:
        HubImpl.runs += 1
        return "ok"

    async def fdbox(self, b: FdBox) -> int:
        HubImpl.runs += 1
        with b.fd:
            return os.fstat(b.fd.fileno()).st_size

    async def ask(self, src: Source) -> str:
        try:
            box = await src.box()
        except xrpc.Error as exc:
            return type(exc).__name__
        return f"got {type(box.thing).__name__}"

    async def sink(self, boxes: AsyncIterator[Box]) -> str:
        n = 0
        try:
            async for _ in boxes:
                n += 1
        except xrpc.Error as exc:
            return f"{n} {type(exc).__name__}"
        return f"{n} ok"

    async def many(self, n: int) -> Box:
        return Box("many", ThingImpl("0"), [ThingImpl(str(i)) for i in range(n)])

    async def stats(self) -> dict[str, int]:
        gc.collect()
        conn = xrpc.current_connection()
        serving = conn._serving  # what it holds for this peer
        return {
            "exported": conn.exported_objects,
            "proxies": conn.remote_refs,
            "fds": len(os.listdir("/proc/self/fd")),
            "runs": HubImpl.runs,
            "serving": serving.serving,  # (this call runs inline: not counted)
            "held": serving.flow.held,
            "promises": len(conn._objects._promises),
        }


class SecretImpl:
    async def name(self) -> str:
        return "the secret"


MAX_OBJECTS = 50


async def _serve(path: str, log_path: str) -> None:
    log_to(log_path)
    server = xrpc.Server(limits=xrpc.Limits(max_objects=MAX_OBJECTS))
    server.export(Hub, HubImpl())
    server.export(Thing, ThingImpl("named"), "thing")
    server.export(Thing, SecretImpl(), "secret", requirement="uid == 4000000")
    async with server.listen(f"unix://{path}") as listener:
        await serve_until_stdin_closes(listener.url)


def _server_main(path: str, log_path: str) -> None:
    anyio.run(_serve, path, log_path)


def _run_server() -> Iterator[ChildProcess]:
    """The server in a child process; once stopped, it must not have died nor logged an error."""
    child = ChildProcess()
    child.start(__name__.rpartition(".")[2], child.path, child.log_path)
    yield child
    alive = child.alive()
    lines = child.stop()
    assert alive, "the server died"
    assert not errors_in(lines), errors_in(lines)


@pytest.fixture(scope="module")
def server() -> Iterator[ChildProcess]:
    yield from _run_server()


# --------------------------------------------------------------------------- a raw peer
class Raw:
    """A peer that speaks frames by hand over a Unix socket."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.next_id = 1
        self.pending: list[Any] = []
        self.answers: dict[int, Any] = {}
        self.released = 0  # references the server gave back (RELEASE)

    @classmethod
    async def open(cls, url: str) -> Raw:
        stream = await anyio.connect_unix(url.removeprefix("unix://"))
        self = cls(stream)
        await stream.send(frame(Hello(PROTOCOL_VERSION, 1 << 24)))
        welcome = await self.read(lambda f: f[0] == WELCOME_TAG)
        assert welcome[0] == WELCOME_TAG
        return self

    async def send(self, *msgs: Any, fds: list[int] | None = None) -> None:
        data = b"".join(frame(m) for m in msgs)
        if fds:
            await self.stream.send_fds(data, fds)
        else:
            await self.stream.send(data)

    def new_id(self) -> int:
        i = self.next_id
        self.next_id += 2
        return i

    async def call(self, obj: str, method: str, args: list[Any], *, flags: int = 0, deadline: float | None = None, fds: list[int] | None = None) -> int:
        i = self.new_id()
        await self.send([CALL_TAG, i, obj, method, args, flags, deadline], fds=fds)
        return i

    def _sort(self) -> None:
        for f in pop_frames(self.buf):
            if f[0] in (REPLY_TAG, ERROR_TAG):
                self.answers[f[1]] = f
            elif f[0] == RELEASE_TAG:
                self.released += f[2] if len(f) > 2 else 1
            else:
                self.pending.append(f)

    async def _until(self, take: Callable[[], Any]) -> Any:
        """What ``take()`` returns once it is not None, sorting the frames that arrive meanwhile
        (within T)."""
        with anyio.fail_after(T):
            while True:
                self._sort()
                f = take()
                if f is not None:
                    return f
                try:
                    self.buf += await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                    raise AssertionError(f"the server closed the connection: {self.pending[-3:]}") from exc

    async def read(self, want: Any) -> Any:
        """The first frame for which ``want(frame)`` holds (others are kept in ``pending``)."""

        def first_wanted() -> Any:
            for k, f in enumerate(self.pending):
                if want(f):
                    del self.pending[k]
                    return f
            return None

        return await self._until(first_wanted)

    async def answer(self, call_id: int) -> Any:
        return await self._until(lambda: self.answers.pop(call_id, None))

    async def result(self, obj: str, method: str, args: list[Any], **kw: Any) -> Any:
        return await self.answer(await self.call(obj, method, args, **kw))

    async def stats(self) -> dict[str, int]:
        f = await self.result("Hub", "stats", [])
        assert f[0] == REPLY_TAG, f
        return f[2]

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> Raw:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def ref(home: bool, oid: str, iface: str = "Thing") -> list[Any]:
    return [home, oid, iface]


def box(thing: Any, *more: Any) -> dict[str, Any]:
    return {"label": "b", "thing": thing, "more": list(more)}


async def settled(raw: Raw) -> dict[str, int]:
    """The server's stats once the proxies it let go have been released (a round trip)."""
    await raw.stats()
    return await raw.stats()


def refused(f: Any, code: int, *words: str) -> None:
    assert f[0] == ERROR_TAG, f
    assert f[2] == code, f
    for w in words:
        assert w in f[4], f


async def alive(server: ChildProcess) -> None:
    async with xrpc.connect(server.url) as conn:
        hub = conn.proxy(Hub)
        assert await (await hub.make("alive")).name() == "alive"
    assert server.alive()


@contextlib.asynccontextmanager
async def attack(server: ChildProcess) -> AsyncIterator[Raw]:
    """A raw peer of ``server``; once it is closed, the server must still serve a client."""
    async with await Raw.open(server.url) as raw:
        yield raw
    await alive(server)


# --------------------------------------------------------------------------- forged references in records
async def test_forged_home_references_inside_records_are_refused(server: ChildProcess) -> None:
    async with await Raw.open(server.url) as raw, await Raw.open(server.url) as other:
        # an object the server passed to the other connection, and one it passed to this one
        f = await other.result("Hub", "make", ["theirs"])
        assert f[0] == REPLY_TAG and f[2][0] is False, f
        theirs = f[2][1]
        f = await raw.result("Hub", "make", ["mine"])
        mine = f[2][1]
        before = await raw.stats()
        forged = [
            ref(True, "#999999"),  # never passed
            ref(True, "thing"),  # a named export
            ref(True, "secret"),  # a guarded export
            ref(True, "Hub", "Thing"),
            ref(True, theirs),  # another connection's object (the same number may exist here: use a fresh one)
            ref(True, "#0"),
            ref(True, ""),
            ref(True, "#" + "9" * 5000),
        ]
        for token in forged:
            if token[1] == theirs and theirs == mine:
                continue
            for payload in (box(token), box(ref(True, mine), ref(True, mine), token), {"label": "x", "thing": ref(True, mine), "more": [token]}):
                refused(await raw.result("Hub", "put", [payload]), 3, "'box'")
        # wrong interface names at depth, for an object the server did pass here
        for payload in (box(ref(True, mine, "Other")), box(ref(True, mine), ref(False, "#1", "Other")), box(ref(True, mine, "Hub"))):
            refused(await raw.result("Hub", "put", [payload]), 3, "'box'")
        # a reference token of the wrong shape inside the record
        for token in ([True, mine], [True, 1, "Thing"], [1, mine, "Thing"], "#1", 7, None, {"home": True}):
            refused(await raw.result("Hub", "put", [box(token)]), 3)
        after = await settled(raw)
        assert after["runs"] == before["runs"], "a forged reference reached the method"
        assert after["exported"] == before["exported"] == 1
        assert after["proxies"] == 0
        # the genuine one works
        f = await raw.result("Hub", "put", [box(ref(True, mine))])
        assert f[0] == REPLY_TAG and f[2] == "local:mine", f
    await alive(server)


# --------------------------------------------------------------------------- ^id tokens
async def test_promise_tokens_outside_call_arguments_are_refused(server: ChildProcess) -> None:
    async with attack(server) as raw:
        made = await raw.call("Hub", "make", ["x"])
        assert (await raw.answer(made))[0] == REPLY_TAG
        # a reply of ours (the server calls our Source) holding ^id in its record: ours, its own call
        for token in (ref(True, f"^{made}"), None):
            ask = await raw.call("Hub", "ask", [ref(False, "#1", "Source")])
            cb = await raw.read(lambda f: f[0] == CALL_TAG)
            assert cb[2:4] == ["#1", "box"] and cb[1] % 2 == 0, cb
            await raw.send([REPLY_TAG, cb[1], box(token or ref(True, f"^{cb[1]}"))])
            f = await raw.answer(ask)
            assert f[0] == REPLY_TAG and f[2] == "ValidationError", f
        # client-stream items holding ^id inside records
        sink = await raw.call("Hub", "sink", [], flags=2)
        await raw.send([ITEM_TAG, sink, 1, [box(ref(True, f"^{made}"))]], [6, sink])
        f = await raw.answer(sink)
        assert f[0] == REPLY_TAG and f[2] == "0 ValidationError", f
        st = await settled(raw)
        assert st["proxies"] == 0 and st["serving"] == 0 and st["held"] == 0, st


async def test_promise_tokens_naming_what_is_not_a_kept_result_are_refused(server: ChildProcess) -> None:
    async with attack(server) as raw:
        failed = await raw.call("Hub", "fail", [])
        assert (await raw.answer(failed))[0] == ERROR_TAG
        hang = raw.new_id()  # cancelled in the same read as its CALL, before it started
        await raw.send([CALL_TAG, hang, "Hub", "hang", []], [CANCEL_TAG, hang])
        hang2 = await raw.call("Hub", "hang", [])  # cancelled while it runs
        await raw.stats()
        await raw.send([CANCEL_TAG, hang2])
        ask = await raw.call("Hub", "ask", [ref(False, "#1", "Source")])
        cb = await raw.read(lambda f: f[0] == CALL_TAG)  # a call of the other direction (even id)
        before = await raw.stats()
        # failed and cancelled calls: ObjectNotFound naming the argument
        for dead in (failed, hang, hang2):
            refused(await raw.result("Hub", "put", [box(ref(True, f"^{dead}"))]), 5, "'box'", f"^{dead}")
        # what never was (or is not a call of ours returning a Thing): ValidationError naming the argument
        nxt = raw.next_id
        for oid in (f"^{cb[1]}", "^0", "^-1", f"^{nxt}", f"^{nxt + 2}", "^99999999999", "^" + "9" * 5000, "^1.0", "^", "^^1",
                    f"^{ask}", f"^{before and 0}"):
            f = await raw.result("Hub", "put", [box(ref(True, oid))])
            refused(f, 3, "'box'")
            assert len(f[4]) < 1000, "the peer's token is echoed at length"
        # a make() whose result is then passed where another interface is declared
        made = await raw.call("Hub", "make", ["y"])
        assert (await raw.answer(made))[0] == REPLY_TAG
        refused(await raw.result("Hub", "put", [box(ref(True, f"^{made}", "Other"))]), 3, "'box'")
        refused(await raw.result("Hub", "put", [box(ref(False, "#1"), ref(True, f"^{made}", "Source"))]), 3, "'box'")
        # evicted: 256 finished calls returning objects later
        first = await raw.call("Hub", "make", ["old"])
        assert (await raw.answer(first))[0] == REPLY_TAG
        await raw.send([RELEASE_TAG, "#9999", 1])  # (ignored)
        ids = [raw.new_id() for _ in range(300)]
        await raw.send(*[[CALL_TAG, i, "Hub", "same", []] for i in ids])
        for i in ids:
            assert (await raw.answer(i))[0] == REPLY_TAG
        await raw.send([RELEASE_TAG, (await raw.result("Hub", "same", []))[2][1], 301])
        f = await raw.result("Hub", "put", [box(ref(True, f"^{ids[0]}"))])
        refused(f, 3, "'box'")
        await raw.send([ERROR_TAG, cb[1], 1, "X", "gone"])
        await raw.answer(ask)
        st = await settled(raw)
        assert st["runs"] == before["runs"], "a refused call ran"
        assert st["serving"] == 0 and st["held"] == 0 and st["proxies"] == 0, st


async def test_a_released_result_is_not_resolved_through_an_earlier_call_that_returned_it(server: ChildProcess) -> None:
    async with attack(server) as raw:
        first = await raw.call("Hub", "same", [])
        second = await raw.call("Hub", "same", [])
        a, b = await raw.answer(first), await raw.answer(second)
        assert a[0] == b[0] == REPLY_TAG and a[2] == b[2], (a, b)
        oid = a[2][1]
        before = await raw.stats()
        # the peer gives back both tokens: the object is released, and with it both calls' results
        await raw.send([RELEASE_TAG, oid, 2])
        for call in (first, second):
            refused(await raw.result("Hub", "put", [box(ref(True, f"^{call}"))]), 3, "'box'")
            refused(await raw.result("Hub", "put", [box(ref(True, oid))]), 3, "'box'")
        st = await raw.stats()
        assert st["runs"] == before["runs"], "a call ran with an object its peer had released"
        assert st["exported"] == 0, st


async def test_a_call_whose_reply_was_refused_counts_as_failed_for_calls_depending_on_it(server: ChildProcess) -> None:
    async with attack(server) as raw:
        ids = [raw.new_id() for _ in range(MAX_OBJECTS)]
        await raw.send(*[[CALL_TAG, i, "Hub", "make", [str(i)]] for i in ids])
        for i in ids:
            assert (await raw.answer(i))[0] == REPLY_TAG
        before = await raw.stats()
        assert before["exported"] == MAX_OBJECTS
        # one object too many: the caller gets LimitExceeded ...
        over = raw.new_id()
        put = raw.new_id()
        await raw.send([CALL_TAG, over, "Hub", "make", ["over"]], [CALL_TAG, put, "Hub", "put", [box(ref(True, f"^{over}"))]])
        refused(await raw.answer(over), 9, f"more than {MAX_OBJECTS} objects")
        # ... and a call passing its promise fails like one depending on any failed call
        refused(await raw.answer(put), 5, "'box'", f"^{over}", "LimitExceeded")
        # (and so does one pipelined on it)
        refused(await raw.result(f"^{over}", "name", []), 5)
        st = await raw.stats()
        assert st["runs"] == before["runs"], "a call ran on the result of a call that failed"
        assert st["exported"] == MAX_OBJECTS, st
        await raw.send(*[[RELEASE_TAG, f"#{k}", 1] for k in range(1, 400)])
        assert (await raw.stats())["exported"] == 0


# --------------------------------------------------------------------------- partial adoption, descriptors
async def test_a_record_refused_after_some_references_were_adopted_leaks_nothing(server: ChildProcess) -> None:
    async with attack(server) as raw:
        mine = (await raw.result("Hub", "make", ["mine"]))[2][1]
        before = await settled(raw)
        many = [ref(False, f"#{k}") for k in range(1, 2000)]
        bad = [
            # 2000 proxies made, then a forged home reference
            ("put", [box(ref(False, "#1"), *many, ref(True, "#424242"))]),
            # ... then a wrong interface
            ("put", [box(ref(True, mine), *many, ref(False, "#1", "Other"))]),
            # ... then a record of the list that is not a Box
            ("put_many", [[box(ref(False, "#1"), *many[:10])] * 50 + [{"label": 1}]]),
            # __post_init__ refuses the record after its reference was adopted
            ("check", [{"thing": ref(False, "#1"), "n": -1}]),
            # a recursive union: deep in it, a forged reference
            ("count", [{"type": "node", "thing": ref(False, "#1"), "kids": [{"type": "node", "thing": ref(False, "#2"), "kids": [
                {"type": "lit", "value": 1}, {"type": "node", "thing": ref(True, "secret"), "kids": []}]}]}]),
            # an unknown tag after references
            ("count", [{"type": "node", "thing": ref(False, "#1"), "kids": [{"type": "nope"}]}]),
        ]
        for method, args in bad:
            refused(await raw.result("Hub", method, args), 3)
        st = await settled(raw)
        assert st["proxies"] == 0, st
        assert st["exported"] == before["exported"] == 1, st
        assert st["runs"] == before["runs"], st
        # every proxy the refused calls made was given back to us
        # (records refused by msgspec itself made none: the list of Boxes, the unknown tag)
        assert raw.released == 2000 + 1999 + 1 + 2, raw.released


async def test_descriptors_inside_refused_records_are_closed(server: ChildProcess) -> None:
    async with await Raw.open(server.url) as raw:
        before = await settled(raw)
        with tempfile.TemporaryFile() as f:
            f.write(b"12345")
            f.flush()
            # one that works
            r = await raw.result("Hub", "fdbox", [{"fd": 1, "thing": None, "n": 0}], fds=[f.fileno()])
            assert r[0] == REPLY_TAG and r[2] == 5, r
            for payload in (
                {"fd": 2, "thing": ref(True, "#77")},  # a forged reference after the descriptor
                {"fd": 3, "thing": ref(False, "#1", "Other")},  # a wrong interface
                {"fd": 4, "thing": None, "n": "x"},  # plain data of the wrong type
                {"fd": 999, "thing": None},  # a descriptor that never arrived
                {"fd": -1},
            ):
                r = await raw.result("Hub", "fdbox", [payload], fds=[f.fileno()] if payload["fd"] != 999 else None)
                refused(r, 3, "'b'")
            # the connection still takes descriptors
            r = await raw.result("Hub", "fdbox", [{"fd": 6, "thing": None, "n": 6}], fds=[f.fileno()])
            assert r[0] == REPLY_TAG
        st = await settled(raw)
        # the descriptors of records refused once decoded were closed; those of records msgspec
        # refused (seq 4) or that named another (seq 5) wait unclaimed until the connection ends
        assert st["fds"] <= before["fds"] + 2, (before, st)
        assert st["proxies"] == 0 and st["runs"] == before["runs"] + 2, st
    async with await Raw.open(server.url) as probe:
        assert (await settled(probe))["fds"] <= before["fds"], "descriptors outlived their connection"
    await alive(server)


async def test_unclaimed_descriptors_in_records_end_the_connection_at_max_fds_and_are_closed(server: ChildProcess) -> None:
    async with await Raw.open(server.url) as raw, await Raw.open(server.url) as probe:
        before = await settled(probe)
        with tempfile.TemporaryFile() as f:
            # records that name no descriptor, each sent with one: never claimed
            with pytest.raises(AssertionError, match="max_fds"):
                for _ in range(200):
                    await raw.result("Hub", "put", [box(ref(False, "#1"))], fds=[f.fileno()])
        st = await settled(probe)
        assert st["fds"] <= before["fds"], (before, st)
    await alive(server)


# --------------------------------------------------------------------------- size: references are not free
MiB = 1 << 20


def _wide_box(n: int) -> bytes:
    """A Box argument list whose ``more`` holds ``n`` references to our objects, encoded by hand."""
    enc = msgspec.msgpack.encode
    more = b"".join(enc([False, f"#{k}", "Thing"]) for k in range(1, n + 1))
    rec = b"\x83" + enc("label") + enc("x") + enc("thing") + enc([False, "#0", "Thing"]) + enc("more") + b"\xdd" + n.to_bytes(4, "big") + more
    return b"\x91" + rec


@pytest.fixture
def own_server() -> Iterator[ChildProcess]:
    """A server of the test's own (one whose memory it measures)."""
    yield from _run_server()


async def test_a_record_of_many_references_is_charged_to_the_memory_budget(own_server: ChildProcess) -> None:
    """200,000 references in one 2.4 MiB record: each becomes a proxy of some 700 bytes (before the
    fix the server grew by ~140 MiB for one call, with a budget of 32 MiB)."""
    async with attack(own_server) as raw:
        await settled(raw)
        base = own_server.rss()
        payload = _wide_box(200_000)
        i = raw.new_id()
        await raw.send([CALL_TAG, i, "Hub", "put", msgspec.Raw(payload)])
        refused(await raw.answer(i), 9, "memory budget")
        grown = own_server.peak() - base
        assert grown < 64 * MiB, f"one call of {len(payload) >> 20} MiB grew the server by {grown >> 20} MiB"
        st = await settled(raw)
        assert st["proxies"] == 0 and st["held"] == 0 and st["serving"] == 0, st
        # a record of a few thousand references is still taken
        i = raw.new_id()
        await raw.send([CALL_TAG, i, "Hub", "put", msgspec.Raw(_wide_box(5000))])
        f = await raw.answer(i)
        assert f[0] == REPLY_TAG and f[2].count("remote") == 5001, str(f)[:200]


async def test_calls_parked_on_a_promise_that_never_resolves_are_bounded_and_freed(own_server: ChildProcess) -> None:
    """Small calls (under 1 KiB, not counted by size) each carrying 80 references, all waiting for
    the result of a call that never returns: the budget must hold, and cancelling frees them."""
    async with attack(own_server) as raw:
        await settled(raw)
        base = own_server.rss()
        hang = await raw.call("Hub", "hang", [])
        more = [ref(False, f"#{k}") for k in range(1, 81)]
        payload = [box(ref(True, f"^{hang}"), *more)]
        assert len(msgspec.msgpack.encode(payload)) < 1024
        ids: list[int] = []
        for _ in range(6):
            chunk = [raw.new_id() for _ in range(500)]
            ids += chunk
            await raw.send(*[[CALL_TAG, i, "Hub", "put", payload] for i in chunk])
            st = await raw.stats()  # (read what it answered: a peer that does not read is not served)
        grown = own_server.peak() - base
        limited = [f for f in raw.answers.values() if f[2] == 9]
        assert grown < 96 * MiB, f"{st['serving']} parked calls grew the server by {grown >> 20} MiB ({len(limited)} refused)"
        assert st["held"] <= xrpc.Limits().max_buffered, st
        # the call they wait for is cancelled: every one of them fails naming it, and all is freed
        await raw.send([CANCEL_TAG, hang])
        for n, i in enumerate(ids):
            try:
                f = await raw.answer(i)
            except TimeoutError:
                raise AssertionError(f"call {n} of {len(ids)} never answered: {await raw.stats()}") from None
            assert f[0] == ERROR_TAG and f[2] in (5, 9), f
        st = await settled(raw)
        assert st["serving"] == 0 and st["held"] == 0 and st["proxies"] == 0 and st["promises"] <= 1, st


# --------------------------------------------------------------------------- through the public API
async def test_max_objects_inside_records_rolls_back_both_ways(server: ChildProcess) -> None:
    async with xrpc.connect(server.url, limits=xrpc.Limits(max_objects=3)) as conn:
        hub = conn.proxy(Hub)
        p = xrpc.pipeline(hub).make("p")
        # our limit: a record with five of our objects and a promise is refused before it is sent
        with pytest.raises(xrpc.LimitExceeded, match="more than 3 objects"):
            await hub.put(Box("b", p, [ThingImpl(str(i)) for i in range(5)]))
        assert conn.exported_objects == 0
        # a promise inside a record, a nested one in its list: still one round trip, and they work
        assert await hub.put(Box("b", p, [p, ThingImpl("mine")])) == "local:p,local:p,remote"
        assert conn.exported_objects <= 1
        # the server's limit: a reply of MAX_OBJECTS + 1 objects in one record
        before = (await hub.stats())["exported"]
        with pytest.raises(xrpc.LimitExceeded, match=f"more than {MAX_OBJECTS} objects"):
            await hub.many(MAX_OBJECTS)
        assert (await hub.stats())["exported"] == before
        b = await hub.many(MAX_OBJECTS - 2)
        assert len(b.more) == MAX_OBJECTS - 2 and await b.more[-1].name() == str(MAX_OBJECTS - 3)
        del b
        gc.collect()
        assert (await hub.stats())["exported"] == before
        assert conn.remote_refs <= 1
    await alive(server)
