"""A live server under attack: 10,000 bad frames over raw Unix connections, next to a good client.

The attack runs once per module (``fuzz_report``); each test checks one property of its outcome:
the server keeps serving, every bad connection is closed (no hang), the well-behaved client sees
no failure, and nothing unexpected is logged.  Everything random comes from one fixed seed.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
from typing import Any, AsyncIterator, Protocol

import anyio
import pytest

import xrpc
from xrpc._protocol import PROTOCOL_VERSION, Call, Cancel, Credit, End, Error, Goodbye, Hello, Item, Ping, Pong, Release, Reply, Welcome

from _fuzz import Plans, cut_anywhere, goodbyes_in, run_jobs, send_and_read_to_end, shuffled_jobs
from _procs import short_dir
from _timeouts import T
from _wire import HELLO, body_frame, decode_frames, frame, raw

SEED = 0x5EED_F022
CONNECTIONS = 200
FRAMES_PER_CONNECTION = 50
PARALLEL = 8
READ_TIMEOUT = T / 2  # a bad connection must be closed within this (well before the 10 s handshake timeout)
ATTACK_TIMEOUT = 12 * T


@xrpc.interface
class Calc(Protocol):
    async def add(self, a: int, b: int) -> int: ...
    async def echo(self, s: str) -> str: ...
    def count(self, n: int) -> AsyncIterator[int]: ...
    async def total(self, items: AsyncIterator[int]) -> int: ...
    def double(self, items: AsyncIterator[int]) -> AsyncIterator[int]: ...


class CalcImpl:
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def echo(self, s: str) -> str:
        return s

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(min(n, 200)):
            yield i

    async def total(self, items: AsyncIterator[int]) -> int:
        n = 0
        async for x in items:
            n += x
        return n

    async def double(self, items: AsyncIterator[int]) -> AsyncIterator[int]:
        async for x in items:
            yield 2 * x


# (method, flags, a payload builder) for the calls the attacker makes
METHODS: list[tuple[str, int, Any]] = [
    ("add", 0, lambda r: [r.randint(-5, 5), r.randint(-5, 5)]),
    ("echo", 0, lambda r: [r.choice(["", "x", "é€"])]),
    ("count", 4, lambda r: [r.randint(-1, 50)]),
    ("total", 2, lambda r: []),
    ("double", 6, lambda r: []),
]


# --------------------------------------------------------------------------- frames
def call_frame(call_id: int, rng: random.Random) -> bytes:
    if rng.random() < 0.7:
        args: list[Any] = [rng.randint(-1000, 1000), rng.randint(-1000, 1000)]
        return frame(Call(call_id, "Calc", "add", raw(args)))
    text = "".join(rng.choice("abcxyz é€") for _ in range(rng.randint(0, 12)))
    return frame(Call(call_id, "Calc", "echo", raw([text])))


PLAN = Plans(call_frame, mutated_share=0.5)


class MessageMaker:
    """Well-formed messages of random types; ids mostly refer to calls this side really started."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.next_id = 1
        self.issued: list[int] = []

    def call_id(self) -> int:
        rng = self.rng
        if self.issued and rng.random() < 0.85:
            return rng.choice(self.issued)
        return rng.randint(-2, self.next_id + 4)

    def __call__(self) -> Any:
        rng = self.rng
        payload = raw([rng.randint(-5, 5), rng.randint(-5, 5)])
        # frames that are always fatal here (the server makes no calls, the handshake is done) are rare
        kind = rng.choices(
            ["call", "reply", "error", "item", "end", "credit", "cancel", "release", "ping", "pong", "hello", "welcome", "goodbye"],
            [10, 0.2, 0.2, 8, 2, 2, 2, 1, 1, 1, 0.2, 0.2, 0.2],
        )[0]
        if kind == "call":
            if rng.random() < 0.9:
                cid = self.next_id
                self.next_id += 2
                self.issued.append(cid)
            else:
                cid = rng.randint(-2, self.next_id + 4)
            obj = rng.choice(["Calc"] * 8 + ["Nope", ""])
            method, flags, args = rng.choice(METHODS)
            payload = raw(args(rng))
            if rng.random() < 0.1:
                method = rng.choice([method, "x", "__init__"])
                flags = rng.choice([0, 1, 2, 4, 6, 7, 8, -1])
            if rng.random() < 0.1:
                payload = raw(rng.choice([[], ["a", "b"], [1, 2, 3], {"a": 1}, None]))
            deadline = rng.choice([None, None, 0.0, -1.0, 0.5, 1e9, 1e308, float("inf"), float("-inf"), float("nan")])
            return Call(cid, obj, method, payload, flags, deadline)
        if kind == "reply":
            return Reply(rng.randint(-2, 12), payload)
        if kind == "error":
            return Error(rng.randint(-2, 12), rng.randint(0, 12), "E", "m", rng.choice([None, [1], {"a": 1}]))
        if kind == "item":
            n = rng.choice([1, 1, 1, 2, 3, 0, -1])
            items: list[Any] = list(range(max(n, 0)))
            if rng.random() < 0.1:
                items = rng.choice([items + [1], items[:-1], ["x"] * max(n, 0), [[1]]])
            return Item(self.call_id(), n, raw(items))
        if kind == "end":
            return End(self.call_id())
        if kind == "credit":
            return Credit(self.call_id(), rng.choice([-1, 0, 1, 100, 1 << 33]), rng.choice([-1, 0, 1000, 1 << 42]))
        if kind == "cancel":
            return Cancel(self.call_id())
        if kind == "release":
            return Release(rng.choice(["Calc", "x"]), rng.randint(-1, 3))
        if kind == "ping":
            return Ping(rng.randint(0, 1 << 63))
        if kind == "pong":
            return Pong(rng.randint(0, 10))
        if kind == "hello":
            return Hello(PROTOCOL_VERSION, rng.randint(-1, 1 << 30))
        if kind == "welcome":
            return Welcome(PROTOCOL_VERSION, 1 << 20)
        return Goodbye("bye", rng.randint(0, 10))


def plan_hello_then_random_messages(rng: random.Random, n: int) -> tuple[list[bytes], bool]:
    make = MessageMaker(rng)
    return [HELLO, *(frame(make()) for _ in range(n - 1))], False


PLANS = [
    PLAN.plan_mutated_hello,
    plan_hello_then_random_messages,
    plan_hello_then_random_messages,
    PLAN.plan_random_bytes,
    PLAN.plan_random_bodies,
    PLAN.plan_hello_then_random_bodies,
    PLAN.plan_hello_then_mutated_calls,
    PLAN.plan_hello_then_mutated_calls,
    PLAN.plan_huge_prefix,
    PLAN.plan_zero_length,
    PLAN.plan_truncated,
    PLAN.plan_call_before_hello,
]


# --------------------------------------------------------------------------- the attack
@dataclasses.dataclass
class BadOutcome:
    plan: str
    frames: int
    sent_eof: bool
    ended: str = ""  # "eof", "reset", or "timeout"
    goodbye: bool = False


@dataclasses.dataclass
class FuzzReport:
    bad: list[BadOutcome]
    good_calls: int
    good_failures: list[str]
    final_results: list[int]
    leftover_connections: int
    records: list[logging.LogRecord]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _bad_connection(path: str, plan: Any, rng: random.Random) -> BadOutcome:
    frames, closes_by_itself = plan(rng, FRAMES_PER_CONNECTION)
    outcome = BadOutcome(plan.__name__, len(frames), sent_eof=not closes_by_itself)
    chunks = cut_anywhere(b"".join(frames), rng)  # frames also arrive split
    received, outcome.ended = await send_and_read_to_end(path, chunks, eof=not closes_by_itself, timeout=READ_TIMEOUT)
    outcome.goodbye = goodbyes_in(received) > 0
    return outcome


async def _attacker(path: str, rng: random.Random, outcomes: list[BadOutcome]) -> None:
    async def one(plan: Any, r: random.Random) -> None:
        outcomes.append(await _bad_connection(path, plan, r))

    await run_jobs(shuffled_jobs(PLANS, CONNECTIONS, rng), PARALLEL, one)


async def _good_client(url: str, rng: random.Random, done: anyio.Event, report: dict[str, Any]) -> None:
    async with xrpc.connect(url, timeout=T) as conn:
        calc = conn.proxy(Calc)

        async def caller(r: random.Random) -> None:
            while not done.is_set():
                a, b = r.randint(-(10**9), 10**9), r.randint(-(10**9), 10**9)
                try:
                    with anyio.fail_after(T):
                        got = await calc.add(a, b)
                        text = f"{a}:{b}"
                        echoed = await calc.echo(text)
                        n = r.randint(0, 20)
                        counted = [x async for x in calc.count(n)]
                        summed = await calc.total(list(range(n)))
                        doubled = [x async for x in calc.double(list(range(n)))]
                except Exception as exc:  # recorded, asserted on by a test
                    report["failures"].append(f"calls with {a}, {b}: {exc!r}")
                    return
                if got != a + b or echoed != text:
                    report["failures"].append(f"add({a}, {b}) -> {got!r}, echo -> {echoed!r}")
                if counted != list(range(n)) or summed != sum(range(n)) or doubled != [2 * x for x in range(n)]:
                    report["failures"].append(f"streams of {n}: {counted!r} {summed!r} {doubled!r}")
                report["calls"] += 5

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(caller, random.Random(rng.getrandbits(64)))


async def _run_fuzz() -> FuzzReport:
    rng = random.Random(SEED)
    d = short_dir()
    path = f"{d}/f.sock"
    server = xrpc.Server()
    server.export(Calc, CalcImpl())
    outcomes: list[BadOutcome] = []
    good: dict[str, Any] = {"calls": 0, "failures": []}
    try:
        with anyio.fail_after(ATTACK_TIMEOUT):
            async with server.listen(f"unix://{path}") as listener:
                done = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_good_client, listener.url, random.Random(rng.getrandbits(64)), done, good)
                    await _attacker(path, random.Random(rng.getrandbits(64)), outcomes)
                    done.set()
                # the listener still accepts a new, well-behaved connection
                final = []
                async with xrpc.connect(listener.url, timeout=T) as conn:
                    calc = conn.proxy(Calc)
                    for i in range(10):
                        final.append(await calc.add(i, 1000))
                    leftover = len(server.connections)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return FuzzReport(outcomes, good["calls"], good["failures"], final, leftover, [])


@pytest.fixture(scope="module")
def fuzz_report() -> FuzzReport:
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in ("xrpc", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(collect)
        lg.setLevel(logging.INFO)
    try:
        report = anyio.run(_run_fuzz, backend="asyncio")
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(collect)
            lg.setLevel(level)
    report.records = collect.records
    return report


def _describe(records: list[logging.LogRecord]) -> str:
    out = []
    for r in records[:5]:
        text = f"{r.name} {r.levelname}: {r.getMessage()[:200]}"
        if r.exc_info and r.exc_info[1] is not None:
            text += f" [{type(r.exc_info[1]).__name__}: {str(r.exc_info[1])[:200]}]"
        out.append(text)
    return "\n".join(out)


# --------------------------------------------------------------------------- the properties
@pytest.mark.timeout(180)
def test_attack_size(fuzz_report: FuzzReport) -> None:
    assert len(fuzz_report.bad) == CONNECTIONS
    assert sum(o.frames for o in fuzz_report.bad) >= 10_000
    assert {o.plan for o in fuzz_report.bad} == {p.__name__ for p in PLANS}


@pytest.mark.timeout(180)
def test_server_survives_and_accepts_new_connections(fuzz_report: FuzzReport) -> None:
    assert fuzz_report.final_results == [i + 1000 for i in range(10)]
    # every attacker connection is gone from the server's table: only the final client is left
    assert fuzz_report.leftover_connections == 1


@pytest.mark.timeout(180)
def test_every_bad_connection_is_closed_by_the_server(fuzz_report: FuzzReport) -> None:
    hung = [o for o in fuzz_report.bad if o.ended == "timeout"]
    assert hung == []
    assert all(o.ended in ("eof", "reset") for o in fuzz_report.bad)
    # certainly-invalid input is refused without the attacker ending its stream, and the server says
    # why with a GOODBYE (unless the socket was reset under it)
    by_itself = [o for o in fuzz_report.bad if not o.sent_eof]
    assert {o.plan for o in by_itself} == {"plan_huge_prefix", "plan_zero_length", "plan_call_before_hello"}
    assert all(o.goodbye or o.ended == "reset" for o in by_itself), [o for o in by_itself if not o.goodbye]
    assert any(o.goodbye for o in fuzz_report.bad if o.plan == "plan_hello_then_random_bodies")


@pytest.mark.timeout(180)
def test_well_behaved_client_sees_no_failure(fuzz_report: FuzzReport) -> None:
    assert fuzz_report.good_failures == []
    assert fuzz_report.good_calls >= 100  # it really ran alongside the attack


@pytest.mark.timeout(180)
def test_protocol_errors_are_logged_as_warnings(fuzz_report: FuzzReport) -> None:
    warnings = [r for r in fuzz_report.records if r.name == "xrpc" and r.levelno == logging.WARNING]
    assert any("protocol error" in r.getMessage() for r in warnings)


@pytest.mark.timeout(180)
def test_xrpc_logger_logs_no_error(fuzz_report: FuzzReport) -> None:
    errors = [r for r in fuzz_report.records if r.name.startswith("xrpc") and r.levelno >= logging.ERROR]
    assert errors == [], _describe(errors)


@pytest.mark.timeout(180)
def test_no_logger_reports_an_unexpected_exception(fuzz_report: FuzzReport) -> None:
    errors = [r for r in fuzz_report.records if r.levelno >= logging.ERROR]
    assert errors == [], _describe(errors)


# --------------------------------------------------------------------------- targeted cases
async def _exchange(path: str, data: bytes, *, eof: bool) -> tuple[bytes, str]:
    """Send ``data`` on a raw connection and read until the server closes it."""
    received, how = await send_and_read_to_end(path, [data], eof=eof, timeout=READ_TIMEOUT)
    assert how != "timeout", "the server did not close the connection"
    return received, how


async def _check_server_after(url: str) -> None:
    with anyio.fail_after(T):
        async with xrpc.connect(url, timeout=T) as conn:
            assert await conn.proxy(Calc).add(2, 3) == 5


def _serve() -> xrpc.Server:
    server = xrpc.Server()
    server.export(Calc, CalcImpl())
    return server


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [0xFFFFFFFF, (16 << 20) + 1])
async def test_huge_length_prefix_gets_goodbye_at_once(sock_dir: str, size: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    path = f"{sock_dir}/s.sock"
    async with _serve().listen(f"unix://{path}") as listener:
        received, how = await _exchange(path, HELLO + size.to_bytes(4, "big"), eof=False)
        assert goodbyes_in(received) == 1
        assert how == "eof"
        await _check_server_after(listener.url)
    assert any("protocol error" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.timeout(30)
async def test_valid_calls_on_a_raw_connection_are_answered(sock_dir: str) -> None:
    path = f"{sock_dir}/s.sock"
    async with _serve().listen(f"unix://{path}") as listener:
        data = HELLO + frame(Call(1, "Calc", "add", raw([40, 2]))) + frame(Ping(7))
        got: list[Any] = []
        buf = b""
        async with await anyio.connect_unix(path) as stream:
            await stream.send(data)
            with anyio.fail_after(READ_TIMEOUT):
                while [3, 1, 42] not in got:  # until the REPLY to call 1
                    buf += await stream.receive()
                    got = decode_frames(buf)
        welcome = [m[0] for m in got].index(1)
        assert got[welcome][1] == PROTOCOL_VERSION
        assert got.index([3, 1, 42]) > welcome  # the REPLY comes after the WELCOME
        assert [12, 7] in got  # PONG


BAD_UTF8_FRAMES = [
    pytest.param(body_frame(b"\x92\x09\xa1\x80"), id="release-obj"),
    pytest.param(body_frame(b"\x95\x02\x01\xa2\xc3\x28\xa3add\x90"), id="call-obj"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", BAD_UTF8_FRAMES)
async def test_invalid_utf8_frame_is_a_protocol_error(sock_dir: str, bad: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    path = f"{sock_dir}/s.sock"
    async with _serve().listen(f"unix://{path}") as listener:
        received, how = await _exchange(path, HELLO + bad, eof=False)
        await _check_server_after(listener.url)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert goodbyes_in(received) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(frame(Hello(PROTOCOL_VERSION, 1)), id="welcome-too-big"),
        pytest.param(frame(Hello(PROTOCOL_VERSION, 0)) + frame(Ping(1)), id="pong-too-big"),
        pytest.param(frame(Hello(PROTOCOL_VERSION, -5)) + frame(Release("x")), id="negative"),
    ],
)
async def test_hello_with_unusable_max_frame_is_refused_cleanly(
    sock_dir: str, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = f"{sock_dir}/s.sock"
    async with _serve().listen(f"unix://{path}") as listener:
        received, how = await _exchange(path, data, eof=False)
        assert how in ("eof", "reset")
        await _check_server_after(listener.url)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# --------------------------------------------------------------------------- a misbehaving server
def _fake_server(answer: Any) -> Any:
    """A connection handler speaking the protocol through a bare core: WELCOME, then ``answer(call)``
    framed by hand (a frame no well-behaved core sends)."""
    from xrpc._protocol import ProtocolCore

    async def handle(stream: Any) -> None:
        async with stream:
            core = ProtocolCore(client=False)
            while True:
                try:
                    data = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                forged = b""
                for msg, _ in core.receive_data(data):
                    if type(msg) is Hello:
                        core.send_welcome()
                    elif type(msg) is Call:
                        forged += frame(answer(msg))
                out = core.data_to_send() + forged
                if out:
                    await stream.send(out)

    return handle


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "method,frame_type",
    [("add", End), ("add", Credit), ("total", End)],
    ids=["unary-END", "unary-CREDIT", "client-stream-END"],
)
async def test_stream_frames_for_a_call_without_that_stream_fail_the_call(
    sock_dir: str, method: str, frame_type: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = f"{sock_dir}/s.sock"
    answer = (lambda call: End(call.id)) if frame_type is End else (lambda call: Credit(call.id, 1, 100))
    listener = await anyio.create_unix_listener(path)
    outcome: BaseException | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _fake_server(answer))
        async with xrpc.connect(f"unix://{path}", timeout=T) as conn:
            calc = conn.proxy(Calc)
            try:
                with anyio.fail_after(T):  # the call must end, one way or the other
                    await (calc.add(1, 2) if method == "add" else calc.total([1, 2, 3]))
            except Exception as exc:
                outcome = exc
        tg.cancel_scope.cancel()
    await listener.aclose()
    assert isinstance(outcome, xrpc.Error), repr(outcome)  # a protocol failure, not a hang (TimeoutError)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
