"""Several addresses for one service (``urls``, ``failover``), and services that systemd starts
(``launcher = "systemd"``), with real processes.

The replicas are processes forked by ``services_fixtures.replicas`` (xrpc imported once, so a
restart costs milliseconds), each serving ``services_fixtures.probe`` on a Unix socket of its own;
the test kills them with SIGKILL, as a crash would.  A replica is known by the pid its ``pid()``
returns.  Waits are on events (a replica's ``up`` line, the service calling back ``started``), each
bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import anyio
import anyio.abc
import pytest

import xrpc
from xrpc import ServiceDescriptionError, ServiceUnavailable
from xrpc._services import connect_service, load_description, lock_path, socket_path

import test_systemd as activation
from _procs import short_dir
from _timeouts import T
from services_fixtures.probe import Client, Probe

HERE = Path(__file__).parent
NAME = "com.example.replicated"
ROUNDS = 100


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """xrpc's runtime directory, private (and short: Unix socket paths are limited), with ``services/``."""
    d = Path(short_dir())
    monkeypatch.setenv("XRPC_RUNTIME_DIR", str(d))
    monkeypatch.delenv("XRPC_SERVICE_PATH", raising=False)
    (d / "xrpc" / "services").mkdir(mode=0o700, parents=True)
    try:
        yield d / "xrpc"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def describe(root: Path, name: str = NAME, **fields: Any) -> Path:
    path = root / "services" / f"{name}.json"
    path.write_text(json.dumps({"name": name, **fields}))
    return path


class ClientImpl:
    """What the test exports: answers ``on_connect``'s hello, counts the calls that started."""

    def __init__(self) -> None:
        self.starts = 0
        self._started = anyio.Event()

    async def hello(self, token: str) -> str:
        return f"ack {token}"

    async def started(self, what: str) -> None:
        self.starts += 1
        self._started.set()

    def expect_start(self) -> anyio.Event:
        self._started = anyio.Event()
        return self._started


class Replicas:
    """Three (or ``count``) replicas of the probe service, each on its own socket in ``directory``."""

    def __init__(self, directory: Path, proc: anyio.abc.Process, count: int) -> None:
        self.urls = [f"unix://{directory}/r{i}.sock" for i in range(count)]
        self._proc = proc
        self._paths = [str(directory / f"r{i}.sock") for i in range(count)]
        self.pids: list[int | None] = [None] * count
        self._up = [anyio.Event() for _ in range(count)]
        self._index: dict[int, int] = {}

    async def _read(self) -> None:
        assert self._proc.stdout is not None
        buf = b""
        async for chunk in self._proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                _, index, pid = line.decode().split()
                i = int(index)
                self.pids[i] = int(pid)
                self._index[int(pid)] = i
                self._up[i].set()

    async def start(self, i: int) -> None:
        """Start replica ``i`` (it listens soon after; ``up(i)`` waits for that)."""
        assert self._proc.stdin is not None
        self._up[i] = anyio.Event()
        await self._proc.stdin.send(f"{i} {self._paths[i]}\n".encode())

    async def up(self, i: int) -> None:
        with anyio.fail_after(T):
            await self._up[i].wait()

    def kill(self, i: int) -> None:
        pid = self.pids[i]
        assert pid is not None
        self.pids[i] = None
        os.kill(pid, signal.SIGKILL)

    def index(self, pid: int) -> int:
        return self._index[pid]


@contextlib.asynccontextmanager
async def replicas(count: int = 3, *, start: bool = True) -> AsyncIterator[Replicas]:
    directory = Path(short_dir())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    try:
        async with await anyio.open_process([sys.executable, "-m", "services_fixtures.replicas"], env=env, stderr=None) as proc:
            r = Replicas(directory, proc, count)
            async with anyio.create_task_group() as tg:
                tg.start_soon(r._read)
                try:
                    if start:
                        for i in range(count):
                            await r.start(i)
                        for i in range(count):
                            await r.up(i)
                    yield r
                finally:
                    assert proc.stdin is not None
                    await proc.stdin.aclose()  # the program kills every replica still running
                    with anyio.fail_after(T):
                        await proc.wait()
                    tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def wait_until_idle(sc: xrpc.ServiceConnection) -> None:
    """Poll (bounded) until ``disconnect_when_idle`` has closed the connection."""
    with anyio.fail_after(T):
        while sc.state != "idle":
            await anyio.sleep(0.005)


# --------------------------------------------------------------------------- failover
@pytest.mark.parametrize("policy", ["ordered", "round-robin"])
async def test_a_replica_killed_mid_call_fails_that_call_and_the_next_lands_on_another(root: Path, policy: str) -> None:
    rounds = ROUNDS
    client = ClientImpl()
    interrupted: list[int] = []
    async with replicas() as r:
        describe(root, urls=r.urls, failover=policy)
        async with connect_service(NAME, exports=[(Client, client)], on_interrupted=lambda: interrupted.append(1)) as sc:
            probe = sc.proxy(Probe, timeout=T)  # one proxy, taken once, across every switch
            current = r.index(await probe.pid())
            start = anyio.current_time()
            for n in range(rounds):
                for other in range(3):
                    if other != current:
                        await r.up(other)  # restarted concurrently with the previous round
                started = client.expect_start()
                failure: list[BaseException] = []

                async def in_flight() -> None:
                    try:
                        await probe.hang()
                    except BaseException as exc:
                        failure.append(exc)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(in_flight)
                    with anyio.fail_after(T):
                        await started.wait()  # the call runs in the replica
                    r.kill(current)
                assert len(failure) == 1 and type(failure[0]) is xrpc.ConnectionInterrupted, failure
                await r.start(current)  # comes back while the next calls go elsewhere
                landed = r.index(await probe.pid())
                assert landed == (current + 1) % 3, (n, current, landed)  # the next address: up, as the loss was
                current = landed
            took = anyio.current_time() - start
            print(f"\n{policy}: {rounds} rounds of kill / interrupted call / failover in {took:.2f}s ({1000 * took / rounds:.0f} ms a round)")
            assert client.starts == rounds  # each call ran once: nothing was sent again to another replica
            assert len(interrupted) == rounds
            assert sc.launches == 0


async def test_ordered_prefers_the_first_address_round_robin_spreads(root: Path) -> None:
    async with replicas() as r:
        seen: dict[str, list[int]] = {}
        for policy in ("ordered", "round-robin"):
            describe(root, urls=r.urls, failover=policy)
            async with connect_service(NAME, disconnect_when_idle=0.02) as sc:
                probe = sc.proxy(Probe, timeout=T)
                seen[policy] = []
                for _ in range(9):
                    seen[policy].append(r.index(await probe.pid()))
                    await wait_until_idle(sc)  # the next call makes a new connection
        assert seen["ordered"] == [0] * 9
        rr = seen["round-robin"]
        assert all(b == (a + 1) % 3 for a, b in zip(rr, rr[1:])), rr
        assert sorted(rr) == [0, 0, 0, 1, 1, 1, 2, 2, 2]

        # ordered, the first replica down: the second takes the calls; once the first is back, a new
        # connection goes to it again
        describe(root, urls=r.urls, failover="ordered")
        r.kill(0)
        async with connect_service(NAME, disconnect_when_idle=0.02) as sc:
            probe = sc.proxy(Probe, timeout=T)
            assert r.index(await probe.pid()) == 1
            await wait_until_idle(sc)
            assert r.index(await probe.pid()) == 1
            await wait_until_idle(sc)
            await r.start(0)
            await r.up(0)
            assert r.index(await probe.pid()) == 0


async def test_a_stream_fails_over_too(root: Path) -> None:
    async with replicas() as r:
        describe(root, urls=r.urls)
        async with connect_service(NAME) as sc:
            probe = sc.proxy(Probe, timeout=T)
            first = r.index(await probe.pid())
            stream = probe.ticks()
            assert [await stream.__anext__() for _ in range(3)] == [0, 1, 2]
            r.kill(first)
            with pytest.raises(xrpc.ConnectionInterrupted):
                with anyio.fail_after(T):
                    async for _ in stream:
                        pass
            assert r.index(await probe.pid()) == (first + 1) % 3
            assert sc.url == r.urls[(first + 1) % 3]


async def test_when_no_address_answers_the_error_lists_each_with_its_reason(root: Path) -> None:
    refusing = socket.socket()  # bound, never listening: connecting is refused
    refusing.bind(("127.0.0.1", 0))
    port = refusing.getsockname()[1]
    try:
        async with replicas(start=False) as r:
            urls = [*r.urls, f"tcp://127.0.0.1:{port}"]
            describe(root, urls=urls)
            async with connect_service(NAME) as sc:
                probe = sc.proxy(Probe, timeout=T)
                with pytest.raises(ServiceUnavailable) as info:
                    await probe.pid()
                text = str(info.value)
                assert text.startswith(f"service {NAME!r} is not reachable at any of its 4 addresses (tried in this order):\n"), text
                for i, url in enumerate(urls, 1):
                    assert f"\n  {i}. {url}: cannot connect: " in text, text
                assert text.count("No such file or directory") == 3 and "Connection refused" in text, text
                assert [u for u, _ in info.value.attempts] == urls
                assert sc.state == "idle"
                # the next call tries again: one replica back is enough
                await r.start(2)
                await r.up(2)
                assert r.index(await probe.pid()) == 2
    finally:
        refusing.close()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"url": "tcp://a:1", "urls": ["tcp://b:2"]}, "give either 'url' (one address) or 'urls' (several), not both"),
        ({"urls": []}, "'urls' must be a non-empty list of strings"),
        ({"urls": "tcp://a:1"}, "'urls' must be a non-empty list of strings"),
        ({"urls": ["tcp://a:1", "tcp://a"]}, "'urls'[1]: 'tcp://a': a tcp URL needs a port"),
        ({"urls": ["tcp://a:1", "tcp://a:1"]}, "'urls'[1]: 'tcp://a:1' is listed twice"),
        ({"urls": ["tcp://a:1", "tcp://b:1"], "module": "a:b"}, "a service with 'urls' runs elsewhere: drop 'command' and 'module'"),
        ({"urls": ["tcp://a:1", "tcp://b:1"], "failover": "random"}, "'failover' must be one of 'ordered', 'round-robin', not 'random'"),
        ({"url": "tcp://a:1", "failover": "round-robin"}, "'failover' chooses among several addresses"),
        ({"module": "a:b", "launcher": "launchd"}, "'launcher' must be one of 'builtin', 'systemd', not 'launchd'"),
        ({"launcher": "systemd", "urls": ["unix:///a", "unix:///b"]}, "give one 'url', not 'urls'"),
        ({"launcher": "systemd", "module": "a:b", "command": ["x"]}, "give at most one of 'command'"),
        ({"module": "a:b"} | {"url": "tcp://a:1"}, "a service with a 'url' runs elsewhere"),
    ],
)
def test_bad_combinations_are_description_errors(root: Path, fields: dict[str, Any], message: str) -> None:
    path = describe(root, **fields)
    with pytest.raises(ServiceDescriptionError) as info:
        load_description(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value), str(info.value)


def test_good_descriptions_keep_url_as_the_first_address(root: Path) -> None:
    d = load_description(describe(root, urls=["tls://a:1", "tls://b:2"], failover="round-robin"))
    assert (d.url, d.urls, d.failover, d.launcher) == ("tls://a:1", ("tls://a:1", "tls://b:2"), "round-robin", "builtin")
    d = load_description(describe(root, url="tls://a:1"))
    assert (d.url, d.urls, d.failover) == ("tls://a:1", ("tls://a:1",), "ordered")
    d = load_description(describe(root, launcher="systemd", module="pkg.mod:make", url="unix:///run/helper.sock"))
    assert (d.launcher, d.url, d.module) == ("systemd", "unix:///run/helper.sock", "pkg.mod:make")
    d = load_description(describe(root, launcher="systemd"))
    assert (d.launcher, d.url, d.module, d.command) == ("systemd", None, None, None)


# --------------------------------------------------------------------------- launcher = "systemd"
def _service_argv(description: Path) -> list[str]:
    """What the .service unit runs (``activation.Manager`` starts it with the socket it holds)."""
    return [sys.executable, "-m", "xrpc.service", NAME, "--description", str(description)]


def _marker_command(marker: Path) -> list[str]:
    """A command that leaves ``marker`` behind if it ever runs."""
    return ["/bin/sh", "-c", f"touch {marker}; exec sleep 30"]


async def test_systemd_without_its_socket_names_the_units_and_launches_nothing(root: Path) -> None:
    marker = root / "ran"
    describe(root, launcher="systemd", command=_marker_command(marker))
    async with connect_service(NAME) as sc:
        probe = sc.proxy(Probe, timeout=T)
        for _ in range(2):  # and again: still nothing launched, the same advice
            with pytest.raises(ServiceUnavailable) as info:
                await probe.pid()
            text = str(info.value)
            assert f"service {NAME!r} is started by systemd" in text, text
            assert f"there is no socket at {socket_path(NAME)}: the socket unit {NAME}.socket is not installed" in text, text
            assert f"`systemctl --user status {NAME}.socket {NAME}.service`" in text, text
            assert f"`journalctl --user -u {NAME}.service`" in text, text
            assert f"`systemctl --user start {NAME}.socket`" in text, text
            assert sc.state == "idle"
        assert sc.launches == 0
    assert not marker.exists()  # the command never ran
    assert not lock_path(NAME).exists() and not lock_path(NAME).parent.exists()  # no launch lock taken
    assert not socket_path(NAME).parent.exists()  # nor the socket directory made: systemd's business


async def test_systemd_with_a_socket_nobody_listens_on_says_the_unit_is_stopped(root: Path) -> None:
    marker = root / "ran"
    describe(root, launcher="systemd", command=_marker_command(marker))
    path = socket_path(NAME)
    path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # a socket file, not listening: what a stopped socket unit can leave
    dead.close()
    async with connect_service(NAME) as sc:
        with pytest.raises(ServiceUnavailable) as info:
            await sc.proxy(Probe, timeout=T).pid()
    text = str(info.value)
    assert f"unix://{path} refuses connections: the socket unit {NAME}.socket is stopped or failed" in text, text
    assert f"`systemctl --user status {NAME}.socket" in text and f"`journalctl --user -u {NAME}.service`" in text, text
    assert not marker.exists()


def test_a_system_socket_names_system_units(root: Path) -> None:
    from xrpc._services import systemd_hint

    desc = load_description(describe(root, launcher="systemd", url="unix:///run/xrpc-test-nowhere/helper.sock"))
    text = systemd_hint(desc, desc.url or "", xrpc.TransportError("gone"))
    assert f"`systemctl status {NAME}.socket {NAME}.service`" in text and f"`journalctl -u {NAME}.service`" in text, text
    assert "--user" not in text


async def test_systemd_connects_to_the_socket_systemd_holds(root: Path) -> None:
    description = describe(root, launcher="systemd", module="services_fixtures.probe:make_server")
    path = socket_path(NAME)
    path.parent.mkdir(mode=0o700)
    argv = _service_argv(description)
    with activation.Manager(str(path), argv, activation._env()) as manager:
        client = ClientImpl()
        async with connect_service(NAME, exports=[(Client, client)]) as sc:
            probe = sc.proxy(Probe, timeout=3 * T)  # the first call waits for the service to start
            pid = await probe.pid()
            assert pid == manager.starts[0] and len(manager.starts) == 1
            assert await probe.greetings() == [f"ack {pid}"]  # on_connect's call back arrived
            assert sc.launches == 0
    assert not lock_path(NAME).exists()


def test_python_m_xrpc_service_refuses_to_start_a_systemd_service_by_hand(root: Path) -> None:
    describe(root, launcher="systemd", module="services_fixtures.probe:make_server")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["PYTHONPATH"] = str(HERE)
    r = subprocess.run([sys.executable, "-m", "xrpc.service", NAME], env=env, capture_output=True, text=True, timeout=3 * T)
    assert r.returncode == 2, r.stderr
    assert f"is started by systemd" in r.stderr and f"`systemctl --user start {NAME}.socket`" in r.stderr, r.stderr
    assert not socket_path(NAME).exists()


def _xrpc(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent)])
    return subprocess.run([sys.executable, "-m", "xrpc", *args], env=env, capture_output=True, text=True, timeout=3 * T)


def test_the_cli_neither_launches_nor_wakes_a_systemd_service(root: Path) -> None:
    marker = root / "ran"
    describe(root, launcher="systemd", command=_marker_command(marker))
    r = _xrpc("call", NAME, "pid")
    assert r.returncode == 3, r.stderr
    assert f"`systemctl --user start {NAME}.socket`" in r.stderr, r.stderr
    rows = {row["name"]: row for row in json.loads(_xrpc("list", "--json").stdout)}
    assert rows[NAME]["status"] == "stopped" and rows[NAME]["launcher"] == "systemd", rows
    assert not marker.exists()

    # with the socket held as systemd would, `list` says so without connecting (which would start
    # the service)
    description = describe(root, launcher="systemd", module="services_fixtures.probe:make_server")
    path = socket_path(NAME)
    path.parent.mkdir(mode=0o700)
    with activation.Manager(str(path), _service_argv(description), activation._env()) as manager:
        rows = {row["name"]: row for row in json.loads(_xrpc("list", "--json").stdout)}
        assert rows[NAME]["status"] == "socket" and rows[NAME]["socket"] == str(path), rows
        assert manager.starts == []
