"""A client process for the launch race: ``python -m services_fixtures.race_client NAME``.

It prints ``waiting`` once imported, waits for a line on stdin, then calls the service (found on the
default search path: ``XRPC_RUNTIME_DIR`` / ``XRPC_SERVICE_PATH``) and prints the pid it answers.
"""

from __future__ import annotations

import sys

import anyio

from xrpc._services import connect_service

from .probe import Probe


async def main(name: str) -> None:
    print("waiting", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)
    async with connect_service(name) as sc:
        print(await sc.proxy(Probe).pid(), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
