"""Authorization: one checkpoint for every incoming call, verdicts that cannot leak between
requirements, fail-closed (three-valued) requirements, and announcements limited to what the
peer may call.

Every test runs a real server and a real client over a socket (Unix, TCP or TLS), or speaks raw
frames to a real server; the addressing-mode tests run on asyncio and on trio.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import anyio
import anyio.lowlevel
import msgspec
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import xrpc
from xrpc._introspect import INTROSPECT_NAME, Introspection
from xrpc._peer import Peer
from xrpc._protocol import ErrorCode
from xrpc._requirements import Requirement, requirement

from _trust import make_ca, make_leaf, write_pem, xrpc_warnings
from _trust import name as _name
from _wire import GOODBYE_TAG, HELLO, WELCOME_TAG, decode_frames
from _timeouts import T

BACKENDS = ("asyncio", "trio")
R = Requirement
OTHER_UID = os.getuid() + 12345  # nobody on this host runs as this uid
DENY = f"uid == {OTHER_UID}"
ALLOW = f"uid == {os.getuid()}"
SELF_EXE = os.path.realpath(sys.executable)
OTHER_EXE = os.path.realpath(shutil.which("sh") or "/bin/sh")

pytestmark = pytest.mark.timeout(60)


def run(backend: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(T * 3):
            return await fn()

    return anyio.run(bounded, backend=backend)


@xrpc.interface
class Vault(Protocol):
    async def read(self) -> str: ...


class VaultImpl:
    async def read(self) -> str:
        return "the secret"


@xrpc.interface
class Guarded(Protocol):
    @xrpc.requires(DENY)
    async def admin(self) -> str: ...

    async def public(self) -> str: ...


class GuardedImpl:
    def __init__(self) -> None:
        self.ran: list[str] = []

    async def admin(self) -> str:
        self.ran.append("admin")
        return "admin"

    async def public(self) -> str:
        self.ran.append("public")
        return "public"


# =========================================================================== 1. one checkpoint
@xrpc.interface
class Doc(Protocol):
    async def read(self) -> str: ...

    async def peek(self) -> str: ...

    def lines(self) -> AsyncIterator[str]: ...

    def open_lines(self) -> AsyncIterator[str]: ...

    async def total(self, items: AsyncIterator[int]) -> int: ...

    @xrpc.oneway
    async def touch(self) -> None: ...


class TaskDoc:
    """Guards on the implementation only; every method awaits, so each call runs in a task."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    @xrpc.requires(DENY)
    async def read(self) -> str:
        await anyio.lowlevel.checkpoint()
        self.ran.append("read")
        return "secret"

    async def peek(self) -> str:
        await anyio.lowlevel.checkpoint()
        self.ran.append("peek")
        return "public"

    @xrpc.requires(DENY)
    async def lines(self) -> AsyncIterator[str]:
        self.ran.append("lines")
        yield "secret line"

    async def open_lines(self) -> AsyncIterator[str]:
        self.ran.append("open_lines")
        yield "public line"

    @xrpc.requires(DENY)
    async def total(self, items: AsyncIterator[int]) -> int:
        self.ran.append("total")
        return sum([i async for i in items])

    @xrpc.requires(DENY)
    async def touch(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.ran.append("touch")


class InlineDoc(TaskDoc):
    """The same guards on plain functions, which are served inline, on the reader."""

    @xrpc.requires(DENY)
    def read(self) -> str:  # type: ignore[override]
        self.ran.append("read")
        return "secret"

    def peek(self) -> str:  # type: ignore[override]
        self.ran.append("peek")
        return "public"

    @xrpc.requires(DENY)
    def touch(self) -> None:  # type: ignore[override]
        self.ran.append("touch")


@xrpc.interface
class Store(Protocol):
    async def open(self, name: str) -> Doc: ...


class StoreImpl:
    def __init__(self, doc: TaskDoc) -> None:
        self.doc = doc

    async def open(self, name: str) -> Doc:
        return self.doc  # type: ignore[return-value]


async def _exercise(conn: xrpc.Connection, mode: str) -> list[str]:
    """Call every method of ``Doc`` addressed as ``mode``; the names of those that were refused."""
    methods = xrpc.describe(Doc).methods
    store = conn.proxy(Store)
    refused: list[str] = []

    async def attempt(name: str, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            await call()
        except xrpc.PeerRejected:
            refused.append(name)

    if mode == "named":
        doc: Any = conn.proxy(Doc, "doc")
        target = "doc"
    elif mode == "reference":
        doc = await store.open("x")
        target = doc._xrpc_obj
    else:  # pipelined: every call addressed to the result of a call not answered yet
        promise = xrpc.pipeline(store).open("x")
        target = f"^{promise._id}"
        doc = None

    async def unary(name: str) -> Any:
        return await conn.call_unary(target, methods[name], (), {}, T)

    async def stream(name: str) -> Any:
        return [x async for x in conn.call_stream(target, methods[name], (), {}, T)]

    async def numbers() -> AsyncIterator[int]:
        yield 1
        yield 2

    await attempt("read", lambda: unary("read"))
    assert await unary("peek") == "public"
    await attempt("lines", lambda: stream("lines"))
    assert await stream("open_lines") == ["public line"]
    await attempt("total", lambda: conn.call_client_stream(target, methods["total"], (numbers(),), {}, T))
    await conn.call_oneway(target, methods["touch"], (), {})
    assert await unary("peek") == "public"  # served after the one-way call was refused
    if mode == "pipelined":
        # the promise API itself, as users write it
        with pytest.raises(xrpc.PeerRejected):
            await xrpc.pipeline(store).open("x").read()
        assert await xrpc.pipeline(store).open("x").peek() == "public"
    del doc
    return refused


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["named", "reference", "pipelined"])
@pytest.mark.parametrize("impl_kind", ["task", "inline"])
def test_every_addressing_mode_passes_the_implementation_guards(
    sock_dir: str, backend: str, mode: str, impl_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    doc = TaskDoc() if impl_kind == "task" else InlineDoc()

    async def main() -> list[str]:
        server = xrpc.Server()
        server.export(Doc, doc, "doc")
        server.export(Store, StoreImpl(doc))
        async with server.listen(f"unix://{sock_dir}/s.sock") as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                return await _exercise(conn, mode)

    refused = run(backend, main)
    assert refused == ["read", "lines", "total"]
    assert not {"read", "lines", "total", "touch"} & set(doc.ran), doc.ran
    assert doc.ran.count("peek") >= 2 and "open_lines" in doc.ran
    refusals = [m for m in xrpc_warnings(caplog) if "refused call" in m]
    for name in ("read", "lines", "total", "touch"):
        assert any(f"Doc.{name} " in m and f"{DENY} failed" in m for m in refusals), (name, refusals)


@xrpc.interface
class Factory(Protocol):
    async def make(self) -> Guarded: ...


class FactoryImpl:
    def __init__(self, obj: GuardedImpl) -> None:
        self.obj = obj

    async def make(self) -> Guarded:
        return self.obj  # type: ignore[return-value]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pipelined_call_passes_the_interface_guards_and_keeps_its_frame_order(sock_dir: str, backend: str) -> None:
    obj = GuardedImpl()

    async def main() -> None:
        server = xrpc.Server()
        server.export(Factory, FactoryImpl(obj))
        async with server.listen(f"unix://{sock_dir}/s.sock") as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                factory = xrpc.pipeline(conn.proxy(Factory))
                with pytest.raises(xrpc.PeerRejected):
                    await factory.make().admin()
                assert await factory.make().public() == "public"

    run(backend, main)
    assert obj.ran == ["public"]


def test_the_servers_requirement_is_part_of_the_checkpoint(sock_dir: str) -> None:
    """Calls reach the checkpoint only after admission; the checkpoint checks the server's
    requirement too, so a call that slipped past admission would still be refused."""

    async def main() -> None:
        server = xrpc.Server(requirement=ALLOW)
        impl = GuardedImpl()
        server.export(Guarded, impl)
        async with server.listen(f"unix://{sock_dir}/s.sock") as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                g = conn.proxy(Guarded)
                assert await g.public() == "public"
                (served,) = server.connections
                # make the (admitted) peer fail the server's requirement from now on
                served._serving.requirement = requirement(DENY)
                with pytest.raises(xrpc.PeerRejected):
                    await g.public()
        assert impl.ran == ["public"]

    run("asyncio", main)


# =========================================================================== 2. the verdict cache
@xrpc.interface
class Control(Protocol):
    async def swap(self, allow: bool) -> None: ...


class ControlImpl:
    """Replaces the connection's ``Vault`` export with one guarded by a fresh requirement."""

    async def swap(self, allow: bool) -> None:
        conn = xrpc.current_connection()
        conn.unexport("Vault")
        gc.collect()  # the old export and its requirement are freed now: their memory is reused
        conn.export(Vault, VaultImpl(), requirement=requirement(ALLOW if allow else DENY))


def _freed_requirements_reuse_addresses() -> bool:
    """The allocator hands a freed requirement's address to the next one (what made a verdict
    cached by ``id()`` leak)."""
    seen: set[int] = set()
    for i in range(20):
        req = requirement(ALLOW if i % 2 else DENY)
        address = id(req)
        del req
        gc.collect()
        if address in seen:
            return True
        seen.add(address)
    return False


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_verdict_never_leaks_to_another_requirement(sock_dir: str, backend: str) -> None:
    """Requirements created and freed in a loop reuse each other's addresses; each round's verdict
    must still be its own."""
    assert _freed_requirements_reuse_addresses(), "the allocator never reuses an address here: the test proves nothing"

    async def main() -> list[tuple[bool, bool]]:
        server = xrpc.Server()
        server.export(Control, ControlImpl())
        rounds: list[tuple[bool, bool]] = []
        async with server.listen(f"unix://{sock_dir}/s.sock") as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                control, vault = conn.proxy(Control), conn.proxy(Vault)
                for i in range(50):
                    allow = i % 2 == 0
                    await control.swap(allow)
                    try:
                        allowed = await vault.read() == "the secret"
                    except xrpc.PeerRejected:
                        allowed = False
                    rounds.append((allow, allowed))
        return rounds

    rounds = run(backend, main)
    wrong = [(i, want, got) for i, (want, got) in enumerate(rounds) if want != got]
    assert wrong == [], f"{len(wrong)} of 50 rounds got another requirement's verdict: {wrong[:5]}"


# =========================================================================== 3. three-valued logic
U = None  # Unknown
VALUES = [True, False, U]


class Fixed(Requirement):
    """A leaf with a fixed three-valued verdict."""

    def __init__(self, value: bool | None) -> None:
        self.value = value

    def evaluate(self, peer: Peer) -> bool | None:
        return self.value

    def __str__(self) -> str:
        return {True: "true", False: "false", None: "unknown"}[self.value]


def _kleene_and(a: bool | None, b: bool | None) -> bool | None:
    if a is False or b is False:
        return False
    return None if a is None or b is None else True


def _kleene_or(a: bool | None, b: bool | None) -> bool | None:
    if a is True or b is True:
        return True
    return None if a is None or b is None else False


def test_truth_table() -> None:
    peer = Peer(transport="tcp")
    for a in VALUES:
        na = (~Fixed(a)).evaluate(peer)
        assert na is (None if a is None else not a)
        assert (~Fixed(a)).check(peer) is (na is True)
        for b in VALUES:
            assert (Fixed(a) & Fixed(b)).evaluate(peer) is _kleene_and(a, b), (a, b)
            assert (Fixed(a) | Fixed(b)).evaluate(peer) is _kleene_or(a, b), (a, b)
            assert (Fixed(a) & Fixed(b)).check(peer) is (_kleene_and(a, b) is True)
            assert (Fixed(a) | Fixed(b)).check(peer) is (_kleene_or(a, b) is True)
    # a real leaf whose fact is missing is Unknown, and so is its negation
    assert R.uid(0).evaluate(peer) is None
    assert (~R.uid(0)).evaluate(peer) is None
    assert (~R.uid(0)).check(peer) is False
    assert (~R.uid(0) | R.transport("tcp")).check(peer) is True  # True | Unknown = True
    assert (~R.uid(0) & R.transport("unix")).evaluate(peer) is False  # False & Unknown = False


# Each of these admitted a peer that lacks the fact it tests.
NEGATED = [
    "uid != 0",
    f"uid != {OTHER_UID}",
    "gid != 0",
    "pid != 1",
    "not same_user",
    f'user != "{"no-such-user-xrpc"}"',
    'group != "no-such-group-xrpc"',
    f'exe != "{OTHER_EXE}"',
    'cert.subject.CN != "revoked"',
    'cert.san != "DNS:revoked.test"',
    f'cert.fingerprint != "{"ab" * 32}"',
    'not (uid == 0 or cert.subject.CN == "revoked")',
]


async def _admitted(url: str, **kwargs: Any) -> bool:
    try:
        async with xrpc.connect(url, timeout=T, **kwargs) as conn:
            return await conn.proxy(Vault).read() == "the secret"
    except xrpc.PeerRejected:
        return False


@pytest.mark.parametrize("text", NEGATED)
async def test_negation_of_a_missing_fact_refuses_over_tcp(text: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    server = xrpc.Server(requirement=text)
    server.export(Vault, VaultImpl())
    with anyio.fail_after(T):
        async with server.listen("tcp://127.0.0.1:0") as listener:
            assert not await _admitted(listener.url)
    (refusal,) = [m for m in xrpc_warnings(caplog) if "refused connection" in m]
    assert "failed" in refusal and "unknown" in refusal


@pytest.mark.parametrize("text", ['cert.subject.CN != "revoked"', 'cert.san != "x"', f'cert.fingerprint != "{"ab" * 32}"'])
async def test_negation_of_a_missing_fact_refuses_in_memory(text: str) -> None:
    """An in-memory peer has a uid but no certificate."""
    server = xrpc.Server()
    server.export(Vault, VaultImpl(), requirement=text)
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server, timeout=T) as conn:
            assert conn.peer.uid == os.getuid()
            with pytest.raises(xrpc.PeerRejected):
                await conn.proxy(Vault).read()


async def test_negation_of_a_missing_fact_refuses_a_method_guard() -> None:
    obj = GuardedImpl()

    class Impl(GuardedImpl):
        @xrpc.requires("not same_user")
        async def public(self) -> str:
            return await super().public()

    impl = Impl()
    server = xrpc.Server()
    server.export(Guarded, impl)
    with anyio.fail_after(T):
        async with server.listen("tcp://127.0.0.1:0") as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                with pytest.raises(xrpc.PeerRejected):
                    await conn.proxy(Guarded).public()
    assert impl.ran == [] and obj.ran == []


CHILD_CONNECT = r"""
import socket, sys
path, fd = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
channel = socket.socket(fileno=fd)
socket.send_fds(channel, [b"x"], [s.fileno()])
"""


async def _connect_through_exited_process(path: str) -> socket.socket:
    """A Unix connection made by a process that exited before the server accepted it; the socket
    is handed to this process, which speaks on it."""
    mine, theirs = socket.socketpair()
    with mine, theirs:
        # Run the child synchronously: the event loop (and the server's accept) is blocked until
        # the child has exited and been reaped, so /proc has nothing to say about it any more.
        subprocess.run(
            [sys.executable, "-c", CHILD_CONNECT, path, str(theirs.fileno())], pass_fds=[theirs.fileno()], check=True, timeout=T
        )
        _, fds, _, _ = socket.recv_fds(mine, 1, 1)
    sock = socket.socket(fileno=fds[0])
    sock.setblocking(False)
    return sock


async def _raw_handshake(sock: socket.socket) -> list[list[Any]]:
    received = bytearray()
    with sock:
        await anyio.wait_writable(sock)
        sock.send(HELLO)
        while True:
            await anyio.wait_readable(sock)
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            frames = decode_frames(bytes(received))
            if frames:
                return frames
    return decode_frames(bytes(received))


@pytest.mark.parametrize("text", [f'exe != "{OTHER_EXE}"', "gid != 12345", f'not exe == "{OTHER_EXE}" and same_user'])
async def test_negation_refuses_a_unix_peer_whose_process_is_gone(sock_dir: str, text: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xrpc")
    seen: list[Peer] = []
    path = f"{sock_dir}/s.sock"
    with anyio.fail_after(T):
        # control: the same kind of connection, admitted by a requirement on a fact it has
        server = xrpc.Server(requirement=f"uid == {os.getuid()}", on_connect=lambda c: seen.append(c.peer))
        async with server.listen(f"unix://{path}"):
            frames = await _raw_handshake(await _connect_through_exited_process(path))
        assert [f[0] for f in frames] == [WELCOME_TAG]
        assert seen[0].uid == os.getuid() and seen[0].exe is None, seen
        if "gid" in text and seen[0].groups is not None:
            pytest.skip("without SO_PEERPIDFD the kernel's record of the groups is kept: they are known")
        # the negation of a fact the exited process no longer has refuses it
        server = xrpc.Server(requirement=text)
        async with server.listen(f"unix://{path}"):
            frames = await _raw_handshake(await _connect_through_exited_process(path))
    assert [f[0] for f in frames] == [GOODBYE_TAG]
    assert frames[0][2] == ErrorCode.PEER_REJECTED
    assert any("refused connection" in m and "unknown" in m for m in xrpc_warnings(caplog))


# --------------------------------------------------------------------------- TLS
class PKI:
    def __init__(self, d: Path) -> None:
        ca = make_ca(_name((NameOID.COMMON_NAME, "authz test CA")))
        self.ca, _ = write_pem(d, "ca", *ca)
        server = make_leaf(ca, _name((NameOID.COMMON_NAME, "server.test")), [x509.DNSName("localhost")], ExtendedKeyUsageOID.SERVER_AUTH)
        self.server_cert, self.server_key = write_pem(d, "server", *server)
        # one subject, two CN attributes: "guest" first, "agent" last
        two = make_leaf(
            ca, _name((NameOID.COMMON_NAME, "guest"), (NameOID.ORGANIZATION_NAME, "tests"), (NameOID.COMMON_NAME, "agent")),
            [x509.DNSName("guest.test")], ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        self.two_cn_cert, self.two_cn_key = write_pem(d, "two-cn", *two)
        one = make_leaf(ca, _name((NameOID.COMMON_NAME, "agent")), [x509.DNSName("agent.test")], ExtendedKeyUsageOID.CLIENT_AUTH)
        self.agent_cert, self.agent_key = write_pem(d, "agent", *one)

    def server_ctx(self, *, mutual: bool) -> Any:
        return xrpc.server_ssl_context(self.server_cert, self.server_key, cafile=self.ca if mutual else None)

    def client_ctx(self, cert: str = "", key: str = "") -> Any:
        if cert:
            return xrpc.client_ssl_context(self.ca, certfile=cert, keyfile=key)
        return xrpc.client_ssl_context(self.ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("authz-pki"))


class SubjectInfo(msgspec.Struct):
    single: dict[str, str]
    every: dict[str, list[str]]


@xrpc.interface
class Who(Protocol):
    async def subject(self) -> SubjectInfo: ...


class WhoImpl:
    async def subject(self) -> SubjectInfo:
        s = xrpc.current_connection().peer.cert_subject
        return SubjectInfo(dict(s), {k: list(v) for k, v in s.all_values().items()})


async def _tls_admitted(pki: PKI, req: Any, *, mutual: bool, cert: str = "", key: str = "") -> bool:
    server = xrpc.Server(requirement=req)
    server.export(Vault, VaultImpl())
    async with server.listen("tls://127.0.0.1:0", ssl_context=pki.server_ctx(mutual=mutual)) as listener:
        url = listener.url.replace("127.0.0.1", "localhost")
        return await _admitted(url, ssl_context=pki.client_ctx(cert, key))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("text", ['cert.subject.CN != "revoked"', 'cert.san != "DNS:revoked.test"', "uid != 0", "not same_user"])
def test_negation_of_a_missing_fact_refuses_tls_without_client_certificate(pki: PKI, backend: str, text: str) -> None:
    assert not run(backend, lambda: _tls_admitted(pki, text, mutual=False))
    # a client that has the fact, and not the refused value, is admitted
    if text.startswith("cert"):
        assert run(backend, lambda: _tls_admitted(pki, text, mutual=True, cert=pki.agent_cert, key=pki.agent_key))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_subject_with_two_common_names_exposes_both(pki: PKI, backend: str) -> None:
    async def main() -> SubjectInfo:
        server = xrpc.Server()
        server.export(Who, WhoImpl())
        async with server.listen("tls://127.0.0.1:0", ssl_context=pki.server_ctx(mutual=True)) as listener:
            url = listener.url.replace("127.0.0.1", "localhost")
            async with xrpc.connect(url, timeout=T, ssl_context=pki.client_ctx(pki.two_cn_cert, pki.two_cn_key)) as conn:
                return await conn.proxy(Who).subject()

    info = run(backend, main)
    assert info.every == {"CN": ["guest", "agent"], "O": ["tests"]}
    assert info.single == {"O": "tests"}  # CN has no single value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "text",
    ['cert.subject.CN == "agent"', 'cert.subject.CN == "guest"', 'cert.subject.CN != "agent"', 'cert.subject.CN != "admin"'],
)
def test_an_equality_test_on_a_multi_valued_attribute_refuses(pki: PKI, backend: str, text: str) -> None:
    assert not run(backend, lambda: _tls_admitted(pki, text, mutual=True, cert=pki.two_cn_cert, key=pki.two_cn_key))
    # the single-valued attribute of the same certificate still decides
    assert run(backend, lambda: _tls_admitted(pki, 'cert.subject.O == "tests"', mutual=True, cert=pki.two_cn_cert, key=pki.two_cn_key))
    # and a certificate with one CN "agent" passes the positive test
    if text == 'cert.subject.CN == "agent"':
        assert run(backend, lambda: _tls_admitted(pki, text, mutual=True, cert=pki.agent_cert, key=pki.agent_key))


def test_a_certificate_subject_stays_a_plain_read_only_dict_of_single_values() -> None:
    subject = xrpc.CertSubject([("CN", "guest"), ("O", "tests"), ("CN", "agent")])
    assert isinstance(subject, dict) and dict(subject) == {"O": "tests"}
    assert json.loads(json.dumps(subject)) == {"O": "tests"}
    assert msgspec.json.decode(msgspec.json.encode(subject)) == {"O": "tests"}
    assert subject.getall("CN") == ("guest", "agent") and subject.getall("OU") == ()
    assert subject.all_values() == {"CN": ("guest", "agent"), "O": ("tests",)}
    assert "CN" not in subject and subject.get("CN") is None
    assert subject != {"O": "tests"}  # the dict view alone does not make them equal
    assert xrpc.CertSubject({"O": "tests"}) == {"O": "tests"}
    assert pickle.loads(pickle.dumps(subject)).all_values() == subject.all_values()
    with pytest.raises(TypeError):
        subject["CN"] = "admin"
    with pytest.raises(TypeError):
        subject.update(CN="admin")
    assert Peer(transport="tls", cert_subject={"CN": "a"}).cert_subject.getall("CN") == ("a",)


# =========================================================================== 4. announcements
@xrpc.interface
class Secrets(Protocol):
    """Top-secret vault of launch codes."""

    async def launch_codes(self) -> str:
        """The codes for the launch."""
        ...


class SecretsImpl:
    async def launch_codes(self) -> str:
        return "0000"


@xrpc.interface
class Mixed(Protocol):
    """Some methods are for admins."""

    async def hello(self) -> str:
        """Say hello."""
        ...

    @xrpc.requires(DENY)
    async def rotate_keys(self) -> str:
        """Rotate the master keys."""
        ...


class MixedImpl:
    async def hello(self) -> str:
        return "hello"

    async def rotate_keys(self) -> str:
        return "rotated"


class MixedImplGuard:
    async def hello(self) -> str:
        return "hello"

    @xrpc.requires(DENY)
    async def rotate_keys(self) -> str:
        return "rotated"


def _server_with_secrets() -> xrpc.Server:
    server = xrpc.Server()
    server.export(Secrets, SecretsImpl(), requirement=DENY)
    server.export(Mixed, MixedImpl())
    server.export(Mixed, MixedImplGuard(), "mixed2")
    server.export(Vault, VaultImpl())
    return server


def _assert_hidden(text: str) -> None:
    for word in ("Secrets", "launch", "Top-secret", "rotate_keys", "master keys"):
        assert word not in text, f"{word!r} is announced to a peer that may not call it: {text}"


async def test_welcome_announces_only_what_the_peer_may_call(sock_dir: str) -> None:
    server = _server_with_secrets()
    path = f"{sock_dir}/s.sock"
    with anyio.fail_after(T):
        async with server.listen(f"unix://{path}"):
            # a raw client reads the WELCOME frame itself
            async with await anyio.connect_unix(path) as stream:
                await stream.send(HELLO)
                received = bytearray()
                while not decode_frames(bytes(received)):
                    received += await stream.receive()
            welcome = decode_frames(bytes(received))[0]
            assert welcome[0] == WELCOME_TAG
            names = {e[0]: e for e in welcome[3]}
            assert {"Vault", "Mixed", "mixed2"} <= set(names) and "Secrets" not in names
            assert set(names["Mixed"][3]) == {"hello"} and set(names["mixed2"][3]) == {"hello"}
            _assert_hidden(json.dumps(welcome))
            # a real client: peer_exports, and calls still work or are refused as before
            async with xrpc.connect(f"unix://{path}", timeout=T) as conn:
                _assert_hidden(repr(conn.peer_exports))
                m = conn.proxy(Mixed)
                assert await m.hello() == "hello"
                with pytest.raises(xrpc.PeerRejected):
                    await m.rotate_keys()
                with pytest.raises(xrpc.PeerRejected):
                    await conn.proxy(Secrets).launch_codes()


async def test_introspection_describes_only_what_the_peer_may_call(sock_dir: str) -> None:
    server = _server_with_secrets()
    with anyio.fail_after(T):
        async with server.listen(f"unix://{sock_dir}/s.sock") as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                exports = await conn.proxy(Introspection, INTROSPECT_NAME).exports()
    by_name = {e.name: e for e in exports}
    assert set(by_name) == {"Vault", "Mixed", "mixed2"}
    assert [m.name for m in by_name["Mixed"].methods] == ["hello"]
    assert [m.name for m in by_name["mixed2"].methods] == ["hello"]
    _assert_hidden(repr(exports))


async def test_cli_inspect_shows_only_what_the_peer_may_call(sock_dir: str) -> None:
    server = _server_with_secrets()
    with anyio.fail_after(T * 3):
        async with server.listen(f"unix://{sock_dir}/s.sock") as listener:
            result = await anyio.run_process([sys.executable, "-m", "xrpc", "inspect", listener.url], check=False)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, out
    assert "Vault" in out and "hello" in out
    _assert_hidden(out)


async def test_a_per_connection_export_is_announced_only_to_a_peer_that_may_call_it(sock_dir: str) -> None:
    def on_connect(conn: xrpc.Connection) -> None:
        conn.export(Secrets, SecretsImpl(), requirement=DENY)
        conn.export(Vault, VaultImpl(), "mine", requirement=ALLOW)

    server = xrpc.Server(on_connect=on_connect)
    with anyio.fail_after(T):
        async with server.listen(f"unix://{sock_dir}/s.sock") as listener:
            async with xrpc.connect(listener.url, timeout=T) as conn:
                names = {e.name for e in conn.peer_exports}
                exports = await conn.proxy(Introspection, INTROSPECT_NAME).exports()
                assert await conn.proxy(Vault, "mine").read() == "the secret"
    assert "mine" in names and "Secrets" not in names
    assert [e.name for e in exports] == ["mine"]


async def test_a_client_announces_only_what_the_server_may_call(sock_dir: str) -> None:
    seen: list[list[str]] = []

    def on_connect(conn: xrpc.Connection) -> None:
        seen.append([e.name for e in conn.peer_exports])

    server = xrpc.Server(on_connect=on_connect)
    with anyio.fail_after(T):
        async with server.listen(f"unix://{sock_dir}/s.sock") as listener:
            client_exports = [xrpc._connection.make_export(Secrets, SecretsImpl(), "Secrets", DENY), (Vault, VaultImpl())]
            async with xrpc.connect(listener.url, timeout=T, exports=client_exports):
                pass
    assert seen == [["Vault"]]


@pytest.mark.parametrize("name", ["#1", "^3", "#"])
def test_an_export_name_cannot_pose_as_a_reference_or_a_pipelined_result(name: str) -> None:
    """Names starting with # or ^ address references and pipelined results on the wire: an export
    under such a name would shadow them."""
    server = xrpc.Server()
    with pytest.raises(ValueError, match="may not start with"):
        server.export(Vault, VaultImpl(), name=name)
