"""Generate docs/api.md: the API reference of every public name in ``xrpc.__all__``.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py OUT.md     # write elsewhere (the tests compare the two)

Everything comes from the code itself, with ``inspect``: signatures from ``inspect.signature``,
text from ``inspect.getdoc``.  Names are grouped (functions, classes, exceptions, modules, type
aliases) and sorted, and nothing that varies between runs (object addresses) is written, so the
output is the same for the same code.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import msgspec  # noqa: E402

import xrpc  # noqa: E402

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class _Text:
    """An annotation or default shown exactly as written (``inspect`` would quote strings)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _annotation(annotation: Any) -> Any:
    if annotation is inspect.Parameter.empty:
        return annotation
    if isinstance(annotation, str):
        return _Text(annotation)
    return _Text(_type_text(annotation))


def _type_text(tp: Any) -> str:
    if isinstance(tp, type) and not isinstance(tp, types.GenericAlias):
        return tp.__name__ if tp.__module__ in ("builtins",) or tp.__module__.startswith("xrpc") else f"{tp.__module__}.{tp.__qualname__}"
    text = repr(tp)
    text = re.sub(r"\bxrpc\.[\w.]*\.(\w+)", r"\1", text)  # xrpc._connection.CallContext -> CallContext
    return text.replace("typing.", "").replace("collections.abc.", "")


def _default(value: Any) -> Any:
    if value is inspect.Parameter.empty:
        return value
    text = repr(value)
    if _ADDRESS.search(text):
        text = f"<{type(value).__name__}>"
    return _Text(text)


def signature(obj: Any, *, drop_self: bool = False) -> str:
    """``(a: int, b: str = 'x') -> T`` with annotations as written and no object addresses."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = list(sig.parameters.values())
    if drop_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    params = [p.replace(annotation=_annotation(p.annotation), default=_default(p.default)) for p in params]
    ret = sig.return_annotation
    if isinstance(obj, type):
        ret = inspect.Signature.empty  # a class returns its instance
    return str(sig.replace(parameters=params, return_annotation=_annotation(ret)))


def _doc(obj: Any) -> str:
    doc = inspect.getdoc(obj)
    return doc.strip() if doc else "*(no docstring)*"


def _own_doc(cls: type) -> str:
    """The class's own docstring, not one inherited from a base outside xrpc."""
    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else "*(no docstring)*"


def _is_exception(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseException)


def _kind(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return "module"
    if _is_exception(obj):
        return "exception"
    if isinstance(obj, type):
        return "class"
    if callable(obj) and (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismethod(obj) or hasattr(obj, "__wrapped__")):
        return "function"
    return "alias"


def _members(cls: type) -> list[tuple[str, str, Any]]:
    """Public methods and properties that xrpc defines on ``cls`` (or on its xrpc bases)."""
    seen: dict[str, tuple[str, Any]] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("xrpc"):
            continue
        for name, raw in vars(klass).items():
            if name.startswith("_"):
                continue
            if isinstance(raw, property):
                seen[name] = ("property", raw)
            elif isinstance(raw, staticmethod):
                seen[name] = ("staticmethod", raw.__func__)
            elif isinstance(raw, classmethod):
                seen[name] = ("classmethod", raw.__func__)
            elif inspect.isfunction(raw):
                seen[name] = ("method", raw)
    return [(name, kind, obj) for name, (kind, obj) in sorted(seen.items())]


def _fields(cls: type) -> list[str]:
    """Fields of a msgspec Struct or a dataclass, as ``name: type = default`` lines."""
    lines = []
    if issubclass(cls, msgspec.Struct):
        info = msgspec.inspect.type_info(cls)
        hints = getattr(cls, "__annotations__", {})
        for f in info.fields:  # type: ignore[attr-defined]
            ann = hints.get(f.name, "")
            ann_text = ann if isinstance(ann, str) else _type_text(ann)
            if f.default is not msgspec.NODEFAULT:
                lines.append(f"`{f.name}: {ann_text} = {_default(f.default)!r}`")
            elif f.default_factory is not msgspec.NODEFAULT:
                lines.append(f"`{f.name}: {ann_text}` (default: a new `{_type_text(f.default_factory)}`)")
            else:
                lines.append(f"`{f.name}: {ann_text}`")
    elif dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            ann_text = f.type if isinstance(f.type, str) else _type_text(f.type)
            if f.default is not dataclasses.MISSING:
                lines.append(f"`{f.name}: {ann_text} = {_default(f.default)!r}`")
            elif f.default_factory is not dataclasses.MISSING:
                lines.append(f"`{f.name}: {ann_text}` (default: a new `{_type_text(f.default_factory)}`)")
            else:
                lines.append(f"`{f.name}: {ann_text}`")
    return lines


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


_ANCHORS: dict[str, str] = {}


def _anchor(qualname: str) -> str:
    """The anchor GitHub gives the heading of ``qualname`` (repeated slugs get -1, -2, ...)."""
    return _ANCHORS.get(qualname, _slug(qualname))


def _number_anchors(qualnames: list[str]) -> None:
    counts: dict[str, int] = {}
    _ANCHORS.clear()
    for q in qualnames:
        slug = _slug(q)
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        _ANCHORS[q] = slug if n == 0 else f"{slug}-{n}"


def _function_section(qualname: str, fn: Callable[..., Any], level: str = "###") -> list[str]:
    return [f"{level} `{qualname}`", "", "```python", f"{qualname}{signature(fn)}", "```", "", _doc(fn), ""]


def _attributes(cls: type) -> list[str]:
    """Instance attributes a class declares (``__slots__`` and class-level annotations)."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("xrpc") or issubclass(klass, msgspec.Struct) or dataclasses.is_dataclass(klass):
            continue
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if not name.startswith("_") and name not in names:
                names.append(name)
        for name in klass.__dict__.get("__annotations__", {}):
            if not name.startswith("_") and name not in names and not isinstance(klass.__dict__.get(name), (property, staticmethod, classmethod)):
                names.append(name)
    return names


def _class_section(qualname: str, cls: type, level: str = "###") -> list[str]:
    out = [f"{level} `{qualname}`", ""]
    bases = [b for b in cls.__bases__ if b is not object and not b.__name__.startswith("_")]  # private bases are not API
    init_sig = "" if issubclass(cls, enum.Enum) else signature(cls)
    if init_sig in ("()", "(...)"):
        init_sig = ""
    out += ["```python", f"class {qualname}{init_sig}", "```", ""]
    if bases:
        out += [f"Bases: {', '.join(f'`{_type_text(b)}`' for b in bases)}", ""]
    out += [_own_doc(cls), ""]
    if issubclass(cls, enum.Enum):
        out += ["Members:", ""] + [f"- `{m.name}` = `{m.value!r}`" for m in cls] + [""]
    fields = _fields(cls)
    if fields:
        out += ["Fields:", ""] + [f"- {f}" for f in fields] + [""]
    attributes = _attributes(cls)
    if attributes:
        out += ["Attributes: " + ", ".join(f"`{a}`" for a in attributes), ""]
    for name, kind, member in _members(cls):
        if kind == "property":
            ret = ""
            if member.fget is not None:
                ann = inspect.signature(member.fget).return_annotation
                if ann is not inspect.Signature.empty:
                    ret = f" -> {ann if isinstance(ann, str) else _type_text(ann)}"
            out += [f"- **`{name}`** *(property{ret})*"]
        else:
            prefix = "" if kind == "method" else f"*{kind}* "
            out += [f"- {prefix}**`{name}{signature(member, drop_self=kind != 'staticmethod')}`**"]
        doc = inspect.getdoc(member)
        if doc:
            out += ["", _indent(doc)]
        out.append("")
    return out


def _indent(text: str) -> str:
    return "\n".join(("  " + line) if line else "" for line in text.splitlines())


def _exception_tree(exceptions: dict[str, type]) -> list[str]:
    names = {cls: name for name, cls in exceptions.items()}

    def parent(cls: type) -> type | None:
        for base in cls.__mro__[1:]:
            if base in names:
                return base
        return None

    children: dict[type | None, list[type]] = {}
    for cls in exceptions.values():
        children.setdefault(parent(cls), []).append(cls)

    lines: list[str] = []

    def walk(node: type | None, depth: int) -> None:
        for cls in sorted(children.get(node, []), key=lambda c: names[c]):
            extra = [b.__name__ for b in cls.__mro__[1:] if b.__module__ == "builtins" and b not in (BaseException, Exception, object)]
            also = f" (also `{'`, `'.join(extra)}`)" if extra else ""
            lines.append(f"{'  ' * depth}- [`{names[cls]}`](#{_anchor('xrpc.' + names[cls])}){also}")
            walk(cls, depth + 1)

    walk(None, 0)
    return lines


def generate() -> str:
    names = sorted(xrpc.__all__, key=str.lower)
    groups: dict[str, dict[str, Any]] = {"function": {}, "class": {}, "exception": {}, "module": {}, "alias": {}}
    for name in names:
        obj = getattr(xrpc, name)
        groups[_kind(obj)][name] = obj

    order = [f"xrpc.{n}" for kind in ("function", "class", "exception") for n in groups[kind]]
    for n, module in groups["module"].items():
        order += [f"xrpc.{n}"] + [f"xrpc.{n}.{m}" for m in sorted(getattr(module, "__all__", ()), key=str.lower)]
    order += [f"xrpc.{n}" for n in groups["alias"]]
    _number_anchors(order)  # in the order the headings are written

    out = [
        "# API reference",
        "",
        "<!-- Generated by docs/gen_api.py from the docstrings; do not edit by hand: run `python docs/gen_api.py`. -->",
        "",
        _doc(xrpc),
        "",
        "Every name below is importable from `xrpc` (`xrpc.__all__`). Guides: [tutorial](tutorial.md),",
        "[testing](testing.md), [streams](streaming.md), [objects](objects.md), [security](security.md),",
        "[services](services.md), [command line](cli.md).",
        "",
        "## Contents",
        "",
    ]
    titles = {"function": "Functions", "class": "Classes", "exception": "Exceptions", "module": "Modules", "alias": "Type aliases"}
    for kind, title in titles.items():
        if groups[kind]:
            links = ", ".join(f"[`{n}`](#{_anchor('xrpc.' + n)})" for n in groups[kind])
            out += [f"- **{title}**: {links}"]
    out.append("")

    out += ["## Functions", ""]
    for name, fn in groups["function"].items():
        out += _function_section(f"xrpc.{name}", fn)

    out += ["## Classes", ""]
    for name, cls in groups["class"].items():
        out += _class_section(f"xrpc.{name}", cls)

    out += ["## Exceptions", "", "Every exception xrpc raises on purpose derives from `xrpc.Error`:", ""]
    out += _exception_tree(groups["exception"]) + [""]
    for name, cls in groups["exception"].items():
        out += _class_section(f"xrpc.{name}", cls)

    out += ["## Modules", ""]
    for name, module in groups["module"].items():
        out += [f"### `xrpc.{name}`", "", _doc(module), ""]
        for member_name in sorted(getattr(module, "__all__", ()), key=str.lower):
            member = getattr(module, member_name)
            qual = f"xrpc.{name}.{member_name}"
            if isinstance(member, type):
                out += _class_section(qual, member, level="####")
            else:
                out += _function_section(qual, member, level="####")

    out += ["## Type aliases", ""]
    for name, alias in groups["alias"].items():
        out += [f"### `xrpc.{name}`", "", "```python", f"{name} = {_type_text(alias)}", "```", ""]
        if name == "Middleware":
            out += [
                "A middleware is `async def mw(ctx: xrpc.CallContext, call_next) -> Any`: it may look at",
                "`ctx`, refuse the call by raising, and otherwise returns `await call_next()`. Pass a list",
                "to `xrpc.Server(middleware=[...])` or `xrpc.connect(url, middleware=[...])`.",
                "",
            ]
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    target = Path(argv[1]) if len(argv) > 1 else HERE / "api.md"
    target.write_text(generate(), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
