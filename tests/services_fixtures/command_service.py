"""A ``command`` service: a program of its own that serves with ``serve_service``.

``python -m services_fixtures.command_service`` takes everything (name, socket, readiness pipe,
idle exit) from the environment the launcher sets.
"""

from __future__ import annotations

import anyio

from xrpc._services import serve_service

from .probe import make_server

if __name__ == "__main__":
    anyio.run(serve_service, make_server("command"))
