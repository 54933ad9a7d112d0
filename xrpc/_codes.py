"""The one table between ERROR/GOODBYE codes and exceptions, used in both directions.

A callee turns what its method raised (or why it refused a call) into an ERROR frame with
``error_frame_args``; a caller turns an ERROR frame back into the exception to raise with
``exception_from_error``; a GOODBYE's code becomes the connection's failure with
``failure_from_goodbye``.
"""

from __future__ import annotations

from typing import Any

from ._errors import (
    ConnectionInterrupted,
    LimitExceeded,
    MethodNotFound,
    ObjectNotFound,
    PeerRejected,
    RemoteError,
    ValidationError,
)
from ._interface import MethodDescription, plain_error
from ._protocol import Error as ErrorFrame
from ._protocol import ErrorCode

__all__ = ("CODES", "error_frame_args", "exception_from_error", "failure_from_goodbye", "refusal")

# code <-> the exception class that stands for it (REMOTE, DECLARED and INTERNAL carry the remote
# type's name and are raised as RemoteError or the declared class)
CODES: dict[int, type[BaseException]] = {
    ErrorCode.VALIDATION: ValidationError,
    ErrorCode.METHOD_NOT_FOUND: MethodNotFound,
    ErrorCode.OBJECT_NOT_FOUND: ObjectNotFound,
    ErrorCode.PEER_REJECTED: PeerRejected,
    ErrorCode.TIMEOUT: TimeoutError,
    ErrorCode.LIMIT: LimitExceeded,
    ErrorCode.CANCELLED: ConnectionInterrupted,
}
_CODE_OF = {cls: code for code, cls in CODES.items()}
# what a method may raise and have travel as xrpc's own error (others travel as REMOTE: a
# TimeoutError or ConnectionInterrupted of the method's own doing is not the call's deadline or
# connection)
_RAISED = (ValidationError, LimitExceeded)


def error_frame_args(exc: BaseException, m: MethodDescription | None = None) -> tuple[int, str, str, list[Any] | None]:
    """What ERROR says for ``exc`` raised by (or refusing) a call of ``m``: code, type name,
    message, arguments.  Declared errors carry their arguments; xrpc's own errors their code;
    anything else is REMOTE with its type's name."""
    if m is not None and m.interface.errors and isinstance(exc, m.interface.errors):
        return ErrorCode.DECLARED, type(exc).__qualname__, str(exc), list(exc.args)
    if isinstance(exc, ValidationError):
        return ErrorCode.VALIDATION, "ValidationError", str(exc), [exc.argument]
    if isinstance(exc, _RAISED):
        return _CODE_OF[type(exc)], type(exc).__name__, str(exc), None
    return ErrorCode.REMOTE, type(exc).__qualname__, str(exc), None


def refusal(code: int, message: str) -> tuple[int, str, str, None]:
    """What ERROR says when this side refuses a call with ``code`` (the method never ran)."""
    return code, CODES[code].__name__, message, None


def exception_from_error(m: MethodDescription | None, frame: ErrorFrame) -> BaseException:
    """The exception a caller raises for an ERROR frame answering a call of ``m``."""
    code = frame.code
    msg = frame.message
    if code == ErrorCode.DECLARED and m is not None:
        cls = m.interface.error_map.get(frame.type_name)
        if cls is not None:
            args = frame.args if isinstance(frame.args, (list, tuple)) else ()
            if plain_error(args) is not None:
                # only plain data travels; the frame decoder leaves MessagePack extensions as they are
                return ValidationError(
                    f"error {frame.type_name} of {m.qualname} refused: its arguments hold a MessagePack extension, which is not plain data",
                    method=m.name,
                )
            try:
                return cls(*args)
            except Exception:
                return RemoteError(frame.type_name, msg)
        return RemoteError(frame.type_name, msg)
    if code == ErrorCode.VALIDATION:
        arg = frame.args[0] if isinstance(frame.args, list) and frame.args and isinstance(frame.args[0], str) else ""
        return ValidationError(msg, method=m.name if m else "", argument=arg)
    cls = CODES.get(code)
    if cls is None:
        return RemoteError(frame.type_name, msg)
    return cls(msg)


def failure_from_goodbye(code: int, reason: str) -> BaseException:
    """Why the connection ended, when the peer closed it with GOODBYE ``code``."""
    if code == ErrorCode.PEER_REJECTED:
        return PeerRejected(f"the peer refused the connection: {reason}")
    if code == ErrorCode.LIMIT:
        return LimitExceeded(f"the peer closed the connection: {reason}")
    return ConnectionInterrupted(f"the peer closed the connection: {reason}")
