"""Peer requirements: who may connect, as small composable predicates over a ``Peer``.

A ``Requirement`` is an immutable tree.  Its leaves compare one fact about the peer (``uid``,
``gid``, ``user``, ``group``, ``pid``, ``exe``, ``transport``, ``cert.subject.<ATTR>``, ``cert.san``,
``cert.fingerprint``, or "same user as this process") with a value; its inner nodes are ``And``,
``Or`` and ``Not``, built with ``&``, ``|`` and ``~``.  Every requirement prints as an expression in
a small language and ``requirement(text)`` parses that language back, so a requirement can live in a
configuration file::

    uid == 1000 and (exe == "/usr/bin/agent" or cert.subject.CN == "agent")
    same_user && !(transport == "tcp")

Precedence, loosest first: ``or`` (``||``), ``and`` (``&&``), ``not`` (``!``).  ``a != b`` means
``not a == b``.  Integers are unsigned decimal; strings are double-quoted with ``\\\\`` and ``\\"``
as the only escapes.  The parser is a hand-written tokenizer and recursive-descent parser; it never
evaluates anything, and reports mistakes as ``RequirementSyntaxError`` with a 1-based column.

Evaluation uses three values: True, False and Unknown (``None``).  A leaf whose fact the peer does
not have (no uid over TCP, no certificate, an executable dropped because the process exited, a
certificate attribute that is absent or appears more than once) is Unknown; ``not`` keeps Unknown
Unknown; ``and``/``or`` follow Kleene's logic (``False and Unknown`` is False, ``True or Unknown``
is True, any other mix with Unknown is Unknown).  ``check()`` admits only on True, so a verdict
that depends on a missing fact always denies: ``uid != 0`` refuses a peer without a uid.  A fact
that is known but does not match (a user name that resolves to nobody, say) is False, not Unknown.
Evaluation short-circuits and never raises for missing facts.  ``explain()`` says in words why a
requirement held or not.

This module owns the requirement types, the expression language and its errors; it does no I/O
beyond the user, group and path lookups a leaf needs when it is checked.
"""

from __future__ import annotations

import abc
import dataclasses
import grp
import os
import pwd
from collections.abc import Mapping
from typing import Callable, ClassVar, Generic, NamedTuple, NoReturn, TypeVar

from ._errors import Error
from ._peer import CertSubject, Peer

__all__ = (
    "Requirement",
    "And",
    "Or",
    "Not",
    "RequirementSyntaxError",
    "requirement",
    "requirement_of",
)

_V = TypeVar("_V", int, str)

_MAX_ID = 2**32 - 1
_MAX_DEPTH = 100


# --------------------------------------------------------------------------------------------
# Errors


class RequirementSyntaxError(Error, ValueError):
    """A requirement expression could not be parsed.

    ``expression`` is the text, ``column`` the 1-based column of the offending token (one past the
    end when the text ended too early), ``reason`` the message without the excerpt.
    """

    def __init__(self, reason: str, expression: str, column: int) -> None:
        self.reason = reason
        self.expression = expression
        self.column = column
        shown = expression.replace("\t", " ").replace("\r", " ").replace("\n", " ")
        super().__init__(f"{reason} at column {column}\n  {shown}\n  {' ' * (column - 1)}^")

    def __reduce__(self) -> tuple[type[RequirementSyntaxError], tuple[str, str, int]]:
        return (type(self), (self.reason, self.expression, self.column))


# --------------------------------------------------------------------------------------------
# Helpers


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(value: int | str) -> str:
    return str(value) if isinstance(value, int) else _quote(value)


def _check_id(kind: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{kind} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _MAX_ID:
        raise ValueError(f"{kind} {value} is out of range (0 to {_MAX_ID})")
    return value


def _check_str(kind: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{kind} must be a str, not {type(value).__name__}")
    return value


def _is_identifier(text: str) -> bool:
    return (
        bool(text)
        and text[0] in _IDENT_START
        and all(ch in _IDENT_CHARS for ch in text)
    )


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except (KeyError, ValueError, OSError):
        return None


def _gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except (KeyError, ValueError, OSError):
        return None


def _realpath(path: str) -> str | None:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return None


def _has_gid(peer: Peer, gid: int) -> bool | None:
    if peer.gid == gid or gid in (peer.groups or ()):
        return True
    if peer.gid is None or peer.groups is None:
        return None  # the primary group or the supplementary groups are unknown
    return False


def _describe_groups(peer: Peer) -> str:
    groups = tuple(peer.groups or ())
    primary = "peer has no gid" if peer.gid is None else f"peer gid is {peer.gid}"
    if peer.groups is None:
        return f"{primary}, supplementary groups are unknown"
    if groups:
        return f"{primary}, supplementary groups are {', '.join(map(str, groups))}"
    return f"{primary} and no supplementary groups"


_SAN_TYPES = {
    "DNS": "DNS",
    "IP": "IP",
    "IP ADDRESS": "IP",
    "URI": "URI",
    "EMAIL": "EMAIL",
    "RID": "RID",
    "REGISTERED ID": "RID",
    "DIRNAME": "DIRNAME",
    "OTHERNAME": "OTHERNAME",
}


def _split_san(entry: str) -> tuple[str | None, str]:
    prefix, sep, rest = entry.partition(":")
    if sep:
        kind = _SAN_TYPES.get(prefix.strip().upper())
        if kind is not None:
            return kind, rest
    return None, entry


def _san_matches(entry: str, wanted: str) -> bool:
    entry_kind, entry_value = _split_san(entry)
    wanted_kind, wanted_value = _split_san(wanted)
    if entry_value != wanted_value:
        return False
    return entry_kind is None or wanted_kind is None or entry_kind == wanted_kind


def _normalize_fingerprint(text: str) -> str:
    return text.replace(":", "").lower()


# --------------------------------------------------------------------------------------------
# The tree


class Requirement(abc.ABC):
    """A predicate over a ``Peer``.  Build leaves with the factory methods, combine with ``&``,
    ``|`` and ``~``, or parse an expression with ``requirement()``.

    ``str()`` gives the expression in the language ``requirement()`` reads, and parsing it gives an
    equal requirement.  Requirements are immutable, hashable and compare by structure.
    """

    def check(self, peer: Peer) -> bool:
        """Whether ``peer`` satisfies the requirement: only a verdict of True admits, so a
        requirement that depends on a fact the peer lacks fails.  Never raises for missing facts."""
        return self.evaluate(peer) is True

    def evaluate(self, peer: Peer) -> bool | None:
        """The three-valued verdict: True, False, or None when it depends on a fact ``peer``
        lacks.  A subclass defines this (or, for a two-valued predicate, ``check``)."""
        if type(self).check is Requirement.check:
            raise NotImplementedError(f"{type(self).__qualname__} defines neither evaluate() nor check()")
        return bool(self.check(peer))

    @abc.abstractmethod
    def __str__(self) -> str: ...

    def explain(self, peer: Peer) -> str:
        """A sentence saying whether ``peer`` satisfies the requirement, and why."""
        verdict = self.evaluate(peer)
        detail = self._detail(peer)
        return _sentence(self, verdict, detail)

    def _detail(self, peer: Peer) -> str:
        """The fact about ``peer`` that decided a leaf, for ``explain()``."""
        return ""

    def _binding(self) -> int:
        """How tightly the printed form binds: 1 or, 2 and, 3 not, 4 a leaf or parenthesised."""
        return 4

    def __repr__(self) -> str:
        return f"requirement({str(self)!r})"

    def __and__(self, other: Requirement) -> Requirement:
        if not isinstance(other, Requirement):
            return NotImplemented
        return And((self, other))

    def __or__(self, other: Requirement) -> Requirement:
        if not isinstance(other, Requirement):
            return NotImplemented
        return Or((self, other))

    def __invert__(self) -> Requirement:
        return Not(self)

    # Factories -------------------------------------------------------------------------------

    @staticmethod
    def uid(uid: int) -> Requirement:
        """The peer's user id is ``uid``."""
        return _Uid(_check_id("uid", uid))

    @staticmethod
    def gid(gid: int) -> Requirement:
        """The peer's primary group id, or one of its supplementary groups, is ``gid``."""
        return _Gid(_check_id("gid", gid))

    @staticmethod
    def user(name: str) -> Requirement:
        """The peer runs as the user ``name``, looked up when checked (an unknown name never matches)."""
        return _User(_check_str("user", name))

    @staticmethod
    def group(name: str) -> Requirement:
        """The peer is in the group ``name`` (primary or supplementary), looked up when checked."""
        return _Group(_check_str("group", name))

    @staticmethod
    def pid(pid: int) -> Requirement:
        """The peer's process id is ``pid``."""
        return _Pid(_check_id("pid", pid))

    @staticmethod
    def executable(path: str | os.PathLike[str]) -> Requirement:
        """The peer runs the executable at ``path`` (an absolute path); symlinks are resolved on
        both sides when checked."""
        text = _check_str("executable path", os.fspath(path))
        if not os.path.isabs(text):
            raise ValueError(f"executable path must be absolute, not {text!r}")
        if "\0" in text:
            raise ValueError("executable path must not contain a NUL character")
        return _Exe(text)

    @staticmethod
    def same_user() -> Requirement:
        """The peer runs as the same user id as this process (compared when checked)."""
        return _SameUser()

    @staticmethod
    def cert_subject(**fields: str) -> Requirement:
        """Every given attribute of the peer certificate's subject equals the given value, e.g.
        ``cert_subject(CN="client1", O="Acme")``."""
        if not fields:
            raise ValueError("cert_subject() needs at least one attribute, e.g. CN='name'")
        leaves: list[Requirement] = []
        for attr in sorted(fields):
            if not _is_identifier(attr):
                raise ValueError(f"certificate subject attribute {attr!r} is not a plain name")
            leaves.append(_SubjectAttr(_check_str(f"cert_subject {attr}", fields[attr]), attr))
        return leaves[0] if len(leaves) == 1 else And(tuple(leaves))

    @staticmethod
    def cert_san(name: str) -> Requirement:
        """The peer certificate lists ``name`` as a subject alternative name.  ``"example.com"``
        matches ``"DNS:example.com"`` and ``"example.com"``; ``"DNS:example.com"`` matches those two
        but not ``"URI:example.com"``."""
        return _San(_check_str("cert_san", name))

    @staticmethod
    def cert_fingerprint(fingerprint: str) -> Requirement:
        """The peer certificate's SHA-256 fingerprint is ``fingerprint`` (64 hex digits; case and
        colons are ignored)."""
        value = _normalize_fingerprint(_check_str("cert_fingerprint", fingerprint))
        if len(value) != 64 or any(ch not in "0123456789abcdef" for ch in value):
            raise ValueError(
                f"certificate fingerprint must be 64 hex digits (SHA-256), not {fingerprint!r}"
            )
        return _Fingerprint(value)

    @staticmethod
    def transport(name: str) -> Requirement:
        """The connection uses the transport ``name`` (``"unix"``, ``"tcp"``, ``"tls"``, ``"memory"``)."""
        return _Transport(_check_str("transport", name))

    @staticmethod
    def any() -> Requirement:
        """Every peer."""
        return _Constant(True)

    @staticmethod
    def none() -> Requirement:
        """No peer."""
        return _Constant(False)


def _sentence(req: Requirement, verdict: bool | None, detail: str) -> str:
    """``"<req> passed: <detail>"`` or ``failed``; an Unknown verdict fails, marked ``(unknown)``."""
    word = "passed" if verdict is True else "failed"
    if verdict is None:
        detail = f"{detail} (unknown)" if detail else "unknown"
    return f"{req} {word}: {detail}" if detail else f"{req} {word}"


def _flatten(kind: type[_Junction], children: tuple[Requirement, ...]) -> tuple[Requirement, ...]:
    flat: list[Requirement] = []
    for child in children:
        if not isinstance(child, Requirement):
            raise TypeError(f"{kind.__name__} children must be Requirements, not {type(child).__name__}")
        if type(child) is kind:
            flat.extend(child.children)
        else:
            flat.append(child)
    return tuple(flat)


def _wrap(child: Requirement, precedence: int) -> str:
    text = str(child)
    return f"({text})" if child._binding() < precedence else text


def _kleene(children: tuple[Requirement, ...], peer: Peer, decisive: bool) -> bool | None:
    """Kleene's ``and`` (``decisive=False``) or ``or`` (``decisive=True``), left to right: the first
    child that is ``decisive`` decides; else Unknown if any child is Unknown; else ``not decisive``."""
    result: bool | None = not decisive
    for child in children:
        verdict = child.evaluate(peer)
        if verdict is decisive:
            return decisive
        if verdict is None:
            result = None
    return result


@dataclasses.dataclass(frozen=True, repr=False)
class _Junction(Requirement):
    """``And`` or ``Or``: at least two children (nested ones of the same kind flattened), evaluated
    left to right in Kleene's logic."""

    children: tuple[Requirement, ...]
    _DECISIVE: ClassVar[bool]  # a child with this verdict decides the whole
    _WORD: ClassVar[str]  # how the expression language joins the children
    _BINDING: ClassVar[int]  # precedence in that language

    def __post_init__(self) -> None:
        children = _flatten(type(self), tuple(self.children))
        if len(children) < 2:
            raise ValueError(f"{type(self).__name__} needs at least two children")
        object.__setattr__(self, "children", children)

    def _binding(self) -> int:
        return self._BINDING

    def evaluate(self, peer: Peer) -> bool | None:
        return _kleene(self.children, peer, self._DECISIVE)

    def __str__(self) -> str:
        return f" {self._WORD} ".join(_wrap(child, self._BINDING) for child in self.children)


@dataclasses.dataclass(frozen=True, repr=False)
class And(_Junction):
    """Every child holds.  Checked left to right, stopping at the first that is False; Unknown if
    none is False and one is Unknown."""

    _DECISIVE = False
    _WORD = "and"
    _BINDING = 2

    def explain(self, peer: Peer) -> str:
        unknown: Requirement | None = None
        for child in self.children:
            verdict = child.evaluate(peer)
            if verdict is False:
                return child.explain(peer)
            if verdict is None and unknown is None:
                unknown = child
        if unknown is not None:
            return unknown.explain(peer)
        return "; ".join(child.explain(peer) for child in self.children)


@dataclasses.dataclass(frozen=True, repr=False)
class Or(_Junction):
    """At least one child holds.  Checked left to right, stopping at the first that is True;
    Unknown if none is True and one is Unknown."""

    _DECISIVE = True
    _WORD = "or"
    _BINDING = 1

    def explain(self, peer: Peer) -> str:
        for child in self.children:
            if child.evaluate(peer) is True:
                return child.explain(peer)
        return "no alternative held: " + "; ".join(child.explain(peer) for child in self.children)


@dataclasses.dataclass(frozen=True, repr=False)
class Not(Requirement):
    """The child does not hold.  ``Not`` of Unknown is Unknown.  ``Not`` of a comparison prints as
    ``!=``."""

    child: Requirement

    def __post_init__(self) -> None:
        if not isinstance(self.child, Requirement):
            raise TypeError(f"Not child must be a Requirement, not {type(self.child).__name__}")

    def _binding(self) -> int:
        return 4 if isinstance(self.child, _Match) else 3

    def evaluate(self, peer: Peer) -> bool | None:
        verdict = self.child.evaluate(peer)
        return None if verdict is None else not verdict

    def explain(self, peer: Peer) -> str:
        verdict = self.evaluate(peer)
        if isinstance(self.child, _Match):
            return _sentence(self, verdict, self.child._detail(peer))
        word = "passed" if verdict is True else "failed"
        return f"{self} {word}: {self.child.explain(peer)}"

    def __str__(self) -> str:
        if isinstance(self.child, _Match):
            return f"{self.child.field} != {_literal(self.child.value)}"
        return "not " + _wrap(self.child, 3)


@dataclasses.dataclass(frozen=True, repr=False)
class _Constant(Requirement):
    value: bool

    def evaluate(self, peer: Peer) -> bool | None:
        return self.value

    def _detail(self, peer: Peer) -> str:
        return "it matches every peer" if self.value else "it matches no peer"

    def __str__(self) -> str:
        return "true" if self.value else "false"


@dataclasses.dataclass(frozen=True, repr=False)
class _SameUser(Requirement):
    def evaluate(self, peer: Peer) -> bool | None:
        return None if peer.uid is None else peer.uid == os.getuid()

    def _detail(self, peer: Peer) -> str:
        if peer.uid is None:
            return "peer has no uid"
        return f"this process runs as uid {os.getuid()}, peer uid is {peer.uid}"

    def __str__(self) -> str:
        return "same_user"


@dataclasses.dataclass(frozen=True, repr=False)
class _Match(Requirement, Generic[_V]):
    """A comparison ``field == value``."""

    value: _V
    _FIELD: ClassVar[str] = ""

    @property
    def field(self) -> str:
        """The field name as the expression language spells it."""
        return self._FIELD

    def __str__(self) -> str:
        return f"{self.field} == {_literal(self.value)}"


@dataclasses.dataclass(frozen=True, repr=False)
class _Uid(_Match[int]):
    _FIELD = "uid"

    def evaluate(self, peer: Peer) -> bool | None:
        return None if peer.uid is None else peer.uid == self.value

    def _detail(self, peer: Peer) -> str:
        return "peer has no uid" if peer.uid is None else f"peer uid is {peer.uid}"


@dataclasses.dataclass(frozen=True, repr=False)
class _Gid(_Match[int]):
    _FIELD = "gid"

    def evaluate(self, peer: Peer) -> bool | None:
        return _has_gid(peer, self.value)

    def _detail(self, peer: Peer) -> str:
        return _describe_groups(peer)


@dataclasses.dataclass(frozen=True, repr=False)
class _Pid(_Match[int]):
    _FIELD = "pid"

    def evaluate(self, peer: Peer) -> bool | None:
        return None if peer.pid is None else peer.pid == self.value

    def _detail(self, peer: Peer) -> str:
        return "peer has no pid" if peer.pid is None else f"peer pid is {peer.pid}"


@dataclasses.dataclass(frozen=True, repr=False)
class _User(_Match[str]):
    _FIELD = "user"

    def evaluate(self, peer: Peer) -> bool | None:
        if peer.uid is None:
            return None
        uid = _uid_of(self.value)
        return uid is not None and uid == peer.uid

    def _detail(self, peer: Peer) -> str:
        if peer.uid is None:
            return "peer has no uid"
        uid = _uid_of(self.value)
        if uid is None:
            return f"there is no user named {_quote(self.value)}"
        return f"user {_quote(self.value)} is uid {uid}, peer uid is {peer.uid}"


@dataclasses.dataclass(frozen=True, repr=False)
class _Group(_Match[str]):
    _FIELD = "group"

    def evaluate(self, peer: Peer) -> bool | None:
        if peer.gid is None and not peer.groups:
            return None
        gid = _gid_of(self.value)
        return False if gid is None else _has_gid(peer, gid)

    def _detail(self, peer: Peer) -> str:
        gid = _gid_of(self.value)
        if gid is None:
            return f"there is no group named {_quote(self.value)}"
        return f"group {_quote(self.value)} is gid {gid}, {_describe_groups(peer)}"


@dataclasses.dataclass(frozen=True, repr=False)
class _Exe(_Match[str]):
    _FIELD = "exe"

    def evaluate(self, peer: Peer) -> bool | None:
        if peer.exe is None:
            return None
        actual = _realpath(peer.exe)
        return None if actual is None else actual == _realpath(self.value)

    def _detail(self, peer: Peer) -> str:
        if peer.exe is None:
            return "peer has no executable path"
        actual = _realpath(peer.exe)
        if actual is None:
            return f"peer executable {_quote(peer.exe)} cannot be resolved"
        text = f"peer executable is {_quote(actual)}"
        wanted = _realpath(self.value)
        if wanted is not None and wanted != self.value:
            text += f", {_quote(self.value)} resolves to {_quote(wanted)}"
        return text


@dataclasses.dataclass(frozen=True, repr=False)
class _Transport(_Match[str]):
    _FIELD = "transport"

    def evaluate(self, peer: Peer) -> bool | None:
        return peer.transport == self.value if isinstance(peer.transport, str) else None

    def _detail(self, peer: Peer) -> str:
        if not isinstance(peer.transport, str):
            return "peer transport is unknown"
        return f"peer transport is {_quote(peer.transport)}"


@dataclasses.dataclass(frozen=True, repr=False)
class _SubjectAttr(_Match[str]):
    attr: str

    @property
    def field(self) -> str:
        return f"cert.subject.{self.attr}"

    def _values(self, peer: Peer) -> tuple[str, ...]:
        subject = peer.cert_subject
        if isinstance(subject, CertSubject):
            return subject.getall(self.attr)
        value = subject.get(self.attr) if isinstance(subject, Mapping) else None
        return (value,) if isinstance(value, str) else ()

    def evaluate(self, peer: Peer) -> bool | None:
        values = self._values(peer)
        # absent, or more than one value (CN=guest/CN=agent): the attribute has no single value
        return values[0] == self.value if len(values) == 1 else None

    def _detail(self, peer: Peer) -> str:
        values = self._values(peer)
        if not values:
            return f"peer certificate subject has no {self.attr}"
        if len(values) > 1:
            shown = ", ".join(_quote(v) for v in values)
            return f"peer certificate subject has {len(values)} {self.attr} values ({shown}), not one"
        return f"peer certificate subject {self.attr} is {_quote(values[0])}"


@dataclasses.dataclass(frozen=True, repr=False)
class _San(_Match[str]):
    _FIELD = "cert.san"

    def evaluate(self, peer: Peer) -> bool | None:
        if not peer.cert_sans and peer.cert_fingerprint is None:
            return None  # no certificate at all
        return any(
            isinstance(entry, str) and _san_matches(entry, self.value)
            for entry in (peer.cert_sans or ())
        )

    def _detail(self, peer: Peer) -> str:
        sans = [entry for entry in (peer.cert_sans or ()) if isinstance(entry, str)]
        if not sans:
            return "peer certificate has no subject alternative names"
        return "peer certificate names are " + ", ".join(_quote(entry) for entry in sans)


@dataclasses.dataclass(frozen=True, repr=False)
class _Fingerprint(_Match[str]):
    _FIELD = "cert.fingerprint"

    def evaluate(self, peer: Peer) -> bool | None:
        actual = peer.cert_fingerprint
        return _normalize_fingerprint(actual) == self.value if isinstance(actual, str) else None

    def _detail(self, peer: Peer) -> str:
        actual = peer.cert_fingerprint
        if not isinstance(actual, str):
            return "peer has no certificate fingerprint"
        return f"peer certificate fingerprint is {_normalize_fingerprint(actual)}"


# --------------------------------------------------------------------------------------------
# The language


_DIGITS = frozenset("0123456789")
_IDENT_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHARS = _IDENT_START | _DIGITS
_SPACE = frozenset(" \t\r\n")
_SUBJECT_PREFIX = "cert.subject."

# Field name -> (value kind, factory).  ``cert.subject.<ATTR>`` is handled apart.
_INT_FIELDS: dict[str, Callable[[int], Requirement]] = {"uid": Requirement.uid, "gid": Requirement.gid, "pid": Requirement.pid}
_STR_FIELDS: dict[str, Callable[[str], Requirement]] = {
    "user": Requirement.user,
    "group": Requirement.group,
    "exe": Requirement.executable,
    "transport": Requirement.transport,
    "cert.san": Requirement.cert_san,
    "cert.fingerprint": Requirement.cert_fingerprint,
}
_FIELD_LIST = "uid, gid, pid, user, group, exe, transport, cert.subject.<ATTR>, cert.san, cert.fingerprint"
_WORD_TOKENS = {"and": "and", "or": "or", "not": "not"}


class _Token(NamedTuple):
    kind: str  # "(", ")", "==", "!=", "and", "or", "not", "int", "str", "name", "end"
    text: str
    value: int | str | None
    column: int


def _describe(token: _Token) -> str:
    if token.kind == "end":
        return "the end of the expression"
    text = token.text if len(token.text) <= 30 else token.text[:27] + "..."
    return repr(text)


def _tokenize(text: str) -> list[_Token]:
    def fail(reason: str, index: int) -> NoReturn:
        raise RequirementSyntaxError(reason, text, index + 1)

    tokens: list[_Token] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch in _SPACE:
            i += 1
            continue
        start = i
        two = text[i : i + 2]
        if ch in "()":
            tokens.append(_Token(ch, ch, None, start + 1))
            i += 1
        elif two in ("==", "!="):
            tokens.append(_Token(two, two, None, start + 1))
            i += 2
        elif two == "&&":
            tokens.append(_Token("and", two, None, start + 1))
            i += 2
        elif two == "||":
            tokens.append(_Token("or", two, None, start + 1))
            i += 2
        elif ch == "!":
            tokens.append(_Token("not", ch, None, start + 1))
            i += 1
        elif ch == "=":
            fail("unexpected '='; compare with '=='", i)
        elif ch == "&":
            fail("unexpected '&'; write '&&' or 'and'", i)
        elif ch == "|":
            fail("unexpected '|'; write '||' or 'or'", i)
        elif ch == '"':
            i += 1
            chars: list[str] = []
            while True:
                if i >= n:
                    fail("unterminated string", start)
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\":
                    if i + 1 >= n:
                        fail("unterminated string", start)
                    escaped = text[i + 1]
                    if escaped not in '\\"':
                        fail(f"unknown escape '\\{escaped}' (only \\\\ and \\\" are allowed)", i)
                    chars.append(escaped)
                    i += 2
                else:
                    chars.append(c)
                    i += 1
            tokens.append(_Token("str", text[start:i], "".join(chars), start + 1))
        elif ch in _DIGITS:
            while i < n and text[i] in _DIGITS:
                i += 1
            if i < n and text[i] in _IDENT_START:
                fail(f"invalid integer {text[start : i + 1]!r}", start)
            digits = text[start:i]
            if len(digits.lstrip("0")) > 10:
                shown = digits if len(digits) <= 20 else digits[:17] + "..."
                fail(f"integer {shown} is out of range (0 to {_MAX_ID})", start)
            tokens.append(_Token("int", digits, int(digits), start + 1))
        elif ch in _IDENT_START:
            while True:
                while i < n and text[i] in _IDENT_CHARS:
                    i += 1
                if i + 1 < n and text[i] == "." and text[i + 1] in _IDENT_START:
                    i += 1
                    continue
                break
            word = text[start:i]
            tokens.append(_Token(_WORD_TOKENS.get(word, "name"), word, word, start + 1))
        else:
            fail(f"unexpected character {ch!r}", i)
    tokens.append(_Token("end", "", None, n + 1))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0
        self.depth = 0

    def fail(self, reason: str, column: int) -> NoReturn:
        raise RequirementSyntaxError(reason, self.text, column)

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def advance(self) -> _Token:
        token = self.tokens[self.pos]
        if token.kind != "end":
            self.pos += 1
        return token

    def nest(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            self.fail(f"requirement is nested more than {_MAX_DEPTH} levels deep", token.column)

    def parse(self) -> Requirement:
        result = self.parse_or()
        token = self.peek()
        if token.kind == ")":
            self.fail("unbalanced parentheses: ')' has no matching '('", token.column)
        if token.kind != "end":
            self.fail(
                f"unexpected {_describe(token)} after a complete requirement; "
                "expected 'and', 'or' or the end",
                token.column,
            )
        return result

    def parse_or(self) -> Requirement:
        parts = [self.parse_and()]
        while self.peek().kind == "or":
            self.advance()
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def parse_and(self) -> Requirement:
        parts = [self.parse_not()]
        while self.peek().kind == "and":
            self.advance()
            parts.append(self.parse_not())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def parse_not(self) -> Requirement:
        count = 0
        while self.peek().kind == "not":
            self.nest(self.advance())
            count += 1
        result = self.parse_primary()
        for _ in range(count):
            result = Not(result)
        self.depth -= count
        return result

    def parse_primary(self) -> Requirement:
        token = self.advance()
        if token.kind == "(":
            self.nest(token)
            result = self.parse_or()
            close = self.peek()
            if close.kind == "end":
                self.fail("unbalanced parentheses: this '(' is never closed", token.column)
            if close.kind != ")":
                self.fail(f"expected ')', 'and' or 'or', got {_describe(close)}", close.column)
            self.advance()
            self.depth -= 1
            return result
        if token.kind == "name":
            word = token.text
            if word in ("true", "any"):
                return Requirement.any()
            if word == "false":
                return Requirement.none()
            if word == "same_user":
                return Requirement.same_user()
            return self.parse_comparison(token)
        if token.kind == "end":
            self.fail("expected a requirement", token.column)
        self.fail(f"expected a requirement, got {_describe(token)}", token.column)

    def parse_comparison(self, name: _Token) -> Requirement:
        field = name.text
        is_int = field in _INT_FIELDS
        if not is_int and field not in _STR_FIELDS and not field.startswith(_SUBJECT_PREFIX):
            if field in ("cert", "cert.subject"):
                self.fail(f"{field} needs an attribute, e.g. cert.subject.CN", name.column)
            self.fail(f"unknown field {field!r}; fields are {_FIELD_LIST}", name.column)
        if field.startswith(_SUBJECT_PREFIX) and "." in field[len(_SUBJECT_PREFIX) :]:
            self.fail(f"unknown field {field!r}; fields are {_FIELD_LIST}", name.column)
        op = self.advance()
        if op.kind not in ("==", "!="):
            where = "" if op.kind == "end" else f", got {_describe(op)}"
            self.fail(f"expected '==' or '!=' after {field}{where}", op.column)
        token = self.advance()
        if token.kind not in ("int", "str"):
            where = "" if token.kind == "end" else f", got {_describe(token)}"
            self.fail(f"expected a value{where}", token.column)
        if is_int and token.kind != "int":
            self.fail(f"{field} expects an integer, got a string", token.column)
        if not is_int and token.kind != "str":
            self.fail(f"{field} expects a double-quoted string, got an integer", token.column)
        try:
            if isinstance(token.value, int):
                result = _INT_FIELDS[field](token.value)
            else:
                assert isinstance(token.value, str)
                if field.startswith(_SUBJECT_PREFIX):
                    attr = field[len(_SUBJECT_PREFIX) :]
                    result = Requirement.cert_subject(**{attr: token.value})
                else:
                    result = _STR_FIELDS[field](token.value)
        except ValueError as exc:
            self.fail(str(exc), token.column)
        return Not(result) if op.kind == "!=" else result


def requirement(text: str) -> Requirement:
    """Parse a requirement expression, e.g. ``'uid == 1000 and exe == "/usr/bin/agent"'``.

    Raises ``RequirementSyntaxError`` (a ``ValueError``) with the column of the first mistake.
    """
    if not isinstance(text, str):
        raise TypeError(f"requirement() takes a str, not {type(text).__name__}")
    return _Parser(text).parse()


def requirement_of(value: Requirement | str | None) -> Requirement | None:
    """``value`` as a Requirement: parsed if it is an expression string, None stays None."""
    if value is None or isinstance(value, Requirement):
        return value
    if isinstance(value, str):
        return requirement(value)
    raise TypeError(f"expected an xrpc.Requirement or an expression string, got {value!r}")
