"""Transports: from a URL to an anyio byte stream and the ``Peer`` behind it.

Theory of operation
-------------------
Every transport is an ``anyio.abc.ByteStream``; TLS, buffering and the protocol runtime then work on it
unchanged.  ``connect_stream(url)`` opens one; ``open_listener(url)`` returns a ``Listener`` that
yields ``(stream, peer)`` pairs.  OS and anyio errors stop here: they leave as ``TransportError`` with
the URL in the message.

URLs: ``unix:///abs/path.sock``, ``tcp://host:port``, ``memory://name`` (in this process only).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import urllib.parse
from typing import Any, Awaitable, Callable

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import TransportError
from ._peer import Peer

__all__ = ("ParsedURL", "parse_url", "connect_stream", "open_listener", "Listener", "MemoryByteStream")


class ParsedURL:
    __slots__ = ("scheme", "host", "port", "path", "name", "raw")

    def __init__(self, raw: str) -> None:
        self.raw = raw
        u = urllib.parse.urlsplit(raw)
        self.scheme = u.scheme
        self.host = ""
        self.port = 0
        self.path = ""
        self.name = ""
        if u.scheme == "unix":
            self.path = urllib.parse.unquote(u.netloc + u.path)
            if not self.path:
                raise ValueError(f"{raw!r}: a unix URL needs a path (unix:///abs/path.sock)")
        elif u.scheme in ("tcp", "tls"):
            if not u.hostname:
                raise ValueError(f"{raw!r}: a {u.scheme} URL needs a host (tcp://127.0.0.1:0)")
            self.host = u.hostname
            try:
                self.port = u.port or 0
            except ValueError as exc:
                raise ValueError(f"{raw!r}: {exc}") from None
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
    def pair(cls, buffer: int = 256) -> tuple[MemoryByteStream, MemoryByteStream]:
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


Handler = Callable[[anyio.abc.ByteStream, Peer], Awaitable[None]]
_memory_listeners: dict[str, MemoryListener] = {}


# --------------------------------------------------------------------------- listeners
class Listener:
    """A bound listening endpoint; ``serve(handler)`` runs ``handler(stream, peer)`` per connection."""

    url: str

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


class SocketListener(Listener):
    def __init__(self, listener: anyio.abc.SocketListener, url: str, transport: str, cleanup: str | None = None) -> None:
        self._listener = listener
        self.url = url
        self._transport = transport
        self._cleanup = cleanup

    async def serve(self, handler: Handler) -> None:
        async def accepted(stream: anyio.abc.SocketStream) -> None:
            try:
                peer = _socket_peer(stream, self._transport)
            except OSError:
                await stream.aclose()
                return
            await handler(stream, peer)

        try:
            await self._listener.serve(accepted)  # type: ignore[arg-type]
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def aclose(self) -> None:
        await self._listener.aclose()
        if self._cleanup:
            try:
                os.unlink(self._cleanup)
            except OSError:
                pass


def _socket_peer(stream: anyio.abc.SocketStream, transport: str) -> Peer:
    sock: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    if transport == "unix":
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        exe: str | None = None
        groups: tuple[int, ...] = ()
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = None
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        groups = tuple(int(g) for g in line.split()[1:])
                        break
        except (OSError, ValueError):
            groups = ()
        return Peer(transport="unix", address=str(sock.getsockname()), uid=uid, gid=gid, pid=pid, groups=groups, exe=exe)
    try:
        host, port = sock.getpeername()[:2]
        address = f"{host}:{port}"
    except OSError:
        address = ""
    if transport == "tcp":
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    return Peer(transport=transport, address=address)


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
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise TransportError(f"{url}: {path} exists and is not a socket")
            if _unix_socket_in_use(path):
                raise TransportError(f"{url}: address in use by a running server")
            os.unlink(path)  # a stale socket left by a dead server
        old_umask = os.umask(0o777 & ~socket_mode)
        try:
            sock_listener = await anyio.create_unix_listener(path, mode=socket_mode, backlog=backlog)
        except OSError as exc:
            raise TransportError(f"{url}: cannot listen: {exc}") from exc
        finally:
            os.umask(old_umask)
        return SocketListener(sock_listener, f"unix://{path}", "unix", cleanup=path)
    if u.scheme == "tcp":
        try:
            multi = await anyio.create_tcp_listener(local_host=u.host, local_port=u.port, backlog=backlog)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise TransportError(f"{url}: address in use by a running server") from exc
            raise TransportError(f"{url}: cannot listen: {exc}") from exc
        first = multi.listeners[0]
        host, port = first.extra(anyio.abc.SocketAttribute.local_address)[:2]  # type: ignore[misc]
        shown = f"[{host}]" if ":" in str(host) else host
        return _MultiListener(multi, f"tcp://{shown}:{port}")
    raise TransportError(f"{url}: the {u.scheme} transport is not available")


class _MultiListener(Listener):
    def __init__(self, multi: Any, url: str) -> None:
        self._multi = multi
        self.url = url

    async def serve(self, handler: Handler) -> None:
        async def accepted(stream: anyio.abc.SocketStream) -> None:
            try:
                peer = _socket_peer(stream, "tcp")
            except OSError:
                await stream.aclose()
                return
            await handler(stream, peer)

        try:
            await self._multi.serve(accepted)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def aclose(self) -> None:
        await self._multi.aclose()


async def connect_stream(url: str) -> tuple[anyio.abc.ByteStream, Peer]:
    """Open a byte stream to ``url``; raise ``TransportError`` naming the URL on failure."""
    u = ParsedURL(url)
    try:
        if u.scheme == "memory":
            listener = _memory_listeners.get(u.name)
            if listener is None:
                raise TransportError(f"{url}: no server is listening on this memory address")
            stream = await listener.accept_from_client()
            return stream, Peer.this_process("memory", url)
        if u.scheme == "unix":
            unix_stream = await anyio.connect_unix(u.path)
            return unix_stream, _socket_peer(unix_stream, "unix")
        if u.scheme == "tcp":
            tcp_stream = await anyio.connect_tcp(u.host, u.port)
            return tcp_stream, _socket_peer(tcp_stream, "tcp")
    except TransportError:
        raise
    except OSError as exc:
        raise TransportError(f"{url}: cannot connect: {exc.strerror or exc}") from exc
    raise TransportError(f"{url}: the {u.scheme} transport is not available")
