"""Services: lookup, launch on demand, interruption and invalidation, reconnect, upgrade, idle exit.

Every test here runs real service processes (``tests/services_fixtures``) under a private runtime
directory (``XRPC_RUNTIME_DIR``), and kills what it started when it ends.  Waits are on events:
readiness pipes, callbacks from the service, and pidfds for process exits, each bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Protocol, cast

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import xrpc
from xrpc._services import (
    TRANSITIONS,
    ServiceDescriptionError,
    ServiceNotFound,
    ServiceUnavailable,
    connect_service,
    find_service,
    load_description,
    lock_path,
    runtime_dir,
    service_search_path,
    socket_path,
    state_diagram,
    transition_table,
)

from services_fixtures.probe import Client, Probe
from _timeouts import T
from _procs import Watch, short_dir, watch

HERE = Path(__file__).parent
ROOT = HERE.parent
NAME = "com.example.probe"
PROBE = "services_fixtures.probe:make_server"


# --------------------------------------------------------------------------- helpers
def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


@dataclasses.dataclass
class Env:
    """A private runtime directory and a service directory for one test."""

    root: Path
    services: Path
    launches_log: Path

    @property
    def search_path(self) -> list[Path]:
        return [self.services]

    def describe(self, name: str = NAME, *, directory: Path | None = None, fmt: str = "toml", **fields: Any) -> Path:
        """Write a description; ``environment`` is merged over the test defaults."""
        env = {"PYTHONPATH": str(HERE), "PROBE_LOG": str(self.launches_log)}
        env.update(fields.pop("environment", {}))
        data: dict[str, Any] = {"name": name}
        if "command" not in fields:
            data["module"] = PROBE
        data.update(fields)
        data["environment"] = env
        path = (directory or self.services) / f"{name}.{fmt}"
        if fmt == "toml":
            path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in data.items()))
        else:
            path.write_text(json.dumps(data))
        return path

    def launched(self) -> list[int]:
        """The pids of every service instance started in this test, in order."""
        try:
            return [int(line) for line in self.launches_log.read_text().split()]
        except FileNotFoundError:
            return []


def _kill_if_ours(pid: int, root: Path) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                ours = f"XRPC_RUNTIME_DIR={root}".encode() in f.read().split(b"\0")
        except OSError:
            return
        if ours:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], T)
    finally:
        os.close(pidfd)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    # AF_UNIX paths are limited to ~108 bytes: keep the runtime directory short.
    root = Path(short_dir())
    monkeypatch.setenv("XRPC_RUNTIME_DIR", str(root))
    monkeypatch.delenv("XRPC_SERVICE_PATH", raising=False)
    services = root / "services"
    services.mkdir()
    e = Env(root, services, root / "launches.log")
    try:
        yield e
    finally:
        for pid in e.launched():
            _kill_if_ours(pid, root)
        shutil.rmtree(root, ignore_errors=True)


class ClientImpl:
    """What a test client exports: answers ``on_connect``'s hello, hears ``started``."""

    def __init__(self) -> None:
        self.hellos: list[str] = []
        self.starts: list[str] = []
        self._started = anyio.Event()

    async def hello(self, token: str) -> str:
        self.hellos.append(token)
        return f"ack {token}"

    async def started(self, what: str) -> None:
        self.starts.append(what)
        self._started.set()

    def expect_start(self) -> anyio.Event:
        self._started = anyio.Event()
        return self._started


class Events:
    """Records ``on_interrupted`` / ``on_invalidated`` and lets a test wait for them."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._changed = anyio.Event()

    def _add(self, what: str) -> None:
        self.seen.append(what)
        self._changed.set()
        self._changed = anyio.Event()

    def interrupted(self) -> None:
        self._add("interrupted")

    def invalidated(self) -> None:
        self._add("invalidated")

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(T):
            while len(self.seen) < count:
                await self._changed.wait()

    def kwargs(self) -> dict[str, Any]:
        return {"on_interrupted": self.interrupted, "on_invalidated": self.invalidated}


# --------------------------------------------------------------------------- lookup and descriptions
def test_not_found_names_the_service_every_place_and_the_cause(env: Env) -> None:
    one = env.root / "one"
    one.mkdir()
    missing = env.root / "missing"
    with pytest.raises(ServiceNotFound) as info:
        find_service("com.example.nowhere", [one, missing])
    assert str(info.value) == (
        "no service named 'com.example.nowhere': looked for com.example.nowhere.toml or "
        "com.example.nowhere.json in these directories, in this order:\n"
        f"  1. {one} (no such file)\n"
        f"  2. {missing} (directory does not exist)\n"
        "Likely cause: the service is not installed: put com.example.nowhere.toml into one of these "
        "directories, or add the directory that holds it to XRPC_SERVICE_PATH."
    )
    assert info.value.name == "com.example.nowhere"
    assert info.value.searched == (one, missing)
    assert isinstance(info.value, xrpc.Error)
    assert isinstance(info.value, xrpc.ConnectionInvalidated)


def test_not_found_suggests_a_misspelt_name(env: Env) -> None:
    env.describe("com.example.indexer")
    with pytest.raises(ServiceNotFound) as info:
        find_service("com.example.indexr", env.search_path)
    assert str(info.value) == (
        "no service named 'com.example.indexr': looked for com.example.indexr.toml or "
        "com.example.indexr.json in these directories, in this order:\n"
        f"  1. {env.services} (no such file)\n"
        f"Likely cause: {env.services / 'com.example.indexer.toml'} describes 'com.example.indexer': "
        "is the name misspelt?"
    )


def test_not_found_when_no_directory_exists(env: Env) -> None:
    a, b = env.root / "a", env.root / "b"
    with pytest.raises(ServiceNotFound) as info:
        find_service("com.example.x", [a, b])
    assert str(info.value).endswith(
        f"  1. {a} (directory does not exist)\n"
        f"  2. {b} (directory does not exist)\n"
        "Likely cause: none of these directories exists: the service is not installed, "
        "or XRPC_RUNTIME_DIR / XRPC_SERVICE_PATH do not point where it is."
    )


async def test_connect_service_looks_up_at_once(env: Env) -> None:
    with pytest.raises(ServiceNotFound, match="no service named 'com.example.absent'"):
        async with connect_service("com.example.absent", search_path=env.search_path):
            pytest.fail("the block must not run")  # pragma: no cover


def test_search_path_and_runtime_paths(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XRPC_SERVICE_PATH", os.pathsep.join(["/opt/a", "", "/opt/b"]))
    assert service_search_path() == [
        env.root / "xrpc" / "services",
        Path("/etc/xrpc/services"),
        Path("/usr/share/xrpc/services"),
        Path("/opt/a"),
        Path("/opt/b"),
    ]
    assert socket_path(NAME) == env.root / "xrpc" / "sockets" / f"{NAME}.sock"
    assert lock_path(NAME) == env.root / "xrpc" / "locks" / f"{NAME}.lock"
    monkeypatch.delenv("XRPC_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert runtime_dir() == Path("/run/user/1234/xrpc")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime_dir() == Path(f"/tmp/xrpc-{os.getuid()}")
    with pytest.raises(ValueError, match="not a valid service name"):
        socket_path("../etc/passwd")


def test_default_search_path_finds_the_first(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    user = env.root / "xrpc" / "services"
    user.mkdir(parents=True)
    extra = env.root / "extra"
    extra.mkdir()
    monkeypatch.setenv("XRPC_SERVICE_PATH", str(extra))
    env.describe(directory=extra, fmt="json", idle_exit=7)
    assert find_service(NAME).path == extra / f"{NAME}.json"
    env.describe(directory=user, idle_exit=3)
    desc = find_service(NAME)
    assert desc.path == user / f"{NAME}.toml"
    assert desc.idle_exit == 3.0


def test_toml_and_json_descriptions_agree(env: Env) -> None:
    fields: dict[str, Any] = dict(
        idle_exit=1.5,
        working_directory="work",
        restart="on-demand",
        launch_timeout=4,
        log_file="service.log",
        environment={"A": "1"},
    )
    t = load_description(env.describe(**fields))
    j = load_description(env.describe(directory=env.root, fmt="json", **fields))
    assert dataclasses.replace(t, path=j.path, working_directory=j.working_directory, log_file=j.log_file) == j
    assert t.module == PROBE
    assert t.command is None
    assert t.environment["A"] == "1"
    assert t.working_directory == env.services / "work"
    assert t.log_file == env.services / "service.log"
    assert t.launch_timeout == 4.0
    assert t.argv() == [sys.executable, "-m", "xrpc.service", NAME, "--description", str(env.services / f"{NAME}.toml")]


@pytest.mark.parametrize(
    "text, message",
    [
        ('name = "com.example.probe"\nmodule = "a.b:c"\nidle_exti = 3\n', "unknown key 'idle_exti'"),
        ('name = "com.example.other"\nmodule = "a.b:c"\n', "'name' is 'com.example.other' but the file is named for 'com.example.probe'"),
        ('name = "com.example.probe"\n', "give exactly one of 'command'"),
        ('name = "com.example.probe"\nmodule = "a:b"\ncommand = ["x"]\n', "give exactly one of 'command'"),
        ('name = "com.example.probe"\ncommand = []\n', "'command' must be a non-empty list"),
        ('name = "com.example.probe"\nmodule = "not a module"\n', "'module' must look like 'package.module:factory'"),
        ('name = "com.example.probe"\nmodule = "a:b"\nidle_exit = -1\n', "'idle_exit' must be a number of seconds >= 0"),
        ('name = "com.example.probe"\nmodule = "a:b"\nrestart = "always"\n', "'restart' must be one of 'on-demand', 'manual'"),
        ('name = "com.example.probe"\nmodule = "a:b"\nenvironment = { A = 1 }\n', "'environment' must be a table of string values"),
        ('name = "com.example.probe"\nmodule = "a:b"\nreadiness = "socket"\n', "a 'module' service always reports readiness"),
        ('name = "com.example.probe"\nmodule = ', "not valid TOML"),
    ],
)
def test_bad_descriptions_are_named(env: Env, text: str, message: str) -> None:
    path = env.services / f"{NAME}.toml"
    path.write_text(text)
    with pytest.raises(ServiceDescriptionError) as info:
        find_service(NAME, env.search_path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_the_state_diagram_in_the_docs_is_the_code_s() -> None:
    doc = (ROOT / "docs" / "services.md").read_text()
    assert "```mermaid\n" + state_diagram() + "```\n" in doc
    assert transition_table() in doc
    # every state can be left except the terminal one, and every state is reachable
    states = {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values())
    assert states == {"idle", "connecting", "connected", "interrupted", "invalidated"}
    assert all(s != "invalidated" for s, _ in TRANSITIONS)
    assert all((s, "aclose") in TRANSITIONS for s in states - {"invalidated"})


# --------------------------------------------------------------------------- launch on demand
@pytest.mark.timeout(600)
async def test_200_cold_launches_with_a_callback_in_on_connect_lose_nothing(env: Env) -> None:
    env.describe(idle_exit=0)
    pids: list[int] = []
    launch_times: list[float] = []
    t_all = time.monotonic()
    for i in range(200):
        client = ClientImpl()
        t0 = time.monotonic()
        with contextlib.ExitStack() as stack:
            async with connect_service(NAME, exports=[(Client, client)], search_path=env.search_path) as sc:
                p = sc.proxy(Probe)
                with anyio.fail_after(T):
                    pid = await p.pid()
                launch_times.append(time.monotonic() - t0)
                w = stack.enter_context(watch(pid))
                assert sc.launches == 1, f"iteration {i}: the service was already running"
                # on_connect called back before the first call was served, and both sides saw it
                assert client.hellos == [str(pid)]
                assert await p.greetings() == [f"ack {pid}"]
            await w.exited()  # idle_exit = 0: it exits once its only client is gone
        pids.append(pid)
    total = time.monotonic() - t_all
    assert len(set(pids)) == 200
    assert env.launched() == pids
    launch_times.sort()
    print(
        f"\n200 cold launches in {total:.1f}s ({total / 200 * 1000:.0f} ms per cycle); "
        f"launch+first call median {launch_times[100] * 1000:.0f} ms, max {launch_times[-1] * 1000:.0f} ms"
    )


async def test_concurrent_first_calls_share_one_launch(env: Env) -> None:
    env.describe(environment={"PROBE_START_DELAY": "0.2"})
    async with connect_service(NAME, search_path=env.search_path) as sc:
        p = sc.proxy(Probe)
        got: list[int] = []

        async def call() -> None:
            got.append(await p.pid())

        with anyio.fail_after(T):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(call)
        assert len(set(got)) == 1 and len(got) == 20
        assert sc.launches == 1
        assert env.launched() == got[:1]


async def test_two_clients_racing_to_launch_get_one_instance(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # a slow start-up keeps the window open in which every client finds nothing listening
    env.describe(environment={"PROBE_START_DELAY": "0.5"})
    monkeypatch.setenv("XRPC_SERVICE_PATH", str(env.services))
    child_env = dict(os.environ, PYTHONPATH=str(HERE))
    procs = []
    pids: list[int] = []
    try:
        for _ in range(2):
            procs.append(
                await anyio.open_process(
                    [sys.executable, "-m", "services_fixtures.race_client", NAME],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=None,
                    env=child_env,
                )
            )
        outs = [BufferedByteReceiveStream(p.stdout) for p in procs]  # type: ignore[arg-type]
        with anyio.fail_after(T):
            for out in outs:
                assert await out.receive_until(b"\n", 100) == b"waiting"

        async def remote(proc: Any, out: BufferedByteReceiveStream) -> None:
            await proc.stdin.send(b"go\n")
            pids.append(int(await out.receive_until(b"\n", 100)))

        async def local() -> None:
            async with connect_service(NAME) as sc:
                pids.append(await sc.proxy(Probe).pid())

        with anyio.fail_after(T):
            async with anyio.create_task_group() as tg:
                for proc, out in zip(procs, outs):
                    tg.start_soon(remote, proc, out)
                for _ in range(2):
                    tg.start_soon(local)
            for proc in procs:
                assert await proc.wait() == 0
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()
                await proc.aclose()
    assert len(pids) == 4
    assert len(set(pids)) == 1, pids
    assert env.launched() == pids[:1]  # the service itself says it started once


async def test_stale_socket_and_a_dead_launcher_s_lock_do_not_block(env: Env) -> None:
    env.describe()
    sock = socket_path(NAME)
    sock.parent.mkdir(parents=True, mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))  # a socket file nobody listens on: what a crash leaves
    s.close()
    lock = lock_path(NAME)
    lock.parent.mkdir(parents=True, mode=0o700)
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    async with await anyio.open_process([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as holder:
        out = BufferedByteReceiveStream(holder.stdout)  # type: ignore[arg-type]
        with anyio.fail_after(T):
            assert await out.receive_until(b"\n", 100) == b"locked"
        holder.kill()  # a launcher that died holding the lock
        await holder.wait()
    assert sock.exists() and lock.exists()
    async with connect_service(NAME, search_path=env.search_path) as sc:
        with anyio.fail_after(T):
            pid = await sc.proxy(Probe).pid()
        assert sc.launches == 1
    assert env.launched() == [pid]


async def test_launch_failure_is_reported_and_retried(env: Env) -> None:
    env.describe(environment={"PROBE_FAIL": "no database today"})
    async with connect_service(NAME, search_path=env.search_path) as sc:
        p = sc.proxy(Probe)
        for attempt in (1, 2):
            with anyio.fail_after(T), pytest.raises(ServiceUnavailable) as info:
                await p.pid()
            assert str(info.value) == (
                f"service {NAME!r} ({env.services / (NAME + '.toml')}) exited before it was ready: "
                f"{NAME}: RuntimeError: no database today"
            )
            assert sc.state == "idle"
            assert len(env.launched()) == attempt


async def test_log_file_receives_the_service_s_output(env: Env) -> None:
    env.describe(log_file="probe.log", environment={"PROBE_FAIL": "see the log"})
    async with connect_service(NAME, search_path=env.search_path) as sc:
        with anyio.fail_after(T), pytest.raises(ServiceUnavailable, match="RuntimeError: see the log"):
            await sc.proxy(Probe).pid()
    text = (env.services / "probe.log").read_text()
    assert "Traceback (most recent call last)" in text
    assert "xrpc.service: com.example.probe: RuntimeError: see the log" in text


async def test_launch_timeout_kills_the_service(env: Env) -> None:
    env.describe(launch_timeout=3.0, environment={"PROBE_START_DELAY": "30"})
    async with connect_service(NAME, search_path=env.search_path) as sc:
        with anyio.fail_after(T), pytest.raises(TimeoutError, match="did not report that it listens within 3s; it was killed"):
            await sc.proxy(Probe).pid()
        assert sc.state == "idle"
    [pid] = env.launched()
    try:
        w = Watch(pid)
    except ProcessLookupError:
        return  # already gone
    with contextlib.closing(w):
        await w.exited()


async def test_call_timeout_bounds_the_launch(env: Env) -> None:
    env.describe(environment={"PROBE_START_DELAY": "30"})
    async with connect_service(NAME, search_path=env.search_path) as sc:
        t0 = time.monotonic()
        with anyio.fail_after(T), pytest.raises(TimeoutError):
            await sc.proxy(Probe, timeout=1.0).pid()
        assert time.monotonic() - t0 < 3.0
        assert sc.state == "idle"
    # the abandoned launch was killed, not left to start behind our back
    for pid in env.launched():
        try:
            w = Watch(pid)
        except ProcessLookupError:
            continue
        with contextlib.closing(w):
            await w.exited()


async def test_command_service_with_pipe_readiness(env: Env) -> None:
    env.describe(command=[sys.executable, "-m", "services_fixtures.command_service"], idle_exit=0)
    with contextlib.ExitStack() as stack:
        async with connect_service(NAME, search_path=env.search_path) as sc:
            with anyio.fail_after(T):
                assert await sc.proxy(Probe).version() == "command"
                pid = await sc.proxy(Probe).pid()
            w = stack.enter_context(watch(pid))
        await w.exited()  # idle_exit reached it through XRPC_IDLE_EXIT


async def test_command_service_with_socket_readiness(env: Env) -> None:
    env.describe(command=[sys.executable, "-m", "services_fixtures.socket_service"], readiness="socket")
    async with connect_service(NAME, search_path=env.search_path) as sc:
        with anyio.fail_after(T):
            assert await sc.proxy(Probe).version() == "socket"
        assert sc.launches == 1


async def test_a_missing_program_is_reported(env: Env) -> None:
    env.describe(command=["/nonexistent/xrpc-service"])
    async with connect_service(NAME, search_path=env.search_path) as sc:
        with anyio.fail_after(T), pytest.raises(ServiceUnavailable, match="cannot run '/nonexistent/xrpc-service': No such file or directory"):
            await sc.proxy(Probe).pid()


async def test_manual_service_is_not_launched_but_runs_by_hand(env: Env) -> None:
    env.describe(restart="manual")
    async with connect_service(NAME, search_path=env.search_path) as sc:
        p = sc.proxy(Probe)
        with anyio.fail_after(T), pytest.raises(ServiceUnavailable, match="restart policy is 'manual'"):
            await p.pid()
        assert env.launched() == []
        # python -m xrpc.service NAME, started by hand (here with a readiness pipe of our own)
        r, w = os.pipe()
        child_env = dict(os.environ, XRPC_SERVICE_PATH=str(env.services), XRPC_READY_FD=str(w), PYTHONPATH=str(HERE))
        try:
            proc = await anyio.open_process(
                [sys.executable, "-m", "xrpc.service", NAME], stdin=subprocess.DEVNULL, stdout=None, stderr=None, env=child_env, pass_fds=(w,)
            )
        finally:
            os.close(w)
        try:
            with anyio.fail_after(T):
                await anyio.wait_readable(r)
                assert os.read(r, 100) == b"ready\n"
                assert await p.pid() == proc.pid
                proc.terminate()  # SIGTERM: drain and exit cleanly
                assert await proc.wait() == 0
        finally:
            os.close(r)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()
                await proc.aclose()
        assert not socket_path(NAME).exists()


# --------------------------------------------------------------------------- interruption
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_kill_9_interrupts_within_a_second_and_the_next_call_relaunches(env: Env, kind: str) -> None:
    env.describe()
    events = Events()
    client = ClientImpl()
    latencies: list[float] = []
    relaunches: list[float] = []
    seen: set[int] = set()
    async with connect_service(NAME, exports=[(Client, client)], search_path=env.search_path, **events.kwargs()) as sc:
        p = sc.proxy(Probe)
        for i in range(100):
            t0 = time.monotonic()
            with anyio.fail_after(T):
                pid = await p.pid()
            relaunches.append(time.monotonic() - t0)
            assert pid not in seen, "the next call must reach a new instance"
            seen.add(pid)
            with watch(pid) as w:
                outcome: list[BaseException] = []
                killed_at = math.nan
                failed_at = math.nan
                with anyio.fail_after(T):
                    if kind == "unary":
                        started = client.expect_start()
                        done = anyio.Event()

                        async def call() -> None:
                            nonlocal failed_at
                            try:
                                await p.hang()
                            except Exception as exc:
                                failed_at = time.monotonic()
                                outcome.append(exc)
                            done.set()

                        async with anyio.create_task_group() as tg:
                            tg.start_soon(call)
                            await started.wait()  # hang() runs on the service now
                            os.kill(pid, signal.SIGKILL)
                            killed_at = time.monotonic()
                            await done.wait()
                    else:
                        got = 0
                        try:
                            async with cast(Any, p.ticks()) as ticks:  # a stream call has aclose()
                                async for x in ticks:
                                    assert x == got
                                    got += 1
                                    if got == 100:
                                        os.kill(pid, signal.SIGKILL)
                                        killed_at = time.monotonic()
                        except Exception as exc:
                            failed_at = time.monotonic()
                            outcome.append(exc)
                        assert got >= 100
                    await w.exited()
            assert len(outcome) == 1 and isinstance(outcome[0], xrpc.ConnectionInterrupted), outcome
            latencies.append(failed_at - killed_at)
            assert latencies[-1] < 1.0
            assert sc.state == "interrupted"
            assert events.seen == ["interrupted"] * (i + 1)
        assert sc.launches == 100
    assert events.seen == ["interrupted"] * 100 + ["invalidated"]
    latencies.sort()
    relaunches.sort()
    print(
        f"\n{kind}: kill -9 -> ConnectionInterrupted median {latencies[50] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms; "
        f"relaunch + call median {relaunches[50] * 1000:.0f} ms, max {relaunches[-1] * 1000:.0f} ms"
    )


async def test_heartbeat_detects_a_silent_service(env: Env) -> None:
    env.describe()
    events = Events()
    client = ClientImpl()
    async with connect_service(NAME, exports=[(Client, client)], heartbeat=0.2, search_path=env.search_path, **events.kwargs()) as sc:
        p = sc.proxy(Probe)
        with anyio.fail_after(T):
            pid = await p.pid()
        with watch(pid) as w:
            started = client.expect_start()
            outcome: list[BaseException] = []
            with anyio.fail_after(T):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(failure_of, p.hang, outcome)
                    await started.wait()
                    os.kill(pid, signal.SIGSTOP)  # alive, connected, and silent
                    stopped_at = time.monotonic()
            detected = time.monotonic() - stopped_at
            assert len(outcome) == 1 and isinstance(outcome[0], xrpc.ConnectionInterrupted), outcome
            assert "did not answer a heartbeat within 0.2s" in str(outcome[0])
            assert detected < 1.0  # two intervals, and some slack
            assert events.seen == ["interrupted"]
            assert sc.state == "interrupted"
            os.kill(pid, signal.SIGKILL)
            await w.exited()
        with anyio.fail_after(T):
            assert await p.pid() != pid
    print(f"\nheartbeat 0.2s: silent service detected after {detected * 1000:.0f} ms")


async def failure_of(fn: Any, outcome: list[BaseException]) -> None:
    """Await ``fn()``; what it raises is appended to ``outcome``."""
    try:
        await fn()
    except Exception as exc:
        outcome.append(exc)


# --------------------------------------------------------------------------- invalidation
async def test_aclose_invalidates_once(env: Env) -> None:
    env.describe()
    events = Events()
    client = ClientImpl()
    async with connect_service(NAME, exports=[(Client, client)], search_path=env.search_path, **events.kwargs()) as sc:
        p = sc.proxy(Probe)
        outcome: list[BaseException] = []
        with anyio.fail_after(T):
            await p.pid()
            started = client.expect_start()
            async with anyio.create_task_group() as tg:
                tg.start_soon(failure_of, p.hang, outcome)
                await started.wait()
                await sc.aclose()
        await sc.aclose()
        assert sc.state == "invalidated" and sc.closed
        assert len(outcome) == 1 and type(outcome[0]) is xrpc.ConnectionInvalidated
        with pytest.raises(xrpc.ConnectionInvalidated, match=f"the connection to service {NAME!r} was closed"):
            await p.pid()
        with pytest.raises(xrpc.ConnectionInvalidated):
            async for _ in p.ticks():
                pass  # pragma: no cover
    assert events.seen == ["invalidated"]
    with pytest.raises(xrpc.ConnectionInvalidated):
        await p.version()


async def test_peer_rejected_invalidates(env: Env) -> None:
    env.describe(module="services_fixtures.refuse:make_server")
    events = Events()
    async with connect_service(NAME, search_path=env.search_path, **events.kwargs()) as sc:
        p = sc.proxy(Probe)
        with anyio.fail_after(T), pytest.raises(xrpc.PeerRejected):
            await p.pid()
        assert sc.state == "invalidated"
        assert events.seen == ["invalidated"]
        with pytest.raises(xrpc.PeerRejected):
            await p.pid()
    assert events.seen == ["invalidated"]
    assert len(env.launched()) == 1


async def test_description_removed_at_reconnect_invalidates(env: Env) -> None:
    path = env.describe()
    events = Events()
    async with connect_service(NAME, search_path=env.search_path, **events.kwargs()) as sc:
        p = sc.proxy(Probe)
        with anyio.fail_after(T):
            pid = await p.pid()
        with watch(pid) as w:
            os.kill(pid, signal.SIGKILL)
            await w.exited()
        await events.wait_for(1)  # the end of the connection reaches the client
        assert sc.state == "interrupted"
        path.unlink()  # the service was uninstalled
        with anyio.fail_after(T), pytest.raises(ServiceNotFound, match=f"no service named {NAME!r}"):
            await p.pid()
        assert sc.state == "invalidated"
        with pytest.raises(xrpc.ConnectionInvalidated):
            await p.pid()
    assert events.seen == ["interrupted", "invalidated"]


# --------------------------------------------------------------------------- upgrade
UPGRADABLE = """\
from services_fixtures.probe import make_server as _make

VERSION = {version!r}


def make_server():
    return _make(VERSION)
"""


def _install(code: Path, version: str) -> None:
    (code / "upgradable.py").write_text(UPGRADABLE.format(version=version))


def _upgradable(env: Env) -> Path:
    """Describe the service as ``upgradable``, installed at version 1.0; the directory of its code."""
    code = env.root / "code"
    code.mkdir()
    env.describe(module="upgradable:make_server", environment={"PYTHONPATH": f"{code}{os.pathsep}{HERE}"})
    _install(code, "1.0")
    return code


async def test_upgrade_then_kill_reaches_the_new_version(env: Env) -> None:
    code = _upgradable(env)
    events = Events()
    async with connect_service(NAME, search_path=env.search_path, **events.kwargs()) as sc:
        p = sc.proxy(Probe)
        with anyio.fail_after(T):
            assert await p.version() == "1.0"
            pid = await p.pid()
        _install(code, "2.0-upgraded")
        with anyio.fail_after(T):
            assert await p.version() == "1.0"  # still the running instance
        with watch(pid) as w:
            os.kill(pid, signal.SIGKILL)
            await w.exited()
        await events.wait_for(1)  # the client noticed: the next call launches the new code
        with anyio.fail_after(T):
            assert await p.version() == "2.0-upgraded"
            assert await p.pid() != pid
    assert events.seen == ["interrupted", "invalidated"]


async def test_graceful_restart_finishes_calls_in_flight_then_upgrades(env: Env) -> None:
    code = _upgradable(env)
    events = Events()
    client = ClientImpl()
    async with connect_service(NAME, exports=[(Client, client)], search_path=env.search_path, **events.kwargs()) as sc:
        p = sc.proxy(Probe)
        with anyio.fail_after(T):
            pid = await p.pid()
        _install(code, "2.0-upgraded")
        answers: list[str] = []
        with watch(pid) as w:
            with anyio.fail_after(T):
                started = client.expect_start()
                async with anyio.create_task_group() as tg:

                    async def call() -> None:
                        answers.append(await p.slow(0.5))

                    tg.start_soon(call)
                    await started.wait()
                    os.kill(pid, signal.SIGTERM)  # restart: the call in flight is not lost
                await w.exited()
        assert answers == ["1.0"]
        await events.wait_for(1)  # then it closed the connection: an interruption, once
        assert events.seen == ["interrupted"]
        with anyio.fail_after(T):
            assert await p.version() == "2.0-upgraded"
    assert len(env.launched()) == 2


# --------------------------------------------------------------------------- idle exit
async def test_idle_exit_and_relaunch(env: Env) -> None:
    env.describe(idle_exit=0.3)
    with contextlib.ExitStack() as stack:
        async with connect_service(NAME, search_path=env.search_path) as sc:
            with anyio.fail_after(T):
                pid = await sc.proxy(Probe).pid()
            w = stack.enter_context(watch(pid))
        left = time.monotonic()
        await w.exited()
        idle = time.monotonic() - left
    assert 0.3 <= idle < 3.0
    assert not socket_path(NAME).exists()
    async with connect_service(NAME, search_path=env.search_path) as sc:
        with anyio.fail_after(T):
            assert await sc.proxy(Probe).pid() != pid
        assert sc.launches == 1
    print(f"\nidle_exit 0.3s: exited {idle * 1000:.0f} ms after its last client left")


async def test_a_connected_client_keeps_the_service(env: Env) -> None:
    env.describe(idle_exit=0.1)
    async with connect_service(NAME, search_path=env.search_path) as sc:
        p = sc.proxy(Probe)
        with anyio.fail_after(T):
            pid = await p.pid()
        with watch(pid) as w:
            with anyio.move_on_after(1.0):
                await w.exited()
            assert w.alive()
        assert await p.pid() == pid


async def test_disconnect_when_idle_lets_the_service_exit(env: Env) -> None:
    env.describe(idle_exit=0.1)
    events = Events()
    async with connect_service(NAME, disconnect_when_idle=0.2, search_path=env.search_path, **events.kwargs()) as sc:
        p = sc.proxy(Probe)
        with anyio.fail_after(T):
            pid = await p.pid()
        with watch(pid) as w:
            await w.exited()
        assert sc.state == "idle"
        with anyio.fail_after(T):
            assert await p.pid() != pid
        assert events.seen == []
    assert events.seen == ["invalidated"]


@pytest.mark.timeout(600)
async def test_clients_racing_an_idle_exit_lose_nothing(env: Env) -> None:
    # idle_exit = 0: the service stops whenever its last client leaves, while other clients are
    # arriving; every client still gets its callback from on_connect and its answer.
    env.describe(idle_exit=0)
    answered: list[int] = []
    launches = 0
    rng = random.Random(1)

    async def client_loop(n: int) -> None:
        nonlocal launches
        for _ in range(n):
            client = ClientImpl()
            async with connect_service(NAME, exports=[(Client, client)], search_path=env.search_path) as sc:
                p = sc.proxy(Probe)
                pid = await p.pid()
                assert client.hellos == [str(pid)]
                assert await p.greetings() == [f"ack {pid}"]
                answered.append(pid)
                launches += sc.launches
            await anyio.sleep(rng.random() * 0.3)  # jitter: vary who arrives while the service stops

    t0 = time.monotonic()
    with anyio.fail_after(30 * T):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(client_loop, 25)
    assert len(answered) == 100
    assert launches == len(env.launched())  # every instance was launched by one of these clients
    print(f"\n4 x 25 clients racing idle exit: {len(env.launched())} instances in {time.monotonic() - t0:.1f}s")


# --------------------------------------------------------------------------- version negotiation
@xrpc.interface(name="Probe")
class NewerProbe(Protocol):
    """A client built against a newer Probe: one method more than the running service has."""

    async def pid(self) -> int: ...

    async def version(self) -> str: ...

    async def uptime(self) -> float: ...


async def test_a_method_the_running_service_lacks_fails_at_once(env: Env) -> None:
    env.describe()
    async with connect_service(NAME, search_path=env.search_path) as sc:
        p = sc.proxy(NewerProbe)
        with anyio.fail_after(T):
            assert await p.pid() > 0
            with pytest.raises(xrpc.MethodNotFound) as info:
                await p.uptime()
            assert "uptime" in str(info.value) and "version" in str(info.value)  # says what it has
            assert await p.version()  # the connection carries on
