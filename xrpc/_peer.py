"""Who is on the other end of a connection.

``Peer`` is filled in by the transport when the connection is made, from facts the kernel or the TLS
layer vouches for (SO_PEERCRED on Unix sockets, the verified certificate on TLS), never from anything
the peer says about itself in the protocol.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Callable, NoReturn, Protocol

__all__ = ("Peer", "CertSubject", "PeerSource", "close_pidfd", "pidfd_from")


class CertSubject(dict[str, str]):
    """The subject of a peer certificate, keeping every value of every attribute.

    As a (read-only) ``dict`` it holds each attribute that appears exactly once: ``subject["CN"]``,
    ``subject.get("O")``, ``dict(subject)``, ``json.dumps(subject)``.  An attribute that appears
    more than once (a subject ``CN=guest/CN=agent``) has no single value, so it is not in the
    dict: ``"CN" in subject`` is false and ``subject.get("CN")`` is None.  ``getall(attr)`` gives
    every value of an attribute in certificate order (empty if it is absent), and ``all_values()``
    every attribute.  Requirements such as ``cert.subject.CN == "agent"`` fail for an attribute
    with several values.
    """

    __slots__ = ("_values",)

    def __init__(self, items: Mapping[str, str | Iterable[str]] | Iterable[tuple[str, str]] = ()) -> None:
        values: dict[str, tuple[str, ...]] = {}
        pairs: Iterable[tuple[str, Any]] = items.items() if isinstance(items, Mapping) else items
        for key, value in pairs:
            new = (value,) if isinstance(value, str) else tuple(value)
            values[key] = values.get(key, ()) + new
        self._values = values
        super().__init__((key, v[0]) for key, v in values.items() if len(v) == 1)

    def getall(self, attr: str) -> tuple[str, ...]:
        """Every value of ``attr``, in the order the certificate lists them."""
        return self._values.get(attr, ())

    def all_values(self) -> dict[str, tuple[str, ...]]:
        """Every attribute with all of its values."""
        return dict(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CertSubject):
            return self._values == other._values
        return super().__eq__(other) and len(self._values) == len(self)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None

    def __repr__(self) -> str:
        shown = {k: v[0] if len(v) == 1 else v for k, v in self._values.items()}
        return f"CertSubject({shown!r})"

    def __reduce__(self) -> tuple[type[CertSubject], tuple[list[tuple[str, str]]]]:
        return (type(self), ([(k, v) for k, values in self._values.items() for v in values],))

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a certificate subject is read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only


_pidfd_lock = threading.Lock()


class _Pidfd:
    """``Peer.pidfd``: a field whose value may be opened only when first read.

    A Unix connection's peer gets a source (``pidfd_from``) instead of an open descriptor: the
    kernel keeps the peer process's identity with the socket (SO_PEERPIDFD), so a pidfd asked
    for later refers to the same process as one taken at accept time, and an idle connection
    holds one descriptor (its socket) instead of two.  ``close_pidfd`` closes what was opened
    and stops further opening: the field then reads None.
    """

    # The one entry ``_pidfd`` of the peer's __dict__ holds the descriptor, None, or the source
    # that opens it (a single entry, set by __init__ like the fields: the instances keep sharing
    # their dict's keys, which a further entry would undo, at a kilobyte per peer).

    def __get__(self, peer: Peer | None, owner: type | None = None) -> int | None:
        if peer is None:
            return None  # the default of the dataclass field
        d = peer.__dict__
        value = d.get("_pidfd")
        if value is None or type(value) is int:
            return value
        with _pidfd_lock:  # (a blocking client may read it from another thread)
            value = d.get("_pidfd")
            if value is not None and type(value) is not int:  # (not opened or closed meanwhile)
                value = value()
                if value is not None:  # (None: none to be had now, out of descriptors say: ask again later)
                    d["_pidfd"] = value
        return value

    def __set__(self, peer: Peer, value: int | None | _Pidfd) -> None:
        peer.__dict__["_pidfd"] = None if value is self else value  # (self: the field's default)

    def __repr__(self) -> str:
        return "None"  # what the default reads as (in the signature of Peer)


def pidfd_from(peer: Peer, source: Callable[[], int | None]) -> None:
    """Let ``peer.pidfd`` be opened by ``source()`` when first read (None: unavailable for now; the
    next read asks again)."""
    peer.__dict__["_pidfd"] = source


def close_pidfd(peer: Peer) -> None:
    """The connection is over: close the pidfd if one was opened (or given); ``peer.pidfd`` reads
    None from now on."""
    d = peer.__dict__
    with _pidfd_lock:
        value = d.get("_pidfd")
        d["_pidfd"] = None
    if type(value) is int:
        try:
            os.close(value)
        except OSError:
            pass


class PeerSource(Protocol):
    """Anything that knows its peer (a connection)."""

    @property
    def peer(self) -> Peer: ...


@dataclasses.dataclass(frozen=True)
class Peer:
    """The identity of the other side of a connection.

    ``transport`` is ``"unix"``, ``"tcp"``, ``"tls"`` or ``"memory"``.  Unix sockets fill ``uid``,
    ``gid`` and ``pid`` from the kernel at connect time (SO_PEERCRED), ``pidfd`` where the kernel
    offers SO_PEERPIDFD (it refers to the process that connected, so a recycled pid cannot pose as
    the peer; it is opened when first read, and closed, reading None, once the connection is
    closed), and ``groups``/``exe`` from the kernel and /proc, dropped if the process exited
    while they were read (``groups`` is then None: unknown, unlike ``()``, no supplementary
    groups).  TLS fills the ``cert_*`` fields from the verified peer certificate; ``cert_subject``
    is a ``CertSubject``, which keeps every value of an attribute that appears more than once (a
    plain ``dict`` given here is converted).  Memory connections describe this process.
    """

    transport: str
    address: str = ""
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    groups: tuple[int, ...] | None = ()
    exe: str | None = None
    # opened when read (see _Pidfd): neither printing nor comparing peers opens one
    pidfd: int | None = dataclasses.field(default=_Pidfd(), repr=False, compare=False)  # type: ignore[assignment]
    cert_subject: CertSubject = dataclasses.field(default_factory=CertSubject)
    cert_sans: tuple[str, ...] = ()
    cert_fingerprint: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.cert_subject, CertSubject):
            object.__setattr__(self, "cert_subject", CertSubject(self.cert_subject))

    def describe(self) -> str:
        """A short description for logs: transport, and pid and uid where the kernel told them."""
        if self.pid is not None:
            return f"{self.transport} pid={self.pid} uid={self.uid}"
        return f"{self.transport} {self.address}".strip()

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
