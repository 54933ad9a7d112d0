"""The schema document: its version, its shape as msgspec Structs, and loading it back.

Theory of operation
-------------------
``export`` writes a plain dict (see ``_export``); this module is the other end.  ``load_schema``
decodes JSON text into the Structs below, so a malformed file is refused with msgspec's own error
message (which names the offending path, e.g. ``$.interfaces[0].methods[2].kind``).  Type fragments
stay plain ``dict``s: they are JSON Schema, read by ``_types``, ``_stubs`` and ``_check``.

Version policy: ``xrpc_schema`` is an integer.  A reader refuses any other version than the ones it
knows; adding optional keys does not change the version, changing the meaning of an existing key does.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from ._errors import CodegenError

__all__ = (
    "SCHEMA_VERSION",
    "REF_PREFIX",
    "X_CLASS",
    "X_PYTHON",
    "X_TZ",
    "X_KEYS",
    "X_INTERFACE",
    "AllowedDoc",
    "FieldDoc",
    "ErrorDoc",
    "ParamDoc",
    "MethodDoc",
    "InterfaceDoc",
    "SchemaDoc",
    "load_schema",
    "parse_schema",
)

SCHEMA_VERSION = 1
REF_PREFIX = "#/$defs/"

# Facts JSON Schema cannot state about msgpack values, written next to the fragments they qualify.
X_CLASS = "x-xrpc-class"  # on a $defs entry: {"key", "kind", "fields" | "members", struct options}
X_PYTHON = "x-xrpc-python"  # on a fragment: datetime, time, frozenset, tuple, bytearray, object, fd or shm
X_INTERFACE = "x-xrpc-interface"  # a fragment for an object passed by reference: the interface's name
X_TZ = "x-xrpc-tz"  # with x-xrpc-python "datetime": false for naive-only datetimes
X_KEYS = "x-xrpc-keys"  # on a dict fragment whose keys are not strings: the key type

Kind = Literal["unary", "oneway", "server_stream", "client_stream", "bidi_stream"]


class AllowedDoc(msgspec.Struct):
    """One entry of a widened slot's allow-list: ``key`` travels on the wire (``""``: plain data)."""

    key: str
    type: dict[str, Any]


class FieldDoc(msgspec.Struct):
    """A declared error's constructor argument (informational)."""

    name: str
    type: dict[str, Any]
    required: bool = True
    default: Any | msgspec.UnsetType = msgspec.UNSET


class ErrorDoc(msgspec.Struct):
    name: str
    doc: str | None = None
    bases: list[str] = []
    fields: list[FieldDoc] | None = None


class ParamDoc(msgspec.Struct):
    name: str
    type: dict[str, Any]
    required: bool = True
    stream: bool = False
    keyword_only: bool = False
    positional_only: bool = False
    default: Any | msgspec.UnsetType = msgspec.UNSET
    default_repr: str | None = None
    allowed: list[AllowedDoc] | None = None


class MethodDoc(msgspec.Struct):
    name: str
    kind: Kind
    params: list[ParamDoc] = []
    reply: dict[str, Any] | None = None
    reply_allowed: list[AllowedDoc] | None = None
    doc: str | None = None
    requirement: str | None = None


class InterfaceDoc(msgspec.Struct):
    name: str
    methods: list[MethodDoc] = []
    errors: list[ErrorDoc] = []
    fingerprint: str = ""
    doc: str | None = None


class SchemaDoc(msgspec.Struct):
    xrpc_schema: int
    interfaces: list[InterfaceDoc]
    defs: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict, name="$defs")


def parse_schema(data: Any, source: str = "schema") -> SchemaDoc:
    """Validate a decoded JSON document (a dict) as a schema; raise ``CodegenError``."""
    if not isinstance(data, dict):
        raise CodegenError(f"{source}: not an xrpc schema (expected a JSON object)")
    version = data.get("xrpc_schema")
    if version is None:
        raise CodegenError(f"{source}: not an xrpc schema (no \"xrpc_schema\" key)")
    if version != SCHEMA_VERSION:
        raise CodegenError(f"{source}: unsupported schema version {version!r} (this tool reads version {SCHEMA_VERSION})")
    try:
        doc = msgspec.convert(data, SchemaDoc)
    except msgspec.ValidationError as exc:
        raise CodegenError(f"{source}: invalid schema: {exc}") from None
    _check_refs(doc, source)
    return doc


def load_schema(path: str) -> SchemaDoc:
    """Read and validate a schema file; raise ``CodegenError``."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise CodegenError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise CodegenError(f"{path}: not JSON: {exc}") from None
    return parse_schema(data, path)


def _check_refs(doc: SchemaDoc, source: str) -> None:
    """Every ``$ref`` must point into ``$defs``: later stages may then resolve without checking."""
    stack: list[tuple[Any, str]] = [(doc.defs, "$defs")]
    for i, iface in enumerate(doc.interfaces):
        for j, m in enumerate(iface.methods):
            where = f"interfaces[{i}].methods[{j}]"
            stack.append((m.reply, f"{where}.reply"))
            stack.append(([a.type for a in m.reply_allowed or ()], f"{where}.reply_allowed"))
            for k, p in enumerate(m.params):
                stack.append((p.type, f"{where}.params[{k}]"))
                stack.append(([a.type for a in p.allowed or ()], f"{where}.params[{k}].allowed"))
        for e in iface.errors:
            stack.append(([f.type for f in e.fields or ()], f"interfaces[{i}].errors"))
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                if not isinstance(ref, str) or not ref.startswith(REF_PREFIX) or ref[len(REF_PREFIX) :] not in doc.defs:
                    raise CodegenError(f"{source}: {where}: unresolved $ref {ref!r}")
            stack.extend((v, where) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, where) for v in node)
