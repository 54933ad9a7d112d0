"""Services: named xrpc servers, launched on demand, reconnected after a crash or an upgrade.

Theory of operation
-------------------
A *service* is an ``xrpc.Server`` reachable by name.  Its *description* (``NAME.toml`` or
``NAME.json``, the equivalent of a launchd plist) says how to start it; the first directory of the
search path that holds one wins.  A running service listens on a Unix socket at a predictable
per-user path, ``<runtime>/sockets/NAME.sock``, where ``<runtime>`` is ``$XRPC_RUNTIME_DIR/xrpc``,
else ``$XDG_RUNTIME_DIR/xrpc``, else ``/tmp/xrpc-<uid>``.  Every directory on the way to a
description, socket or lock, and every description file, must be one that no other user can
change (``_open_dir``): otherwise ``UntrustedPath`` says which path and why, and nothing there is
used (a description planted by another user would run its command as us).

``connect_service(name)`` looks the description up at once (``ServiceNotFound`` says where it looked)
and yields a ``ServiceConnection``; nothing is connected until the first call.  A call that finds no
connection connects to the socket; if nothing listens there, the client takes an exclusive
``flock`` on ``<runtime>/locks/NAME.lock``, checks the socket again (another client may just have
launched the service), and otherwise *launches* the service: a detached process in its own session,
with the description's environment and working directory, which reports on an inherited pipe that
it listens.  The client keeps the lock until its own handshake is done.

The service side (``python -m xrpc.service NAME`` for ``module`` services, ``serve_service(server)``
for ``command`` services written in Python) takes the same lock before it stops listening, for idle
exit or on SIGTERM.  So a launch and a shutdown never overlap: a client either connects to the old
instance before it decided to stop (it then counts as a connection and the service stays), or finds
the socket gone and launches a new instance after the old one has let go of the path.  A connection
accepted by the kernel but dropped by a stopping service fails its handshake, which is retried;
no call has been sent on it yet.

A ``ServiceConnection`` is a small state machine (``TRANSITIONS``, rendered for the documentation by
``state_diagram()``).  It holds one underlying ``xrpc.Connection`` at a time.  When the service
exits or crashes, what is outstanding on that connection fails with ``ConnectionInterrupted`` (the
runtime does that), ``on_interrupted`` fires once, and the next call connects (and launches) again.
It is invalidated for good by ``aclose()``, by a ``PeerRejected``, or when the description is gone at
reconnect time; ``on_invalidated`` fires once and every later call raises ``ConnectionInvalidated``.

What this module must not do: touch the protocol core beyond what is marked as a stopgap (the
heartbeat's PONG watch, ``_fail_connection``), or know about frames.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import errno
import fcntl
import functools
import importlib
import inspect
import json
import logging
import math
import os
import random
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Mapping, Sequence, TypedDict, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
from typing_extensions import Unpack

from ._api import Server, connect
from ._connection import Connection, Limits, Promise, event_callback
from ._errors import ConnectionInterrupted, ConnectionInvalidated, Error, PeerRejected, TransportError
from ._interface import InterfaceDescription, MethodDescription, MethodKind
from ._proxy import PromiseBase, cached_proxy, pipelined_method
from ._systemd import ActivatedListener, inherited_sockets, sd_notify, service_lifecycle
from ._transports import ParsedURL, owner_name

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - Python 3.10: tomli, a dependency there, is what became tomllib
    try:
        import tomli as _toml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        _toml = None  # type: ignore[assignment,unused-ignore]

__all__ = (
    "ServiceConnection",
    "ServiceDescription",
    "ServiceDescriptionError",
    "ServiceNotFound",
    "ServiceUnavailable",
    "TRANSITIONS",
    "UntrustedPath",
    "connect_service",
    "find_service",
    "load_description",
    "lock_path",
    "main",
    "runtime_dir",
    "serve_service",
    "service_search_path",
    "socket_path",
    "state_diagram",
    "systemctl",
    "systemd_hint",
    "systemd_scope",
    "transition_table",
)

log = logging.getLogger("xrpc.services")
_T = TypeVar("_T")

SYSTEM_SERVICE_DIRS = (Path("/etc/xrpc/services"), Path("/usr/share/xrpc/services"))
RESTART_POLICIES = ("on-demand", "manual")
READINESS = ("pipe", "socket")
LAUNCHERS = ("builtin", "systemd")
FAILOVER_POLICIES = ("ordered", "round-robin")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z")
_MAX_UNIX_PATH = 107  # sun_path holds 108 bytes, one of them the terminating NUL
_SHARED_TMP = Path("/tmp")  # where the fallback runtime directory lives (a test may point it elsewhere)


# --------------------------------------------------------------------------- errors
class ServiceNotFound(ConnectionInvalidated):
    """No description of the service was found (at ``connect_service``, or when reconnecting).

    ``name`` is the service, ``searched`` the directories looked in, in order.
    """

    def __init__(self, message: str, *, name: str = "", searched: Sequence[Path] = ()) -> None:
        super().__init__(message)
        self.name = name
        self.searched = tuple(searched)


class ServiceDescriptionError(Error):
    """A service description file is malformed (the message names the file and the key)."""


class ServiceUnavailable(ConnectionInterrupted):
    """The service could not be reached or launched.  The next call tries again.

    ``attempts`` holds ``(url, reason)`` for each address tried, in order, when a service with
    several addresses answered on none of them (empty otherwise).
    """

    def __init__(self, message: str = "", *, attempts: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.attempts = tuple(attempts)


class UntrustedPath(ServiceUnavailable):
    """A directory or file on the way to a service's description, socket or lock could be changed
    by another user (or is a symbolic link where xrpc allows none), so xrpc does not use it.

    ``path`` is the culprit; the message names it and says why.
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


# --------------------------------------------------------------------------- where things live
def runtime_dir() -> Path:
    """The per-user directory holding ``services/``, ``sockets/`` and ``locks/``.

    ``$XRPC_RUNTIME_DIR/xrpc``, else ``$XDG_RUNTIME_DIR/xrpc``, else ``/tmp/xrpc-<uid>``.
    """
    base = os.environ.get("XRPC_RUNTIME_DIR") or os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "xrpc"
    return _SHARED_TMP / f"xrpc-{os.getuid()}"


def service_search_path() -> list[Path]:
    """Where descriptions are looked for, in order: the per-user directory, the system
    directories, then each directory of ``$XRPC_SERVICE_PATH`` (``os.pathsep``-separated)."""
    dirs = [runtime_dir() / "services", *SYSTEM_SERVICE_DIRS]
    dirs += [Path(p) for p in os.environ.get("XRPC_SERVICE_PATH", "").split(os.pathsep) if p]
    return dirs


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"{name!r} is not a valid service name: use letters, digits, '.', '_' and '-' "
            "(reverse-DNS style, e.g. 'com.example.indexer')"
        )


def socket_path(name: str) -> Path:
    """The Unix socket a running service ``name`` listens on."""
    _check_name(name)
    return runtime_dir() / "sockets" / f"{name}.sock"


def lock_path(name: str) -> Path:
    """The lock file that serializes launching and stopping the service ``name``."""
    _check_name(name)
    return runtime_dir() / "locks" / f"{name}.lock"


# --------------------------------------------------------------------------- paths we trust
# Whoever may change a directory on the way to a description, a socket or a lock decides what runs
# (a planted description's command runs as us) or whom we talk to.  So every directory on those
# paths must belong to this user or root and be writable by nobody else, except a sticky shared
# parent such as /tmp (others may add names there, but not rename or remove ours: the name we use
# is then checked to be ours).  The walk opens one name at a time from ``/`` with O_NOFOLLOW and
# checks what it opened with fstat, so another user cannot swap a name between check and use; and
# once the walk is done nothing on the path can be changed by anyone but us or root.
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS = 40
_ANCESTOR, _LAST, _OWN = "ancestor", "last", "own"
_RUNTIME_HINT = (
    " Set XDG_RUNTIME_DIR (or XRPC_RUNTIME_DIR) to a directory that only you can write to, "
    "such as the /run/user/<uid> that a login session provides."
)


def _trusted_owner(uid: int) -> bool:
    return uid == os.geteuid() or uid == 0


def _untrusted(path: str, why: str, hint: str = "") -> UntrustedPath:
    return UntrustedPath(f"xrpc refuses to use {path}: {why}.{hint}", path=path)


def _writers(mode: int) -> str:
    if mode & 0o022 == 0o022:
        return "its group and by others"
    return "its group" if mode & 0o020 else "others"


def _check_owner_and_mode(st: os.stat_result, path: str, role: str, hint: str) -> None:
    if not _trusted_owner(st.st_uid):
        raise _untrusted(
            path, f"it belongs to {owner_name(st.st_uid)}, not to you ({owner_name(os.geteuid())}) or root, so that user controls it", hint
        )
    mode = st.st_mode
    if mode & 0o022 and not (role == _ANCESTOR and stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
        sticky = " and not sticky" if role == _ANCESTOR else ""
        raise _untrusted(path, f"it is writable by {_writers(mode)}{sticky} (mode {stat.S_IMODE(mode):o})", hint)


def _open_dir(path: str | os.PathLike[str], *, own: int = 0, create: bool = False, hint: str = "") -> int | None:
    """An ``O_PATH`` descriptor of the directory ``path``, once every directory on the way is trusted.

    Every directory walked belongs to this user or root and is not writable by group or others;
    one above the last may be writable if it is sticky (like /tmp).  The last ``own`` names are
    xrpc's own directories: real directories, never symbolic links.  Elsewhere a symbolic link is
    followed if it belongs to this user or root (it sits in a directory checked before, so only they
    could have put it there), and its target is walked the same way.  A missing directory is created
    (mode 0700) if ``create``; otherwise the answer is None, as for a name that is not a directory
    or that this user cannot reach.  Anything untrusted raises ``UntrustedPath``.
    """
    full = os.path.join(os.getcwd(), os.fspath(path))
    names = [n for n in full.split("/") if n and n != "."]
    roles = [_ANCESTOR] * len(names)
    for i in range(max(0, len(names) - own), len(names)):
        roles[i] = _OWN
    if names and roles[-1] == _ANCESTOR:
        roles[-1] = _LAST
    pending = list(zip(names, roles))[::-1]  # a stack: the next name is at the end
    links = 0
    fd = os.open("/", _DIR_FLAGS)
    where = "/"
    try:
        _check_owner_and_mode(os.fstat(fd), where, _ANCESTOR if names else _LAST, hint)
        while pending:
            name, role = pending.pop()
            child = os.path.dirname(where) if name == ".." else os.path.join(where, name)
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass  # made by someone else meanwhile: opened and checked below
                except OSError as exc:
                    raise ServiceUnavailable(f"cannot create the directory {child}: {exc.strerror or exc}") from exc
                pending.append((name, role))
                continue
            except NotADirectoryError:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    st = None
                if st is None or not stat.S_ISLNK(st.st_mode):
                    if create:
                        raise ServiceUnavailable(f"{child} is not a directory") from None
                    return None
                if role == _OWN:
                    raise _untrusted(
                        child, f"it is a symbolic link (owned by {owner_name(st.st_uid)}), and xrpc's own directories must be real directories", hint
                    ) from None
                if not _trusted_owner(st.st_uid):
                    raise _untrusted(child, f"it is a symbolic link that belongs to {owner_name(st.st_uid)}", hint) from None
                links += 1
                if links > _MAX_LINKS:
                    raise _untrusted(child, "too many levels of symbolic links", hint) from None
                target = os.readlink(name, dir_fd=fd)
                tnames = [n for n in target.split("/") if n and n != "."]
                if target.startswith("/"):
                    os.close(fd)
                    fd = -1
                    fd = os.open("/", _DIR_FLAGS)
                    where = "/"
                    _check_owner_and_mode(os.fstat(fd), where, _ANCESTOR if tnames else role, hint)
                elif not tnames:
                    _check_owner_and_mode(os.fstat(fd), where, role, hint)
                troles = [_ANCESTOR] * len(tnames)
                if tnames:
                    troles[-1] = role
                pending.extend(list(zip(tnames, troles))[::-1])
                continue
            except PermissionError as exc:
                if create:
                    raise ServiceUnavailable(f"cannot use the directory {child}: {exc.strerror or exc}") from exc
                return None
            os.close(fd)
            fd = nfd
            where = child
            _check_owner_and_mode(os.fstat(fd), where, role, hint)
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def _is_runtime_subdir(path: Path) -> bool:
    return path.parent == runtime_dir()


def check_dir(path: Path, *, create: bool) -> int | None:
    """``_open_dir`` for a directory xrpc uses: ``<runtime>/X`` (services, sockets, locks) is xrpc's
    own, as is the runtime directory itself; any other directory only has to be private."""
    if _is_runtime_subdir(path):
        return _open_dir(path, own=2, create=create, hint=_RUNTIME_HINT)
    return _open_dir(path, create=create)


def _private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed; refuse it if anyone else could tamper with it or with
    any directory above it (``UntrustedPath``)."""
    fd = check_dir(path, create=True)
    assert fd is not None
    os.close(fd)
    return path


def _read_trusted(dir_fd: int, directory: Path, filename: str, links: int = 0) -> bytes | None:
    """The bytes of ``directory/filename`` (``dir_fd`` being the checked directory), or None if
    there is no regular file by that name.  The file must belong to this user or root and be
    writable by nobody else; a symbolic link is followed as ``_open_dir`` does."""
    path = directory / filename
    try:
        fd = os.open(filename, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise ServiceDescriptionError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        try:
            st = os.stat(filename, dir_fd=dir_fd, follow_symlinks=False)
            link = os.readlink(filename, dir_fd=dir_fd)
        except OSError:
            return None  # gone meanwhile
        if not _trusted_owner(st.st_uid):
            raise _untrusted(str(path), f"it is a symbolic link that belongs to {owner_name(st.st_uid)}") from None
        if links >= _MAX_LINKS:
            raise _untrusted(str(path), "too many levels of symbolic links") from None
        target = directory / link
        tfd = _open_dir(target.parent)
        if tfd is None:
            return None
        try:
            return _read_trusted(tfd, target.parent, target.name, links + 1)
        finally:
            os.close(tfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        _check_owner_and_mode(st, str(path), _LAST, "")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)


def _socket_file(name: str) -> Path:
    path = socket_path(name)
    if len(os.fsencode(str(path))) > _MAX_UNIX_PATH:
        raise ServiceUnavailable(
            f"the socket path of service {name!r} is too long for a Unix socket ({path}): "
            "set XRPC_RUNTIME_DIR to a shorter directory"
        )
    _private_dir(path.parent)
    return path


def check_socket_url(url: str) -> None:
    """Refuse (``UntrustedPath``) a ``unix://`` URL of a description whose directory another user
    could change: whoever can add a name there (when the service is down, or its socket unit
    stopped) decides whom the client talks to.  Other URLs, and a directory that does not exist,
    pass (connecting then fails as usual)."""
    parsed = ParsedURL(url)
    if parsed.scheme != "unix" or not parsed.path.startswith("/"):
        return
    fd = check_dir(Path(parsed.path).parent, create=False)
    if fd is not None:
        os.close(fd)


# --------------------------------------------------------------------------- descriptions
@dataclasses.dataclass(frozen=True)
class ServiceDescription:
    """A parsed service description (see ``docs/services.md`` for the keys)."""

    name: str
    path: Path
    command: tuple[str, ...] | None = None
    module: str | None = None
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)
    working_directory: Path = Path("/")
    idle_exit: float | None = None
    restart: str = "on-demand"
    readiness: str = "pipe"
    launch_timeout: float = 10.0
    python: str | None = None
    log_file: Path | None = None
    url: str | None = None  # a service elsewhere (another host): connected to, never launched
    launcher: str = "builtin"  # "systemd": the service manager owns the socket; clients only connect
    urls: tuple[str, ...] = ()  # every address of a service elsewhere, in order (``url`` is the first)
    failover: str = "ordered"  # how a connection picks among ``urls``: "ordered" or "round-robin"
    # for the units of a service manager (``xrpc service unit``); the built-in launcher ignores them
    socket_mode: str | None = None
    socket_user: str | None = None
    socket_group: str | None = None
    user: str | None = None
    dynamic_user: bool = False

    def argv(self) -> list[str]:
        """The program the launcher runs."""
        if self.command is not None:
            return list(self.command)
        return [self.python or sys.executable, "-m", "xrpc.service", self.name, "--description", str(self.path)]


_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
_Seconds = Annotated[float, msgspec.Meta(ge=0)]
_ACCOUNT = r"^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]{1,10})\Z"  # a user or group name (or number) as systemd takes it


class DescriptionFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A description file's keys and their types, as decoded (``ServiceDescription`` is what is
    made of it once the keys have been checked against one another)."""

    name: str
    command: Annotated[list[_NonEmpty], msgspec.Meta(min_length=1)] | None = None
    module: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")] | None = None
    environment: dict[str, str] = {}
    working_directory: _NonEmpty = "/"
    idle_exit: _Seconds | None = None
    restart: Literal["on-demand", "manual"] = "on-demand"
    readiness: Literal["pipe", "socket"] = "pipe"
    launch_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    python: _NonEmpty | None = None
    log_file: _NonEmpty | None = None
    url: str | None = None
    socket_mode: Annotated[str, msgspec.Meta(pattern=r"^0?[0-7]{3}\Z")] | None = None
    socket_user: Annotated[str, msgspec.Meta(pattern=_ACCOUNT)] | None = None
    socket_group: Annotated[str, msgspec.Meta(pattern=_ACCOUNT)] | None = None
    user: Annotated[str, msgspec.Meta(pattern=_ACCOUNT)] | None = None
    dynamic_user: bool = False
    launcher: Literal["builtin", "systemd"] = "builtin"
    urls: Annotated[list[str], msgspec.Meta(min_length=1)] | None = None
    failover: Literal["ordered", "round-robin"] = "ordered"


_KEYS = DescriptionFile.__struct_fields__

# what a key that does not decode is told (the decoder's own words follow in brackets)
_KEY_HINTS = {
    "name": "'name' (a string) is required",
    "command": "'command' must be a non-empty list of non-empty strings (an argv)",
    "module": "'module' must look like 'package.module:factory', not {value!r}",
    "environment": "'environment' must be a table of string values",
    "working_directory": "'working_directory' must be a path",
    "idle_exit": "'idle_exit' must be a number of seconds >= 0",
    "restart": "'restart' must be one of " + ", ".join(map(repr, RESTART_POLICIES)) + ", not {value!r}",
    "readiness": "'readiness' must be one of " + ", ".join(map(repr, READINESS)) + ", not {value!r}",
    "launch_timeout": "'launch_timeout' must be a number of seconds > 0",
    "python": "'python' must be the path of an interpreter",
    "log_file": "'log_file' must be a path",
    "url": "'url' must be a string such as 'tls://host:port'",
    "socket_mode": "'socket_mode' must be an octal mode written as a string, such as \"0660\", not {value!r}",
    "socket_user": "'socket_user' must be a user name or number, not {value!r}",
    "socket_group": "'socket_group' must be a group name or number, not {value!r}",
    "user": "'user' must be a user name or number, not {value!r}",
    "dynamic_user": "'dynamic_user' must be true or false",
    "launcher": "'launcher' must be one of " + ", ".join(map(repr, LAUNCHERS)) + ", not {value!r}",
    "urls": "'urls' must be a non-empty list of strings such as 'tls://host:port'",
    "failover": "'failover' must be one of " + ", ".join(map(repr, FAILOVER_POLICIES)) + ", not {value!r}",
}
_FIELD_AT = re.compile(r"at `\$\.(\w+)")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def _extensions() -> tuple[str, ...]:
    return (".toml", ".json") if _toml is not None else (".json",)


def load_description(path: str | os.PathLike[str]) -> ServiceDescription:
    """Read and check one description file (``.toml`` or ``.json``)."""
    path = Path(path)
    dir_fd = check_dir(path.parent, create=False)
    raw = None
    if dir_fd is not None:
        try:
            raw = _read_trusted(dir_fd, path.parent, path.name)
        finally:
            os.close(dir_fd)
    if raw is None:
        raise ServiceDescriptionError(f"{path}: cannot read: there is no such regular file")
    return _load(path, raw)


def _load(path: Path, raw: bytes) -> ServiceDescription:
    try:
        if path.suffix == ".toml":
            if _toml is None:  # pragma: no cover - Python 3.10
                raise ServiceDescriptionError(f"{path}: TOML descriptions need tomli on Python 3.10 (pip install tomli); or write {path.stem}.json")
            data = _toml.loads(raw.decode())
        elif path.suffix == ".json":
            data = json.loads(raw, object_pairs_hook=_no_duplicates)
        else:
            raise ServiceDescriptionError(f"{path}: a description is a .toml or a .json file")
    except ServiceDescriptionError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ServiceDescriptionError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    except RecursionError:
        raise ServiceDescriptionError(f"{path}: not valid {path.suffix[1:].upper()}: nested too deeply") from None
    return _parse(path, data)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (as TOML does) rather than keeping the last."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} is given twice")
        out[key] = value
    return out


def _unusable_text(d: DescriptionFile) -> str:
    """What makes a string of ``d`` unusable as an argv, path or environment entry ('' if none)."""
    texts: list[tuple[str, str]] = [(f"'command'[{i}]", a) for i, a in enumerate(d.command or ())]
    texts += [("'working_directory'", d.working_directory)]
    texts += [(f"'{k}'", v) for k, v in (("python", d.python), ("log_file", d.log_file), ("module", d.module), ("url", d.url)) if v is not None]
    texts += [(f"'urls'[{i}]", u) for i, u in enumerate(d.urls or ())]
    for k, v in d.environment.items():
        if not k or "=" in k:
            return f"'environment' names a variable {k!r}: a name is not empty and holds no '='"
        texts += [(f"'environment' name {k!r}", k), (f"'environment'[{k!r}]", v)]
    for where, text in texts:
        if "\0" in text:
            return f"{where} holds a NUL character"
        try:
            os.fsencode(text)
        except UnicodeError:
            return f"{where} holds a lone surrogate ({text!r})"
    return ""


def _decode(path: Path, data: Any) -> DescriptionFile:
    """The keys of a description, each of its type; a ``ServiceDescriptionError`` naming the key."""

    def bad(message: str) -> ServiceDescriptionError:
        return ServiceDescriptionError(f"{path}: {message}")

    if not isinstance(data, dict):
        raise bad("the description must be a table of keys")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:  # all of them at once, not only the first the decoder meets
        raise bad(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} (the keys are {', '.join(_KEYS)})")
    try:
        return msgspec.convert(data, DescriptionFile)
    except msgspec.ValidationError as exc:
        text = str(exc)
        found = _FIELD_AT.search(text) or _MISSING.search(text)
        key = found.group(1) if found else ""
        if key in _KEY_HINTS:
            raise bad(f"{_KEY_HINTS[key].format(value=data.get(key))} ({text})") from None
        if (found := _UNKNOWN.search(text)) is not None:  # pragma: no cover - caught above
            raise bad(f"unknown key {found.group(1)!r} (the keys are {', '.join(_KEYS)})") from None
        raise bad(text) from None  # pragma: no cover - every key has a hint


def _parse(path: Path, data: Any) -> ServiceDescription:
    """Decode a description, then check what no single key's type says: how keys go together."""

    def bad(message: str) -> ServiceDescriptionError:
        return ServiceDescriptionError(f"{path}: {message}")

    d = _decode(path, data)
    if why := _unusable_text(d):
        raise bad(why)
    name = d.name
    if name != path.stem:
        raise bad(f"'name' is {name!r} but the file is named for {path.stem!r}")
    try:
        _check_name(name)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if d.url is not None and d.urls is not None:
        raise bad("give either 'url' (one address) or 'urls' (several), not both")
    urls = [d.url] if d.url is not None else list(d.urls or ())
    for i, u in enumerate(urls):
        where = "'url'" if d.url is not None else f"'urls'[{i}]"
        try:
            ParsedURL(u)
        except ValueError as exc:
            raise bad(f"{where}: {exc}") from None
        if u in urls[:i]:
            raise bad(f"{where}: {u!r} is listed twice")
    if d.launcher == "systemd":
        # systemd owns the socket: 'url' says where it listens (default: the per-user socket path);
        # 'command'/'module' are what the unit runs, and may be given with it
        if d.urls is not None:
            raise bad("a service started by systemd listens where its socket unit says: give one 'url', not 'urls'")
        if d.command is not None and d.module is not None:
            raise bad("give at most one of 'command' (an argv list) and 'module' ('package.module:factory')")
    elif urls:
        if d.command is not None or d.module is not None:
            what = "a 'url'" if d.url is not None else "'urls'"
            raise bad(
                f"a service with {what} runs elsewhere: drop 'command' and 'module'"
                + (' (or add launcher = "systemd" if a service manager starts it here)' if d.url is not None else "")
            )
    elif (d.command is None) == (d.module is None):
        raise bad("give exactly one of 'command' (an argv list), 'module' ('package.module:factory') and 'url'")
    if d.failover != "ordered" and len(urls) < 2:
        raise bad("'failover' chooses among several addresses: it needs 'urls' with two or more")
    if d.idle_exit is not None and not d.idle_exit < math.inf:
        raise bad("'idle_exit' must be a number of seconds >= 0")
    if not d.launch_timeout < math.inf:
        raise bad("'launch_timeout' must be a number of seconds > 0")
    if d.module is not None and d.readiness != "pipe":
        raise bad("a 'module' service always reports readiness on the pipe: drop 'readiness'")
    if d.python is not None and d.command is not None:
        raise bad("'python' only applies to a 'module' service")
    here = path.parent
    return ServiceDescription(
        name=name,
        path=path.absolute(),
        command=tuple(d.command) if d.command is not None else None,
        module=d.module,
        environment=dict(d.environment),
        working_directory=(here / d.working_directory).absolute(),
        idle_exit=d.idle_exit,
        restart=d.restart,
        readiness=d.readiness,
        launch_timeout=d.launch_timeout,
        python=d.python,
        log_file=(here / d.log_file).absolute() if d.log_file is not None else None,
        url=urls[0] if urls else None,
        launcher=d.launcher,
        urls=tuple(urls),
        failover=d.failover,
        socket_mode=d.socket_mode,
        socket_user=d.socket_user,
        socket_group=d.socket_group,
        user=d.user,
        dynamic_user=d.dynamic_user,
    )


def find_service(name: str, search_path: Sequence[str | os.PathLike[str]] | None = None) -> ServiceDescription:
    """The description of ``name``: the first ``NAME.toml`` / ``NAME.json`` on the search path.

    Raises ``ServiceNotFound`` naming every directory looked in, in order, and the likely cause.
    """
    _check_name(name)
    dirs = [Path(d) for d in (service_search_path() if search_path is None else search_path)]
    exts = _extensions()
    for d in dirs:
        dir_fd = check_dir(d, create=False)
        if dir_fd is None:
            continue  # no such directory
        try:
            for ext in exts:
                raw = _read_trusted(dir_fd, d, f"{name}{ext}")
                if raw is not None:
                    return _load(d / f"{name}{ext}", raw)
        finally:
            os.close(dir_fd)
    raise ServiceNotFound(_not_found_message(name, dirs, exts), name=name, searched=dirs)


def _not_found_message(name: str, dirs: list[Path], exts: tuple[str, ...]) -> str:
    files = " or ".join(f"{name}{e}" for e in exts)
    if not dirs:
        return f"no service named {name!r}: the search path is empty, so {files} was looked for nowhere."
    lines = [f"no service named {name!r}: looked for {files} in these directories, in this order:"]
    existing: list[Path] = []
    for i, d in enumerate(dirs, 1):
        if d.is_dir():
            existing.append(d)
            status = "no such file"
        elif d.exists():
            status = "not a directory"
        else:
            status = "directory does not exist"
        lines.append(f"  {i}. {d} ({status})")
    cause = ""
    if _toml is None:  # pragma: no cover - Python 3.10
        for d in existing:
            if (d / f"{name}.toml").is_file():
                cause = f"{d / (name + '.toml')} exists, but TOML descriptions need tomli on Python 3.10 (pip install tomli), or write {name}.json instead."
                break
    if not cause:
        known: dict[str, Path] = {}
        for d in existing:
            try:
                entries = sorted(os.listdir(d))
            except OSError:
                continue
            for entry in entries:
                stem, ext = os.path.splitext(entry)
                if ext in exts:
                    known.setdefault(stem, d / entry)
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.8)
        if close:
            cause = f"{known[close[0]]} describes {close[0]!r}: is the name misspelt?"
    if not cause:
        if not existing:
            cause = (
                "none of these directories exists: the service is not installed, "
                "or XRPC_RUNTIME_DIR / XRPC_SERVICE_PATH do not point where it is."
            )
        else:
            cause = (
                f"the service is not installed: put {name}{exts[0]} into one of these directories, "
                "or add the directory that holds it to XRPC_SERVICE_PATH."
            )
    lines.append(f"Likely cause: {cause}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the launch lock
async def _lock(path: Path) -> int:
    """Take an exclusive ``flock`` on ``path``; return the descriptor that holds it.

    The blocking wait runs in a worker thread and may be cancelled: a lock obtained after its
    waiter gave up is released at once.  The kernel drops the lock when its holder dies, so a lock
    file left by a crash never blocks anyone (lock files are never deleted, on purpose).
    """
    _private_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ServiceUnavailable(f"cannot open the lock file {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ServiceUnavailable(f"the lock file {path} is not a regular file")
        _check_owner_and_mode(st, str(path), _LAST, "")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    guard = threading.Lock()
    flags = {"abandoned": False, "done": False}

    def wait() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            with guard:
                flags["done"] = True
                if flags["abandoned"]:
                    os.close(fd)

    try:
        await anyio.to_thread.run_sync(wait, abandon_on_cancel=True)
    except BaseException:
        with guard:
            flags["abandoned"] = True
            if flags["done"]:
                os.close(fd)
        raise
    return fd


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def _locked(path: Path) -> AsyncIterator[None]:
    fd = await _lock(path)
    try:
        yield
    finally:
        _unlock(fd)


# --------------------------------------------------------------------------- launching
# Run by a bare interpreter (``-I -S``) in a new session: fork, report the service's pid on the
# readiness pipe, and exit; the grandchild execs the service.  The service is thus nobody's child
# but init's (no zombie in the client, no Popen to wait for), as a launchd job is.
_SPAWN = r"""
import os, sys
fd = int(sys.argv[1]); keep = sys.argv[2] == "1"; argv = sys.argv[3:]
pid = os.fork()
if pid:
    os.write(fd, b"pid %d\n" % pid)
    os._exit(0)
if not keep:
    os.close(fd)
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    msg = "cannot run %r: %s" % (argv[0], exc.strerror or exc)
    os.write(2, ("xrpc: " + msg + "\n").encode())
    if keep:
        os.write(fd, ("error " + msg + "\n").encode())
    os._exit(127)
"""

_PASSTHROUGH_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "XRPC_RUNTIME_DIR",
    "XRPC_SERVICE_PATH",
)


def _service_env(desc: ServiceDescription, sock: Path, lockp: Path, ready_fd: int | None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
    env.update(desc.environment)
    env.update(
        XRPC_SERVICE_NAME=desc.name,
        XRPC_SERVICE_FILE=str(desc.path),
        XRPC_SERVICE_SOCKET=str(sock),
        XRPC_SERVICE_URL=f"unix://{sock}",
        XRPC_SERVICE_LOCK=str(lockp),
    )
    if desc.idle_exit is not None:
        env["XRPC_IDLE_EXIT"] = repr(desc.idle_exit)
    if ready_fd is not None:
        env["XRPC_READY_FD"] = str(ready_fd)
    return env


async def _launch(desc: ServiceDescription, sock: Path, lockp: Path) -> int:
    """Start the service and return its pid once it listens (the caller holds the lock)."""
    keep = desc.readiness == "pipe"
    out: Any = subprocess.DEVNULL
    err: Any = None
    logf = None
    if desc.log_file is not None:
        try:
            logf = out = err = open(desc.log_file, "ab")
        except OSError as exc:
            raise ServiceUnavailable(f"service {desc.name!r}: cannot open its log_file: {exc.strerror or exc}") from exc
    r, w = os.pipe()
    argv = [sys.executable, "-I", "-S", "-c", _SPAWN, str(w), "1" if keep else "0", *desc.argv()]
    started = anyio.current_time()
    proc: subprocess.Popen[bytes] | None = None
    try:
        try:
            proc = subprocess.Popen(
                argv,
                env=_service_env(desc, sock, lockp, w if keep else None),
                cwd=desc.working_directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                pass_fds=(w,),
            )
        except OSError as exc:
            raise ServiceUnavailable(
                f"service {desc.name!r} ({desc.path}): cannot start it in {desc.working_directory}: {exc.strerror or exc}"
            ) from exc
        finally:
            os.close(w)
            if logf is not None:
                logf.close()
        pid = await _await_ready(desc, r, sock, proc.pid)
    finally:
        os.close(r)
        if proc is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(proc.wait)  # the spawner exits right after forking
    log.info("launched service %s (pid %d) in %.3fs", desc.name, pid, anyio.current_time() - started)
    return pid


async def _await_ready(desc: ServiceDescription, r: int, sock: Path, group: int) -> int:
    os.set_blocking(r, False)
    pid: int | None = None
    error = ""
    ready = False
    buf = b""
    try:
        with anyio.fail_after(desc.launch_timeout):
            while not ready:
                await anyio.wait_readable(r)
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    text = line.decode(errors="replace")
                    if text.startswith("pid "):
                        pid = int(text[4:])
                    elif text.startswith("ready"):
                        ready = True
                    elif text.startswith("error "):
                        error = text[6:]
            if desc.readiness == "socket" and pid is not None and not error:
                ready = await _await_listening(sock, pid)
    except BaseException as exc:
        # Timed out, or the caller gave up: a half-started instance is not left behind (it would
        # race the next launcher for the socket).  Kill the service's whole process group.
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
        if not isinstance(exc, TimeoutError):
            raise
        raise TimeoutError(
            f"service {desc.name!r} ({desc.path}) did not report that it listens within {desc.launch_timeout:g}s; "
            f"it was killed (see its standard error{' in ' + str(desc.log_file) if desc.log_file else ''})"
        ) from None
    if not ready or pid is None:
        where = f"see {desc.log_file}" if desc.log_file else "see its standard error"
        reason = f": {error}" if error else f" ({where})"
        raise ServiceUnavailable(f"service {desc.name!r} ({desc.path}) exited before it was ready{reason}")
    return pid


async def _await_listening(sock: Path, pid: int) -> bool:
    """``readiness = "socket"``: wait (bounded by the caller, with backoff) until ``sock`` accepts."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    delay = 0.002
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(sock))
                return True
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                    raise
            finally:
                s.close()
            if pidfd is not None and select.select([pidfd], [], [], 0)[0]:
                return False  # the service died before it listened
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.1)
    finally:
        if pidfd is not None:
            os.close(pidfd)


# --------------------------------------------------------------------------- services systemd starts
def systemd_scope(url: str) -> str:
    """``"user"`` when the socket of ``url`` lives in this user's runtime directory or home (a
    ``systemctl --user`` unit), else ``"system"``."""
    u = ParsedURL(url)
    if u.scheme != "unix":
        return "system"
    path = os.path.abspath(u.path)
    mine = (str(runtime_dir()), os.environ.get("XDG_RUNTIME_DIR", ""), f"/run/user/{os.getuid()}", os.path.expanduser("~"))
    for d in mine:
        d = os.path.abspath(d) if d else ""
        if d not in ("", "/") and (path + "/").startswith(d.rstrip("/") + "/"):
            return "user"
    return "user" if path.startswith("/run/user/") else "system"


def systemctl(desc: ServiceDescription, *args: str, tool: str = "systemctl") -> str:
    """The command line of ``tool`` (``systemctl`` or ``journalctl``) for the units of the
    systemd-managed service ``desc``, in the scope its socket implies."""
    url = desc.url or f"unix://{socket_path(desc.name)}"
    user = " --user" if systemd_scope(url) == "user" else ""
    return f"{tool}{user} {' '.join(args)}"


def systemd_hint(desc: ServiceDescription, url: str, exc: BaseException, timeout: float | None = None) -> str:
    """Why a service that systemd starts could not be reached, naming its units and the commands
    that show what happened to them."""
    sock, unit = f"{desc.name}.socket", f"{desc.name}.service"
    u = ParsedURL(url)
    cause = exc.__cause__
    code = cause.errno if isinstance(cause, OSError) else None
    if isinstance(exc, TimeoutError):
        what = (
            f"{url} accepted the connection but nothing answered within {timeout or 0:g}s: "
            f"{unit} is starting slowly, hanging or failing to start"
        )
    elif u.scheme == "unix" and (code == errno.ENOENT or not os.path.exists(u.path)):
        what = f"there is no socket at {u.path}: the socket unit {sock} is not installed, not started, or listens elsewhere"
    elif code == errno.ECONNREFUSED:
        what = f"{url} refuses connections: the socket unit {sock} is stopped or failed"
    else:
        what = f"the connection to {url} failed ({exc}): {unit} may have failed to start"
    return (
        f"service {desc.name!r} is started by systemd (launcher = \"systemd\"), so xrpc does not launch it, and {what}. "
        f"Inspect it with `{systemctl(desc, 'status', sock, unit)}` and `{systemctl(desc, '-u', unit, tool='journalctl')}`; "
        f"start it with `{systemctl(desc, 'start', sock)}`."
    )


def _reason(url: str, exc: BaseException, timeout: float) -> str:
    """What ``exc``, raised connecting to ``url``, says, without the URL it starts with."""
    text = str(exc)
    if not text and isinstance(exc, TimeoutError):
        return f"no connection within {timeout:g}s"
    prefix = f"{url}: "
    return text[len(prefix):] if text.startswith(prefix) else text or type(exc).__name__


# --------------------------------------------------------------------------- the state machine
IDLE = "idle"
CONNECTING = "connecting"
CONNECTED = "connected"
INTERRUPTED = "interrupted"
INVALIDATED = "invalidated"
INITIAL = IDLE
TERMINAL = (INVALIDATED,)

#: (state, event) -> next state.  A pair that is not here means: the event changes nothing.
TRANSITIONS: dict[tuple[str, str], str] = {
    (IDLE, "call"): CONNECTING,
    (IDLE, "aclose"): INVALIDATED,
    (CONNECTING, "connected"): CONNECTED,
    (CONNECTING, "connect_failed"): IDLE,
    (CONNECTING, "rejected"): INVALIDATED,
    (CONNECTING, "description_removed"): INVALIDATED,
    (CONNECTING, "aclose"): INVALIDATED,
    (CONNECTED, "peer_lost"): INTERRUPTED,
    (CONNECTED, "heartbeat_missed"): INTERRUPTED,
    (CONNECTED, "idle_disconnect"): IDLE,
    (CONNECTED, "rejected"): INVALIDATED,
    (CONNECTED, "aclose"): INVALIDATED,
    (INTERRUPTED, "call"): CONNECTING,
    (INTERRUPTED, "aclose"): INVALIDATED,
}

#: What each event is, for the documentation.
EVENTS: dict[str, str] = {
    "call": "a call needs a connection",
    "connected": "the handshake with the service is done (launching it first if nothing listened)",
    "connect_failed": "connecting or launching failed (`ServiceUnavailable`, `TimeoutError` ...); the call raises it",
    "rejected": "the service refused the connection (`PeerRejected`)",
    "description_removed": "the description is gone at reconnect time (`ServiceNotFound`)",
    "peer_lost": "the service exited or crashed; outstanding calls fail with `ConnectionInterrupted`",
    "heartbeat_missed": "the service did not answer a heartbeat PING in time (a silent peer)",
    "idle_disconnect": "nothing was in flight for `disconnect_when_idle` seconds; the connection was closed",
    "aclose": "`aclose()` (or leaving the `async with` block)",
}

#: Callbacks fired on entering a state.
ON_ENTER: dict[str, str] = {INTERRUPTED: "on_interrupted", INVALIDATED: "on_invalidated"}


def state_diagram() -> str:
    """The ``ServiceConnection`` state machine as a Mermaid ``stateDiagram``, from ``TRANSITIONS``."""
    lines = ["stateDiagram-v2", f"    [*] --> {INITIAL}"]
    for (src, event), dst in TRANSITIONS.items():
        lines.append(f"    {src} --> {dst}: {event}")
    for state in TERMINAL:
        lines.append(f"    {state} --> [*]")
    for state, callback in ON_ENTER.items():
        lines.append(f"    note right of {state}: fires {callback}")
    return "\n".join(lines) + "\n"


def transition_table() -> str:
    """``TRANSITIONS`` as a Markdown table, with what each event means."""
    lines = ["| state | event | next state | the event |", "|---|---|---|---|"]
    for (src, event), dst in TRANSITIONS.items():
        lines.append(f"| {src} | {event} | {dst} | {EVENTS[event]} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the client side
def _clone(exc: BaseException) -> BaseException:
    """A copy of ``exc`` to raise in another task (one exception object must not be raised twice)."""
    try:
        return copy.copy(exc)
    except Exception:
        return exc


class _Hold:
    """One underlying connection and what the ``ServiceConnection`` knows about it."""

    __slots__ = ("conn", "ended", "live", "reason")

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.ended = anyio.Event()
        self.live = False  # handed to callers (events before that are the connect attempt's business)
        self.reason = ""  # why we ended it ourselves: "idle_disconnect" or "heartbeat_missed"


class _Attempt:
    __slots__ = ("done", "error", "scope")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None
        self.scope = anyio.CancelScope()


class ServiceConnection:
    """A connection to a named service that survives the service: see ``connect_service``.

    ``proxy()`` works as on ``xrpc.Connection``; calls connect (and launch) on demand.  ``state`` is
    one of ``idle``, ``connecting``, ``connected``, ``interrupted``, ``invalidated``.  ``url`` is
    the address of the current connection (or of the last one tried).
    """

    def __init__(
        self,
        description: ServiceDescription,
        tg: anyio.abc.TaskGroup,
        *,
        search_path: Sequence[str | os.PathLike[str]] | None = None,
        exports: Sequence[Any] = (),
        timeout: float | None = None,
        on_interrupted: Callable[[], Any] | None = None,
        on_invalidated: Callable[[], Any] | None = None,
        heartbeat: float | None = None,
        disconnect_when_idle: float | None = None,
        limits: Limits | None = None,
        requirement: Any = None,
        ssl_context: Any = None,
        server_hostname: str | None = None,
    ) -> None:
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError("heartbeat= is an interval in seconds > 0")
        if disconnect_when_idle is not None and not disconnect_when_idle > 0:
            raise ValueError("disconnect_when_idle= is a number of seconds > 0")
        self.name = description.name
        self.description = description
        self.url = description.url or f"unix://{socket_path(description.name)}"
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._tg = tg
        self._search_path = None if search_path is None else [Path(p) for p in search_path]
        self._exports = list(exports)
        self._timeout = timeout
        self._on_interrupted = on_interrupted
        self._on_invalidated = on_invalidated
        self._heartbeat = heartbeat
        self._idle = disconnect_when_idle
        self._limits = limits or Limits()
        self._requirement = requirement
        self._state = INITIAL
        self._hold: _Hold | None = None
        self._attempt: _Attempt | None = None
        self._invalid: BaseException | None = None
        self._proxies: dict[tuple[int, str, float | None], Any] = {}
        self._last_activity = 0.0
        self._index: int | None = None  # which of the description's ``urls`` the last connection used
        self._after_loss = False  # the connection being made replaces one that was interrupted
        self.launches = 0  # how many times this connection launched the service

    def __repr__(self) -> str:
        return f"<xrpc.ServiceConnection {self.name!r} {self._state}>"

    # -------------------------------------------------------------- public surface
    @property
    def state(self) -> str:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state == INVALIDATED

    @property
    def connection(self) -> Connection | None:
        """The current underlying connection, if connected."""
        hold = self._hold
        if self._state == CONNECTED and hold is not None:
            return hold.conn
        return None

    def proxy(self, iface: Callable[..., _T], name: str = "", timeout: float | None = None) -> _T:
        """A proxy typed as ``iface`` for the object the service exports under ``name``."""
        return cached_proxy(self._proxies, self, iface, name, timeout)  # type: ignore[no-any-return]

    def export(self, iface: Any, obj: Any, name: str = "") -> None:
        """Serve ``obj`` to the service, on the current connection and every later one."""
        self._exports.append((iface, obj, name) if name else (iface, obj))
        conn = self.connection
        if conn is not None:
            conn.export(iface, obj, name)

    async def connect(self) -> Connection:
        """Connect now (launching the service if needed); return the underlying connection."""
        return await self._acquire()

    async def aclose(self) -> None:
        """Close for good (idempotent): outstanding and later calls raise ``ConnectionInvalidated``."""
        if self._state != INVALIDATED:
            self._invalid = ConnectionInvalidated(f"the connection to service {self.name!r} was closed")
            self._fire("aclose")
        attempt = self._attempt
        if attempt is not None:
            attempt.scope.cancel()
        hold = self._hold
        if hold is not None and hold.conn is not None:
            await hold.conn.aclose()

    # -------------------------------------------------------------- the calls proxies make
    async def call_unary(self, obj: str, m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        conn, remaining = await self._acquire_within(timeout)
        conn.check_call(m, obj, args, kwargs)  # against the version of the service running now
        try:
            return await conn.call_unary(obj, m, args, kwargs, remaining)
        finally:
            self._last_activity = anyio.current_time()

    async def call_oneway(self, obj: str, m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        conn = await self._acquire()
        conn.check_call(m, obj, args, kwargs)
        await conn.call_oneway(obj, m, args, kwargs)

    async def call_client_stream(
        self, obj: str, m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        conn, remaining = await self._acquire_within(timeout)
        conn.check_call(m, obj, args, kwargs)
        try:
            return await conn.call_client_stream(obj, m, args, kwargs, remaining)
        finally:
            self._last_activity = anyio.current_time()

    def call_stream(self, obj: str, m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> _ServiceStream:
        return _ServiceStream(self, obj, m, args, kwargs, timeout)

    def call_pipelined(
        self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> _ServicePromise:
        return _ServicePromise(self, None, m, (obj, args, kwargs), timeout)

    # -------------------------------------------------------------- getting a connection
    async def _acquire_within(self, timeout: float | None) -> tuple[Connection, float | None]:
        if timeout is None:
            return await self._acquire(), None
        deadline = anyio.current_time() + timeout
        with anyio.fail_after(timeout):
            conn = await self._acquire()
        return conn, max(deadline - anyio.current_time(), 0.0)

    async def _acquire(self) -> Connection:
        while True:
            state = self._state
            if state == INVALIDATED:
                assert self._invalid is not None
                raise _clone(self._invalid)
            if state == CONNECTED:
                hold = self._hold
                assert hold is not None and hold.conn is not None
                if not hold.conn.closed:
                    self._last_activity = anyio.current_time()
                    return hold.conn
                await hold.ended.wait()
                continue
            if state == CONNECTING:
                attempt = self._attempt
                assert attempt is not None
                await attempt.done.wait()
                if attempt.error is not None:
                    raise _clone(attempt.error) from attempt.error
                continue
            await self._connect_now()

    async def _connect_now(self) -> None:
        attempt = self._attempt = _Attempt()
        self._after_loss = self._state == INTERRUPTED
        self._fire("call")
        hold: _Hold | None = None
        try:
            with attempt.scope:
                hold = await self._establish()
            if hold is None or self._state != CONNECTING:  # aclose() meanwhile
                if hold is not None and hold.conn is not None:
                    await hold.conn.aclose()
                assert self._invalid is not None
                raise _clone(self._invalid)
        except BaseException as exc:
            if self._state == CONNECTING:
                if isinstance(exc, ServiceNotFound):
                    self._invalidate(exc, "description_removed")
                elif isinstance(exc, PeerRejected):
                    self._invalidate(exc, "rejected")
                else:
                    self._fire("connect_failed")
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                attempt.error = exc
            attempt.done.set()
            raise
        self._hold = hold
        hold.live = True
        self._last_activity = anyio.current_time()
        self._fire("connected")
        attempt.done.set()
        if hold.ended.is_set():  # lost between the handshake and now
            self._conn_lost(hold)

    async def _establish(self) -> _Hold:
        desc = self.description = find_service(self.name, self._search_path)
        # each address tried may take a handshake timeout
        each = self._limits.handshake_timeout
        limit = self._timeout if self._timeout is not None else desc.launch_timeout + each * max(1, len(desc.urls))
        try:
            with anyio.fail_after(limit):
                return await self._establish_now(desc)
        except TimeoutError as exc:
            if str(exc):
                raise
            raise TimeoutError(f"service {self.name!r}: not connected within {limit:g}s") from None

    async def _establish_now(self, desc: ServiceDescription) -> _Hold:
        if desc.launcher == "systemd":
            return await self._connect_managed(desc)
        if len(desc.urls) > 1:
            return await self._connect_any(desc)
        if desc.url is not None:
            # a service on another host: reconnect, never launch
            check_socket_url(desc.url)
            try:
                return await self._open(desc.url)
            except TransportError as exc:
                raise ServiceUnavailable(f"service {desc.name!r} at {desc.url} is not reachable: {exc}") from exc
        sock = _socket_file(desc.name)
        url = f"unix://{sock}"
        try:
            return await self._open(url)
        except TransportError as exc:
            log.debug("service %s: %s", desc.name, exc)
            last: BaseException = exc
        if desc.restart == "manual":
            raise ServiceUnavailable(
                f"service {desc.name!r} is not running ({last}) and its restart policy is 'manual': it is not launched on demand"
            ) from last
        lockp = lock_path(desc.name)
        for _ in range(3):
            async with _locked(lockp):
                try:
                    return await self._open(url)  # launched by someone else meanwhile?
                except TransportError as exc:
                    log.debug("service %s: %s; launching it", desc.name, exc)
                await _launch(desc, sock, lockp)
                self.launches += 1
                try:
                    # still under the lock: the service cannot decide to stop before we are in
                    return await self._open(url)
                except TransportError as exc:
                    last = exc
        raise ServiceUnavailable(f"service {desc.name!r} was launched but does not accept connections: {last}") from last

    async def _connect_any(self, desc: ServiceDescription) -> _Hold:
        """Connect to the first of the description's ``urls`` that answers, starting where the
        failover policy says: "ordered" from the first address (after an interruption, from the
        one after the address lost, which is tried last); "round-robin" from the one after the
        address the previous connection used (a client's first connection starts at a random one,
        so that many clients spread out)."""
        urls = desc.urls
        n = len(urls)
        last = self._index
        if last is None:
            start = random.randrange(n) if desc.failover == "round-robin" else 0
        elif desc.failover == "round-robin" or self._after_loss:
            start = last + 1
        else:
            start = 0
        attempts: list[tuple[str, str]] = []
        rejected = 0
        for k in range(n):
            i = (start + k) % n
            url = urls[i]
            self.url = url
            try:
                check_socket_url(url)
                hold = await self._open(url)
            except (TransportError, TimeoutError, OSError, PeerRejected, UntrustedPath) as exc:
                # a replica that refuses this client, or that fails its requirement, is passed over
                # like one that cannot be reached: the next one is checked the same way
                rejected += isinstance(exc, PeerRejected)
                reason = _reason(url, exc, self._limits.handshake_timeout)
                log.debug("service %s: %s: %s", desc.name, url, reason)
                attempts.append((url, reason))
                continue
            self._index = i
            return hold
        what = "refused this client at all" if rejected == n else "is not reachable at any"
        lines = [f"service {desc.name!r} {what} of its {n} addresses (tried in this order):"]
        lines += [f"  {i}. {url}: {reason}" for i, (url, reason) in enumerate(attempts, 1)]
        if rejected == n:  # every replica refused: as with one address, for good
            raise PeerRejected("\n".join(lines))
        raise ServiceUnavailable("\n".join(lines), attempts=attempts)

    async def _connect_managed(self, desc: ServiceDescription) -> _Hold:
        """``launcher = "systemd"``: connect, never launch (systemd owns the socket and starts the
        service on the first connection).  A failure names the units and how to inspect them."""
        if desc.url is not None:
            url = desc.url
            check_socket_url(url)
        else:
            path = socket_path(desc.name)
            if len(os.fsencode(str(path))) > _MAX_UNIX_PATH:
                raise ServiceUnavailable(
                    f"the socket path of service {desc.name!r} is too long for a Unix socket ({path}): "
                    "set XRPC_RUNTIME_DIR to a shorter directory"
                )
            # never talk to a socket another user could have put there; create nothing either
            fd = check_dir(path.parent, create=False)
            if fd is not None:
                os.close(fd)
            url = f"unix://{path}"
        self.url = url
        try:
            return await self._open(url)
        except TimeoutError as exc:  # (an OSError too)
            raise TimeoutError(systemd_hint(desc, url, exc, self._limits.handshake_timeout)) from exc
        except (TransportError, OSError) as exc:
            raise ServiceUnavailable(systemd_hint(desc, url, exc)) from exc

    async def _open(self, url: str) -> _Hold:
        hold = _Hold()
        await self._tg.start(self._run_hold, url, hold)
        return hold

    async def _run_hold(self, url: str, hold: _Hold, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with connect(
            url,
            exports=self._exports,
            timeout=self._limits.handshake_timeout,
            on_invalidated=functools.partial(self._conn_ended, hold),
            limits=self._limits,
            requirement=self._requirement,
            ssl_context=self._ssl_context,
            server_hostname=self._server_hostname,
        ) as conn:
            hold.conn = conn
            task_status.started()
            async with anyio.create_task_group() as tg:
                if self._heartbeat is not None:
                    tg.start_soon(self._beat, hold, self._heartbeat)
                if self._idle is not None:
                    tg.start_soon(self._disconnect_when_idle, hold, self._idle)
                await hold.ended.wait()
                tg.cancel_scope.cancel()

    # -------------------------------------------------------------- events
    def _conn_ended(self, hold: _Hold) -> None:
        """The underlying connection's ``on_invalidated`` (it fires once, whatever the cause)."""
        hold.ended.set()
        if hold.live and self._hold is hold:
            self._conn_lost(hold)

    def _conn_lost(self, hold: _Hold) -> None:
        if self._state != CONNECTED:
            return
        failure = hold.conn.failure if hold.conn is not None else None
        # one replica of several that turns the client away is lost like one that dies: the next
        # call goes to another (where a refusal at the handshake is passed over too)
        replicas = self.description is not None and len(self.description.urls) > 1
        if isinstance(failure, PeerRejected) and not replicas:
            self._invalidate(PeerRejected(f"service {self.name!r}: {failure}"), "rejected")
        elif hold.reason:
            self._fire(hold.reason)
        else:
            self._fire("peer_lost")

    def _invalidate(self, exc: BaseException, event: str) -> None:
        self._invalid = exc
        self._fire(event)

    def _fire(self, event: str) -> bool:
        new = TRANSITIONS.get((self._state, event))
        if new is None:
            return False
        log.debug("service %s: %s --%s--> %s", self.name, self._state, event, new)
        self._state = new
        callback = self._on_interrupted if new == INTERRUPTED else self._on_invalidated if new == INVALIDATED else None
        if callback is not None:
            event_callback(callback, f"service {self.name}")
        return True

    # -------------------------------------------------------------- keeping watch
    async def _beat(self, hold: _Hold, interval: float) -> None:
        """PING every ``interval``; no PONG within ``interval`` means a silent peer."""
        conn = hold.conn
        assert conn is not None
        while True:
            await anyio.sleep(interval)
            try:
                await conn.ping(timeout=interval)
            except TimeoutError:
                log.warning("service %s did not answer a heartbeat within %gs", self.name, interval)
                hold.reason = "heartbeat_missed"
                conn.interrupt(f"service {self.name!r} did not answer a heartbeat within {interval:g}s")
                return
            except Error:
                return

    async def _disconnect_when_idle(self, hold: _Hold, idle: float) -> None:
        conn = hold.conn
        assert conn is not None
        while True:
            wait = self._last_activity + idle - anyio.current_time()
            if wait > 0:
                await anyio.sleep(wait)
                continue
            if conn.in_flight:
                self._last_activity = anyio.current_time()
                continue
            hold.reason = "idle_disconnect"
            await conn.aclose()
            return


class _ServiceStream:
    """A stream call through a ``ServiceConnection``: it connects on the first iteration."""

    def __init__(self, sc: ServiceConnection, obj: str, m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> None:
        self._sc = sc
        self._call: tuple[str, Any, tuple[Any, ...], dict[str, Any]] | None = (obj, m, args, kwargs)
        self._timeout = timeout
        self._inner: Any = None
        self._done = False

    def __aiter__(self) -> _ServiceStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            inner = self._inner
            if inner is None:
                assert self._call is not None
                conn, remaining = await self._sc._acquire_within(self._timeout)
                obj, m, args, kwargs = self._call
                self._call = None
                conn.check_call(m, obj, args, kwargs)
                inner = self._inner = conn.call_stream(obj, m, args, kwargs, remaining)
            return await inner.__anext__()
        except BaseException:
            self._done = True
            self._sc._last_activity = anyio.current_time()
            raise

    async def aclose(self) -> None:
        self._done = True
        self._call = None
        if self._inner is not None:
            await self._inner.aclose()
        else:
            await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> _ServiceStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class _ServicePromise(PromiseBase):
    """The pending result of a call made through ``xrpc.pipeline(proxy)`` on a service connection.

    It behaves as ``Promise`` does: await it for the result; a method called on it is a call
    addressed to that result, sent without waiting for it.  The connection may not be there yet
    (launch on demand, reconnect), so a promise keeps its place in its chain and the chain is sent
    as soon as it can be: at once when connected, else on the first await of any of its promises,
    which connects first (within the timeout; the call gets what is left of it).  Each call is sent
    once, the first by the connection's ``call_pipelined`` and each next one as a method of the
    ``Promise`` before it, so the chain still costs one round trip.  A call that could not be sent
    fails every call chained on it with its error.  Passed as an argument, a promise whose call is
    not sent yet is sent first, on the connection the call carrying it goes to.
    """

    __slots__ = ("_sc", "_parent", "_m", "_call", "_timeout", "_sent", "_error")

    def __init__(
        self,
        sc: ServiceConnection,
        parent: _ServicePromise | None,
        m: MethodDescription,
        call: tuple[str, tuple[Any, ...], dict[str, Any]],
        timeout: float | None,
    ) -> None:
        if m.kind is not MethodKind.UNARY:
            raise TypeError(f"{m.qualname}: only unary calls can be pipelined")
        self._sc = sc
        self._parent = parent  # the promise whose result this call is addressed to (None: ``call[0]``)
        self._m = m
        self._call: tuple[str, tuple[Any, ...], dict[str, Any]] | None = call  # until sent
        self._timeout = timeout
        self._sent: Promise | None = None
        self._error: BaseException | None = None  # why it could not be sent
        conn = sc.connection
        self._send(conn if conn is not None and not conn.closed else None)

    def _send(self, conn: Connection | None) -> Promise | None:
        """Send this call, after the calls it is chained on that are not sent yet (the first of the
        chain on ``conn``; with None it waits for a connection).  Synchronous, so a chain is sent
        whole and in order, each call once, whoever asks first."""
        if self._sent is not None or self._error is not None:
            return self._sent
        assert self._call is not None
        obj, args, kwargs = self._call
        parent = self._parent
        try:
            if parent is None:
                if conn is None:
                    return None
                conn.check_call(self._m, obj, args, kwargs)  # against the version of the service running now
                self._sent = conn.call_pipelined(obj, self._m, args, kwargs, self._timeout)
            else:
                before = parent._send(conn)
                if before is None:
                    if parent._error is None:
                        return None  # nothing of the chain is sent yet
                    self._error = _clone(parent._error)
                else:
                    self._sent = getattr(before, self._m.name)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - kept for whoever awaits the promise
            self._error = exc
        self._call = None
        self._sc._last_activity = anyio.current_time()
        return self._sent

    def __await__(self) -> Any:
        return self._get().__await__()

    async def _get(self) -> Any:
        sc = self._sc
        limit: float | None = None
        if self._sent is None and self._error is None:
            conn, limit = await sc._acquire_within(self._timeout)
            self._send(conn)
        if self._error is not None:
            raise self._error
        sent = self._sent
        assert sent is not None
        try:
            if limit is None:
                return await sent
            with anyio.fail_after(limit):  # what is left of the timeout after connecting
                return await sent
        finally:
            sc._last_activity = anyio.current_time()

    def __getattr__(self, name: str) -> Callable[..., _ServicePromise]:
        m = pipelined_method(self._m, name)

        def call(*args: Any, **kwargs: Any) -> _ServicePromise:
            return _ServicePromise(self._sc, self, m, ("", args, kwargs), self._timeout)

        return call

    def __xrpc_argument__(self, caller: Any) -> tuple[str, InterfaceDescription, Any]:
        conn = self._sc.connection
        sent = self._send(conn if conn is not None and not conn.closed else None)
        if sent is None:
            if self._error is not None:
                raise ValueError(f"a promise of {self._m.qualname} whose call could not be sent ({self._error!r})")
            raise ValueError(f"a promise of {self._m.qualname} whose call is not sent yet (the service is not connected)")
        return sent.__xrpc_argument__(caller)


class ServiceOptions(TypedDict, total=False):
    """The keywords of ``connect_service``: those of ``ServiceConnection``, which has their defaults."""

    search_path: Sequence[str | os.PathLike[str]] | None
    exports: Sequence[Any]
    timeout: float | None
    on_interrupted: Callable[[], Any] | None
    on_invalidated: Callable[[], Any] | None
    heartbeat: float | None
    disconnect_when_idle: float | None
    limits: Limits | None
    requirement: Any
    ssl_context: Any
    server_hostname: str | None


@contextlib.asynccontextmanager
async def connect_service(name: str, **options: Unpack[ServiceOptions]) -> AsyncIterator[ServiceConnection]:
    """Yield a ``ServiceConnection`` to the service ``name`` for the block.

    ``options`` are the keywords of ``ServiceConnection`` (all optional).  The description is
    looked up now (``ServiceNotFound`` otherwise); the service is connected to, and launched if
    nothing listens, on the first call.  ``exports`` are in place before every handshake, so a
    service whose ``on_connect`` calls back loses nothing.  ``timeout`` bounds connecting,
    launching included (default: the description's ``launch_timeout`` plus the handshake
    timeout).  ``on_interrupted`` fires once per lost connection (the next call reconnects);
    ``on_invalidated`` once, when the connection is closed for good.  ``heartbeat`` (seconds) PINGs
    the service on that interval and treats a missing answer as an interruption.
    ``disconnect_when_idle`` (seconds) closes the underlying connection when nothing was in flight
    for that long, so that the service may exit when idle.  ``search_path`` replaces the default
    search path.  A description with a ``url`` names a service on another host (``tls://``): it is
    connected to (with ``ssl_context``/``server_hostname``) and reconnected, never launched.  With
    ``urls`` (several addresses) each connection goes to the first that answers, in the order its
    ``failover`` policy says, and a connection that is interrupted is replaced by one to another
    address at the next call.  With ``launcher = "systemd"`` the service is only connected to:
    systemd owns its socket and starts it.
    """
    unknown = sorted(options.keys() - ServiceOptions.__optional_keys__)
    if unknown:
        raise TypeError(f"connect_service() got an unexpected keyword argument {unknown[0]!r}")
    description = find_service(name, options.get("search_path"))
    body_exc: BaseException | None = None
    async with anyio.create_task_group() as tg:
        sc = ServiceConnection(description, tg, **options)
        try:
            yield sc
        except BaseException as exc:  # re-raised below, outside the task group
            body_exc = exc
        finally:
            with anyio.CancelScope(shield=True):
                await sc.aclose()
            tg.cancel_scope.cancel()
    if body_exc is not None:
        raise body_exc


# --------------------------------------------------------------------------- the service side
class _ConnectionSet(set):  # type: ignore[type-arg]
    """``Server.connections`` that wakes a waiter whenever a connection comes or goes."""

    def __init__(self, items: Any = ()) -> None:
        super().__init__(items)
        self._changed: anyio.Event | None = None

    def add(self, item: Any) -> None:
        super().add(item)
        self._notify()

    def discard(self, item: Any) -> None:
        super().discard(item)
        self._notify()

    def remove(self, item: Any) -> None:
        super().remove(item)
        self._notify()

    def _notify(self) -> None:
        ev = self._changed
        if ev is not None:
            self._changed = None
            ev.set()

    async def changed(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()


def _busy(conns: set[Connection]) -> bool:
    return any(c.in_flight for c in conns)


def _signal_ready(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.write(fd, b"ready\n")
    except OSError:
        pass  # the launcher gave up waiting; serve anyway
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _env_float(key: str) -> float | None:
    value = os.environ.get(key)
    return float(value) if value else None


_UNSET: Any = object()


async def serve_service(
    server: Server,
    name: str | None = None,
    *,
    socket_file: str | os.PathLike[str] | None = None,
    idle_exit: float | None = _UNSET,
    ready_fd: int | None = _UNSET,
    lock: str | os.PathLike[str] | None = None,
    drain_timeout: float = 10.0,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``server`` as the service ``name`` until it is time to exit; then return.

    Defaults come from what the launcher puts in the environment (``XRPC_SERVICE_NAME``,
    ``XRPC_SERVICE_SOCKET``, ``XRPC_IDLE_EXIT``, ``XRPC_READY_FD``, ``XRPC_SERVICE_LOCK``), so a
    ``command`` service written in Python only calls ``await serve_service(server)``.

    Once listening it writes ``ready`` on the readiness pipe.  It returns after ``idle_exit``
    seconds without any connection, or on SIGTERM/SIGINT: it stops listening at once (under the
    launch lock, so that a new instance can take over the socket path), lets the calls in flight
    finish (at most ``drain_timeout`` seconds; a second signal cuts this short), then closes the
    remaining connections, which their clients see as an interruption.

    Started by systemd's socket activation (``LISTEN_FDS``) and without ``socket_file``, it serves
    the inherited sockets named ``name`` or ``name.socket``, else every inherited socket; stopping
    then only stops accepting (the socket unit keeps listening, and connections that arrive
    meanwhile wait for the next instance).  Under a service manager it reports ``READY=1``,
    ``STATUS=``, ``STOPPING=1`` and watchdog pings through ``$NOTIFY_SOCKET``.
    """
    name = name or os.environ.get("XRPC_SERVICE_NAME")
    if not name:
        raise ValueError("serve_service() needs the service name (or XRPC_SERVICE_NAME in the environment)")
    _check_name(name)
    url = _activation_url(name) if socket_file is None else None
    if url is None:
        sock = Path(socket_file or os.environ.get("XRPC_SERVICE_SOCKET") or _socket_file(name))
        _private_dir(sock.parent)
        url = f"unix://{sock}"
        lockp = Path(lock or os.environ.get("XRPC_SERVICE_LOCK") or lock_path(name))
    else:
        lockp = Path(lock or os.devnull)  # never taken: the inherited sockets stay open in the manager
    if idle_exit is _UNSET:
        idle_exit = _env_float("XRPC_IDLE_EXIT")
    if ready_fd is _UNSET:
        value = os.environ.pop("XRPC_READY_FD", "")
        ready_fd = int(value) if value else None
    conns = _ConnectionSet(server.connections)
    server.connections = conns
    try:
        async with server.listen(url) as listener:
            _signal_ready(ready_fd)
            ready_fd = None
            task_status.started(listener.url)
            async with service_lifecycle(f"serving {name} on {listener.url}"):
                await _serve_until_stopped(listener, conns, idle_exit, lockp, drain_timeout)
    finally:
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.close(ready_fd)


def _activation_url(name: str) -> str | None:
    """With sockets passed by the service manager: ``systemd:NAME`` when one is named for the
    service (``FileDescriptorName=NAME``, or the default, the socket unit's name ``NAME.socket``),
    else ``systemd:`` (all of them).  None without socket activation."""
    passed = inherited_sockets()  # raises if LISTEN_FDS is set for another process, or malformed
    if not passed:
        return None
    names = {n for _, n in passed}
    for candidate in (name, f"{name}.socket"):
        if candidate in names:
            return f"systemd:{candidate}"
    return "systemd:"


@contextlib.asynccontextmanager
async def _stop_listening(listener: Any, lockp: Path) -> AsyncIterator[None]:
    """Hold what keeps a new instance from starting while this one stops listening: the launch
    lock, or nothing for inherited sockets (they stay open in the manager)."""
    if isinstance(listener, ActivatedListener):
        yield
    else:
        async with _locked(lockp):
            yield


async def _serve_until_stopped(listener: Any, conns: _ConnectionSet, idle_exit: float | None, lockp: Path, drain_timeout: float) -> None:
    stopping = anyio.Event()
    idle = False
    async with anyio.create_task_group() as tg:

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for _ in received:
                    if stopping.is_set():
                        tg.cancel_scope.cancel()  # a second signal: stop waiting for the calls in flight
                        return
                    async with _stop_listening(listener, lockp):
                        await listener.aclose()
                    sd_notify("STOPPING=1", "STATUS=stopping: finishing the calls in flight")
                    stopping.set()

        async def on_idle() -> None:
            nonlocal idle
            assert idle_exit is not None
            await _idle_watch(listener, conns, idle_exit, lockp)
            idle = True
            sd_notify("STOPPING=1", "STATUS=idle: exiting")
            stopping.set()

        tg.start_soon(on_signals)
        if idle_exit is not None:
            tg.start_soon(on_idle)
        await stopping.wait()
        with anyio.move_on_after(drain_timeout):
            while _busy(conns):  # no hook tells when a connection's last call ends
                await anyio.sleep(0.02)
        if idle and isinstance(listener, ActivatedListener):
            # a connection accepted just before the listener closed is served to its end (its
            # client may not have sent anything yet); a signal still cuts this short
            while conns:
                await conns.changed()
        tg.cancel_scope.cancel()


async def _idle_watch(listener: Any, conns: _ConnectionSet, idle_exit: float, lockp: Path) -> None:
    """Return once the service had no connection for ``idle_exit`` seconds and stopped listening."""
    while True:
        while conns:
            await conns.changed()
        with anyio.move_on_after(idle_exit) as quiet:
            await conns.changed()
        if not quiet.cancelled_caught:
            continue
        if isinstance(listener, ActivatedListener):
            if listener.pending():
                # a connection waits in the backlog: it is this instance's to serve
                with anyio.move_on_after(max(idle_exit, 0.1)):
                    await conns.changed()
                continue
            # Stop accepting; the inherited socket stays open in the manager, so a connection that
            # arrives from now on waits in its backlog for the next instance.
            await listener.aclose()
            await anyio.lowlevel.checkpoint()  # a connection accepted just before registers now
            return
        async with _locked(lockp):
            if conns:
                continue  # a client got in while we waited for the lock
            # No await between the check and the close: no connection can be accepted in between.
            # Clients still in the kernel's backlog see their handshake fail and retry.
            await listener.aclose()
            return


def load_server(spec: str) -> Any:
    """Import ``package.module:attr`` and return the ``xrpc.Server`` it is or makes (maybe awaitable)."""
    modname, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(modname)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, Server):
        return obj
    if callable(obj):
        return obj()
    raise ServiceDescriptionError(f"{spec} is neither an xrpc.Server nor a function returning one")


class _ReadyPipe:
    """The readiness pipe's write end, until it is handed over (so nobody writes to a reused fd)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def take(self) -> int | None:
        fd, self.fd = self.fd, None
        return fd

    def fail(self, message: str) -> None:
        fd = self.take()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, b"error " + message.replace("\n", " ").encode()[:4000] + b"\n")
            with contextlib.suppress(OSError):
                os.close(fd)


async def _run_module_service(desc: ServiceDescription, socket_arg: str | None, ready: _ReadyPipe) -> None:
    assert desc.module is not None
    server = load_server(desc.module)
    if inspect.isawaitable(server):
        server = await server
    if not isinstance(server, Server):
        raise ServiceDescriptionError(f"{desc.module} returned {type(server).__qualname__}, not an xrpc.Server")
    await serve_service(server, desc.name, socket_file=socket_arg, idle_exit=desc.idle_exit, ready_fd=ready.take())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xrpc.service NAME``: run the ``module`` service NAME until it exits."""
    parser = argparse.ArgumentParser(
        prog="python -m xrpc.service",
        description="Run an xrpc service described by NAME.toml / NAME.json (a 'module' service).",
    )
    parser.add_argument("name", help="the service name, e.g. com.example.indexer")
    parser.add_argument("--description", help="the description file (default: look NAME up on the search path)")
    parser.add_argument("--socket", help="the socket path (default: the per-user socket of NAME)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("XRPC_LOG_LEVEL", "WARNING"), format="%(name)s[%(process)d] %(levelname)s %(message)s")
    value = os.environ.pop("XRPC_READY_FD", "")
    ready = _ReadyPipe(int(value) if value else None)

    def fail(message: str, code: int) -> int:
        print(f"xrpc.service: {message}", file=sys.stderr, flush=True)
        ready.fail(message)
        return code

    try:
        desc = load_description(args.description) if args.description else find_service(args.name)
        if desc.name != args.name:
            return fail(f"{desc.path} describes {desc.name!r}, not {args.name!r}", 2)
        if desc.module is None:
            return fail(f"{desc.path}: {desc.name!r} is a 'command' service; python -m xrpc.service runs 'module' services", 2)
        if desc.launcher == "systemd" and args.socket is None and not inherited_sockets():
            return fail(
                f"{desc.path}: {desc.name!r} is started by systemd (launcher = \"systemd\"), which owns its socket: "
                f"run `{systemctl(desc, 'start', desc.name + '.socket')}` (systemd then starts {desc.name}.service on the "
                "first connection), or give --socket PATH to run it by hand elsewhere",
                2,
            )
        anyio.run(_run_module_service, desc, args.socket, ready)
    except TransportError as exc:
        return fail(f"{args.name}: {exc}", 3)  # e.g. another instance already listens
    except Error as exc:
        return fail(str(exc), 2)
    except Exception as exc:
        traceback.print_exc()
        return fail(f"{args.name}: {type(exc).__name__}: {exc}", 1)
    return 0
