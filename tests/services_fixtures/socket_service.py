"""A ``command`` service that knows nothing of the readiness pipe (``readiness = "socket"``).

It serves on ``$XRPC_SERVICE_URL`` with plain ``Server.serve``; the launcher waits until the socket
accepts connections.
"""

from __future__ import annotations

import os

import anyio

from .probe import make_server

if __name__ == "__main__":
    anyio.run(make_server("socket").serve, os.environ["XRPC_SERVICE_URL"])
