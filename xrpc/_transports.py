"""Transports: from a URL to an anyio byte stream and the ``Peer`` behind it.

Theory of operation
-------------------
Unix and TCP connections are handed to the runtime as connected non-blocking sockets, so that on
asyncio it can drive them with a ``BufferedProtocol`` (no per-read allocation, synchronous coalesced
writes), and elsewhere wrap them as anyio socket streams.  In-process (memory) connections are anyio
byte streams.  ``connect_stream(url)`` opens one; ``open_listener(url)`` returns a ``Listener`` that
hands ``(transport, peer)`` pairs to a handler.  OS and anyio errors stop here: they leave as ``TransportError`` with
the URL in the message.

URLs: ``unix:///abs/path.sock``, ``tcp://host:port``, ``memory://name`` (in this process only).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import pwd
import re
import signal
import socket
import stat
import struct
import urllib.parse
from typing import Any, Callable, Coroutine

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import TransportError
from ._peer import Peer, pidfd_from
from ._protocol import ErrorCode, Goodbye

log = logging.getLogger("xrpc")

__all__ = ("Endpoint", "ParsedURL", "parse_url", "connect_stream", "open_listener", "Listener", "MemoryByteStream", "socket_peer", "Transport")


_CONTROL = re.compile("[\x00-\x1f\x7f]")


class ParsedURL:
    __slots__ = ("scheme", "host", "port", "path", "name", "raw")

    def __init__(self, raw: str) -> None:
        self.raw = raw
        if _CONTROL.search(raw) is not None:
            # urlsplit silently drops tabs and newlines, which would name another socket or host
            raise ValueError(f"{raw!r}: a URL holds no control characters (percent-encode them in a unix path)")
        u = urllib.parse.urlsplit(raw)
        self.scheme = u.scheme
        self.host = ""
        self.port = 0
        self.path = ""
        self.name = ""
        if u.scheme == "unix":
            if u.netloc:
                # unix://x/y reads as the relative path x/y, which is rarely what was meant
                rel = urllib.parse.unquote(u.netloc + u.path)
                raise ValueError(
                    f"{raw!r}: the path after unix:// is relative ({rel!r}): write unix:///{rel} for the "
                    f"absolute path /{rel}, or unix:{rel} for a path relative to the current directory"
                )
            try:  # not the default errors="replace", which would turn %ff into another path
                self.path = urllib.parse.unquote(u.path, errors="strict")
            except UnicodeDecodeError:
                raise ValueError(f"{raw!r}: the percent-encoded path is not UTF-8") from None
            if not self.path:
                raise ValueError(f"{raw!r}: a unix URL needs a path (unix:///abs/path.sock)")
            if "\0" in self.path:
                raise ValueError(f"{raw!r}: a unix socket path holds no NUL character")
        elif u.scheme in ("tcp", "tls"):
            if not u.hostname:
                raise ValueError(f"{raw!r}: a {u.scheme} URL needs a host (tcp://127.0.0.1:0)")
            self.host = u.hostname
            try:
                port = u.port
            except ValueError as exc:
                raise ValueError(f"{raw!r}: {exc}") from None
            if port is None:
                raise ValueError(f"{raw!r}: a {u.scheme} URL needs a port ({u.scheme}://{u.hostname}:PORT; port 0 listens on a free one)")
            self.port = port
        elif u.scheme == "memory":
            self.name = u.netloc + u.path
            if not self.name:
                raise ValueError(f"{raw!r}: a memory URL needs a name (memory://name)")
        else:
            raise ValueError(f"{raw!r}: unsupported scheme {u.scheme!r} (use unix://, tcp://, tls:// or memory://)")


def parse_url(url: str) -> ParsedURL:
    return ParsedURL(url)


# --------------------------------------------------------------------------- memory transport
class MemoryByteStream(anyio.abc.ByteStream):
    """One end of an in-process byte pipe (chunks keep their boundaries, which is allowed)."""

    def __init__(self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]) -> None:
        self._send = send
        self._receive = receive

    @classmethod
    def pair(cls, buffer: int = 8) -> tuple[MemoryByteStream, MemoryByteStream]:
        a_send, b_receive = anyio.create_memory_object_stream[bytes](buffer)
        b_send, a_receive = anyio.create_memory_object_stream[bytes](buffer)
        return cls(a_send, a_receive), cls(b_send, b_receive)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise
        except anyio.ClosedResourceError:
            raise

    async def send(self, item: bytes) -> None:
        try:
            await self._send.send(bytes(item))
        except anyio.BrokenResourceError:
            raise

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


Handler = Callable[[Any, Peer], Coroutine[Any, Any, None]]
_memory_listeners: dict[str, MemoryListener] = {}


# --------------------------------------------------------------------------- listeners
class Endpoint(msgspec.Struct, frozen=True):
    """Where a listener can be reached (NSXPCListenerEndpoint): plain data, so it can travel as an
    argument or a reply; ``xrpc.connect(endpoint)`` connects to it."""

    url: str


class Listener:
    """A bound listening endpoint; ``serve(handler)`` runs ``handler(stream, peer)`` per connection."""

    url: str

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.url)

    async def serve(self, handler: Handler) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class MemoryListener(Listener):
    def __init__(self, name: str) -> None:
        self.name = name
        self.url = f"memory://{name}"
        self._send, self._receive = anyio.create_memory_object_stream[MemoryByteStream](64)

    async def serve(self, handler: Handler) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await self._receive.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
                tg.start_soon(handler, stream, Peer.this_process("memory", self.url))

    async def accept_from_client(self) -> MemoryByteStream:
        mine, theirs = MemoryByteStream.pair()
        try:
            self._send.send_nowait(theirs)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise TransportError(f"{self.url}: the listener does not accept connections") from None
        return mine

    async def aclose(self) -> None:
        if _memory_listeners.get(self.name) is self:
            del _memory_listeners[self.name]
        self._send.close()
        self._receive.close()


def _goodbye_frame(reason: str, code: int) -> bytes:
    body = msgspec.msgpack.encode(Goodbye(reason, code))
    return len(body).to_bytes(4, "big") + body


# What a connection accepted while the process is out of descriptors gets, before it is closed.
_OUT_OF_FDS = _goodbye_frame("the server is at its file descriptor limit: try again later", ErrorCode.LIMIT)


def _reserve_fd() -> int | None:
    """A spare descriptor, given up to accept (and refuse) a connection when the table is full."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class SocketListener(Listener):
    """A listening Unix or TCP socket; connections are handed over as raw connected sockets.

    Out of descriptors (EMFILE/ENFILE on accept), it keeps a spare one to accept each waiting
    connection and close it at once with a GOODBYE that says why, instead of leaving clients hanging
    in the backlog; it warns once per such episode, and waits (a short timer, doubling up to a
    second) only when even the spare is gone, or when ``on_starved`` says that another process
    accepting on the same socket has descriptors left (the connection is then left to it).
    """

    def __init__(
        self, sock: socket.socket, url: str, transport: str, cleanup: str | None = None, inode: tuple[int, int] | None = None
    ) -> None:
        self._sock = sock
        self.url = url
        self._transport = transport
        self._cleanup = cleanup
        self._closed = False
        self._reserve = _reserve_fd()
        self._starved = False  # out of descriptors since the last connection accepted
        self._backoff = 0.05
        self._inode: tuple[int, int] | None = inode
        # Asked before each accept: how long to leave a waiting connection to someone else
        # accepting on the same socket (0: accept it now).  Worker processes balance with it.
        self.accept_gate: Callable[[], float] | None = None
        # Told when accepting runs out of descriptors (True) and when it accepts again (False);
        # answers whether to refuse the waiting connection here (False: another process accepting
        # on the same socket has descriptors to spare, so leave the connection to it).
        self.on_starved: Callable[[bool], bool] | None = None
        if cleanup and inode is None:
            try:
                st = os.lstat(cleanup)
                self._inode = (st.st_dev, st.st_ino)
            except OSError:
                self._inode = None

    def fileno(self) -> int:
        """The listening socket's descriptor (to hand to worker processes that accept on it too)."""
        return self._sock.fileno()

    async def serve(self, handler: Handler) -> None:
        lsock = self._sock
        async with anyio.create_task_group() as tg:
            while not self._closed:
                try:
                    await anyio.wait_readable(lsock)
                except (anyio.ClosedResourceError, OSError, ValueError):
                    return
                gate = self.accept_gate
                if gate is not None:
                    delay = gate()
                    if delay > 0:
                        await anyio.sleep(delay)
                        continue
                try:
                    conn, _ = lsock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        await self._out_of_descriptors(exc)
                        continue
                    if exc.errno in (errno.ENOBUFS, errno.ENOMEM):
                        await anyio.sleep(0.05)  # out of memory: back off instead of spinning
                        continue
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                        continue
                    return
                if self._starved:
                    self._starved, self._backoff = False, 0.05
                    log.warning("%s: accepting connections again", self.url)
                    if self.on_starved is not None:
                        self.on_starved(False)
                    if self._reserve is None:
                        self._reserve = _reserve_fd()
                conn.setblocking(False)
                try:
                    peer = socket_peer(conn, self._transport)
                except OSError:
                    conn.close()
                    continue
                tg.start_soon(handler, conn, peer)

    async def _out_of_descriptors(self, exc: OSError) -> None:
        """Refuse the next waiting connection cleanly, with the spare descriptor; without one, wait."""
        if not self._starved:
            self._starved = True
            log.warning(
                "%s: at the descriptor limit (%s): refusing new connections until descriptors are freed",
                self.url,
                exc.strerror,
            )
        shared = self.on_starved is not None and not self.on_starved(True)
        if self._reserve is not None and not shared:
            os.close(self._reserve)
            self._reserve = None
            try:
                conn, _ = self._sock.accept()
            except OSError:
                conn = None
            if conn is not None:
                try:
                    conn.setblocking(False)
                    conn.send(_OUT_OF_FDS)
                except OSError:
                    pass
                conn.close()
            self._reserve = _reserve_fd()
            if conn is not None and self._reserve is not None:
                return  # one refused; the next one waiting (if any) is the loop's
        await anyio.sleep(self._backoff)  # nothing spare: wait a little for a descriptor to be freed
        self._backoff = min(self._backoff * 2, 1.0)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        try:
            anyio.notify_closing(self._sock)
        except Exception:
            pass
        self._sock.close()
        if self._cleanup and self._inode is not None:
            try:
                st = os.lstat(self._cleanup)
                if (st.st_dev, st.st_ino) == self._inode:  # never remove another server's socket
                    os.unlink(self._cleanup)
            except OSError:
                pass


def socket_peer(sock: socket.socket, transport: str) -> Peer:
    """The peer of a connected socket, from what the kernel says."""
    if transport == "unix":
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        # a pidfd held while /proc is read tells whether what it says is the peer's; it is not
        # kept: peer.pidfd opens another from the socket when asked (the kernel keeps the same
        # process with the socket), so an idle connection holds one descriptor, not two
        try:
            pidfd = _peer_pidfd(sock)
            vouched = True
        except OSError:
            # the kernel knows the option but gave no pidfd: no descriptor to spare, or the process
            # is gone (kernels before 6.16): nothing tells whether the pid is still the peer's
            pidfd, vouched = None, False
        exe: str | None = None
        groups: tuple[int, ...] | None = ()
        try:
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                exe = None
            groups = _peer_groups(sock)
            if not vouched or (pidfd is not None and not _pidfd_alive(pidfd)):
                # the process exited while we looked: what /proc said may belong to a recycled pid
                exe, groups = None, None  # unknown, which requirements treat as such (not as "no groups")
        finally:
            if pidfd is not None:
                os.close(pidfd)
        peer = Peer(transport="unix", address=str(sock.getsockname()), uid=uid, gid=gid, pid=pid, groups=groups, exe=exe)
        if pidfd is not None or not vouched:
            pidfd_from(peer, functools.partial(_open_peer_pidfd, sock))
        return peer
    try:
        host, port = sock.getpeername()[:2]
        address = f"{host}:{port}"
    except OSError:
        address = ""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    return Peer(transport=transport, address=address)


_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+


def _peer_groups(sock: socket.socket) -> tuple[int, ...] | None:
    """The peer's supplementary groups as the kernel recorded them at connect time (None if the
    kernel does not say)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 256)
    except OSError:
        return None
    return tuple(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


def _peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd for the peer process, from the kernel at connect time (Linux 6.5+); None if the kernel
    does not offer one, OSError if it does but could not give it now."""
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            return None
        raise
    return fd if fd > 0 else None


def _open_peer_pidfd(sock: socket.socket) -> int | None:
    """``peer.pidfd`` when first read: None if none can be had now (a later read tries again)."""
    try:
        return _peer_pidfd(sock)
    except OSError:
        return None


def _pidfd_alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except (OSError, AttributeError):
        return True
    return True


def _literal_address(host: str, port: int) -> list[Any] | None:
    """An IP literal needs no resolver (which would run in a worker thread)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return [(family, socket.SOCK_STREAM, 0, "", (host, port))]


def _check_socket_directory(url: str, directory: str) -> None:
    """Refuse a directory anyone may write to without the sticky bit: there, another user could
    replace our socket file with one of their own between two calls."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise TransportError(f"{url}: cannot use directory {directory}: {exc.strerror or exc}") from exc
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise TransportError(
            f"{url}: {directory} is writable by every user (and not sticky): put the socket in a private directory"
        )


def owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _remove_stale_socket(url: str, path: str) -> None:
    """Make room at ``path``: nothing there, or a socket file nobody listens on (removed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TransportError(f"{url}: cannot use {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"{url}: {path} exists and is not a socket")
    if _unix_socket_in_use(path):
        raise TransportError(f"{url}: address in use by a running server")
    try:
        os.unlink(path)  # a stale socket left by a dead server
    except FileNotFoundError:
        pass
    except OSError as exc:
        if st.st_uid != os.geteuid():
            raise TransportError(
                f"{url}: {path} is a socket file of {owner_name(st.st_uid)} that this process may not remove "
                f"(left by a server of theirs, or in use by one): remove it as that user, or listen elsewhere"
            ) from exc
        raise TransportError(f"{url}: cannot remove the stale socket file {path}: {exc.strerror or exc}") from exc


def _bind_unix(sock: socket.socket, url: str, path: str, mode: int) -> tuple[int, int]:
    """Bind ``sock`` to ``path`` and give the new file ``mode``, never through a name that another
    user could have pointed elsewhere (a ``chmod(path)`` after ``bind`` follows a symbolic link
    put there in between)."""
    mode &= 0o777
    old_umask = os.umask(0o777 & ~mode)
    try:
        try:
            os.fchmod(sock.fileno(), mode)  # Linux: the file bind creates takes the socket's mode, less the umask
        except OSError:
            pass  # the umask alone still keeps every bit outside ``mode`` off
        sock.bind(path)
    finally:
        os.umask(old_umask)
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise TransportError(f"{url}: {path} was removed right after it was created: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a file"
            raise TransportError(
                f"{url}: {path} was replaced right after it was created (it is now {what} of {owner_name(st.st_uid)}): "
                "someone else can write to its directory; put the socket in a private directory"
            )
        if stat.S_IMODE(st.st_mode) != mode:  # e.g. a default ACL on the directory ignores the umask
            os.chmod(f"/proc/self/fd/{fd}", mode)  # the file checked above, whatever the name holds now
        return (st.st_dev, st.st_ino)
    finally:
        os.close(fd)


def _unix_socket_in_use(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


async def open_listener(url: str, *, socket_mode: int = 0o600, backlog: int = 1024) -> Listener:
    """Bind ``url`` and return a listener whose ``url`` is the bound address."""
    u = ParsedURL(url)
    if u.scheme == "memory":
        if u.name in _memory_listeners:
            raise TransportError(f"{url}: address in use by a running server")
        listener = MemoryListener(u.name)
        _memory_listeners[u.name] = listener
        return listener
    if u.scheme == "unix":
        path = u.path
        _check_socket_directory(url, os.path.dirname(os.path.abspath(path)))
        _remove_stale_socket(url, path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            inode = _bind_unix(sock, url, path, socket_mode)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise TransportError(f"{url}: cannot listen: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return SocketListener(sock, f"unix://{path}" if path.startswith("/") else f"unix:{path}", "unix", cleanup=path, inode=inode)
    if u.scheme in ("tcp", "tls"):
        try:
            infos = await anyio.getaddrinfo(u.host, u.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise TransportError(f"{url}: cannot resolve {u.host!r}: {exc}") from exc
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise TransportError(f"{url}: address in use by a running server") from exc
            raise TransportError(f"{url}: cannot listen: {exc}") from exc
        sock.setblocking(False)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return SocketListener(sock, f"{u.scheme}://{shown}:{port}", u.scheme)
    raise TransportError(f"{url}: the {u.scheme} transport is not available")


async def _connect_socket(sock: socket.socket, addr: Any) -> None:
    sock.setblocking(False)
    while True:
        try:
            sock.connect(addr)
            return
        except (BlockingIOError, InterruptedError) as exc:
            if sock.family == socket.AF_UNIX and exc.errno == errno.EAGAIN:
                await anyio.sleep(0.001)  # the listener's backlog is full: retry shortly
                continue
            await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            return


Transport = Any  # a connected socket.socket, or an anyio ByteStream (memory)


async def connect_stream(url: str) -> tuple[Transport, Peer]:
    """Open a connection to ``url``; raise ``TransportError`` naming the URL on failure.

    Returns a connected non-blocking socket for unix and tcp, a byte stream for memory.
    """
    u = ParsedURL(url)
    if u.scheme == "memory":
        listener = _memory_listeners.get(u.name)
        if listener is None:
            raise TransportError(f"{url}: no server is listening on this memory address")
        stream = await listener.accept_from_client()
        return stream, Peer.this_process("memory", url)
    try:
        if u.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await _connect_socket(sock, u.path)
            except BaseException:
                sock.close()
                raise
            return sock, socket_peer(sock, "unix")
        if u.scheme in ("tcp", "tls"):
            infos = _literal_address(u.host, u.port) or await anyio.getaddrinfo(u.host, u.port, type=socket.SOCK_STREAM)
            last: OSError | None = None
            for family, _, _, _, addr in infos:
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    await _connect_socket(sock, addr)
                except OSError as exc:
                    sock.close()
                    last = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                return sock, socket_peer(sock, u.scheme)
            raise last or OSError(f"no address for {u.host}")
    except TransportError:
        raise
    except OSError as exc:
        raise TransportError(f"{url}: cannot connect: {exc.strerror or exc}") from exc
    raise TransportError(f"{url}: the {u.scheme} transport is not available")
