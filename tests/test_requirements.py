"""Peer requirements: the factories, the combinators, the expression language and explain()."""

from __future__ import annotations

import grp
import os
import pickle
import pwd
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xrpc._errors import Error
from xrpc._peer import Peer
from xrpc._requirements import (
    And,
    Not,
    Or,
    Requirement,
    RequirementSyntaxError,
    requirement,
)

R = Requirement
FP = "ab" * 32
FP_COLONS = ":".join(["AB"] * 32)
NO_USER = "no-such-user-xrpc"
NO_GROUP = "no-such-group-xrpc"
ROOT_USER = pwd.getpwuid(0).pw_name
ROOT_GROUP = grp.getgrgid(0).gr_name


def unix(**kwargs: object) -> Peer:
    return Peer(transport="unix", **kwargs)  # type: ignore[arg-type]


def tls(**kwargs: object) -> Peer:
    return Peer(transport="tls", **kwargs)  # type: ignore[arg-type]


class Boom(Requirement):
    """A requirement that must never be evaluated."""

    def check(self, peer: Peer) -> bool:
        raise AssertionError("evaluated a requirement that should have been short-circuited")

    def __str__(self) -> str:
        return "boom"


# --- factories ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "peer", "expected"),
    [
        (R.uid(1000), unix(uid=1000), True),
        (R.uid(1000), unix(uid=1001), False),
        (R.uid(0), unix(uid=0), True),
        (R.gid(100), unix(gid=100), True),
        (R.gid(27), unix(gid=100, groups=(4, 27)), True),
        (R.gid(5), unix(gid=100, groups=(4, 27)), False),
        (R.gid(27), unix(groups=(27,)), True),
        (R.pid(42), unix(pid=42), True),
        (R.pid(42), unix(pid=43), False),
        (R.user(ROOT_USER), unix(uid=0), True),
        (R.user(ROOT_USER), unix(uid=1000), False),
        (R.user(NO_USER), unix(uid=0), False),
        (R.group(ROOT_GROUP), unix(gid=0), True),
        (R.group(ROOT_GROUP), unix(gid=100, groups=(0,)), True),
        (R.group(ROOT_GROUP), unix(gid=100, groups=(4,)), False),
        (R.group(NO_GROUP), unix(gid=0), False),
        (R.executable("/bin/sh"), unix(exe="/bin/sh"), True),
        (R.executable("/bin/sh"), unix(exe="/bin/../bin/sh"), True),
        (R.executable("/bin/sh"), unix(exe="/usr/bin/env"), False),
        (R.transport("unix"), unix(), True),
        (R.transport("tls"), unix(), False),
        (R.cert_subject(CN="client1"), tls(cert_subject={"CN": "client1", "O": "Acme"}), True),
        (R.cert_subject(CN="client1", O="Acme"), tls(cert_subject={"CN": "client1", "O": "Acme"}), True),
        (R.cert_subject(CN="client1", O="Other"), tls(cert_subject={"CN": "client1", "O": "Acme"}), False),
        (R.cert_subject(OU="x"), tls(cert_subject={"CN": "client1"}), False),
        (R.cert_san("example.com"), tls(cert_sans=("DNS:example.com",)), True),
        (R.cert_san("example.com"), tls(cert_sans=("example.com",)), True),
        (R.cert_san("DNS:example.com"), tls(cert_sans=("DNS:example.com",)), True),
        (R.cert_san("DNS:example.com"), tls(cert_sans=("example.com",)), True),
        (R.cert_san("DNS:example.com"), tls(cert_sans=("URI:example.com",)), False),
        (R.cert_san("example.com"), tls(cert_sans=("DNS:other.com", "DNS:sub.example.com")), False),
        (R.cert_san("https://x.test/a"), tls(cert_sans=("URI:https://x.test/a",)), True),
        (R.cert_san("::1"), tls(cert_sans=("IP Address:::1",)), True),
        (R.cert_fingerprint(FP), tls(cert_fingerprint=FP), True),
        (R.cert_fingerprint(FP_COLONS), tls(cert_fingerprint=FP), True),
        (R.cert_fingerprint(FP), tls(cert_fingerprint=FP_COLONS), True),
        (R.cert_fingerprint(FP), tls(cert_fingerprint="cd" * 32), False),
        (R.any(), unix(), True),
        (R.none(), unix(uid=0), False),
    ],
    ids=repr,
)
def test_factory(req: Requirement, peer: Peer, expected: bool) -> None:
    assert req.check(peer) is expected


def test_executable_resolves_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "agent"
    target.write_text("")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert R.executable(str(target)).check(unix(exe=str(link)))
    assert R.executable(link).check(unix(exe=str(target)))
    assert not R.executable(str(tmp_path / "other")).check(unix(exe=str(link)))


def test_same_user_is_read_at_check_time(monkeypatch: pytest.MonkeyPatch) -> None:
    req = R.same_user()
    assert req.check(unix(uid=os.getuid()))
    assert not req.check(unix(uid=os.getuid() + 1))
    monkeypatch.setattr(os, "getuid", lambda: 4242)
    assert req.check(unix(uid=4242))


def test_user_is_resolved_at_check_time(monkeypatch: pytest.MonkeyPatch) -> None:
    req = R.user("alice")
    assert not req.check(unix(uid=1234))

    class Entry:
        pw_uid = 1234

    def getpwnam(name: str) -> Entry:
        if name != "alice":
            raise KeyError(name)
        return Entry()

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    assert req.check(unix(uid=1234))


EVERY_LEAF = [
    R.uid(0),
    R.gid(0),
    R.pid(1),
    R.user(ROOT_USER),
    R.group(ROOT_GROUP),
    R.executable("/bin/sh"),
    R.same_user(),
    R.cert_subject(CN="x"),
    R.cert_san("example.com"),
    R.cert_fingerprint(FP),
]


@pytest.mark.parametrize("req", EVERY_LEAF, ids=str)
def test_missing_facts_are_unknown_and_fail_even_negated(req: Requirement) -> None:
    peer = Peer(transport="memory")
    assert req.evaluate(peer) is None
    assert (~req).evaluate(peer) is None
    assert req.check(peer) is False
    assert (~req).check(peer) is False
    assert req.explain(peer).endswith("(unknown)") and " failed: " in req.explain(peer)
    assert (~req).explain(peer).endswith("(unknown)") and " failed: " in (~req).explain(peer)


def test_facts_known_but_different_are_false_not_unknown() -> None:
    peer = unix(uid=0, gid=0, groups=(), exe="/bin/sh")
    assert R.user(NO_USER).evaluate(peer) is False
    assert (~R.user(NO_USER)).check(peer) is True
    assert R.group(NO_GROUP).evaluate(peer) is False
    assert (~R.gid(5)).check(peer) is True  # no supplementary groups: known
    assert (~R.gid(5)).evaluate(unix(uid=0, gid=0, groups=None)) is None  # groups unknown
    assert R.gid(0).evaluate(unix(uid=0, gid=0, groups=None)) is True
    subject = tls(cert_subject={"CN": "a"}, cert_fingerprint=FP)
    assert R.cert_san("x").evaluate(subject) is False  # a certificate without SANs
    assert R.cert_subject(O="x").evaluate(subject) is None  # an absent attribute
    two = tls(cert_subject=[("CN", "guest"), ("CN", "agent")], cert_fingerprint=FP)
    for value in ("guest", "agent", "other"):
        assert R.cert_subject(CN=value).evaluate(two) is None
        assert (~R.cert_subject(CN=value)).check(two) is False
    assert R.cert_subject(CN="agent").explain(two) == (
        'cert.subject.CN == "agent" failed: peer certificate subject has 2 CN values ("guest", "agent"), not one (unknown)'
    )


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda: R.uid(-1), ValueError),
        (lambda: R.uid(2**32), ValueError),
        (lambda: R.uid(True), TypeError),
        (lambda: R.gid("0"), TypeError),  # type: ignore[arg-type]
        (lambda: R.pid(1.0), TypeError),  # type: ignore[arg-type]
        (lambda: R.user(5), TypeError),  # type: ignore[arg-type]
        (lambda: R.executable("bin/sh"), ValueError),
        (lambda: R.executable("/bin/\0sh"), ValueError),
        (lambda: R.cert_subject(), ValueError),
        (lambda: R.cert_subject(**{"2.5.4.3": "x"}), ValueError),
        (lambda: R.cert_subject(CN=1), TypeError),  # type: ignore[arg-type]
        (lambda: R.cert_fingerprint("abc"), ValueError),
        (lambda: R.cert_fingerprint("zz" * 32), ValueError),
        (lambda: R.transport(None), TypeError),  # type: ignore[arg-type]
        (lambda: And((R.any(),)), ValueError),
        (lambda: Or((R.any(), "uid == 1")), TypeError),  # type: ignore[arg-type]
        (lambda: Not(1), TypeError),  # type: ignore[arg-type]
    ],
)
def test_factory_rejects_bad_values(call: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        call()  # type: ignore[operator]


# --- combinators --------------------------------------------------------------------------


def test_and_or_not() -> None:
    root = unix(uid=0, gid=0)
    user = unix(uid=1000, gid=1000)
    admin = R.uid(0) | R.gid(10)
    assert admin.check(root)
    assert not admin.check(user)
    assert (R.uid(1000) & R.gid(1000)).check(user)
    assert not (R.uid(1000) & R.gid(0)).check(user)
    assert (~R.uid(0)).check(user)
    assert not (~R.uid(0)).check(root)
    nested = (R.uid(0) | (R.uid(1000) & ~R.gid(0))) & R.transport("unix")
    assert nested.check(root)
    assert nested.check(user)
    assert not nested.check(unix(uid=1000, gid=0))
    assert not nested.check(Peer(transport="tcp", uid=0))


def test_combinators_build_flat_nodes() -> None:
    a, b, c = R.uid(1), R.uid(2), R.uid(3)
    assert a & b & c == And((a, b, c))
    assert a & (b & c) == And((a, b, c))
    assert a | b | c == Or((a, b, c))
    assert ~a == Not(a)
    assert ~~a == Not(Not(a))
    assert isinstance((a & b) | c, Or)
    assert (a & b).children == (a, b)  # type: ignore[attr-defined]


def test_combining_with_other_types_is_an_error() -> None:
    with pytest.raises(TypeError):
        R.uid(1) & True  # type: ignore[operator]
    with pytest.raises(TypeError):
        "uid == 1" | R.uid(1)  # type: ignore[operator]


def test_evaluation_short_circuits() -> None:
    peer = unix(uid=1)
    assert (R.none() & Boom()).check(peer) is False
    assert (R.any() | Boom()).check(peer) is True
    assert (R.uid(2) & Boom() & Boom()).check(peer) is False
    assert (R.uid(1) | Boom()).check(peer) is True
    assert (R.none() & Boom()).explain(peer) == "false failed: it matches no peer"
    assert (R.uid(1) | Boom()).explain(peer) == "uid == 1 passed: peer uid is 1"


def test_structural_equality_and_hash() -> None:
    assert R.uid(1) == R.uid(1)
    assert R.uid(1) != R.gid(1)
    assert R.uid(1) != R.pid(1)
    assert R.uid(1) & R.gid(2) != R.uid(1) | R.gid(2)
    assert R.cert_subject(O="Acme", CN="x") == R.cert_subject(CN="x", O="Acme")
    assert R.cert_fingerprint(FP_COLONS) == R.cert_fingerprint(FP)
    assert R.same_user() == R.same_user()
    assert R.any() != R.none()
    assert len({R.uid(1), R.uid(1), R.uid(1) & R.any(), R.uid(1) & R.any()}) == 2
    assert repr(R.uid(1) & R.user("x")) == "requirement('uid == 1 and user == \"x\"')"


def test_requirements_are_immutable() -> None:
    req = R.uid(1)
    with pytest.raises(AttributeError):
        req.value = 2  # type: ignore[attr-defined]


# --- the language -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("uid == 1000", R.uid(1000)),
        ("gid==27", R.gid(27)),
        ("pid == 007", R.pid(7)),
        ('user == "alice"', R.user("alice")),
        ('group == "wheel"', R.group("wheel")),
        ('exe == "/usr/bin/agent"', R.executable("/usr/bin/agent")),
        ('transport == "unix"', R.transport("unix")),
        ('cert.subject.CN == "client1"', R.cert_subject(CN="client1")),
        ('cert.subject.emailAddress == "a@b"', R.cert_subject(emailAddress="a@b")),
        ('cert.san == "DNS:example.com"', R.cert_san("DNS:example.com")),
        (f'cert.fingerprint == "{FP_COLONS}"', R.cert_fingerprint(FP)),
        ("same_user", R.same_user()),
        ("true", R.any()),
        ("any", R.any()),
        ("false", R.none()),
        ("uid != 0", ~R.uid(0)),
        ('user == "a\\"b\\\\c"', R.user('a"b\\c')),
        ('exe == "/odd path/ü"', R.executable("/odd path/ü")),
        ("  (\n uid == 1\t)  ", R.uid(1)),
        ("((uid == 1))", R.uid(1)),
    ],
)
def test_parse_leaves(text: str, expected: Requirement) -> None:
    assert requirement(text) == expected


def test_precedence() -> None:
    a, b, c = R.uid(1), R.uid(2), R.uid(3)
    assert requirement("uid == 1 or uid == 2 and uid == 3") == a | (b & c)
    assert requirement("uid == 1 and uid == 2 or uid == 3") == (a & b) | c
    assert requirement("(uid == 1 or uid == 2) and uid == 3") == (a | b) & c
    assert requirement("not uid == 1 and uid == 2") == ~a & b
    assert requirement("not (uid == 1 and uid == 2)") == ~(a & b)
    assert requirement("not not uid == 1") == ~~a
    assert requirement("uid == 1 or uid == 2 or uid == 3") == a | b | c
    assert requirement("uid == 1 and (uid == 2 and uid == 3)") == a & b & c


def test_symbol_synonyms() -> None:
    a, b, c = R.uid(1), R.uid(2), R.uid(3)
    assert requirement("uid == 1 || uid == 2 && uid == 3") == a | (b & c)
    assert requirement("!uid == 1 && uid == 2") == ~a & b
    assert requirement("!(uid==1||uid==2)") == ~(a | b)
    assert requirement("!!same_user") == ~~R.same_user()
    assert requirement("uid == 1 and uid == 2 && uid == 3") == a & b & c


def test_keywords_are_case_sensitive() -> None:
    with pytest.raises(RequirementSyntaxError, match="unknown field 'UID'"):
        requirement("UID == 1")
    with pytest.raises(RequirementSyntaxError):
        requirement("uid == 1 AND uid == 2")


@pytest.mark.parametrize(
    ("req", "text"),
    [
        (R.uid(1) & R.gid(2), "uid == 1 and gid == 2"),
        (R.uid(1) | R.gid(2) & R.pid(3), "uid == 1 or gid == 2 and pid == 3"),
        ((R.uid(1) | R.gid(2)) & R.pid(3), "(uid == 1 or gid == 2) and pid == 3"),
        (~(R.uid(1) | R.gid(2)), "not (uid == 1 or gid == 2)"),
        (~(R.uid(1) & R.gid(2)), "not (uid == 1 and gid == 2)"),
        (~R.uid(1) & R.gid(2), "uid != 1 and gid == 2"),
        (~~R.uid(1), "not uid != 1"),
        (~R.same_user(), "not same_user"),
        (~R.any() | R.none(), "not true or false"),
        (R.user('a"b\\'), 'user == "a\\"b\\\\"'),
        (R.cert_subject(CN="c", O="o"), 'cert.subject.CN == "c" and cert.subject.O == "o"'),
        (R.cert_fingerprint(FP_COLONS), f'cert.fingerprint == "{FP}"'),
    ],
)
def test_str(req: Requirement, text: str) -> None:
    assert str(req) == text
    assert requirement(text) == req


# --- malformed expressions ----------------------------------------------------------------


DEEP_PARENS = "(" * 101 + "true" + ")" * 101
DEEP_NOTS = "!" * 101 + "true"


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("uid == ", 8, "expected a value"),
        ("", 1, "expected a requirement"),
        ("   ", 4, "expected a requirement"),
        ("uid", 4, "expected '==' or '!=' after uid"),
        ("uid 5", 5, "expected '==' or '!=' after uid, got '5'"),
        ("foo == 1", 1, "unknown field 'foo'"),
        ("cert.subject.CN.x == \"a\"", 1, "unknown field"),
        ('cert.subject == "x"', 1, "cert.subject needs an attribute"),
        ('uid == "x"', 8, "uid expects an integer, got a string"),
        ("user == 5", 9, "user expects a double-quoted string, got an integer"),
        ('cert.subject.CN == 1', 20, "expects a double-quoted string"),
        ("uid == uid", 8, "expected a value, got 'uid'"),
        ('exe == "/bin/sh', 8, "unterminated string"),
        ('exe == "/bin/sh\\', 8, "unterminated string"),
        ('exe == "/a\\q"', 11, "unknown escape '\\q'"),
        ("(uid == 1", 1, "this '(' is never closed"),
        ("uid == 1 or\n(gid == 2", 13, "this '(' is never closed"),
        ("((uid == 1)", 1, "this '(' is never closed"),
        ("uid == 1)", 9, "')' has no matching '('"),
        ("(uid == 1 gid == 2)", 11, "expected ')', 'and' or 'or', got 'gid'"),
        ("uid == 1 uid == 2", 10, "unexpected 'uid' after a complete requirement"),
        ("same_user == 1", 11, "unexpected '==' after a complete requirement"),
        ("uid == 1 and", 13, "expected a requirement"),
        ("uid == 1 or or uid == 2", 13, "expected a requirement, got 'or'"),
        ("and uid == 1", 1, "expected a requirement, got 'and'"),
        ("not", 4, "expected a requirement"),
        ("()", 2, "expected a requirement, got ')'"),
        ("uid = 1", 5, "unexpected '='; compare with '=='"),
        ("uid == 1 & gid == 2", 10, "unexpected '&'"),
        ("uid == 1 | gid == 2", 10, "unexpected '|'"),
        ("uid < 5", 5, "unexpected character '<'"),
        ("uid == -1", 8, "unexpected character '-'"),
        ("uid == 12abc", 8, "invalid integer '12a'"),
        ("uid == 99999999999", 8, "out of range"),
        ("uid == 4294967296", 8, "uid 4294967296 is out of range"),
        ('cert.fingerprint == "zz"', 21, "64 hex digits"),
        ('exe == "bin/sh"', 8, "must be absolute"),
        ("cert.subject. == 1", 13, "unexpected character '.'"),
        (DEEP_PARENS, 101, "nested more than 100 levels deep"),
        (DEEP_NOTS, 101, "nested more than 100 levels deep"),
    ],
)
def test_syntax_errors(text: str, column: int, message: str) -> None:
    with pytest.raises(RequirementSyntaxError) as info:
        requirement(text)
    err = info.value
    assert err.column == column
    assert message in err.reason
    assert err.expression == text
    assert str(err).startswith(f"{err.reason} at column {column}\n")


def test_syntax_error_shows_a_caret() -> None:
    with pytest.raises(RequirementSyntaxError) as info:
        requirement("uid == ")
    assert str(info.value) == "expected a value at column 8\n  uid == \n         ^"
    lines = str(info.value).splitlines()
    assert lines[2].index("^") == 2 + 7


def test_syntax_error_caret_stays_aligned_across_newlines() -> None:
    with pytest.raises(RequirementSyntaxError) as info:
        requirement("uid == 1\n\tand foo == 2")
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert lines[1][lines[2].index("^") :].startswith("foo")


def test_syntax_error_is_a_value_error_and_pickles() -> None:
    with pytest.raises(RequirementSyntaxError) as info:
        requirement("uid ==")
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, Error)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, copy.expression, copy.column, str(copy)) == (
        err.reason,
        err.expression,
        err.column,
        str(err),
    )


def test_nesting_up_to_the_limit_is_accepted() -> None:
    assert requirement("(" * 100 + "true" + ")" * 100) == R.any()
    assert requirement("!" * 100 + "true").check(unix()) is True


def test_requirement_takes_text_only() -> None:
    with pytest.raises(TypeError):
        requirement(b"uid == 1")  # type: ignore[arg-type]


# --- explain() ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "peer", "text"),
    [
        (R.uid(1000), unix(uid=1001), "uid == 1000 failed: peer uid is 1001"),
        (R.uid(1000), unix(uid=1000), "uid == 1000 passed: peer uid is 1000"),
        (R.uid(1000), unix(), "uid == 1000 failed: peer has no uid (unknown)"),
        (~R.uid(0), unix(), "uid != 0 failed: peer has no uid (unknown)"),
        (~(R.uid(0) | R.gid(0)), unix(), "not (uid == 0 or gid == 0) failed: no alternative held: uid == 0 failed: peer has no uid (unknown); gid == 0 failed: peer has no gid and no supplementary groups (unknown)"),
        (R.uid(0) & R.transport("tcp") & R.pid(1), unix(pid=1), 'transport == "tcp" failed: peer transport is "unix"'),
        (R.uid(0) & R.pid(1), unix(pid=1), "uid == 0 failed: peer has no uid (unknown)"),
        (~R.uid(0), unix(uid=1001), "uid != 0 passed: peer uid is 1001"),
        (R.pid(7), unix(pid=8), "pid == 7 failed: peer pid is 8"),
        (
            R.gid(27),
            unix(gid=1000, groups=(4, 27)),
            "gid == 27 passed: peer gid is 1000, supplementary groups are 4, 27",
        ),
        (R.gid(27), unix(gid=1000), "gid == 27 failed: peer gid is 1000 and no supplementary groups"),
        (
            R.user(NO_USER),
            unix(uid=0),
            f'user == "{NO_USER}" failed: there is no user named "{NO_USER}"',
        ),
        (
            R.user(ROOT_USER),
            unix(uid=1001),
            f'user == "{ROOT_USER}" failed: user "{ROOT_USER}" is uid 0, peer uid is 1001',
        ),
        (
            R.group(ROOT_GROUP),
            unix(gid=0),
            f'group == "{ROOT_GROUP}" passed: group "{ROOT_GROUP}" is gid 0, '
            "peer gid is 0 and no supplementary groups",
        ),
        (R.executable("/bin/sh"), unix(), 'exe == "/bin/sh" failed: peer has no executable path (unknown)'),
        (R.transport("tls"), unix(), 'transport == "tls" failed: peer transport is "unix"'),
        (
            R.cert_subject(CN="client1"),
            tls(cert_subject={"CN": "client2"}),
            'cert.subject.CN == "client1" failed: peer certificate subject CN is "client2"',
        ),
        (
            R.cert_subject(CN="client1"),
            tls(),
            'cert.subject.CN == "client1" failed: peer certificate subject has no CN (unknown)',
        ),
        (
            R.cert_san("example.com"),
            tls(cert_sans=("DNS:a.test", "DNS:b.test")),
            'cert.san == "example.com" failed: peer certificate names are "DNS:a.test", "DNS:b.test"',
        ),
        (
            R.cert_san("example.com"),
            tls(),
            'cert.san == "example.com" failed: peer certificate has no subject alternative names (unknown)',
        ),
        (
            R.cert_fingerprint(FP),
            tls(cert_fingerprint=FP_COLONS),
            f'cert.fingerprint == "{FP}" passed: peer certificate fingerprint is {FP}',
        ),
        (
            R.cert_fingerprint(FP),
            tls(),
            f'cert.fingerprint == "{FP}" failed: peer has no certificate fingerprint (unknown)',
        ),
        (R.any(), unix(), "true passed: it matches every peer"),
        (R.none(), unix(), "false failed: it matches no peer"),
        (
            R.uid(1000) & R.transport("unix"),
            unix(uid=1001),
            "uid == 1000 failed: peer uid is 1001",
        ),
        (
            R.uid(1000) & R.transport("unix"),
            unix(uid=1000),
            'uid == 1000 passed: peer uid is 1000; transport == "unix" passed: peer transport is "unix"',
        ),
        (
            R.uid(0) | R.gid(0),
            unix(uid=5, gid=5),
            "no alternative held: uid == 0 failed: peer uid is 5; "
            "gid == 0 failed: peer gid is 5 and no supplementary groups",
        ),
        (R.uid(0) | R.gid(5), unix(uid=5, gid=5), "gid == 5 passed: peer gid is 5 and no supplementary groups"),
        (
            ~(R.uid(0) & R.gid(5)),
            unix(uid=5, gid=5),
            "not (uid == 0 and gid == 5) passed: uid == 0 failed: peer uid is 5",
        ),
    ],
)
def test_explain(req: Requirement, peer: Peer, text: str) -> None:
    assert req.explain(peer) == text


def test_explain_same_user() -> None:
    me = os.getuid()
    assert R.same_user().explain(unix(uid=me)) == (
        f"same_user passed: this process runs as uid {me}, peer uid is {me}"
    )
    assert R.same_user().explain(unix()) == "same_user failed: peer has no uid (unknown)"


def test_explain_executable_shows_resolution(tmp_path: Path) -> None:
    target = tmp_path / "agent"
    target.write_text("")
    link = tmp_path / "link"
    link.symlink_to(target)
    text = R.executable(str(link)).explain(unix(exe=str(target)))
    assert text == (
        f'exe == "{link}" passed: peer executable is "{target}", "{link}" resolves to "{target}"'
    )


def test_explain_on_a_custom_requirement_without_detail() -> None:
    class Always(Requirement):
        def check(self, peer: Peer) -> bool:
            return True

        def __str__(self) -> str:
            return "always"

    assert Always().explain(unix()) == "always passed"


# --- properties ---------------------------------------------------------------------------


IDS = st.sampled_from([0, 1, 1000, 1001]) | st.integers(0, 2**32 - 1)
PEER_IDS = st.none() | st.sampled_from([0, 1, 1000, 1001])
NAMES = st.sampled_from([ROOT_USER, "daemon", NO_USER, ""]) | st.text(max_size=8)
GROUPS = st.sampled_from([ROOT_GROUP, "daemon", NO_GROUP]) | st.text(max_size=8)
PATHS = st.sampled_from(["/bin/sh", "/usr/bin/env", "/nonexistent/agent", "/bin/../bin/sh"])
EXES = PATHS | st.text(max_size=12).filter(lambda s: "\0" not in s).map(lambda s: "/" + s)
TRANSPORTS = st.sampled_from(["unix", "tcp", "tls", "memory"])
ATTRS = st.sampled_from(["CN", "O", "OU"]) | st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
VALUES = st.sampled_from(["client1", "Acme", 'we"ird\\']) | st.text(max_size=8)
SANS = st.sampled_from(["example.com", "DNS:example.com", "URI:example.com", "IP:::1", "::1"])
FPS = st.sampled_from([FP, FP_COLONS, "cd" * 32])


def _fingerprint_variant(raw: bytes, upper: bool, colons: bool) -> str:
    text = raw.hex().upper() if upper else raw.hex()
    return ":".join(text[i : i + 2] for i in range(0, 64, 2)) if colons else text


LEAVES = st.one_of(
    IDS.map(R.uid),
    IDS.map(R.gid),
    IDS.map(R.pid),
    NAMES.map(R.user),
    GROUPS.map(R.group),
    EXES.map(R.executable),
    st.just(R.same_user()),
    st.dictionaries(ATTRS, VALUES, min_size=1, max_size=3).map(lambda d: R.cert_subject(**d)),
    (SANS | st.text(max_size=8)).map(R.cert_san),
    FPS.map(R.cert_fingerprint),
    st.builds(_fingerprint_variant, st.binary(min_size=32, max_size=32), st.booleans(), st.booleans()).map(
        R.cert_fingerprint
    ),
    (TRANSPORTS | st.text(max_size=8)).map(R.transport),
    st.just(R.any()),
    st.just(R.none()),
)

TREES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.tuples(children, children).map(lambda t: t[0] & t[1]),
        st.tuples(children, children).map(lambda t: t[0] | t[1]),
        children.map(lambda r: ~r),
    ),
    max_leaves=12,
)

PEERS = st.builds(
    Peer,
    transport=TRANSPORTS,
    uid=PEER_IDS | st.just(os.getuid()),
    gid=PEER_IDS,
    pid=PEER_IDS,
    groups=st.none() | st.lists(st.sampled_from([0, 1, 4, 27, 1000]), max_size=3).map(tuple),
    exe=st.none() | PATHS,
    cert_subject=st.lists(st.tuples(st.sampled_from(["CN", "O", "OU"]), VALUES), max_size=3),
    cert_sans=st.lists(SANS, max_size=3).map(tuple),
    cert_fingerprint=st.none() | FPS,
)


@settings(max_examples=300, deadline=None)
@given(TREES, st.lists(PEERS, min_size=1, max_size=5))
def test_str_round_trip(req: Requirement, peers: list[Peer]) -> None:
    text = str(req)
    parsed = requirement(text)
    assert parsed == req
    assert hash(parsed) == hash(req)
    assert str(parsed) == text
    for peer in peers:
        assert parsed.check(peer) == req.check(peer)
        assert parsed.explain(peer) == req.explain(peer)


@settings(max_examples=200, deadline=None)
@given(TREES, PEERS)
def test_algebra(req: Requirement, peer: Peer) -> None:
    result = req.evaluate(peer)
    assert result in (True, False, None)
    assert req.check(peer) is (result is True)
    assert (~req).evaluate(peer) is (None if result is None else not result)
    assert (~~req).evaluate(peer) is result
    assert (req & R.any()).evaluate(peer) is result
    assert (req | R.none()).evaluate(peer) is result
    assert (req & R.none()).evaluate(peer) is False
    assert (req | R.any()).evaluate(peer) is True
    # a requirement and its negation never both admit: at most one of them passes
    assert not (req.check(peer) and (~req).check(peer))
    assert req.explain(peer)


TOKENS = st.sampled_from(
    ["uid", "gid", "exe", "cert.subject.CN", "cert.san", "==", "!=", "and", "or", "not", "&&",
     "||", "!", "(", ")", "1", '"/x"', '"a', "\\", "=", "&", " ", "true", "same_user", "."]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(TOKENS, max_size=12).map(" ".join) | st.text(max_size=30))
def test_parser_only_raises_syntax_errors(text: str) -> None:
    try:
        parsed = requirement(text)
    except RequirementSyntaxError as err:
        assert 1 <= err.column <= len(text) + 1
        assert err.expression == text
    else:
        assert requirement(str(parsed)) == parsed
