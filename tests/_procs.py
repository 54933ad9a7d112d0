"""Helpers for tests that run an xrpc server (or another victim) in a child process.

A child is started as ``sys.executable -c child_main(module, entry)``: the command puts the tests
directory on ``sys.path`` and calls ``entry`` (by default ``_server_main``) of the test module with
the remaining arguments.  The child prints ``READY <url> ...`` once it listens, and runs until its
stdin is closed (``serve_until_stdin_closes``).  Its RSS and descriptor count are read from
``/proc``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import anyio
import anyio.to_thread
from _timeouts import T

TESTS_DIR = str(Path(__file__).parent)
ROOT_DIR = str(Path(__file__).parent.parent)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment with ``env`` added, and this checkout first on ``PYTHONPATH``: a child run as
    a script imports xrpc from its script's directory and then the interpreter's environment, which
    may have another checkout installed; the code under test is the one this test imported."""
    out = {**os.environ, **(env or {})}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT_DIR, out.get("PYTHONPATH")]))
    return out


def short_dir() -> str:
    """A new directory under /tmp with a short name: Unix socket paths are limited to ~100 bytes."""
    return tempfile.mkdtemp(prefix="xr", dir="/tmp")


def status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of process ``pid``, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def own_rss() -> int:
    return status(os.getpid())["VmRSS"]


def fd_count(pid: int) -> int:
    """How many descriptors process ``pid`` holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def kernel_has_peer_pidfd() -> bool:
    """Does the kernel give a Unix socket's peer as a pidfd (``SO_PEERPIDFD``, Linux 6.5+)?"""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        try:
            fd = a.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEERPIDFD", 77))
        except OSError:
            return False
    os.close(fd)
    return True


def child_main(module: str, entry: str = "_server_main") -> str:
    """The ``-c`` program of a child: ``module.entry(*argv[2:])``, with ``argv[1]`` on ``sys.path``."""
    return f"import sys; sys.path.insert(0, sys.argv[1]); from {module} import {entry}; {entry}(*sys.argv[2:])"


def log_to(log_path: str) -> None:
    """In the child: log at INFO and above to ``log_path``, one record a line, level first."""
    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(levelname)s %(name)s %(message)s")


async def serve_until_stdin_closes(*urls: str) -> None:
    """In the child: announce ``READY <urls>``, then wait until the test closes our stdin."""
    print("READY", *urls, flush=True)
    await anyio.to_thread.run_sync(sys.stdin.read)


def errors_in(lines: list[str]) -> list[str]:
    """The lines of a child's output that are ERROR or CRITICAL records, or start a traceback."""
    return [line for line in lines if line.startswith(("ERROR", "CRITICAL")) or "Traceback" in line]


class ChildProcess:
    """A child process on a Unix socket in a fresh short directory, logging to files in it.

    ``self.path`` is the socket path and ``self.log_path`` the log file to pass to the child;
    ``start`` spawns it and waits (``3 * T`` at most) for its ``READY`` line.  ``stop`` closes its
    stdin, waits for it to exit (``2 * T``), and returns the lines of its log and of its stderr.
    ``strict`` makes a child that has to be killed an ``AssertionError``.  ``start`` runs a function of
    a test module, ``start_script`` a whole program given as text.
    """

    def __init__(self, *, name: str = "server", what: str = "the server process", log: bool = True, strict: bool = True) -> None:
        self.dir = short_dir()
        self.path = f"{self.dir}/s.sock"
        self.log_path = f"{self.dir}/{name}.log"
        self.err_path = f"{self.dir}/{name}.err"
        self.what = what
        self.strict = strict
        self._outputs = [self.log_path, self.err_path] if log else [self.err_path]
        self.ready: list[str] = []
        self.url = ""

    def start(self, module: str, *args: str, entry: str = "_server_main", env: dict[str, str] | None = None) -> None:
        """Run ``module.entry(*args)`` (see ``child_main``) as the child."""
        self.spawn([sys.executable, "-c", child_main(module, entry), TESTS_DIR, *args], env=env)

    def start_script(self, source: str, *args: str, env: dict[str, str] | None = None) -> None:
        """Run the program ``source``, written to a file in ``self.dir``, with ``args``."""
        script = f"{self.dir}/child.py"
        Path(script).write_text(source)
        self.spawn([sys.executable, script, *args], env=env)

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``argv`` (``env`` added to ours) and wait for its ``READY`` line."""
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=child_env(env),
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 3 * T)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"{self.what} did not start: {line!r}")
        self.ready = line.split()
        self.url = self.ready[1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return status(self.proc.pid)["VmRSS"]

    def peak(self) -> int:
        return status(self.proc.pid)["VmHWM"]

    def fds(self) -> int:
        return fd_count(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """What the child has logged and written to stderr so far."""
        text = ""
        for p in self._outputs:
            with contextlib.suppress(FileNotFoundError):
                text += Path(p).read_text()
        return text

    def stop(self, *, kill: bool = False) -> list[str]:
        """Stop the child (``kill``: with SIGKILL, not by closing its stdin); return its log lines
        (and whatever it wrote to stderr)."""
        try:
            if kill:
                self.proc.kill()
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=2 * T)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=2 * T)
                if self.strict:
                    raise AssertionError(f"{self.what} did not stop when asked")
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            lines = []
            for p in self._outputs:
                with contextlib.suppress(FileNotFoundError):
                    lines += Path(p).read_text().splitlines()
            shutil.rmtree(self.dir, ignore_errors=True)
        return lines


class Watch:
    """A process by pidfd, so its exit can be awaited (also one that is not our child)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    async def exited(self, timeout: float = T) -> None:
        with anyio.fail_after(timeout):
            await anyio.wait_readable(self.fd)

    def alive(self) -> bool:
        return not select.select([self.fd], [], [], 0)[0]

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def watch(pid: int) -> Iterator[Watch]:
    """A ``Watch`` of process ``pid``, its pidfd closed at the end."""
    w = Watch(pid)
    try:
        yield w
    finally:
        w.close()
