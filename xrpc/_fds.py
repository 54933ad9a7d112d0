"""Values that carry kernel objects: file descriptors and shared memory.

``FileDescriptor`` and ``SharedBuffer`` are ordinary parameter, reply and stream-item types.  Over a
``unix://`` connection (asyncio) the descriptor travels as SCM_RIGHTS ancillary data next to the frame
that refers to it, and the receiver owns a duplicate; over any other transport the call fails with a
``ValidationError`` before anything is sent.  A ``SharedBuffer`` is a memfd mapped on both sides:
the bytes themselves never cross the socket.

This module owns the two value types; the connection does the sending and receiving.
"""

from __future__ import annotations

import mmap
import os
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


class SharedBuffer:
    """A shared memory region (a memfd) mapped in this process; pass it and the peer maps the same pages.

    ``SharedBuffer.create(size)`` makes one; ``buffer`` is a writable ``memoryview`` over it.  Writes
    on either side are visible to the other without copies.  ``close()`` unmaps it here.
    """

    __slots__ = ("_fd", "size", "_map", "buffer")

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size) if size else None
        self.buffer = memoryview(self._map) if self._map is not None else memoryview(bytearray())

    @classmethod
    def create(cls, size: int, name: str = "xrpc") -> SharedBuffer:
        if size < 0:
            raise ValueError("size must not be negative")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the shared buffer is closed")
        return self._fd

    def close(self) -> None:
        if self._fd < 0:
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
