"""The ``xrpc`` command: inspect interfaces, call methods, list services, serve objects.

``xrpc inspect``, ``xrpc call``, ``xrpc list`` and ``xrpc serve`` are what ``busctl`` and
``grpcurl`` are to D-Bus and gRPC (see ``docs/cli.md``).

Theory of operation
-------------------
``call`` needs no Python types from the service.  It reads the export's description from the
server's built-in introspection service (``xrpc.introspect``) and builds a *dynamic interface* from
it: for each method a function object copied from a template (``async def`` for unary, one-way and
client-stream methods, plain ``def`` for server and two-way streams) with a ``__signature__`` and
``__annotations__`` written from the description, every type being ``typing.Any`` (stream
parameters and replies ``AsyncIterator[Any]``).  ``@xrpc.interface`` then reads that class like any
other Protocol, so the ordinary proxy machinery makes the call.  Values typed ``Any`` travel as
plain data, which is exactly what JSON on the command line gives; the server checks them against
its real types and answers ``ValidationError`` if they do not fit.  Declared errors come back as
exception classes made from their names, so they print as themselves.

Every name that comes from the peer (interface, methods, parameters, errors) is checked to be a
plain identifier before it is used to build anything; no text from the peer is ever run.

Exit codes (``Exit``): 0 ok, 1 the call failed on the server, 2 usage or argument error, 3 cannot
connect (or service not found), 4 no such object or method.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import functools
import importlib
import importlib.util
import inspect
import keyword
import logging
import os
import signal
import stat
import sys
import textwrap
import threading
import traceback
import types
import typing
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Collection, Mapping, Sequence

import anyio
import msgspec

from . import __version__
from . import _errors as errors
from ._api import Server, connect, loop_backend
from ._interface import MethodKind, describe, interface, is_interface
from ._systemd import service_lifecycle
from ._transports import ParsedURL
from ._workers import WorkerError, WorkerPool, serve_until_signalled, target_of
from ._introspect import INTROSPECT_NAME, ExportDescription, Introspection, MethodInfo, describe_export

__all__ = ("Exit", "CLIError", "dynamic_interface", "main", "build_parser")

PROG = "xrpc"


class Exit(enum.IntEnum):
    """The exit codes scripts can rely on."""

    OK = 0
    CALL_FAILED = 1  # the remote method raised, or the server refused an argument (ValidationError)
    USAGE = 2  # bad command line: unknown or missing argument, malformed JSON, bad import path
    CONNECT = 3  # cannot connect, service not found, handshake or introspection failed
    NOT_FOUND = 4  # no such object (export) or method


EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  the call failed on the server: the method raised (RemoteError or a declared
     error), the server refused an argument (ValidationError), or it timed out
  2  usage error: unknown or missing argument, malformed JSON, bad import path
  3  cannot connect: nothing listens, the service is not found or not usable
  4  no such object (export) or method
"""


class CLIError(Exception):
    """A failure the CLI reports as ``error: <message>`` with its exit code."""

    def __init__(self, message: str, code: Exit) -> None:
        super().__init__(message)
        self.code = code


class DeclaredError(Exception):
    """Base of the stand-ins for a remote interface's declared errors (named like the originals)."""


class StdinError(errors.ValidationError):
    """A line of standard input (a client-stream item) is not JSON.

    A ``ValidationError`` so that the stream pump ends the call with it; reported as a usage error.
    """


# --------------------------------------------------------------------------- output helpers
def _to_builtins(value: Any) -> Any:
    def hook(obj: Any) -> Any:
        if isinstance(obj, msgspec.msgpack.Ext):
            return {"ext": obj.code, "data": obj.data}
        return repr(obj)

    return msgspec.to_builtins(value, enc_hook=hook)


def _json(value: Any, pretty: bool = False) -> bytes:
    data = msgspec.json.encode(_to_builtins(value))
    if pretty:
        data = msgspec.json.format(data, indent=2)
    return data


def _write(data: bytes | str) -> None:
    out = sys.stdout
    if isinstance(data, str):
        data = data.encode()
    out.buffer.write(data if data.endswith(b"\n") else data + b"\n")
    out.flush()


def _rich_console() -> Any:
    """A ``rich`` console when rich is installed and stdout is a terminal, else None."""
    if os.environ.get("NO_COLOR") or not sys.stdout.isatty():
        return None
    try:
        console = importlib.import_module("rich.console")  # optional: used only if installed
    except ImportError:
        return None
    return console.Console(highlight=True, markup=False, soft_wrap=True)


def _print_text(text: str) -> None:
    console = _rich_console()
    if console is not None:
        console.print(text)
    else:
        _write(text)


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, CLIError):
        return f"error: {exc}"
    message = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else "")
    return f"error: {type(exc).__qualname__}: {message}"


# --------------------------------------------------------------------------- loading Python objects
def _current_directory_importable() -> None:
    """As ``python -m`` does: modules of the current directory can be named (the ``xrpc`` console
    script, unlike ``python -m xrpc``, does not put it on ``sys.path``)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _import_module(modname: str) -> types.ModuleType:
    _current_directory_importable()
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        raise CLIError(f"cannot import {modname!r}: {exc}", Exit.USAGE) from None
    except Exception as exc:
        raise CLIError(f"importing {modname!r} failed: {type(exc).__qualname__}: {exc}", Exit.USAGE) from None


def load_object(spec: str) -> Any:
    """``package.module:attr.path`` -> the object (``CLIError`` with exit code 2 otherwise)."""
    modname, sep, attr = spec.partition(":")
    if not sep or not modname or not attr:
        raise CLIError(f"{spec!r} is not an import path: write package.module:name", Exit.USAGE)
    obj: Any = _import_module(modname)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(f"{spec}: {modname} has no attribute {attr!r}", Exit.USAGE) from None
    return obj


def load_interface(spec: str) -> Any:
    obj = load_object(spec)
    if not is_interface(obj):
        raise CLIError(f"{spec} is not an @xrpc.interface class", Exit.USAGE)
    return obj


def module_interfaces(module: types.ModuleType) -> list[Any]:
    """Every ``@xrpc.interface`` class a module holds, in definition order, each once."""
    found: list[Any] = []
    for value in vars(module).values():
        if is_interface(value) and value not in found:
            found.append(value)
    return found


def local_description(iface: Any, name: str = "") -> dict[str, Any]:
    """What ``inspect`` prints for a local interface: the introspection record plus defaults."""
    try:
        desc = describe(iface)
    except errors.InterfaceError as exc:
        raise CLIError(f"{iface.__module__}:{iface.__qualname__}: {exc}", Exit.USAGE) from None
    record: dict[str, Any] = msgspec.to_builtins(describe_export(name or desc.name, desc))
    record["python"] = f"{iface.__module__}:{iface.__qualname__}"
    for mrec, m in zip(record["methods"], desc.methods.values()):
        for prec, pfull in zip(mrec["params"], m.describe()["params"]):
            if "default" in pfull:
                prec["default"] = pfull["default"]
    return record


# --------------------------------------------------------------------------- text rendering
_KIND_LABEL = {
    MethodKind.UNARY.value: "unary",
    MethodKind.ONEWAY.value: "oneway",
    MethodKind.SERVER_STREAM.value: "server-stream",
    MethodKind.CLIENT_STREAM.value: "client-stream",
    MethodKind.BIDI_STREAM.value: "bidi-stream",
}


def _display_type(p: dict[str, Any]) -> str:
    t: str = p["type"]
    # a widened slot's type reads "Annotated[Base, Allow(classes=(...))]": the allowed list says it better
    cut = t.rfind(", Allow(")
    if p.get("allowed") and t.startswith("Annotated[") and cut > 0:
        t = t[len("Annotated[") : cut]
    return t


def _param_text(p: dict[str, Any]) -> str:
    t = _display_type(p)
    if p.get("stream"):
        t = f"stream[{t}]"
    if p.get("allowed"):
        t += " {" + " | ".join(p["allowed"]) + "}"
    text = f"{p['name']}: {t}"
    if not p.get("required", True):
        text += f" = {p.get('default', '...')}"
    return text


def _method_text(m: dict[str, Any]) -> str:
    params = ", ".join(_param_text(p) for p in m["params"])
    reply = m["reply"]
    if m["kind"] in (MethodKind.SERVER_STREAM.value, MethodKind.BIDI_STREAM.value):
        reply = f"stream[{reply}]"
    return f"{m['name']}({params}) -> {reply}"


def render_export(rec: dict[str, Any]) -> str:
    """A human-readable description of one export (or local interface)."""
    lines = []
    title = rec["name"]
    if rec["interface"] != rec["name"]:
        title += f"  (interface {rec['interface']})"
    lines.append(title)
    if rec.get("python"):
        lines.append(f"  python       {rec['python']}")
    lines.append(f"  fingerprint  {rec['fingerprint']}")
    lines.append(f"  errors       {', '.join(rec.get('errors') or []) or '(none)'}")
    methods = rec.get("methods") or []
    lines.append(f"  methods      {len(methods)}")
    width = max((len(_KIND_LABEL.get(m["kind"], m["kind"])) for m in methods), default=0)
    for m in methods:
        kind = _KIND_LABEL.get(m["kind"], m["kind"])
        lines.append(f"    {kind:<{width}}  {_method_text(m)}")
        doc = (m.get("doc") or "").strip()
        if doc:
            lines.extend(textwrap.indent(doc, " " * (width + 8)).splitlines())
    return "\n".join(lines)


# --------------------------------------------------------------------------- the dynamic interface
async def _async_template(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Stand-in body of a method of a dynamic interface (proxies never run it)."""
    raise NotImplementedError


def _plain_template(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Stand-in body of a stream method of a dynamic interface (proxies never run it)."""
    raise NotImplementedError


def _peer_name(name: Any, what: str, *, dotted: bool = False, private_ok: bool = False) -> str:
    """Check a name the peer sent: a plain identifier (or dotted identifiers), not a keyword."""
    parts = name.split(".") if isinstance(name, str) and dotted else [name]
    for part in parts:
        if (
            not isinstance(part, str)
            or not part.isidentifier()
            or keyword.iskeyword(part)
            or (part.startswith("_") and not private_ok)
            or part.startswith("__")
        ):
            raise CLIError(f"the server describes {what} {name!r}, which is not a usable Python name", Exit.CONNECT)
    return typing.cast(str, name)


_KINDS = {k.value: k for k in MethodKind}


def _method_function(owner: str, m: MethodInfo, given: Collection[str] | None = None) -> Any:
    name = _peer_name(m.name, "a method")
    kind = _KINDS.get(m.kind)
    if kind is None:
        raise CLIError(f"the server describes method {m.name!r} of an unknown kind {m.kind!r}", Exit.CONNECT)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    annotations: dict[str, Any] = {}
    seen_optional = False
    keyword_only = False
    wanted = m.params
    if given is not None:
        # Arguments travel as an array in declaration order, and every field of it is sent: leave
        # out the optional parameters after the last one given, so that the server uses its defaults.
        value_params = [p for p in m.params if not p.stream]
        last = max((i for i, p in enumerate(value_params) if p.name in given or p.required), default=-1)
        dropped = {p.name for p in value_params[last + 1 :]}
        wanted = [p for p in m.params if p.name not in dropped]
    for p in wanted:
        pname = _peer_name(p.name, f"a parameter of {m.name}", private_ok=True)
        if pname == "self":
            raise CLIError(f"the server describes a parameter named 'self' in {m.name}", Exit.CONNECT)
        ann: Any = AsyncIterator[Any] if p.stream else Any
        annotations[pname] = ann
        if p.required and seen_optional:
            keyword_only = True  # a required parameter after an optional one can only be keyword-only
        seen_optional = seen_optional or not p.required
        pkind = inspect.Parameter.KEYWORD_ONLY if keyword_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        default = inspect.Parameter.empty if p.required or p.stream else None
        params.append(inspect.Parameter(pname, pkind, default=default, annotation=ann))
    if kind.streams_out:
        ret: Any = AsyncIterator[Any]
    elif kind is MethodKind.ONEWAY or m.reply == "None":
        ret = None
    else:
        ret = Any
    annotations["return"] = ret
    try:
        sig = inspect.Signature(params, return_annotation=ret)
    except ValueError as exc:
        raise CLIError(f"the server describes method {m.name!r} with unusable parameters: {exc}", Exit.CONNECT) from None
    template = _plain_template if kind.streams_out else _async_template
    fn = types.FunctionType(template.__code__, template.__globals__, name, None, template.__closure__)
    fn.__qualname__ = f"{owner}.{name}"
    fn.__module__ = __name__
    fn.__doc__ = m.doc or None
    fn.__annotations__ = annotations
    fn.__signature__ = sig  # type: ignore[attr-defined]
    if kind is MethodKind.ONEWAY:
        fn.__xrpc_oneway__ = True  # type: ignore[attr-defined]
    return fn


def _error_class(qualname: str) -> type[Exception]:
    """A stand-in for a declared error of the remote interface, keyed by its qualified name."""
    _peer_name(qualname, "a declared error", dotted=True)
    cls = type(qualname.rpartition(".")[2], (DeclaredError,), {"__module__": "xrpc.remote", "__doc__": "A declared error of the remote interface."})
    cls.__qualname__ = qualname
    return cls


def dynamic_interface(
    export: ExportDescription, methods: Collection[str] | None = None, arguments: Mapping[str, Collection[str]] | None = None
) -> Any:
    """An ``@xrpc.interface`` class built from a remote description (every type ``Any``).

    ``methods`` restricts it to those methods (default: all of them).  The client does not know
    the defaults of optional parameters, and every parameter of the signature is sent (``None``
    when left out); ``arguments`` maps a method to the names a call will give, and that method then
    ends at the last of them, so that the server applies its own defaults to the rest.
    """
    iname = _peer_name(export.interface, "the interface", dotted=True)
    cls_name = iname.rpartition(".")[2]
    ns: dict[str, Any] = {"__module__": __name__, "__qualname__": cls_name, "__doc__": f"Dynamic interface for {iname}."}
    for m in export.methods:
        if methods is not None and m.name not in methods:
            continue
        fn = _method_function(cls_name, m, None if arguments is None else arguments.get(m.name))
        if fn.__name__ in ns:
            raise CLIError(f"the server describes method {m.name!r} twice", Exit.CONNECT)
        ns[fn.__name__] = fn
    errs = tuple(_error_class(e) for e in export.errors)
    cls = type(cls_name, (typing.Protocol,), ns)
    try:
        iface = interface(name=iname, errors=errs)(cls)
        desc = describe(iface)
    except errors.InterfaceError as exc:
        raise CLIError(f"the description of {iname} is not usable: {exc}", Exit.CONNECT) from None
    for dm in desc.methods.values():
        dm.default_tail = ()  # ``None`` stands for an unknown default: an explicit ``None`` is sent too
    return iface


# --------------------------------------------------------------------------- connecting
def _is_url(target: str) -> bool:
    return "://" in target


_CONNECT_ERRORS = (errors.Error, TimeoutError, OSError)


@contextlib.asynccontextmanager
async def open_target(target: str, timeout: float | None) -> AsyncIterator[Any]:
    """Connect to a URL or a service name; yield something with ``proxy()``.

    Failures to connect raise ``CLIError`` (exit 3, or 2 for a malformed URL or name); what the
    body raises passes through unchanged.
    """
    entered = False
    if _is_url(target):
        try:
            async with connect(target, timeout=timeout) as conn:
                entered = True
                yield conn
        except ValueError as exc:
            if entered:
                raise
            raise CLIError(str(exc), Exit.USAGE) from None
        except _CONNECT_ERRORS as exc:
            if entered:
                raise
            raise CLIError(_about(target, _describe_exc(exc), "cannot connect to"), Exit.CONNECT) from None
        return
    from ._services import connect_service

    try:
        async with connect_service(target, timeout=timeout) as sc:
            entered = True
            try:
                await sc.connect()
            except _CONNECT_ERRORS as exc:
                raise CLIError(_about(repr(target), _describe_exc(exc), "cannot connect to service"), Exit.CONNECT) from None
            yield sc
    except ValueError as exc:
        if entered:
            raise
        raise CLIError(f"{target!r} is neither a URL (unix://, tcp://, tls://) nor a service name: {exc}", Exit.USAGE) from None
    except _CONNECT_ERRORS as exc:
        if entered:
            raise
        raise CLIError(_describe_exc(exc), Exit.CONNECT) from None


def _about(target: str, message: str, prefix: str) -> str:
    """``message``, prefixed with what it is about unless it says so already."""
    return message if target.strip("'") in message else f"{prefix} {target}: {message}"


def _describe_exc(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    if isinstance(exc, errors.Error):
        return str(exc)
    return f"{type(exc).__qualname__}: {exc}"


async def fetch_exports(peer: Any, target: str, timeout: float | None) -> list[ExportDescription]:
    """Ask the server's introspection service for every export the connection can reach."""
    intro = peer.proxy(Introspection, INTROSPECT_NAME, timeout=timeout)
    try:
        return list(await intro.exports())
    except (errors.ObjectNotFound, errors.MethodNotFound) as exc:
        raise CLIError(f"{target} offers no introspection service ({exc})", Exit.NOT_FOUND) from None
    except (errors.ConnectionInterrupted, errors.ConnectionInvalidated, errors.ProtocolError, TimeoutError) as exc:
        raise CLIError(f"{target}: introspection failed: {_describe_exc(exc)}", Exit.CONNECT) from None
    except errors.Error as exc:
        raise CLIError(f"{target}: introspection failed: {type(exc).__qualname__}: {exc}", Exit.CONNECT) from None


def choose_export(exports: Sequence[ExportDescription], object_name: str | None, target: str) -> ExportDescription:
    names = ", ".join(repr(e.name) for e in exports) or "none"
    if object_name is None:
        if len(exports) == 1:
            return exports[0]
        if not exports:
            raise CLIError(f"{target} exports no objects", Exit.NOT_FOUND)
        raise CLIError(f"{target} exports several objects ({names}): name one as OBJECT.METHOD or with --object", Exit.USAGE)
    for e in exports:
        if e.name == object_name:
            return e
    raise CLIError(f"{target} exports no object named {object_name!r} (its exports: {names})", Exit.NOT_FOUND)


def choose_method(export: ExportDescription, method: str) -> MethodInfo:
    for m in export.methods:
        if m.name == method:
            return m
    names = ", ".join(m.name for m in export.methods) or "none"
    what = export.name if export.name == export.interface else f"{export.name} ({export.interface})"
    raise CLIError(f"{what} has no method {method!r} (its methods: {names})", Exit.NOT_FOUND)


# --------------------------------------------------------------------------- arguments
def parse_kv(items: Sequence[str]) -> dict[str, Any]:
    """``k=v`` pairs: ``v`` as JSON when it parses, else as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--arg {item!r}: write NAME=VALUE", Exit.USAGE)
        if key in out:
            raise CLIError(f"argument {key!r} is given twice", Exit.USAGE)
        try:
            raw.encode()
        except UnicodeEncodeError:
            raise CLIError(f"--arg {key}: the value is not valid UTF-8", Exit.USAGE) from None
        try:
            out[key] = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            out[key] = raw
        except RecursionError:
            raise CLIError(f"--arg {key}: the JSON value is nested too deeply", Exit.USAGE) from None
    return out


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _union_members(type_text: str) -> set[str]:
    """The members of a described type: ``Optional[str]``, ``Union[int, str]`` and ``int | str``
    are unions; anything else is one member."""
    text = type_text.strip()
    if text.startswith("Optional[") and text.endswith("]"):
        return _union_members(text[9:-1]) | {"None"}
    if text.startswith("Union[") and text.endswith("]"):
        return {m for part in _split_top(text[6:-1], ",") for m in _union_members(part)}
    parts = _split_top(text, "|")
    if len(parts) > 1:
        return {m for part in parts for m in _union_members(part)}
    return {text}


_JSON_SCALARS = {bool: {"bool"}, int: {"int", "float"}, float: {"float"}, type(None): {"None"}}


def coerce_kv(m: MethodInfo, raw: Mapping[str, str], given: dict[str, Any]) -> None:
    """``--arg NAME=VALUE`` with the parameter's type known: a value that parses as JSON of a type
    the parameter does not take, where it takes ``str``, is the string as written (``--arg
    word=2024`` for ``word: str`` is ``"2024"``, for ``year: int`` the number 2024)."""
    types = {p.name: p.type for p in m.params}
    for key, text in raw.items():
        value = given.get(key)
        if key not in types or isinstance(value, str):
            continue
        try:
            members = _union_members(types[key])
        except RecursionError:  # a type nested beyond reason (the server describes it): leave the value as parsed
            continue
        if "str" not in members:
            continue
        accepts = _JSON_SCALARS.get(type(value))
        if accepts is None:  # a list or an object: fine if the type has a member that may be one
            if members - {"str", "int", "float", "bool", "None", "bytes"}:
                continue
        elif accepts & members:
            continue
        given[key] = text


def parse_json_args(text: str) -> dict[str, Any]:
    if text.startswith("@"):
        try:
            with open(text[1:], "rb") as f:
                data = f.read()
        except OSError as exc:
            raise CLIError(f"--json {text}: cannot read: {exc.strerror or exc}", Exit.USAGE) from None
    else:
        try:
            data = text.encode()
        except UnicodeEncodeError:
            raise CLIError("--json: not valid UTF-8", Exit.USAGE) from None
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise CLIError(f"--json: not valid JSON: {exc}", Exit.USAGE) from None
    except RecursionError:
        raise CLIError("--json: not valid JSON: nested too deeply", Exit.USAGE) from None
    if not isinstance(value, dict):
        raise CLIError("--json: give the arguments as one JSON object, e.g. '{\"a\": 1}'", Exit.USAGE)
    return value


def check_arguments(export: ExportDescription, m: MethodInfo, given: dict[str, Any]) -> None:
    """Check argument names against the description (exit 2 on any mismatch)."""
    where = f"{export.interface}.{m.name}"
    known = {p.name: p for p in m.params}
    value_params = [p for p in m.params if not p.stream]
    listing = ", ".join(_param_text(msgspec.to_builtins(p)) for p in m.params) or "no arguments"
    for key in given:
        p = known.get(key)
        if p is None:
            raise CLIError(f"{where} has no argument {key!r} (it takes: {listing})", Exit.USAGE)
        if p.stream:
            raise CLIError(f"argument {key!r} of {where} is a stream: its items are read from stdin, one JSON value per line", Exit.USAGE)
    missing = [p.name for p in value_params if p.required and p.name not in given]
    if missing:
        raise CLIError(f"{where}: missing required argument{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} (it takes: {listing})", Exit.USAGE)
    # The client does not know the defaults of optional arguments: arguments travel by position, so
    # an optional argument before one that is given must be given too.
    last = max((i for i, p in enumerate(value_params) if p.name in given), default=-1)
    gaps = [p.name for p in value_params[:last] if not p.required and p.name not in given]
    if gaps:
        raise CLIError(
            f"{where}: give {', '.join(map(repr, gaps))} too: an optional argument before one that is given "
            "must be given (its default is known only to the server)",
            Exit.USAGE,
        )


class _StdinLines:
    """JSON values from standard input, one per line, read by a daemon thread as they arrive."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, name="xrpc-stdin", daemon=True).start()

    def _put(self, item: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody wants the rest
            return False
        return True

    def _read(self) -> None:
        try:
            for line in sys.stdin.buffer:
                if not self._put(line):
                    return
        except (OSError, ValueError) as exc:
            self._put(exc)
            return
        self._put(None)

    async def items(self) -> AsyncIterator[Any]:
        number = 0
        while True:
            line = await self._queue.get()
            if line is None:
                return
            if isinstance(line, BaseException):
                raise StdinError(f"cannot read stdin: {line}")
            number += 1
            if not line.strip():
                continue
            try:
                yield msgspec.json.decode(line)
            except msgspec.DecodeError as exc:
                raise StdinError(f"stdin line {number}: not valid JSON: {exc}") from None


# --------------------------------------------------------------------------- exit codes for exceptions
def exit_code(exc: BaseException) -> Exit:
    if isinstance(exc, CLIError):
        return exc.code
    if isinstance(exc, StdinError):
        return Exit.USAGE
    if isinstance(exc, (errors.ObjectNotFound, errors.MethodNotFound)):
        return Exit.NOT_FOUND
    if isinstance(exc, (errors.ConnectionInterrupted, errors.ConnectionInvalidated, errors.ProtocolError)):
        return Exit.CONNECT
    return Exit.CALL_FAILED


# --------------------------------------------------------------------------- commands
async def cmd_inspect(args: argparse.Namespace) -> int:
    target: str = args.target
    records: list[dict[str, Any]]
    single = False
    if _is_url(target) or _is_service(target):
        async with open_target(target, args.timeout) as peer:
            exports = await fetch_exports(peer, target, args.timeout)
        records = [msgspec.to_builtins(e) for e in exports]
    elif ":" in target:
        records = [local_description(load_interface(target))]
        single = True
    else:
        module = _load_module_or_service(target)
        records = [local_description(i) for i in module_interfaces(module)]
    if args.json:
        _write(_json(records[0] if single else records, args.pretty))
        return Exit.OK
    if not records:
        print(f"{target}: no @xrpc.interface classes" if not _is_url(target) else f"{target}: no exports", file=sys.stderr)
        return Exit.OK
    _print_text("\n\n".join(render_export(r) for r in records))
    return Exit.OK


def _is_service(target: str) -> bool:
    """A bare name that a service description on the search path answers to."""
    if ":" in target:
        return False
    from ._services import ServiceNotFound, find_service

    try:
        find_service(target)
    except (ServiceNotFound, ValueError):
        return False
    except errors.Error:
        return True  # a malformed description: connecting reports it
    return True


def _load_module_or_service(target: str) -> types.ModuleType:
    _current_directory_importable()  # before the lookup, or a module beside the user is not found
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        found = None
    if found is None:
        from ._services import ServiceNotFound, find_service

        try:
            find_service(target)
        except ServiceNotFound as exc:
            # nothing to connect to was named: a usage error, like a module that cannot be imported
            raise CLIError(f"{target!r} is neither an importable module nor a service: {exc}", Exit.USAGE) from None
        except ValueError:
            pass
        raise CLIError(f"{target!r} is neither an importable module, a URL, nor a service name", Exit.USAGE)
    return _import_module(target)


def split_method(spec: str, object_option: str | None) -> tuple[str | None, str]:
    obj, dot, method = spec.rpartition(".")
    if object_option is not None:
        if dot:
            raise CLIError(f"give the object either as a prefix ({spec}) or with --object, not both", Exit.USAGE)
        return object_option, method
    if dot and not obj:
        raise CLIError(f"{spec!r}: write METHOD or OBJECT.METHOD", Exit.USAGE)
    if not method.isidentifier():
        raise CLIError(f"{method!r} is not a method name", Exit.USAGE)
    return (obj or None), method


async def cmd_call(args: argparse.Namespace) -> int:
    object_name, method_name = split_method(args.method, args.object)
    given: dict[str, Any] = parse_json_args(args.json) if args.json is not None else {}
    for key, value in parse_kv(args.arg or []).items():
        if key in given:
            raise CLIError(f"argument {key!r} is given both in --json and with --arg", Exit.USAGE)
        given[key] = value
    raw = {key.strip(): text for key, _, text in (item.partition("=") for item in args.arg or [])}  # as written
    async with open_target(args.target, args.timeout) as peer:
        exports = await fetch_exports(peer, args.target, args.timeout)
        export = choose_export(exports, object_name, args.target)
        m = choose_method(export, method_name)
        check_arguments(export, m, given)
        coerce_kv(m, raw, given)
        iface = dynamic_interface(export, methods=[m.name], arguments={m.name: list(given)})
        proxy = peer.proxy(iface, export.name, timeout=args.timeout)
        fn: Callable[..., Any] = getattr(proxy, m.name)
        kind = _KINDS[m.kind]
        stream_param = next((p for p in m.params if p.stream), None)
        kwargs = dict(given)
        if stream_param is not None:
            kwargs[stream_param.name] = _StdinLines().items()
        if kind.streams_out:
            stream = fn(**kwargs)
            try:
                async for item in stream:
                    _write(_json(item, args.pretty))
            finally:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
        else:
            result = await fn(**kwargs)
            if kind is not MethodKind.ONEWAY and m.reply != "None":
                _write(_json(result, args.pretty))
    return Exit.OK


@dataclasses.dataclass
class ServiceStatus:
    name: str
    status: str  # running | stopped | unresponsive | refused | invalid | socket
    description: str
    kind: str = ""
    target: str = ""
    restart: str = ""
    idle_exit: float | None = None
    socket: str = ""
    error: str = ""
    launcher: str = "builtin"

    @property
    def running(self) -> bool:
        return self.status in ("running", "refused")


def discover_services() -> list[tuple[str, str, BaseException | Any]]:
    """``(name, path, description or error)`` for every description on the search path.

    The first directory that describes a name wins, as for ``connect_service``; within a
    directory ``.toml`` comes before ``.json``.
    """
    from . import _services

    exts = (".toml", ".json") if getattr(_services, "_toml", None) is not None else (".json",)
    found: dict[str, tuple[str, str, Any]] = {}
    for d in _services.service_search_path():
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        stems = sorted({os.path.splitext(e)[0] for e in entries if os.path.splitext(e)[1] in exts})
        for stem in stems:
            if stem in found:
                continue
            for ext in exts:
                path = os.path.join(d, stem + ext)
                if os.path.isfile(path):
                    try:
                        value: Any = _services.load_description(path)
                    except errors.Error as exc:
                        value = exc
                    found[stem] = (stem, path, value)
                    break
    return [found[k] for k in sorted(found)]


async def _probe(name: str, timeout: float) -> tuple[str, str]:
    from ._services import UntrustedPath, check_dir, socket_path

    try:
        path = socket_path(name)
        fd = check_dir(path.parent, create=False)  # never talk to a socket another user could have put there
    except (ValueError, UntrustedPath) as exc:
        return "invalid", str(exc)
    if fd is not None:
        os.close(fd)
    if not path.exists():
        return "stopped", ""
    try:
        async with connect(f"unix://{path}", timeout=timeout):
            pass
    except errors.PeerRejected as exc:
        return "refused", str(exc)
    except TimeoutError:
        return "unresponsive", f"no handshake within {timeout:g}s"
    except (errors.Error, OSError) as exc:
        return "stopped", str(exc)
    return "running", ""


def _systemd_status(socket: str) -> tuple[str, str]:
    """A service that systemd starts is not connected to (that would start it): its socket either
    is there (``socket``: systemd listens, and starts the service on the first connection) or not."""
    try:
        mode = os.stat(socket).st_mode
    except OSError:
        return "stopped", "no socket: its socket unit is not started"
    return ("socket", "") if stat.S_ISSOCK(mode) else ("invalid", f"{socket} is not a socket")


async def cmd_list(args: argparse.Namespace) -> int:
    from ._services import socket_path

    rows: list[ServiceStatus] = []
    for name, path, value in discover_services():
        if isinstance(value, BaseException):
            rows.append(ServiceStatus(name, "invalid", path, error=str(value)))
            continue
        row = ServiceStatus(
            name,
            "",
            str(value.path),
            kind="module" if value.module is not None else "command",
            target=value.module if value.module is not None else " ".join(value.command or ()),
            restart=value.restart,
            idle_exit=value.idle_exit,
            socket=str(socket_path(name)),
            launcher=value.launcher,
        )
        if value.launcher == "systemd":
            where = ParsedURL(value.url) if value.url is not None else None
            if where is not None:
                row.socket = where.path or where.raw
            row.status, row.error = _systemd_status(row.socket) if where is None or where.scheme == "unix" else ("socket", "")
        rows.append(row)
    probe_timeout = args.timeout if args.timeout is not None else 2.0

    async def probe(row: ServiceStatus) -> None:
        row.status, row.error = await _probe(row.name, probe_timeout)

    async with anyio.create_task_group() as tg:
        for row in rows:
            if not row.status:
                tg.start_soon(probe, row)
    if args.json:
        out = [dict(dataclasses.asdict(r), running=r.running) for r in rows]
        _write(_json(out, args.pretty))
        return Exit.OK
    if not rows:
        from ._services import service_search_path

        dirs = "\n".join(f"  {d}" for d in service_search_path())
        print(f"no services described in the search path:\n{dirs}", file=sys.stderr)
        return Exit.OK
    _print_table(("NAME", "STATUS", "KIND", "TARGET", "DESCRIPTION"), [(r.name, r.status, r.kind, r.target, r.description) for r in rows])
    for r in rows:
        if r.status == "invalid":
            print(f"xrpc list: {r.name}: {r.error}", file=sys.stderr)
    return Exit.OK


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    console = _rich_console()
    if console is not None:
        table = importlib.import_module("rich.table").Table(*header, box=None, header_style="bold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = []
    for row in (header, *rows):
        cells = [str(c).ljust(w) for c, w in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    _write("\n".join(lines))


async def _instantiate(obj: Any) -> Any:
    if isinstance(obj, type) or inspect.isroutine(obj) or isinstance(obj, functools.partial):
        obj = obj()
    if inspect.isawaitable(obj):
        obj = await obj
    return obj


async def served_server(object_spec: str, iface_spec: str | None = None, name: str = "") -> Server:
    """The server ``xrpc serve OBJECT [--iface IFACE] [--name NAME]`` serves (``CLIError`` if it cannot
    be made); each worker of ``xrpc serve --workers N`` calls it to build its own."""
    obj = load_object(object_spec)
    iface = load_interface(iface_spec) if iface_spec else None
    if iface is None and not isinstance(obj, Server) and not (callable(obj) and not isinstance(obj, type)):
        raise CLIError("--iface pkg.mod:Interface is required (unless the object is an xrpc.Server or makes one)", Exit.USAGE)
    try:
        made = obj if isinstance(obj, Server) else await _instantiate(obj)
    except CLIError:
        raise
    except Exception as exc:
        raise CLIError(f"{object_spec}: creating the object failed: {type(exc).__qualname__}: {exc}", Exit.USAGE) from None
    if isinstance(made, Server):
        if iface is not None or name:
            raise CLIError(f"{object_spec} is an xrpc.Server: drop --iface and --name (it exports what it exports)", Exit.USAGE)
        return made
    if iface is None:
        raise CLIError(f"{object_spec} made a {type(made).__qualname__}, not an xrpc.Server: give --iface pkg.mod:Interface", Exit.USAGE)
    desc = describe(iface)
    missing = [m for m in desc.methods if not callable(getattr(made, m, None))]
    if missing:
        raise CLIError(f"{type(made).__qualname__} does not implement {desc.name}: missing {', '.join(missing)}", Exit.USAGE)
    server = Server()
    server.export(iface, made, name)
    return server


async def cmd_serve(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers > 1:
        return await _serve_workers(args)
    server = await served_server(args.object, args.iface, args.name or "")
    url = args.url
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with server.listen(url) as listener:
                _write(listener.url)
                names = ", ".join(n for n in server.export_names if n != INTROSPECT_NAME)
                print(f"xrpc serve: serving {names} on {listener.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
                async with service_lifecycle(f"serving {names} on {listener.url}"):
                    async for _ in signals:
                        break
        except ValueError as exc:
            raise CLIError(str(exc), Exit.USAGE) from None
        except errors.TransportError as exc:
            raise CLIError(f"cannot listen: {exc}", Exit.CONNECT) from None
    return Exit.OK


async def cmd_service_unit(args: argparse.Namespace) -> int:
    from ._services import ServiceDescriptionError, find_service, socket_path
    from ._units import Scope, UnitExists, install_units, next_steps, render_units, unit_dir, unit_notes, unit_search_dirs

    scope: Scope = "system" if args.system else "user"
    listen = args.listen
    try:
        desc = find_service(args.name)
        if listen is None and scope == "user" and desc.url is None and os.environ.get("XRPC_RUNTIME_DIR"):
            # clients of this user look in $XRPC_RUNTIME_DIR, not in the manager's runtime directory (%t)
            listen = f"unix://{socket_path(desc.name)}"
        units = render_units(desc, scope, listen=listen)
        notes = unit_notes(desc, scope, listen=listen)
    except ValueError as exc:  # a malformed name
        raise CLIError(str(exc), Exit.USAGE) from None
    except ServiceDescriptionError as exc:
        raise CLIError(str(exc), Exit.USAGE) from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    if not args.install:
        _write("\n".join(f"# --- {filename} ---\n{text}" for filename, text in units.items()))
        return Exit.OK
    directory = Path(args.directory) if args.directory else unit_dir(scope)
    try:
        done = install_units(units, directory, force=args.force, elsewhere=unit_search_dirs(scope))
    except UnitExists as exc:
        raise CLIError(str(exc), Exit.USAGE) from None
    except OSError as exc:
        raise CLIError(f"cannot write the units into {directory}: {exc.strerror or exc}", Exit.USAGE) from None
    for path, status in done:
        _write(f"{status} {path}")
    _write(f"next: {next_steps(desc.name, scope)}")
    return Exit.OK


async def _serve_workers(args: argparse.Namespace) -> int:
    # what can be checked without building anything is checked here; each worker builds the server
    obj = load_object(args.object)
    if args.iface:
        load_interface(args.iface)
    elif not isinstance(obj, Server) and not (callable(obj) and not isinstance(obj, type)):
        raise CLIError("--iface pkg.mod:Interface is required (unless the object is an xrpc.Server or makes one)", Exit.USAGE)
    factory = functools.partial(served_server, args.object, args.iface or None, args.name or "")
    pool = WorkerPool(target_of(factory, "xrpc serve"), args.workers, drain_timeout=args.drain_timeout, uvloop=args.loop == "uvloop")

    def announce(url: str) -> None:
        _write(url)
        names = ", ".join(pool.export_names)
        print(f"xrpc serve: serving {names} on {url} with {args.workers} workers (Ctrl-C to stop)", file=sys.stderr, flush=True)

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            await serve_until_signalled(pool, args.url, signals, announce)
        except ValueError as exc:
            raise CLIError(str(exc), Exit.USAGE) from None
        except errors.TransportError as exc:
            raise CLIError(f"cannot listen: {exc}", Exit.CONNECT) from None
        except WorkerError as exc:
            raise CLIError(str(exc), Exit.USAGE if not pool.export_names else Exit.CALL_FAILED) from None
    return Exit.OK


def _workers_count(text: str) -> int:
    if text == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes (or 'auto')") from None
    if value < 1:
        raise argparse.ArgumentTypeError("the number of workers must be >= 1")
    return value


def _drain(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError("the drain timeout must be >= 0 seconds")
    return value


# --------------------------------------------------------------------------- argument parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the timeout must be > 0 seconds")
    return value


MAIN_DESCRIPTION = """\
The xrpc command line: look at interfaces and servers, call methods with JSON
arguments, list named services, and serve an object from a Python module.
"""

MAIN_EPILOG = f"""\
examples:
  xrpc inspect myapp.api:Geometry          describe an interface from its module
  xrpc inspect unix:///run/myapp.sock      describe everything a server exports
  xrpc call unix:///run/myapp.sock distance --json '{{"a": {{"x": 0, "y": 0}}, "b": {{"x": 3, "y": 4}}}}'
  xrpc call com.example.indexer search --arg query=needle
  xrpc list
  xrpc serve myapp.impl:GeometryImpl --iface myapp.api:Geometry tcp://127.0.0.1:8000
  xrpc service unit com.example.indexer    print its systemd .socket and .service units

Run 'xrpc COMMAND --help' for the options of each command.

{EXIT_CODES_HELP}"""

INSPECT_DESCRIPTION = """\
Describe interfaces: methods and their kinds, parameters with types and defaults,
replies, declared errors and fingerprints.

TARGET is one of
  package.module:Interface   one @xrpc.interface class, imported from its module
  package.module             every @xrpc.interface class of the module
  unix:///path.sock, tcp://host:port, tls://host:port
                             every object a running server exports (asked through
                             its introspection service)
  SERVICE                    a named service (see 'xrpc list'); it is launched if needed

A bare name is taken for a service when a description of it is on the search path,
otherwise for a module.  The current directory is importable.
"""

INSPECT_EPILOG = f"""\
examples:
  xrpc inspect myapp.api:Geometry
  xrpc inspect myapp.api --json
  xrpc inspect tcp://127.0.0.1:8000
  xrpc inspect com.example.indexer

With --json, an Interface prints one object; a module or a server prints a list.
Optional parameters of a remote method show '= ...': only the server knows the default.

{EXIT_CODES_HELP}"""

CALL_DESCRIPTION = """\
Call one method of a running server or service, without its Python types: the method
and its parameters are read from the server's introspection service, argument names
are checked against them, and the server checks the values.

METHOD is NAME or OBJECT.NAME.  Without OBJECT (or --object), the server must export
exactly one object.

Arguments: --arg NAME=VALUE (repeatable; VALUE is parsed as JSON when it parses,
otherwise taken as a string: --arg n=3 is a number, --arg n='"3"' a string, and a
parameter typed str takes the text as written: --arg word=2024 is "2024") and/or
--json '{"NAME": VALUE, ...}' (or --json @file.json).  Optional arguments may be
left out, but one before an argument that is given must be given too.

Output: the reply as one line of JSON (nothing for one-way methods and methods that
return None); a server stream prints each item as one JSON line as it arrives.
A client-stream parameter is read from stdin: one JSON value per line, until end of
input.  Bytes print as base64 strings.  A parameter with allowed classes takes
["ClassName", value].
"""

CALL_EPILOG = f"""\
examples:
  xrpc call unix:///tmp/geo.sock distance --json '{{"a": {{"x": 0, "y": 0}}, "b": {{"x": 3, "y": 4}}}}'
  xrpc call tcp://127.0.0.1:8000 Geometry.lookup --arg name=origin
  xrpc call tcp://127.0.0.1:8000 walk --arg start='{{"x": 0, "y": 0}}' --arg steps=5
  printf '{{"x": 1, "y": 1}}\\n{{"x": 3, "y": 3}}\\n' | xrpc call tcp://127.0.0.1:8000 centroid
  xrpc call com.example.indexer search --arg query=needle --timeout 5

Errors print 'error: <ExceptionType>: <message>' on stderr.

{EXIT_CODES_HELP}"""

LIST_DESCRIPTION = """\
List the services described on the search path (the per-user directory
$XRPC_RUNTIME_DIR/xrpc/services, /etc/xrpc/services, /usr/share/xrpc/services, then
$XRPC_SERVICE_PATH) and whether each is running: its socket accepts a connection and
answers the handshake.  Nothing is launched.

STATUS is running, stopped, unresponsive (no handshake in time), refused (it turned
this client away), invalid (the description is malformed) or socket (a service that
systemd starts, launcher = "systemd", whose socket exists: it is not connected to,
since that would start it).
"""

LIST_EPILOG = f"""\
examples:
  xrpc list
  xrpc list --json
  XRPC_SERVICE_PATH=./services xrpc list

{EXIT_CODES_HELP}"""

SERVE_DESCRIPTION = """\
Serve a Python object on URL until SIGINT or SIGTERM (then exit with code 0).

OBJECT is package.module:name: an instance, or a class or zero-argument function to
call for one (async functions are awaited).  It is exported as --iface under --name
(default: the interface's name).  When OBJECT is an xrpc.Server, or a function
returning one, it is served as it is and --iface is not needed.

Once listening, the bound URL is printed on stdout on a line by itself (with
tcp://host:0 it names the real port), so scripts can wait for it.

With --workers N, this process binds URL and runs N worker processes that all
accept on it; each imports OBJECT and builds its own server.  A worker that dies
is replaced; SIGINT or SIGTERM stops accepting and lets each worker finish its
calls in flight (at most --drain-timeout seconds; a second signal cuts it short).
The URL is printed once every worker is ready.
"""

SERVE_EPILOG = f"""\
examples:
  xrpc serve myapp.impl:GeometryImpl --iface myapp.api:Geometry unix:///tmp/geo.sock
  xrpc serve myapp.impl:make_geometry --iface myapp.api:Geometry tcp://127.0.0.1:0
  xrpc serve myapp.service:make_server tcp://127.0.0.1:8000
  xrpc serve myapp.service:make_server unix:///tmp/geo.sock --workers 4
  systemd-socket-activate -l /tmp/geo.sock xrpc serve myapp.service:make_server systemd:

{EXIT_CODES_HELP}"""


SERVICE_DESCRIPTION = """\
Commands about named services (see 'xrpc list').

  unit   print or install the systemd .socket and .service units of a service
"""

SERVICE_EPILOG = f"""\
examples:
  xrpc service unit com.example.indexer
  xrpc service unit com.example.helper --system --install

{EXIT_CODES_HELP}"""

UNIT_DESCRIPTION = """\
Print the systemd units that run the service NAME under socket activation, made from
its description: NAME.socket listens where clients look for the service (Accept=no,
SocketMode/SocketUser/SocketGroup from socket_mode, socket_user, socket_group), and
NAME.service runs its command or module as Type=notify with its environment and
working directory, Restart=on-failure.  A --system unit adds sandboxing
(NoNewPrivileges, ProtectSystem=strict, ProtectHome, PrivateTmp, PrivateDevices,
RestrictAddressFamilies=AF_UNIX ...) and User= / DynamicUser= from user and
dynamic_user.

The socket is the description's unix:// url if it has one, else
%t/xrpc/sockets/NAME.sock: $XDG_RUNTIME_DIR/xrpc/sockets for a --user unit, where
clients of the built-in launcher look, and /run/xrpc/sockets for a --system one.

--install writes both files to ~/.config/systemd/user (--user, the default) or
/etc/systemd/system (--system), or to --directory; a file that exists with other
content is left alone unless --force.  Then it prints the systemctl commands to run.
"""

UNIT_EPILOG = f"""\
examples:
  xrpc service unit com.example.indexer
  xrpc service unit com.example.indexer --install
  xrpc service unit com.example.helper --system --install
  xrpc service unit com.example.helper --system --listen tcp://0.0.0.0:4433

{EXIT_CODES_HELP}"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=MAIN_DESCRIPTION, epilog=MAIN_EPILOG, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON instead of text")
        p.add_argument("--pretty", action="store_true", help="indent JSON output")
        p.add_argument("--timeout", type=_timeout, metavar="SECONDS", help="bound connecting and each call")
        p.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)

    p = sub.add_parser("inspect", help="describe an interface, a module, a server or a service", description=INSPECT_DESCRIPTION, epilog=INSPECT_EPILOG, formatter_class=_Formatter)
    p.add_argument("target", metavar="TARGET", help="package.module[:Interface], a URL, or a service name")
    common(p)
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("call", help="call a method with JSON arguments", description=CALL_DESCRIPTION, epilog=CALL_EPILOG, formatter_class=_Formatter)
    p.add_argument("target", metavar="URL|SERVICE", help="unix://..., tcp://host:port, tls://host:port, or a service name")
    p.add_argument("method", metavar="[OBJECT.]METHOD", help="the method, optionally prefixed by the export's name")
    p.add_argument("-a", "--arg", action="append", metavar="NAME=VALUE", help="one argument (repeatable); VALUE is JSON or a string")
    p.add_argument("--json", metavar="OBJECT", help="all arguments as one JSON object (or @file)")
    p.add_argument("-o", "--object", metavar="NAME", help="the export to call (instead of an OBJECT. prefix)")
    common(p, json_flag=False)
    p.set_defaults(run=cmd_call)

    p = sub.add_parser("list", help="list named services and whether they run", description=LIST_DESCRIPTION, epilog=LIST_EPILOG, formatter_class=_Formatter)
    common(p)
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("serve", help="serve a Python object on a URL", description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG, formatter_class=_Formatter)
    p.add_argument("object", metavar="OBJECT", help="package.module:name (instance, class, factory, or xrpc.Server)")
    p.add_argument(
        "url",
        metavar="URL",
        help="unix:///path.sock or tcp://host:port (port 0: any free port); systemd: or systemd:NAME for the sockets "
        "passed by socket activation",
    )
    p.add_argument("--iface", metavar="pkg.mod:Interface", help="the @xrpc.interface to export the object as")
    p.add_argument("--name", metavar="NAME", help="the export's name (default: the interface's name)")
    p.add_argument(
        "--workers",
        type=_workers_count,
        metavar="N",
        help="serve from N worker processes sharing the socket ('auto': one per CPU); default: this process alone",
    )
    p.add_argument(
        "--drain-timeout",
        type=_drain,
        default=10.0,
        metavar="SECONDS",
        help="with --workers: how long a stopping worker lets its calls in flight finish (default: 10)",
    )
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop: asyncio's own, or uvloop's (faster; needs pip install 'xrpc[uvloop]')",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("service", help="commands about named services (unit)", description=SERVICE_DESCRIPTION, epilog=SERVICE_EPILOG, formatter_class=_Formatter)
    p.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    p.set_defaults(help_parser=p)
    service = p.add_subparsers(dest="service_command", metavar="COMMAND", title="commands")
    p = service.add_parser("unit", help="print or install the systemd units of a service", description=UNIT_DESCRIPTION, epilog=UNIT_EPILOG, formatter_class=_Formatter)
    p.add_argument("name", metavar="NAME", help="the service name, e.g. com.example.indexer")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--user", action="store_true", help="units for the user's service manager (the default)")
    scope.add_argument("--system", action="store_true", help="units for the system manager, with sandboxing")
    p.add_argument("--install", action="store_true", help="write the units instead of printing them")
    p.add_argument("--force", action="store_true", help="with --install: replace unit files that differ")
    p.add_argument("--directory", metavar="DIR", help="with --install: write there instead of the scope's unit directory")
    p.add_argument("--listen", metavar="URL", help="listen there instead (unix:///path.sock, or tcp://IP:PORT for remote clients)")
    p.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    p.set_defaults(run=cmd_service_unit)
    return parser


def _version() -> str:
    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``xrpc`` command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        getattr(args, "help_parser", parser).print_help(sys.stderr)
        return Exit.USAGE
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(name)s: %(levelname)s %(message)s")
    try:
        backend, options = loop_backend(getattr(args, "loop", "asyncio"))
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return Exit.USAGE
    try:
        code = anyio.run(args.run, args, backend=backend, backend_options=options)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (e.g. '| head -1'): not an error of ours
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.OK
    except Exception as exc:
        code = exit_code(exc)
        if not isinstance(exc, (CLIError, errors.Error, TimeoutError, DeclaredError)):
            traceback.print_exc()  # a bug: show where
        print(_error_line(exc), file=sys.stderr, flush=True)
        return int(code)
    return int(code)
