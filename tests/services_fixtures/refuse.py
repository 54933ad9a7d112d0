"""A service that refuses every connection (its ``on_connect`` returns ``False``)."""

from __future__ import annotations

import xrpc

from .probe import Probe, ProbeImpl, _record_start


def make_server() -> xrpc.Server:
    _record_start()
    server = xrpc.Server(on_connect=lambda conn: False)
    server.export(Probe, ProbeImpl("refuse"))
    return server
