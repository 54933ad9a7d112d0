"""Running under systemd (or anything that speaks its protocols): socket activation and readiness.

Theory of operation
-------------------
*Socket activation*: the manager binds and listens, then starts the service with the listening
sockets as descriptors 3, 4, ... and ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (the pid they are
for: ours, or they belong to a parent whose environment we inherited) and ``LISTEN_FDNAMES``
(colon-separated names: ``FileDescriptorName=``, by default the socket unit's name).
``inherited_sockets()`` reads that once per process, marks the descriptors close-on-exec and takes
the variables out of the environment, so that no child process believes they are its own.

A listen URL ``systemd:`` means every inherited socket, ``systemd:NAME`` (or ``systemd://NAME``)
the ones named NAME; a ``unix://`` or ``tcp://`` URL whose address is that of an inherited socket
adopts it instead of binding a new one.  Each descriptor is checked before use: a socket, listening,
of a stream type and of the family the URL implies; anything else raises ``SocketActivationError``
naming the descriptor and what it is.  The server listens on a duplicate of the descriptor, so
closing the listener stops accepting but the socket itself stays open in the manager (Accept=no):
connections that arrive meanwhile wait in its backlog for the next instance.

*Readiness*: ``sd_notify("READY=1")`` and friends send one datagram to ``$NOTIFY_SOCKET`` (a path,
or ``@name`` for an abstract socket).  With ``WATCHDOG_USEC`` set (and ``WATCHDOG_PID`` ours or
unset), ``watchdog()`` sends ``WATCHDOG=1`` every half period from the event loop, so a loop that
hangs stops the pings.  Without ``NOTIFY_SOCKET`` all of this does nothing.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
from dataclasses import dataclass
from typing import AsyncIterator, Mapping, Sequence

import anyio

from ._errors import TransportError
from ._transports import Handler, Listener, ParsedURL, SocketListener

__all__ = (
    "LISTEN_FDS_START",
    "ActivatedListener",
    "InheritedSocket",
    "SocketActivationError",
    "activation_name",
    "check_socket",
    "inherited_sockets",
    "is_activation_url",
    "open_activated",
    "adopt_inherited",
    "parse_listen_env",
    "sd_notify",
    "service_lifecycle",
    "watchdog",
    "watchdog_interval",
)

LISTEN_FDS_START = 3
SCHEME = "systemd"
_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SocketActivationError(TransportError):
    """The sockets passed by the service manager cannot be used as asked: none were passed, none has
    the name asked for, or a descriptor is not a listening stream socket of the expected family."""


@dataclass(frozen=True)
class InheritedSocket:
    """A listening socket passed by the service manager, checked."""

    fd: int
    name: str
    family: int
    url: str  # where clients reach it: unix:///path, tcp://host:port (informational for abstract sockets)

    @property
    def transport(self) -> str:
        return "unix" if self.family == socket.AF_UNIX else "tcp"


def parse_listen_env(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """``(fd, name)`` for each descriptor passed to process ``pid`` (empty if none).

    Raises ``SocketActivationError`` for malformed variables, or sockets passed to another process.
    """
    fds_text = environ.get("LISTEN_FDS")
    if fds_text is None:
        return []
    pid_text = environ.get("LISTEN_PID")
    if pid_text is None:
        raise SocketActivationError(
            f"LISTEN_FDS={fds_text} is set but LISTEN_PID is not: the service manager must say which process the sockets are for"
        )
    try:
        if not (pid_text.isascii() and pid_text.isdigit()):  # int() takes " 3", "+3", "3_0" and "٣"
            raise ValueError(pid_text)
        listen_pid = int(pid_text)
    except ValueError:
        raise SocketActivationError(f"LISTEN_PID={pid_text!r} is not a process id") from None
    if listen_pid != pid:
        raise SocketActivationError(
            f"LISTEN_PID={listen_pid} names another process (this is {pid}): the sockets in LISTEN_FDS were passed to it, "
            "not to this one (an environment inherited from a parent, or a wrapper that did not exec the service)"
        )
    try:
        if not (fds_text.isascii() and fds_text.isdigit()):  # int() takes " 3", "+3", "3_0" and "٣"
            raise ValueError(fds_text)
        count = int(fds_text)
    except ValueError:
        raise SocketActivationError(f"LISTEN_FDS={fds_text!r} is not a number of descriptors") from None
    if not 0 <= count <= 4096:
        raise SocketActivationError(f"LISTEN_FDS={count} is out of range")
    names_text = environ.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text is not None else []
    if names_text is not None and len(names) != count:
        raise SocketActivationError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} descriptors: {names_text!r}")
    if not names:
        names = ["unknown"] * count  # what sd_listen_fds_with_names() reports without LISTEN_FDNAMES
    return [(LISTEN_FDS_START + i, names[i]) for i in range(count)]


_FAMILIES: dict[int, str] = {socket.AF_UNIX: "unix (AF_UNIX)", socket.AF_INET: "IPv4 (AF_INET)", socket.AF_INET6: "IPv6 (AF_INET6)"}


def _what(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a socket"


def _url_of(family: int, address: object) -> str:
    if family == socket.AF_UNIX:
        if isinstance(address, bytes):  # abstract (leading NUL) or unnamed
            text = address.lstrip(b"\0").decode(errors="replace")
            return f"unix://@{text}" if address.startswith(b"\0") else f"unix://{text}"
        return f"unix://{address}"
    assert isinstance(address, tuple)
    host, port = str(address[0]), int(address[1])
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def check_socket(fd: int, name: str = "", *, families: Sequence[int] | None = None) -> InheritedSocket:
    """Check that ``fd`` is a listening stream socket (of one of ``families``, default unix, IPv4, IPv6)."""
    label = f"descriptor {fd}" + (f" ({name!r} in LISTEN_FDNAMES)" if name and name != "unknown" else "")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise SocketActivationError(f"{label} passed by the service manager is not open: {exc.strerror or exc}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketActivationError(f"{label} is {_what(st.st_mode)}, not a socket")
    sock = socket.socket(fileno=os.dup(fd))
    try:
        family, kind = int(sock.family), int(sock.type)
        wanted = tuple(families) if families is not None else tuple(_FAMILIES)
        if family not in wanted:
            has = _FAMILIES.get(family, f"family {int(family)}")
            expected = " or ".join(_FAMILIES.get(f, str(f)) for f in wanted)
            raise SocketActivationError(f"{label} is a {has} socket; expected {expected}")
        if kind != socket.SOCK_STREAM:
            kind_name = {int(socket.SOCK_DGRAM): "datagram", int(socket.SOCK_SEQPACKET): "seqpacket"}.get(kind, f"type {kind}")
            raise SocketActivationError(f"{label} is a {kind_name} socket; xrpc needs a stream socket (ListenStream=)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise SocketActivationError(
                f"{label} is a socket that is not listening (a connection? with Accept=yes the manager passes one "
                "connection per process; xrpc serves many connections in one process: use Accept=no)"
            )
        url = _url_of(family, sock.getsockname())
    finally:
        sock.close()
    return InheritedSocket(fd=fd, name=name, family=family, url=url)


# The descriptors passed to this process: (pid, [(fd, name)]) once read, or the error reading them gave.
_state: tuple[int, list[tuple[int, str]] | SocketActivationError] | None = None


def inherited_sockets() -> list[tuple[int, str]]:
    """``(fd, name)`` of the descriptors the service manager passed to this process (read once; the
    variables are then removed from the environment).  Raises ``SocketActivationError`` if they were
    passed to another process or are malformed."""
    global _state
    pid = os.getpid()
    if _state is None or _state[0] != pid:
        found: list[tuple[int, str]] | SocketActivationError
        try:
            passed = parse_listen_env(os.environ, pid)
        except SocketActivationError as exc:
            found = exc
        else:
            for fd, _ in passed:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
            for var in _VARS:
                os.environ.pop(var, None)
            found = passed
        _state = (pid, found)
    found = _state[1]
    if isinstance(found, SocketActivationError):
        raise found
    return list(found)


def is_activation_url(url: str) -> bool:
    return url.split(":", 1)[0] == SCHEME and ":" in url


def activation_name(url: str) -> str:
    """``systemd:NAME`` / ``systemd://NAME`` -> NAME (empty: every inherited socket)."""
    rest = url.split(":", 1)[1]
    return rest[2:] if rest.startswith("//") else rest


class ActivatedListener(Listener):
    """Listens on sockets the service manager passed; closing it stops accepting, and leaves the
    sockets open (the manager keeps listening on them)."""

    def __init__(self, url: str, sockets: Sequence[InheritedSocket], *, tls: bool = False) -> None:
        self.sockets = list(sockets)
        self.requested = url
        self.parts: list[SocketListener] = []
        for s in self.sockets:
            sock = socket.socket(fileno=os.dup(s.fd))
            sock.setblocking(False)
            transport = "tls" if tls and s.transport == "tcp" else s.transport
            where = "tls" + s.url[3:] if transport == "tls" else s.url
            self.parts.append(SocketListener(sock, where, transport))
        self.url = self.parts[0].url
        self.urls = [p.url for p in self.parts]

    def pending(self) -> bool:
        """Whether a connection waits in a socket's backlog (there still after this listener closes)."""
        poller = select.poll()
        for s in self.sockets:
            poller.register(s.fd, select.POLLIN)
        return bool(poller.poll(0))

    async def serve(self, handler: Handler) -> None:
        async with anyio.create_task_group() as tg:
            for part in self.parts:
                tg.start_soon(part.serve, handler)

    async def aclose(self) -> None:
        for part in self.parts:
            await part.aclose()


def open_activated(url: str, *, tls: bool = False) -> ActivatedListener:
    """The listener for ``systemd:`` / ``systemd:NAME``: the inherited sockets, checked (TCP ones
    only with ``tls``)."""
    name = activation_name(url)
    passed = inherited_sockets()
    if not passed:
        raise SocketActivationError(
            f"{url}: no socket was passed to this process (LISTEN_FDS is not set): start it from a systemd socket unit "
            "or systemd-socket-activate, or listen on a unix:// or tcp:// URL"
        )
    chosen = [(fd, n) for fd, n in passed if not name or n == name]
    if not chosen:
        names = ", ".join(sorted({n for _, n in passed}))
        raise SocketActivationError(
            f"{url}: no inherited socket is named {name!r} (the names passed are: {names}); "
            "set FileDescriptorName= in the socket unit, or listen on systemd: for every inherited socket"
        )
    families = (socket.AF_INET, socket.AF_INET6) if tls else None
    return ActivatedListener(url, [check_socket(fd, n, families=families) for fd, n in chosen], tls=tls)


def adopt_inherited(url: str) -> ActivatedListener | None:
    """The inherited socket bound to the address of ``url`` (unix://, tcp://, tls://), if there is
    one, checked; else None (also when this process was not socket-activated)."""
    try:
        passed = inherited_sockets()
    except SocketActivationError:
        return None
    if not passed:
        return None
    u = ParsedURL(url)
    if u.scheme not in ("unix", "tcp", "tls") or (u.scheme != "unix" and not u.port):
        return None
    transport = "unix" if u.scheme == "unix" else "tcp"
    address: object = u.path if u.scheme == "unix" else (u.host, u.port)
    families = (socket.AF_UNIX,) if transport == "unix" else (socket.AF_INET, socket.AF_INET6)
    for fd, name in passed:
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.family not in families:
                continue
            here = sock.getsockname()
        except OSError:
            continue
        finally:
            sock.close()
        if transport == "unix":
            same = isinstance(here, str) and os.path.abspath(here) == os.path.abspath(str(address))
        else:
            assert isinstance(address, tuple)
            same = isinstance(here, tuple) and here[1] == address[1] and _same_host(str(here[0]), str(address[0]))
        if same:
            return ActivatedListener(url, [check_socket(fd, name, families=families)], tls=u.scheme == "tls")
    return None


def _same_host(a: str, b: str) -> bool:
    any_host = {"0.0.0.0", "::", ""}
    return a == b or (a in any_host and b in any_host)


# --------------------------------------------------------------------------- readiness
def _notify_address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])  # as the environment held it, not UTF-8 only
    return value


def sd_notify(*fields: str) -> bool:
    """Send ``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1``... (one datagram, fields
    joined by newlines) to ``$NOTIFY_SOCKET``, without ever waiting (a receiver whose queue is full
    gets nothing).  Returns whether it was sent; without
    ``NOTIFY_SOCKET`` (not run by a service manager) it does nothing and returns False."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or not fields:
        return False
    if not (target.startswith("/") or target.startswith("@")):
        return False  # e.g. vsock: addresses, not for a local service
    data = "\n".join(fields).encode("utf-8", "surrogateescape")  # a path as the file system spells it
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            # never wait: this runs on the event loop, and a receiver that does not read (its queue
            # full) would otherwise stop the whole service; the message is dropped instead
            s.sendto(data, socket.MSG_DONTWAIT, _notify_address(target))
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when the manager
    expects none from this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not os.environ.get("NOTIFY_SOCKET"):
        return None
    wpid = os.environ.get("WATCHDOG_PID")
    if wpid and wpid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if not 0 < value < 2**64:  # systemd's microseconds are 64 bits; anything else is no period
        return None
    return value / 2e6


async def watchdog() -> None:
    """Ping the watchdog every half period until cancelled (returns at once if none is asked)."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        sd_notify("WATCHDOG=1")
        await anyio.sleep(interval)


@contextlib.asynccontextmanager
async def service_lifecycle(status: str = "") -> AsyncIterator[None]:
    """``READY=1`` (with ``STATUS=status``) now, watchdog pings during the block, ``STOPPING=1``
    when it ends.  Does nothing outside a service manager."""
    if not os.environ.get("NOTIFY_SOCKET"):
        yield
        return
    status = status.replace("\n", "\\n")  # a newline would start another field (a path may hold one)
    sd_notify("READY=1", *([f"STATUS={status}"] if status else []))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchdog)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        sd_notify("STOPPING=1")
