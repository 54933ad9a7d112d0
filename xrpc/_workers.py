"""Serving with several worker processes: one listening socket, N processes accepting on it.

Theory of operation
-------------------
The parent (the *supervisor*) binds the listening socket(s) exactly as a single-process server
would (``unix://``, ``tcp://``, ``tls://``, or the sockets of ``systemd:`` socket activation), then
starts N workers.  A worker is a fresh interpreter (``python -m xrpc._worker``), never a ``fork()``
of the parent: the parent may run an event loop, threads and connections, none of which must leak
into a worker.  The worker inherits the listening descriptors and finds them the way a
socket-activated service does (``LISTEN_FDS``/``LISTEN_PID`` at descriptors 3, 4, ...), so it
serves ``systemd:`` through ``Server.listen`` like any activated server.  Every worker accepts on the
same kernel socket (pre-fork): the kernel queues connections once, and a connection waiting in the
backlog goes to whichever worker accepts first, also when another worker has died.  (``SO_REUSEPORT``
would give each worker its own queue, whose waiting connections are lost when that worker dies, and
works for TCP only.)

A worker builds its own ``Server`` by calling the *factory* it was given by name (a module-level
function, or a ``functools.partial`` of one with plain arguments; ``__main__`` is loaded the way
``multiprocessing`` does, as ``__mp_main__``), and its own TLS context the same way.  Nothing is
pickled: the parent sends a JSON description of what to call.

Each worker holds one end of a socket pair; the supervisor the other.  The worker writes
``ready {...}`` once it listens (or ``error ...`` if it cannot start); the supervisor closes its end
to ask the worker to stop.  Since the kernel closes it too when the supervisor dies, a worker never
outlives its supervisor by more than its drain.  A stopping worker stops accepting, lets its calls
in flight finish (at most ``drain_timeout`` seconds; SIGTERM during the drain cuts it short), then
closes its connections and exits.  Workers ignore SIGINT (Ctrl-C reaches the whole process group;
the supervisor decides), and SIGTERM to one worker recycles it.

Every idle worker wakes for a new connection and the first to ``accept`` takes it, so a burst of
connections could all land on one.  Workers publish their connection counts in a table in shared
memory (a memfd from the supervisor), and a worker serving more connections than another leaves a
waiting connection to the others for up to 50 ms (``AcceptBalance``, the listener's accept gate).
A worker out of descriptors marks its slot ``STARVED`` and leaves waiting connections to the others
instead of refusing them, unless every other worker is starved too.

The supervisor replaces a worker that exits while the server runs (killed, crashed, or recycled);
it waits for the worker's process, not for the end of its control socket, which a process the
worker forked may hold open.  A worker recycled with SIGTERM writes ``recycle`` first, and its
clean exit is not counted as a failure.
A worker that fails before it was ever ready during start-up fails ``serve`` at once with its error
(a broken factory is not retried); later on, after ``restart_limit`` exits within ``restart_window``
seconds it gives up: it stops the other workers and ``serve`` raises ``WorkerError``.  It reports
``READY=1`` to a service manager once every worker is ready.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any, AsyncIterator, Callable

import anyio
import anyio.abc
import msgspec

from ._systemd import ActivatedListener, adopt_inherited, is_activation_url, open_activated, service_lifecycle
from ._transports import Listener, SocketListener, open_listener

__all__ = (
    "SPEC_VAR",
    "AcceptBalance",
    "ConnectionCounts",
    "CountedConnections",
    "Target",
    "WorkerError",
    "WorkerPool",
    "WorkerSpec",
    "ReadyInfo",
    "check_workers",
    "current_backend",
    "resolve",
    "serve_until_signalled",
    "target_of",
    "worker_command",
)

log = logging.getLogger("xrpc")

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

SPEC_VAR = "XRPC_WORKER_SPEC"
_DROPPED_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", SPEC_VAR)
_GRACE = 5.0  # seconds past the drain a stopping worker gets before it is killed


def worker_command() -> list[str]:
    """How a worker is started: ``python -m xrpc._worker``, but without the current directory put
    first on its ``sys.path`` (``-m`` does that): whoever can write to the directory the server
    was started from would otherwise have every worker import their ``xrpc`` (or ``anyio``...)
    instead.  The worker then takes the server's own ``sys.path``."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", "xrpc._worker"]
    return [sys.executable, "-c", _SAFE_START]  # pragma: no cover - Python 3.10 has no -P


_SAFE_START = (
    "import sys; sys.path[:1] = [] if sys.path[:1] == [''] else sys.path[:1]; "
    "from xrpc._worker import main; sys.exit(main())"
)


class WorkerError(RuntimeError):
    """The worker processes cannot be kept running: one failed to start, or they keep dying."""


# --------------------------------------------------------------------------- what a worker calls
class Target(msgspec.Struct, frozen=True, omit_defaults=True):
    """A function named so that another interpreter can import and call it: ``module:qualname``
    with plain (JSON) arguments.  ``main_path``/``main_name`` say how to load ``__main__``."""

    module: str
    qualname: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    main_path: str | None = None
    main_name: str | None = None

    def describe(self) -> str:
        return f"{self.module}:{self.qualname}"


def _plain(value: Any, what: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, what) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, what) for k, v in value.items()}
    raise TypeError(
        f"{what}: the argument {value!r} cannot reach the worker processes: a partial's arguments must be plain data "
        "(str, int, float, bool, None, paths, and lists or dicts of them)"
    )


def _lookup(module: Any, qualname: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def target_of(obj: Any, what: str) -> Target:
    """Name ``obj`` (a module-level function or class, or a ``functools.partial`` of one with plain
    arguments) so that a worker process can call it; ``TypeError`` saying why not otherwise."""
    if isinstance(obj, functools.partial):
        inner = target_of(obj.func, what)
        args = inner.args + _plain(list(obj.args), what)
        kwargs = {**inner.kwargs, **_plain(dict(obj.keywords), what)}
        return Target(inner.module, inner.qualname, args, kwargs, inner.main_path, inner.main_name)
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not callable(obj) or not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        raise TypeError(
            f"{what}: {obj!r} is not a module-level function or class: each worker process imports it by name "
            "(module:qualname), so define it at the top level of a module"
        )
    try:
        found = _lookup(sys.modules[module], qualname)
    except (KeyError, AttributeError):
        found = None
    if found != obj:
        raise TypeError(f"{what}: {module}:{qualname} does not name {obj!r}, so a worker process cannot import it")
    main_path = main_name = None
    if module == "__main__":
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        name = getattr(spec, "name", None)
        path = getattr(main, "__file__", None)
        if isinstance(name, str) and name and not name.endswith("__main__"):
            main_name = name
        elif isinstance(path, str) and path:
            main_path = os.path.abspath(path)
        else:
            raise TypeError(f"{what}: {qualname} is defined in an interactive session: move it to a module the workers can import")
    return Target(module, qualname, main_path=main_path, main_name=main_name)


def _load_main(t: Target) -> Any:
    """The parent's ``__main__``, run here as ``__mp_main__`` (its ``if __name__ == "__main__"``
    block does not run), as ``multiprocessing`` does for its spawned children."""
    loaded = sys.modules.get("__mp_main__")
    if loaded is not None:
        return loaded
    import runpy
    import types

    if t.main_name:
        content = runpy.run_module(t.main_name, run_name="__mp_main__", alter_sys=True)
    else:
        assert t.main_path is not None
        content = runpy.run_path(t.main_path, run_name="__mp_main__")
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(content)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    return module


def resolve(t: Target) -> Callable[[], Any]:
    """The function ``t`` names, with its arguments bound (imported in this process)."""
    module = _load_main(t) if t.module == "__main__" else importlib.import_module(t.module)
    fn = _lookup(module, t.qualname)
    return functools.partial(fn, *t.args, **t.kwargs)


class WorkerSpec(msgspec.Struct, frozen=True):
    """Everything a worker process is told (as JSON in ``XRPC_WORKER_SPEC``)."""

    factory: Target
    ssl_context: Target | None
    fds: list[int]  # the listening descriptors, as numbered in the worker before it moves them to 3, 4, ...
    names: list[str]
    control: int
    counts: int | None  # the shared table of connection counts (a memfd), if there is one
    index: int
    workers: int
    backend: str
    uvloop: bool
    drain_timeout: float
    sys_path: list[str]
    pythonpath: str | None
    log_level: int | None


class ReadyInfo(msgspec.Struct, frozen=True):
    """What a worker reports once it listens."""

    url: str
    exports: list[str]


def check_workers(workers: Any) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: the number of worker processes is an int >= 1")
    return workers


def current_backend() -> tuple[str, bool]:
    """``(backend, uvloop)`` of the running event loop, for workers to run the same."""
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "trio", False
    return "asyncio", type(loop).__module__.startswith("uvloop")


# --------------------------------------------------------------------------- balancing
class ConnectionCounts:
    """How many connections each worker serves: one 8-byte slot per worker, in memory every worker
    maps (a memfd the supervisor makes and passes).  A slot is ``ABSENT`` while no worker runs in it,
    and has ``STARVED`` added while its worker is out of descriptors (it can take no connection)."""

    ABSENT = 1 << 62
    STARVED = 1 << 61

    def __init__(self, fd: int, workers: int) -> None:
        self.fd = fd
        self.workers = workers
        self.map = mmap.mmap(fd, 8 * workers)

    @classmethod
    def create(cls, workers: int) -> ConnectionCounts | None:
        memfd_create = getattr(os, "memfd_create", None)
        if memfd_create is None:  # pragma: no cover - not Linux: no balancing, the kernel decides
            return None
        fd = memfd_create("xrpc-workers", getattr(os, "MFD_CLOEXEC", 1))
        os.ftruncate(fd, 8 * workers)
        counts = cls(fd, workers)
        for i in range(workers):
            counts.set(i, cls.ABSENT)
        return counts

    def set(self, index: int, count: int) -> None:
        struct.pack_into("q", self.map, 8 * index, count)

    def least_other(self, index: int) -> int:
        values = struct.unpack_from(f"{self.workers}q", self.map)
        return min((v for i, v in enumerate(values) if i != index), default=self.ABSENT)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class CountedConnections(set):  # type: ignore[type-arg]
    """A worker's ``server.connections``: its size is published in the shared table as it changes."""

    def __init__(self, counts: ConnectionCounts, index: int, items: Any = ()) -> None:
        super().__init__(items)
        self.counts = counts
        self.index = index
        self.starved = False
        self.publish()

    def publish(self) -> None:
        self.counts.set(self.index, len(self) + (ConnectionCounts.STARVED if self.starved else 0))

    def add(self, item: Any) -> None:
        super().add(item)
        self.publish()

    def discard(self, item: Any) -> None:
        super().discard(item)
        self.publish()

    def remove(self, item: Any) -> None:
        super().remove(item)
        self.publish()


class AcceptBalance:
    """The accept gate of a worker: a worker serving more connections than another worker leaves
    a waiting connection to the others for a moment, so that a burst of connections (all workers
    idle, every one woken) is shared out instead of going to whichever wakes first.  The moment is
    bounded: past ``patience`` it accepts anyway, and stops deferring for a second (a sibling that
    does not accept may be stuck)."""

    def __init__(self, connections: CountedConnections, patience: float = 0.05) -> None:
        self.connections = connections
        self.patience = patience
        self.since: float | None = None
        self.free_until = 0.0

    def gate(self) -> float:
        conns = self.connections
        if len(conns) > conns.counts.least_other(conns.index):
            now = time.monotonic()
            if now >= self.free_until:
                if self.since is None:
                    self.since = now
                if now - self.since < self.patience:
                    return 0.002
                self.free_until = now + 1.0
        self.since = None
        return 0.0

    def starved(self, out_of_descriptors: bool) -> bool:
        """The listener's ``on_starved``: publish that this worker is out of descriptors (or no
        longer); refuse a waiting connection here only if every other worker is out of them too."""
        conns = self.connections
        conns.starved = out_of_descriptors
        conns.publish()
        return conns.counts.least_other(conns.index) >= ConnectionCounts.STARVED


# --------------------------------------------------------------------------- the supervisor
class _Worker:
    def __init__(self, index: int, process: anyio.abc.Process, control: socket.socket) -> None:
        self.index = index
        self.process = process
        self.control = control
        self.buffer = b""
        self.error = ""
        self.recycled = False  # it said it stops because it was asked to (SIGTERM)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def message(self) -> bytes | None:
        """The worker's next line, or None once it closed its end (it exited)."""
        while b"\n" not in self.buffer:
            try:
                await anyio.wait_readable(self.control)
                data = self.control.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def rest(self) -> list[bytes]:
        """The lines the worker wrote that were not read yet (it exited: nothing more comes)."""
        while True:
            try:
                data = self.control.recv(65536)
            except OSError:
                break
            if not data:
                break
            self.buffer += data
        lines = self.buffer.split(b"\n")
        self.buffer = b""
        return [line for line in lines[:-1]]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.close()


def _how(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


class WorkerPool:
    """N worker processes serving one listening socket; ``serve(url)`` runs them until cancelled."""

    def __init__(
        self,
        factory: Target,
        workers: int,
        *,
        ssl_context: Target | None = None,
        backend: str = "asyncio",
        uvloop: bool = False,
        drain_timeout: float = 10.0,
        restart_limit: int = 5,
        restart_window: float = 10.0,
        socket_mode: int = 0o600,
    ) -> None:
        self.factory = factory
        self.workers = check_workers(workers)
        self.ssl_context = ssl_context
        self.backend = backend
        self.uvloop = uvloop
        if not drain_timeout >= 0:
            raise ValueError(f"drain_timeout={drain_timeout!r} must be a number of seconds >= 0")
        self.drain_timeout = float(drain_timeout)
        self.restart_limit = restart_limit
        self.restart_window = restart_window
        self.socket_mode = socket_mode
        self.export_names: list[str] = []
        self.pids: dict[int, int] = {}  # slot -> pid of the worker in it, while it runs
        self.url = ""
        self._exits: list[float] = []
        self._ready_slots: set[int] = set()
        self._up = anyio.Event()
        self._hurry = anyio.Event()
        self._counts: ConnectionCounts | None = None

    def hurry(self) -> None:
        """Cut the drain of stopping workers short (what a second Ctrl-C asks for)."""
        self._hurry.set()

    async def _open(self, url: str) -> tuple[Listener, list[tuple[int, str]]]:
        tls = self.ssl_context is not None
        activation = is_activation_url(url)
        if url.startswith("tls:") and not tls:
            raise ValueError(f"{url}: a tls:// listener needs ssl_context= (xrpc.server_ssl_context(...))")
        if tls and not url.startswith("tls:") and not activation:
            raise ValueError(f"{url}: ssl_context= is only for tls:// and systemd: URLs")
        if activation:
            listener: Listener = open_activated(url, tls=tls)
        else:
            listener = adopt_inherited(url) or await open_listener(url, socket_mode=self.socket_mode)
        if isinstance(listener, ActivatedListener):
            fds = [(p.fileno(), s.name) for p, s in zip(listener.parts, listener.sockets)]
        elif isinstance(listener, SocketListener):
            fds = [(listener.fileno(), "xrpc")]
        else:
            await listener.aclose()
            raise ValueError(f"{url}: worker processes need a socket to share: serve unix://, tcp://, tls:// or systemd: URLs")
        return listener, fds

    def _spec(self, index: int, fds: list[tuple[int, str]], control: int) -> WorkerSpec:
        root = logging.getLogger()
        return WorkerSpec(
            factory=self.factory,
            ssl_context=self.ssl_context,
            fds=[fd for fd, _ in fds],
            names=[name for _, name in fds],
            control=control,
            counts=self._counts.fd if self._counts is not None else None,
            index=index,
            workers=self.workers,
            backend=self.backend,
            uvloop=self.uvloop,
            drain_timeout=self.drain_timeout,
            sys_path=[p for p in sys.path if isinstance(p, str)],
            pythonpath=os.environ.get("PYTHONPATH"),
            log_level=root.getEffectiveLevel() if root.handlers else None,
        )

    async def _start(self, index: int, fds: list[tuple[int, str]]) -> _Worker:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            mine.setblocking(False)
            spec = self._spec(index, fds, theirs.fileno())
            env = {k: v for k, v in os.environ.items() if k not in _DROPPED_VARS}
            env[SPEC_VAR] = msgspec.json.encode(spec).decode()
            env["XRPC_WORKER_ID"] = str(index)
            # the directory xrpc is imported from first, so that ``-m xrpc._worker`` finds this copy
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
            with anyio.CancelScope(shield=True):  # never leave a process behind half-started
                process = await anyio.open_process(
                    worker_command(),
                    stdin=subprocess.DEVNULL,
                    stdout=None,
                    stderr=None,
                    env=env,
                    pass_fds=[fd for fd, _ in fds] + [theirs.fileno()] + ([self._counts.fd] if self._counts is not None else []),
                )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        worker = _Worker(index, process, mine)
        self.pids[index] = worker.pid
        log.debug("worker %d started (pid %d)", index, worker.pid)
        return worker

    async def _stop(self, worker: _Worker) -> None:
        """Ask ``worker`` to stop, give it its drain (less if hurried), kill it past that."""
        with anyio.CancelScope(shield=True):
            worker.close()  # EOF on its control socket: stop accepting, drain, exit
            with anyio.move_on_after(self.drain_timeout + _GRACE) as waiting:
                async with anyio.create_task_group() as tg:

                    async def hurry() -> None:
                        await self._hurry.wait()
                        with contextlib.suppress(ProcessLookupError):
                            worker.process.send_signal(signal.SIGTERM)

                    tg.start_soon(hurry)
                    await worker.process.wait()
                    tg.cancel_scope.cancel()
            if waiting.cancelled_caught:
                log.warning("worker %d (pid %d) did not stop within %gs: killing it", worker.index, worker.pid, self.drain_timeout + _GRACE)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
            await worker.process.aclose()
            self.pids.pop(worker.index, None)

    def _count_exit(self) -> None:
        now = anyio.current_time()
        self._exits = [t for t in self._exits if now - t < self.restart_window] + [now]
        if len(self._exits) >= self.restart_limit:
            message = f"{len(self._exits)} workers exited within {self.restart_window:g}s: giving up"
            log.error("%s", message)
            raise WorkerError(message)

    async def _slot(self, index: int, fds: list[tuple[int, str]]) -> None:
        while True:
            await anyio.lowlevel.checkpoint()  # cancelled: no new worker
            worker = await self._start(index, fds)
            ready = False

            def handle(line: bytes) -> None:
                nonlocal ready
                if line.startswith(b"ready ") and not ready:
                    info = msgspec.json.decode(line[6:], type=ReadyInfo)
                    ready = True
                    self.export_names = info.exports
                    self._ready_slots.add(index)
                    if len(self._ready_slots) == self.workers:
                        self._up.set()
                elif line.startswith(b"error "):
                    worker.error = line[6:].decode(errors="replace")
                elif line == b"recycle":
                    worker.recycled = True

            async def read_messages() -> None:
                while (line := await worker.message()) is not None:
                    handle(line)
                await anyio.sleep_forever()  # its end closed: the process itself says when it is gone

            try:
                # the worker's exit is its process's exit, not the end of its control socket: a
                # process it forked (a helper, a multiprocessing pool) may hold that end open
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read_messages)
                    code = await worker.process.wait()
                    tg.cancel_scope.cancel()
                for line in worker.rest():
                    handle(line)
            except BaseException:
                await self._stop(worker)
                raise
            worker.close()
            await worker.process.aclose()
            self.pids.pop(index, None)
            if self._counts is not None:
                self._counts.set(index, ConnectionCounts.ABSENT)
            what = f"worker {index} (pid {worker.pid}) {_how(code)}"
            if not ready and not self._up.is_set():
                detail = f": {worker.error}" if worker.error else " (its error is above)"
                raise WorkerError(f"{what} before it was ready{detail}")
            if worker.recycled and code == 0:
                log.info("%s after SIGTERM; starting another", what)
                continue  # recycled on purpose: not a failure the restart limit counts
            log.warning("%s%s; starting another", what, f" ({worker.error})" if worker.error else "")
            self._count_exit()

    async def serve(self, url: str, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``url``, run the workers until cancelled, then stop them (each drains) and return.

        Reports the bound URL through ``task_status`` once every worker is ready."""
        listener, fds = await self._open(url)
        self.url = listener.url
        self._counts = ConnectionCounts.create(self.workers)
        try:
            async with anyio.create_task_group() as tg:
                for i in range(self.workers):
                    tg.start_soon(self._slot, i, fds)
                await self._up.wait()
                log.info("serving %s on %s with %d workers", ", ".join(self.export_names), listener.url, self.workers)
                task_status.started(listener.url)
                try:
                    async with service_lifecycle(f"serving on {listener.url} with {self.workers} workers"):
                        await anyio.sleep_forever()
                finally:
                    # stop accepting now (a unix socket file goes away); the workers drain meanwhile
                    with anyio.CancelScope(shield=True):
                        await listener.aclose()
        except BaseExceptionGroup as group:
            failures = [e for e in group.exceptions if isinstance(e, WorkerError)]
            if failures:
                raise failures[0] from None
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            if self._counts is not None:
                self._counts.close()
                self._counts = None


def _only(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside ``group`` (nested groups flattened), if there is exactly one."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None


async def serve_until_signalled(
    pool: WorkerPool, url: str, received: AsyncIterator[Any] | None, on_ready: Callable[[str], object] | None = None
) -> None:
    """Run ``pool`` on ``url`` until the first signal from ``received`` (forever without one); a
    second signal cuts the workers' drain short.  A failure (``WorkerError``, ``TransportError``...)
    is raised as itself, not inside an exception group."""
    try:
        await _serve_until_signalled(pool, url, received, on_ready)
    except BaseExceptionGroup as group:
        inner = _only(group)
        if inner is None:
            raise
        raise inner from None


async def _serve_until_signalled(
    pool: WorkerPool, url: str, received: AsyncIterator[Any] | None, on_ready: Callable[[str], object] | None
) -> None:

    async def second_signal() -> None:
        assert received is not None
        async for _ in received:
            pool.hurry()
            return

    async with anyio.create_task_group() as outer:
        async with anyio.create_task_group() as tg:
            bound = await tg.start(pool.serve, url)
            if on_ready is not None:
                on_ready(bound)
            if received is None:
                await anyio.sleep_forever()
            else:
                async for _ in received:
                    break
                outer.start_soon(second_signal)
            tg.cancel_scope.cancel()
        outer.cancel_scope.cancel()

