"""Wire messages: frozen, array-like, tagged msgspec Structs.

Every frame on the wire is a 4-byte big-endian length followed by one msgpack-encoded message
from the ``Message`` union below.  A message is an array whose first element is the integer tag.
Payloads (arguments, replies, stream items, error arguments) are typed ``msgspec.Raw`` so that the
envelope is decoded first and the payload later, by the decoder of the method it belongs to.

On the sending side a payload field may hold any encodable object instead of ``Raw``: msgspec
encodes whatever the field holds, so arguments are encoded in the same pass as their envelope.

This module must not import anyio, asyncio, trio or socket (a test checks).
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

__all__ = (
    "PROTOCOL_VERSION",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_WINDOW",
    "DEFAULT_WINDOW_BYTES",
    "Hello",
    "Welcome",
    "Call",
    "Reply",
    "Error",
    "Item",
    "End",
    "Credit",
    "Cancel",
    "Release",
    "Goodbye",
    "Ping",
    "Pong",
    "Message",
    "ErrorCode",
    "CallFlags",
    "ExportInfo",
    "MethodSig",
    "Ref",
)

PROTOCOL_VERSION = 1

# What a side announces unless configured otherwise (``Limits`` and ``ProtocolCore`` take them as
# defaults), and what a HELLO or WELCOME that leaves out its windows means.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024  # the largest frame a side accepts, in bytes
DEFAULT_WINDOW = 1024  # stream credit, in items, granted to every stream a side receives
DEFAULT_WINDOW_BYTES = 4 * 1024 * 1024  # ... and in bytes of ITEM frames


class ErrorCode:
    """Values of ``Error.code``."""

    REMOTE = 1  # an undeclared exception in the remote method
    DECLARED = 2  # an exception the interface declares; ``args`` carries its arguments
    VALIDATION = 3  # arguments refused by the codec or allow-list; the method never ran
    METHOD_NOT_FOUND = 4
    OBJECT_NOT_FOUND = 5
    PEER_REJECTED = 6  # a requirement refused this call
    TIMEOUT = 7  # the deadline passed on the callee
    CANCELLED = 8  # the callee cancelled the call (for example because it is shutting down)
    LIMIT = 9  # a limit of the callee was exceeded
    INTERNAL = 10  # the callee could not encode its reply


class CallFlags:
    """Bits of ``Call.flags``: what the caller expects back."""

    ONEWAY = 1  # no reply at all
    STREAM_IN = 2  # the caller sends ITEM frames then END (client stream)
    STREAM_OUT = 4  # the callee answers with ITEM frames then END (server stream)


class MethodSig(msgspec.Struct, array_like=True, frozen=True):
    """How one exported method is called, as HELLO/WELCOME announce it.

    ``kind`` is the method's kind (``"unary"``, ``"oneway"``, ``"server_stream"``,
    ``"client_stream"``, ``"bidi_stream"``; another string is a kind this side does not know, not an
    error).  ``params`` names the parameters in declaration order, the client-stream parameter
    included; ``optional`` holds the indexes (in ``params``) of those with a default, ascending;
    ``stream`` is the index of the client-stream parameter, or None.

    Decoding checks the shape: a signature whose indexes are out of range, repeated or unordered,
    whose names are empty or repeated, or whose stream parameter is optional is refused (the frame
    that carries it is then a protocol error).
    """

    kind: str
    params: tuple[str, ...] = ()
    optional: tuple[int, ...] = ()
    stream: Union[int, None] = None

    def __post_init__(self) -> None:
        n = len(self.params)
        if "" in self.params or len(set(self.params)) != n:
            raise ValueError("parameter names must be non-empty and distinct")
        prev = -1
        for i in self.optional:
            if not prev < i < n:
                raise ValueError("optional parameter indexes must be ascending and in range")
            prev = i
        if self.stream is not None and (not 0 <= self.stream < n or self.stream in self.optional):
            raise ValueError("the stream parameter index must be in range and not optional")


class ExportInfo(msgspec.Struct, array_like=True, frozen=True):
    """One object exported by the side that sends HELLO/WELCOME."""

    name: str
    interface: str
    fingerprint: str
    methods: dict[str, MethodSig] = {}  # method name -> how it is called


class Hello(msgspec.Struct, array_like=True, frozen=True, tag=0):
    """First frame from the connecting side."""

    version: int
    max_frame: int
    exports: list[ExportInfo] = []
    window: int = DEFAULT_WINDOW  # stream credit (items) this side grants to every stream it receives
    window_bytes: int = DEFAULT_WINDOW_BYTES  # ... and in bytes of ITEM frames
    # connection credit (bytes of ITEM cost, all streams together) this side grants; 0: none
    # announced (a peer that predates connection flow control)
    conn_window: int = 0


class Welcome(msgspec.Struct, array_like=True, frozen=True, tag=1):
    """Answer to HELLO: the connection is accepted."""

    version: int
    max_frame: int
    exports: list[ExportInfo] = []
    window: int = DEFAULT_WINDOW
    window_bytes: int = DEFAULT_WINDOW_BYTES
    conn_window: int = 0


class Call(msgspec.Struct, array_like=True, frozen=True, tag=2, omit_defaults=True):
    """Start a call.  ``deadline`` is the time left, in seconds, when the frame was sent;
    ``meta`` is the caller's call metadata (string keys and values), propagated by context."""

    id: int
    obj: str
    method: str
    payload: msgspec.Raw
    flags: int = 0
    deadline: Union[float, None] = None
    meta: Union[dict[str, str], None] = None


class Reply(msgspec.Struct, array_like=True, frozen=True, tag=3):
    id: int
    payload: msgspec.Raw


class Error(msgspec.Struct, array_like=True, frozen=True, tag=4):
    id: int
    code: int
    type_name: str
    message: str
    args: Any = None  # declared errors: the exception's args; otherwise unused


class Item(msgspec.Struct, array_like=True, frozen=True, tag=5):
    """``count`` (at least 1) stream items; ``payload`` is a msgpack array of exactly that many."""

    id: int
    count: int
    payload: msgspec.Raw


class End(msgspec.Struct, array_like=True, frozen=True, tag=6):
    id: int


class Credit(msgspec.Struct, array_like=True, frozen=True, tag=7):
    """Grant the sender of a stream ``items`` more items and ``nbytes`` more bytes of ITEM frames,
    and return ``conn`` bytes of connection credit.  ``id`` 0 addresses the connection alone
    (``items`` and ``nbytes`` 0)."""

    id: int
    items: int
    nbytes: int = 0
    conn: int = 0


class Cancel(msgspec.Struct, array_like=True, frozen=True, tag=8):
    id: int


class Release(msgspec.Struct, array_like=True, frozen=True, tag=9):
    """The sender drops ``count`` references to an object the receiver exported to it."""

    obj: str
    count: int = 1


class Goodbye(msgspec.Struct, array_like=True, frozen=True, tag=10):
    """The sender closes the connection; ``code`` is an ``ErrorCode`` or 0 for a normal close."""

    reason: str = ""
    code: int = 0


class Ping(msgspec.Struct, array_like=True, frozen=True, tag=11):
    nonce: int


class Pong(msgspec.Struct, array_like=True, frozen=True, tag=12):
    nonce: int


class Ref(msgspec.Struct, array_like=True, frozen=True):
    """An object passed by reference inside a payload.

    ``home`` false: an object the sender exports, callable as ``oid`` on this connection.
    ``home`` true: an object the *receiver* exported earlier, travelling back to its owner.
    """

    home: bool
    oid: str
    interface: str


Message = Union[Hello, Welcome, Call, Reply, Error, Item, End, Credit, Cancel, Release, Goodbye, Ping, Pong]
