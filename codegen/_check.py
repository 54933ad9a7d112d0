"""Compatibility check: every change between two schemas, judged in both directions.

Theory of operation
-------------------
A change is judged by what happens on the wire, for two pairs of peers:

* **backward** -- an *old client* (built from OLD) calls a *new server* (built from NEW).  This is the
  default question: can the server be upgraded first?
* **forward** -- a *new client* calls an *old server*.  Can clients be upgraded first?

Values flow one way through each slot.  Arguments and client-stream items go client -> server
("in"); replies and server-stream items go server -> client ("out").  The type walker reports each
elementary change with two facts: does every OLD value fit the NEW type (``old_in_new``), and does
every NEW value fit the OLD type (``new_in_old``).  Then:

=========  ======================  ======================
flow       backward needs          forward needs
=========  ======================  ======================
in         old_in_new (widening)   new_in_old (narrowing)
out        new_in_old (narrowing)  old_in_new (widening)
=========  ======================  ======================

So a widened parameter type and a narrowed reply type are backward compatible, and the reverse is
breaking.  The wire facts the walker relies on: records travel as maps (or arrays when array-like),
a receiver ignores map keys and trailing array elements it does not know, fills in missing fields
that have defaults, and an integer is accepted where a float is expected.  Arguments travel by
position, so a renamed parameter is wire compatible and a moved one is not.

The walker reads JSON Schema fragments through ``_types``; it is pure and never imports user code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import msgspec

from ._document import X_INTERFACE, X_KEYS, AllowedDoc, InterfaceDoc, MethodDoc, ParamDoc, SchemaDoc, parse_schema
from ._types import Record, datetime_tz, describe, kind, members, resolve, sub

__all__ = ("Change", "Direction", "compare", "has_breaking")

Direction = Literal["backward", "forward", "both"]
Flow = Literal["in", "out"]

_BY_POSITION = "arguments travel by position, and a proxy refuses a peer whose parameter names differ position by position"
_BY_NAME = "a proxy compares the peer's parameter names position by position and refuses the call (xrpc.ValidationError)"

DIRECTION_TEXT = {
    "backward": "old client -> new server",
    "forward": "new client -> old server",
    "both": "old client -> new server and new client -> old server",
}


@dataclasses.dataclass(frozen=True)
class Change:
    """One difference between two schemas and its verdict for each direction."""

    interface: str
    method: str | None
    change: str
    backward: bool  # an old client keeps working against the new server
    forward: bool  # a new client keeps working against the old server
    backward_reason: str
    forward_reason: str

    def ok(self, direction: Direction = "backward") -> bool:
        if direction == "backward":
            return self.backward
        if direction == "forward":
            return self.forward
        return self.backward and self.forward

    def verdict(self, direction: Direction = "backward") -> str:
        return "compatible" if self.ok(direction) else "breaking"

    def reason(self, direction: Direction = "backward") -> str:
        if direction == "backward":
            return self.backward_reason
        if direction == "forward":
            return self.forward_reason
        if self.backward_reason == self.forward_reason:
            return self.backward_reason
        return f"old client -> new server: {self.backward_reason}; new client -> old server: {self.forward_reason}"

    def to_dict(self, direction: Direction = "backward") -> dict[str, Any]:
        return {
            "interface": self.interface,
            "method": self.method,
            "change": self.change,
            "verdict": self.verdict(direction),
            "reason": self.reason(direction),
            "old_client_new_server": self.verdict("backward"),
            "new_client_old_server": self.verdict("forward"),
        }


def has_breaking(changes: list[Change], direction: Direction = "backward") -> bool:
    return any(not c.ok(direction) for c in changes)


def compare(old: SchemaDoc | dict[str, Any], new: SchemaDoc | dict[str, Any]) -> list[Change]:
    """Every change from ``old`` to ``new``, in schema order."""
    if not isinstance(old, SchemaDoc):
        old = parse_schema(old, "OLD")
    if not isinstance(new, SchemaDoc):
        new = parse_schema(new, "NEW")
    return _Checker(old, new).run()


# --------------------------------------------------------------------------- type walker
@dataclasses.dataclass(frozen=True)
class _Elem:
    path: str
    detail: str
    old_in_new: bool
    new_in_old: bool
    note: str = ""  # shown with either verdict
    why_old: str = ""  # why an old value may not fit the new type
    why_new: str = ""  # why a new value may not fit the old type


def _rel_word(old_in_new: bool, new_in_old: bool) -> str:
    if old_in_new and not new_in_old:
        return "widened"
    if new_in_old and not old_in_new:
        return "narrowed"
    return "changed" if old_in_new else "changed incompatibly"


_FAMILY = {
    "integer": "number",
    "number": "number",
    "string": "string",
    "uuid": "string",
    "decimal": "string",
    "date": "string",
    "time": "string",
    "timedelta": "string",
    "datetime": "string",
    "bytes": "bytes",
    "array": "array",
    "tuple": "array",
    "dict": "object",
    "record": "record",
    "enum": "enum",
    "boolean": "boolean",
    "null": "null",
}


class _Types:
    """Structural diff of two fragments, OLD read against OLD's $defs and NEW against NEW's."""

    def __init__(self, old_defs: dict[str, dict[str, Any]], new_defs: dict[str, dict[str, Any]]) -> None:
        self.od = old_defs
        self.nd = new_defs
        self.active: set[tuple[str, str]] = set()

    def old_in_new(self, o: dict[str, Any], n: dict[str, Any]) -> bool:
        return all(e.old_in_new for e in self.diff(o, n, ""))

    def new_in_old(self, o: dict[str, Any], n: dict[str, Any]) -> bool:
        return all(e.new_in_old for e in self.diff(o, n, ""))

    def diff(self, o: dict[str, Any], n: dict[str, Any], path: str) -> list[_Elem]:
        ro, oname = resolve(o, self.od)
        rn, nname = resolve(n, self.nd)
        if oname is not None and nname is not None:
            key = (oname, nname)
            if key in self.active:
                return []  # a recursive type: assume the pair matches (coinductively)
            self.active.add(key)
            try:
                return self._diff(ro, oname, rn, nname, path)
            finally:
                self.active.discard(key)
        return self._diff(ro, oname, rn, nname, path)

    def _diff(self, o: dict[str, Any], oname: str | None, n: dict[str, Any], nname: str | None, path: str) -> list[_Elem]:
        ko = kind(o, oname is not None)
        kn = kind(n, nname is not None)
        anyish = ("any", "object")
        if ko in anyish and kn in anyish:
            return []
        if ko == "union" or kn == "union":
            return self._union(o, n, path)
        if ko in anyish or kn in anyish:
            widen = kn in anyish
            return [_Elem(path, f"type {_rel_word(widen, not widen)} from {self._d(o, 'o')} to {self._d(n, 'n')}", widen, not widen)]
        if ko != kn:
            a, b = self._cross(o, ko, n, kn)
            return [_Elem(path, f"type {_rel_word(a, b)} from {self._d(o, 'o')} to {self._d(n, 'n')}", a, b)]
        if ko == "enum":
            return self._enum(o, n, path)
        if ko in ("integer", "number"):
            return self._constraints(o, n, path, "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
        if ko == "string":
            return self._constraints(o, n, path, "minLength", None, "maxLength", None, pattern=True)
        if ko == "bytes":
            return self._constraints(o, n, path, "minLength", None, "maxLength", None)
        if ko in ("datetime", "time"):
            to, tn = datetime_tz(o), datetime_tz(n)
            if to == tn:
                return []
            names = {None: "any timezone", True: "aware only", False: "naive only"}
            a = tn is None or to == tn
            b = to is None or to == tn
            return [_Elem(path, f"{ko} {_rel_word(a, b)} from {names[to]} to {names[tn]}", a, b)]
        if ko == "array":
            out = self._constraints(o, n, path, "minItems", None, "maxItems", None)
            return out + self.diff(_items(o), _items(n), path + "[]")
        if ko == "tuple":
            po, pn = o.get("prefixItems", []), n.get("prefixItems", [])
            if len(po) != len(pn):
                return [_Elem(path, f"tuple length changed from {len(po)} to {len(pn)}", False, False)]
            return [e for i, (a, b) in enumerate(zip(po, pn)) for e in self.diff(a, b, f"{path}[{i}]")]
        if ko == "dict":
            out = self._constraints(o, n, path, "minProperties", None, "maxProperties", None)
            string: dict[str, Any] = {"type": "string"}
            keys_o, keys_n = sub(o, X_KEYS, string), sub(n, X_KEYS, string)
            out += [dataclasses.replace(e, detail="keys: " + e.detail) for e in self.diff(keys_o, keys_n, path + "{}")]
            return out + self.diff(sub(o, "additionalProperties"), sub(n, "additionalProperties"), path + "{}")
        if ko == "record":
            return self._record(o, oname, n, nname, path)
        if ko == "interface" and o.get(X_INTERFACE) != n.get(X_INTERFACE):
            return [_Elem(path, f"interface passed by reference changed from {o.get(X_INTERFACE)} to {n.get(X_INTERFACE)}", False, False)]
        return []

    def _d(self, s: dict[str, Any], side: str) -> str:
        return describe(s, self.od if side == "o" else self.nd)

    # ------------------------------------------------------------------ kinds that differ
    def _cross(self, o: dict[str, Any], ko: str, n: dict[str, Any], kn: str) -> tuple[bool, bool]:
        """(old in new, new in old) for two fragments of different kinds."""

        def within(a: dict[str, Any], ka: str, b: dict[str, Any], kb: str, a_is_old: bool) -> bool:
            if ka == "integer" and kb == "number":
                return True  # msgspec accepts an int where a float is expected
            if ka == "enum":
                values = a.get("enum", [])
                if kb == "string":
                    return all(isinstance(v, str) for v in values)
                if kb in ("integer", "number"):
                    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            if kb == "string" and ka in ("uuid", "decimal", "date", "time", "timedelta"):
                return True  # these travel as strings
            if kb == "string" and ka == "datetime":
                return datetime_tz(a) is False  # a naive datetime travels as a string, an aware one does not
            if ka == "tuple" and kb == "array":
                items = _items(b)
                if a_is_old:
                    return all(self.old_in_new(x, items) for x in a.get("prefixItems", []))
                return all(self.new_in_old(items, x) for x in a.get("prefixItems", []))
            return False

        return within(o, ko, n, kn, True), within(n, kn, o, ko, False)

    # ------------------------------------------------------------------ unions
    def _union(self, o: dict[str, Any], n: dict[str, Any], path: str) -> list[_Elem]:
        mo = members(o) if "anyOf" in o else [o]
        mn = members(n) if "anyOf" in n else [n]
        pairs, lone_o, lone_n = self._pair(mo, mn)
        out: list[_Elem] = []
        for a, b in pairs:
            out += self.diff(a, b, path)
        for a in lone_o:
            covered = any(self.old_in_new(a, b) for b in mn)
            if not covered:
                out.append(_Elem(path, f"type no longer includes {self._d(a, 'o')}", False, True))
        for b in lone_n:
            covered = any(self.new_in_old(a, b) for a in mo)
            if not covered:
                out.append(_Elem(path, f"type now includes {self._d(b, 'n')}", True, False))
        return out

    def _pair(
        self, mo: list[dict[str, Any]], mn: list[dict[str, Any]]
    ) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Pair union members: same $defs name, else same kind, else same family (one candidate each)."""
        lone_o, lone_n = list(mo), list(mn)
        pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []

        def take(key_o: Any, key_n: Any) -> None:
            for a in list(lone_o):
                ka = key_o(a)
                if ka is None:
                    continue
                same_o = [x for x in lone_o if key_o(x) == ka]
                same_n = [x for x in lone_n if key_n(x) == ka]
                if len(same_o) == 1 and len(same_n) == 1:
                    pairs.append((a, same_n[0]))
                    lone_o.remove(a)
                    lone_n.remove(same_n[0])

        take(lambda s: resolve(s, self.od)[1], lambda s: resolve(s, self.nd)[1])

        def kind_of(defs: dict[str, dict[str, Any]]) -> Any:
            def f(s: dict[str, Any]) -> str:
                r, name = resolve(s, defs)
                return kind(r, name is not None)

            return f

        take(kind_of(self.od), kind_of(self.nd))
        take(lambda s: _FAMILY.get(kind_of(self.od)(s)), lambda s: _FAMILY.get(kind_of(self.nd)(s)))
        return pairs, lone_o, lone_n

    # ------------------------------------------------------------------ enums, constraints
    def _enum(self, o: dict[str, Any], n: dict[str, Any], path: str) -> list[_Elem]:
        def keyed(s: dict[str, Any]) -> dict[str, Any]:
            return {f"{type(v).__name__}:{v!r}": v for v in s.get("enum", [])}

        vo, vn = keyed(o), keyed(n)
        title = f"enum {n.get('title') or o.get('title')}" if (n.get("title") or o.get("title")) else "literal"
        out = []
        removed = [vo[k] for k in vo if k not in vn]
        added = [vn[k] for k in vn if k not in vo]
        if removed:
            out.append(_Elem(path, f"{title}: value{'s' if len(removed) > 1 else ''} {', '.join(map(repr, removed))} removed", False, True))
        if added:
            out.append(_Elem(path, f"{title}: value{'s' if len(added) > 1 else ''} {', '.join(map(repr, added))} added", True, False))
        return out

    def _constraints(
        self,
        o: dict[str, Any],
        n: dict[str, Any],
        path: str,
        lo: str,
        lo_ex: str | None,
        hi: str,
        hi_ex: str | None,
        pattern: bool = False,
    ) -> list[_Elem]:
        keys = [k for k in (lo, lo_ex, hi, hi_ex, "multipleOf", "pattern" if pattern else None) if k is not None]
        co = {k: o[k] for k in keys if k in o}
        cn = {k: n[k] for k in keys if k in n}
        if co == cn:
            return []

        def bound(s: dict[str, Any], inclusive: str, exclusive: str | None) -> tuple[float, bool] | None:
            if exclusive is not None and exclusive in s:
                return float(s[exclusive]), True
            if inclusive in s:
                return float(s[inclusive]), False
            return None

        def lower_within(inner: tuple[float, bool] | None, outer: tuple[float, bool] | None) -> bool:
            if outer is None:
                return True
            if inner is None:
                return False
            return inner[0] > outer[0] or (inner[0] == outer[0] and (inner[1] or not outer[1]))

        def upper_within(inner: tuple[float, bool] | None, outer: tuple[float, bool] | None) -> bool:
            if outer is None:
                return True
            if inner is None:
                return False
            return inner[0] < outer[0] or (inner[0] == outer[0] and (inner[1] or not outer[1]))

        def within(inner: dict[str, Any], outer: dict[str, Any]) -> bool:
            ok = lower_within(bound(inner, lo, lo_ex), bound(outer, lo, lo_ex))
            ok = ok and upper_within(bound(inner, hi, hi_ex), bound(outer, hi, hi_ex))
            mo, mi = outer.get("multipleOf"), inner.get("multipleOf")
            if mo is not None:
                ok = ok and mi is not None and (mi / mo) == int(mi / mo)
            if pattern and outer.get("pattern") is not None:
                ok = ok and inner.get("pattern") == outer.get("pattern")
            return ok

        a, b = within(o, n), within(n, o)
        text = ", ".join(f"{k} {co.get(k, '-')} -> {cn.get(k, '-')}" for k in keys if co.get(k) != cn.get(k))
        return [_Elem(path, f"constraints {_rel_word(a, b)} ({text})", a, b)]

    # ------------------------------------------------------------------ records
    def _record(self, o: dict[str, Any], oname: str | None, n: dict[str, Any], nname: str | None, path: str) -> list[_Elem]:
        ro, rn = Record(o, oname), Record(n, nname)
        title = rn.title if rn.title == ro.title else f"{ro.title}/{rn.title}"
        if ro.positional != rn.positional:
            how = {True: "an array", False: "a map"}
            return [_Elem(path, f"{title} now travels as {how[rn.positional]} instead of {how[ro.positional]}", False, False)]
        out: list[_Elem] = []
        if (ro.tag_field, ro.tag) != (rn.tag_field, rn.tag):
            out.append(_Elem(path, f"{title}: tag changed from {ro.tag_field}={ro.tag!r} to {rn.tag_field}={rn.tag!r}", False, False))
        fo = {wire: (py, frag, req) for wire, py, frag, req in ro.fields}
        fn = {wire: (py, frag, req) for wire, py, frag, req in rn.fields}

        def label(wire: str, py: str) -> str:
            return f"field {py!r} (position {int(wire) + 1})" if rn.positional else f"field {wire!r}"

        for wire, (py, frag, req) in fn.items():
            at = f"{path}.{py}" if path else py
            if wire not in fo:
                if req:
                    out.append(
                        _Elem(
                            path,
                            f"{label(wire, py)} added to {title} without a default",
                            False,
                            not ro.forbid_unknown,
                            why_old=f"values of the old {title} do not carry it",
                            why_new=f"the old {title} refuses unknown fields",
                        )
                    )
                else:
                    out.append(
                        _Elem(path, f"{label(wire, py)} added to {title} with a default", True, not ro.forbid_unknown, why_new=f"the old {title} refuses unknown fields")
                    )
                continue
            _, ofrag, oreq = fo[wire]
            if oreq and not req:
                out.append(_Elem(at, f"{label(wire, py)} of {title} now has a default", True, not rn.omit_defaults, why_new="new values may omit it (omit_defaults)"))
            elif req and not oreq:
                out.append(_Elem(at, f"{label(wire, py)} of {title} no longer has a default", False, True, why_old="values that omit it are refused"))
            elif "default" in ofrag and "default" in frag and msgspec.json.encode(ofrag["default"]) != msgspec.json.encode(frag["default"]):
                out.append(_Elem(at, f"default of {label(wire, py)} of {title} changed", True, True, note="a receiver fills it in only when the value omits it"))
            out += [dataclasses.replace(e, detail=f"{label(wire, py)} of {title}: {e.detail}") if e.path == at else e for e in self.diff(ofrag, frag, at)]
        for wire, (py, frag, req) in fo.items():
            if wire not in fn:
                out.append(
                    _Elem(
                        path,
                        f"{label(wire, py)} removed from {title}",
                        not rn.forbid_unknown,
                        not req,
                        why_old=f"the new {title} refuses unknown fields",
                        why_new=f"the old {title} requires it",
                    )
                )
        return out


def _items(s: dict[str, Any]) -> dict[str, Any]:
    return sub(s, "items")


# --------------------------------------------------------------------------- interfaces
_CONSEQUENCE = {
    ("in", "backward", True): "the new server accepts every value an old client sends",
    ("in", "backward", False): "an old client may send a value the new server refuses",
    ("in", "forward", True): "the old server accepts every value a new client sends",
    ("in", "forward", False): "a new client may send a value the old server refuses",
    ("out", "backward", True): "old clients accept every value the new server sends",
    ("out", "backward", False): "the new server may send a value old clients refuse",
    ("out", "forward", True): "new clients accept every value the old server sends",
    ("out", "forward", False): "the old server may send a value new clients refuse",
}


class _Checker:
    def __init__(self, old: SchemaDoc, new: SchemaDoc) -> None:
        self.old = old
        self.new = new
        self.types = _Types(old.defs, new.defs)
        self.out: list[Change] = []

    def add(self, iface: str, method: str | None, change: str, backward: bool, forward: bool, why_b: str, why_f: str) -> None:
        self.out.append(Change(iface, method, change, backward, forward, why_b, why_f))

    def run(self) -> list[Change]:
        old = {i.name: i for i in self.old.interfaces}
        new = {i.name: i for i in self.new.interfaces}
        for name, oi in old.items():
            if name not in new:
                self.add(name, None, "interface removed", False, True, "old clients' calls to it fail with xrpc.ObjectNotFound or MethodNotFound", "new clients do not use it")
            else:
                self.interface(oi, new[name])
        for name in new:
            if name not in old:
                self.add(name, None, "interface added", True, False, "old clients do not use it", "the old server does not export it")
        return self.out

    def interface(self, o: InterfaceDoc, n: InterfaceDoc) -> None:
        name = n.name
        eo = {e.name: e for e in o.errors}
        en = {e.name: e for e in n.errors}
        for ename, e in eo.items():
            if ename not in en:
                self.add(
                    name,
                    None,
                    f"declared error {ename!r} removed",
                    False,
                    True,
                    f"if the new server still raises it, old clients get xrpc.RemoteError instead of {ename}",
                    "new clients do not expect it",
                )
            else:
                fo, fn = e.fields, en[ename].fields
                if fo is not None and fn is not None:
                    so = [(f.name, f.required) for f in fo]
                    sn = [(f.name, f.required) for f in fn]
                    if so != sn:
                        why = f"the caller rebuilds {ename} from its arguments; if they do not fit its class, it gets xrpc.RemoteError"
                        self.add(name, None, f"arguments of declared error {ename!r} changed", False, False, why, why)
        for ename in en:
            if ename not in eo:
                self.add(
                    name,
                    None,
                    f"declared error {ename!r} added",
                    True,
                    True,
                    f"old clients receive {ename} as xrpc.RemoteError, like any undeclared exception",
                    "the old server never raises it as a declared error",
                )
        mo = {m.name: m for m in o.methods}
        mn = {m.name: m for m in n.methods}
        for mname, m in mo.items():
            if mname not in mn:
                self.add(name, mname, "method removed", False, True, "old clients calling it get xrpc.MethodNotFound", "new clients do not call it")
            else:
                self.method(name, m, mn[mname])
        for mname in mn:
            if mname not in mo:
                self.add(name, mname, "method added", True, False, "old clients do not call it", "new clients calling it get xrpc.MethodNotFound from the old server")

    def method(self, iface: str, o: MethodDoc, n: MethodDoc) -> None:
        def add(change: str, b: bool, f: bool, why_b: str, why_f: str) -> None:
            self.add(iface, n.name, change, b, f, why_b, why_f)

        same_kind = o.kind == n.kind
        if not same_kind:
            detail = f"kind changed from {o.kind} to {n.kind}"
            if {o.kind, n.kind} == {"unary", "oneway"}:
                detail = "one-way method became two-way" if o.kind == "oneway" else "two-way method became one-way"
            why = "the handshake announces each method's kind and the call fails at once (xrpc.ValidationError); a server refuses a call of the wrong kind"
            add(detail, False, False, why, why)
        if o.requirement != n.requirement:
            if n.requirement is None:
                add("requirement removed", True, True, "every peer is now allowed", "new clients were allowed before only if they met it")
            elif o.requirement is None:
                add(f"requirement {n.requirement!r} added", False, True, "old clients that do not meet it get xrpc.PeerRejected", "the old server does not check it")
            else:
                add(
                    f"requirement changed from {o.requirement!r} to {n.requirement!r}",
                    False,
                    True,
                    "a peer allowed before may be refused now (xrpc.PeerRejected)",
                    "the old server checks its own requirement",
                )
        self.params(iface, n.name, o, n)
        if same_kind:
            self.reply(iface, n.name, o, n)

    def params(self, iface: str, method: str, o: MethodDoc, n: MethodDoc) -> None:
        """Parameters are matched by position, as xrpc matches them: arguments travel as an array in
        declaration order, and a proxy compares the peer's parameter names position by position."""

        def add(change: str, b: bool, f: bool, why_b: str, why_f: str) -> None:
            self.add(iface, method, change, b, f, why_b, why_f)

        onames = [p.name for p in o.params]
        nnames = [p.name for p in n.params]
        paired: set[int] = set()
        pairs: list[tuple[ParamDoc, ParamDoc]] = []
        for i, op in enumerate(o.params):
            if op.name in nnames:
                j = nnames.index(op.name)
                paired.add(j)
                pairs.append((op, n.params[j]))
                if i != j:
                    add(f"parameter {op.name!r} moved from position {i + 1} to {j + 1}", False, False, _BY_POSITION, _BY_POSITION)
            elif i < len(n.params) and n.params[i].name not in onames:
                paired.add(i)
                pairs.append((op, n.params[i]))
                add(f"parameter {op.name!r} renamed to {n.params[i].name!r}", False, False, _BY_NAME, _BY_NAME)
            elif not op.stream:  # a stream parameter that goes away changes the method's kind
                add(
                    f"parameter {op.name!r} removed",
                    False,
                    not op.required,
                    "old clients that pass it get xrpc.ValidationError (the new server has nowhere to put it)",
                    "the old server uses its default" if not op.required else "the old server requires it",
                )
        for j, np in enumerate(n.params):
            if j in paired or np.stream:
                continue
            if np.required:
                add(
                    f"parameter {np.name!r} added without a default",
                    False,
                    False,
                    "old clients do not send it and the new server requires it",
                    "new clients must pass it and the old server has no such parameter (xrpc.ValidationError)",
                )
            else:
                add(
                    f"parameter {np.name!r} added with a default",
                    True,
                    False,
                    "old clients do not send it and the new server uses its default",
                    "new clients that pass it get xrpc.ValidationError from the old server's signature",
                )
        for op, np in pairs:
            if op.stream and np.stream:
                self.slot(iface, method, f"client stream items ({np.name!r})", op.type, op.allowed, np.type, np.allowed, "in")
                continue
            if op.stream or np.stream:
                continue  # reported as a change of kind
            label = f"parameter {np.name!r}"
            if op.required and not np.required:
                add(
                    f"{label} now has a default",
                    True,
                    False,
                    "old clients always send it",
                    "new clients leave a trailing argument out when it has its default, and the old server requires it",
                )
            elif np.required and not op.required:
                add(
                    f"{label} no longer has a default",
                    False,
                    True,
                    "old clients leave a trailing argument out when it has its default, and the new server requires it",
                    "new clients always send it",
                )
            elif not isinstance(op.default, msgspec.UnsetType) and not isinstance(np.default, msgspec.UnsetType):
                if msgspec.json.encode(op.default) != msgspec.json.encode(np.default):
                    why = "a trailing argument left at its default is not sent, so the receiver's default applies"
                    add(f"default of {label} changed from {op.default!r} to {np.default!r}", True, True, why, why)
            self.slot(iface, method, label, op.type, op.allowed, np.type, np.allowed, "in")

    def reply(self, iface: str, method: str, o: MethodDoc, n: MethodDoc) -> None:
        streams = o.kind in ("server_stream", "bidi_stream")
        label = "server stream items" if streams else "reply"
        if o.kind == "oneway":
            return
        null: dict[str, Any] = {"type": "null"}
        if not streams and o.reply is None and n.reply is None:
            return
        if not streams and o.reply is None:
            assert n.reply is not None
            a = self.types.old_in_new(null, n.reply)
            self.add(
                iface,
                method,
                f"reply changed from None to {describe(n.reply, self.new.defs)}",
                True,
                a,
                "old clients ignore the reply value",
                "the old server replies with nothing (nil)" + ("" if a else ", which new clients refuse"),
            )
            return
        if not streams and n.reply is None:
            assert o.reply is not None
            b = self.types.new_in_old(o.reply, null)
            self.add(
                iface,
                method,
                f"reply changed from {describe(o.reply, self.old.defs)} to None",
                b,
                True,
                "the new server replies with nothing (nil)" + ("" if b else ", which old clients refuse"),
                "new clients ignore the reply value",
            )
            return
        self.slot(iface, method, label, o.reply or null, o.reply_allowed, n.reply or null, n.reply_allowed, "out")

    def slot(
        self,
        iface: str,
        method: str,
        label: str,
        ot: dict[str, Any],
        oa: list[AllowedDoc] | None,
        nt: dict[str, Any],
        na: list[AllowedDoc] | None,
        flow: Flow,
    ) -> None:
        elems: list[_Elem] = []
        if bool(oa) != bool(na):
            detail = "now widened with xrpc.allow (travels as [class, value])" if na else "no longer widened (travels as the bare value)"
            elems.append(_Elem("", detail, False, False, note="the two encodings differ on the wire"))
        elif oa and na:
            ko = {a.key: a for a in oa}
            kn = {a.key: a for a in na}
            for key, a in ko.items():
                what = f"class {key!r}" if key else "plain data"
                if key not in kn:
                    elems.append(_Elem("", f"{what} no longer allowed", False, True))
                else:
                    elems += [dataclasses.replace(e, detail=f"{what}: {e.detail}") for e in self.types.diff(a.type, kn[key].type, "")]
            for key in kn:
                if key not in ko:
                    what = f"class {key!r}" if key else "plain data"
                    elems.append(_Elem("", f"{what} now allowed", True, False))
        else:
            elems = self.types.diff(ot, nt, "")
        seen: set[tuple[str, str, bool, bool]] = set()
        for e in elems:
            sig = (e.path, e.detail, e.old_in_new, e.new_in_old)
            if sig in seen:
                continue
            seen.add(sig)
            if flow == "in":
                b, f = e.old_in_new, e.new_in_old
            else:
                b, f = e.new_in_old, e.old_in_new
            nested = any(c in e.path for c in ".[{")
            where = f" at {e.path}" if nested else ""
            # which containment each direction needs: see the table in the module docstring
            why_b = e.why_old if flow == "in" else e.why_new
            why_f = e.why_new if flow == "in" else e.why_old
            self.add(
                iface,
                method,
                f"{label}{where}: {e.detail}",
                b,
                f,
                _reason(e.note, why_b if not b else "", _CONSEQUENCE[(flow, "backward", b)]),
                _reason(e.note, why_f if not f else "", _CONSEQUENCE[(flow, "forward", f)]),
            )


def _reason(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
