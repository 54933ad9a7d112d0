"""Security mechanisms applied for real: requirements, peer credentials, TLS identities, socket files.

Every requirement test runs a real server on a Unix socket (or TLS) and a real client, and checks
both sides: what the refused peer sees (``PeerRejected``, without the policy in the message) and
what the server records (a WARNING on the ``xrpc`` logger naming who was refused and why).
The TLS tests run on asyncio and on trio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import ipaddress
import logging
import os
import pwd
import re
import shutil
import socket
import ssl
import stat
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Protocol

import anyio
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

import xrpc
from xrpc._protocol import Call, ErrorCode

import _trust
from _trust import write_pem, xrpc_warnings
from _wire import GOODBYE_TAG, HELLO, decode_frames, frame
from _timeouts import T
from _procs import short_dir

BACKENDS = ("asyncio", "trio")
XRPC_SRC = Path(__file__).resolve().parent.parent / "xrpc"


# --------------------------------------------------------------------------- interfaces
@xrpc.interface
class Calc(Protocol):
    async def add(self, a: int, b: int) -> int: ...


class CalcImpl:
    def __init__(self) -> None:
        self.calls = 0

    async def add(self, a: int, b: int) -> int:
        self.calls += 1
        return a + b


@xrpc.interface
class Vault(Protocol):
    async def read(self) -> str: ...


class VaultImpl:
    def __init__(self) -> None:
        self.reads = 0

    async def read(self) -> str:
        self.reads += 1
        return "the secret"


OTHER_UID = os.getuid() + 12345  # nobody on this host runs as this uid
OTHER_GID = os.getgid() + 12345


@xrpc.interface
class Guarded(Protocol):
    """Method guards declared in the interface itself."""

    async def public(self) -> str: ...

    @xrpc.requires(f"uid == {OTHER_UID}")
    async def admin(self) -> str: ...

    @xrpc.requires(xrpc.Requirement.same_user())
    async def mine(self) -> str: ...

    @xrpc.oneway
    @xrpc.requires(f"uid == {OTHER_UID}")
    async def poke(self) -> None: ...


class GuardedImpl:
    """Implements ``Guarded`` without repeating its guards: the interface's guards still apply."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def public(self) -> str:
        self.ran.append("public")
        return "public"

    async def admin(self) -> str:
        self.ran.append("admin")
        return "admin"

    async def mine(self) -> str:
        self.ran.append("mine")
        return "mine"

    async def poke(self) -> None:
        self.ran.append("poke")


@xrpc.interface
class Plain(Protocol):
    async def public(self) -> str: ...
    async def admin(self) -> str: ...


class PlainImplWithGuard:
    """Guards declared on the implementation only."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def public(self) -> str:
        self.ran.append("public")
        return "public"

    @xrpc.requires(xrpc.Requirement.uid(OTHER_UID))
    async def admin(self) -> str:
        self.ran.append("admin")
        return "admin"


class PeerInfo(msgspec.Struct):
    transport: str
    subject: dict[str, str]
    sans: list[str]
    fingerprint: str | None


@xrpc.interface
class Who(Protocol):
    async def who(self) -> PeerInfo: ...


class WhoImpl:
    async def who(self) -> PeerInfo:
        p = xrpc.current_connection().peer
        return PeerInfo(p.transport, dict(p.cert_subject), list(p.cert_sans), p.cert_fingerprint)


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def sock_url(sock_dir: str) -> str:
    return f"unix://{sock_dir}/s.sock"


SELF_EXE = os.path.realpath(sys.executable)
SELF_USER = pwd.getpwuid(os.getuid()).pw_name
SELF_GROUP = grp.getgrgid(os.getgid()).gr_name
OTHER_EXE = os.path.realpath(shutil.which("sh") or "/bin/sh")
assert OTHER_EXE != SELF_EXE

R = xrpc.Requirement

ACCEPTED = [
    pytest.param(R.uid(os.getuid()), id="uid"),
    pytest.param(R.gid(os.getgid()), id="gid"),
    pytest.param(R.same_user(), id="same_user"),
    pytest.param(R.executable(SELF_EXE), id="executable"),
    pytest.param(R.executable(sys.executable), id="executable-via-symlink"),
    pytest.param(R.user(SELF_USER), id="user"),
    pytest.param(R.group(SELF_GROUP), id="group"),
    pytest.param(R.pid(os.getpid()), id="pid"),
    pytest.param(R.transport("unix"), id="transport"),
    pytest.param(R.uid(OTHER_UID) | R.same_user(), id="or"),
    pytest.param(f"uid == {os.getuid()}", id="expr-uid"),
    pytest.param(f'uid == {os.getuid()} and exe == "{SELF_EXE}"', id="expr-uid-and-exe"),
    pytest.param('same_user && !(transport == "tcp")', id="expr-same-user-not-tcp"),
    pytest.param(f'user == "{SELF_USER}" or uid == {OTHER_UID}', id="expr-user-or"),
]

REFUSED = [
    pytest.param(R.uid(OTHER_UID), id="uid"),
    pytest.param(R.gid(OTHER_GID), id="gid"),
    pytest.param(~R.same_user(), id="not-same_user"),
    pytest.param(R.executable(OTHER_EXE), id="executable"),
    pytest.param(R.user("no-such-user-xrpc"), id="unknown-user"),
    pytest.param(R.group("no-such-group-xrpc"), id="unknown-group"),
    pytest.param(R.pid(os.getpid() + 1), id="pid"),
    pytest.param(R.transport("tls"), id="transport"),
    pytest.param(R.cert_subject(CN="client1"), id="cert-on-unix"),
    pytest.param(R.same_user() & R.uid(OTHER_UID), id="and"),
    pytest.param(f"uid == {OTHER_UID}", id="expr-uid"),
    pytest.param(f'exe == "{OTHER_EXE}"', id="expr-exe"),
    pytest.param("not same_user", id="expr-not-same-user"),
    pytest.param(f"same_user and gid == {OTHER_GID}", id="expr-and"),
]


def assert_policy_hidden(message: str, url: str, req: xrpc.Requirement | str) -> None:
    """The refused peer learns that it was refused, not which policy refused it."""
    text = str(xrpc.requirement(req) if isinstance(req, str) else req)
    words = {text}
    words.update(w for w in re.findall(r"[A-Za-z_.]{3,}|\d{3,}", text) if w not in {"and", "not"})
    rest = message.replace(url, "<url>") if url else message
    assert "refused" in rest
    for word in sorted(words):
        assert word not in rest, f"the refusal reveals {word!r}: {message}"


# --------------------------------------------------------------------------- server requirements
@pytest.mark.parametrize("req", ACCEPTED)
async def test_server_requirement_accepts(sock_url: str, req: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    seen: list[xrpc.Peer] = []
    server = xrpc.Server(on_connect=lambda conn: seen.append(conn.peer), requirement=req)
    server.export(Calc, CalcImpl())
    with anyio.fail_after(T):
        async with server.listen(sock_url) as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                assert await conn.proxy(Calc).add(2, 3) == 5
    assert [(p.uid, p.pid) for p in seen] == [(os.getuid(), os.getpid())]
    assert not [m for m in xrpc_warnings(caplog) if "refused" in m]


@pytest.mark.parametrize("req", REFUSED)
async def test_server_requirement_refuses(sock_url: str, req: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    seen: list[xrpc.Peer] = []
    impl = CalcImpl()
    server = xrpc.Server(on_connect=lambda conn: seen.append(conn.peer), requirement=req)
    server.export(Calc, impl)
    with anyio.fail_after(T):
        async with server.listen(sock_url) as listener:
            with pytest.raises(xrpc.PeerRejected) as info:
                async with xrpc.connect(listener.url, timeout=T):
                    pytest.fail("a refused client got a connection")
            # the server still serves peers it accepts
            server.requirement = None
            async with xrpc.connect(listener.url, timeout=T) as conn:
                assert await conn.proxy(Calc).add(1, 1) == 2
    assert_policy_hidden(str(info.value), listener.url, req)
    assert len(seen) == 1  # on_connect ran for the accepted client only
    assert impl.calls == 1
    refusals = [m for m in xrpc_warnings(caplog) if "refused connection" in m]
    assert len(refusals) == 1, xrpc_warnings(caplog)
    expected = str(xrpc.requirement(req) if isinstance(req, str) else req)
    assert f"pid={os.getpid()}" in refusals[0] and f"uid={os.getuid()}" in refusals[0]
    # ... and why: the requirement (or the part of it) that failed, with the fact that decided it
    why = re.search(r"uid=\d+: (.+) failed: .+", refusals[0])
    assert why is not None, refusals[0]
    assert why.group(1) in expected


async def test_refused_peer_calls_sent_early_never_run(sock_dir: str) -> None:
    """A client may send calls right after HELLO; a refused one's calls are dropped, not run."""
    impl = CalcImpl()
    server = xrpc.Server(requirement=R.uid(OTHER_UID))
    server.export(Calc, impl)
    path = f"{sock_dir}/s.sock"
    payload = msgspec.Raw(msgspec.msgpack.encode([1, 2]))
    data = HELLO + b"".join(frame(Call(i, "Calc", "add", payload)) for i in (1, 3, 5))
    received = bytearray()
    with anyio.fail_after(T):
        async with server.listen(f"unix://{path}"):
            async with await anyio.connect_unix(path) as stream:
                await stream.send(data)
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        received += await stream.receive()
    frames = decode_frames(bytes(received))
    assert [f[0] for f in frames] == [GOODBYE_TAG]
    assert frames[0][2] == ErrorCode.PEER_REJECTED
    assert "uid" not in frames[0][1]
    assert impl.calls == 0


async def test_missing_peer_facts_fail_closed() -> None:
    """Over TCP the kernel vouches for no uid: a uid-based requirement refuses the peer."""
    server = xrpc.Server(requirement=R.same_user())
    server.export(Calc, CalcImpl())
    with anyio.fail_after(T):
        async with server.listen("tcp://127.0.0.1:0") as listener:
            with pytest.raises(xrpc.PeerRejected):
                async with xrpc.connect(listener.url, timeout=T):
                    pytest.fail("a TCP peer satisfied same_user")


def test_a_malformed_requirement_is_refused_at_configuration() -> None:
    for make in (
        lambda: xrpc.Server(requirement="uid = 0"),
        lambda: xrpc.Server().export(Calc, CalcImpl(), requirement="same_user and"),
    ):
        with pytest.raises(xrpc.RequirementSyntaxError):
            make()
    with pytest.raises(xrpc.InterfaceError):
        xrpc.requires(42)


# --------------------------------------------------------------------------- per export / per method
async def test_export_requirement_refuses_its_calls_only(sock_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    vault, calc = VaultImpl(), CalcImpl()
    server = xrpc.Server()
    server.export(Vault, vault, requirement=f"uid == {OTHER_UID}")
    server.export(Calc, calc)
    with anyio.fail_after(T):
        async with server.listen(sock_url) as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                assert await conn.proxy(Calc).add(1, 2) == 3
                with pytest.raises(xrpc.PeerRejected) as info:
                    await conn.proxy(Vault).read()
                # the same connection keeps working for the other export, and refuses again
                assert await conn.proxy(Calc).add(3, 4) == 7
                with pytest.raises(xrpc.PeerRejected):
                    await conn.proxy(Vault).read()
    assert vault.reads == 0
    assert calc.calls == 2
    assert_policy_hidden(str(info.value), "", f"uid == {OTHER_UID}")
    refusals = [m for m in xrpc_warnings(caplog) if "refused call Vault.read" in m]
    assert len(refusals) == 2
    assert f"uid={os.getuid()}" in refusals[0] and f"uid == {OTHER_UID} failed" in refusals[0]


async def test_export_requirement_accepts(sock_url: str) -> None:
    vault = VaultImpl()
    server = xrpc.Server()
    server.export(Vault, vault, requirement=R.same_user() & R.executable(SELF_EXE))
    with anyio.fail_after(T):
        async with server.listen(sock_url) as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                assert await conn.proxy(Vault).read() == "the secret"
    assert vault.reads == 1


async def test_export_and_server_requirements_combine(sock_url: str) -> None:
    """Server requirement passes, export requirement fails: the export stays closed."""
    vault = VaultImpl()
    server = xrpc.Server(requirement=R.same_user())
    server.export(Vault, vault, requirement=R.pid(os.getpid() + 1))
    server.export(Calc, CalcImpl())
    with anyio.fail_after(T):
        async with server.listen(sock_url) as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                assert await conn.proxy(Calc).add(1, 1) == 2
                with pytest.raises(xrpc.PeerRejected):
                    await conn.proxy(Vault).read()
    assert vault.reads == 0


async def test_method_requirement_in_the_interface(sock_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    impl = GuardedImpl()
    server = xrpc.Server()
    server.export(Guarded, impl)
    with anyio.fail_after(T):
        async with server.listen(sock_url) as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                g = conn.proxy(Guarded)
                assert await g.public() == "public"
                assert await g.mine() == "mine"
                with pytest.raises(xrpc.PeerRejected) as info:
                    await g.admin()
                await g.poke()  # one-way: refused silently ...
                assert await g.public() == "public"  # ... before this later call starts
    assert impl.ran == ["public", "mine", "public"]
    assert_policy_hidden(str(info.value), "", f"uid == {OTHER_UID}")
    refused = [m for m in xrpc_warnings(caplog) if "refused call" in m]
    assert len(refused) == 2
    assert any("Guarded.admin" in m for m in refused) and any("Guarded.poke" in m for m in refused)


async def test_method_requirement_on_the_implementation(sock_url: str) -> None:
    impl = PlainImplWithGuard()
    server = xrpc.Server()
    server.export(Plain, impl)
    with anyio.fail_after(T):
        async with server.listen(sock_url) as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                p = conn.proxy(Plain)
                with pytest.raises(xrpc.PeerRejected):
                    await p.admin()
                assert await p.public() == "public"
    assert impl.ran == ["public"]


async def test_per_connection_export_requirement(sock_url: str) -> None:
    vault = VaultImpl()

    def on_connect(conn: xrpc.Connection) -> None:
        conn.export(Vault, vault, requirement=f"uid == {OTHER_UID}")
        conn.export(Calc, CalcImpl())

    server = xrpc.Server(on_connect=on_connect)
    with anyio.fail_after(T):
        async with server.listen(sock_url) as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                with pytest.raises(xrpc.PeerRejected):
                    await conn.proxy(Vault).read()
                assert await conn.proxy(Calc).add(2, 2) == 4
    assert vault.reads == 0


# --------------------------------------------------------------------------- the client's requirement
@pytest.mark.parametrize("req", [R.uid(OTHER_UID), f'exe == "{OTHER_EXE}"', R.transport("tls")])
async def test_client_requirement_refuses_the_server(sock_url: str, req: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    calc = CalcImpl()
    server = xrpc.Server()
    server.export(Calc, calc)
    with anyio.fail_after(T):
        async with server.listen(sock_url) as listener:
            with pytest.raises(xrpc.PeerRejected):
                async with xrpc.connect(listener.url, timeout=T, requirement=req):
                    pytest.fail("the client accepted a server that fails its requirement")
    assert calc.calls == 0
    assert any("does not satisfy the requirement" in m for m in xrpc_warnings(caplog))


async def test_client_requirement_accepts_the_server(sock_url: str) -> None:
    server = xrpc.Server()
    server.export(Calc, CalcImpl())
    req = R.same_user() & R.executable(SELF_EXE) & R.pid(os.getpid())
    with anyio.fail_after(T):
        async with server.listen(sock_url) as listener:
            async with xrpc.connect(listener.url, timeout=T, requirement=req) as conn:
                assert conn.peer.uid == os.getuid()
                assert await conn.proxy(Calc).add(5, 5) == 10


@xrpc.interface
class Notes(Protocol):
    async def read_notes(self) -> str: ...


class NotesImpl:
    def __init__(self) -> None:
        self.reads = 0

    async def read_notes(self) -> str:
        self.reads += 1
        return "client secrets"


async def test_client_requirement_protects_client_exports(sock_url: str) -> None:
    notes = NotesImpl()
    stolen: list[str] = []

    async def on_connect(conn: xrpc.Connection) -> None:
        with contextlib.suppress(xrpc.Error):
            stolen.append(await conn.proxy(Notes).read_notes())

    server = xrpc.Server(on_connect=on_connect)
    with anyio.fail_after(T):
        async with server.listen(sock_url) as listener:
            with pytest.raises(xrpc.PeerRejected):
                async with xrpc.connect(listener.url, timeout=T, exports=[(Notes, notes)], requirement=R.uid(OTHER_UID)):
                    pass
    assert stolen == []
    assert notes.reads == 0


# --------------------------------------------------------------------------- a real second user

CHILD = r"""
import os, sys
import anyio, xrpc, xrpc._proxy
from typing import Protocol

@xrpc.interface
class Calc(Protocol):
    async def add(self, a: int, b: int) -> int: ...

url, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def main():
    if uid != os.getuid():
        # Python itself lives under /root (mode 0700) here, so the interpreter cannot be exec'd as
        # another user: start as root, import everything, then drop to the other user for good.
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise SystemExit("could regain root")
    try:
        async with xrpc.connect(url, timeout=10) as conn:
            print("OK", os.getuid(), await conn.proxy(Calc).add(1, 2))
    except xrpc.Error as exc:
        print(type(exc).__name__, os.getuid(), exc)

anyio.run(main)
"""


@pytest.fixture(scope="module")
def other_user() -> pwd.struct_passwd:
    return _trust.other_user("run a client as another user")


@pytest.fixture
def shared_dir() -> Iterator[str]:
    d = short_dir()
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _run_child(url: str, uid: int, gid: int) -> list[str]:
    with anyio.fail_after(6 * T):
        result = await anyio.run_process([sys.executable, "-c", CHILD, url, str(uid), str(gid)], check=False)
    out = result.stdout.decode().strip()
    assert result.returncode == 0, (out, result.stderr.decode()[-2000:])
    return out.split(" ", 2)


@pytest.mark.timeout(180)
async def test_same_user_refuses_a_process_of_another_user(
    other_user: pwd.struct_passwd, shared_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    calc = CalcImpl()
    server = xrpc.Server(requirement=R.same_user())
    server.export(Calc, calc)
    async with server.listen(f"unix://{shared_dir}/s.sock", socket_mode=0o666) as listener:
        other = await _run_child(listener.url, other_user.pw_uid, other_user.pw_gid)
        same = await _run_child(listener.url, os.getuid(), os.getgid())
    assert other[:2] == ["PeerRejected", str(other_user.pw_uid)], other
    assert "same_user" not in other[2]
    assert same == ["OK", str(os.getuid()), "3"], same
    assert calc.calls == 1
    refusals = [m for m in xrpc_warnings(caplog) if "refused connection" in m]
    assert len(refusals) == 1, xrpc_warnings(caplog)
    assert f"uid={other_user.pw_uid}" in refusals[0] and "same_user failed" in refusals[0]


@pytest.mark.timeout(180)
async def test_default_socket_mode_keeps_other_users_out(other_user: pwd.struct_passwd, shared_dir: str) -> None:
    """No requirement at all: the 0600 socket file alone stops another user at connect()."""
    calc = CalcImpl()
    server = xrpc.Server()
    server.export(Calc, calc)
    async with server.listen(f"unix://{shared_dir}/s.sock") as listener:
        other = await _run_child(listener.url, other_user.pw_uid, other_user.pw_gid)
        same = await _run_child(listener.url, os.getuid(), os.getgid())
    assert other[:2] == ["TransportError", str(other_user.pw_uid)], other
    assert "Permission denied" in other[2]
    assert same[0] == "OK"
    assert calc.calls == 1


# --------------------------------------------------------------------------- TLS
@dataclasses.dataclass(frozen=True)
class PKI:
    ca: str
    server_cert: str
    server_key: str
    wrong_name_cert: str
    wrong_name_key: str
    client_cert: str
    client_key: str
    rogue_ca: str
    rogue_server_cert: str
    rogue_server_key: str
    rogue_client_cert: str
    rogue_client_key: str
    server_fingerprint: str
    client_fingerprint: str


def _name(cn: str) -> x509.Name:
    return _trust.cn_name(cn, "xrpc tests")


def _make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return _trust.make_ca(_name(cn))


def _make_leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return _trust.make_leaf(ca, _name(cn), sans, usage)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca = _make_ca("xrpc test CA")
    rogue = _make_ca("rogue CA")
    server_names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _make_leaf(ca, "server.test", server_names, ExtendedKeyUsageOID.SERVER_AUTH)
    wrong = _make_leaf(ca, "elsewhere.test", [x509.DNSName("elsewhere.test")], ExtendedKeyUsageOID.SERVER_AUTH)
    client_names: list[x509.GeneralName] = [x509.DNSName("client1.test"), x509.UniformResourceIdentifier("spiffe://test/client1")]
    client = _make_leaf(ca, "client1", client_names, ExtendedKeyUsageOID.CLIENT_AUTH)
    # the rogue CA issues certificates with the very same names
    rogue_server = _make_leaf(rogue, "server.test", server_names, ExtendedKeyUsageOID.SERVER_AUTH)
    rogue_client = _make_leaf(rogue, "client1", client_names, ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_path, _ = write_pem(d, "ca", None, ca[1])
    rogue_path, _ = write_pem(d, "rogue", None, rogue[1])
    return PKI(
        ca_path,
        *write_pem(d, "server", *server),
        *write_pem(d, "wrong", *wrong),
        *write_pem(d, "client", *client),
        rogue_path,
        *write_pem(d, "rogue-server", *rogue_server),
        *write_pem(d, "rogue-client", *rogue_client),
        server_fingerprint=server[1].fingerprint(hashes.SHA256()).hex(),
        client_fingerprint=client[1].fingerprint(hashes.SHA256()).hex(),
    )


def _server_ctx(pki: PKI, *, mutual: bool, cert: str = "", key: str = "") -> ssl.SSLContext:
    return xrpc.server_ssl_context(cert or pki.server_cert, key or pki.server_key, cafile=pki.ca if mutual else None)


def _client_ctx(pki: PKI, *, with_cert: bool = False, ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    if with_cert:
        return xrpc.client_ssl_context(ca or pki.ca, certfile=cert or pki.client_cert, keyfile=key or pki.client_key)
    return xrpc.client_ssl_context(ca or pki.ca)


@contextlib.asynccontextmanager
async def tls_server(
    ctx: ssl.SSLContext, *, requirement: Any = None, on_connect: Callable[[xrpc.Connection], Any] | None = None
) -> AsyncIterator[str]:
    server = xrpc.Server(requirement=requirement, on_connect=on_connect)
    server.export(Who, WhoImpl())
    async with server.listen("tls://127.0.0.1:0", ssl_context=ctx) as listener:
        yield listener.url


def run(backend: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(T * 3):
            return await fn()

    return anyio.run(bounded, backend=backend)


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc``, its cause/context chain or its group members hold a ``kind``."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return True
        todo.extend(getattr(e, "exceptions", ()))
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


async def _refused(url: str, **kwargs: Any) -> BaseException:
    """Connect, expecting a refusal; return what was raised."""
    try:
        async with xrpc.connect(url, timeout=T, **kwargs) as conn:
            await conn.proxy(Who).who()
    except Exception as exc:
        return exc
    pytest.fail(f"{url}: the connection was accepted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tls_server_authentication(pki: PKI, backend: str) -> None:
    async def main() -> None:
        async with tls_server(_server_ctx(pki, mutual=False)) as url:
            port = url.rsplit(":", 1)[1]
            for target in (url, f"tls://localhost:{port}"):
                async with xrpc.connect(target, ssl_context=_client_ctx(pki)) as conn:
                    assert conn.peer.transport == "tls"
                    assert conn.peer.cert_subject["CN"] == "server.test"
                    assert conn.peer.cert_subject["O"] == "xrpc tests"
                    assert "DNS:localhost" in conn.peer.cert_sans
                    assert conn.peer.cert_fingerprint == pki.server_fingerprint
                    seen = await conn.proxy(Who).who()
                    # without mutual authentication the server knows no client identity
                    assert seen == PeerInfo("tls", {}, [], None)

    run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tls_mutual_authentication(pki: PKI, backend: str) -> None:
    async def main() -> None:
        async with tls_server(_server_ctx(pki, mutual=True)) as url:
            async with xrpc.connect(url, ssl_context=_client_ctx(pki, with_cert=True)) as conn:
                assert conn.peer.cert_subject["CN"] == "server.test"
                seen = await conn.proxy(Who).who()
        assert seen.transport == "tls"
        assert seen.subject == {"CN": "client1", "O": "xrpc tests"}
        assert sorted(seen.sans) == ["DNS:client1.test", "URI:spiffe://test/client1"]
        assert seen.fingerprint == pki.client_fingerprint

    run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["no certificate", "certificate from an untrusted CA"])
def test_tls_mutual_authentication_refuses_a_client_without_a_trusted_certificate(pki: PKI, backend: str, which: str) -> None:
    reached: list[xrpc.Peer] = []

    async def main() -> BaseException:
        if which == "no certificate":
            ctx = _client_ctx(pki)
        else:
            ctx = _client_ctx(pki, with_cert=True, cert=pki.rogue_client_cert, key=pki.rogue_client_key)
        async with tls_server(_server_ctx(pki, mutual=True), on_connect=lambda c: reached.append(c.peer)) as url:
            return await _refused(url, ssl_context=ctx)

    exc = run(backend, main)
    assert reached == []
    assert isinstance(exc, xrpc.Error), repr(exc)


TLS_ACCEPTED = [
    pytest.param(lambda p: R.cert_subject(CN="client1"), id="subject-CN"),
    pytest.param(lambda p: R.cert_subject(CN="client1", O="xrpc tests"), id="subject-CN-O"),
    pytest.param(lambda p: R.cert_san("DNS:client1.test"), id="san-dns"),
    pytest.param(lambda p: R.cert_san("URI:spiffe://test/client1"), id="san-uri"),
    pytest.param(lambda p: R.cert_fingerprint(p.client_fingerprint), id="fingerprint"),
    pytest.param(lambda p: R.cert_fingerprint(":".join(p.client_fingerprint[i : i + 2].upper() for i in range(0, 64, 2))), id="fingerprint-colons"),
    pytest.param(lambda p: 'cert.subject.CN == "client1" and transport == "tls"', id="expr"),
    pytest.param(lambda p: f'cert.fingerprint == "{p.client_fingerprint}"', id="expr-fingerprint"),
]

TLS_REFUSED = [
    pytest.param(lambda p: R.cert_subject(CN="mallory"), id="subject-CN"),
    pytest.param(lambda p: R.cert_subject(CN="client1", O="other org"), id="subject-O"),
    pytest.param(lambda p: R.cert_san("DNS:mallory.test"), id="san"),
    pytest.param(lambda p: R.cert_san("DNS:spiffe://test/client1"), id="san-wrong-kind"),
    pytest.param(lambda p: R.cert_fingerprint(p.server_fingerprint), id="fingerprint"),
    pytest.param(lambda p: R.same_user(), id="same_user-over-tls"),
    pytest.param(lambda p: 'cert.subject.CN == "client1" and transport == "unix"', id="expr"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", TLS_ACCEPTED)
def test_certificate_requirements_accept(pki: PKI, backend: str, make: Callable[[PKI], Any]) -> None:
    async def main() -> PeerInfo:
        async with tls_server(_server_ctx(pki, mutual=True), requirement=make(pki)) as url:
            async with xrpc.connect(url, ssl_context=_client_ctx(pki, with_cert=True)) as conn:
                return await conn.proxy(Who).who()

    assert run(backend, main).subject["CN"] == "client1"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", TLS_REFUSED)
def test_certificate_requirements_refuse(pki: PKI, backend: str, make: Callable[[PKI], Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    req = make(pki)

    async def main() -> tuple[str, BaseException]:
        async with tls_server(_server_ctx(pki, mutual=True), requirement=req) as url:
            return url, await _refused(url, ssl_context=_client_ctx(pki, with_cert=True))

    url, exc = run(backend, main)
    assert isinstance(exc, xrpc.PeerRejected), repr(exc)
    assert_policy_hidden(str(exc), url, req)
    refusals = [m for m in xrpc_warnings(caplog) if "refused connection" in m]
    assert len(refusals) == 1 and "failed" in refusals[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_certificate_requirement_on_a_method(pki: PKI, backend: str) -> None:
    vault = VaultImpl()

    async def main() -> None:
        server = xrpc.Server()
        server.export(Vault, vault, requirement=R.cert_subject(CN="admin"))
        server.export(Who, WhoImpl())
        async with server.listen("tls://127.0.0.1:0", ssl_context=_server_ctx(pki, mutual=True)) as listener:
            async with xrpc.connect(listener.url, ssl_context=_client_ctx(pki, with_cert=True)) as conn:
                with pytest.raises(xrpc.PeerRejected):
                    await conn.proxy(Vault).read()
                assert (await conn.proxy(Who).who()).subject["CN"] == "client1"

    run(backend, main)
    assert vault.reads == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_certificate_requirement_on_the_server(pki: PKI, backend: str) -> None:
    async def main() -> None:
        async with tls_server(_server_ctx(pki, mutual=False)) as url:
            good = R.cert_subject(CN="server.test") & R.cert_fingerprint(pki.server_fingerprint)
            async with xrpc.connect(url, ssl_context=_client_ctx(pki), requirement=good) as conn:
                assert (await conn.proxy(Who).who()).transport == "tls"
            exc = await _refused(url, ssl_context=_client_ctx(pki), requirement=R.cert_subject(CN="impostor"))
            assert isinstance(exc, xrpc.PeerRejected), repr(exc)

    run(backend, main)


def _untrusted_server_ctx(pki: PKI, case: str) -> ssl.SSLContext:
    if case == "untrusted CA":
        # the client trusts only its CA; the server's certificate (same names) comes from another one
        return _server_ctx(pki, mutual=False, cert=pki.rogue_server_cert, key=pki.rogue_server_key)
    # a certificate from the trusted CA, but for another name than the one in the URL
    assert case == "hostname mismatch"
    return _server_ctx(pki, mutual=False, cert=pki.wrong_name_cert, key=pki.wrong_name_key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["untrusted CA", "hostname mismatch"])
def test_untrusted_server_is_refused(pki: PKI, backend: str, case: str) -> None:
    reached: list[xrpc.Peer] = []

    async def main() -> BaseException:
        async with tls_server(_untrusted_server_ctx(pki, case), on_connect=lambda c: reached.append(c.peer)) as url:
            return await _refused(url, ssl_context=_client_ctx(pki))

    exc = run(backend, main)
    assert reached == []  # no xrpc handshake happened
    assert isinstance(exc, xrpc.Error) or _contains(exc, ssl.SSLCertVerificationError), repr(exc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_untrusted_server_is_refused_by_default_context(pki: PKI, backend: str) -> None:
    """Without ssl_context=, tls:// verifies against the system CAs: a private CA is not trusted."""

    async def main() -> BaseException:
        async with tls_server(_server_ctx(pki, mutual=False)) as url:
            return await _refused(url)

    exc = run(backend, main)
    assert isinstance(exc, xrpc.Error) or _contains(exc, ssl.SSLCertVerificationError), repr(exc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["untrusted CA", "hostname mismatch"])
def test_untrusted_server_is_refused_with_an_xrpc_error(pki: PKI, backend: str, case: str) -> None:
    async def main() -> BaseException:
        async with tls_server(_untrusted_server_ctx(pki, case)) as url:
            return await _refused(url, ssl_context=_client_ctx(pki))

    exc = run(backend, main)
    assert isinstance(exc, xrpc.Error), repr(exc)
    assert not hasattr(exc, "exceptions")  # not an exception group


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_tls_handshake_is_not_logged_as_a_server_error(pki: PKI, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")

    async def main() -> None:
        async with tls_server(_server_ctx(pki, mutual=True)) as url:
            exc = await _refused(url, ssl_context=_client_ctx(pki))  # presents no certificate
            assert isinstance(exc, xrpc.Error)
            # a well-behaved client afterwards: the server is fine
            async with xrpc.connect(url, ssl_context=_client_ctx(pki, with_cert=True)) as conn:
                await conn.proxy(Who).who()

    run(backend, main)
    errors = [r for r in caplog.records if r.name == "xrpc" and r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_handshake_timeout_bounds_the_tls_handshake(pki: PKI, backend: str) -> None:
    timeout = 1.0

    async def main() -> float:
        server = xrpc.Server(limits=xrpc.Limits(handshake_timeout=timeout))
        async with server.listen("tls://127.0.0.1:0", ssl_context=_server_ctx(pki, mutual=False)) as listener:
            port = int(listener.url.rsplit(":", 1)[1])
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:  # then silence
                start = anyio.current_time()
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError), anyio.move_on_after(timeout + 4):
                    while True:
                        await stream.receive()
                return anyio.current_time() - start

    assert run(backend, main) < timeout + 4


def test_tls_contexts_are_strict_by_default(pki: PKI) -> None:
    server = xrpc.server_ssl_context(pki.server_cert, pki.server_key)
    mutual = xrpc.server_ssl_context(pki.server_cert, pki.server_key, cafile=pki.ca)
    client = xrpc.client_ssl_context(pki.ca)
    for ctx in (server, mutual, client):
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_NONE
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


async def test_tls_listener_needs_a_context() -> None:
    with pytest.raises(ValueError, match="ssl_context"):
        async with xrpc.Server().listen("tls://127.0.0.1:0"):
            pass


# --------------------------------------------------------------------------- unix socket hygiene
def _mode(path: str) -> int:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


async def test_socket_file_is_private_by_default(sock_dir: str) -> None:
    path = f"{sock_dir}/s.sock"
    with _umask(0):  # a permissive umask must not widen it
        async with xrpc.Server().listen(f"unix://{path}"):
            assert _mode(path) == 0o600
    assert not os.path.exists(path)  # removed on close


@pytest.mark.parametrize("mode", [0o660, 0o666, 0o400])
async def test_socket_file_mode_is_configurable(sock_dir: str, mode: int) -> None:
    path = f"{sock_dir}/s.sock"
    with _umask(0o077):  # nor a strict umask narrow it
        async with xrpc.Server().listen(f"unix://{path}", socket_mode=mode):
            assert _mode(path) == mode


async def test_a_world_writable_directory_is_refused_unless_sticky(sock_dir: str) -> None:
    os.chmod(sock_dir, 0o777)
    with pytest.raises(xrpc.TransportError, match="writable by every user"):
        async with xrpc.Server().listen(f"unix://{sock_dir}/s.sock"):
            pytest.fail("listened in a world-writable directory")
    assert not os.path.exists(f"{sock_dir}/s.sock")
    os.chmod(sock_dir, 0o1777)  # like /tmp: others cannot remove or rename our file
    async with xrpc.Server().listen(f"unix://{sock_dir}/s.sock"):
        assert _mode(f"{sock_dir}/s.sock") == 0o600


async def test_stale_socket_file_is_replaced(sock_dir: str) -> None:
    path = f"{sock_dir}/s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a server that died without cleaning up
    os.chmod(path, 0o777)
    with pytest.raises(ConnectionRefusedError):  # nobody listens on it
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(path)
    server = xrpc.Server()
    server.export(Calc, CalcImpl())
    with anyio.fail_after(T):
        async with server.listen(f"unix://{path}") as listener:
            assert _mode(path) == 0o600  # a new socket file, not the stale one
            async with xrpc.connect(listener.url) as conn:
                assert await conn.proxy(Calc).add(1, 2) == 3


async def test_live_socket_is_not_taken_over(sock_dir: str) -> None:
    path = f"{sock_dir}/s.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        live.bind(path)
        live.listen(1)
        inode = os.lstat(path).st_ino
        with pytest.raises(xrpc.TransportError, match="address in use by a running server"):
            async with xrpc.Server().listen(f"unix://{path}"):
                pytest.fail("listened on a live socket")
        assert os.lstat(path).st_ino == inode  # not unlinked
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            probe.connect(path)  # the running server still gets its clients
    finally:
        live.close()


async def test_live_xrpc_server_is_not_taken_over(sock_dir: str) -> None:
    url = f"unix://{sock_dir}/s.sock"
    first = xrpc.Server()
    first.export(Calc, CalcImpl())
    with anyio.fail_after(T):
        async with first.listen(url):
            with pytest.raises(xrpc.TransportError, match="address in use by a running server"):
                async with xrpc.Server().listen(url):
                    pytest.fail("a second server took over the socket")
            async with xrpc.connect(url) as conn:
                assert await conn.proxy(Calc).add(2, 2) == 4


@pytest.mark.parametrize("kind", ["file", "directory", "symlink-to-file", "dangling-symlink", "fifo"])
async def test_a_non_socket_at_the_path_is_refused(sock_dir: str, kind: str) -> None:
    path = f"{sock_dir}/s.sock"
    target = f"{sock_dir}/target"
    if kind == "file":
        Path(path).write_text("precious")
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "symlink-to-file":
        Path(target).write_text("precious")
        os.symlink(target, path)
    elif kind == "dangling-symlink":
        os.symlink(target, path)
    else:
        os.mkfifo(path)
    before = os.lstat(path)
    with pytest.raises(xrpc.TransportError, match="not a socket"):
        async with xrpc.Server().listen(f"unix://{path}"):
            pytest.fail("listened over a non-socket")
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if kind == "file":
        assert Path(path).read_text() == "precious"
    if kind == "symlink-to-file":
        assert Path(target).read_text() == "precious"
    if kind == "dangling-symlink":
        assert not os.path.lexists(target)  # nothing was created through the link


# --------------------------------------------------------------------------- no code from the wire
FORBIDDEN = re.compile(r"\b(pickle|marshal|cPickle|shelve)\b|\beval\s*\(|\bexec\s*\(")


def test_forbidden_pattern_catches_what_it_should() -> None:
    for text in ("import pickle", "pickle.loads(x)", "marshal.loads(b)", "eval(text)", "exec (code)", "import shelve"):
        assert FORBIDDEN.search(text), text
    for text in ("evaluate(x)", "executor(x)", "pickled_value", "execute(x)"):
        assert not FORBIDDEN.search(text), text


def test_no_pickle_marshal_eval_or_exec_in_xrpc() -> None:
    files = [p for p in XRPC_SRC.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.name == "_connection.py" for p in files)  # the right tree was scanned
    hits = []
    for p in files:
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{p.relative_to(XRPC_SRC.parent)}:{n}: {line.strip()}")
    assert hits == []
