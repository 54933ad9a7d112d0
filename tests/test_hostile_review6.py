"""Hostile review of issue 16: systemd units, socket activation and readiness, services that systemd
starts, and failover across several addresses.

The attackers: a service manager or environment that misbehaves (a ``NOTIFY_SOCKET`` that never
reads, a ``WATCHDOG_USEC`` no float holds), a replica that turns clients away, another local user who
can add names to the directory of a service's socket, a unit name that the service manager already
has, a file planted where ``--install`` writes its temporary file.  Each test failed before the fix
it names.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Protocol

import anyio
import pytest
from _procs import ChildProcess, child_env, serve_until_stdin_closes, short_dir
from _timeouts import T

import xrpc
from xrpc._cli import main as cli_main
from xrpc._systemd import sd_notify, watchdog_interval
from xrpc._services import ServiceDescription
from xrpc._units import install_units, render_units

pytestmark = pytest.mark.timeout(120)

TESTS_DIR = str(Path(__file__).parent)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@xrpc.interface
class Who(Protocol):
    async def who(self) -> str: ...


class WhoImpl:
    def __init__(self, name: str = "served") -> None:
        self.name = name

    async def who(self) -> str:
        return self.name


class TurnsAwayAfterHandshake:
    """A hostile replica: it completes the handshake, then answers a call with GOODBYE(PEER_REJECTED)."""

    async def who(self) -> str:
        from xrpc._codes import ErrorCode

        conn = xrpc.current_connection()
        conn._core.send_goodbye("go away", ErrorCode.PEER_REJECTED)
        conn._link.kick()
        await anyio.sleep(T)
        return "never"


def _replica_main(url: str, name: str, mode: str) -> None:
    """In a child: serve ``Who`` on ``url``.  ``mode``: ``good``; ``refuse`` (a requirement no client
    meets: every connection is refused at the handshake); ``late`` (refuses after the handshake)."""

    async def run() -> None:
        requirement = xrpc.Requirement.uid(0x7FFF_FFF0) if mode == "refuse" else None
        server = xrpc.Server(requirement=requirement)
        server.export(Who, TurnsAwayAfterHandshake() if mode == "late" else WhoImpl(name))
        async with server.listen(url) as listener:
            await serve_until_stdin_closes(listener.url)

    anyio.run(run)


def _private_dir() -> Path:
    d = Path(short_dir())
    os.chmod(d, 0o700)
    return d


def _describe(d: Path, name: str, **keys: object) -> Path:
    svc = d / "svc"
    svc.mkdir(mode=0o700, exist_ok=True)
    f = svc / f"{name}.json"
    f.write_text(json.dumps({"name": name, **keys}))
    os.chmod(f, 0o600)
    return svc


def _replica(url: str, name: str, mode: str = "good") -> ChildProcess:
    child = ChildProcess(name=name, what=f"replica {name}", log=False)
    child.start("test_hostile_review6", url, name, mode, entry="_replica_main")
    return child


async def _who(url: str) -> str:
    with anyio.fail_after(T):
        async with xrpc.connect(url) as conn:
            return await conn.proxy(Who).who()


# --------------------------------------------------------------------------- readiness and watchdog
def _serve_cli(sock: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "xrpc", "serve", "test_hostile_review6:WhoImpl", "--iface", "test_hostile_review6:Who", f"unix://{sock}"]
    return subprocess.Popen(
        argv, env=child_env({**env, "PYTHONPATH": TESTS_DIR}), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _first_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 3 * T)
    return proc.stdout.readline().decode().strip() if ready else ""


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    proc.kill()
    return proc.communicate(timeout=T)[1]


async def test_a_notify_socket_that_never_reads_does_not_freeze_the_server() -> None:
    """Attack: the notify socket stops reading (its queue holds 10 datagrams by default) while the
    watchdog period is short.  Before: the watchdog ping's blocking ``sendto`` stopped the event
    loop for good, and the server answered nothing, not even a handshake.  Now a full queue drops
    the message (``MSG_DONTWAIT``)."""
    d = _private_dir()
    notify = str(d / "notify")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(notify)  # never read
    proc = _serve_cli(str(d / "s.sock"), {"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "20000"})
    try:
        url = _first_line(proc)
        assert url.startswith("unix://"), (url, _stop(proc))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with anyio.fail_after(T):  # until the receiver's queue is full: then our probe finds no room
            while True:
                try:
                    probe.sendto(b"probe", socket.MSG_DONTWAIT, notify)
                except BlockingIOError:
                    break
                await anyio.sleep(0.01)
        probe.close()
        for _ in range(3):
            assert await _who(url) == "served"
    finally:
        _stop(proc)
        rx.close()


async def test_a_watchdog_period_no_float_holds_is_no_watchdog_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: ``WATCHDOG_USEC`` with 400 digits.  Before: ``OverflowError`` from the division, and
    ``xrpc serve`` died at start-up instead of serving (and reporting READY=1)."""
    huge = "1" + "0" * 400
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    monkeypatch.setenv("WATCHDOG_USEC", huge)
    assert watchdog_interval() is None
    d = _private_dir()
    notify = str(d / "notify")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(notify)
    rx.settimeout(3 * T)
    proc = _serve_cli(str(d / "s.sock"), {"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": huge})
    try:
        url = _first_line(proc)
        assert url.startswith("unix://"), (url, _stop(proc))
        assert b"READY=1" in await anyio.to_thread.run_sync(rx.recv, 4096)
        assert await _who(url) == "served"
    finally:
        _stop(proc)
        rx.close()


def test_sd_notify_sends_a_path_that_is_not_utf8_as_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A status naming a socket path that is not UTF-8 (``os.fsdecode`` gives surrogates).  Before:
    ``UnicodeEncodeError`` out of ``sd_notify``, which says it only returns whether it sent."""
    d = _private_dir()
    notify = str(d / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(notify)
        rx.settimeout(T)
        monkeypatch.setenv("NOTIFY_SOCKET", notify)
        path = os.fsdecode(b"/run/\xff.sock")
        assert sd_notify(f"STATUS=serving on unix://{path}") is True
        assert rx.recv(4096) == b"STATUS=serving on unix:///run/\xff.sock"


# --------------------------------------------------------------------------- units
def _desc(d: Path, name: str, **keys: object) -> "ServiceDescription":
    from xrpc._services import load_description

    return load_description(_describe(d, name, **keys) / f"{name}.json")


@pytest.mark.parametrize("seconds", [0.00001, 1e12, 1e20])
def test_timeout_start_sec_is_written_as_systemd_reads_it(seconds: float) -> None:
    """``launch_timeout = 0.00001`` became ``TimeoutStartSec=1e-05s`` (and 1e20 ``1e+20s``), which
    systemd does not parse: it ignores the line, and the service gets the default 90 s."""
    d = _private_dir()
    desc = _desc(d, "com.example.timeout", command=["/bin/true"], launch_timeout=seconds, launcher="systemd")
    units = render_units(desc, "system")
    (line,) = re.findall(r"^TimeoutStartSec=(.*)$", units["com.example.timeout.service"], re.M)
    assert re.fullmatch(r"\d+(ms|s)|infinity", line), line
    if line != "infinity":
        value = int(line[:-2]) / 1000 if line.endswith("ms") else int(line[:-1])
        assert seconds <= value <= seconds + 0.001
    if SYSTEMD_ANALYZE is None:
        return
    for filename, text in units.items():
        (d / filename).write_text(text)
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(d / "com.example.timeout.service")], capture_output=True, text=True, timeout=3 * T
    )
    assert "TimeoutStartSec" not in out.stderr, out.stderr


def _vendor_unit() -> str | None:
    for directory in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if os.path.isdir(directory):
            for f in sorted(os.listdir(directory)):
                stem, ext = os.path.splitext(f)
                if ext == ".service" and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", stem) and ".." not in stem:
                    return stem
    return None


def test_install_does_not_replace_a_unit_the_service_manager_already_has(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Attack: a description named like a unit of the distribution (``dbus``, ``ssh`` ...).  Before:
    ``--system --install`` wrote ``/etc/systemd/system/NAME.service``, which silently replaces the
    distribution's unit of that name; the check looked only in the directory it wrote to."""
    vendor = _vendor_unit()
    if vendor is None:
        pytest.skip("no unit in /usr/lib/systemd/system to collide with")
    d = _private_dir()
    svc = _describe(d, vendor, command=["/bin/true"], launcher="systemd", url=f"unix:///run/xrpc/sockets/{vendor}.sock")
    monkeypatch.setenv("XRPC_RUNTIME_DIR", str(d / "rt"))
    monkeypatch.setenv("XRPC_SERVICE_PATH", str(svc))
    out = d / "units"
    assert cli_main(["service", "unit", vendor, "--system", "--install", "--directory", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{vendor}.service" in err and "already has a unit" in err, err
    assert not out.exists() or not list(out.iterdir())
    assert cli_main(["service", "unit", vendor, "--system", "--install", "--directory", str(out), "--force"]) == 0
    assert (out / f"{vendor}.service").is_file()


def test_install_never_writes_into_a_file_planted_at_its_temporary_name() -> None:
    """Attack: a hard link to a victim file at the temporary name ``install_units`` used
    (``.NAME.PID.tmp``).  Before: it was opened with O_TRUNC (not O_EXCL) and the unit text went
    into the victim."""
    d = _private_dir()
    victim = d / "victim"
    victim.write_text("precious\n")
    units_dir = d / "units"
    units_dir.mkdir()
    os.link(victim, units_dir / f".com.example.planted.service.{os.getpid()}.tmp")
    install_units({"com.example.planted.service": "[Service]\nExecStart=/bin/true\n"}, units_dir)
    assert victim.read_text() == "precious\n"
    assert (units_dir / "com.example.planted.service").read_text() == "[Service]\nExecStart=/bin/true\n"
    assert oct((units_dir / "com.example.planted.service").stat().st_mode & 0o777) == oct(0o644)


# --------------------------------------------------------------------------- a socket in a shared directory
def _shared_dir() -> Path:
    d = Path(short_dir())
    os.chmod(d, 0o1777)  # like /tmp: anyone may add a name while the real service's socket is absent
    return d


@pytest.mark.parametrize("keys", [{"launcher": "systemd", "module": "helper.service:make_server"}, {}], ids=["systemd", "url"])
async def test_a_socket_in_a_directory_others_can_write_is_refused(keys: dict[str, object]) -> None:
    """Attack: the description's socket lives in a directory where any user may add names (the
    service manager removes the socket when its unit stops: ``RemoveOnStop=yes``); another user binds
    the name first and serves an impostor.  Before: the client connected and called the impostor."""
    shared = _shared_dir()
    url = f"unix://{shared}/helper.sock"
    impostor = _replica(url, "impostor")
    try:
        assert await _who(url) == "impostor"  # it does listen there
        svc = _describe(_private_dir(), "com.example.helper", url=url, **keys)
        async with xrpc.connect_service("com.example.helper", search_path=[svc], timeout=T) as sc:
            with pytest.raises(xrpc.UntrustedPath, match="writable by"):
                await sc.proxy(Who).who()
    finally:
        impostor.stop()


async def test_a_replica_in_a_directory_others_can_write_is_passed_over() -> None:
    shared = _shared_dir()
    private = _private_dir()
    urls = [f"unix://{shared}/r0.sock", f"unix://{private}/r1.sock"]
    replicas = [_replica(urls[0], "impostor"), _replica(urls[1], "r1")]
    try:
        svc = _describe(_private_dir(), "com.example.replicas", urls=urls)
        async with xrpc.connect_service("com.example.replicas", search_path=[svc], timeout=T) as sc:
            assert await sc.proxy(Who).who() == "r1"
    finally:
        for r in replicas:
            r.stop()


# --------------------------------------------------------------------------- failover
def _three(modes: tuple[str, str, str]) -> tuple[list[str], list[ChildProcess]]:
    d = _private_dir()
    urls = [f"unix://{d}/r{i}.sock" for i in range(3)]
    return urls, [_replica(u, f"r{i}", m) for i, (u, m) in enumerate(zip(urls, modes))]


async def test_one_replica_that_refuses_the_client_does_not_end_the_service_connection() -> None:
    """Attack: the first replica refuses every client at the handshake (hostile, or a wrong
    requirement on one host).  Before: ``PeerRejected`` invalidated the ``ServiceConnection`` for
    good, and the two replicas that work were never tried."""
    urls, replicas = _three(("refuse", "good", "good"))
    try:
        svc = _describe(_private_dir(), "com.example.replicas", urls=urls)
        async with xrpc.connect_service("com.example.replicas", search_path=[svc], timeout=3 * T) as sc:
            for _ in range(3):
                assert await sc.proxy(Who).who() == "r1"
            assert sc.url == urls[1]
            assert sc.state == "connected"
    finally:
        for r in replicas:
            r.stop()


async def test_a_replica_that_fails_the_client_requirement_is_passed_over() -> None:
    """The client insists on one process; the replicas it tries first are someone else.  Before:
    the first one's ``PeerRejected`` (the server does not satisfy the requirement) ended it all."""
    urls, replicas = _three(("good", "good", "good"))
    try:
        svc = _describe(_private_dir(), "com.example.replicas", urls=urls)
        req = xrpc.Requirement.pid(replicas[2].pid)
        async with xrpc.connect_service("com.example.replicas", search_path=[svc], timeout=3 * T, requirement=req) as sc:
            assert await sc.proxy(Who).who() == "r2"
            assert await sc.proxy(Who).who() == "r2"
    finally:
        for r in replicas:
            r.stop()


async def test_when_every_replica_refuses_the_connection_is_rejected_naming_each() -> None:
    urls, replicas = _three(("refuse", "refuse", "refuse"))
    try:
        svc = _describe(_private_dir(), "com.example.replicas", urls=urls)
        async with xrpc.connect_service("com.example.replicas", search_path=[svc], timeout=3 * T) as sc:
            with pytest.raises(xrpc.PeerRejected) as info:
                await sc.proxy(Who).who()
            for u in urls:
                assert u in str(info.value)
            assert sc.state == "invalidated"
    finally:
        for r in replicas:
            r.stop()


async def test_a_replica_that_turns_the_client_away_after_the_handshake_is_failed_over() -> None:
    """Attack: a replica answers the handshake, then closes with GOODBYE(PEER_REJECTED) on the first
    call.  Before: the whole ``ServiceConnection`` was invalidated; now that call fails, and the
    next one lands on another replica."""
    urls, replicas = _three(("late", "good", "good"))
    try:
        svc = _describe(_private_dir(), "com.example.replicas", urls=urls)
        async with xrpc.connect_service("com.example.replicas", search_path=[svc], timeout=3 * T) as sc:
            with anyio.fail_after(T):
                with pytest.raises(xrpc.ConnectionInvalidated, match="go away"):
                    await sc.proxy(Who).who()
            assert sc.state == "interrupted"
            assert await sc.proxy(Who).who() == "r1"
    finally:
        for r in replicas:
            r.stop()
