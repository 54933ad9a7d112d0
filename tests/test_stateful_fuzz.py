"""A stateful wire fuzzer: valid and hostile frames interleaved on live raw connections.

A real server runs in a child process (so that a crash, a traceback on its stderr, an ERROR in its
log or its RSS are all visible), listening on a Unix socket and on TCP, once on asyncio (xrpc's own
socket drivers) and once on trio (anyio streams).  A Hypothesis state machine
opens raw connections to it and, step by step, sends on them valid frames (HELLO, calls of every
kind, CREDIT, CANCEL, RELEASE, PING, GOODBYE) and hostile ones (unknown or duplicate call ids,
frames for calls that do not exist, wrong argument types, unknown methods and objects, oversized
and truncated frames, random bytes, frames before HELLO, a second HELLO, deep nesting, calls after
GOODBYE ...).  The model keeps, for every raw connection, what the server owes it.

Checked after every step:

* the server process is alive, and has logged nothing at ERROR (nor a traceback);
* on every raw connection the server has not closed, everything owed arrives, in time, and is
  right (each valid call gets its correct answer, each stream its items, each PING its PONG), and
  nothing arrives that was not owed (a PING is sent and its PONG awaited after every step, so a
  tolerated hostile frame is known to have been read and tolerated);
* a connection that sent a fatal frame is closed by the server with one GOODBYE carrying a
  documented code (3, a protocol error) and a reason, as its last frame, never a hang;
* a well-behaved ``xrpc`` client on the same server makes calls and always succeeds.

At the end of each example every raw connection is gone from the server's table, and at the end of
the run the server's RSS has grown by less than ``RSS_BUDGET``.

The seed is random (Hypothesis's database is off, so nothing is written); a failure is shrunk and
printed as the list of steps.  ``XRPC_FUZZ_EXAMPLES`` and ``XRPC_FUZZ_STEPS`` make a longer run.
Raw frames are built with the helpers of ``test_attacks``.  Below the machine: focused tests for
what the fuzzer found.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import shutil
import socket
import time
import types
from typing import Any, AsyncIterator, Iterator, Protocol

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import xrpc
import xrpc.blocking
from xrpc._protocol import PROTOCOL_VERSION, Call, Cancel, Credit, End, ErrorCode, Goodbye, Hello, Item, Ping, Pong, Release, Reply, Welcome
from xrpc._protocol import Error as ErrorFrame
from _fuzz import mutate, nested
from _procs import ChildProcess, errors_in, log_to, serve_until_stdin_closes, short_dir
from _timeouts import T
from _wire import CREDIT_TAG, END_TAG, ERROR_TAG, GOODBYE_TAG, HELLO, ITEM_TAG, PONG_TAG, REPLY_TAG, WELCOME_TAG, body_frame, frame, pop_frames, raw

MiB = 1024 * 1024
RSS_BUDGET = 64 * MiB
SERVER_WINDOW = 8  # the server grants 8 items per client stream: its CREDIT frames are exercised
MAX_RAW = 3  # raw connections open at once in one example
# a longer run: XRPC_FUZZ_EXAMPLES=500 XRPC_FUZZ_STEPS=50 pytest tests/test_stateful_fuzz.py
EXAMPLES = int(os.environ.get("XRPC_FUZZ_EXAMPLES", "40"))
STEPS = int(os.environ.get("XRPC_FUZZ_STEPS", "40"))

DOCUMENTED_GOODBYE_CODES = {0, *range(1, 11)}  # 0: normal close; otherwise an ErrorCode (docs/wire.md)
STREAM_IN, STREAM_OUT, ONEWAY = 2, 4, 1


# --------------------------------------------------------------------------- the service
@xrpc.interface
class Token(Protocol):
    async def value(self) -> int: ...


@xrpc.interface
class Fz(Protocol):
    async def add(self, a: int, b: int) -> int: ...
    async def echo(self, s: str) -> str: ...
    async def take(self, x: object) -> str: ...
    async def spawn(self, n: int) -> Token: ...
    async def wait(self, key: str) -> int: ...
    async def wake(self, key: str) -> int: ...
    @xrpc.oneway
    async def note(self, key: str, n: int) -> None: ...
    async def noted(self, key: str) -> int: ...
    def count(self, n: int) -> AsyncIterator[int]: ...
    async def total(self, items: AsyncIterator[int]) -> int: ...
    def double(self, items: AsyncIterator[int]) -> AsyncIterator[int]: ...
    async def settle(self, n: int, timeout: float) -> int: ...
    async def waiting(self, timeout: float) -> int: ...


class TokenImpl:
    def __init__(self, n: int) -> None:
        self.n = n

    async def value(self) -> int:
        return self.n


class FzImpl:
    def __init__(self, server: xrpc.Server) -> None:
        self.server = server
        self.events: dict[str, anyio.Event] = {}
        self.notes: dict[str, int] = {}
        self.waiters = 0

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def echo(self, s: str) -> str:
        return s

    async def take(self, x: object) -> str:
        return type(x).__name__

    async def spawn(self, n: int) -> TokenImpl:
        return TokenImpl(n)

    async def wait(self, key: str) -> int:
        """Return once ``wake(key)`` is called (from any connection)."""
        self.waiters += 1
        try:
            await self.events.setdefault(key, anyio.Event()).wait()
        finally:
            self.waiters -= 1
        return len(key)

    async def wake(self, key: str) -> int:
        self.events.setdefault(key, anyio.Event()).set()
        return 0

    async def note(self, key: str, n: int) -> None:
        self.notes[key] = self.notes.get(key, 0) + n

    async def noted(self, key: str) -> int:
        return self.notes.get(key, 0)

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def total(self, items: AsyncIterator[int]) -> int:
        t = 0
        async for x in items:
            t += x
        return t

    async def double(self, items: AsyncIterator[int]) -> AsyncIterator[int]:
        async for x in items:
            yield 2 * x

    async def settle(self, n: int, timeout: float) -> int:
        """The number of connections the server holds, once it is ``n`` or ``timeout`` passed."""
        with anyio.move_on_after(timeout):
            while len(self.server.connections) != n:
                await anyio.sleep(0.01)  # polling a count the server keeps, with a deadline
        return len(self.server.connections)

    async def waiting(self, timeout: float) -> int:
        """The number of ``wait`` calls in progress, once it is 0 or ``timeout`` passed."""
        with anyio.move_on_after(timeout):
            while self.waiters:
                await anyio.sleep(0.01)  # polling a count, with a deadline
        return self.waiters


def _server_main(sock: str, log_path: str, limits: str, backend: str) -> None:
    """Entry point of the server child process."""
    log_to(log_path)

    async def main() -> None:
        server = xrpc.Server(limits=xrpc.Limits(**json.loads(limits)))
        server.export(Fz, FzImpl(server))
        async with server.listen(f"unix://{sock}") as unix, server.listen("tcp://127.0.0.1:0") as tcp:
            await serve_until_stdin_closes(unix.url, tcp.url)

    anyio.run(main, backend=backend)


class FuzzServer(ChildProcess):
    """The server child process; its log and stderr are read as they grow."""

    def __init__(self, limits: dict[str, Any], backend: str = "asyncio") -> None:
        super().__init__()
        self._seen = {self.log_path: 0, self.err_path: 0}
        self.start("test_stateful_fuzz", self.path, self.log_path, json.dumps(limits), backend)
        _, self.unix_url, self.tcp_url = self.ready
        self.tcp_port = int(self.tcp_url.rsplit(":", 1)[1])

    def new_trouble(self) -> list[str]:
        """Lines at ERROR or above (or tracebacks) written since the last call."""
        bad = []
        for p in (self.log_path, self.err_path):
            with contextlib.suppress(FileNotFoundError), open(p, "rb") as f:
                f.seek(self._seen[p])
                text = f.read()
                cut = text.rfind(b"\n") + 1  # whole lines only
                self._seen[p] += cut
                in_trouble = False
                for line in text[:cut].decode(errors="replace").splitlines():
                    if line.startswith(("DEBUG", "INFO", "WARNING")):
                        in_trouble = False
                    elif line.startswith(("ERROR", "CRITICAL")) or "Traceback" in line or p == self.err_path:
                        in_trouble = True
                    if in_trouble:
                        bad.append(line)  # with the traceback lines that follow it
        return bad


# --------------------------------------------------------------------------- the model of one raw connection
class ServerFault(AssertionError):
    """The server broke a rule the model checks."""


ANY = object()  # an outcome whose value is not checked
REF = object()  # a REPLY holding a reference (spawn)


@dataclasses.dataclass
class CallM:
    id: int
    kind: str  # "unary", "wait", "count", "total", "double"
    method: str = ""
    accept: list[tuple[str, Any]] = dataclasses.field(default_factory=list)  # ("r", value) / ("e", code)
    done: bool = False  # the terminal frame (REPLY, ERROR, END) arrived
    cancelled: bool = False  # we sent CANCEL: anything for this id may still arrive, or nothing
    # wait
    key: str = ""
    woken: bool = False
    expires: bool = False  # its deadline makes it end with ERROR 7 without a wake (ERROR 3 if NaN)
    nan: bool = False
    # spawn
    spawn_n: int | None = None
    # server stream (count, double): items the server owes us
    n: int = 0
    granted: int = 0  # item credit we gave the server on this stream
    received: list[int] = dataclasses.field(default_factory=list)
    # client stream (total, double): items we send
    sent: list[int] = dataclasses.field(default_factory=list)
    bad: bool = False  # we sent an item the server must refuse (no more items follow it)
    credit: int = 0  # items we may still send, counting only the CREDIT frames we have read
    credited: int = 0  # items the server credited back
    spent: int = 0  # items we sent, refused ones included (the server credits what it consumed)
    end_sent: bool = False

    def owed(self) -> str | None:
        """What the server still owes on this call now (None if nothing is due yet)."""
        if self.done or self.cancelled:
            return None
        if self.kind == "unary":
            return f"the answer to call {self.id} ({self.method})"
        if self.kind == "wait":
            return f"the answer to wait call {self.id}" if (self.woken or self.expires) else None
        if self.kind == "count":
            if len(self.received) < min(self.n, self.granted) or self.granted >= self.n:
                return f"items/END of count stream {self.id} (n={self.n}, granted {self.granted}, got {len(self.received)})"
            return None
        if self.kind == "total":
            return f"the answer to client stream {self.id}" if (self.end_sent or self.bad) else None
        # double: one output per item sent, within the credit we granted
        if len(self.received) < min(len(self.sent), self.granted):
            return f"items of two-way stream {self.id} (sent {len(self.sent)}, granted {self.granted}, got {len(self.received)})"
        if (self.bad or self.end_sent) and self.granted >= len(self.sent):
            return f"the end of two-way stream {self.id}"
        return None


class RawConn:
    """A raw socket to the server and what the model expects on it.

    ``state``: "new" (no HELLO yet), "open", "maybe" (a frame that may or may not be fatal was
    sent), "fatal" (a frame was sent that must make the server close with GOODBYE 3), "loose" (we
    half-closed after bytes of unknown meaning: the server may answer anything legal, then must
    close), "gone" (we sent GOODBYE: the server must close without answering further), "dead".
    """

    def __init__(self, name: str, sock: socket.socket, kind: str, window: int, max_frame: int, note_key: str, count: Any) -> None:
        self.name = name
        self.count = count  # count(what): statistics of the run
        self.sock = sock
        self.kind = kind
        self.window = max(1, window)  # the server uses max(1, window)
        self.hello_window = window
        self.max_frame = max_frame
        self.note_key = note_key
        self.noted = 0
        self.state = "new"
        self.welcome_due = False
        self.pongs: collections.Counter[int] = collections.Counter()
        self.next_id = 1
        self.calls: dict[int, CallM] = {}
        self.refs: dict[str, list[int]] = {}  # oid -> [value, references held]
        self.spawns: dict[int, str] = {}  # spawn call id -> oid
        self.released: set[str] = set()
        self.buf = bytearray()
        self.goodbyes: list[list[Any]] = []
        self.fatal_why = ""
        self.log: list[str] = []  # what was sent, for failure messages

    # ---------------------------------------------------------------- sending
    def send(self, data: bytes, what: str) -> None:
        self.log.append(what)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            if self.state in ("open", "new"):
                raise ServerFault(f"{self.name}: the server hung up while we sent {what}: {self.history()}") from None

    def history(self) -> str:
        return " | ".join(self.log[-12:])

    def take_id(self, gap: int = 0) -> int:
        call_id = self.next_id + 2 * gap
        self.next_id = call_id + 2
        return call_id

    def call_frame(self, method: str, payload: msgspec.Raw, flags: int = 0, deadline: float | None = None, obj: str = "Fz", call_id: int | None = None, meta: dict[str, str] | None = None) -> tuple[int, bytes]:
        if call_id is None:
            call_id = self.take_id()
        return call_id, frame(Call(call_id, obj, method, payload, flags, deadline, meta))

    # ---------------------------------------------------------------- receiving
    def _read(self, deadline: float) -> bytes | None:
        """Bytes from the server; b"" at EOF, None on a reset."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        try:
            return self.sock.recv(1 << 16)
        except socket.timeout:
            raise TimeoutError from None
        except (ConnectionResetError, BrokenPipeError):
            return None

    def _frames(self) -> Iterator[list[Any]]:
        buf = self.buf
        while len(buf) >= 4:
            size = int.from_bytes(buf[:4], "big")
            if size == 0:
                raise ServerFault(f"{self.name}: the server sent an empty frame")
            if size > self.max_frame:
                raise ServerFault(f"{self.name}: the server sent a frame of {size} bytes; we accept {self.max_frame}")
            if len(buf) < 4 + size:
                return
            body = bytes(buf[4 : 4 + size])
            del buf[: 4 + size]
            try:
                msg = msgspec.msgpack.decode(body)
            except msgspec.DecodeError as exc:
                raise ServerFault(f"{self.name}: the server sent an undecodable frame {body[:40]!r}: {exc}") from None
            if not isinstance(msg, list) or not msg or not isinstance(msg[0], int):
                raise ServerFault(f"{self.name}: the server sent a frame that is not a tagged array: {msg!r}")
            yield msg

    def owed(self) -> str | None:
        if self.welcome_due:
            return "WELCOME"
        if self.pongs:
            return f"PONG {sorted(self.pongs)}"
        for c in self.calls.values():
            why = c.owed()
            if why:
                return why
        return None

    def settle(self) -> None:
        """Read until everything owed has arrived (open connections), or until the server has
        closed the connection (the others); check every frame on the way."""
        deadline = time.monotonic() + T
        while True:
            if self.state in ("open", "new", "maybe") and self.owed() is None:
                return
            try:
                data = self._read(deadline)
            except TimeoutError:
                if self.state in ("open", "new", "maybe"):
                    raise ServerFault(f"{self.name}: hang: still waiting for {self.owed()} after {T} s; sent: {self.history()}") from None
                raise ServerFault(f"{self.name}: hang: the server did not close the connection ({self.state}: {self.fatal_why}) within {T} s; sent: {self.history()}") from None
            if not data:
                self._closed(data is None)
                return
            self.buf += data
            for msg in self._frames():
                self.on_frame(msg)

    def _closed(self, reset: bool) -> None:
        how = "reset" if reset else "EOF"
        state = self.state
        self.close()
        self.count(f"closed-{state}-{how}{'-goodbye' if self.goodbyes else ''}")
        if self.buf:
            raise ServerFault(f"{self.name}: the server closed ({how}) in the middle of a frame: {bytes(self.buf[:40])!r}")
        if len(self.goodbyes) > 1:
            raise ServerFault(f"{self.name}: the server sent {len(self.goodbyes)} GOODBYE frames: {self.goodbyes}; sent: {self.history()}")
        if state in ("open", "new"):
            raise ServerFault(f"{self.name}: the server closed a healthy connection ({how}, {self.goodbyes}); sent: {self.history()}")
        if state in ("fatal", "maybe") and not self.goodbyes and not (reset and self.kind == "tcp"):
            # a TCP peer that closes with our bytes unread resets: its GOODBYE may be lost in flight
            raise ServerFault(f"{self.name}: the server closed ({how}) without GOODBYE after {self.fatal_why}; sent: {self.history()}")
        if state == "gone" and self.goodbyes:
            raise ServerFault(f"{self.name}: the server answered our GOODBYE with {self.goodbyes}")

    def on_frame(self, msg: list[Any]) -> None:
        tag = msg[0]
        if self.goodbyes:
            raise ServerFault(f"{self.name}: a frame after GOODBYE: {msg!r}")
        if tag == GOODBYE_TAG:
            self.goodbyes.append(msg)
            reason, code = (msg + ["", 0])[1:3]
            if code not in DOCUMENTED_GOODBYE_CODES or not isinstance(reason, str):
                raise ServerFault(f"{self.name}: GOODBYE with an undocumented code: {msg!r}")
            if self.state in ("open", "new"):
                raise ServerFault(f"{self.name}: the server closed a healthy connection: {msg!r}; sent: {self.history()}")
            if self.state in ("fatal", "maybe"):
                if code != ErrorCode.VALIDATION or not reason:
                    raise ServerFault(f"{self.name}: a protocol error must be a GOODBYE with code 3 and a reason, got {msg!r} after {self.fatal_why}")
                self.state = "fatal"
            return
        if self.state == "loose":
            # after bytes of unknown meaning, anything well formed may come before the close
            if not 1 <= tag <= 12:
                raise ServerFault(f"{self.name}: an unknown frame from the server: {msg!r}")
            return
        if tag == WELCOME_TAG:
            if not self.welcome_due:
                raise ServerFault(f"{self.name}: an unexpected WELCOME {msg!r}")
            self.welcome_due = False
            if msg[1] != PROTOCOL_VERSION or not any(e[0] == "Fz" for e in msg[3]):
                raise ServerFault(f"{self.name}: a wrong WELCOME {msg!r}")
            return
        if tag == PONG_TAG:
            if self.pongs[msg[1]] <= 0:
                raise ServerFault(f"{self.name}: a PONG {msg[1]!r} for no PING of ours (owed {sorted(self.pongs)})")
            self.pongs[msg[1]] -= 1
            if not self.pongs[msg[1]]:
                del self.pongs[msg[1]]
            return
        if tag not in (REPLY_TAG, ERROR_TAG, ITEM_TAG, END_TAG, CREDIT_TAG):
            raise ServerFault(f"{self.name}: an unexpected frame from the server: {msg!r}")
        call_id = msg[1]
        c = self.calls.get(call_id)
        if c is None:
            raise ServerFault(f"{self.name}: {msg!r} is about call {call_id!r}, which we never made (or that was one-way/refused)")
        if c.cancelled and self.state != "open":
            return
        if tag == CREDIT_TAG:
            self._on_credit(c, msg)
            return
        if c.done:
            raise ServerFault(f"{self.name}: {msg!r} after call {call_id} was complete")
        if c.cancelled:
            # a race with our CANCEL: what was on its way may still come, and must be well formed
            if tag == ITEM_TAG and (not isinstance(msg[3], list) or len(msg[3]) != msg[2]):
                raise ServerFault(f"{self.name}: a malformed ITEM {msg!r}")
            if tag != ITEM_TAG:
                c.done = True
            return
        if tag == ITEM_TAG:
            self._on_item(c, msg)
        elif tag == END_TAG:
            self._on_end(c, msg)
        else:
            self._on_answer(c, msg)

    def _on_credit(self, c: CallM, msg: list[Any]) -> None:
        if c.kind not in ("total", "double"):
            raise ServerFault(f"{self.name}: CREDIT {msg!r} for call {c.id}, which sends no stream")
        items, nbytes = msg[2], (msg + [0])[3]
        if items < 0 or nbytes < 0:
            raise ServerFault(f"{self.name}: a negative CREDIT {msg!r}")
        c.credited += items
        if c.credited > c.spent:
            raise ServerFault(f"{self.name}: the server credited {c.credited} items on stream {c.id} but was sent {c.spent}")
        c.credit += items

    def _on_item(self, c: CallM, msg: list[Any]) -> None:
        count, items = msg[2], msg[3]
        if c.kind not in ("count", "double"):
            raise ServerFault(f"{self.name}: ITEM {msg!r} on call {c.id} ({c.method}), which has no reply stream")
        if not isinstance(items, list) or count < 1 or len(items) != count:
            raise ServerFault(f"{self.name}: a malformed ITEM {msg!r}")
        if len(c.received) + count > c.granted:
            raise ServerFault(f"{self.name}: the server sent {len(c.received) + count} items on stream {c.id} with {c.granted} credit")
        start = len(c.received)
        want = list(range(start, start + count)) if c.kind == "count" else [2 * x for x in c.sent[start : start + count]]
        if items != want:
            raise ServerFault(f"{self.name}: stream {c.id} ({c.method}) items {items!r}, expected {want!r}")
        c.received += items

    def _on_end(self, c: CallM, msg: list[Any]) -> None:
        if c.kind == "count":
            if len(c.received) != max(c.n, 0):
                raise ServerFault(f"{self.name}: END of count({c.n}) after {len(c.received)} items")
        elif c.kind == "double":
            if not c.end_sent or c.bad or len(c.received) != len(c.sent):
                raise ServerFault(f"{self.name}: END of two-way stream {c.id} after {len(c.received)} of {len(c.sent)} items (our END sent: {c.end_sent})")
        else:
            raise ServerFault(f"{self.name}: END {msg!r} on call {c.id} ({c.method}), which has no reply stream")
        c.done = True

    def _on_answer(self, c: CallM, msg: list[Any]) -> None:
        tag = msg[0]
        if c.kind in ("count", "double"):
            if tag == REPLY_TAG:
                raise ServerFault(f"{self.name}: REPLY {msg!r} on stream {c.id}")
            # an ERROR ends a stream: a refused item on a two-way stream, after the items before it
            if not (c.kind == "double" and c.bad and msg[2] == ErrorCode.VALIDATION and len(c.received) == len(c.sent)):
                raise ServerFault(f"{self.name}: ERROR {msg!r} on stream {c.id} ({c.method}); sent: {self.history()}")
            c.done = True
            return
        if c.kind == "total":
            want = [("e", ErrorCode.VALIDATION)] if c.bad else [("r", sum(c.sent))]
        elif c.kind == "wait":
            want = [("r", len(c.key))] if c.woken else [("e", ErrorCode.VALIDATION if c.nan else ErrorCode.TIMEOUT)]
            if c.woken and c.expires:
                want.append(("e", ErrorCode.TIMEOUT))
        else:
            want = c.accept
        got: tuple[str, Any] = ("r", msg[2]) if tag == REPLY_TAG else ("e", msg[2])
        ok = False
        for kind, value in want:
            if kind != got[0]:
                continue
            if value is ANY or value == got[1]:
                ok = True
            elif value is REF:
                ref = got[1]
                ok = isinstance(ref, list) and len(ref) == 3 and ref[0] is False and isinstance(ref[1], str) and ref[2] == "Token"
                if ok:
                    assert c.spawn_n is not None
                    entry = self.refs.setdefault(ref[1], [c.spawn_n, 0])
                    entry[1] += 1
                    self.released.discard(ref[1])
                    self.spawns[c.id] = ref[1]
            if ok:
                break
        if not ok:
            raise ServerFault(f"{self.name}: call {c.id} ({c.method}) answered {msg!r}, expected one of {want!r}; sent: {self.history()}")
        c.done = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self.state = "dead"


# --------------------------------------------------------------------------- strategies
ints64 = st.integers(-(2**63), 2**63 - 1)
small_ints = st.integers(-1000, 1000)
texts = st.text(max_size=40)
plain_values = st.recursive(
    st.none() | st.booleans() | ints64 | st.floats(allow_nan=False) | texts | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
DEADLINES_FAST = [None, None, 60.0, math.inf, 1e308, 0.0, -1.0, -math.inf, math.nan]
wrong_args = st.sampled_from(
    [
        raw(["a", 1]),
        raw([1.5, 2]),
        raw([True, 2]),
        raw([None, None]),
        raw([1]),
        raw([]),
        raw(None),
        raw({"a": 1, "b": 2}),
        raw("12"),
        raw([[1], 2]),
        msgspec.Raw(b"\x92\xca\x3f\x80\x00\x00\x01"),  # float32, int
        msgspec.Raw(b"\x92\xc4\x01\x00\x01"),  # bin, int
    ]
)

_keys = itertools.count(1)


def _key(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{next(_keys)}"


# --------------------------------------------------------------------------- the state machine
class WireMachine(RuleBasedStateMachine):
    server: FuzzServer
    neighbour: Any  # a blocking proxy of Fz on a well-behaved xrpc connection
    stats: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.conns: list[RawConn] = []
        self.names = itertools.count()
        self.waits: list[CallM] = []  # wait calls nobody woke yet, on any connection

    # ---------------------------------------------------------------- helpers
    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def _open(self, *states: str) -> list[RawConn]:
        return [c for c in self.conns if c.state in (states or ("open",))]

    def _pick(self, i: int, *states: str) -> RawConn:
        live = self._open(*states)
        return live[i % len(live)]

    def _has(self, *states: str) -> bool:
        return bool(self._open(*states))

    def _may_disrupt(self) -> bool:
        """Rules that end a connection wait until two are open (so that calls build up on the
        others instead of every connection dying young)."""
        return len(self._open("open", "new")) >= 2

    def _connect(self, kind: str, window: int, max_frame: int) -> RawConn:
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(T)
            sock.connect(self.server.path)
        else:
            sock = socket.create_connection(("127.0.0.1", self.server.tcp_port), timeout=T)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = RawConn(f"raw#{next(self.names)}({kind})", sock, kind, window, max_frame, _key("note"), self._count)
        self.conns.append(conn)
        self._count(f"connect-{kind}")
        return conn

    def _hello(self, conn: RawConn) -> bytes:
        conn.state = "open"
        conn.welcome_due = True
        return frame(Hello(PROTOCOL_VERSION, conn.max_frame, [], conn.hello_window))

    def _fatal(self, conn: RawConn, data: bytes, why: str, *, maybe: bool = False) -> None:
        """Send ``data``, after which the server must close the connection with GOODBYE 3 (or,
        ``maybe``, either close so or carry on)."""
        conn.state = "maybe" if maybe else "fatal"
        conn.fatal_why = why
        self._count(f"fatal-{why}")
        conn.send(data, f"[{why}]")

    def _unary(self, conn: RawConn, method: str, args: Any, accept: list[tuple[str, Any]], *, deadline: float | None = None, obj: str = "Fz", gap: int = 0, meta: dict[str, str] | None = None, flags: int = 0) -> CallM:
        payload = args if isinstance(args, msgspec.Raw) else raw(args)
        call_id, data = conn.call_frame(method, payload, flags, deadline, obj, conn.take_id(gap), meta)
        c = CallM(call_id, "unary", method=f"{obj}.{method}", accept=accept)
        conn.calls[call_id] = c
        conn.send(data, f"CALL {call_id} {obj}.{method} flags={flags} deadline={deadline}")
        return c

    # ---------------------------------------------------------------- connections
    @precondition(lambda self: len(self._open("open", "new")) < MAX_RAW)
    @rule(
        kind=st.sampled_from(["unix", "tcp"]),
        window=st.sampled_from([1024, 1024, 3, 1, 0, -5]),
        max_frame=st.sampled_from([1 << 20, 1 << 20, 1024]),
        hello=st.booleans(),
        call_at_once=st.booleans(),
    )
    def connect(self, kind: str, window: int, max_frame: int, hello: bool, call_at_once: bool) -> None:
        conn = self._connect(kind, window, max_frame)
        if hello:
            data = self._hello(conn)
            what = "HELLO"
            if call_at_once:  # a call behind the HELLO, before the WELCOME: held by the gate, then served
                call_id, call = conn.call_frame("add", raw([20, 22]))
                conn.calls[call_id] = CallM(call_id, "unary", "Fz.add", [("r", 42)])
                data += call
                what += f" + CALL {call_id} add"
            conn.send(data, what)

    @precondition(lambda self: self._has("new"))
    @rule(c=st.integers(0, 9))
    def hello(self, c: int) -> None:
        conn = self._pick(c, "new")
        conn.send(self._hello(conn), "HELLO")

    @precondition(lambda self: self._may_disrupt())
    @rule(c=st.integers(0, 9), how=st.sampled_from(["goodbye", "goodbye", "drop", "half-close"]), code=st.sampled_from([0, 0, 3, 99, -1]), calls_after=st.booleans())
    def leave(self, c: int, how: str, code: int, calls_after: bool) -> None:
        """Leave: GOODBYE (before or after HELLO, possibly followed by calls the server must
        ignore), our end of the stream, or an abrupt close (calls may be in flight)."""
        conn = self._pick(c, "open", "new")
        self._count(how)
        if how == "drop":
            conn.close()
            return
        if how == "half-close":
            conn.sock.shutdown(socket.SHUT_WR)
            conn.log.append("SHUT_WR")
        else:
            conn.send(frame(Goodbye("bye", code)), f"GOODBYE {code}")
        conn.state = "gone" if how == "goodbye" else "loose"
        conn.fatal_why = how
        # anything still owed may or may not come: the server stops answering once it reads GOODBYE
        for call in conn.calls.values():
            call.cancelled = True
        conn.welcome_due = False
        conn.pongs.clear()
        if calls_after and how == "goodbye":
            self._count("calls-after-goodbye")
            for _ in range(3):
                _, data = conn.call_frame("add", raw([1, 2]))
                conn.send(data, "CALL after GOODBYE")  # no record: an answer would be a fault

    # ---------------------------------------------------------------- valid calls
    @precondition(lambda self: self._has())
    @rule(c=st.integers(0, 9), a=ints64, b=ints64, deadline=st.sampled_from(DEADLINES_FAST), gap=st.sampled_from([0, 0, 0, 1, 50, 2**61]))
    def add(self, c: int, a: int, b: int, deadline: float | None, gap: int) -> None:
        conn = self._pick(c)
        if conn.next_id + 2 * gap > 2**63:
            gap = 0  # ids go up to 2**64 - 1: keep room for the rest of the example
        total = a + b
        # a sum outside msgpack's integers cannot be encoded: ERROR 10 (docs/wire.md)
        accept: list[tuple[str, Any]] = [("r", total)] if -(2**63) <= total < 2**64 else [("e", ErrorCode.INTERNAL)]
        if deadline is not None and math.isnan(deadline):
            accept = [("e", ErrorCode.VALIDATION)]  # refused: not a time
        elif deadline is not None and deadline <= 0:
            accept = [("e", ErrorCode.TIMEOUT)]  # it has passed when the call arrives
        self._unary(conn, "add", [a, b], accept, deadline=deadline, gap=gap)
        self._count("add")

    @precondition(lambda self: self._has())
    @rule(
        c=st.integers(0, 9),
        s=st.text(max_size=30) | st.text(min_size=1000, max_size=1100),
        big=st.sampled_from([0, 0, 0, 70_000, 300_000]),
        meta=st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
        cuts=st.lists(st.integers(1, 2**20), max_size=4),
    )
    def echo(self, c: int, s: str, big: int, meta: dict[str, str] | None, cuts: list[int]) -> None:
        """A string, sometimes large (a frame over 64 KiB is assembled in a buffer of its own),
        sent in one write or cut into several."""
        conn = self._pick(c)
        if big:
            s = (s or "x") * (big // max(1, len(s.encode())))
        reply_size = len(msgspec.msgpack.encode(Reply(conn.next_id, raw(s))))
        # a reply over the max_frame the peer announced is refused with LimitExceeded (code 9)
        accept = [("r", s)] if reply_size <= conn.max_frame else [("e", ErrorCode.LIMIT)]
        call_id, data = conn.call_frame("echo", raw([s]), 0, None, "Fz", None, meta)
        conn.calls[call_id] = CallM(call_id, "unary", "Fz.echo", accept)
        points = sorted({cut % len(data) for cut in cuts} - {0})
        for a, b in zip([0, *points], [*points, len(data)]):
            conn.send(data[a:b], f"CALL {call_id} echo ({len(s)} chars) bytes {a}:{b}")
        self._count("echo-big" if big else "echo")

    @precondition(lambda self: self._has())
    @rule(c=st.integers(0, 9), value=plain_values)
    def take(self, c: int, value: Any) -> None:
        conn = self._pick(c)
        self._unary(conn, "take", [value], [("r", type(value).__name__)])
        self._count("take")

    @precondition(lambda self: self._has())
    @rule(c=st.integers(0, 9), n=ints64)
    def spawn(self, c: int, n: int) -> None:
        conn = self._pick(c)
        call = self._unary(conn, "spawn", [n], [("r", REF)])
        call.spawn_n = n
        self._count("spawn")

    @precondition(lambda self: self._has())
    @rule(c=st.integers(0, 9), n=small_ints, then_release=st.booleans())
    def spawn_and_pipeline(self, c: int, n: int, then_release: bool) -> None:
        """A call on the result of a call still in flight (promise pipelining), in the same write."""
        conn = self._pick(c)
        spawn_id, data = conn.call_frame("spawn", raw([n]))
        spawn = conn.calls[spawn_id] = CallM(spawn_id, "unary", "Fz.spawn", [("r", REF)], spawn_n=n)
        value_id, more = conn.call_frame("value", raw([]), obj=f"^{spawn_id}")
        conn.calls[value_id] = CallM(value_id, "unary", f"^{spawn_id}.value", [("r", n)])
        conn.send(data + more, f"CALL {spawn_id} spawn + CALL {value_id} ^{spawn_id}.value")
        self._count("spawn-pipelined")
        del spawn

    @precondition(lambda self: any(conn.refs or conn.released for conn in self._open()))
    @rule(c=st.integers(0, 9), i=st.integers(0, 99), pipelined=st.booleans())
    def call_ref(self, c: int, i: int, pipelined: bool) -> None:
        """A call on a reference the server returned (by its id, or pipelined on the spawn call)."""
        conns = [x for x in self._open() if x.refs or x.released]
        conn = conns[c % len(conns)]
        oids = sorted(set(conn.refs) | conn.released)
        oid = oids[i % len(oids)]
        entry = conn.refs.get(oid)
        accept: list[tuple[str, Any]] = [("r", entry[0])] if entry else [("e", ErrorCode.OBJECT_NOT_FOUND)]
        target = oid
        if pipelined:
            spawn_id = next((sid for sid, o in conn.spawns.items() if o == oid), None)
            if spawn_id is not None:
                target = f"^{spawn_id}"
        self._unary(conn, "value", [], accept, obj=target)
        self._count("call-ref-pipelined" if target[0] == "^" else "call-ref")

    @precondition(lambda self: any(conn.refs or conn.released for conn in self._open()))
    @rule(c=st.integers(0, 9), i=st.integers(0, 99), count=st.sampled_from([1, 1, 2, 5]))
    def release(self, c: int, i: int, count: int) -> None:
        """RELEASE a reference we hold, or over-release one (extra references are ignored)."""
        conns = [x for x in self._open() if x.refs or x.released]
        conn = conns[c % len(conns)]
        oids = sorted(set(conn.refs) | conn.released)
        oid = oids[i % len(oids)]
        conn.send(frame(Release(oid, count)), f"RELEASE {oid} {count}")
        entry = conn.refs.get(oid)
        if entry is not None:
            entry[1] -= count
            if entry[1] <= 0:
                del conn.refs[oid]
                conn.released.add(oid)
            self._count("release")
        else:
            self._count("over-release")

    @precondition(lambda self: self._has())
    @rule(c=st.integers(0, 9), deadline=st.sampled_from([None, None, 60.0, 0.05, 0.0, -math.inf, math.nan]))
    def wait(self, c: int, deadline: float | None) -> None:
        """A call that stays in flight until some connection wakes it (or its deadline passes)."""
        conn = self._pick(c)
        key = _key("w")
        call_id, data = conn.call_frame("wait", raw([key]), 0, deadline)
        call = CallM(call_id, "wait", method="Fz.wait", key=key, expires=deadline is not None and not deadline >= 1)
        call.nan = deadline is not None and math.isnan(deadline)
        conn.calls[call_id] = call
        if not call.expires:
            self.waits.append(call)
        conn.send(data, f"CALL {call_id} wait deadline={deadline}")
        self._count("wait")

    @precondition(lambda self: self._has() and any(not w.cancelled and not w.done for w in self.waits))
    @rule(c=st.integers(0, 9), i=st.integers(0, 99))
    def wake(self, c: int, i: int) -> None:
        """Wake a waiting call, from any connection (possibly another one than the waiter's)."""
        conn = self._pick(c)
        waits = [w for w in self.waits if not w.cancelled and not w.done]
        w = waits[i % len(waits)]
        self.waits.remove(w)
        self._unary(conn, "wake", [w.key], [("r", 0)])
        w.woken = True
        self._count("wake")

    @precondition(lambda self: self._has())
    @rule(c=st.integers(0, 9), n=small_ints, check=st.booleans(), deadline=st.sampled_from([None, None, None, 60.0, 0.0, -math.inf, math.nan]))
    def note(self, c: int, n: int, check: bool, deadline: float | None) -> None:
        """A one-way call (nothing comes back), then maybe a call that sees its effect.  With a
        deadline that has passed, or is NaN, it is dropped (docs/wire.md): no effect."""
        conn = self._pick(c)
        _, data = conn.call_frame("note", raw([conn.note_key, n]), ONEWAY, deadline)
        conn.send(data, f"CALL note (one-way) deadline={deadline}")
        before = conn.noted
        if deadline is None or deadline > 0:
            conn.noted += n
        if check:
            # with a deadline the one-way call runs in a task; ``noted`` (which never suspends) runs
            # at once, so it may see the note or not yet (calls may finish in any order).  Later
            # steps see it: the task ran while the step's PING went round.
            self._unary(conn, "noted", [conn.note_key], [("r", conn.noted), ("r", before)] if deadline else [("r", conn.noted)])
        self._count("oneway")

    # ---------------------------------------------------------------- streams
    @precondition(lambda self: self._has())
    @rule(c=st.integers(0, 9), n=st.integers(-2, 40))
    def count(self, c: int, n: int) -> None:
        conn = self._pick(c)
        call_id, data = conn.call_frame("count", raw([n]), STREAM_OUT)
        conn.calls[call_id] = CallM(call_id, "count", method="Fz.count", n=max(n, 0), granted=conn.window)
        conn.send(data, f"CALL {call_id} count({n})")
        self._count("server-stream")

    @precondition(lambda self: self._has())
    @rule(c=st.integers(0, 9), two_way=st.booleans())
    def open_client_stream(self, c: int, two_way: bool) -> None:
        conn = self._pick(c)
        method = "double" if two_way else "total"
        call_id, data = conn.call_frame(method, raw([]), STREAM_IN | (STREAM_OUT if two_way else 0))
        conn.calls[call_id] = CallM(call_id, method, method=f"Fz.{method}", credit=SERVER_WINDOW, granted=conn.window if two_way else 0)
        conn.send(data, f"CALL {call_id} {method}")
        self._count("client-stream")

    def _streams(self, conn: RawConn, *kinds: str, sending: bool = False) -> list[CallM]:
        return [
            s for s in conn.calls.values()
            if s.kind in kinds and not s.done and not s.cancelled and not (sending and (s.end_sent or s.bad))
        ]

    def _any_stream(self, *kinds: str, sending: bool = False) -> bool:
        return any(self._streams(conn, *kinds, sending=sending) for conn in self._open())

    def _pick_stream(self, c: int, i: int, *kinds: str, sending: bool = False) -> tuple[RawConn, CallM]:
        conns = [conn for conn in self._open() if self._streams(conn, *kinds, sending=sending)]
        conn = conns[c % len(conns)]
        streams = self._streams(conn, *kinds, sending=sending)
        return conn, streams[i % len(streams)]

    @precondition(lambda self: self._any_stream("total", "double", sending=True))
    @rule(c=st.integers(0, 9), i=st.integers(0, 99), values=st.lists(small_ints, min_size=1, max_size=6), split=st.booleans())
    def send_items(self, c: int, i: int, values: list[int], split: bool) -> None:
        """Stream items, within the credit we know we hold, as one ITEM frame or one per item."""
        conn, s = self._pick_stream(c, i, "total", "double", sending=True)
        values = values[: s.credit]
        if not values:
            return
        if split:
            data = b"".join(frame(Item(s.id, 1, raw([v]))) for v in values)
        else:
            data = frame(Item(s.id, len(values), raw(values)))
        s.credit -= len(values)
        s.spent += len(values)
        s.sent += values
        conn.send(data, f"ITEM {s.id} x{len(values)}")
        self._count("items")

    @precondition(lambda self: self._any_stream("total", "double", sending=True))
    @rule(c=st.integers(0, 9), i=st.integers(0, 99), bad=st.sampled_from(["type", "count", "not-array", "nested"]))
    def send_bad_item(self, c: int, i: int, bad: str) -> None:
        """An item the stream's decoder refuses: the call ends with ERROR 3, the connection lives."""
        conn, s = self._pick_stream(c, i, "total", "double", sending=True)
        if s.credit < 1:
            return
        payload = {"type": raw(["x"]), "count": raw([1]), "not-array": raw(7), "nested": raw([[1]])}[bad]
        count = 2 if bad == "count" else 1
        if s.credit < count:
            return
        s.credit -= count
        s.spent += count
        s.bad = True
        conn.send(frame(Item(s.id, count, payload)), f"bad ITEM {s.id} ({bad})")
        self._count("bad-item")

    @precondition(lambda self: self._any_stream("total", "double", sending=True))
    @rule(c=st.integers(0, 9), i=st.integers(0, 99))
    def end_stream(self, c: int, i: int) -> None:
        conn, s = self._pick_stream(c, i, "total", "double", sending=True)
        s.end_sent = True
        conn.send(frame(End(s.id)), f"END {s.id}")
        self._count("end")

    @precondition(lambda self: self._any_stream("count", "double"))
    @rule(c=st.integers(0, 9), i=st.integers(0, 99), items=st.integers(0, 20), nbytes=st.sampled_from([0, 0, 100, 1 << 20]))
    def credit(self, c: int, i: int, items: int, nbytes: int) -> None:
        conn, s = self._pick_stream(c, i, "count", "double")
        s.granted += items
        conn.send(frame(Credit(s.id, items, nbytes)), f"CREDIT {s.id} {items} {nbytes}")
        self._count("credit")

    @precondition(lambda self: any(not x.done and not x.cancelled for conn in self._open() for x in conn.calls.values()))
    @rule(c=st.integers(0, 9), i=st.integers(0, 99))
    def cancel(self, c: int, i: int) -> None:
        conns = [conn for conn in self._open() if any(not x.done and not x.cancelled for x in conn.calls.values())]
        conn = conns[c % len(conns)]
        calls = [x for x in conn.calls.values() if not x.done and not x.cancelled]
        call = calls[i % len(calls)]
        call.cancelled = True
        conn.send(frame(Cancel(call.id)), f"CANCEL {call.id} ({call.kind})")
        self._count("cancel")

    @precondition(lambda self: self._has())
    @rule(c=st.integers(0, 9), nonce=st.sampled_from([0, -1, 2**64 - 1, -(2**63), 7]), unsolicited_pong=st.booleans())
    def ping(self, c: int, nonce: int, unsolicited_pong: bool) -> None:
        conn = self._pick(c)
        data = frame(Ping(nonce))
        if unsolicited_pong:
            data = frame(Pong(nonce)) + data  # a PONG nobody asked for is ignored
        conn.pongs[nonce] += 1
        conn.send(data, f"PING {nonce}")
        self._count("ping")

    # ---------------------------------------------------------------- hostile frames the server tolerates
    @precondition(lambda self: self._has())
    @rule(
        c=st.integers(0, 9),
        kind=st.sampled_from(["no-method", "no-object", "bad-pipeline", "wrong-kind", "wrong-args", "oneway-junk", "extra-fields", "nested", "ext", "release-unknown"]),
        args=wrong_args,
        flags=st.sampled_from([0, 2, 4, 6, 8, 1 << 20]),
        depth=st.sampled_from([1, 50, 200]),
        pick=st.integers(0, 6),
    )
    def tolerated(self, c: int, kind: str, args: msgspec.Raw, flags: int, depth: int, pick: int) -> None:
        """A hostile frame the connection survives: an ERROR for that call, or nothing."""
        conn = self._pick(c)
        self._count(f"tolerated-{kind}")
        if kind == "no-method":
            self._unary(conn, "nope", raw([1]), [("e", ErrorCode.METHOD_NOT_FOUND)])
        elif kind == "no-object":
            self._unary(conn, "add", raw([1, 2]), [("e", ErrorCode.OBJECT_NOT_FOUND)], obj="Nope")
        elif kind == "bad-pipeline":
            # a pipelined target that no call of ours returns (unknown, even, future, not a number)
            # (or an earlier call of ours that returned no object)
            target = ["^x", f"^{conn.next_id + 100}", "^2", "^-1", "^", "^" + "9" * 5000, f"^{max(1, conn.next_id - 2)}"][pick]
            earlier = conn.calls.get(max(1, conn.next_id - 2))
            if pick == 6 and (earlier is None or earlier.spawn_n is not None):
                target = "^x"
            self._unary(conn, "value", raw([]), [("e", ErrorCode.OBJECT_NOT_FOUND)], obj=target)
        elif kind == "wrong-kind":
            # a unary method called as a stream (or with unknown flag bits): MethodNotFound
            self._unary(conn, "add", raw([1, 2]), [("e", ErrorCode.METHOD_NOT_FOUND)], flags=flags or 4)
        elif kind == "wrong-args":
            self._unary(conn, "add", args, [("e", ErrorCode.VALIDATION)])
        elif kind == "oneway-junk":
            # one-way calls that fail (unknown method, wrong arguments, wrong kind) answer nothing
            method = ["nope", "add", "note"][pick % 3]
            _, data = conn.call_frame(method, args, ONEWAY | (flags & 6))
            conn.send(data, f"one-way junk {method}")
        elif kind == "extra-fields":
            # "a receiver ignores extra trailing elements" (docs/wire.md)
            call_id = conn.take_id()
            body = msgspec.msgpack.encode([2, call_id, "Fz", "add", [2, 3], 0, None, None, "later", 1])
            conn.calls[call_id] = CallM(call_id, "unary", "Fz.add", [("r", 5)])
            conn.send(body_frame(body), f"CALL {call_id} with extra fields")
        elif kind == "nested":
            value = nested(depth, ["array", "map", "mixed"][pick % 3])
            self._unary(conn, "take", msgspec.Raw(b"\x91" + value), [("r", type(msgspec.msgpack.decode(value)).__name__)])
        elif kind == "ext":
            # an ``object`` slot takes plain data: a MessagePack extension is refused (the timestamp
            # extension is a datetime)
            ext = [b"\xd4\x05\x01", b"\xc7\x03\x7f\x00\x01\x02", b"\xd6\xff\x00\x00\x00\x01"][pick % 3]
            self._unary(conn, "take", msgspec.Raw(b"\x91" + ext), [("r", "datetime")] if pick % 3 == 2 else [("e", ErrorCode.VALIDATION)])
        else:
            conn.send(frame(Release(["#999999", "", "Fz", "x" * 300][pick % 4], [1, 7, 1000, 2**62][flags % 4])), "RELEASE unknown")

    @precondition(lambda self: any(x.done or x.cancelled for conn in self._open() for x in conn.calls.values()))
    @rule(c=st.integers(0, 9), i=st.integers(0, 99), what=st.sampled_from(["item", "end", "credit", "cancel"]))
    def frame_for_finished_call(self, c: int, i: int, what: str) -> None:
        """ITEM, END, CREDIT or CANCEL for a call that is over (answered, ended or cancelled): dropped."""
        conns = [conn for conn in self._open() if any(x.done or x.cancelled for x in conn.calls.values())]
        conn = conns[c % len(conns)]
        # a cancelled call is over on the server as soon as it reads our CANCEL
        over = [x for x in conn.calls.values() if x.done or x.cancelled]
        call = over[i % len(over)]
        data = {
            "item": frame(Item(call.id, 1, raw([1]))),
            "end": frame(End(call.id)),
            "credit": frame(Credit(call.id, 5, 100)),
            "cancel": frame(Cancel(call.id)),
        }[what]
        conn.send(data, f"{what.upper()} for finished call {call.id}")
        self._count(f"finished-{what}")

    @precondition(lambda self: self._has())
    @rule(c=st.integers(0, 9), what=st.sampled_from(["item", "end", "credit", "cancel"]))
    def frame_for_skipped_id(self, c: int, what: str) -> None:
        """Ids may jump; a frame about an id that was skipped (never a call) is dropped."""
        conn = self._pick(c)
        skipped = conn.take_id()  # never used for a call ...
        call_id, data = conn.call_frame("add", raw([1, 1]))  # ... but below this one
        conn.calls[call_id] = CallM(call_id, "unary", "Fz.add", [("r", 2)])
        data += {"item": frame(Item(skipped, 1, raw([1]))), "end": frame(End(skipped)), "credit": frame(Credit(skipped, 1, 0)), "cancel": frame(Cancel(skipped))}[what]
        conn.send(data, f"CALL {call_id} + {what.upper()} for skipped id {skipped}")
        self._count(f"skipped-{what}")

    # ---------------------------------------------------------------- hostile frames that end the connection
    FATAL_OPEN = [
        "duplicate-id", "lower-id", "even-id", "zero-id", "item-unknown", "end-unknown", "credit-unknown",
        "cancel-unknown", "cancel-even", "item-even", "second-hello", "welcome", "reply", "error", "oversized",
        "zero-length", "truncated", "deep-nesting", "bad-utf8", "bad-envelope", "unknown-tag", "not-an-array",
        "release-none",
    ]

    @precondition(lambda self: self._may_disrupt() and self._has())
    @rule(c=st.integers(0, 9), kind=st.sampled_from(FATAL_OPEN), x=st.integers(0, 2**32))
    def fatal_open(self, c: int, kind: str, x: int) -> None:
        """A frame that breaks the protocol on an open connection: GOODBYE 3, then close."""
        conn = self._pick(c)
        last = conn.next_id - 2  # the highest id we used (ids only go up)
        if kind in ("duplicate-id", "lower-id") and last < 1:
            kind = "even-id"
        future = conn.next_id + 2 * (x % 1000)  # an id no call of ours has reached
        add = raw([1, 2])
        if kind == "truncated":
            _, whole = conn.call_frame("add", add)
            self._fatal(conn, whole[: 1 + x % (len(whole) - 1)], "truncated")
            conn.sock.shutdown(socket.SHUT_WR)  # the server sees the end of the stream in the middle of a frame
            return
        data = {
            "duplicate-id": lambda: frame(Call(last, "Fz", "add", add)),
            "lower-id": lambda: frame(Call(max(1, last - 2 * (x % 5 + 1)), "Fz", "add", add)),
            "even-id": lambda: frame(Call(conn.next_id + 1, "Fz", "add", add)),
            "zero-id": lambda: frame(Call([0, -1, -3, -(2**63)][x % 4], "Fz", "add", add)),
            "item-unknown": lambda: frame(Item(future, 1, raw([1]))),
            "end-unknown": lambda: frame(End(future)),
            "credit-unknown": lambda: frame(Credit(future, 1, 0)),
            "cancel-unknown": lambda: frame(Cancel(future)),
            "cancel-even": lambda: frame(Cancel([0, 2, -2, 2**40][x % 4])),
            "item-even": lambda: frame(Item([2, 0, -4][x % 3], 1, raw([1]))),
            "second-hello": lambda: HELLO,
            "welcome": lambda: frame(Welcome(PROTOCOL_VERSION, 1 << 20)),
            "reply": lambda: frame(Reply([1, 2, max(1, last), future][x % 4], raw(1))),
            "error": lambda: frame(ErrorFrame([1, 2, future][x % 3], 1, "E", "m")),
            "oversized": lambda: [0xFFFFFFFF, 0x80000000, (16 << 20) + 1][x % 3].to_bytes(4, "big") + b"\x00" * 8,
            "zero-length": lambda: b"\x00\x00\x00\x00",
            "deep-nesting": lambda: frame(Call(conn.next_id, "Fz", "take", msgspec.Raw(b"\x91" + nested([5000, 100_000][x % 2], ["array", "map", "mixed"][x % 3])))),
            "bad-utf8": lambda: body_frame(b"\x95\x02" + msgspec.msgpack.encode(conn.next_id) + b"\xa2\xc3\x28\xa3add\x90"),
            "bad-envelope": lambda: body_frame(msgspec.msgpack.encode([
                [2, conn.next_id, 17, "add", [1, 2]],  # obj not a string
                [2, conn.next_id, "Fz", "add", [1, 2], "0"],  # flags not an int
                [2, conn.next_id, "Fz", "add", [1, 2], 0, "soon"],  # deadline not a number
                [2, conn.next_id, "Fz", "add", [1, 2], 0, None, {"k": 1}],  # meta values not strings
                [2, conn.next_id, "Fz"],  # fields missing
                [2, 1.0 * conn.next_id, "Fz", "add", [1, 2]],  # a float id
                [7, conn.next_id, "many"],  # CREDIT of a string
            ][x % 7])),
            "unknown-tag": lambda: body_frame(msgspec.msgpack.encode([13 + x % 100, 1])),
            "release-none": lambda: frame(Release(["#1", "#999999", "Fz"][x % 3], [0, -3, -(2**62)][x % 3])),
            "not-an-array": lambda: body_frame(msgspec.msgpack.encode([{"a": 1}, "x", 5, None][x % 4])),
        }[kind]()
        # a deep payload is refused by the envelope decoder: a protocol error (it cannot be told
        # from a broken frame), or the call's ValidationError if the decoder got that far
        self._fatal(conn, data, kind, maybe=kind == "deep-nesting")
        if kind == "deep-nesting":
            call_id = conn.take_id()
            conn.calls[call_id] = CallM(call_id, "unary", "Fz.take", [("e", ErrorCode.VALIDATION)])

    def _live(self, conn: RawConn) -> dict[str, list[CallM]]:
        """The calls in flight on ``conn`` that frames about them can break, by what breaks them."""
        unary = [w for w in conn.calls.values() if w.kind == "wait" and not w.done and not w.cancelled and not w.expires and not w.woken]
        sending = self._streams(conn, "total", "double", sending=True)
        # server streams that are certainly still open: nothing owed means blocked on our credit or input
        receiving = [s for s in self._streams(conn, "count", "double") if s.owed() is None]
        return {
            "item-live-unary": unary,
            "end-live-unary": unary,
            "credit-live-unary": unary,
            "item-huge-count": sending,
            "item-zero-count": sending,
            "second-end": sending,
            "item-after-end": sending,
            "credit-client-stream": [s for s in sending if s.kind == "total"],
            "credit-negative": receiving,
            "credit-overflow": receiving,
        }

    def _any_live(self) -> bool:
        return self._may_disrupt() and any(any(self._live(conn).values()) for conn in self._open())

    @precondition(lambda self: self._any_live())
    @rule(c=st.integers(0, 9), data=st.data(), x=st.integers(0, 2**32))
    def fatal_on_live_call(self, c: int, data: st.DataObject, x: int) -> None:
        """A frame about a call in flight that its kind forbids: ITEM/END/CREDIT on a unary call,
        an ITEM beyond the credit or of no items, a second END, an ITEM after END, CREDIT for a
        stream the server does not send, a negative or overflowing CREDIT: GOODBYE 3, then close."""
        conns = [conn for conn in self._open() if any(self._live(conn).values())]
        conn = conns[c % len(conns)]
        live = self._live(conn)
        kind = data.draw(st.sampled_from(sorted(k for k, calls in live.items() if calls)), label="kind")
        call = live[kind][x % len(live[kind])]
        frames = {
            "item-live-unary": lambda: frame(Item(call.id, 1, raw([1]))),
            "end-live-unary": lambda: frame(End(call.id)),
            "credit-live-unary": lambda: frame(Credit(call.id, 1, 0)),
            "item-huge-count": lambda: frame(Item(call.id, [2**31, SERVER_WINDOW + 1][x % 2], raw([1]))),
            "item-zero-count": lambda: frame(Item(call.id, [0, -1][x % 2], raw([]))),
            # both in one write: the server reads the second before the call can end
            "second-end": lambda: frame(End(call.id)) * 2,
            "item-after-end": lambda: frame(End(call.id)) + frame(Item(call.id, 1, raw([1]))),
            "credit-client-stream": lambda: frame(Credit(call.id, 1, 0)),
            "credit-negative": lambda: frame(Credit(call.id, -1 - x % 3, 0)),
            "credit-overflow": lambda: frame(Credit(call.id, 2**31 + 1, 0)),
        }[kind]()
        if kind in ("second-end", "item-after-end"):
            call.end_sent = True
        self._fatal(conn, frames, kind)

    FATAL_NEW = ["call", "ping", "credit", "release", "welcome", "bad-version", "tiny-max-frame", "oversized", "zero-length", "garbage-hello"]

    @precondition(lambda self: self._has("new"))
    @rule(c=st.integers(0, 9), kind=st.sampled_from(FATAL_NEW), x=st.integers(0, 2**32))
    def fatal_before_hello(self, c: int, kind: str, x: int) -> None:
        """Anything but HELLO (or GOODBYE) first, or a HELLO the server cannot accept."""
        conn = self._pick(c, "new")
        data = {
            "call": lambda: frame(Call(1, "Fz", "add", raw([1, 2]))),
            "ping": lambda: frame(Ping(x)),
            "credit": lambda: frame(Credit(1, 1, 0)),
            "release": lambda: frame(Release("#1")),
            "welcome": lambda: frame(Welcome(PROTOCOL_VERSION, 1 << 20)),
            "bad-version": lambda: frame(Hello([0, 2, -1, 2**40][x % 4], 1 << 20)),
            "tiny-max-frame": lambda: frame(Hello(PROTOCOL_VERSION, [0, 1, 1023, -5][x % 4])),
            "oversized": lambda: (0xFFFFFFFF - x % 1000).to_bytes(4, "big"),
            "zero-length": lambda: b"\x00\x00\x00\x00",
            "garbage-hello": lambda: body_frame(msgspec.msgpack.encode([0, "1", 1 << 20])),
        }[kind]()
        self._fatal(conn, data, f"before-hello:{kind}")

    @precondition(lambda self: self._may_disrupt())
    @rule(c=st.integers(0, 9), kind=st.sampled_from(["random-bytes", "random-body", "mutated-call", "mutated-hello"]), seed=st.binary(min_size=1, max_size=64), n=st.integers(0, 2**32))
    def garbage(self, c: int, kind: str, seed: bytes, n: int) -> None:
        """Bytes of unknown meaning, then our end of the stream: the server may answer anything
        legal, then must close (with a documented GOODBYE, or cleanly), never hang."""
        conn = self._pick(c, "open", "new")
        rng = random.Random(seed + n.to_bytes(5, "big"))
        if kind == "random-bytes":
            data = seed
        elif kind == "random-body":
            data = body_frame(seed)
        elif kind == "mutated-call":
            data = mutate(frame(Call(conn.next_id, "Fz", "add", raw([n, 1]))), rng)
            conn.next_id += 2
        else:
            data = mutate(self._hello(conn) if conn.state == "new" else HELLO, rng)
        conn.state = "loose"
        conn.fatal_why = kind
        for call in conn.calls.values():
            call.cancelled = True  # whatever is owed may come or not
        conn.welcome_due = False
        conn.pongs.clear()
        conn.send(data, f"[{kind}] {data[:24]!r}")
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        self._count(f"garbage-{kind}")

    # ---------------------------------------------------------------- the checks after every step
    @invariant()
    def everything_owed_arrives(self) -> None:
        for conn in list(self.conns):
            if conn.state == "dead":
                continue
            if conn.state in ("open", "maybe"):
                # a PING behind everything we sent: its PONG proves the server read (and tolerated) it all
                nonce = next(_keys)
                conn.pongs[nonce] += 1
                conn.send(frame(Ping(nonce)), f"PING {nonce} (sync)")
            conn.settle()
            if conn.state == "maybe":
                conn.state = "open"  # it survived: the call's ERROR came instead
        self.conns = [conn for conn in self.conns if conn.state != "dead"]

    @invariant()
    def server_is_healthy(self) -> None:
        assert self.server.alive(), f"the server process died (exit code {self.server.proc.returncode})"
        trouble = self.server.new_trouble()
        if trouble:
            sent = "\n".join(f"{conn.name} ({conn.state}): {conn.history()}" for conn in self.conns)
            raise ServerFault("the server logged:\n" + "\n".join(trouble[:60]) + "\nwhat the raw connections sent last:\n" + sent)

    @invariant()
    def neighbour_is_served(self) -> None:
        a, b = next(_keys), -7
        assert self.neighbour.add(a, b) == a + b  # the proxy's timeout bounds the wait
        self._count("neighbour")

    def teardown(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns = []
        # every raw connection is gone from the server's table: only the neighbour is left
        held = self.neighbour.settle(1, T)
        assert held == 1, f"the server still holds {held - 1} raw connections after they closed"
        # and no call of theirs is left running (a wait nobody woke is cancelled with its connection)
        left = self.neighbour.waiting(T)
        assert left == 0, f"{left} calls of closed connections are still running on the server"
        assert self.neighbour.echo("still here") == "still here"
        assert [x for x in self.neighbour.count(5)] == list(range(5))


# --------------------------------------------------------------------------- the test
@pytest.fixture(scope="module", params=["asyncio", "trio"])
def fuzz_server(request: pytest.FixtureRequest) -> Iterator[FuzzServer]:
    """The server under attack, on asyncio (its own socket drivers) and on trio (anyio streams)."""
    # a long handshake timeout: a raw connection may stay before HELLO for a whole example
    server = FuzzServer({"window": SERVER_WINDOW, "handshake_timeout": 120.0}, request.param)
    yield server
    assert server.alive(), f"the server process died (exit code {server.proc.returncode})"
    lines = server.stop()
    errors = errors_in(lines)
    assert errors == [], "\n".join(errors[:10])
    assert server.proc.returncode == 0, lines[-20:]


@pytest.mark.timeout(600)  # a failure is shrunk, which takes a while
def test_stateful_wire_fuzz(fuzz_server: FuzzServer) -> None:
    stats: dict[str, int] = {}
    with xrpc.blocking.connect(fuzz_server.unix_url, timeout=T) as conn:
        neighbour = conn.proxy(Fz, timeout=T)
        assert neighbour.add(1, 2) == 3
        rss_before, peak_before = fuzz_server.rss(), fuzz_server.peak()

        class Machine(WireMachine):
            pass

        Machine.server = fuzz_server
        Machine.neighbour = neighbour
        Machine.stats = stats
        start = time.monotonic()
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                report_multiple_bugs=False,
            ),
        )
        elapsed = time.monotonic() - start
        rss_after, peak_after = fuzz_server.rss(), fuzz_server.peak()
    print(
        f"\nFUZZ {stats.get('neighbour', 0)} steps in {elapsed:.1f} s; server RSS {rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB, "
        f"peak {peak_before / MiB:.1f} -> {peak_after / MiB:.1f} MiB\n" + ", ".join(f"{k}={v}" for k, v in sorted(stats.items()))
    )
    assert rss_after - rss_before < RSS_BUDGET
    assert peak_after - rss_before < RSS_BUDGET
    # the run really did all of it (by kind, not by rule: Hypothesis leaves some rules out of some runs)
    def total(*prefixes: str) -> int:
        return sum(v for k, v in stats.items() if k.startswith(prefixes))

    assert stats.get("neighbour", 0) >= EXAMPLES * STEPS // 3
    assert stats.get("connect-unix", 0) > 0 and stats.get("connect-tcp", 0) > 0
    assert total("add", "echo", "take", "spawn", "call-ref", "wait", "oneway") >= EXAMPLES
    assert total("server-stream", "client-stream") >= 10
    assert total("tolerated-", "finished-", "skipped-", "bad-item", "over-release") >= 10
    assert total("fatal-") >= 10
    assert total("garbage-", "goodbye", "half-close", "drop") >= 5


# --------------------------------------------------------------------------- focused cases the fuzzer found
def _raw_exchange(path: str, data: bytes) -> tuple[list[list[Any]], str]:
    """Send ``data`` on a new raw Unix connection; every frame until the server closes, and how."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(T)
        sock.connect(path)
        sock.sendall(data)
        received = bytearray()
        deadline = time.monotonic() + T
        how = ""
        while not how:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(1 << 16)
            except socket.timeout:
                how = "timeout"
            except ConnectionResetError:
                how = "reset"
            else:
                how = "" if chunk else "eof"
                received += chunk
    frames, pos = [], 0
    while len(received) - pos >= 4:
        size = int.from_bytes(received[pos : pos + 4], "big")
        frames.append(msgspec.msgpack.decode(received[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    assert pos == len(received), "the server's output ends in the middle of a frame"
    return frames, how


@pytest.fixture
def unix_server() -> Iterator[FuzzServer]:
    server = FuzzServer({})
    yield server
    assert server.alive()
    lines = server.stop()
    assert errors_in(lines) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 2**40])
def test_unsupported_protocol_version_gets_exactly_one_goodbye(unix_server: FuzzServer, version: int) -> None:
    """A HELLO of another protocol version is a protocol error like any other: one GOODBYE with
    code 3 (VALIDATION) saying which versions, as the last frame, then the server closes."""
    frames, how = _raw_exchange(unix_server.path, frame(Hello(version, 1 << 20)) + frame(Ping(1)))
    assert how == "eof"
    assert [f[0] for f in frames] == [GOODBYE_TAG], frames
    (_, reason, code), = frames
    assert code == ErrorCode.VALIDATION
    assert f"unsupported protocol version {version}" in reason and f"speaks {PROTOCOL_VERSION}" in reason
    # the server is unaffected
    with xrpc.blocking.connect(unix_server.unix_url, timeout=T) as conn:
        assert conn.proxy(Fz).add(2, 3) == 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "obj, method",
    [("x" * 3000, "add"), ("Fz", "y" * 3000), ("^" + "9" * 3000, "value")],
    ids=["long-object", "long-method", "long-pipeline-target"],
)
def test_an_error_larger_than_the_peers_max_frame_is_still_answered(unix_server: FuzzServer, obj: str, method: str) -> None:
    """The ERROR for a call to an unknown object or method repeats its name: to a peer that accepts
    only small frames (max_frame 1024, the least allowed) it must still go, shortened, and the
    connection carry on.  (It raised out of the reader instead: a traceback in the log, the call
    never answered.)"""
    data = frame(Hello(PROTOCOL_VERSION, 1024)) + frame(Call(1, obj, method, raw([1, 2]))) + frame(Call(3, "Fz", "add", raw([2, 3])))
    frames, how = _raw_exchange_until(unix_server.path, data, lambda got: [3, 3, 5] in got)
    errors = [f for f in frames if f[0] == ERROR_TAG]
    assert len(errors) == 1 and errors[0][1] == 1, frames
    assert errors[0][2] in (ErrorCode.OBJECT_NOT_FOUND, ErrorCode.METHOD_NOT_FOUND)
    assert len(frame(ErrorFrame(*errors[0][1:]))) <= 4 + 1024
    assert [3, 3, 5] in frames  # the connection carries on
    assert unix_server.new_trouble() == []


def _raw_exchange_until(path: str, data: bytes, done: Any) -> tuple[list[list[Any]], str]:
    """Send ``data`` on a new raw Unix connection; the frames received until ``done(frames)``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(data)
        received = bytearray()
        frames: list[list[Any]] = []
        deadline = time.monotonic() + T
        while not done(frames):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(1 << 16)
            except socket.timeout:
                return frames, "timeout"
            if not chunk:
                return frames, "eof"
            received += chunk
            frames += pop_frames(received)
    return frames, "open"


def _big_interface() -> Any:
    """An interface whose WELCOME is larger than 1024 bytes (the smallest max_frame allowed)."""

    def method(i: int) -> Any:
        async def m(self, first_argument: int, second_argument: int) -> int: ...  # type: ignore[no-untyped-def]

        m.__name__ = m.__qualname__ = f"method_number_{i}"
        return m

    wide = types.new_class("Wide", (Protocol,), exec_body=lambda ns: ns.update({"__module__": __name__, **{f"method_number_{i}": method(i) for i in range(40)}}))
    return xrpc.interface(wide)


@pytest.mark.timeout(30)
async def test_a_welcome_larger_than_the_clients_max_frame_is_refused_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    wide = _big_interface()

    class Impl:
        pass

    for i in range(40):
        setattr(Impl, f"method_number_{i}", lambda self, first_argument, second_argument: 1)
    server = xrpc.Server()
    server.export(wide, Impl())
    d = short_dir()
    try:
        with anyio.fail_after(2 * T):
            async with server.listen(f"unix://{d}/s.sock") as listener:
                with pytest.raises(xrpc.Error) as refused:
                    async with xrpc.connect(listener.url, limits=xrpc.Limits(max_frame=1024)):
                        pass
                async with xrpc.connect(listener.url) as conn:  # the server is unaffected
                    assert await conn.proxy(wide).method_number_3(1, 2) == 1
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "max_frame" in str(refused.value) or "1024" in str(refused.value), refused.value
