"""Values that carry kernel objects: file descriptors and shared memory.

``FileDescriptor`` and ``SharedBuffer`` are ordinary parameter, reply and stream-item types.  Over a
``unix://`` connection (asyncio) the descriptor travels as SCM_RIGHTS ancillary data next to the frame
that refers to it, and the receiver owns a duplicate; over any other transport the call fails with a
``ValidationError`` before anything is sent.  A ``SharedBuffer`` is a memfd mapped on both sides:
the bytes themselves never cross the socket.

A mapping whose file shrinks under it kills the process with SIGBUS on the next access, so a shared
buffer travels only sealed against resizing (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``): the
sender seals it (or refuses it) before it leaves, and the receiver checks the seals, that it is a
plain memfd, and that its size is the one announced, before mapping it.  Both sides map it for
reading and writing, so a memfd sealed against writing, or a descriptor opened read-only, is refused
too (it could not be mapped).

This module owns the two value types and each connection's table of descriptors in transit; the
I/O driver does the sending and receiving.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import resource
import stat
import threading
from typing import IO, Any

from typing_extensions import Self

from ._errors import ValidationError

__all__ = ("FdBudget", "FdTable", "FileDescriptor", "SharedBuffer", "adopt_fd", "close_all", "fd_budget", "received_buffer", "sealed_fd")


class _Closing:
    """What owns a kernel object: ``with`` closes it, and so does the garbage collector."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, BufferError, ValueError):
            pass  # a shared buffer still viewed somewhere: the mapping goes when the last view does


class FileDescriptor(_Closing):
    """An open file descriptor to pass to the peer.

    Built from an ``int`` or anything with ``fileno()``; the sender keeps its own descriptor (a
    duplicate travels).  A received ``FileDescriptor`` owns its descriptor: close it (or use
    ``with``) when done; it is closed when garbage-collected otherwise.
    """

    __slots__ = ("_fd", "_owned")

    def __init__(self, fd: int | Any) -> None:
        self._fd = fd if isinstance(fd, int) else fd.fileno()
        self._owned = False

    @classmethod
    def _adopt(cls, fd: int) -> FileDescriptor:
        self = cls(fd)
        self._owned = True
        return self

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the file descriptor is closed")
        return self._fd

    def detach(self) -> int:
        """Give up ownership and return the descriptor."""
        fd, self._fd, self._owned = self._fd, -1, False
        return fd

    def open(self, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """A file object over a duplicate of the descriptor."""
        return open(os.dup(self.fileno()), mode, **kwargs)  # noqa: SIM115

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __repr__(self) -> str:
        return f"<xrpc.FileDescriptor {self._fd}{' owned' if self._owned else ''}>"


# What a shared buffer must carry to travel: its size can never change again.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# What it must not carry: both sides map it writable (F_SEAL_FUTURE_WRITE is 0x10 on Linux >= 5.1).
WRITE_SEALS = fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
_shm_device: int | None = None


def _memfd_device() -> int:
    """The device of the kernel's internal shmem mount, where every plain memfd lives (hugetlbfs
    memfds and files elsewhere, which can fault with SIGBUS in other ways, do not)."""
    global _shm_device
    if _shm_device is None:
        fd = os.memfd_create("xrpc-probe", os.MFD_CLOEXEC)
        try:
            _shm_device = os.fstat(fd).st_dev
        finally:
            os.close(fd)
    return _shm_device


def _check_sealed(fd: int, size: int) -> None:
    """Raise ``ValueError`` unless ``fd`` is a memfd of exactly ``size`` bytes sealed with ``SEALS``."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ValueError("the descriptor is not a memfd that can be sealed") from None
    if seals & SEALS != SEALS:
        raise ValueError("the memfd is not sealed against resizing (F_SEAL_SHRINK, F_SEAL_GROW and F_SEAL_SEAL are required)")
    if seals & WRITE_SEALS:
        raise ValueError("the memfd is sealed against writing (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE): a shared buffer is mapped writable")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise ValueError("the descriptor is not open for reading and writing: a shared buffer is mapped writable")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_dev != _memfd_device():
        raise ValueError("the descriptor is not a plain memfd")
    if st.st_size != size:
        raise ValueError(f"the memfd's size is {st.st_size} bytes, not the {size} announced")


class SharedBuffer(_Closing):
    """A shared memory region (a memfd) mapped in this process; pass it and the peer maps the same pages.

    ``SharedBuffer.create(size)`` makes one; ``buffer`` is a writable ``memoryview`` over it.  Writes
    on either side are visible to the other without copies.  ``close()`` unmaps it here.

    The memfd is sealed against resizing (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``): its size is
    fixed for good, so that no side can make the other's mapping fault.  A ``SharedBuffer`` built
    over a descriptor of your own is sealed when it is first sent; one that cannot be (a memfd made
    without ``MFD_ALLOW_SEALING``, or not a memfd) is refused with ``ValidationError``.
    """

    __slots__ = ("_fd", "size", "_map", "buffer")

    def __init__(self, fd: int, size: int) -> None:
        self._fd = -1  # owned only once mapped: a failed mapping leaves ``fd`` to the caller
        self.size = size
        self._map = mmap.mmap(fd, size) if size else None
        self.buffer = memoryview(self._map) if self._map is not None else memoryview(bytearray())
        self._fd = fd

    @classmethod
    def create(cls, size: int, name: str = "xrpc") -> SharedBuffer:
        if size < 0:
            raise ValueError("size must not be negative")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _receive(cls, fd: int, size: int) -> SharedBuffer:
        """Map a buffer the peer sent, once it is known that it can never shrink under the mapping."""
        _check_sealed(fd, size)
        return cls(fd, size)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the shared buffer is closed")
        return self._fd

    def _sealed_fd(self) -> int:
        """The descriptor to send, sealed against resizing (sealed here if it is not yet)."""
        fd = self.fileno()
        try:
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS != SEALS:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except OSError as exc:
            raise ValueError(
                f"the shared buffer cannot be sealed against resizing ({exc.strerror}): make it with SharedBuffer.create()"
            ) from None
        _check_sealed(fd, self.size)
        return fd

    def close(self) -> None:
        if getattr(self, "_fd", -1) < 0:
            return
        self.buffer.release()
        if self._map is not None:
            self._map.close()
        os.close(self._fd)
        self._fd = -1

    def __repr__(self) -> str:
        return f"<xrpc.SharedBuffer {self.size} bytes fd={self._fd}>"


def adopt_fd(fd: int) -> FileDescriptor:
    """A received descriptor as the ``FileDescriptor`` that owns it."""
    return FileDescriptor._adopt(fd)


def received_buffer(fd: int, size: int) -> SharedBuffer:
    """A received memfd as a ``SharedBuffer`` of ``size`` bytes, checked before it is mapped."""
    return SharedBuffer._receive(fd, size)


def sealed_fd(buf: SharedBuffer) -> int:
    """The descriptor of ``buf`` to send, sealed against resizing first."""
    return buf._sealed_fd()


def close_all(fds: list[int] | None) -> None:
    """Close every descriptor of ``fds`` (those already closed are passed over)."""
    for fd in fds or ():
        try:
            os.close(fd)
        except OSError:
            pass


class FdBudget:
    """Received descriptors not yet claimed, counted over the whole process (every connection, every
    thread): at most half the soft RLIMIT_NOFILE, so that peers can never take the descriptors the
    process needs to accept connections and open files."""

    def __init__(self) -> None:
        self.held = 0
        self._lock = threading.Lock()

    @staticmethod
    def cap() -> int:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return 1 << 20 if soft == resource.RLIM_INFINITY or soft > 1 << 21 else soft // 2

    def take(self, n: int) -> bool:
        with self._lock:
            if self.held + n > self.cap():
                return False
            self.held += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.held -= n


fd_budget = FdBudget()


class FdTable:
    """The descriptors of one connection: those to attach to the next write, and those received
    (numbered in arrival order) until the value that refers to them claims them.

    ``passes`` is set once the connection's driver can pass descriptors (a unix socket on asyncio);
    ``admitted`` once the peer may send them (a client from the start, a server once the peer
    passed its requirement).
    """

    __slots__ = ("outgoing", "incoming", "seq_out", "seq_in", "passes", "admitted", "max_fds")

    def __init__(self, max_fds: int, admitted: bool) -> None:
        self.outgoing: list[int] = []
        self.incoming: dict[int, int] = {}
        self.seq_out = 0
        self.seq_in = 0
        self.passes = False
        self.admitted = admitted
        self.max_fds = max_fds

    def fd_out(self, fd: int) -> int:
        """Queue a duplicate of ``fd`` to travel with the next write; its sequence number."""
        if not self.passes:
            raise ValueError("file descriptors and shared buffers travel only over unix:// connections (on asyncio)")
        self.outgoing.append(os.dup(fd))
        self.seq_out += 1
        return self.seq_out

    def fd_in(self, seq: int) -> int:
        """Claim received descriptor number ``seq``."""
        fd = self.incoming.pop(seq, None)
        if fd is None:
            raise ValidationError(f"file descriptor #{seq} did not arrive")
        fd_budget.give(1)
        return fd

    def take_outgoing(self) -> list[int] | None:
        """The descriptors to attach to the write being made now (the writer closes them once sent)."""
        fds = self.outgoing
        if not fds:
            return None
        self.outgoing = []
        return fds

    def received(self, fds: list[int], truncated: bool) -> tuple[str, bool] | None:
        """Descriptors arrived: keep them (None), or refuse them (closed at once): why, and whether
        that is a protocol violation (else a limit)."""
        if truncated:
            why: tuple[str, bool] | None = ("file descriptors were truncated (too many in one message)", True)
        elif not self.admitted:
            why = ("file descriptors before the connection was admitted", True)
        elif len(self.incoming) + len(fds) > self.max_fds:
            why = (f"more than max_fds={self.max_fds} unclaimed file descriptors", False)
        elif not fd_budget.take(len(fds)):
            why = (f"the process holds its limit of {fd_budget.cap()} received file descriptors", False)
        else:
            for fd in fds:
                self.seq_in += 1
                self.incoming[self.seq_in] = fd
            return None
        close_all(fds)
        return why

    def clear(self) -> None:
        """The connection ended: close every descriptor it still holds."""
        fd_budget.give(len(self.incoming))
        close_all(list(self.incoming.values()) + self.outgoing)
        self.incoming.clear()
        self.outgoing.clear()
