"""``xrpc.run(server, url)``: a server script's main that Ctrl-C and SIGTERM stop without a traceback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import anyio
import pytest

import xrpc
from _procs import short_dir
from _timeouts import T

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import sys
    from typing import Protocol

    import anyio

    import xrpc


    @xrpc.interface()
    class Hello(Protocol):
        async def greet(self, name: str) -> str: ...


    class HelloService:
        def __init__(self) -> None:
            self.event = anyio.Event()  # made inside the loop when a factory is given

        async def greet(self, name: str) -> str:
            return f"Hello, {name}!"


    def make() -> xrpc.Server:
        server = xrpc.Server()
        server.export(Hello, HelloService())
        return server


    if __name__ == "__main__":
        xrpc.run(make if sys.argv[2] == "factory" else make(), sys.argv[1], ready=print)
        print("stopped cleanly")
    """
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(short_dir())
    (d / "hello.py").write_text(SCRIPT)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("how", ["factory", "instance"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_serves_until_a_signal_then_returns_quietly(workdir: Path, sig: signal.Signals, how: str) -> None:
    sock = workdir / "hello.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(workdir)])}
    proc = subprocess.Popen(
        [sys.executable, "-W", "error", str(workdir / "hello.py"), f"unix://{sock}", how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=workdir,
    )
    try:
        assert proc.stdout is not None
        # ready=print is flushed although stdout is a pipe: the parent sees the URL at once
        line = proc.stdout.readline().strip()
        assert line == f"unix://{sock}"

        async def call() -> str:
            with anyio.fail_after(T):
                async with xrpc.connect(line) as conn:
                    from hello import Hello  # type: ignore[import-not-found]

                    return str(await conn.proxy(Hello).greet("world"))

        sys.path.insert(0, str(workdir))
        try:
            assert anyio.run(call) == "Hello, world!"
        finally:
            sys.path.remove(str(workdir))
            sys.modules.pop("hello", None)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=T)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=T)
    assert proc.returncode == 0, err
    assert out.strip() == "stopped cleanly"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not sock.exists(), "the socket file is removed"


def test_run_refuses_what_is_not_a_server() -> None:
    with pytest.raises(TypeError, match="xrpc.Server"):
        xrpc.run(42, "memory://x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="returned int"):
        xrpc.run(lambda: 42, "memory://x")  # type: ignore[arg-type,return-value]


def test_run_in_a_thread_serves_and_reports_the_bound_url() -> None:
    """Off the main thread no signal arrives: it serves until its loop is cancelled some other way;
    here ``ready`` raises to stop it after checking the URL."""
    seen: list[str] = []

    class Stop(Exception):
        pass

    def ready(url: str) -> None:
        seen.append(url)
        raise Stop

    import threading

    errors: list[BaseException] = []

    def target() -> None:
        try:
            xrpc.run(xrpc.Server(), "tcp://127.0.0.1:0", ready=ready)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join(T)
    assert not t.is_alive()
    assert len(seen) == 1 and seen[0].startswith("tcp://127.0.0.1:") and not seen[0].endswith(":0")
    assert len(errors) == 1


LOOP_SCRIPT = textwrap.dedent(
    """
    import asyncio
    import sys
    from typing import Protocol

    import xrpc


    @xrpc.interface()
    class Loop(Protocol):
        async def loop_module(self) -> str: ...


    class LoopService:
        async def loop_module(self) -> str:
            return type(asyncio.get_running_loop()).__module__


    def make() -> xrpc.Server:
        server = xrpc.Server()
        server.export(Loop, LoopService())
        return server


    if __name__ == "__main__":
        xrpc.run(make, sys.argv[1], ready=print, backend=sys.argv[2])
    """
)


def _loop_module(cmd: list[str], workdir: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(workdir)])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("unix://"), proc.stderr.read() if proc.stderr else ""

        async def call() -> str:
            with anyio.fail_after(T):
                async with xrpc.connect(url) as conn:
                    from loopy import Loop  # type: ignore[import-not-found]

                    return str(await conn.proxy(Loop).loop_module())

        sys.path.insert(0, str(workdir))
        try:
            return anyio.run(call)
        finally:
            sys.path.remove(str(workdir))
            sys.modules.pop("loopy", None)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=T)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=T)


@pytest.mark.parametrize("backend", ["asyncio", "uvloop"])
def test_run_and_xrpc_serve_run_on_the_event_loop_asked_for(workdir: Path, backend: str) -> None:
    pytest.importorskip("uvloop", reason="uvloop is not installed (pip install 'xrpc[uvloop]')")
    (workdir / "loopy.py").write_text(LOOP_SCRIPT)
    expected = "uvloop" if backend == "uvloop" else "asyncio.unix_events"
    got = _loop_module([sys.executable, str(workdir / "loopy.py"), f"unix://{workdir}/a.sock", backend], workdir)
    assert got == expected
    got = _loop_module(
        [sys.executable, "-m", "xrpc", "serve", "loopy:make", f"unix://{workdir}/b.sock", "--loop", backend], workdir
    )
    assert got == expected


def test_run_refuses_an_unknown_event_loop() -> None:
    with pytest.raises(ValueError, match="'asyncio', 'uvloop' or 'trio'"):
        xrpc.run(xrpc.Server(), "memory://x", backend="tokio")
