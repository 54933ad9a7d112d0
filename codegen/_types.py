"""Reading JSON Schema fragments: resolving ``$ref``, naming the kind of value a fragment describes.

Both the stub generator and the compatibility checker read fragments through these helpers, so they
agree on what a fragment means.  The kinds are those msgpack can tell apart (an aware ``datetime`` is
not a string on the wire, a ``bytes`` value is not a string either), which is why the ``x-xrpc-*``
keys written by ``_export`` are consulted here.
"""

from __future__ import annotations

from typing import Any

from ._document import REF_PREFIX, X_CLASS, X_INTERFACE, X_KEYS, X_PYTHON, X_TZ

__all__ = (
    "Record",
    "ANNOTATION_KEYS",
    "ref_name",
    "resolve",
    "members",
    "kind",
    "record",
    "describe",
    "datetime_tz",
    "is_xrpc_key",
    "sub",
)

# Keys that document a value without constraining it.
ANNOTATION_KEYS = frozenset({"title", "description", "examples", "default", "deprecated", "$comment", "readOnly", "writeOnly"})

_STRING_FORMATS = {
    "uuid": "uuid",
    "decimal": "decimal",
    "date": "date",
    "duration": "timedelta",
    "date-time": "datetime",
    "time": "time",
    "partial-time": "time",
}


def is_xrpc_key(key: str) -> bool:
    return key.startswith("x-xrpc-")


def sub(s: dict[str, Any], key: str, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fragment under ``key``; a missing one means "anything" unless ``default`` says otherwise."""
    value = s.get(key)
    if isinstance(value, dict):
        return value
    return default if default is not None else {}


def ref_name(s: dict[str, Any]) -> str | None:
    ref = s.get("$ref")
    if isinstance(ref, str) and ref.startswith(REF_PREFIX):
        return ref[len(REF_PREFIX) :]
    return None


def resolve(s: dict[str, Any], defs: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
    """Follow ``$ref`` to its definition; return it and the definition's name (None if inline)."""
    name = None
    seen: set[str] = set()
    while True:
        n = ref_name(s)
        if n is None or n in seen or n not in defs:
            return s, name
        seen.add(n)
        name = n
        s = defs[n]


def members(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The options of a union, nested unions (msgspec's tagged sub-unions) flattened."""
    out: list[dict[str, Any]] = []
    for opt in s.get("anyOf", ()):
        if isinstance(opt, dict) and "anyOf" in opt and "$ref" not in opt:
            out.extend(members(opt))
        elif isinstance(opt, dict):
            out.append(opt)
    return out


def kind(s: dict[str, Any], named: bool = False) -> str:
    """What a (resolved) fragment describes.

    One of: any, object (Python ``object``: plain data), union, enum, null, boolean, integer, number,
    string, bytes, datetime, date, time, timedelta, uuid, decimal, array, tuple, dict, record,
    interface (an object passed by reference), fd (``xrpc.FileDescriptor``), shm (``xrpc.SharedBuffer``).
    ``named`` says the fragment is a ``$defs`` entry (an array with ``prefixItems`` is then a
    positional record rather than a tuple).
    """
    if "anyOf" in s:
        return "union"
    if "enum" in s:
        return "enum"
    if X_INTERFACE in s:
        return "interface"
    py = s.get(X_PYTHON)
    t = s.get("type")
    if t is None:
        return str(py) if py in ("object", "fd", "shm") else "any"
    if t == "string":
        if py in ("datetime", "time"):
            return str(py)
        if "contentEncoding" in s:
            return "bytes"
        fmt = s.get("format")
        if isinstance(fmt, str) and fmt in _STRING_FORMATS:
            return _STRING_FORMATS[fmt]
        return "string"
    if t == "array":
        if "prefixItems" in s and (named or X_CLASS in s):
            return "record"
        if "prefixItems" in s or s.get("maxItems") == 0 == s.get("minItems"):
            return "tuple"
        return "array"
    if t == "object":
        return "record" if "properties" in s else "dict"
    if t in ("null", "boolean", "integer", "number"):
        return str(t)
    return "any"


def datetime_tz(s: dict[str, Any]) -> bool | None:
    """For a datetime/time fragment: True (aware only), False (naive only) or None (either)."""
    if s.get("format") in ("date-time", "time"):
        return True
    if s.get("format") == "partial-time" or s.get(X_TZ) is False:
        return False
    return None


class Record:
    """A record type (Struct, dataclass, TypedDict, NamedTuple) as fields in wire order."""

    __slots__ = ("name", "title", "positional", "fields", "forbid_unknown", "omit_defaults", "tag_field", "tag", "info")

    def __init__(self, s: dict[str, Any], name: str | None) -> None:
        info = s.get(X_CLASS)
        self.info: dict[str, Any] = info if isinstance(info, dict) else {}
        self.name = name
        self.title = str(s.get("title") or name or "record")
        self.tag_field: str | None = self.info.get("tag_field")
        self.tag: Any = self.info.get("tag")
        self.omit_defaults = bool(self.info.get("omit_defaults"))
        # (wire name or position, python name, fragment, required)
        self.fields: list[tuple[str, str, dict[str, Any], bool]] = []
        pynames = self.info.get("fields")
        if "properties" in s:
            self.positional = False
            self.forbid_unknown = s.get("additionalProperties") is False
            required = set(s.get("required", ()))
            wire = [k for k in s["properties"] if k != self.tag_field]
            py = pynames if isinstance(pynames, list) and len(pynames) == len(wire) else wire
            for k, p in zip(wire, py):
                self.fields.append((k, str(p), s["properties"][k], k in required))
        else:
            self.positional = True
            items = list(s.get("prefixItems", ()))
            if self.tag_field is not None and items:
                items = items[1:]
            offset = len(s.get("prefixItems", ())) - len(items)
            self.forbid_unknown = "maxItems" in s  # msgspec states maxItems only when extra items are refused
            minimum = int(s.get("minItems", len(items) + offset)) - offset
            py = pynames if isinstance(pynames, list) and len(pynames) == len(items) else [f"field{i}" for i in range(len(items))]
            for i, (frag, p) in enumerate(zip(items, py)):
                self.fields.append((str(i), str(p), frag, i < minimum))


def record(s: dict[str, Any], name: str | None) -> Record:
    return Record(s, name)


def describe(s: dict[str, Any], defs: dict[str, dict[str, Any]], depth: int = 0) -> str:
    """A short human name for a fragment: ``list[Leaf]``, ``int | None``, ``Literal['a', 'b']``."""
    n = ref_name(s)
    if n is not None:
        return str(defs.get(n, {}).get("title", n)) if n in defs else n
    if depth > 4:
        return "..."
    k = kind(s)
    if k == "union":
        return " | ".join(describe(m, defs, depth + 1) for m in members(s)) or "never"
    if k == "enum":
        return "Literal[" + ", ".join(repr(v) for v in s.get("enum", ())) + "]"
    if k == "array":
        items = s.get("items")
        inner = describe(items, defs, depth + 1) if isinstance(items, dict) else "Any"
        container = {"frozenset": "frozenset", "tuple": "tuple"}.get(str(s.get(X_PYTHON)), "set" if s.get("uniqueItems") else "list")
        return f"{container}[{inner}, ...]" if container == "tuple" else f"{container}[{inner}]"
    if k == "tuple":
        return "tuple[" + ", ".join(describe(i, defs, depth + 1) for i in s.get("prefixItems", ())) + "]"
    if k == "dict":
        key = s.get(X_KEYS)
        kd = describe(key, defs, depth + 1) if isinstance(key, dict) else "str"
        value = s.get("additionalProperties")
        vd = describe(value, defs, depth + 1) if isinstance(value, dict) else "Any"
        return f"dict[{kd}, {vd}]"
    if k == "record":
        return str(s.get("title", "record"))
    if k == "interface":
        return f"{s[X_INTERFACE]} (by reference)"
    simple = {
        "any": "Any",
        "object": "object",
        "null": "None",
        "boolean": "bool",
        "integer": "int",
        "number": "float",
        "string": "str",
        "bytes": "bytes",
        "datetime": "datetime",
        "date": "date",
        "time": "time",
        "timedelta": "timedelta",
        "uuid": "UUID",
        "decimal": "Decimal",
        "fd": "FileDescriptor",
        "shm": "SharedBuffer",
    }
    return simple.get(k, k)
