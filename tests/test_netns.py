"""Across hosts: a TLS service in one network namespace, its client in another.

Each test creates two network namespaces (``<pid>-<n>-srv`` and ``-cli``) joined by a veth pair
created *inside* them, with link-local addresses (169.254.77.1/30 for the server, .2 for the
client): the host's own interfaces and routes are never touched, and the namespaces are deleted
in the fixture's teardown whatever happens.  ``tests/netns_fixtures/server.py`` runs in the server
namespace, ``tests/netns_fixtures/client.py`` in the client namespace; the test process (in the
root namespace) drives the client with JSON commands on its stdin, reads both programs' JSON
events on their stdout, and cuts the link (``ip link set dev ... down`` on the server's end of the
pair) at the moment it chooses.  Every event carries the emitter's ``time.monotonic()``: the
monotonic clock is the same in every network namespace, so latencies are measured across
processes.

Needs root and a working ``ip netns``; otherwise the module is skipped with the reason.

The scenario runs twice: through the services layer (a description with ``url = "tls://..."``,
``connect_service(..., heartbeat=)``: reconnect on the next call) and on ``xrpc.connect`` with the
heartbeat primitives (``Connection.ping(timeout)`` and ``Connection.interrupt(reason)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from _timeouts import T
from _trust import make_ca, make_leaf, write_pem
from _trust import name as x509_name

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root: the test creates network namespaces and a veth pair with `ip netns add`",
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "netns_fixtures"
SRV_ADDR = "169.254.77.1"
CLI_ADDR = "169.254.77.2"
PREFIX = 30
SRV_DEV = "xr-srv"  # the names only need to be unique inside their namespace
CLI_DEV = "xr-cli"
SERVER_CN = "xrpc-netns-server"
HEARTBEAT = 0.3
DETECT_LIMIT = 1.2  # "within ~1 s": the heartbeat notices a silent peer after at most two intervals (0.6 s)
STEP = 20.0  # upper bound for one step: a program starting, a connection, a command
HOLD_FOREVER = 3600.0

MISSING_REMOTE_SERVICES = (
    "BUG/MISSING: the services layer cannot target a remote tls://host:port endpoint: ServiceConnection always "
    "dials unix://<runtime>/sockets/NAME.sock (_establish_now), a description has no 'url' key (and must have "
    "'module' or 'command'), and connect_service has no ssl_context=/server_hostname= to pass to xrpc.connect; "
    "so its heartbeat= and its reconnect-on-next-call cannot be used across hosts"
)

_serial = itertools.count(1)


# --------------------------------------------------------------------------- namespaces
def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=T, stdin=subprocess.DEVNULL)


def _ip_ok(*args: str) -> None:
    r = _ip(*args)
    if r.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")


async def _aip(*args: str) -> None:
    with anyio.fail_after(STEP):
        r = await anyio.run_process(["ip", *args], check=False, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.decode().strip()}")


@pytest.fixture(scope="module")
def netns_available() -> None:
    """Probe once: can this process create a network namespace and run a program in it?"""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` program (iproute2) is not installed")
    name = f"xrpc-probe-{os.getpid()}"
    try:
        r = _ip("netns", "add", name)
        if r.returncode != 0:
            pytest.skip(f"`ip netns add` does not work here: {r.stderr.strip()}")
        r = _ip("netns", "exec", name, "ip", "link", "set", "dev", "lo", "up")
        if r.returncode != 0:
            pytest.skip(f"`ip netns exec` does not work here: {r.stderr.strip()}")
    finally:
        _ip("netns", "del", name)  # also when `add` half failed; the name is this process's own


@dataclasses.dataclass
class Link:
    """Two namespaces joined by a veth pair."""

    srv: str
    cli: str

    def in_srv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.srv, *argv]

    def in_cli(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.cli, *argv]

    async def cut(self) -> None:
        """Unplug the cable at the server's end (the client's end then has no carrier)."""
        await _aip("-n", self.srv, "link", "set", "dev", SRV_DEV, "down")

    async def restore(self) -> None:
        await _aip("-n", self.srv, "link", "set", "dev", SRV_DEV, "up")


@pytest.fixture
def link(netns_available: None) -> Iterator[Link]:
    base = f"xrpc-{os.getpid()}-{next(_serial)}"
    srv, cli = f"{base}-srv", f"{base}-cli"
    created: list[str] = []
    try:
        for ns in (srv, cli):
            _ip_ok("netns", "add", ns)
            created.append(ns)
        # Created inside the namespaces: the pair never exists in the host's namespace.
        _ip_ok("-n", srv, "link", "add", SRV_DEV, "type", "veth", "peer", "name", CLI_DEV, "netns", cli)
        for ns, dev, addr in ((srv, SRV_DEV, SRV_ADDR), (cli, CLI_DEV, CLI_ADDR)):
            _ip_ok("-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev)
            _ip_ok("-n", ns, "link", "set", "dev", dev, "up")
            _ip_ok("-n", ns, "link", "set", "dev", "lo", "up")
        yield Link(srv, cli)
    finally:
        for ns in reversed(created):
            _ip("netns", "del", ns)


# --------------------------------------------------------------------------- a throw-away PKI
@dataclasses.dataclass(frozen=True)
class PKI:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("netns-pki")
    ca = make_ca(x509_name((NameOID.COMMON_NAME, "xrpc netns test CA")))
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(SRV_ADDR))]
    key, cert = make_leaf(ca, x509_name((NameOID.COMMON_NAME, SERVER_CN)), sans, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_pem, _ = write_pem(d, "ca", None, ca[1])
    cert_pem, key_pem = write_pem(d, "server", key, cert)
    return PKI(Path(ca_pem), Path(cert_pem), Path(key_pem))


# --------------------------------------------------------------------------- the two programs
class Child:
    """A fixture program: JSON commands in, JSON events out, every wait bounded."""

    def __init__(self, name: str, proc: anyio.abc.Process, stderr: Path) -> None:
        self.name = name
        self.proc = proc
        self.stderr = stderr
        self.events: list[dict[str, Any]] = []
        self._taken: set[int] = set()
        assert proc.stdout is not None
        self._out = BufferedByteReceiveStream(proc.stdout)

    def _describe(self) -> str:
        try:
            err = self.stderr.read_text(errors="replace").strip()
        except OSError:
            err = ""
        events = "\n  ".join(json.dumps(e) for e in self.events) or "(none)"
        return f"{self.name}: events so far:\n  {events}\nexit status: {self.proc.returncode}\nstandard error:\n{err or '(empty)'}"

    async def _read_one(self) -> dict[str, Any]:
        try:
            line = await self._out.receive_until(b"\n", 1 << 20)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            with anyio.move_on_after(T):
                await self.proc.wait()
            raise AssertionError(f"{self.name} ended its output\n{self._describe()}") from None
        event = json.loads(line)
        self.events.append(event)
        return event

    def _find(self, names: tuple[str, ...], match: dict[str, Any]) -> dict[str, Any] | None:
        for i, e in enumerate(self.events):
            if i not in self._taken and e["event"] in names and all(e.get(k) == v for k, v in match.items()):
                self._taken.add(i)
                return e
        return None

    async def wait_for(self, *names: str, timeout: float = STEP, **match: Any) -> dict[str, Any]:
        """The first event (not returned before) named one of ``names`` whose fields match ``match``."""
        with anyio.move_on_after(timeout):
            while True:
                found = self._find(names, match)
                if found is not None:
                    return found
                await self._read_one()
        raise AssertionError(f"no {'/'.join(names)} event {match or ''} within {timeout:g}s\n{self._describe()}")

    async def expect_none(self, *names: str, within: float) -> None:
        """Read events for ``within`` seconds: none of them may be named one of ``names``."""
        with anyio.move_on_after(within):
            while True:
                e = await self._read_one()
                assert e["event"] not in names, f"unexpected {e}\n{self._describe()}"

    async def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        with anyio.fail_after(STEP):
            await self.proc.stdin.send(json.dumps(command).encode() + b"\n")


@contextlib.asynccontextmanager
async def spawn(name: str, argv: list[str], tmp_path: Path) -> AsyncIterator[Child]:
    stderr = tmp_path / f"{name}.stderr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(stderr, "wb") as err:
        proc = await anyio.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        yield Child(name, proc, stderr)
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()  # `ip netns exec` execs the program: this is the program itself
            with anyio.fail_after(STEP):
                await proc.aclose()  # closes the pipes and reaps it


@contextlib.asynccontextmanager
async def start_server(link: Link, pki: PKI, tmp_path: Path) -> AsyncIterator[tuple[Child, str]]:
    argv = link.in_srv(
        sys.executable, str(FIXTURES / "server.py"), "--cert", str(pki.cert), "--key", str(pki.key), "--host", SRV_ADDR
    )
    async with spawn("server", argv, tmp_path) as server:
        ready = await server.wait_for("ready")
        assert ready["pid"] == server.proc.pid, ready  # the program itself, not a wrapper
        assert ready["url"].startswith(f"tls://{SRV_ADDR}:"), ready
        yield server, ready["url"]


@contextlib.asynccontextmanager
async def start_client(
    link: Link, url: str, pki: PKI, tmp_path: Path, *, mode: str, heartbeat: float | None = None
) -> AsyncIterator[Child]:
    argv = link.in_cli(sys.executable, str(FIXTURES / "client.py"), "--mode", mode, "--url", url, "--ca", str(pki.ca))
    if heartbeat is not None:
        argv += ["--heartbeat", str(heartbeat)]
    async with spawn(f"client ({mode})", argv, tmp_path) as client:
        started = await client.wait_for("started", "unsupported")
        if started["event"] == "unsupported":
            raise Unsupported(f"the services layer cannot target {url}: {started['type']}: {started['message']}")
        yield client


class Unsupported(AssertionError):
    """``client.py --mode service`` could not even set up: the services layer cannot target a URL."""


async def connect(client: Child) -> dict[str, Any]:
    """Have the client connect; its "connected" event."""
    await client.send(cmd="connect")
    connected = await client.wait_for("connected", "connect_failed")
    assert connected["event"] == "connected", f"{connected}\n{client._describe()}"
    return connected


async def connect_and_hold(client: Child, server: Child, seconds: float) -> None:
    """Have the client connect and make a call (id "held") that the server holds for ``seconds``."""
    await connect(client)
    await client.send(cmd="call", id="held", method="hold", arg=seconds)
    await server.wait_for("holding", conn=1)


def _report(what: str, seconds: float) -> None:
    print(f"netns: {what}: {seconds * 1000:.0f} ms")


# --------------------------------------------------------------------------- tests: xrpc.connect
async def test_tls_call_across_namespaces(link: Link, pki: PKI, tmp_path: Path) -> None:
    """The server listens on tls:// in one namespace; a client in the other calls it and sees its certificate."""
    async with start_server(link, pki, tmp_path) as (server, url):
        async with start_client(link, url, pki, tmp_path, mode="connect") as client:
            t0 = time.monotonic()
            connected = await connect(client)
            _report("connect over tls:// across namespaces (handshakes included)", connected["t"] - t0)
            assert connected["transport"] == "tls"
            assert connected["cert_subject"].get("CN") == SERVER_CN
            assert f"IP Address:{SRV_ADDR}" in connected["cert_sans"]
            accepted = await server.wait_for("connected")
            assert accepted["transport"] == "tls" and accepted["address"].startswith(f"{CLI_ADDR}:"), accepted

            await client.send(cmd="call", id="echo", method="echo", arg="across hosts")
            result = await client.wait_for("result", "error", id="echo")
            assert result["event"] == "result" and result["value"] == "across hosts", result
            _report("one echo call", result["elapsed"])


async def test_heartbeat_primitives_notice_a_cut_link(link: Link, pki: PKI, tmp_path: Path) -> None:
    """PING every 0.3 s with ``Connection.ping(timeout=0.3)`` and ``interrupt()`` on a miss: a cut link is
    noticed within ~1 s, and the call in flight fails with ConnectionInterrupted instead of hanging."""
    async with start_server(link, pki, tmp_path) as (server, url):
        async with start_client(link, url, pki, tmp_path, mode="connect", heartbeat=HEARTBEAT) as client:
            await connect_and_hold(client, server, HOLD_FOREVER)

            t_cut = time.monotonic()
            await link.cut()
            missed = await client.wait_for("heartbeat_missed", timeout=T)
            failed = await client.wait_for("result", "error", id="held", timeout=T)
            interrupted = await client.wait_for("interrupted", timeout=T)
            assert failed["event"] == "error" and "ConnectionInterrupted" in failed["mro"], failed
            assert "heartbeat" in failed["message"], failed
            for name, e in (("heartbeat missed", missed), ("in-flight call failed", failed), ("on_interrupted", interrupted)):
                _report(f"cut to {name}", e["t"] - t_cut)
                assert e["t"] - t_cut < DETECT_LIMIT, f"{name} {e['t'] - t_cut:.3f}s after the cut\n{client._describe()}"
            await client.wait_for("invalidated", timeout=T)

            # The link works again once restored (a fresh connection: plumbing, not the library's reconnect).
            t_restore = time.monotonic()
            await link.restore()
            await connect(client)
            await client.send(cmd="call", id="after", method="conn_id")
            after = await client.wait_for("result", "error", id="after")
            assert after["event"] == "result" and after["value"] == 2, after
            _report("restore to a call answered on a fresh xrpc.connect", after["t"] - t_restore)


async def test_without_a_heartbeat_tcp_does_not_notice_a_short_cut(link: Link, pki: PKI, tmp_path: Path) -> None:
    """The control: with no heartbeat nothing notices the cut (TCP would take minutes), and once the
    link is back the call in flight completes on the same connection."""
    async with start_server(link, pki, tmp_path) as (server, url):
        async with start_client(link, url, pki, tmp_path, mode="connect") as client:
            await connect_and_hold(client, server, 1.0)
            await link.cut()
            await client.expect_none("error", "result", "interrupted", "invalidated", within=2 * DETECT_LIMIT)
            t_restore = time.monotonic()
            await link.restore()
            held = await client.wait_for("result", "error", id="held")
            assert held["event"] == "result" and held["value"] == "held", held
            _report("restore to the held call's answer (TCP retransmission)", held["t"] - t_restore)


# --------------------------------------------------------------------------- tests: the services layer
async def test_service_over_tls_across_namespaces(link: Link, pki: PKI, tmp_path: Path) -> None:
    """The same client code as for a local service, against a service on another host over tls://."""
    async with start_server(link, pki, tmp_path) as (server, url):
        async with start_client(link, url, pki, tmp_path, mode="service") as client:
            await client.send(cmd="call", id="echo", method="echo", arg="across hosts")
            result = await client.wait_for("result", "error", id="echo")
            assert result["event"] == "result" and result["value"] == "across hosts", result
            connected = await connect(client)
            assert connected["state"] == "connected"
            assert connected["transport"] == "tls" and connected["cert_subject"].get("CN") == SERVER_CN


async def test_service_heartbeat_notices_a_cut_link(link: Link, pki: PKI, tmp_path: Path) -> None:
    """``connect_service(..., heartbeat=0.3)``: a cut link is noticed within ~1 s (on_interrupted), and a
    call in flight fails with ConnectionInterrupted instead of hanging."""
    async with start_server(link, pki, tmp_path) as (server, url):
        async with start_client(link, url, pki, tmp_path, mode="service", heartbeat=HEARTBEAT) as client:
            await connect_and_hold(client, server, HOLD_FOREVER)

            t_cut = time.monotonic()
            await link.cut()
            failed = await client.wait_for("result", "error", id="held", timeout=T)
            interrupted = await client.wait_for("interrupted", timeout=T)
            assert failed["event"] == "error" and "ConnectionInterrupted" in failed["mro"], failed
            assert "heartbeat" in failed["message"], failed
            for name, e in (("in-flight call failed", failed), ("on_interrupted", interrupted)):
                _report(f"service: cut to {name}", e["t"] - t_cut)
                assert e["t"] - t_cut < DETECT_LIMIT, f"{name} {e['t'] - t_cut:.3f}s after the cut\n{client._describe()}"


async def test_service_reconnects_after_the_link_is_restored(link: Link, pki: PKI, tmp_path: Path) -> None:
    """After the heartbeat noticed the cut and the link is back, the next call succeeds on a new connection."""
    async with start_server(link, pki, tmp_path) as (server, url):
        async with start_client(link, url, pki, tmp_path, mode="service", heartbeat=HEARTBEAT) as client:
            await client.send(cmd="call", id="first", method="conn_id")
            first = await client.wait_for("result", "error", id="first")
            assert first["event"] == "result" and first["value"] == 1, first

            await link.cut()
            await client.wait_for("interrupted", timeout=T)

            t_restore = time.monotonic()
            await link.restore()
            await client.send(cmd="call", id="again", method="conn_id")
            again = await client.wait_for("result", "error", id="again")
            assert again["event"] == "result" and again["value"] >= 2, again  # a new connection
            _report("service: restore to a call answered on the reconnected connection", again["t"] - t_restore)
            await server.wait_for("connected", conn=again["value"])
