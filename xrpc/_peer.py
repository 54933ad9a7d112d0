"""Who is on the other end of a connection.

``Peer`` is filled in by the transport when the connection is made, from facts the kernel or the TLS
layer vouches for (SO_PEERCRED on Unix sockets, the verified certificate on TLS), never from anything
the peer says about itself in the protocol.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ("Peer",)


@dataclasses.dataclass(frozen=True)
class Peer:
    """The identity of the other side of a connection.

    ``transport`` is ``"unix"``, ``"tcp"``, ``"tls"`` or ``"memory"``.  Unix sockets fill ``uid``,
    ``gid`` and ``pid`` from the kernel at connect time (SO_PEERCRED), ``pidfd`` where the kernel
    offers SO_PEERPIDFD (it stays valid while the connection is open, so a recycled pid cannot pose
    as the peer), and ``groups``/``exe`` from /proc, dropped if the process exited while they were
    read.  TLS fills the ``cert_*`` fields from the verified peer certificate; memory connections
    describe this process.
    """

    transport: str
    address: str = ""
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    groups: tuple[int, ...] = ()
    exe: str | None = None
    pidfd: int | None = None
    cert_subject: dict[str, str] = dataclasses.field(default_factory=dict)
    cert_sans: tuple[str, ...] = ()
    cert_fingerprint: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def this_process(cls, transport: str = "memory", address: str = "") -> Peer:
        exe: str | None
        try:
            exe = os.path.realpath(f"/proc/{os.getpid()}/exe")
        except OSError:  # pragma: no cover - not Linux
            exe = None
        return cls(
            transport=transport,
            address=address,
            uid=os.getuid(),
            gid=os.getgid(),
            pid=os.getpid(),
            groups=tuple(os.getgroups()),
            exe=exe,
        )
