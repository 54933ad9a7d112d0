"""Hostile review of the multi-worker server (issue 15 point 4): ``xrpc.run(factory, url, workers=N)``.

The attackers: another local user who can write to the directory the server is started from, a
service that forks a helper process of its own (``multiprocessing`` does), a peer that exhausts one
worker's descriptors, and an operator who recycles every worker in turn.  Each test ran real
processes and failed before the fix it names.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Protocol

import anyio
import anyio.abc
import pytest
from _procs import ROOT_DIR, child_env, short_dir
from _timeouts import T

import xrpc

pytestmark = pytest.mark.timeout(120)


@xrpc.interface
class Probe(Protocol):
    async def pid(self) -> int: ...


SERVER = """
import logging, os, resource, sys, time, typing
import xrpc

logging.basicConfig(filename=os.environ["AW_LOG"], level=logging.INFO, format="%(levelname)s %(process)d %(message)s")
HERE = os.path.dirname(os.path.abspath(__file__))


@xrpc.interface
class Probe(typing.Protocol):
    async def pid(self) -> int: ...


class ProbeImpl:
    async def pid(self) -> int:
        return os.getpid()


def make():
    mode = os.environ.get("AW_MODE", "")
    worker = os.environ.get("XRPC_WORKER_ID")
    if mode == "fork":  # a helper process of the service's own, forked as multiprocessing does
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        with open(os.path.join(HERE, "helpers"), "a") as f:
            f.write(f"{child}\\n")
    if mode == "fdlimit" and worker == "0":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(os.environ["AW_LIMIT"]), hard))
    server = xrpc.Server()
    server.export(Probe, ProbeImpl())
    open(os.path.join(HERE, f"started-{os.getpid()}"), "w").close()
    return server


if __name__ == "__main__":
    xrpc.run(make, "unix://" + os.path.join(HERE, "s.sock"), workers=int(os.environ.get("AW_WORKERS", "2")),
             ready=lambda url: print("READY", url, flush=True))
"""


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(p) for p in f.read().split()}
    except OSError:
        return set()


def _wait_for(condition, what: str, timeout: float = 3 * T) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Pool:
    """The server script above, run with ``env`` from ``cwd`` (its own directory by default)."""

    def __init__(self, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.dir = Path(short_dir())
        self.script = self.dir / "srv.py"
        self.script.write_text(SERVER)
        self.log = self.dir / "server.log"
        self.url = f"unix://{self.dir}/s.sock"
        self.env = {"AW_LOG": str(self.log), **(env or {})}
        self.cwd = cwd or str(self.dir)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start it; its first line (``READY url`` or what it printed instead)."""
        with open(self.dir / "server.err", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(self.script)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=child_env(self.env),
                cwd=self.cwd,
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 6 * T)
        return self.proc.stdout.readline().decode().strip() if ready else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> set[int]:
        return _children(self.pid)

    def gone(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def started(self, pid: int) -> bool:
        return (self.dir / f"started-{pid}").exists()

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(4 * T)
        except subprocess.TimeoutExpired:
            for pid in self.workers():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(T)
            raise AssertionError("the server did not stop on SIGTERM") from None
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            helpers = self.dir / "helpers"
            if helpers.exists():
                for line in helpers.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(line), signal.SIGKILL)


@contextlib.contextmanager
def pool(env: dict[str, str] | None = None, cwd: str | None = None) -> Iterator[Pool]:
    p = Pool(env, cwd)
    try:
        line = p.start()
        assert line.startswith("READY "), f"the server did not start: {line!r}\n{(p.dir / 'server.err').read_text()}"
        yield p
    finally:
        p.stop()


async def _pid_of_a_call(url: str) -> int:
    with anyio.fail_after(T):
        async with xrpc.connect(url) as conn:
            return await conn.proxy(Probe).pid()


# --------------------------------------------------------------------------- who a worker imports
def test_a_worker_does_not_import_code_planted_in_the_current_directory(tmp_path: Path) -> None:
    """Another local user who can write to the directory the server runs from (``/tmp``, a shared
    checkout) plants ``xrpc/__init__.py`` there.  The server itself never imports from it (a
    script's ``sys.path`` starts with the script's own directory), but each worker was started as
    ``python -m xrpc._worker``, whose ``sys.path`` starts with the current directory: every worker
    ran the planted code as the server's user.  Fixed: a worker's ``sys.path`` starts as the
    server's, with the current directory only where the server had it."""
    planted = tmp_path / "xrpc"
    planted.mkdir()
    marker = tmp_path / "ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('planted code ran')\nraise SystemExit(7)\n")
    with pool(cwd=str(tmp_path)) as p:
        assert anyio.run(_pid_of_a_call, p.url) in p.workers()
    assert not marker.exists(), "a worker imported xrpc from the current directory"


# --------------------------------------------------------------------------- supervision
def test_a_worker_whose_forked_helper_outlives_it_is_still_replaced() -> None:
    """A service that forks a helper (``multiprocessing``'s default on Linux, a pre-forked pool):
    the helper inherits the worker's end of its control socket.  The supervisor took the end of
    that socket for the worker's exit, so a worker killed while its helper lived was never reaped
    nor replaced: the slot stayed empty for as long as the helper lived.  Fixed: the supervisor
    waits for the worker process itself."""
    with pool({"AW_MODE": "fork"}) as p:
        _wait_for(lambda: len(p.workers()) == 2, "two workers")
        victim = min(p.workers())
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: victim not in p.workers() and len(p.workers()) == 2, "the killed worker to be replaced")
        replacement = (p.workers() - {victim}).pop()
        _wait_for(lambda: p.started(replacement), "the replacement to build its server")
        assert "was killed by SIGKILL; starting another" in p.log_text()


def test_recycling_every_worker_in_turn_does_not_stop_the_server() -> None:
    """SIGTERM to a worker is the documented way to recycle it.  An operator recycling every worker
    of a pool in turn (each replacement up before the next SIGTERM) reached the restart limit (5
    exits within 10 s) and the whole server gave up with ``WorkerError``.  Fixed: a worker that
    stops because it was asked to, and exits cleanly, is not counted as a failure."""
    with pool({"AW_WORKERS": "2"}) as p:
        for _ in range(6):
            _wait_for(lambda: p.gone() or (len(p.workers()) == 2 and all(p.started(w) for w in p.workers())), "two workers up")
            assert not p.gone(), f"the server gave up:\n{p.log_text()}"
            victim = min(p.workers())
            os.kill(victim, signal.SIGTERM)
            _wait_for(lambda: victim not in p.workers(), "the recycled worker to exit")
        _wait_for(lambda: len(p.workers()) == 2 and all(p.started(w) for w in p.workers()), "two workers up")
        assert p.proc is not None and p.proc.poll() is None, f"the server gave up:\n{p.log_text()}"
        assert anyio.run(_pid_of_a_call, p.url) in p.workers()
        assert "giving up" not in p.log_text()


# --------------------------------------------------------------------------- descriptors
async def _connect_many(url: str, count: int) -> int:
    """Open ``count`` connections one after the other, each making one call and staying open; how
    many were refused."""
    refused = 0
    done = anyio.Event()

    async def hold(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        nonlocal refused
        up = False
        try:
            async with xrpc.connect(url) as conn:
                await conn.proxy(Probe).pid()
                up = True
                task_status.started()
                await done.wait()
        except (xrpc.Error, OSError):
            if not up:
                refused += 1
                task_status.started()

    with anyio.fail_after(6 * T):
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                with anyio.fail_after(T):
                    await tg.start(hold)
            done.set()
    return refused


def test_a_worker_out_of_descriptors_leaves_new_connections_to_the_others() -> None:
    """A peer fills one worker up to its descriptor limit (connections that never end).  Alone, a
    server at its limit refuses the next waiting connection cleanly rather than leave it in the
    backlog; with workers, the starved worker took and refused connections that another worker
    had room for.  Fixed: a worker out of descriptors leaves waiting connections to the others, and
    refuses only when every other worker is out of descriptors too."""
    with pool({"AW_MODE": "fdlimit", "AW_LIMIT": "40"}) as p:
        refused = anyio.run(_connect_many, p.url, 120)
        assert refused == 0, f"{refused} of 120 connections were refused while a worker had room"
        assert "at the descriptor limit" in (p.dir / "server.err").read_text()  # the workers log to stderr
