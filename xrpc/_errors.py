"""The whole exception tree of xrpc, in one place.

Errors are named for their cause.  ``Error`` is the base of everything xrpc raises on purpose;
``ProtocolError`` and its two children separate "you misused the protocol core" from "the peer broke
the rules", as h11 does.  Transport errors never escape raw: the runtime translates them into
``ConnectionInterrupted`` (the peer went away) or ``ConnectionInvalidated`` (closed for good).
"""

from __future__ import annotations

__all__ = (
    "Error",
    "InterfaceError",
    "ValidationError",
    "ArgumentError",
    "RemoteError",
    "MethodNotFound",
    "ObjectNotFound",
    "ConnectionInterrupted",
    "ConnectionInvalidated",
    "PeerRejected",
    "LimitExceeded",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "TransportError",
)


class Error(Exception):
    """Base class of every error xrpc raises."""


class InterfaceError(Error, TypeError):
    """An interface declaration is not usable (raised when ``@xrpc.interface`` is applied)."""


class ValidationError(Error):
    """An argument, reply or stream item was refused by the codec or the allow-list.

    When the refusal happens on the callee, the remote method never ran.
    """

    def __init__(self, message: str, *, method: str = "", argument: str = "") -> None:
        super().__init__(message)
        self.method = method
        self.argument = argument


class ArgumentError(ValidationError, TypeError):
    """The arguments of a call do not fit the method's parameters (an unexpected keyword, one too
    many, a missing one): raised on the caller before anything is sent, and worded as Python words
    the ``TypeError`` of a local call.  ``except TypeError`` and ``except xrpc.ValidationError`` both
    catch it."""


class RemoteError(Error):
    """The remote method raised an exception that its interface does not declare."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message


class MethodNotFound(Error):
    """The remote object has no such method."""


class ObjectNotFound(Error):
    """No object is exported under that name (or the reference was released)."""


class LimitExceeded(Error):
    """A configured limit (frame size, calls in flight, streams, objects ...) was exceeded."""


class ConnectionInterrupted(Error):
    """The peer went away while the call was outstanding.  The call may be retried."""

    can_retry = True


class ConnectionInvalidated(Error):
    """The connection is closed for good: no further call can succeed on it."""

    can_retry = False


class PeerRejected(ConnectionInvalidated):
    """The peer (or this side) refused the connection or the call."""


class TransportError(ConnectionInterrupted):
    """The transport failed (connect refused, socket error ...)."""


class ProtocolError(Error):
    """The xrpc wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or frames that break the protocol."""
