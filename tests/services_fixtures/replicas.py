"""Replicas of the probe service for the failover tests, started fast.

``python -m services_fixtures.replicas`` imports xrpc once, then reads lines ``INDEX PATH`` on its
standard input and forks, for each, a process that serves ``services_fixtures.probe`` on
``unix://PATH`` and writes ``up INDEX PID`` on standard output once it listens.  A fork costs
milliseconds where a new interpreter costs a few hundred, so a test can kill and restart a replica
a hundred times in a few seconds.  The forked processes are real servers: killing one (SIGKILL by
its pid) cuts its connections as a crash would.  When standard input closes, every replica still
running is killed (through pidfds, so no recycled pid is hit) and the program exits.  No event loop runs in this process when it forks.
"""

from __future__ import annotations

import os
import signal
import sys

import anyio

from services_fixtures.probe import make_server


def _serve(index: str, path: str) -> None:
    async def main() -> None:
        server = make_server()
        async with server.listen(f"unix://{path}"):
            os.write(1, f"up {index} {os.getpid()}\n".encode())
            await anyio.sleep_forever()

    anyio.run(main)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the replicas
    children: list[int] = []
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        index, path = line.split()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
                _serve(index, path)
                code = 0
            finally:
                os._exit(code)
        try:
            children.append(os.pidfd_open(pid))  # a pidfd never names a recycled pid
        except ProcessLookupError:
            pass  # dead already (and reaped)
    for pidfd in children:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(pidfd)


if __name__ == "__main__":
    main()
