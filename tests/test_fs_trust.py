"""Files and directories xrpc trusts: service descriptions, runtime directories, socket files.

The attacker is a real second user (``xrpctest``, created if needed; these tests need root, as
CI runs them), acting through ``setpriv`` before the victim (this process) looks anything up.  A
planted description runs a command that would create a marker file: the marker must never appear.

The fallback runtime directory lives in a shared temporary directory (``/tmp``); the tests point
``xrpc._services._SHARED_TMP`` at a fresh directory with the same mode (1777, owned by root), so
that they neither see nor disturb the real ``/tmp/xrpc-<uid>``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Protocol

import anyio
import pytest

import xrpc
from xrpc import _services
from xrpc._services import ServiceUnavailable, connect_service, find_service, load_description, runtime_dir

import _trust
from _trust import TEST_USER
from _timeouts import T
from _procs import short_dir

NAME = "com.example.planted"


@xrpc.interface
class Ping(Protocol):
    async def ping(self) -> int: ...


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def other_user() -> pwd.struct_passwd:
    return _trust.other_user("act as another user")


@pytest.fixture
def shared_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A stand-in for /tmp (root-owned, mode 1777) holding the fallback runtime directory."""
    d = Path(short_dir())
    os.chmod(d, 0o1777)
    monkeypatch.setattr(_services, "_SHARED_TMP", d)
    for var in ("XRPC_RUNTIME_DIR", "XDG_RUNTIME_DIR", "XRPC_SERVICE_PATH"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def private(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private directory (0700) for what the victim owns; also its runtime directory."""
    d = Path(short_dir())
    monkeypatch.setenv("XRPC_RUNTIME_DIR", str(d))
    monkeypatch.delenv("XRPC_SERVICE_PATH", raising=False)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def as_user(user: pwd.struct_passwd, script: str) -> None:
    """Run a shell script as ``user`` (a real other uid; /bin/sh, as our Python lives in /root)."""
    result = subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "/bin/sh", "-euc", script],
        capture_output=True,
        timeout=6 * T,
    )
    assert result.returncode == 0, result.stderr.decode()


def planted(name: str, marker: Path) -> str:
    """A description whose command creates ``marker`` (as whoever launches it)."""
    return f'name = "{name}"\ncommand = ["/bin/sh", "-c", "touch {marker}"]\n'


async def call_service(name: str, **kwargs: Any) -> None:
    with anyio.fail_after(T):
        async with connect_service(name, timeout=T, **kwargs) as sc:
            await sc.proxy(Ping).ping()


@pytest.fixture
def marker() -> Iterator[Path]:
    """Where a planted command would leave its mark (only we may write there)."""
    d = Path(short_dir())
    try:
        yield d / "planted-command-ran"
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- finding 1: planted fallback runtime directory
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["directory", "symlink"])
async def test_planted_fallback_runtime_dir_is_refused(marker: Path, other_user: pwd.struct_passwd, shared_tmp: Path, how: str) -> None:
    """Another user creates ``/tmp/xrpc-<our uid>/services/NAME.toml`` first: we must not run it."""
    rt = shared_tmp / f"xrpc-{os.getuid()}"
    assert runtime_dir() == rt
    theirs = shared_tmp / "theirs"
    if how == "directory":
        target = rt
        setup = f"mkdir -m 755 {rt}"
    else:  # the runtime directory is a symbolic link into a directory they own
        target = theirs
        setup = f"mkdir -m 755 {theirs} && ln -s {theirs} {rt}"
    as_user(
        other_user,
        f"{setup} && mkdir -m 755 {target}/services && printf '%s' '{planted(NAME, marker)}' > {target}/services/{NAME}.toml",
    )
    assert (rt / "services" / f"{NAME}.toml").is_file()
    with pytest.raises(ServiceUnavailable) as caught:
        await call_service(NAME)
    message = str(caught.value)
    assert str(rt) in message, message
    assert TEST_USER in message or str(other_user.pw_uid) in message, message
    assert "XRPC_RUNTIME_DIR" in message and "XDG_RUNTIME_DIR" in message, message
    if how == "symlink":
        assert "symbolic link" in message, message
    assert not marker.exists()
    assert not (target / "sockets").exists() and not (target / "locks").exists()  # nothing created in there


@pytest.mark.timeout(60)
async def test_planted_empty_runtime_dir_is_not_used_for_sockets(marker: Path, other_user: pwd.struct_passwd, shared_tmp: Path, private: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The description is ours, but the fallback runtime directory (for the socket and the lock)
    was made by someone else, who could swap ``sockets/`` for a link to their own server."""
    monkeypatch.delenv("XRPC_RUNTIME_DIR")
    rt = shared_tmp / f"xrpc-{os.getuid()}"
    as_user(other_user, f"mkdir -m 777 {rt}")
    (private / f"{NAME}.toml").write_text(planted(NAME, marker))
    assert find_service(NAME, [private]).command is not None
    with pytest.raises(ServiceUnavailable) as caught:
        await call_service(NAME, search_path=[private])
    message = str(caught.value)
    assert str(rt) in message and (TEST_USER in message or str(other_user.pw_uid) in message), message
    assert not marker.exists()
    assert os.listdir(rt) == []


async def test_fallback_runtime_dir_is_created_private(shared_tmp: Path) -> None:
    rt = shared_tmp / f"xrpc-{os.getuid()}"
    with pytest.raises(xrpc.ServiceNotFound):
        find_service(NAME)  # a lookup creates nothing
    assert not rt.exists()
    sock = _services._socket_file(NAME)
    assert sock == rt / "sockets" / f"{NAME}.sock"
    for d in (rt, rt / "sockets"):
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


# --------------------------------------------------------------------------- finding 1: the search path
@pytest.mark.timeout(60)
async def test_group_writable_description_dir_is_refused(marker: Path, other_user: pwd.struct_passwd, private: Path) -> None:
    """A search directory the other user's group may write to: they put a description in it."""
    shared = private / "shared"
    shared.mkdir()
    os.chown(shared, 0, other_user.pw_gid)
    os.chmod(shared, 0o770)
    os.chmod(private, 0o711)  # they may pass through to it
    as_user(other_user, f"printf '%s' '{planted(NAME, marker)}' > {shared}/{NAME}.toml && chmod 644 {shared}/{NAME}.toml")
    with pytest.raises(ServiceUnavailable) as caught:
        await call_service(NAME, search_path=[shared])
    message = str(caught.value)
    assert str(shared) in message and "writable by its group" in message, message
    assert not marker.exists()


@pytest.mark.timeout(60)
async def test_symlinked_services_dir_is_refused(marker: Path, other_user: pwd.struct_passwd, private: Path) -> None:
    """``<runtime>/services`` is xrpc's own directory: it must be a real directory, not a link
    (here, to a directory another user controls)."""
    theirs = Path(short_dir())
    try:
        os.chown(theirs, other_user.pw_uid, other_user.pw_gid)
        as_user(other_user, f"printf '%s' '{planted(NAME, marker)}' > {theirs}/{NAME}.toml")
        (private / "xrpc").mkdir(mode=0o700)
        os.symlink(theirs, private / "xrpc" / "services")
        with pytest.raises(ServiceUnavailable) as caught:
            await call_service(NAME)
        message = str(caught.value)
        assert str(private / "xrpc" / "services") in message and "symbolic link" in message, message
        assert not marker.exists()
    finally:
        shutil.rmtree(theirs, ignore_errors=True)


@pytest.mark.timeout(60)
async def test_description_owned_by_another_user_is_refused(marker: Path, other_user: pwd.struct_passwd, private: Path) -> None:
    """A description file that belongs to someone else: its owner can rewrite it at any time."""
    services = private / "xrpc" / "services"
    services.mkdir(parents=True, mode=0o755)
    os.chmod(private, 0o755)
    os.chmod(private / "xrpc", 0o755)
    desc = services / f"{NAME}.toml"
    desc.write_text(f'name = "{NAME}"\nmodule = "harmless:server"\n')
    os.chown(desc, other_user.pw_uid, other_user.pw_gid)
    as_user(other_user, f"printf '%s' '{planted(NAME, marker)}' > {desc}")  # ... and they do
    with pytest.raises(ServiceUnavailable) as caught:
        await call_service(NAME)
    message = str(caught.value)
    assert str(desc) in message and (TEST_USER in message or str(other_user.pw_uid) in message), message
    with pytest.raises(ServiceUnavailable, match="belongs to"):
        load_description(desc)
    assert not marker.exists()


def test_description_writable_by_others_is_refused(private: Path) -> None:
    desc = private / f"{NAME}.toml"
    desc.write_text(f'name = "{NAME}"\nmodule = "harmless:server"\n')
    os.chmod(desc, 0o666)
    with pytest.raises(ServiceUnavailable, match="writable by"):
        find_service(NAME, [private])
    os.chmod(desc, 0o644)
    assert find_service(NAME, [private]).module == "harmless:server"


def test_symlinks_owned_by_root_or_us_in_trusted_dirs_are_followed(private: Path) -> None:
    """A link cannot be changed, only replaced by who may write to its directory: a link of ours
    in a private directory hands nothing to anyone, so its target is checked like any path."""
    real = private / "real"
    real.mkdir()
    (real / f"{NAME}.toml").write_text(f'name = "{NAME}"\nmodule = "harmless:server"\n')
    os.symlink(real, private / "linked-dir")
    assert find_service(NAME, [private / "linked-dir"]).module == "harmless:server"
    linked = private / "linked-file"
    linked.mkdir()
    os.symlink(real / f"{NAME}.toml", linked / f"{NAME}.toml")
    assert find_service(NAME, [linked]).module == "harmless:server"
    os.chmod(real, 0o777)  # ... and the target is checked
    with pytest.raises(ServiceUnavailable, match="writable by"):
        find_service(NAME, [private / "linked-dir"])


@pytest.mark.timeout(60)
async def test_xrpc_list_does_not_probe_sockets_in_a_planted_runtime_dir(other_user: pwd.struct_passwd, shared_tmp: Path) -> None:
    from xrpc import _cli

    rt = shared_tmp / f"xrpc-{os.getuid()}"
    as_user(other_user, f"mkdir -m 755 {rt} {rt}/sockets")
    status, error = await _cli._probe(NAME, T)
    assert status == "invalid" and str(rt) in error, (status, error)


# --------------------------------------------------------------------------- finding 10: the socket's mode
async def test_listen_sets_the_socket_mode_without_following_a_link(private: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone who may write to the directory swaps the fresh socket file for a symbolic link to a
    file of ours right after ``bind``: setting the socket's mode must not change that file."""
    path = private / "s.sock"
    victim = private / "precious"
    victim.write_text("secret")
    os.chmod(victim, 0o600)
    real_socket = socket.socket

    class SwappedAfterBind(real_socket):
        def bind(self, address: Any) -> None:
            super().bind(address)
            if address == str(path):  # the attacker's move, between bind and whatever comes next
                os.unlink(path)
                os.symlink(victim, path)

    error: BaseException | None = None
    with monkeypatch.context() as m:
        m.setattr(socket, "socket", SwappedAfterBind)
        try:
            with anyio.fail_after(T):
                async with xrpc.Server().listen(f"unix://{path}", socket_mode=0o666):
                    pass
        except xrpc.TransportError as exc:
            error = exc
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600, "the mode was set through the link"
    assert victim.read_text() == "secret"
    assert isinstance(error, xrpc.TransportError) and str(path) in str(error) and "replaced" in str(error), error
    assert os.path.islink(path)  # what is not ours is left alone


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666, 0o400, 0o700])
async def test_socket_mode_is_exact_whatever_the_umask(private: Path, mode: int) -> None:
    path = private / "s.sock"
    for umask in (0o000, 0o077, 0o777):
        old = os.umask(umask)
        try:
            with anyio.fail_after(T):
                async with xrpc.Server().listen(f"unix://{path}", socket_mode=mode):
                    st = os.lstat(path)
                    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == mode, (oct(umask), oct(st.st_mode))
            assert os.umask(old) == umask  # set back as it was
        finally:
            os.umask(old)


async def test_socket_mode_is_set_on_the_socket_file_when_the_umask_cannot(private: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the umask does not apply (a default ACL on the directory), the mode is set through a
    descriptor of the checked socket file, not through its name."""
    path = private / "s.sock"
    real_umask = os.umask(0o022)
    try:
        with monkeypatch.context() as m:
            m.setattr(os, "umask", lambda mask: 0o022)  # as if ignored

            def no_fchmod(fd: int, mode: int) -> None:
                raise OSError("not supported")

            m.setattr(os, "fchmod", no_fchmod)
            with anyio.fail_after(T):
                async with xrpc.Server().listen(f"unix://{path}", socket_mode=0o600):
                    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        os.umask(real_umask)


# --------------------------------------------------------------------------- finding 12d: someone else's stale socket
LISTEN_AS = r"""
import os, sys
import anyio, xrpc, xrpc._api, xrpc._transports

url, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def main():
    # Our Python lives under /root (mode 0700): start as root, import everything, then drop for good.
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        async with xrpc.Server().listen(url):
            print("LISTENING")
    except xrpc.TransportError as exc:
        print("TransportError", exc)
    except BaseException as exc:
        print("RAW", type(exc).__name__, exc)

anyio.run(main)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stale_mode", [0o777, 0o600])
async def test_stale_socket_of_another_user_gives_a_transport_error(other_user: pwd.struct_passwd, stale_mode: int) -> None:
    shared = Path(short_dir())
    try:
        os.chmod(shared, 0o1777)  # like /tmp: nobody may remove another user's file
        path = shared / "s.sock"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()  # a server of root's that died without cleaning up
        os.chmod(path, stale_mode)
        inode = os.lstat(path).st_ino
        with anyio.fail_after(3 * T):
            result = await anyio.run_process(
                [sys.executable, "-c", LISTEN_AS, f"unix://{path}", str(other_user.pw_uid), str(other_user.pw_gid)], check=False
            )
        out = result.stdout.decode().strip()
        assert result.returncode == 0, (out, result.stderr.decode()[-2000:])
        kind, _, message = out.partition(" ")
        assert kind == "TransportError", out
        assert str(path) in message and "root (uid 0)" in message, out
        assert os.lstat(path).st_ino == inode  # left in place
    finally:
        shutil.rmtree(shared, ignore_errors=True)
