"""Schema export: from ``xrpc.describe()`` to a plain, versioned dict (JSON is only the output).

Theory of operation
-------------------
``build_schema(interfaces)`` walks each ``InterfaceDescription``: methods, parameters, replies,
allow-lists and declared errors.  It never looks at source text.  Every value position (a parameter,
a stream item, a reply, an allowed class) contributes one type; all of them go through a single
``msgspec.json.schema_components`` call, so user types land once in a shared ``$defs`` table and the
fragments refer to them with ``#/$defs/Name``.

JSON Schema describes JSON, and xrpc speaks msgpack, so a few facts would be lost: an aware datetime
travels as a msgpack timestamp (not a string), ``dict[int, str]`` keys stay integers, an array-like
Struct has field names, an enum has member names, a widened slot's class travels under its
``__qualname__``.  A second walker, over the ``msgspec.inspect`` tree of the same types, writes those
facts next to the fragments it matches, under keys starting with ``x-xrpc-`` (see
docs/versioning.md).  Readers that do not know them may ignore them.

This module imports user code only in ``load_targets``; the rest is pure.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import sys
import typing
from typing import Any, Iterable, Sequence

import msgspec
import msgspec.inspect as mi

import xrpc
from xrpc._interface import InterfaceDescription, RefPlan, Slot, is_interface

from ._document import REF_PREFIX, SCHEMA_VERSION, X_CLASS, X_INTERFACE, X_KEYS, X_PYTHON, X_TZ
from ._errors import CodegenError

__all__ = ("build_schema", "load_targets")

_REF_TEMPLATE = REF_PREFIX + "{name}"
_PLAIN_KEY = ""

_RECORDS = (mi.StructType, mi.DataclassType, mi.TypedDictType, mi.NamedTupleType)


# --------------------------------------------------------------------------- targets
def load_targets(spec: str) -> list[type]:
    """``pkg.mod:Iface`` (or ``pkg.mod:A,B``), or ``pkg.mod`` for every interface in the module."""
    modname, _, attrs = spec.partition(":")
    if not modname or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part) for part in modname.split(".")):
        raise CodegenError(f"{spec!r}: expected MODULE or MODULE:INTERFACE (e.g. myapp.api:Store)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does, so the console script finds local modules
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (modname == exc.name or modname.startswith(exc.name + ".")):
            raise CodegenError(f"cannot import {modname!r}: no module named {exc.name!r}") from None
        raise CodegenError(f"cannot import {modname!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise CodegenError(f"cannot import {modname!r}: {type(exc).__name__}: {exc}") from None
    found: list[type] = []
    if attrs:
        for attr in attrs.split(","):
            obj: Any = module
            for part in attr.strip().split("."):
                if not hasattr(obj, part):
                    raise CodegenError(f"{modname!r} has no attribute {attr.strip()!r}")
                obj = getattr(obj, part)
            if not is_interface(obj):
                raise CodegenError(f"{modname}:{attr.strip()} is not an @xrpc.interface class")
            found.append(obj)
    else:
        for value in vars(module).values():
            if is_interface(value) and value not in found:
                found.append(value)
        if not found:
            raise CodegenError(f"{modname!r} defines no @xrpc.interface class")
        found.sort(key=lambda c: _describe(c).name)
    return found


def _describe(cls: Any) -> InterfaceDescription:
    try:
        return xrpc.describe(cls)
    except xrpc.InterfaceError as exc:
        raise CodegenError(str(exc)) from None


# --------------------------------------------------------------------------- the walker
@dataclasses.dataclass
class _Req:
    """One type to put through schema_components, and where its fragment goes."""

    tp: Any
    fragment: dict[str, Any] = dataclasses.field(default_factory=dict)


class _Requests:
    def __init__(self) -> None:
        self.items: list[_Req] = []

    def add(self, tp: Any) -> _Req:
        req = _Req(tp)
        self.items.append(req)
        return req


_SPECIAL = {getattr(xrpc, "FileDescriptor", None): "fd", getattr(xrpc, "SharedBuffer", None): "shm"}


def _schema_hook(tp: Any) -> dict[str, Any]:
    if tp is object:  # xrpc reads `object` as "plain data", like Any
        return {X_PYTHON: "object"}
    if is_interface(tp):  # an object passed by reference
        return {X_INTERFACE: xrpc.describe(tp).name}
    special = _SPECIAL.get(tp)
    if special is not None:  # a file descriptor or shared memory passed over a Unix socket
        return {X_PYTHON: special}
    raise NotImplementedError


def _referenced(desc: InterfaceDescription) -> list[type]:
    """Interfaces whose objects ``desc`` passes by reference (a slot's plan names them), the last
    named first (the order schemas have always listed them in, so that they stay the same)."""
    named: list[type] = []
    for m in desc.methods.values():
        for slot in [m.reply, *(p.slot for p in m.params)]:
            if slot is not None and slot.plan is not None:
                named.extend(plan.iface for plan in slot.plan.walk() if isinstance(plan, RefPlan))
    found: list[type] = []
    for iface in reversed(named):
        if iface not in found:
            found.append(iface)
    return found


def build_schema(interfaces: Iterable[Any]) -> dict[str, Any]:
    """The schema document (a plain dict) for ``interfaces`` (``@xrpc.interface`` classes)."""
    descs: list[InterfaceDescription] = []
    todo = list(interfaces)
    while todo:
        desc = _describe(todo.pop(0))
        if desc not in descs:
            descs.append(desc)
            todo.extend(_referenced(desc))  # so the stubs can declare what these methods return
    names = [d.name for d in descs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CodegenError(f"two interfaces share the name {dup[0]!r}")

    reqs = _Requests()
    skeleton = [_interface(d, reqs) for d in descs]
    types = [r.tp for r in reqs.items]
    try:
        fragments, defs = msgspec.json.schema_components(types, ref_template=_REF_TEMPLATE, schema_hook=_schema_hook)
        infos = mi.multi_type_info(types)
    except (TypeError, ValueError) as exc:
        raise CodegenError(f"no JSON Schema for a type of {', '.join(names)}: {exc}") from None
    annotator = _Annotator(defs)
    for req, frag, info in zip(reqs.items, fragments, infos):
        req.fragment.update(frag)
        annotator.walk(info, req.fragment)
    return {"xrpc_schema": SCHEMA_VERSION, "interfaces": skeleton, "$defs": {k: defs[k] for k in sorted(defs)}}


def _doc_of(cls: type) -> str | None:
    doc = vars(cls).get("__doc__")
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _interface(desc: InterfaceDescription, reqs: _Requests) -> dict[str, Any]:
    out: dict[str, Any] = {"name": desc.name, "fingerprint": desc.fingerprint, "doc": _doc_of(desc.cls)}
    out["errors"] = [_error(e, desc.errors, reqs) for e in desc.errors]
    methods = []
    for m in desc.methods.values():
        md: dict[str, Any] = {"name": m.name, "kind": m.kind.value, "doc": m.doc}
        if m.requirement is not None:
            md["requirement"] = str(m.requirement)
        params = []
        for p in m.params:
            assert p.slot is not None
            pd: dict[str, Any] = {"name": p.name}
            allowed = _slot(p.slot, pd, "type", reqs)
            pd["required"] = not p.has_default
            pd["stream"] = p.stream
            pkind = getattr(p, "kind", inspect.Parameter.POSITIONAL_OR_KEYWORD)
            if pkind == inspect.Parameter.KEYWORD_ONLY:
                pd["keyword_only"] = True
            elif pkind == inspect.Parameter.POSITIONAL_ONLY:
                pd["positional_only"] = True
            if p.has_default:
                try:
                    default = msgspec.to_builtins(p.default, str_keys=True)
                    msgspec.json.encode(default)
                except (TypeError, ValueError, msgspec.EncodeError):
                    pd["default_repr"] = repr(p.default)
                else:
                    pd["default"] = default
            if allowed is not None:
                pd["allowed"] = allowed
            params.append(pd)
        md["params"] = params
        if m.reply is None:
            md["reply"] = None
        else:
            allowed = _slot(m.reply, md, "reply", reqs)
            if allowed is not None:
                md["reply_allowed"] = allowed
        methods.append(md)
    out["methods"] = methods
    return out


def _slot(slot: Slot, out: dict[str, Any], type_key: str, reqs: _Requests) -> list[dict[str, Any]] | None:
    """Set ``out[type_key]``; for a widened slot (the union of its entries) return the allow-list."""
    if slot.classes is None:
        out[type_key] = reqs.add(slot.annotation).fragment
        return None
    entries: list[dict[str, Any]] = [{"key": key, "type": reqs.add(cls).fragment} for key, cls in slot.classes.items()]
    if slot.plain is not None:
        entries.append({"key": _PLAIN_KEY, "type": reqs.add(slot.plain).fragment})
    out[type_key] = {"anyOf": [e["type"] for e in entries]} if len(entries) > 1 else entries[0]["type"]
    return entries


def _error(cls: type[BaseException], declared: Sequence[type[BaseException]], reqs: _Requests) -> dict[str, Any]:
    out: dict[str, Any] = {"name": cls.__qualname__, "doc": _doc_of(cls)}
    out["bases"] = [b.__qualname__ for b in cls.__mro__[1:] if b in declared and b is not cls][:1]
    init = vars(cls).get("__init__")
    if init is not None and inspect.isfunction(init):
        try:
            hints = typing.get_type_hints(init, include_extras=True)
            sig = inspect.signature(init)
        except Exception:
            return out
        fields = []
        for i, (pname, p) in enumerate(sig.parameters.items()):
            if i == 0:
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or pname not in hints:
                return out
            fd: dict[str, Any] = {"name": pname, "type": reqs.add(hints[pname]).fragment, "required": p.default is p.empty}
            if p.default is not p.empty:
                try:
                    fd["default"] = msgspec.to_builtins(p.default, str_keys=True)
                except (TypeError, ValueError):
                    pass
            fields.append(fd)
        out["fields"] = fields
    return out


# --------------------------------------------------------------------------- msgpack facts
def _strip(t: mi.Type) -> mi.Type:
    while isinstance(t, mi.Metadata):
        t = t.type
    return t


def _normalize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9.\-_]", "_", name)


def _class_name(cls: Any) -> str:
    origin = getattr(cls, "__origin__", None)
    if origin is not None:
        args = ", ".join(a.__name__ if isinstance(a, type) else repr(a) for a in cls.__args__)
        return f"{origin.__name__}[{args}]"
    return str(cls.__name__)


class _Annotator:
    """Walks a ``msgspec.inspect`` type next to the fragment msgspec made of it, adding x-xrpc keys."""

    def __init__(self, defs: dict[str, Any]) -> None:
        self.defs = defs
        self.done: set[str] = set()

    def component(self, cls: Any) -> str | None:
        """The $defs name msgspec gave ``cls`` (its name, or module.qualname when names clash)."""
        base = getattr(cls, "__origin__", cls)
        full = _normalize(f"{getattr(base, '__module__', '')}.{getattr(base, '__qualname__', '')}")
        if full in self.defs:
            return full
        simple = _normalize(_class_name(cls))
        return simple if simple in self.defs else None

    def walk(self, t: mi.Type, s: dict[str, Any]) -> None:
        t = _strip(t)
        if isinstance(t, (*_RECORDS, mi.EnumType)):
            name = self.component(t.cls)
            if name is not None:
                self.record(t, name)
            return
        if isinstance(t, mi.DateTimeType):
            s[X_PYTHON] = "datetime"
            if t.tz is False:
                s[X_TZ] = False
        elif isinstance(t, mi.TimeType):
            if t.tz is None:
                s[X_PYTHON] = "time"
        elif isinstance(t, mi.ByteArrayType):
            s[X_PYTHON] = "bytearray"
        elif isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
            if isinstance(t, mi.FrozenSetType):
                s[X_PYTHON] = "frozenset"
            elif isinstance(t, mi.VarTupleType):
                s[X_PYTHON] = "tuple"
            if isinstance(s.get("items"), dict):
                self.walk(t.item_type, s["items"])
        elif isinstance(t, mi.TupleType):
            for sub, frag in zip(t.item_types, s.get("prefixItems", ())):
                self.walk(sub, frag)
        elif isinstance(t, (mi.DictType, mi.FrozenDictType)):
            key = _strip(t.key_type)
            if not isinstance(key, mi.StrType):
                s[X_KEYS] = self.key_schema(key)
            if isinstance(s.get("additionalProperties"), dict):
                self.walk(t.value_type, s["additionalProperties"])
        elif isinstance(t, mi.UnionType):
            options = _flatten(s)
            for sub in t.types:
                frag = _match(self, sub, options)
                if frag is not None:
                    self.walk(sub, frag)

    def key_schema(self, t: mi.Type) -> dict[str, Any]:
        if isinstance(t, (mi.EnumType,)):
            name = self.component(t.cls)
            if name is not None:
                return {"$ref": _REF_TEMPLATE.format(name=name)}
        if isinstance(t, mi.LiteralType):
            return {"enum": sorted(t.values, key=repr)}
        simple: dict[type, dict[str, Any]] = {
            mi.IntType: {"type": "integer"},
            mi.FloatType: {"type": "number"},
            mi.BoolType: {"type": "boolean"},
            mi.UUIDType: {"type": "string", "format": "uuid"},
            mi.DecimalType: {"type": "string", "format": "decimal"},
            mi.DateType: {"type": "string", "format": "date"},
            mi.TimeDeltaType: {"type": "string", "format": "duration"},
            mi.DateTimeType: {"type": "string", X_PYTHON: "datetime"},
            mi.BytesType: {"type": "string", "contentEncoding": "base64"},
        }
        return dict(simple.get(type(t), {}))

    def record(self, t: mi.Type, name: str) -> None:
        if name in self.done:
            return
        self.done.add(name)
        s = self.defs[name]
        cls = t.cls  # type: ignore[attr-defined]
        base = getattr(cls, "__origin__", cls)
        info: dict[str, Any] = {"key": base.__qualname__}
        if isinstance(t, mi.EnumType):
            info["kind"] = "enum"
            info["members"] = {m.name: m.value for m in cls}
            s[X_CLASS] = info
            return
        assert isinstance(t, _RECORDS)
        if isinstance(t, mi.StructType):
            info["kind"] = "struct"
            cfg = base.__struct_config__
            for opt in ("frozen", "array_like", "forbid_unknown_fields", "omit_defaults"):
                if getattr(cfg, opt):
                    info[opt] = True
            if t.tag_field is not None:
                info["tag_field"] = t.tag_field
                info["tag"] = t.tag
        else:
            info["kind"] = {mi.DataclassType: "dataclass", mi.TypedDictType: "typeddict", mi.NamedTupleType: "namedtuple"}[type(t)]
        info["fields"] = [f.name for f in t.fields]
        s[X_CLASS] = info
        if "properties" in s:
            for f in t.fields:
                frag = s["properties"].get(f.encode_name)
                if isinstance(frag, dict):
                    self.walk(f.type, frag)
        elif "prefixItems" in s:
            offset = 1 if isinstance(t, mi.StructType) and t.tag_field is not None else 0
            items = s["prefixItems"]
            for i, f in enumerate(t.fields):
                if i + offset < len(items):
                    self.walk(f.type, items[i + offset])


def _flatten(s: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for opt in s.get("anyOf", ()):
        if "anyOf" in opt:
            out.extend(_flatten(opt))
        else:
            out.append(opt)
    return out


_STRINGISH = (
    mi.StrType,
    mi.BytesType,
    mi.ByteArrayType,
    mi.MemoryViewType,
    mi.DateTimeType,
    mi.TimeType,
    mi.DateType,
    mi.TimeDeltaType,
    mi.UUIDType,
    mi.DecimalType,
)


def _match(ann: _Annotator, t: mi.Type, options: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The option of a union fragment that came from union member ``t`` (msgspec allows one per kind)."""
    t = _strip(t)
    if isinstance(t, (*_RECORDS, mi.EnumType)):
        name = ann.component(t.cls)
        want: Any = ("ref", REF_PREFIX + name if name else None)
    elif isinstance(t, _STRINGISH):
        want = "string"
    elif isinstance(t, (mi.CollectionType, mi.TupleType)):
        want = "array"
    elif isinstance(t, (mi.DictType, mi.FrozenDictType)):
        want = "object"
    elif isinstance(t, mi.IntType):
        want = "integer"
    elif isinstance(t, mi.FloatType):
        want = "number"
    else:
        return None
    for opt in options:
        got: Any = ("ref", opt["$ref"]) if "$ref" in opt else opt.get("type")
        if got == want:
            return opt
    return None
