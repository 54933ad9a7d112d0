"""The sans-IO protocol core: framing, handshake, call ids, streams and credit, errors.

No sockets and no event loop here: two ``ProtocolCore`` objects talk by moving bytes between them.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xrpc._errors import LocalProtocolError, RemoteProtocolError
from xrpc._protocol._core import DEFAULT_HANDSHAKE_MAX_FRAME, MIN_MAX_FRAME, FrameBuffers
from xrpc._protocol import (
    DEFAULT_CONN_WINDOW,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    DEFAULT_WINDOW_BYTES,
    PROTOCOL_VERSION,
    Call,
    CallFlags,
    CallRecord,
    Cancel,
    Credit,
    End,
    Error,
    ErrorCode,
    ExportInfo,
    Goodbye,
    Hello,
    Item,
    Message,
    MethodSig,
    Ping,
    Pong,
    ProtocolCore,
    Release,
    Reply,
    State,
    Welcome,
)
from _timeouts import T
from _wire import HELLO, body_frame, frame, raw  # frames encoded independently of the core

PROTOCOL_DIR = pathlib.Path(__file__).resolve().parent.parent / "xrpc" / "_protocol"

# Deterministic Hypothesis runs that leave nothing behind in the working tree.
FIXED = settings(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers
def pair(**kwargs: Any) -> tuple[ProtocolCore, ProtocolCore]:
    """A client core and a server core (``client_*``/``server_*`` keywords go to one side)."""
    ckw = {k[len("client_"):]: v for k, v in kwargs.items() if k.startswith("client_")}
    skw = {k[len("server_"):]: v for k, v in kwargs.items() if k.startswith("server_")}
    return ProtocolCore(client=True, **ckw), ProtocolCore(client=False, **skw)


def transfer(a: ProtocolCore, b: ProtocolCore, *forged: Any) -> list[tuple[Message, CallRecord | None]]:
    """Move everything ``a`` has encoded into ``b``, then the ``forged`` messages framed by hand (what
    a misbehaving peer would send next); return the events ``b`` reports."""
    return b.receive_data(a.data_to_send() + b"".join(frame(m) for m in forged))


def open_pair(**kwargs: Any) -> tuple[ProtocolCore, ProtocolCore]:
    """A client and a server core that completed the handshake."""
    c, s = pair(**kwargs)
    c.send_hello()
    transfer(c, s)
    s.send_welcome()
    transfer(s, c)
    assert c.state == State.OPEN and s.state == State.OPEN
    return c, s


def item(call_id: int, *values: Any) -> Item:
    """An ITEM frame carrying ``values`` (a batch of ``len(values)`` stream items)."""
    return Item(call_id, len(values), raw(list(values)))


def split_frames(data: bytes) -> list[Any]:
    """Decode a byte string of frames (checking the length prefixes) into messages."""
    out = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 4, "a partial length prefix"
        size = int.from_bytes(data[pos : pos + 4], "big")
        assert size > 0 and pos + 4 + size <= len(data), "a frame whose prefix does not match its body"
        out.append(msgspec.msgpack.decode(data[pos + 4 : pos + 4 + size], type=Message))
        pos += 4 + size
    return out


def describe(events: list[tuple[Any, CallRecord | None]]) -> list[tuple[str, tuple[Any, ...], Any]]:
    """Events as plain, comparable data (Raw payloads by their bytes, records by id)."""
    out = []
    for msg, rec in events:
        fields = tuple(
            bytes(getattr(msg, f)) if isinstance(getattr(msg, f), msgspec.Raw) else getattr(msg, f)
            for f in msg.__struct_fields__
        )
        out.append((type(msg).__name__, fields, None if rec is None else rec.id))
    return out


def same_message(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    for f in a.__struct_fields__:
        x, y = getattr(a, f), getattr(b, f)
        if isinstance(x, msgspec.Raw) or isinstance(y, msgspec.Raw):
            if not (isinstance(x, msgspec.Raw) and isinstance(y, msgspec.Raw) and bytes(x) == bytes(y)):
                return False
        elif x != y:
            return False
    return True


# --------------------------------------------------------------------------- handshake
def test_handshake_exchanges_limits_windows_and_exports() -> None:
    c_exports = [ExportInfo("cb", "Callback", "aa" * 32)]
    s_exports = [ExportInfo("calc", "Calc", "bb" * 32), ExportInfo("log", "Log", "cc" * 32)]
    c, s = pair(
        client_max_frame=5000, client_window=8, client_window_bytes=4096, client_exports=c_exports,
        server_max_frame=2000, server_window=16, server_window_bytes=8192, server_exports=s_exports,
    )
    assert c.state == State.HANDSHAKE and s.state == State.HANDSHAKE

    c.send_hello()
    wire = c.data_to_send()
    (hello,) = split_frames(wire)
    assert hello == Hello(PROTOCOL_VERSION, 5000, c_exports, 8, 4096, DEFAULT_CONN_WINDOW)
    # array-like and tagged: the first element of the array is the tag 0
    assert msgspec.msgpack.decode(wire[4:])[0] == 0
    assert c.state == State.HANDSHAKE

    events = s.receive_data(wire)
    assert events == [(hello, None)]
    assert s.state == State.HANDSHAKE  # until the runtime sends WELCOME
    assert s.peer_version == PROTOCOL_VERSION
    assert (s.peer_max_frame, s.peer_window, s.peer_window_bytes) == (5000, 8, 4096)
    assert s.peer_exports == c_exports

    s.send_welcome()
    assert s.state == State.OPEN
    events = transfer(s, c)
    assert len(events) == 1
    welcome, rec = events[0]
    assert rec is None
    assert welcome == Welcome(PROTOCOL_VERSION, 2000, s_exports, 16, 8192, DEFAULT_CONN_WINDOW)
    assert c.state == State.OPEN
    assert (c.peer_max_frame, c.peer_window, c.peer_window_bytes) == (2000, 16, 8192)
    assert c.peer_exports == s_exports
    assert c.data_to_send() == b"" and s.data_to_send() == b""


def test_defaults_before_the_handshake() -> None:
    c = ProtocolCore(client=True)
    assert c.max_frame == DEFAULT_MAX_FRAME
    assert c.window == DEFAULT_WINDOW and c.window_bytes == DEFAULT_WINDOW_BYTES
    assert c.peer_max_frame == DEFAULT_MAX_FRAME
    with pytest.raises(ValueError):
        ProtocolCore(client=True, window=0)


def test_handshake_misuse_is_local_error() -> None:
    c, s = pair()
    with pytest.raises(LocalProtocolError):
        s.send_hello()  # only the client sends HELLO
    with pytest.raises(LocalProtocolError):
        s.send_welcome()  # no HELLO yet
    with pytest.raises(LocalProtocolError):
        c.send_welcome()
    with pytest.raises(LocalProtocolError):
        c.send_call("o", "m", raw([]))  # before HELLO
    assert c.data_to_send() == b"" and s.data_to_send() == b""


def test_sending_hello_twice_is_local_error() -> None:
    c = ProtocolCore(client=True)
    c.send_hello()
    with pytest.raises(LocalProtocolError):
        c.send_hello()


def test_client_may_pipeline_calls_behind_hello() -> None:
    c, s = pair()
    c.send_hello()
    rec = c.send_call("calc", "add", raw([1, 2]))
    assert rec.id == 1
    events = transfer(c, s)
    assert [type(m) for m, _ in events] == [Hello, Call]
    assert events[1][1] is not None and events[1][1].id == 1
    s.send_welcome()
    s.send_reply(1, raw(3))
    events = transfer(s, c)
    assert [type(m) for m, _ in events] == [Welcome, Reply]
    assert events[1][1] is rec
    assert c.outgoing == {} and s.incoming == {}


def test_server_refuses_hello_twice() -> None:
    c, s = pair()
    c.send_hello()
    data = c.data_to_send()
    s.receive_data(data)
    with pytest.raises(RemoteProtocolError):
        s.receive_data(data)
    assert s.state == State.ERROR


def test_hello_or_welcome_after_the_handshake_is_refused() -> None:
    c, s = open_pair()
    with pytest.raises(RemoteProtocolError, match="HELLO"):
        transfer(c, s, Hello(PROTOCOL_VERSION, 1 << 20))
    c, s = open_pair()
    with pytest.raises(RemoteProtocolError, match="WELCOME"):
        transfer(s, c, Welcome(PROTOCOL_VERSION, 1 << 20))


@pytest.mark.parametrize(
    "msg",
    [
        Call(1, "o", "m", raw([])),
        Reply(2, raw(None)),
        Error(2, ErrorCode.REMOTE, "E", "m"),
        item(1, 1),
        End(1),
        Credit(1, 1),
        Cancel(1),
        Release("o"),
        Ping(1),
        Pong(1),
        Welcome(PROTOCOL_VERSION, 1 << 20),
    ],
    ids=lambda m: type(m).__name__,
)
def test_server_requires_hello_first(msg: Any) -> None:
    s = ProtocolCore(client=False)
    with pytest.raises(RemoteProtocolError):
        s.receive_data(frame(msg))
    assert s.state == State.ERROR
    with pytest.raises(RemoteProtocolError):
        s.receive_data(HELLO)  # ERROR is final


def test_goodbye_before_hello_closes() -> None:
    s = ProtocolCore(client=False)
    events = s.receive_data(frame(Goodbye("go away", 0)))
    assert events == [(Goodbye("go away", 0), None)]
    assert s.state == State.CLOSED and s.close_reason == "go away"


def test_client_refuses_hello() -> None:
    c = ProtocolCore(client=True)
    c.send_hello()
    with pytest.raises(RemoteProtocolError):
        c.receive_data(HELLO)
    assert c.state == State.ERROR


def test_protocol_version_mismatch_is_refused_with_goodbye() -> None:
    s = ProtocolCore(client=False)
    with pytest.raises(RemoteProtocolError, match="version"):
        s.receive_data(frame(Hello(PROTOCOL_VERSION + 1, 1 << 20)))
    assert s.state == State.ERROR
    assert s.peer_version == 0
    (bye,) = split_frames(s.data_to_send())
    assert type(bye) is Goodbye
    assert str(PROTOCOL_VERSION + 1) in bye.reason
    with pytest.raises(LocalProtocolError):
        s.send_welcome()


def test_protocol_version_mismatch_says_goodbye_once() -> None:
    # the runtime answers every protocol error with send_goodbye(reason, VALIDATION), from ERROR
    # reopened: after a version mismatch that must not add a second GOODBYE to the one that says why
    s = ProtocolCore(client=False)
    with pytest.raises(RemoteProtocolError, match="version"):
        s.receive_data(frame(Hello(PROTOCOL_VERSION + 1, 1 << 20)))
    s.state = State.OPEN
    s.send_goodbye(str(PROTOCOL_VERSION + 1), ErrorCode.VALIDATION)
    (bye,) = split_frames(s.data_to_send())
    assert bye == Goodbye(f"unsupported protocol version {PROTOCOL_VERSION + 1} (this side speaks {PROTOCOL_VERSION})", ErrorCode.VALIDATION)
    assert s.state == State.CLOSED


def test_an_error_over_the_peers_max_frame_is_shortened() -> None:
    # an ERROR that repeats a long name the peer sent (no object "xxx...") must still fit the
    # smallest max_frame a peer may announce, instead of raising in the middle of the reader
    c = ProtocolCore(client=True, max_frame=MIN_MAX_FRAME)
    s = ProtocolCore(client=False)
    c.send_hello()
    s.receive_data(c.data_to_send())
    s.send_welcome()
    c.receive_data(s.data_to_send())
    rec = c.send_call("x" * 3000, "add", raw([1, 2]))
    ((call, srec),) = s.receive_data(c.data_to_send())
    s.send_error(rec.id, ErrorCode.OBJECT_NOT_FOUND, "ObjectNotFound", f"no object is exported as {call.obj!r}", ["y" * 3000])
    data = s.data_to_send()
    assert len(data) <= 4 + MIN_MAX_FRAME
    ((err, done),) = c.receive_data(data)
    assert type(err) is Error and err.id == rec.id and err.code == ErrorCode.OBJECT_NOT_FOUND
    assert err.message.startswith("no object is exported as 'xxx")
    assert done is rec and s.incoming == {}


def test_client_refuses_welcome_with_other_version() -> None:
    c = ProtocolCore(client=True)
    c.send_hello()
    with pytest.raises(RemoteProtocolError):
        c.receive_data(frame(Welcome(PROTOCOL_VERSION + 1, 1 << 20)))


def test_signatures_travel_as_typed_values() -> None:
    sig = MethodSig("client_stream", ("label", "chunks", "level"), (2,), 1)
    c, s = pair(client_exports=[ExportInfo("up", "Sink", "ab" * 8, {"upload": sig})])
    c.send_hello()
    data = c.data_to_send()
    assert msgspec.msgpack.decode(data[4:])[3] == [["up", "Sink", "ab" * 8, {"upload": ["client_stream", ["label", "chunks", "level"], [2], 1]}]]
    s.receive_data(data)
    assert s.peer_exports[0].methods == {"upload": sig}


@pytest.mark.parametrize(
    "bad, why",
    [
        ("unary:a,b?", "Expected `array`, got `str`"),
        (["unary", ["a", "a"]], "parameter names must be non-empty and distinct"),
        (["unary", ["a", "b"], [0, 2]], "optional parameter indexes must be ascending and in range"),
        (["client_stream", ["a", "xs"], [1], 1], "the stream parameter index must be in range and not optional"),
    ],
)
def test_a_malformed_signature_is_a_protocol_error(bad: Any, why: str) -> None:
    """On either side of the handshake: the error names the frame and the export."""
    exports = [["a", "A", "0" * 16, {}], ["b", "B", "1" * 16, {"m": ["unary", []], "n": bad}]]
    s = ProtocolCore(client=False)
    with pytest.raises(RemoteProtocolError) as info:
        s.receive_data(body_frame(msgspec.msgpack.encode([0, PROTOCOL_VERSION, 1 << 20, exports])))
    assert str(info.value).startswith("undecodable HELLO: a method signature of export 1 is malformed: " + why)
    assert s.state == State.ERROR and s.peer_exports == []
    c = ProtocolCore(client=True)
    c.send_hello()
    with pytest.raises(RemoteProtocolError) as info:
        c.receive_data(body_frame(msgspec.msgpack.encode([1, PROTOCOL_VERSION, 1 << 20, exports])))
    assert str(info.value).startswith("undecodable WELCOME: a method signature of export 1 is malformed: " + why)
    assert c.state == State.ERROR


# --------------------------------------------------------------------------- calls and ids
def test_call_reply_round_trip() -> None:
    c, s = open_pair()
    rec = c.send_call("calc", "add", raw([1, 2]), deadline=2.5)
    assert rec.id == 1 and rec.flags == 0
    assert c.outgoing == {1: rec}
    (call, srec), = transfer(c, s)
    assert call == Call(1, "calc", "add", call.payload, 0, 2.5)
    assert bytes(call.payload) == msgspec.msgpack.encode([1, 2])
    assert srec is not None and srec.id == 1 and s.incoming == {1: srec}

    s.send_reply(1, raw(3))
    (reply, crec), = transfer(s, c)
    assert type(reply) is Reply and reply.id == 1
    assert msgspec.msgpack.decode(reply.payload) == 3
    assert crec is rec
    assert c.outgoing == {} and s.incoming == {}


def test_error_answer_round_trip() -> None:
    c, s = open_pair()
    rec = c.send_call("calc", "div", raw([1, 0]))
    transfer(c, s)
    s.send_error(rec.id, ErrorCode.DECLARED, "ZeroDivisionError", "division by zero", ["x", 1])
    (err, crec), = transfer(s, c)
    assert err == Error(rec.id, ErrorCode.DECLARED, "ZeroDivisionError", "division by zero", ["x", 1])
    assert crec is rec and c.outgoing == {}


def test_payload_may_be_any_encodable_value() -> None:
    c, s = open_pair()
    c.send_call("calc", "add", [1, {"k": "v"}])
    (call, _), = transfer(c, s)
    assert isinstance(call.payload, msgspec.Raw)
    assert bytes(call.payload) == msgspec.msgpack.encode([1, {"k": "v"}])


def test_call_ids_have_parity_and_are_never_reused() -> None:
    c, s = open_pair()
    client_ids, server_ids = [], []
    for i in range(20):
        r1 = c.send_call("o", "m", raw(i))
        r2 = s.send_call("o", "m", raw(i))
        client_ids.append(r1.id)
        server_ids.append(r2.id)
        for m, rec in transfer(c, s):
            s.send_reply(rec.id, raw(None))  # answer at once: the id is then free, but never reused
        for m, rec in transfer(s, c):
            if type(m) is Call:
                c.send_reply(rec.id, raw(None))
            else:
                assert type(m) is Reply and rec is r1
        for m, rec in transfer(c, s):
            assert type(m) is Reply and rec is r2
        for m, rec in transfer(s, c):  # nothing left
            raise AssertionError(m)
    assert client_ids == list(range(1, 41, 2))
    assert server_ids == list(range(2, 42, 2))
    assert c.outgoing == {} and s.outgoing == {} and c.incoming == {} and s.incoming == {}


def test_oneway_call_is_not_tracked() -> None:
    c, s = open_pair()
    rec = c.send_call("o", "fire", raw([]), CallFlags.ONEWAY)
    assert rec.id == 1 and c.outgoing == {}
    (call, srec), = transfer(c, s)
    assert call.flags == CallFlags.ONEWAY and srec is None and s.incoming == {}
    assert c.send_call("o", "m", raw([])).id == 3  # the id is still consumed


def test_coalescing_many_frames_leave_as_one_chunk() -> None:
    c, s = open_pair()
    for i in range(5):
        c.send_call("o", "m", raw(i))
    assert c.has_data_to_send()
    data = c.data_to_send()
    assert not c.has_data_to_send() and c.data_to_send() == b""
    assert [m.id for m in split_frames(data)] == [1, 3, 5, 7, 9]
    assert [rec.id for _, rec in s.receive_data(data)] == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("bad_id", [2, 0, -1, -2])
def test_call_id_with_the_wrong_parity_is_refused(bad_id: int) -> None:
    c, s = open_pair()
    with pytest.raises(RemoteProtocolError, match="CALL"):
        transfer(c, s, Call(bad_id, "o", "m", raw([])))
    assert s.state == State.ERROR


def test_server_call_with_odd_id_is_refused_by_client() -> None:
    c, s = open_pair()
    with pytest.raises(RemoteProtocolError):
        transfer(s, c, Call(3, "o", "m", raw([])))


@pytest.mark.parametrize("ids", [[3, 1], [3, 3], [1, 5, 5], [5, 3]])
def test_call_ids_must_increase(ids: list[int]) -> None:
    c, s = open_pair()
    assert len(transfer(c, s, *[Call(i, "o", "m", raw([])) for i in ids[:-1]])) == len(ids) - 1
    with pytest.raises(RemoteProtocolError):
        transfer(c, s, Call(ids[-1], "o", "m", raw([])))


def test_call_ids_may_skip() -> None:
    c, s = open_pair()
    assert [rec.id for _, rec in transfer(c, s, Call(1, "o", "m", raw([])), Call(101, "o", "m", raw([])))] == [1, 101]
    assert set(s.incoming) == {1, 101}


@pytest.mark.parametrize(
    "msg",
    [Reply(5, raw(None)), Reply(2, raw(None)), Error(7, 1, "E", ""), Error(4, 1, "E", "")],
    ids=["reply-unissued", "reply-wrong-parity", "error-unissued", "error-wrong-parity"],
)
def test_answer_to_a_call_never_made_is_refused(msg: Any) -> None:
    c, s = open_pair()
    c.send_call("o", "m", raw([]))  # id 1 only
    transfer(c, s)
    with pytest.raises(RemoteProtocolError, match="never made"):
        transfer(s, c, msg)
    assert c.state == State.ERROR


@pytest.mark.parametrize("side,bad_id", [("client", -1), ("client", -3), ("server", 0), ("server", -2)])
def test_answer_with_a_nonpositive_id_is_refused(side: str, bad_id: int) -> None:
    c, s = open_pair()
    sender, receiver = (s, c) if side == "client" else (c, s)
    with pytest.raises(RemoteProtocolError):
        transfer(sender, receiver, Reply(bad_id, raw(None)))


def test_cancel_with_a_nonpositive_id_is_refused() -> None:
    c, s = open_pair()
    with pytest.raises(RemoteProtocolError):
        transfer(c, s, Cancel(-1))


def test_reply_for_a_cancelled_call_is_dropped() -> None:
    c, s = open_pair()
    rec = c.send_call("o", "m", raw([]))
    transfer(c, s)
    s.send_reply(rec.id, raw(1))  # the reply crosses the CANCEL on the wire
    c.send_cancel(rec.id)
    assert c.outgoing == {}
    assert transfer(s, c) == []  # dropped
    assert c.state == State.OPEN
    assert transfer(c, s) == []  # CANCEL of a call already answered: dropped too
    assert s.state == State.OPEN
    # and an ERROR crossing a CANCEL as well
    rec = c.send_call("o", "m", raw([]))
    transfer(c, s)
    s.send_error(rec.id, ErrorCode.REMOTE, "E", "late")
    c.send_cancel(rec.id)
    assert transfer(s, c) == []
    assert transfer(c, s) == []
    # the connection still works
    rec = c.send_call("o", "m", raw([]))
    transfer(c, s)
    s.send_reply(rec.id, raw(2))
    assert [(type(m), r) for m, r in transfer(s, c)] == [(Reply, rec)]


def test_cancel_reaches_the_callee() -> None:
    c, s = open_pair()
    rec = c.send_call("o", "m", raw([]))
    c.send_cancel(rec.id)
    events = transfer(c, s)
    assert [type(m) for m, _ in events] == [Call, Cancel]
    assert events[0][1] is events[1][1]
    assert s.incoming == {}
    with pytest.raises(LocalProtocolError):
        s.send_reply(rec.id, raw(1))  # the call is gone
    c.send_cancel(rec.id)  # cancelling twice sends nothing
    assert c.data_to_send() == b""


@pytest.mark.parametrize("call_id", [1, 5, 2])
def test_cancel_for_a_call_the_peer_never_started_is_refused(call_id: int) -> None:
    c, s = open_pair()
    if call_id == 5:
        c.send_call("o", "m", raw([]))  # 1 exists, 5 does not
        transfer(c, s)
    with pytest.raises(RemoteProtocolError, match="CANCEL"):
        transfer(c, s, Cancel(call_id))


def test_cancel_for_a_completed_call_is_dropped() -> None:
    c, s = open_pair()
    rec = c.send_call("o", "m", raw([]))
    transfer(c, s)
    s.send_reply(rec.id, raw(None))
    transfer(s, c)
    assert transfer(c, s, Cancel(rec.id)) == []
    assert s.state == State.OPEN


def test_duplicate_reply_is_dropped() -> None:
    c, s = open_pair()
    rec = c.send_call("o", "m", raw([]))
    transfer(c, s)
    s.send_reply(rec.id, raw(1))
    events = transfer(s, c, Reply(rec.id, raw(2)))
    assert [(m.id, bytes(m.payload)) for m, _ in events] == [(1, msgspec.msgpack.encode(1))]
    assert c.state == State.OPEN


# --------------------------------------------------------------------------- framing
def _scripted_client_bytes() -> bytes:
    """A realistic byte stream from a client: HELLO, calls, a client stream, PING, CANCEL, GOODBYE."""
    c = ProtocolCore(client=True)
    c.send_hello()
    c.send_call("calc", "add", raw([1, 2]))
    r = c.send_call("calc", "upload", raw(["x" * 300]), CallFlags.STREAM_IN)
    for i in range(3):
        c.send_items(r.id, [raw({"i": i, "blob": b"\x00\x01" * i})])
    c.send_end(r.id)
    c.send_ping(42)
    c.send_call("calc", "fire", raw([]), CallFlags.ONEWAY)
    r2 = c.send_call("calc", "watch", raw([]), CallFlags.STREAM_OUT, deadline=1.0)
    c.send_credit(r2.id, 4, 1000)
    c.send_cancel(r2.id)
    c.send_release("obj", 2)
    data = bytes(c.data_to_send()) + frame(Pong(9))  # a PONG nobody asked for
    c.send_goodbye("done", 0)
    return data + c.data_to_send()


SCRIPT = _scripted_client_bytes()


def _feed(chunks: list[bytes]) -> tuple[list[Any], bytes, str]:
    s = ProtocolCore(client=False)
    events: list[Any] = []
    for chunk in chunks:
        events.extend(s.receive_data(chunk))  # no WELCOME: the client pipelines behind its HELLO
    # described only now, after all the feeding: payloads must stay valid as the buffer moves on
    return describe(events), s.data_to_send(), s.state


WHOLE = _feed([SCRIPT])


def test_scripted_stream_events() -> None:
    events, out, state = WHOLE
    assert [e[0] for e in events] == [
        "Hello", "Call", "Call", "Item", "Item", "Item", "End", "Call", "Call", "Credit", "Cancel", "Release",
        "Pong", "Goodbye",
    ]
    assert [e[2] for e in events] == [None, 1, 3, 3, 3, 3, 3, None, 7, 7, 7, None, None, None]
    assert state == State.CLOSED
    assert split_frames(out) == [Pong(42)]


def test_one_byte_at_a_time_gives_the_same_events() -> None:
    assert _feed([SCRIPT[i : i + 1] for i in range(len(SCRIPT))]) == WHOLE


@FIXED
@given(st.lists(st.integers(min_value=0, max_value=len(SCRIPT)), max_size=40))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(SCRIPT)]
    chunks = [SCRIPT[a:b] for a, b in zip(points, points[1:]) if b > a]  # b"" would mean EOF
    assert _feed(chunks) == WHOLE


@FIXED
@given(st.lists(st.integers(min_value=0, max_value=len(SCRIPT)), max_size=40))
def test_any_chunking_with_bytearray_and_memoryview_chunks(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(SCRIPT)]
    chunks: list[Any] = []
    for n, (a, b) in enumerate(zip(points, points[1:])):
        if b > a:
            piece = SCRIPT[a:b]
            chunks.append((piece, bytearray(piece), memoryview(bytearray(piece)))[n % 3])
    assert _feed(chunks) == WHOLE


def test_trailing_partial_frame_is_kept_until_completed() -> None:
    c, s = open_pair()
    c.send_call("o", "a", raw([1]))
    c.send_call("o", "b", raw(["y" * 100]))
    data = c.data_to_send()
    first_len = 4 + int.from_bytes(data[:4], "big")
    cut = first_len + 10  # the first frame and 10 bytes of the second
    events = s.receive_data(data[:cut])
    assert [m.method for m, _ in events] == ["a"]
    assert s.receive_data(data[cut:-1]) == []
    events = s.receive_data(data[-1:])
    assert [m.method for m, _ in events] == ["b"]
    assert msgspec.msgpack.decode(events[0][0].payload) == ["y" * 100]
    assert s.receive_data(b"") == []  # a clean EOF after whole frames is not an error
    assert s.state == State.OPEN


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_partial_length_prefix_is_kept(keep: int) -> None:
    c, s = open_pair()
    c.send_ping(5)
    data = c.data_to_send()
    assert s.receive_data(data[:keep]) == []
    assert s.receive_data(data[keep:]) == []  # PING is answered, not reported
    assert split_frames(s.data_to_send()) == [Pong(5)]


@pytest.mark.parametrize("size", [101, 1 << 20, 0xFFFFFFFF])
def test_frame_size_limit_is_checked_from_the_prefix(size: int) -> None:
    s = ProtocolCore(client=False, max_frame=100)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        s.receive_data(size.to_bytes(4, "big"))  # the body never arrives
    assert s.state == State.ERROR
    with pytest.raises(RemoteProtocolError):
        s.receive_data(b"\x00" * 8)


def test_frame_size_limit_split_prefix() -> None:
    s = ProtocolCore(client=False, max_frame=100)
    assert s.receive_data(b"\xff\xff") == []
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        s.receive_data(b"\xff\xff")


def test_frame_of_exactly_max_frame_is_accepted() -> None:
    limit = 200
    s = ProtocolCore(client=False, max_frame=limit)
    s.receive_data(HELLO)
    s.send_welcome()
    base = len(msgspec.msgpack.encode(Call(1, "o", "", raw([]))))
    name = "m" * (limit - base - 1)  # a str8 header is one byte longer than the empty str's
    body = msgspec.msgpack.encode(Call(1, "o", name, raw([])))
    assert len(body) == limit
    (call, _), = s.receive_data(body_frame(body))
    assert call.method == name
    body = msgspec.msgpack.encode(Call(3, "o", name + "m", raw([])))
    assert len(body) == limit + 1
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        s.receive_data(body_frame(body)[:4])


def test_frames_before_hello_are_held_to_the_handshake_limit() -> None:
    """Before HELLO (and so before any requirement is checked) a server takes frames of at most
    ``handshake_max_frame`` bytes: a peer not yet admitted cannot make it buffer ``max_frame``."""
    limit = DEFAULT_HANDSHAKE_MAX_FRAME
    assert limit == 1 << 20
    s = ProtocolCore(client=False)
    assert s.handshake_max_frame == limit and s.max_frame == DEFAULT_MAX_FRAME
    assert s.receive_data(limit.to_bytes(4, "big")) == []  # exactly the limit: waits for the body
    s = ProtocolCore(client=False)
    with pytest.raises(RemoteProtocolError, match=f"before HELLO exceeds the handshake limit of {limit} bytes"):
        s.receive_data((limit + 1).to_bytes(4, "big"))
    assert s.state == State.ERROR
    # configurable, and never above max_frame
    s = ProtocolCore(client=False, handshake_max_frame=2000)
    with pytest.raises(RemoteProtocolError, match="handshake limit of 2000 bytes"):
        s.receive_data((2001).to_bytes(4, "big"))
    assert ProtocolCore(client=False, max_frame=5000, handshake_max_frame=1 << 20).handshake_max_frame == 5000


def test_max_frame_applies_from_hello_on_even_within_one_read() -> None:
    c, s = pair()
    c.send_hello()
    big = "b" * (3 << 20)
    c.send_call("o", "m", raw([big]))  # pipelined behind HELLO, before WELCOME
    data = c.data_to_send()
    events = s.receive_data(data)
    assert [type(m) for m, _ in events] == [Hello, Call]
    assert msgspec.msgpack.decode(events[1][0].payload) == [big]
    # the same, with the large frame still arriving: it gets a buffer of its own (which the
    # runtime counts against its budget, behind the on_connect gate too)
    c, s = pair()
    c.send_hello()
    c.send_call("o", "m", raw([big]))
    data = bytes(c.data_to_send())
    assert [type(m) for m, _ in s.receive_data(data[: 1 << 20])] == [Hello]
    hello_size = 4 + int.from_bytes(data[:4], "big")
    assert s.state == State.HANDSHAKE and s._big is not None and s._big_size == len(data) - hello_size
    rest = s.receive_data(data[1 << 20 :])
    assert [type(m) for m, _ in rest] == [Call]


def test_a_hello_with_a_large_export_list_fits_the_handshake_limit() -> None:
    """A client with 500 exports of 20 methods each (10,000 signatures) sends a HELLO well under
    the handshake limit."""
    methods = {f"method_number_{i}": MethodSig("unary", ("int", "str", "bytes", "list"), (2,)) for i in range(20)}
    exports = [ExportInfo(f"service.export_{i}", f"pkg.module.Interface{i}", "f" * 32, methods) for i in range(500)]
    c, s = pair(client_exports=exports)
    c.send_hello()
    data = c.data_to_send()
    assert len(data) < DEFAULT_HANDSHAKE_MAX_FRAME // 2, len(data)
    (hello, _), = s.receive_data(data)
    assert len(hello.exports) == 500


def test_the_client_has_no_handshake_limit() -> None:
    """The accepting side may call the client before WELCOME (from on_connect): a client takes
    frames up to its max_frame at once."""
    c, s = pair()
    c.send_hello()
    transfer(c, s)
    s.send_call("o", "m", raw(["c" * (3 << 20)]))
    (call, _), = transfer(s, c)
    assert type(call) is Call and c.state == State.HANDSHAKE


def test_zero_length_frame_is_refused() -> None:
    c, s = open_pair()
    with pytest.raises(RemoteProtocolError, match="empty"):
        s.receive_data(b"\x00\x00\x00\x00")
    assert s.state == State.ERROR


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never used in msgpack
        b"\xc1\xc1\xc1\xc1",
        b"\x92\x0b",  # truncated array
        msgspec.msgpack.encode({"not": "a message"}),
        msgspec.msgpack.encode([99, 1]),  # unknown tag
        msgspec.msgpack.encode([11]),  # PING without its nonce
        msgspec.msgpack.encode([11, "nonce"]),  # wrong type
        msgspec.msgpack.encode([2, 1, "o"]),  # CALL without method and payload
        msgspec.msgpack.encode(Ping(1)) + b"\x00",  # trailing bytes inside the frame
        msgspec.msgpack.encode("hello"),
        # an ERROR whose args nest far deeper than any decoder recursion
        b"\x96\x04\x01\x01\xa1t\xa1m" + b"\x91" * 200_000 + b"\xc0",
    ],
)
def test_undecodable_body_is_refused(body: bytes) -> None:
    c, s = open_pair()
    c.send_call("o", "m", raw([]))  # so that id 1 exists for the ERROR case
    transfer(c, s)
    for side in (s, c):
        with pytest.raises(RemoteProtocolError, match="undecodable"):
            side.receive_data(body_frame(body))
        assert side.state == State.ERROR
        with pytest.raises(RemoteProtocolError):
            side.receive_data(frame(Ping(1)))


@pytest.mark.parametrize(
    "body",
    [
        b"\x92\x09\xa1\x80",  # RELEASE whose obj is the invalid UTF-8 byte 0x80
        b"\x92\x0a\xa2\xc3\x28",  # GOODBYE whose reason is invalid UTF-8
    ],
)
def test_invalid_utf8_is_a_remote_protocol_error(body: bytes) -> None:
    c, s = open_pair()
    try:
        s.receive_data(body_frame(body))
    except RemoteProtocolError:
        pass
    assert s.state == State.ERROR


@pytest.mark.parametrize("keep", [1, 3, 4, 5, 20])
def test_truncated_frame_then_eof_is_refused(keep: int) -> None:
    s = ProtocolCore(client=False)
    data = frame(Hello(PROTOCOL_VERSION, 1 << 20, [ExportInfo("a", "b", "c")]))
    assert len(data) > keep
    assert s.receive_data(data[:keep]) == []
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        s.receive_data(b"")
    assert s.state == State.ERROR


def test_eof_with_nothing_buffered_is_not_an_error() -> None:
    s = ProtocolCore(client=False)
    assert s.receive_data(b"") == []
    assert s.state == State.HANDSHAKE


@FIXED
@given(st.binary(min_size=1, max_size=300))
def test_garbage_only_ever_raises_remote_protocol_error(garbage: bytes) -> None:
    for prefix in (b"", HELLO):
        s = ProtocolCore(client=False)
        try:
            s.receive_data(prefix + garbage)
            s.receive_data(b"")
        except RemoteProtocolError:
            assert s.state == State.ERROR


@FIXED
@given(st.data())
def test_mutated_valid_streams_only_ever_raise_remote_protocol_error(data: st.DataObject) -> None:
    buf = bytearray(SCRIPT)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    s = ProtocolCore(client=False)
    try:
        for msg, _ in s.receive_data(bytes(buf)):
            assert type(msg) in (Hello, Call, Item, End, Credit, Cancel, Release, Pong, Goodbye)
        s.receive_data(b"")
    except RemoteProtocolError:
        assert s.state == State.ERROR


# --------------------------------------------------------------------------- streams and credit
def test_server_stream_credit() -> None:
    c, s = open_pair(client_window=2, client_window_bytes=10_000)
    rec = c.send_call("o", "watch", raw([]), CallFlags.STREAM_OUT)
    assert rec.recv_allowance == 2
    (_, srec), = transfer(c, s)
    assert srec.send_credit == 2 and srec.send_bytes == 10_000
    s.send_items(rec.id, [raw(1)])
    s.send_items(rec.id, [raw(2)])
    with pytest.raises(LocalProtocolError, match="credit"):
        s.send_items(rec.id, [raw(3)])
    events = transfer(s, c)
    assert [(type(m), r) for m, r in events] == [(Item, rec), (Item, rec)]
    assert [msgspec.msgpack.decode(m.payload) for m, _ in events] == [[1], [2]]
    assert rec.recv_allowance == 0

    c.send_credit(rec.id, 1, 100)
    (credit, r), = transfer(c, s)
    assert credit == Credit(rec.id, 1, 100) and r is srec
    assert srec.send_credit == 1
    s.send_items(rec.id, [raw(3)])
    s.send_end(rec.id)
    events = transfer(s, c)
    assert [type(m) for m, _ in events] == [Item, End]
    assert events[1][1] is rec and rec.recv_end
    assert c.outgoing == {} and s.incoming == {}


def test_items_beyond_the_window_are_refused() -> None:
    c, s = open_pair(client_window=2)
    rec = c.send_call("o", "watch", raw([]), CallFlags.STREAM_OUT)
    transfer(c, s)
    with pytest.raises(RemoteProtocolError, match="credit"):
        transfer(s, c, *[item(rec.id, i) for i in range(3)])
    assert c.state == State.ERROR


def test_credit_restores_the_window() -> None:
    c, s = open_pair(server_window=1)
    rec = c.send_call("o", "upload", raw([]), CallFlags.STREAM_IN)
    assert rec.send_credit == 1
    transfer(c, s)
    c.send_items(rec.id, [raw(0)])
    with pytest.raises(LocalProtocolError):
        c.send_items(rec.id, [raw(1)])
    (_, srec), = transfer(c, s)
    # the peer sending beyond the window is refused ...
    s2_data = frame(item(rec.id, 1))
    # ... but after a CREDIT the same frame is fine
    s.send_credit(rec.id, 1, 0)
    transfer(s, c)
    assert rec.send_credit == 1
    (got, r), = s.receive_data(s2_data)
    assert r is srec and msgspec.msgpack.decode(got.payload) == [1]
    c.send_end(rec.id)
    (end, r), = transfer(c, s)
    assert type(end) is End and r is srec and srec.recv_end
    assert s.incoming == {1: srec}  # the callee still owes its answer


def test_byte_window_is_enforced() -> None:
    c, s = open_pair(server_window=100, server_window_bytes=50)
    rec = c.send_call("o", "upload", raw([]), CallFlags.STREAM_IN)
    transfer(c, s)
    c.send_items(rec.id, [raw("x" * 80)])  # one frame may overdraw the byte credit ...
    assert rec.send_bytes < 0
    with pytest.raises(LocalProtocolError, match="credit"):
        c.send_items(rec.id, [raw("x")])  # ... but then the sender must wait
    transfer(c, s)
    with pytest.raises(RemoteProtocolError, match="credit"):
        transfer(c, s, item(rec.id, "x"))


def test_batched_items_use_one_credit_each() -> None:
    c, s = open_pair(client_window=5)
    rec = c.send_call("o", "watch", raw([]), CallFlags.STREAM_OUT)
    (_, srec), = transfer(c, s)
    s.send_items(rec.id, [raw(1), raw(2), raw(3)])
    assert srec.send_credit == 2
    with pytest.raises(LocalProtocolError, match="credit"):
        s.send_items(rec.id, [raw(4), raw(5), raw(6)])  # 3 > the 2 left
    with pytest.raises(LocalProtocolError):
        s.send_items(rec.id, [])  # an empty batch is not an ITEM
    (msg, r), = transfer(s, c)
    assert r is rec and msg.count == 3 and msgspec.msgpack.decode(msg.payload) == [1, 2, 3]
    assert rec.recv_allowance == 2
    with pytest.raises(RemoteProtocolError, match="credit"):
        transfer(s, c, Item(rec.id, 3, raw([4, 5, 6])))  # the peer overdraws by one


@pytest.mark.parametrize("count", [0, -1])
def test_item_with_a_nonpositive_count_is_refused(count: int) -> None:
    c, s = open_pair()
    rec = c.send_call("o", "watch", raw([]), CallFlags.STREAM_OUT)
    transfer(c, s)
    with pytest.raises(RemoteProtocolError):
        transfer(s, c, Item(rec.id, count, raw([])))
    assert rec.recv_allowance == c.window  # nothing was credited back by a negative count


def test_item_on_a_call_without_a_stream_is_refused() -> None:
    c, s = open_pair()
    rec = c.send_call("o", "m", raw([]))
    transfer(c, s)
    with pytest.raises(LocalProtocolError):
        c.send_items(rec.id, [raw(1)])  # no credit: not a client stream
    with pytest.raises(RemoteProtocolError):
        transfer(c, s, item(rec.id, 1))
    c, s = open_pair()
    rec = c.send_call("o", "m", raw([]))
    transfer(c, s)
    with pytest.raises(RemoteProtocolError):
        transfer(s, c, item(rec.id, 1))  # a unary call gets no stream back


def test_stream_frames_for_calls_never_started_are_refused() -> None:
    for msg in (item(1, 1), Credit(1, 1), End(2), item(2, 1), Credit(4, 1)):
        c, s = open_pair()
        with pytest.raises(RemoteProtocolError):
            transfer(c, s, msg)


@pytest.mark.parametrize("items,nbytes", [(-1, 0), (0, -1), (1 << 32, 0), (0, 1 << 41)])
def test_invalid_credit_is_refused(items: int, nbytes: int) -> None:
    c, s = open_pair()
    rec = c.send_call("o", "watch", raw([]), CallFlags.STREAM_OUT)
    transfer(c, s)
    with pytest.raises(RemoteProtocolError, match="CREDIT"):
        transfer(c, s, Credit(rec.id, items, nbytes))


def test_end_twice_on_a_client_stream_is_refused() -> None:
    c, s = open_pair()
    rec = c.send_call("o", "upload", raw([]), CallFlags.STREAM_IN)
    c.send_end(rec.id)
    c.send_end(rec.id)  # locally idempotent: nothing more is sent
    events = transfer(c, s)
    assert [type(m) for m, _ in events] == [Call, End]
    with pytest.raises(RemoteProtocolError, match="second END"):
        transfer(c, s, End(rec.id))


def test_item_after_end_is_refused() -> None:
    c, s = open_pair()
    rec = c.send_call("o", "upload", raw([]), CallFlags.STREAM_IN)
    c.send_items(rec.id, [raw(1)])
    c.send_end(rec.id)
    with pytest.raises(LocalProtocolError, match="ended"):
        c.send_items(rec.id, [raw(2)])
    transfer(c, s)
    with pytest.raises(RemoteProtocolError, match="after END"):
        transfer(c, s, item(rec.id, 2))


def test_end_twice_on_a_server_stream() -> None:
    c, s = open_pair()
    rec = c.send_call("o", "watch", raw([]), CallFlags.STREAM_OUT)
    transfer(c, s)
    s.send_end(rec.id)
    with pytest.raises(LocalProtocolError):
        s.send_end(rec.id)  # the call is complete
    (end, r), = transfer(s, c)
    assert type(end) is End and r is rec and c.outgoing == {}
    assert transfer(s, c, End(rec.id)) == []  # a late duplicate for a completed call is moot
    assert c.state == State.OPEN


@pytest.mark.parametrize(
    "receiver,flags",
    [("client", 0), ("client", CallFlags.STREAM_IN), ("server", 0), ("server", CallFlags.STREAM_OUT)],
    ids=["client-unary", "client-client-stream", "server-unary", "server-server-stream"],
)
def test_end_without_a_stream_in_that_direction_is_refused(receiver: str, flags: int) -> None:
    c, s = open_pair()
    rec = c.send_call("o", "m", raw([]), flags)
    transfer(c, s)
    sender, target = (s, c) if receiver == "client" else (c, s)
    with pytest.raises(RemoteProtocolError):
        transfer(sender, target, End(rec.id))


@pytest.mark.parametrize(
    "receiver,flags",
    [("client", 0), ("client", CallFlags.STREAM_OUT), ("server", 0), ("server", CallFlags.STREAM_IN)],
    ids=["client-unary", "client-server-stream", "server-unary", "server-client-stream"],
)
def test_credit_without_a_stream_to_send_is_refused(receiver: str, flags: int) -> None:
    c, s = open_pair()
    rec = c.send_call("o", "m", raw([]), flags)
    transfer(c, s)
    sender, target = (s, c) if receiver == "client" else (c, s)
    with pytest.raises(RemoteProtocolError):
        transfer(sender, target, Credit(rec.id, 1, 100))


def test_credit_for_a_completed_stream_is_dropped() -> None:
    c, s = open_pair()
    rec = c.send_call("o", "watch", raw([]), CallFlags.STREAM_OUT)
    transfer(c, s)
    s.send_end(rec.id)
    c.send_credit(rec.id, 5, 5)  # crosses the END
    transfer(s, c)
    assert transfer(c, s) == []
    assert s.state == State.OPEN


# --------------------------------------------------------------------------- goodbye, ping
def test_goodbye_closes_and_later_frames_are_ignored() -> None:
    c, s = open_pair()
    c.send_call("o", "m", raw([]))
    c.send_goodbye("bye", 0)
    assert c.state == State.CLOSED
    c.send_goodbye("again", 3)  # once only
    events = transfer(c, s, Call(3, "o", "m", raw([])), Ping(1))  # after GOODBYE, in the same chunk
    assert [type(m) for m, _ in events] == [Call, Goodbye]
    assert events[1][0] == Goodbye("bye", 0)
    assert s.state == State.CLOSED and s.close_reason == "bye" and s.close_code == 0
    assert s.receive_data(frame(Call(5, "o", "m", raw([]))) + frame(Ping(2))) == []
    assert s.data_to_send() == b""  # no PONG after GOODBYE
    assert c.close_reason == "bye"


def test_local_sends_after_goodbye() -> None:
    c, s = open_pair()
    rec = c.send_call("o", "m", raw([]))
    transfer(c, s)
    s.send_goodbye("shutting down", ErrorCode.CANCELLED)
    data = s.data_to_send()
    assert split_frames(data) == [Goodbye("shutting down", ErrorCode.CANCELLED)]
    with pytest.raises(LocalProtocolError):
        s.send_call("o", "m", raw([]))
    s.send_reply(rec.id, raw(1))  # the answer is no longer sent ...
    s.send_ping(1)
    s.send_release("x")
    assert s.data_to_send() == b""  # ... nor anything else
    events = c.receive_data(data)
    assert events == [(Goodbye("shutting down", ErrorCode.CANCELLED), None)]
    assert c.state == State.CLOSED and c.close_code == ErrorCode.CANCELLED


def test_ping_is_answered_by_pong() -> None:
    c, s = open_pair()
    for side, peer in ((c, s), (s, c)):
        side.send_ping(1234)
        assert transfer(side, peer) == []  # handled inside the core
        assert transfer(peer, side) == [(Pong(1234), None)]


def test_release_is_reported() -> None:
    c, s = open_pair()
    c.send_release("obj-7", 3)
    assert transfer(c, s) == [(Release("obj-7", 3), None)]


@pytest.mark.parametrize("max_frame", [-5, 0, 1, MIN_MAX_FRAME - 1])
def test_hello_with_a_tiny_max_frame_is_refused(max_frame: int) -> None:
    # a peer that accepts no frame (not even the WELCOME or a PONG) cannot be talked to
    s = ProtocolCore(client=False)
    with pytest.raises(RemoteProtocolError, match="max_frame"):
        s.receive_data(frame(Hello(PROTOCOL_VERSION, max_frame)) + frame(Ping(1)))
    assert s.state == State.ERROR
    with pytest.raises(LocalProtocolError):
        s.send_welcome()


@pytest.mark.parametrize("max_frame", [0, MIN_MAX_FRAME - 1])
def test_welcome_with_a_tiny_max_frame_is_refused(max_frame: int) -> None:
    c = ProtocolCore(client=True)
    c.send_hello()
    with pytest.raises(RemoteProtocolError, match="max_frame"):
        c.receive_data(frame(Welcome(PROTOCOL_VERSION, max_frame)))
    assert c.state == State.ERROR


def test_smallest_allowed_max_frame_is_accepted() -> None:
    c, s = open_pair(client_max_frame=MIN_MAX_FRAME, server_max_frame=MIN_MAX_FRAME)
    assert c.peer_max_frame == s.peer_max_frame == MIN_MAX_FRAME
    c.send_ping(1)
    assert transfer(c, s) == []
    assert transfer(s, c) == [(Pong(1), None)]


# --------------------------------------------------------------------------- local misuse
def test_local_misuse_raises_local_protocol_error() -> None:
    c, s = open_pair()
    with pytest.raises(LocalProtocolError):
        s.send_reply(1, raw(None))
    with pytest.raises(LocalProtocolError):
        s.send_error(1, ErrorCode.REMOTE, "E", "")
    with pytest.raises(LocalProtocolError):
        s.send_end(1)
    with pytest.raises(LocalProtocolError):
        c.send_items(1, [raw(1)])  # no such stream
    with pytest.raises(LocalProtocolError):
        s.send_items(1, [raw(1)])
    rec = c.send_call("o", "m", raw([]))
    with pytest.raises(LocalProtocolError):
        c.send_items(rec.id, [raw(1)])  # a unary call has no credit
    assert len(split_frames(c.data_to_send())) == 1  # nothing of the refused sends left
    assert c.state == State.OPEN and s.state == State.OPEN


def test_frame_over_the_peers_max_frame_is_local_error() -> None:
    limit = MIN_MAX_FRAME
    c, s = open_pair(server_max_frame=limit)
    assert c.peer_max_frame == limit
    with pytest.raises(LocalProtocolError, match="exceeds"):
        c.send_call("o", "m", raw("x" * limit))
    assert c.data_to_send() == b""  # nothing half-written
    assert c.outgoing == {}
    rec = c.send_call("o", "m", raw("small"))
    assert rec.id == 1  # the refused call did not use an id
    transfer(c, s)
    # and the reply direction, against the client's limit
    c2, s2 = open_pair(client_max_frame=limit)
    rec = c2.send_call("o", "m", raw([]))
    transfer(c2, s2)
    with pytest.raises(LocalProtocolError):
        s2.send_reply(rec.id, raw("y" * limit))
    assert s2.data_to_send() == b""


@pytest.mark.parametrize("bad", ["too-large", "unencodable"])
def test_a_refused_reply_leaves_the_call_answerable(bad: str) -> None:
    c, s = open_pair(client_max_frame=MIN_MAX_FRAME)
    rec = c.send_call("o", "m", raw([]))
    transfer(c, s)
    with pytest.raises((LocalProtocolError, TypeError)):
        s.send_reply(rec.id, raw("y" * MIN_MAX_FRAME) if bad == "too-large" else object())
    assert s.data_to_send() == b""
    s.send_error(rec.id, ErrorCode.LIMIT, "LimitExceeded", "too large")
    (err, r), = transfer(s, c)
    assert type(err) is Error and r is rec


def test_unencodable_payload_leaves_no_partial_frame() -> None:
    c, s = open_pair()
    with pytest.raises(TypeError):
        c.send_call("o", "m", object())
    assert c.data_to_send() == b"" and c.outgoing == {}
    assert c.send_call("o", "m", raw(1)).id == 1


# --------------------------------------------------------------------------- round trip property
_ids = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_payload = _plain.map(raw)
_text = st.text(max_size=30)
_exports = st.lists(st.builds(ExportInfo, _text, _text, _text), max_size=3)

MESSAGES = st.one_of(
    st.builds(Hello, _ids, _ids, _exports, _ids, _ids),
    st.builds(Welcome, _ids, _ids, _exports, _ids, _ids),
    st.builds(Call, _ids, _text, _text, _payload, _ids, st.none() | st.floats(allow_nan=False)),
    st.builds(Reply, _ids, _payload),
    st.builds(Error, _ids, _ids, _text, _text, _plain),
    st.builds(Item, _ids, _ids, _payload),
    st.builds(End, _ids),
    st.builds(Credit, _ids, _ids, _ids),
    st.builds(Cancel, _ids),
    st.builds(Release, _text, _ids),
    st.builds(Goodbye, _text, _ids),
    st.builds(Ping, _ids),
    st.builds(Pong, _ids),
)


@FIXED
@given(st.lists(MESSAGES, min_size=1, max_size=5))
def test_every_message_round_trips(msgs: list[Any]) -> None:
    decoded = split_frames(b"".join(frame(m) for m in msgs))
    assert len(decoded) == len(msgs)
    for a, b in zip(msgs, decoded):
        assert same_message(a, b), (a, b)


# --------------------------------------------------------------------------- no I/O in the core
FORBIDDEN = {"anyio", "asyncio", "trio", "socket", "sniffio", "selectors"}


def _imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """(absolute module name or relative spec, level) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, 0) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
            "__import__",
            "import_module",
        ):
            raise AssertionError(f"{path}: dynamic import at line {node.lineno}")
    return out


def test_protocol_package_imports_no_event_loop_or_socket() -> None:
    files = sorted(PROTOCOL_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "_core.py", "_frames.py"}
    seen: set[pathlib.Path] = set()
    todo = list(files)
    while todo:  # follow relative imports, also out of the package (``.._errors``)
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name, level in _imports(path):
            if level == 0:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
                continue
            base = path.parent
            for _ in range(level - 1):
                base = base.parent
            target = base.joinpath(*name.split(".")) if name else base
            for candidate in (target.with_suffix(".py"), target / "__init__.py"):
                if candidate.is_file():
                    todo.append(candidate)
    assert PROTOCOL_DIR.parent / "_errors.py" in seen  # the walk did leave the package


def test_protocol_package_loads_without_event_loop_modules() -> None:
    # xrpc/__init__ imports anyio, so stand in a bare package object for ``xrpc`` and load only
    # xrpc/_protocol (and what it imports) from the source files.
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('xrpc'); pkg.__path__ = [sys.argv[1]]; sys.modules['xrpc'] = pkg\n"
        "import xrpc._protocol as p\n"
        "assert p.ProtocolCore(client=True) is not None\n"
        "print(','.join(sorted(m for m in ('anyio', 'asyncio', 'trio', 'socket', 'sniffio') if m in sys.modules)))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(PROTOCOL_DIR.parent)], capture_output=True, text=True, timeout=6 * T
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


@pytest.mark.parametrize("count", [0, -1, -(2**40)])
def test_release_of_fewer_than_one_reference_is_a_protocol_error(count: int) -> None:
    """A RELEASE that would add references instead of dropping them is refused."""
    c, s = open_pair()
    with pytest.raises(RemoteProtocolError, match="RELEASE"):
        transfer(c, s, Release("obj-7", count))


def test_the_core_reports_what_it_buffers() -> None:
    """``out_size`` counts what is encoded and not yet taken; ``receiving_big`` and ``big_size``
    describe a large frame while it is assembled in its own buffer."""
    c, s = open_pair()
    assert c.out_size == 0
    rec = c.send_call("o", "m", raw(["x" * 100_000]))
    data = c.data_to_send()
    assert c.out_size == 0 and len(data) > 100_000
    c.send_ping(1)
    assert c.out_size == len(frame(Ping(1)))
    assert not s.receiving_big and s.big_size == 0
    assert s.receive_data(data[:1000]) == []
    assert s.receiving_big and s.big_size == len(data)
    rest = data[1000:]
    while rest:
        target = s.big_target()
        assert target is not None
        n = min(len(target), len(rest))
        target[:n] = rest[:n]
        target.release()  # the buffer may grow for the next read
        rest = rest[n:]
        events = s.big_received(n)
    assert [(type(m), r.id if r else None) for m, r in events] == [(Call, rec.id)]
    assert not s.receiving_big and s.big_size == 0


def _receive_in_place(s: ProtocolCore, data: bytes, first: int = 1000) -> tuple[list[Any], list[Any]]:
    """Feed one large frame the way the drivers do (the start as a read, the rest straight into
    ``big_target()``); return the events and the buffers it was received into."""
    assert s.receive_data(data[:first]) == []
    rest = data[first:]
    buffers: list[Any] = []
    events: list[Any] = []
    while rest:
        target = s.big_target()
        assert target is not None and 0 < len(target) <= len(rest)  # never past the frame's end
        if not any(b is target.obj for b in buffers):
            buffers.append(target.obj)
        n = min(len(target), 50_000)
        target[:n] = rest[:n]
        target.release()
        rest = rest[n:]
        events = s.big_received(n)
    return events, buffers


def test_large_frames_reuse_a_buffer_once_nothing_decoded_from_it_is_alive() -> None:
    """With ``FrameBuffers``, the buffer of a decoded large frame is reused for a later one, but
    only once no payload decoded from it is alive; a smaller frame received into a larger buffer
    ends where it ends."""
    c, s = open_pair()
    s.buffers = FrameBuffers()
    sizes = [300_000, 200_000, 120_000]
    frames = []
    for i, size in enumerate(sizes):
        c.send_call("o", "m", raw([bytes([i]) * size]))
        frames.append(c.data_to_send())
    first, (buf1,) = _receive_in_place(s, frames[0])
    # the first payload is still held: the second frame gets a buffer of its own
    second, (buf2,) = _receive_in_place(s, frames[1])
    assert buf2 is not buf1
    assert msgspec.msgpack.decode(first[0][0].payload) == [bytes([0]) * sizes[0]]
    del first
    # nothing decoded from the first frame is alive: the third (smaller) frame reuses its buffer,
    # the larger of the two spare ones, even though the second's payload is still held
    third, (buf3,) = _receive_in_place(s, frames[2])
    assert buf3 is buf1
    assert msgspec.msgpack.decode(second[0][0].payload) == [bytes([1]) * sizes[1]]
    assert msgspec.msgpack.decode(third[0][0].payload) == [bytes([2]) * sizes[2]]
    # a frame that arrives as one read behind a small one, also into a reused buffer
    del second, third
    c.send_release("a")
    c.send_call("o", "m", raw([b"z" * 150_000]))
    c.send_release("b")
    data = c.data_to_send()
    events = []
    for pos in range(0, len(data), 40_000):
        events += s.receive_data(data[pos : pos + 40_000])
    assert [type(m) for m, _ in events] == [Release, Call, Release]
    assert msgspec.msgpack.decode(events[1][0].payload) == [b"z" * 150_000]


def test_frame_buffers_keep_at_most_one_spare_of_bounded_size() -> None:
    """A buffer larger than ``keep`` is not kept; of several spare buffers the largest is."""
    buffers = FrameBuffers(keep=1000)
    big = bytearray(2000)
    buffers.lend(big, memoryview(big)[4:])
    assert buffers.take() is None
    small, medium = bytearray(100), bytearray(500)
    buffers.lend(small, memoryview(small)[4:])
    held = memoryview(medium)[4:]
    buffers.lend(medium, held)
    assert buffers.take() is small  # the medium one's view is still held elsewhere
    del held
    assert buffers.take() is medium
    assert buffers.take() is None
