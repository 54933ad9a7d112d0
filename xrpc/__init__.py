"""xrpc: typed asyncio RPC between processes, modelled on XPC.

Declare a ``typing.Protocol`` with ``@xrpc.interface``; export an implementation on an
``xrpc.Server``; ``async with xrpc.connect(url) as conn`` and call ``conn.proxy(Iface)``.
"""

import logging
from typing import TYPE_CHECKING

from . import blocking, testing
from ._api import Server, connect, run
from ._connection import (
    CallContext,
    CallStream,
    Connection,
    Limits,
    Middleware,
    Promise,
    call_metadata,
    current_connection,
    current_metadata,
)
from ._errors import (
    ConnectionInterrupted,
    ConnectionInvalidated,
    Error,
    InterfaceError,
    LimitExceeded,
    LocalProtocolError,
    MethodNotFound,
    ObjectNotFound,
    PeerRejected,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    TransportError,
    ValidationError,
)
from ._interface import (
    InterfaceDescription,
    MethodDescription,
    MethodKind,
    allow,
    describe,
    interface,
    oneway,
    requires,
)
from ._fds import FileDescriptor, SharedBuffer
from ._peer import CertSubject, Peer
from ._proxy import pipeline
from ._requirements import Requirement, RequirementSyntaxError, requirement
from ._systemd import SocketActivationError, sd_notify
from ._tls import client_ssl_context, server_ssl_context
from ._transports import Endpoint, Listener

__version__ = "0.1.0"

if TYPE_CHECKING:
    # loaded on first use below; imported here so that type checkers see their real types
    from ._services import (
        ServiceConnection,
        ServiceDescriptionError,
        ServiceNotFound,
        ServiceUnavailable,
        UntrustedPath,
        connect_service,
        serve_service,
    )

# A library logs and leaves the output to the application: without logging configured, nothing is printed.
logging.getLogger("xrpc").addHandler(logging.NullHandler())

_SERVICES = ("connect_service", "ServiceConnection", "ServiceNotFound", "ServiceUnavailable", "ServiceDescriptionError", "UntrustedPath", "serve_service")


def __getattr__(name: str) -> object:
    # The services layer loads on first use (``python -m xrpc.service`` must not import it twice).
    if name in _SERVICES:
        from . import _services

        return getattr(_services, name)
    raise AttributeError(f"module 'xrpc' has no attribute {name!r}")

__all__ = (
    "CallContext",
    "CallStream",
    "CertSubject",
    "Connection",
    "ConnectionInterrupted",
    "ConnectionInvalidated",
    "Endpoint",
    "Error",
    "FileDescriptor",
    "InterfaceDescription",
    "InterfaceError",
    "LimitExceeded",
    "Listener",
    "Limits",
    "LocalProtocolError",
    "Middleware",
    "MethodDescription",
    "MethodKind",
    "MethodNotFound",
    "ObjectNotFound",
    "Peer",
    "PeerRejected",
    "Promise",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "Requirement",
    "RequirementSyntaxError",
    "Server",
    "ServiceConnection",
    "ServiceDescriptionError",
    "ServiceNotFound",
    "ServiceUnavailable",
    "SharedBuffer",
    "TransportError",
    "SocketActivationError",
    "sd_notify",
    "UntrustedPath",
    "ValidationError",
    "allow",
    "blocking",
    "call_metadata",
    "client_ssl_context",
    "connect",
    "connect_service",
    "current_connection",
    "current_metadata",
    "describe",
    "interface",
    "oneway",
    "pipeline",
    "requirement",
    "requires",
    "run",
    "serve_service",
    "server_ssl_context",
    "testing",
)
