"""What the netns server exports, and the JSON-lines event format both fixture programs print."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol

import xrpc


@xrpc.interface
class Echo(Protocol):
    async def echo(self, value: str) -> str: ...

    async def conn_id(self) -> int:
        """The server's serial number of the connection this call came on (1, 2, ...)."""
        ...

    async def hold(self, seconds: float) -> str:
        """Print a ``holding`` event on the server's stdout, wait ``seconds``, return ``"held"``."""
        ...


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout; ``t`` is ``time.monotonic()`` (one clock for every namespace)."""
    fields = {"event": event, "t": time.monotonic(), **fields}
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()
