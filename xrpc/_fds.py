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

This module owns the two value types; the connection does the sending and receiving.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from typing import IO, Any

__all__ = ("FileDescriptor", "SharedBuffer")


class FileDescriptor:
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

    def __enter__(self) -> FileDescriptor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass

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


class SharedBuffer:
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

    def __enter__(self) -> SharedBuffer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, BufferError, ValueError):
            pass  # still viewed somewhere: the mapping goes when the last view does

    def __repr__(self) -> str:
        return f"<xrpc.SharedBuffer {self.size} bytes fd={self._fd}>"
