"""One worker process of a multi-process server (``python -m xrpc._worker``, started by the
supervisor in ``xrpc/_workers.py``, never by hand).

It moves the listening descriptors it inherited to 3, 4, ... and describes them in ``LISTEN_FDS``
for itself, so that ``Server.listen("systemd:")`` serves them as it serves sockets passed by a
service manager; builds its ``Server`` (and TLS context) by calling the factory it was named; writes
``ready`` on its control socket; and serves until that socket reaches end of file (the supervisor
asks it to stop, or died) or SIGTERM arrives (it then writes ``recycle``: the supervisor replaces
it without counting a failure).  Then it stops accepting, lets the calls in flight
finish (at most the drain timeout; another SIGTERM cuts that short), closes its connections and
exits with code 0.  Failing to start, it writes ``error <message>`` and exits with code 1.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import logging
import os
import signal
import socket
import ssl
import sys
import traceback
from typing import Any

import anyio
import msgspec

from ._api import Server
from ._introspect import INTROSPECT_NAME
from ._systemd import LISTEN_FDS_START, ActivatedListener
from ._workers import SPEC_VAR, AcceptBalance, ConnectionCounts, CountedConnections, ReadyInfo, WorkerSpec, resolve

log = logging.getLogger("xrpc")


def _free(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def place_descriptors(fds: list[int], others: list[int]) -> list[int]:
    """Move the listening ``fds`` to 3, 4, ... (as socket activation numbers them) and the
    ``others`` above them; return the others' new numbers.  All end up close-on-exec."""
    top = LISTEN_FDS_START + len(fds)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in fds]
    new_others = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in others]
    for fd in {*fds, *others}:
        os.close(fd)
    for i, fd in enumerate(moved):
        target = LISTEN_FDS_START + i
        if not _free(target):
            raise RuntimeError(f"descriptor {target} is in use in the worker: cannot place the listening socket there")
        os.dup2(fd, target, inheritable=False)
        os.close(fd)
    return new_others


async def _watch_control(control: socket.socket, stop: anyio.Event) -> None:
    while True:
        try:
            await anyio.wait_readable(control)
            data = control.recv(4096)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            data = b""
        if not data:
            stop.set()
            return


async def serve_worker(spec: WorkerSpec, control: socket.socket, counts: ConnectionCounts | None) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        made = resolve(spec.factory)()
        if inspect.isawaitable(made):
            made = await made
        if not isinstance(made, Server):
            raise TypeError(f"{spec.factory.describe()} returned {type(made).__qualname__}, not an xrpc.Server")
        server: Server = made
        context: ssl.SSLContext | None = None
        if spec.ssl_context is not None:
            built = resolve(spec.ssl_context)()
            if not isinstance(built, ssl.SSLContext):
                raise TypeError(f"{spec.ssl_context.describe()} returned {type(built).__qualname__}, not an ssl.SSLContext")
            context = built
        stop = anyio.Event()
        if counts is not None:
            server.connections = CountedConnections(counts, spec.index, server.connections)
        async with server.listen("systemd:", ssl_context=context) as listener:
            if isinstance(server.connections, CountedConnections) and isinstance(listener, ActivatedListener):
                balance = AcceptBalance(server.connections)
                for part in listener.parts:
                    part.accept_gate = balance.gate
                    part.on_starved = balance.starved
            exports = [n for n in server.export_names if n != INTROSPECT_NAME]
            control.send(b"ready " + msgspec.json.encode(ReadyInfo(listener.url, exports)) + b"\n")
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_control, control, stop)
                drain = anyio.CancelScope()

                async def on_signals() -> None:
                    async for _ in signals:
                        if stop.is_set():
                            drain.cancel()  # a second request: stop waiting for the calls in flight
                        else:
                            with contextlib.suppress(OSError):  # the supervisor replaces us without counting a failure
                                control.send(b"recycle\n")
                        stop.set()

                tg.start_soon(on_signals)
                await stop.wait()
                await listener.aclose()
                for i in range(len(spec.fds)):  # the inherited descriptors too: the socket is not ours to keep open
                    os.close(LISTEN_FDS_START + i)
                with drain, anyio.move_on_after(spec.drain_timeout):
                    while any(c.in_flight for c in list(server.connections)):
                        await anyio.sleep(0.02)  # no hook tells when a connection's last call ends
                tg.cancel_scope.cancel()


def main() -> int:
    raw = os.environ.pop(SPEC_VAR, None)
    if raw is None:
        print("python -m xrpc._worker is started by a server with workers=N, not by hand", file=sys.stderr)
        return 2
    spec = msgspec.json.decode(raw, type=WorkerSpec)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor decides
    control_fd, *counts_fd = place_descriptors(spec.fds, [spec.control] + ([spec.counts] if spec.counts is not None else []))
    control = socket.socket(fileno=control_fd)
    counts = ConnectionCounts(counts_fd[0], spec.workers) if counts_fd else None
    control.setblocking(False)
    os.environ["LISTEN_FDS"] = str(len(spec.fds))
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDNAMES"] = ":".join(spec.names)
    if spec.pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = spec.pythonpath
    sys.path[:] = spec.sys_path
    if spec.log_level is not None:
        logging.basicConfig(level=spec.log_level, format="%(name)s[%(process)d]: %(levelname)s %(message)s")
    options: dict[str, Any] = {"use_uvloop": True} if spec.uvloop else {}
    try:
        anyio.run(serve_worker, spec, control, counts, backend=spec.backend, backend_options=options)
    except BaseException as exc:
        traceback.print_exc()
        message = f"{type(exc).__qualname__}: {exc}".replace("\n", " ")
        try:
            control.setblocking(True)
            control.sendall(b"error " + message.encode(errors="replace")[:4000] + b"\n")
        except OSError:
            pass
        return 1
    finally:
        control.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
