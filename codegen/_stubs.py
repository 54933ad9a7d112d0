"""Stubs: from a schema document to a typed Python module that only declares.

Theory of operation
-------------------
The generated module holds, in this order: enums, msgspec Structs for every record in ``$defs``,
the declared errors, and one Protocol per interface decorated with
``@xrpc.interface(name=<wire name>, errors=(...))``.  With ``blocking=True`` each interface is
followed by its blocking form, ``@xrpc.blocking.interface(<Protocol>)``: plain ``def`` methods,
``Iterator[T]`` for a stream, ``Iterable[T]`` for a client stream.  Nothing in it runs at call time: the runtime
reads the Protocol through ``xrpc.describe`` exactly as it reads a hand-written one.

What makes a generated client interoperate with the original server:

* the interface's wire name is passed as ``name=``;
* a Struct has the original's wire field names (map records) or field order (array-like records),
  so the msgpack bytes are the same;
* a class that travels in a widened slot, and a declared error, keep their wire key: when the
  original ``__qualname__`` (say ``Shed.Tool``) is not the generated name, the class body sets
  ``__qualname__``;
* a parameter's default is the original's default: a trailing argument left at its default is not
  sent, so both sides must mean the same value by it;
* msgpack-only facts (aware datetimes, integer dict keys, frozen or tagged Structs) come from the
  ``x-xrpc-*`` keys; JSON Schema alone would lose them.

The renderer walks JSON Schema fragments (``_types`` says what each fragment is) and returns text;
it never imports the generated module.
"""

from __future__ import annotations

import base64
import datetime
import keyword
import re
from typing import Any

import msgspec

from ._document import X_CLASS, X_INTERFACE, X_KEYS, X_PYTHON, AllowedDoc, ErrorDoc, InterfaceDoc, MethodDoc, ParamDoc, SchemaDoc, parse_schema
from ._errors import CodegenError
from ._types import Record, datetime_tz, is_xrpc_key, kind, members, ref_name, resolve, sub

__all__ = ("render_stubs",)

_TYPING_NAMES = ("Annotated", "Any", "AsyncIterator", "Literal", "Protocol")
_BLOCKING_TYPING_NAMES = ("Iterable", "Iterator")
_MODULES = ("datetime", "decimal", "enum", "uuid", "msgspec", "xrpc", "typing")
# builtins the generated code itself names; a user type may shadow any other
_BUILTINS = ("int", "float", "str", "bool", "bytes", "bytearray", "list", "dict", "set", "frozenset", "tuple", "object", "Exception")
_RESERVED = frozenset(keyword.kwlist) | frozenset(_BUILTINS) | frozenset(_TYPING_NAMES) | frozenset(_MODULES) | {"annotations"}

_META_KEYS = ("title", "description", "examples")
_NUMERIC = (("minimum", "ge"), ("exclusiveMinimum", "gt"), ("maximum", "le"), ("exclusiveMaximum", "lt"), ("multipleOf", "multiple_of"))


def render_stubs(doc: SchemaDoc | dict[str, Any], source: str = "", *, blocking: bool = False) -> str:
    """The text of a Python module declaring the schema's types, errors and interfaces.

    ``blocking=True`` adds each interface's blocking form (``NameBlocking``, for ``xrpc.blocking``).
    """
    if not isinstance(doc, SchemaDoc):
        doc = parse_schema(doc, source or "schema")
    return _Generator(doc, source, blocking).render()


def _ident(text: str) -> str:
    name = re.sub(r"\W", "_", text)
    if not name or name[0].isdigit():
        name = "_" + name
    return name


def _q(text: str) -> str:
    """A string literal, double-quoted when that needs no escapes."""
    if '"' not in text and "\\" not in text and text.isprintable():
        return f'"{text}"'
    return repr(text)


def _bytes_literal(raw: bytes) -> str:
    text = repr(raw)
    if text.startswith("b'") and '"' not in text and "\\'" not in text:
        return 'b"' + text[2:-1] + '"'
    return text


def _pylit(v: Any) -> str:
    """A Python literal for a JSON value."""
    if isinstance(v, str):
        return _q(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_pylit(k)}: {_pylit(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_pylit(x) for x in v) + "]"
    return repr(v)


def _docstring(text: str, indent: str, verbatim: bool) -> str:
    """A docstring statement.  ``verbatim`` keeps the text byte for byte (msgspec reads the raw
    ``__doc__`` of records); otherwise continuation lines are indented, as ``inspect.getdoc`` removes."""
    if not verbatim:
        lines = text.split("\n")
        text = lines[0] + "".join("\n" + (indent + line if line.strip() else "") for line in lines[1:])
    if '"""' in text or "\\" in text or text.endswith('"') or "\r" in text:
        return indent + repr(text)
    return f'{indent}"""{text}"""'


class _Generator:
    def __init__(self, doc: SchemaDoc, source: str, blocking: bool = False) -> None:
        self.doc = doc
        self.defs = doc.defs
        self.source = source
        self.typing: set[str] = set()
        self.modules: set[str] = set()
        self.taken: set[str] = set(_RESERVED) | (set(_BLOCKING_TYPING_NAMES) if blocking else set())
        self.deps: set[str] = set()  # $defs names a default expression refers to
        self.pyname: dict[str, str] = {}
        self.keys: dict[str, str] = {}  # def name -> wire key (__qualname__)
        titles: dict[str, int] = {}
        for name, s in self.defs.items():
            title = str(s.get("title") or name)
            titles[title] = titles.get(title, 0) + 1
        for name, s in self.defs.items():
            title = str(s.get("title") or name)
            self.pyname[name] = self._claim(_ident(title if titles[title] == 1 else name))
            info = s.get(X_CLASS)
            if isinstance(info, dict) and isinstance(info.get("key"), str):
                self.keys[name] = info["key"]
        # errors are shared between interfaces by wire key
        self.errors: dict[str, tuple[str, ErrorDoc]] = {}
        for iface in doc.interfaces:
            for e in iface.errors:
                if e.name not in self.errors:
                    self.errors[e.name] = (self._claim(_ident(e.name.rpartition(".")[2])), e)
        self.protocols: dict[str, str] = {}
        for iface in doc.interfaces:
            self.protocols[iface.name] = self._claim(_ident(iface.name.rpartition(".")[2]))
        self.blocking: dict[str, str] = {}  # interface name -> its blocking form's class name
        if blocking:
            for iface in doc.interfaces:
                self.blocking[iface.name] = self._claim(self.protocols[iface.name] + "Blocking")
        # a class in an allow-list travels under the key the schema gives it
        for iface in doc.interfaces:
            for m in iface.methods:
                for allowed in [m.reply_allowed or [], *[p.allowed or [] for p in m.params]]:
                    for a in allowed:
                        n = ref_name(a.type)
                        if a.key and n is not None:
                            self.keys.setdefault(n, a.key)

    def _claim(self, name: str) -> str:
        while name in self.taken:
            name += "_"
        self.taken.add(name)
        return name

    # ------------------------------------------------------------------ module
    def render(self) -> str:
        enums: dict[str, str] = {}
        records: dict[str, tuple[str, set[str]]] = {}
        for name, s in self.defs.items():
            k = kind(s, named=True)
            if k == "enum" and self._is_enum_class(s):
                enums[name] = self._enum(name, s)
            elif k == "record":
                self.deps = set()
                text = self._record(name, s)
                records[name] = (text, self.deps - {name})
        errors = self._errors()
        protocols: list[str] = []
        for iface in self._interfaces_in_order():
            protocols.append(self._protocol(iface))
            if iface.name in self.blocking:
                protocols.append(self._blocking_protocol(iface))

        out: list[str] = []
        names = ", ".join(i.name for i in self.doc.interfaces) or "no interfaces"
        origin = f" from {self.source}" if self.source else ""
        out.append(f'"""xrpc interface stubs for {names} (xrpc_schema {self.doc.xrpc_schema}).\n\nGenerated by xrpc-codegen{origin}; do not edit."""')
        out.append("")
        out.append("from __future__ import annotations")
        out.append("")
        for mod in ("datetime", "decimal", "enum", "uuid"):
            if mod in self.modules or (mod == "enum" and enums):
                out.append(f"import {mod}")
        if self.typing:
            out.append(f"from typing import {', '.join(sorted(self.typing))}")
        out.append("")
        out.append("import msgspec")
        out.append("")
        out.append("import xrpc")
        out.append("")
        exported = [self.pyname[n] for n in self.defs if n in records or n in enums]
        exported += [py for py, _ in self.errors.values()] + list(self.protocols.values()) + list(self.blocking.values())
        out.append("__all__ = (" + "".join(f"{_q(name)}, " for name in exported).rstrip(" ") + ")")
        for block in [*enums.values(), *self._ordered(records), *errors, *protocols]:
            out.append("")
            out.append("")
            out.append(block)
        return "\n".join(out) + "\n"

    def _interfaces_in_order(self) -> list[InterfaceDoc]:
        """Schema order, except that an interface passed by reference comes before its users."""
        by_name = {i.name: i for i in self.doc.interfaces}
        out: list[InterfaceDoc] = []

        def refs(iface: InterfaceDoc) -> list[str]:
            found: list[str] = []
            stack: list[Any] = [[m.reply, *(p.type for p in m.params)] for m in iface.methods]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    if isinstance(node.get(X_INTERFACE), str):
                        found.append(node[X_INTERFACE])
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
            return sorted(set(found))

        def visit(iface: InterfaceDoc, path: tuple[str, ...]) -> None:
            if iface in out or iface.name in path:
                return
            for name in refs(iface):
                if name in by_name:
                    visit(by_name[name], (*path, iface.name))
            out.append(iface)

        for iface in self.doc.interfaces:
            visit(iface, ())
        return out

    def _ordered(self, records: dict[str, tuple[str, set[str]]]) -> list[str]:
        """Records in $defs order, except that a default value's class comes first."""
        done: set[str] = set()
        out: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in done or name not in records or name in path:
                return
            for dep in sorted(records[name][1]):
                visit(dep, (*path, name))
            done.add(name)
            out.append(records[name][0])

        for name in records:
            visit(name, ())
        return out

    # ------------------------------------------------------------------ enums
    def _is_enum_class(self, s: dict[str, Any]) -> bool:
        values = s.get("enum", [])
        return bool(values) and (all(isinstance(v, str) for v in values) or all(isinstance(v, int) and not isinstance(v, bool) for v in values))

    def _enum(self, name: str, s: dict[str, Any]) -> str:
        py = self.pyname[name]
        lines = [f"class {py}(enum.Enum):"]
        if s.get("description"):
            lines.append(_docstring(str(s["description"]), "    ", verbatim=True))
        key = self.keys.get(name, str(s.get("title", py)))
        if key != py:
            lines.append(f"    __qualname__ = {_q(key)}")
        for member, value in self._members(s).items():
            lines.append(f"    {member} = {_pylit(value)}")
        return "\n".join(lines)

    def _members(self, s: dict[str, Any]) -> dict[str, Any]:
        info = s.get(X_CLASS)
        values = list(s.get("enum", []))
        if isinstance(info, dict) and isinstance(info.get("members"), dict):
            given = {str(k): v for k, v in info["members"].items()}
            if sorted(map(repr, given.values())) == sorted(map(repr, values)) and all(
                k.isidentifier() and not keyword.iskeyword(k) and not k.startswith("_") for k in given
            ):
                return given
        out: dict[str, Any] = {}
        for v in values:
            base = _ident(str(v).upper()) if isinstance(v, str) else f"V{v}".replace("-", "M")
            if keyword.iskeyword(base) or base.startswith("_"):
                base = "V" + base
            member = base
            while member in out:
                member += "_"
            out[member] = v
        return out

    # ------------------------------------------------------------------ records
    def _record(self, name: str, s: dict[str, Any]) -> str:
        py = self.pyname[name]
        rec = Record(s, name)
        info = rec.info
        opts: list[str] = []
        fields: list[str] = []
        seen_default = False
        kw_only = False
        for wire, pyname, frag, required in rec.fields:
            fname = pyname if pyname.isidentifier() and not keyword.iskeyword(pyname) and not pyname.startswith("__") else _ident(pyname) + "_"
            rename = None if rec.positional or fname == wire else wire
            ann = self.type(frag)
            default = None
            if "default" in frag:
                default = self._field_default(frag["default"], frag)
            elif not required:
                if rec.positional:
                    required = True  # UNSET cannot travel inside an array; the value is always sent
                else:
                    ann = f"{ann} | msgspec.UnsetType"
                    default = "msgspec.UNSET"
            if default is None:
                stmt = f"    {fname}: {ann}" + (f" = msgspec.field(name={_q(rename)})" if rename else "")
                if seen_default:
                    kw_only = True
            else:
                seen_default = True
                if rename:
                    if default.startswith("msgspec.field(default_factory="):
                        default = default[:-1] + f", name={_q(rename)})"
                    else:
                        default = f"msgspec.field(default={default}, name={_q(rename)})"
                stmt = f"    {fname}: {ann} = {default}"
            fields.append(stmt)
        if kw_only:
            opts.append("kw_only=True")
        if info.get("frozen"):
            opts.append("frozen=True")
        if rec.positional:
            opts.append("array_like=True")
        if rec.forbid_unknown:
            opts.append("forbid_unknown_fields=True")
        if rec.omit_defaults:
            opts.append("omit_defaults=True")
        if rec.tag_field is not None:
            opts.append(f"tag_field={_q(rec.tag_field)}")
            opts.append(f"tag={_pylit(rec.tag)}")
        lines = [f"class {py}(msgspec.Struct{''.join(', ' + o for o in opts)}):"]
        if s.get("description"):
            lines.append(_docstring(str(s["description"]), "    ", verbatim=True))
            if fields:
                lines.append("")
        key = self.keys.get(name, rec.title)
        if key != py:
            lines.append(f"    __qualname__ = {_q(key)}")
        lines.extend(fields)
        if len(lines) == 1 or lines[-1] == "":
            lines.append("    pass")
        return "\n".join(lines)

    def _field_default(self, value: Any, frag: dict[str, Any]) -> str:
        expr = self.value(value, frag)
        r, name = resolve(frag, self.defs)
        k = kind(r, named=name is not None)
        if k == "union" and value is not None:
            for m in members(r):
                if _fits(value, m, self.defs):
                    r, name = resolve(m, self.defs)
                    k = kind(r, named=name is not None)
                    break
        mutable = False
        if k in ("array", "dict") and value:
            container = r.get(X_PYTHON)
            mutable = k == "dict" or container not in ("frozenset", "tuple")
        elif k == "bytes" and value and r.get(X_PYTHON) == "bytearray":
            mutable = True
        elif k == "record" and name is not None and not (isinstance(r.get(X_CLASS), dict) and r[X_CLASS].get("frozen")):
            mutable = True
        if mutable:
            return f"msgspec.field(default_factory=lambda: {expr})"
        return expr

    # ------------------------------------------------------------------ errors
    def _errors(self) -> list[str]:
        out: list[str] = []
        done: set[str] = set()

        def visit(key: str, path: tuple[str, ...]) -> None:
            if key in done or key in path or key not in self.errors:
                return
            py, e = self.errors[key]
            for b in e.bases:
                visit(b, (*path, key))
            done.add(key)
            bases = [self.errors[b][0] for b in e.bases if b in self.errors] or ["Exception"]
            lines = [f"class {py}({', '.join(bases)}):"]
            if e.doc:
                lines.append(_docstring(e.doc, "    ", verbatim=False))
            if e.fields is not None:
                args = ", ".join(f"{f.name}: {self.type(f.type)}" + ("" if f.required else " = ...") for f in e.fields)
                lines.append(f"    # raised with ({args})")
            if key != py:
                lines.append(f"    __qualname__ = {_q(key)}")
            if len(lines) == 1:
                lines.append("    pass")
            out.append("\n".join(lines))

        for key in self.errors:
            visit(key, ())
        return out

    # ------------------------------------------------------------------ interfaces
    def _protocol(self, iface: InterfaceDoc) -> str:
        py = self.protocols[iface.name]
        self.typing.add("Protocol")
        errors = [self.errors[e.name][0] for e in iface.errors]
        args = f"name={_q(iface.name)}"
        if errors:
            args += ", errors=(" + ", ".join(errors) + ("," if len(errors) == 1 else "") + ")"
        lines = [f"@xrpc.interface({args})", f"class {py}(Protocol):"]
        if iface.doc:
            lines.append(_docstring(iface.doc, "    ", verbatim=False))
        for m in iface.methods:
            if len(lines) > 2:
                lines.append("")
            lines.extend(self._method(m))
        if len(lines) == 2:
            lines.append("    pass")
        return "\n".join(lines)

    def _blocking_protocol(self, iface: InterfaceDoc) -> str:
        py = self.protocols[iface.name]
        lines = [f"@xrpc.blocking.interface({py})", f"class {self.blocking[iface.name]}(Protocol):"]
        lines.append(f'    """The blocking form of {py}: ``xrpc.blocking.connect(url).proxy({self.blocking[iface.name]})``."""')
        for m in iface.methods:
            lines.append("")
            lines.extend(self._method(m, blocking=True))
        return "\n".join(lines)

    def _method(self, m: MethodDoc, blocking: bool = False) -> list[str]:
        lines: list[str] = []
        if m.requirement is not None and not blocking:
            lines.append(f"    @xrpc.requires({_q(m.requirement)})")
        if m.kind == "oneway" and not blocking:
            lines.append("    @xrpc.oneway")
        params = ["self"]
        seen_default = False
        star = False
        notes: list[str] = []
        if any(p.positional_only for p in m.params):
            last = max(i for i, p in enumerate(m.params) if p.positional_only)
            if not all(p.positional_only for p in m.params[: last + 1]):
                raise CodegenError(f"{m.name}: positional-only parameters must come first")
        for i, p in enumerate(m.params):
            if i > 0 and m.params[i - 1].positional_only and not p.positional_only:
                params.append("/")
            if p.keyword_only and not star:
                params.append("*")
                star = True
            ann = self._slot(p.type, p.allowed)
            if p.stream and blocking:
                self.typing.add("Iterable")
                ann = f"Iterable[{ann}]"
            elif p.stream:
                self.typing.add("AsyncIterator")
                ann = f"AsyncIterator[{ann}]"
            text = f"{p.name}: {ann}"
            has_default = not p.required and not isinstance(p.default, msgspec.UnsetType)
            if not p.required and not has_default:
                notes.append(f"    # {p.name!r} has a default the schema cannot carry ({p.default_repr or 'unknown'}); pass it explicitly")
            if has_default:
                text += " = " + self.value(p.default, p.type)
                seen_default = True
            elif seen_default and not star:
                params.append("*")
                star = True
            params.append(text)
        if m.params and m.params[-1].positional_only:
            params.append("/")
        streams_out = m.kind in ("server_stream", "bidi_stream")
        if m.reply is None:
            ret = "None"
        else:
            ret = self._slot(m.reply, m.reply_allowed)
        if streams_out and blocking:
            self.typing.add("Iterator")
            ret = f"Iterator[{ret}]"
        elif streams_out:
            self.typing.add("AsyncIterator")
            ret = f"AsyncIterator[{ret}]"
        elif m.kind == "oneway":
            ret = "None"
        lines = notes + lines
        prefix = "def" if streams_out or blocking else "async def"
        signature = f"    {prefix} {m.name}({', '.join(params)}) -> {ret}:"
        if m.doc:
            lines.append(signature)
            lines.append(_docstring(m.doc, "        ", verbatim=False))
            lines.append("        ...")
        else:
            lines.append(signature + " ...")
        return lines

    def _slot(self, s: dict[str, Any], allowed: list[AllowedDoc] | None) -> str:
        """A parameter's or reply's type; a widened slot reproduces its allow-list."""
        if not allowed:
            return self.type(s)
        classes = [self.type(a.type) for a in allowed if a.key]
        plain = [a for a in allowed if not a.key]
        if not classes:
            return self.type(s)
        listed = ", ".join(classes)
        if plain and kind(plain[0].type) in ("any", "object"):
            self.typing.add("Annotated")
            return f"Annotated[object, xrpc.allow({listed})]"
        if plain:
            return " | ".join([*classes, self.type(plain[0].type)])
        if len(classes) > 1 and not all(self._tagged(a.type) for a in allowed):
            return " | ".join(classes)  # xrpc widens a union of several record classes by itself
        self.typing.add("Annotated")
        return f"Annotated[{' | '.join(classes)}, xrpc.allow({listed})]"

    def _tagged(self, s: dict[str, Any]) -> bool:
        r, name = resolve(s, self.defs)
        return name is not None and Record(r, name).tag_field is not None if kind(r, named=True) == "record" else False

    # ------------------------------------------------------------------ types
    def type(self, s: dict[str, Any]) -> str:
        base, used, meta = self._base(s)
        for key in _META_KEYS:
            if key in s:
                meta.append((key, _pylit(s[key])))
        extra = {k: v for k, v in s.items() if k not in used and k not in _META_KEYS and k != "default" and not is_xrpc_key(k)}
        if extra:
            meta.append(("extra_json_schema", _pylit(extra)))
        if not meta:
            return base
        self.typing.add("Annotated")
        return f"Annotated[{base}, msgspec.Meta({', '.join(f'{k}={v}' for k, v in meta)})]"

    def _base(self, s: dict[str, Any]) -> tuple[str, set[str], list[tuple[str, str]]]:
        meta: list[tuple[str, str]] = []
        n = ref_name(s)
        if n is not None:
            if n not in self.pyname:
                raise CodegenError(f"unresolved $ref {s['$ref']!r}")
            target = self.defs[n]
            if kind(target, named=True) == "enum" and not self._is_enum_class(target):
                return self._literal(target.get("enum", [])), {"$ref"}, meta
            return self.pyname[n], {"$ref"}, meta
        k = kind(s)
        if k == "union":
            parts: list[str] = []
            for m in members(s):
                text = self.type(m)
                if text == "Any":
                    self.typing.add("Any")
                    return "Any", {"anyOf", "discriminator"}, meta
                if text not in parts:
                    parts.append(text)
            return " | ".join(parts) or "Any", {"anyOf", "discriminator"}, meta
        if k == "enum":
            return self._literal(s.get("enum", [])), {"enum", "type"}, meta
        if k in ("any", "object"):
            if k == "any":
                self.typing.add("Any")
            return ("Any" if k == "any" else "object"), set(), meta
        if k == "interface":
            proto = self.protocols.get(str(s[X_INTERFACE]))
            if proto is None:
                raise CodegenError(f"a method passes interface {s[X_INTERFACE]!r} by reference, but the schema does not define it")
            return proto, {X_INTERFACE}, meta
        if k in ("fd", "shm"):
            return ("xrpc.FileDescriptor" if k == "fd" else "xrpc.SharedBuffer"), set(), meta
        if k == "null":
            return "None", {"type"}, meta
        if k == "boolean":
            return "bool", {"type"}, meta
        if k in ("integer", "number"):
            for key, arg in _NUMERIC:
                if key in s:
                    meta.append((arg, _pylit(s[key])))
            return ("int" if k == "integer" else "float"), {"type", *(key for key, _ in _NUMERIC)}, meta
        if k in ("string", "bytes", "datetime", "date", "time", "timedelta", "uuid", "decimal"):
            used = {"type", "format", "contentEncoding", "minLength", "maxLength", "pattern"}
            if k == "string":
                for key, arg in (("minLength", "min_length"), ("maxLength", "max_length"), ("pattern", "pattern")):
                    if key in s:
                        meta.append((arg, _pylit(s[key])))
                return "str", used, meta
            if k == "bytes":
                # msgspec states byte lengths as base64 lengths; these bounds give back the same schema
                if "minLength" in s:
                    meta.append(("min_length", repr(max(0, 3 * int(s["minLength"]) // 4 - 2))))
                if "maxLength" in s:
                    meta.append(("max_length", repr(3 * int(s["maxLength"]) // 4)))
                return ("bytearray" if s.get(X_PYTHON) == "bytearray" else "bytes"), used, meta
            if k in ("datetime", "time"):
                tz = datetime_tz(s)
                if tz is not None:
                    meta.append(("tz", repr(tz)))
            self.modules.add({"uuid": "uuid", "decimal": "decimal"}.get(k, "datetime"))
            return {
                "datetime": "datetime.datetime",
                "date": "datetime.date",
                "time": "datetime.time",
                "timedelta": "datetime.timedelta",
                "uuid": "uuid.UUID",
                "decimal": "decimal.Decimal",
            }[k], used, meta
        if k in ("tuple", "record"):
            items = [self.type(i) for i in s.get("prefixItems", ())]
            return f"tuple[{', '.join(items) if items else '()'}]", {"type", "prefixItems", "items", "minItems", "maxItems"}, meta
        if k == "array":
            inner = self.type(s["items"]) if isinstance(s.get("items"), dict) else self._any()
            for key, arg in (("minItems", "min_length"), ("maxItems", "max_length")):
                if key in s:
                    meta.append((arg, repr(s[key])))
            container = s.get(X_PYTHON)
            used = {"type", "items", "uniqueItems", "minItems", "maxItems"}
            if container == "tuple":
                return f"tuple[{inner}, ...]", used, meta
            if container == "frozenset":
                return f"frozenset[{inner}]", used, meta
            return (f"set[{inner}]" if s.get("uniqueItems") else f"list[{inner}]"), used, meta
        if k == "dict":
            used = {"type", "additionalProperties", "propertyNames", "minProperties", "maxProperties", X_KEYS}
            keys = s.get(X_KEYS)
            if isinstance(keys, dict):
                key = self.type(keys)
            elif isinstance(s.get("propertyNames"), dict):
                key = self.type({"type": "string", **s["propertyNames"]})
            else:
                key = "str"
            value = s.get("additionalProperties")
            inner = self.type(value) if isinstance(value, dict) else self._any()
            for k2, arg in (("minProperties", "min_length"), ("maxProperties", "max_length")):
                if k2 in s:
                    meta.append((arg, repr(s[k2])))
            return f"dict[{key}, {inner}]", used, meta
        # an inline object with properties: no class to name it
        return f"dict[str, {self._any()}]", {"type", "properties", "required", "additionalProperties"}, meta

    def _any(self) -> str:
        self.typing.add("Any")
        return "Any"

    def _literal(self, values: list[Any]) -> str:
        self.typing.add("Literal")
        return "Literal[" + ", ".join(_pylit(v) for v in values) + "]"

    # ------------------------------------------------------------------ values
    def value(self, v: Any, s: dict[str, Any]) -> str:
        """A Python expression for the JSON value ``v`` of a fragment ``s`` (a default)."""
        r, name = resolve(s, self.defs)
        if v is None:
            return "None"
        k = kind(r, named=name is not None)
        if k == "union":
            for m in members(r):
                if _fits(v, m, self.defs):
                    return self.value(v, m)
            return _pylit(v)
        if k == "enum":
            if name is not None and self._is_enum_class(r):
                for member, value in self._members(r).items():
                    if value == v and type(value) is type(v):
                        self.deps.add(name)
                        return f"{self.pyname[name]}.{member}"
            return _pylit(v)
        if k == "record" and name is not None:
            self.deps.add(name)
            rec = Record(r, name)
            args = []
            for i, (wire, pyname, frag, _) in enumerate(rec.fields):
                if rec.positional and isinstance(v, list) and i + (1 if rec.tag_field else 0) < len(v):
                    args.append(f"{pyname}={self.value(v[i + (1 if rec.tag_field else 0)], frag)}")
                elif not rec.positional and isinstance(v, dict) and wire in v:
                    args.append(f"{pyname}={self.value(v[wire], frag)}")
            return f"{self.pyname[name]}({', '.join(args)})"
        if k == "bytes" and isinstance(v, str):
            raw = _bytes_literal(base64.b64decode(v))
            return f"bytearray({raw})" if r.get(X_PYTHON) == "bytearray" else raw
        if k in ("datetime", "date", "time", "timedelta") and isinstance(v, str):
            self.modules.add("datetime")
            return _temporal(v, k)
        if k == "uuid" and isinstance(v, str):
            self.modules.add("uuid")
            return f"uuid.UUID({v!r})"
        if k == "decimal" and isinstance(v, str):
            self.modules.add("decimal")
            return f"decimal.Decimal({v!r})"
        if k == "number" and isinstance(v, int) and not isinstance(v, bool):
            return repr(float(v))
        if k in ("tuple", "record") and isinstance(v, list):
            items = [self.value(x, f) for x, f in zip(v, r.get("prefixItems", ()))]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if k == "array" and isinstance(v, list):
            items = [self.value(x, sub(r, "items")) for x in v]
            container = r.get(X_PYTHON)
            if container == "tuple":
                return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
            if container == "frozenset":
                return "frozenset({" + ", ".join(items) + "})" if items else "frozenset()"
            if r.get("uniqueItems"):
                return "{" + ", ".join(items) + "}" if items else "set()"
            return "[" + ", ".join(items) + "]"
        if k == "dict" and isinstance(v, dict):
            value_frag = sub(r, "additionalProperties")
            key_frag = sub(r, X_KEYS, {"type": "string"})
            return "{" + ", ".join(f"{self._key(key, key_frag)}: {self.value(x, value_frag)}" for key, x in v.items()) + "}"
        return _pylit(v)

    def _key(self, key: str, s: dict[str, Any]) -> str:
        r, _ = resolve(s, self.defs)
        k = kind(r)
        try:
            if k == "integer":
                return repr(int(key))
            if k == "number":
                return repr(float(key))
            if k == "enum" and isinstance(r.get("enum"), list) and all(isinstance(x, int) for x in r["enum"]):
                return self.value(int(key), s)
        except ValueError:
            pass
        return self.value(key, s)


def _temporal(v: str, k: str) -> str:
    """A constructor call for a date/time default msgspec wrote as ISO text."""
    cls = {"datetime": datetime.datetime, "date": datetime.date, "time": datetime.time, "timedelta": datetime.timedelta}[k]
    value: Any
    try:
        value = msgspec.convert(v, cls)
    except msgspec.ValidationError:
        return f"msgspec.convert({_q(v)}, datetime.{k})"
    if isinstance(value, datetime.timedelta):
        return _temporal_delta(value)
    if isinstance(value, datetime.datetime):
        args = [value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond]
    elif isinstance(value, datetime.date):
        args = [value.year, value.month, value.day]
    else:
        args = [value.hour, value.minute, value.second, value.microsecond]
    while len(args) > 3 and args[-1] == 0:
        args.pop()
    text = ", ".join(map(str, args))
    tz = getattr(value, "tzinfo", None)
    if tz is not None:
        offset = tz.utcoffset(None)
        zone = "datetime.timezone.utc" if not offset else f"datetime.timezone({_temporal_delta(offset)})"
        text += f", tzinfo={zone}"
    return f"datetime.{k}({text})"


def _temporal_delta(value: datetime.timedelta) -> str:
    parts = [f"{n}={getattr(value, n)}" for n in ("days", "seconds", "microseconds") if getattr(value, n)]
    return f"datetime.timedelta({', '.join(parts)})"


def _fits(v: Any, s: dict[str, Any], defs: dict[str, dict[str, Any]]) -> bool:
    """Could JSON value ``v`` be a value of fragment ``s``?  (Chooses a union member for a default.)"""
    r, name = resolve(s, defs)
    k = kind(r, named=name is not None)
    if k in ("any", "object"):
        return True
    if k == "union":
        return any(_fits(v, m, defs) for m in members(r))
    if k == "enum":
        return any(v == x and type(v) is type(x) for x in r.get("enum", ()))
    if k == "null":
        return v is None
    if k == "boolean":
        return isinstance(v, bool)
    if k == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if k == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if k in ("string", "bytes", "datetime", "date", "time", "timedelta", "uuid", "decimal"):
        return isinstance(v, str)
    if k in ("array", "tuple"):
        return isinstance(v, list)
    if k == "record":
        return isinstance(v, list) if "prefixItems" in r else isinstance(v, dict)
    if k == "dict":
        return isinstance(v, dict)
    return False
