"""Exports and the table of objects passed by reference on one connection (no I/O).

An ``Export`` is an object served under a name, with its interface description, bound methods and
the requirement each method's callers must satisfy.  The ``ObjectTable`` is what the codec talks to
while it encodes and decodes values (it implements the ``WireContext`` the codec expects): objects
passed by reference are exported under ``#n`` with a count of the tokens sent and not yet released,
references coming home resolve to the object, references to the peer's objects become proxies, and
descriptors go to the connection's ``FdTable``.  While one frame is encoded, the references it
hands out are journalled, so that they are taken back if the frame never leaves.  Results of the
peer's calls that return objects are kept as ``IncomingPromise`` for calls pipelined on them, and
for calls that pass them as arguments (``AwaitedArguments``).
"""

from __future__ import annotations

import collections
import dis
import inspect
import os
from typing import Any, Callable, Iterable, Iterator

import anyio

from ._errors import LimitExceeded, ValidationError
from ._fds import FdTable
from ._interface import InterfaceDescription, MethodDescription, MethodKind, describe
from ._protocol import ExportInfo, Ref
from ._proxy import Caller, PromiseBase, make_proxy, proxy_target
from ._requirements import requirement as parse_requirement

__all__ = ("AwaitedArguments", "Export", "IncomingPromise", "ObjectTable", "OneShotExport", "exports_from", "make_export", "never_suspends")


class Export:
    """An object exported under a name, with its interface description and bound methods."""

    __slots__ = ("desc", "obj", "name", "methods", "is_async", "guards", "inline", "plain", "_info")

    def __init__(self, desc: InterfaceDescription, obj: Any, name: str, requirement: Any = None) -> None:
        self.desc = desc
        self.obj = obj
        self.name = name
        self._info: ExportInfo | None = None
        self.methods: dict[str, Callable[..., Any]] = {}
        self.is_async: dict[str, bool] = {}
        self.guards: dict[str, Any] = {}  # method name -> the Requirement a caller must satisfy
        self.inline: set[str] = set()  # methods that can run on the reader: plain functions, or coroutines that never await
        # method name -> (description, function, is_async) for the methods a call reaches without
        # any check but the connection's: unary, run inline, no requirement, no objects in or out
        self.plain: dict[str, tuple[MethodDescription, Callable[..., Any], bool]] = {}
        if isinstance(requirement, str):
            requirement = parse_requirement(requirement)
        missing = []
        for mname in desc.methods:
            fn = getattr(obj, mname, None)
            if fn is None or not callable(fn):
                missing.append(mname)
                continue
            self.methods[mname] = fn
            self.is_async[mname] = inspect.iscoroutinefunction(fn)
            if not self.is_async[mname] or never_suspends(fn):
                self.inline.add(mname)
            parts = [r for r in (requirement, desc.methods[mname].requirement, getattr(fn, "__xrpc_requires__", None)) if r is not None]
            if parts:
                guard = parts[0]
                for r in parts[1:]:
                    guard = guard & r
                self.guards[mname] = guard
            m = desc.methods[mname]
            if (
                mname in self.inline and not parts and m.kind is MethodKind.UNARY and m.flags == 0
                and not m.kwonly and not m.ref_args and not m.reply_refs
            ):
                self.plain[mname] = (m, fn, self.is_async[mname])
        if missing:
            raise TypeError(f"{type(obj).__qualname__} does not implement {desc.name}: missing {', '.join(missing)}")

    def info(self) -> ExportInfo:
        """What a HELLO/WELCOME says of this export (built once: every connection announces it)."""
        info = self._info
        if info is None:
            info = self._info = ExportInfo(self.name, self.desc.name, self.desc.fingerprint, {m.name: m.signature for m in self.desc.methods.values()})
        return info


class OneShotExport(Export):
    """An export whose one method is already running: ``fn()`` finishes it."""

    def __init__(self, base: Export, name: str, fn: Callable[[], Any]) -> None:  # noqa: D107
        self.desc = base.desc
        self.obj = base.obj
        self.name = base.name
        self._info = None
        self.methods = {name: fn}
        self.is_async = {name: True}
        self.guards = {}
        self.inline = set()
        self.plain = {}


_SUSPENDING_OPS = frozenset({"YIELD_VALUE", "SEND", "GET_AWAITABLE", "BEFORE_ASYNC_WITH", "GET_AITER", "GET_ANEXT"})


def never_suspends(fn: Callable[..., Any]) -> bool:
    """Is ``fn`` an ``async def`` whose body has no ``await``, ``async with`` or ``async for``?

    Such a coroutine finishes in one step, so it can run on the reader without a task of its own.
    Only the code of an ``async def`` tells: a plain function marked as a coroutine function (a
    proxy's method) returns a coroutine that this code says nothing about.
    """
    code = getattr(inspect.unwrap(getattr(fn, "__func__", fn)), "__code__", None)
    if code is None or not code.co_flags & inspect.CO_COROUTINE:
        return False
    try:
        return not any(ins.opname in _SUSPENDING_OPS for ins in dis.get_instructions(code))
    except (TypeError, ValueError):
        return False


def make_export(iface: Any, obj: Any, name: str = "", requirement: Any = None) -> Export:
    if name[:1] in ("#", "^"):  # those name references and pipelined results on the wire
        raise ValueError(f"an export name may not start with {name[0]!r}: {name!r}")
    desc = describe(iface)
    return Export(desc, obj, name or desc.name, requirement)


def exports_from(specs: Iterable[Any]) -> dict[str, Export]:
    """Exports from ``Export`` objects or ``(Iface, obj)`` / ``(Iface, obj, name)`` tuples."""
    out: dict[str, Export] = {}
    for spec in specs:
        if isinstance(spec, Export):
            out[spec.name] = spec
            continue
        if len(spec) == 2:
            e = make_export(spec[0], spec[1])
        elif len(spec) == 3:
            e = make_export(spec[0], spec[1], spec[2])
        else:
            raise TypeError("exports= takes (Iface, obj) or (Iface, obj, name) tuples")
        out[e.name] = e
    return out


class IncomingPromise:
    """The result of an incoming call that returns an object, for calls pipelined on it (``^id``)."""

    __slots__ = ("desc", "obj", "error", "done", "event")

    def __init__(self, desc: InterfaceDescription) -> None:
        self.desc = desc
        self.obj: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.event: anyio.Event | None = None

    def settle(self, obj: Any = None, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.obj = obj
        self.error = error
        self.done = True
        if self.event is not None:
            self.event.set()

    async def wait(self) -> None:
        if not self.done:
            if self.event is None:
                self.event = anyio.Event()
            await self.event.wait()


class AwaitedArguments:
    """The arguments of one of the peer's calls that stand for results of its earlier calls not
    known yet (promises passed as arguments).

    They were decoded once, as the frame was read (in frame order, so references in them are
    adopted before any later RELEASE); once ``wait()`` returns, ``decode()`` decodes the kept
    ``payload`` again, handing out what each reference and descriptor of the first decoding gave,
    in the same order, with every awaited result in its place.
    """

    __slots__ = ("table", "values", "promises", "payload", "failure")

    def __init__(self, table: ObjectTable) -> None:
        self.table = table
        self.values: list[Any] = []  # what each reference / descriptor decoded gave, in order (an awaited result: its IncomingPromise)
        self.promises: list[IncomingPromise] = []
        self.payload: Any = None
        self.failure = ""  # why an awaited result cannot be passed, once ``decode`` found it

    async def wait(self) -> None:
        for p in self.promises:
            await p.wait()

    def decode(self, m: MethodDescription) -> tuple[Any, ...]:
        """The arguments with the results in place; ``ValidationError`` (naming the argument) if one
        of them failed, ``failure`` then saying why."""
        return m.decode_args(self.payload, _Replay(self, iter(self.values)))


class _Replay:
    """The wire context of an ``AwaitedArguments``' second decoding."""

    __slots__ = ("awaited", "values")

    def __init__(self, awaited: AwaitedArguments, values: Iterator[Any]) -> None:
        self.awaited = awaited
        self.values = values

    def _next(self) -> Any:
        try:
            return next(self.values)
        except StopIteration:
            raise ValidationError("the arguments did not decode the same way twice") from None

    def ref_out(self, desc: InterfaceDescription, value: Any) -> Ref:
        raise ValueError("nothing is sent while arguments are decoded")

    def ref_in(self, desc: InterfaceDescription, token: Ref) -> Any:
        value = self._next()
        if type(value) is IncomingPromise:
            obj = self.awaited.table.promised_object(value, token.oid)
            if obj is None:
                self.awaited.failure = f"the call {token.oid} it depends on failed ({value.error!r})"
                raise ValidationError(self.awaited.failure)
            return obj
        return value

    def fd_out(self, fd: int) -> int:
        raise ValueError("nothing is sent while arguments are decoded")

    def fd_in(self, seq: int) -> int:
        # the first decoding's descriptor objects close theirs when they go: this one is a duplicate
        return os.dup(self._next())


REF_COST = 1024  # bytes of the memory budget a proxy made for a call's arguments is charged (it takes ~700)
_SETTLED_KEPT = 256  # results of the peer's last calls kept for pipelined calls still on their way


class ObjectTable:
    """Objects passed by reference on one connection, both ways, and the codec's wire context.

    ``caller`` is what proxies to the peer's objects call through; ``release(oid)`` is called (from
    any thread) when such a proxy is garbage-collected, to tell the peer.
    """

    __slots__ = (
        "caller", "max_objects", "fds", "_release", "_refs", "_ref_ids", "_next_oid", "_journal", "_call_args", "_awaited",
        "_promises", "_promise_of", "_settled_ids", "remote_refs", "_allowance", "_made",
    )

    def __init__(self, caller: Caller, max_objects: int, fds: FdTable, release: Callable[[str], None]) -> None:
        self.caller = caller
        self.max_objects = max_objects
        self.fds = fds
        self._release = release
        self._refs: dict[str, list[Any]] = {}  # oid -> [Export, tokens sent and not yet released]
        self._ref_ids: dict[tuple[int, str], str] = {}  # (id(obj), interface) -> oid
        self._next_oid = 0
        self._journal: list[str] | None = None  # references handed out while encoding one frame
        self._call_args = False  # that frame is a CALL: a promise may stand for an argument
        self._awaited: AwaitedArguments | None = None  # while the arguments of one of the peer's calls are decoded
        self._promises: dict[int, IncomingPromise] = {}  # results of the peer's calls, for pipelined calls
        self._promise_of: dict[str, list[int]] = {}  # oid of a returned object -> the calls that returned it
        self._settled_ids: collections.deque[int] | None = None  # made once a promise settles
        self.remote_refs = 0  # live proxies to objects the peer passed us by reference
        self._allowance = -1  # proxies the arguments being decoded may still make (-1: no limit)
        self._made = 0  # proxies they made

    def __len__(self) -> int:
        """How many objects this side exports to the peer by reference."""
        return len(self._refs)

    # ---------------------------------------------------------------- the codec's wire context
    def ref_out(self, desc: InterfaceDescription, value: Any) -> Ref:
        """Export ``value`` (an implementation of ``desc``) for the peer; the token to send.  A
        promise of a call on this connection, among a call's arguments, travels as ``^id``."""
        if isinstance(value, PromiseBase):
            return self._promise_out(desc, value)
        target = proxy_target(value)
        if target is not None:
            # Only an object the peer passed us by reference ("#n") goes home as itself; a proxy to
            # one of the peer's named exports is forwarded like a proxy from another connection,
            # because the peer resolves a home reference only in the table of references it sent.
            caller, obj, its = target
            if caller is self.caller and obj[:1] == "#":
                if its.name != desc.name:
                    raise ValueError(f"a proxy of {its.name} is not a {desc.name}")
                return Ref(True, obj, desc.name)
            if not set(desc.methods) <= set(its.methods):
                raise ValueError(f"a proxy of {its.name} is not a {desc.name}")
        else:
            missing = [m for m in desc.methods if not callable(getattr(value, m, None))]
            if missing:
                raise ValueError(f"{type(value).__qualname__} does not implement {desc.name} (missing {', '.join(missing)})")
        key = (id(value), desc.name)
        oid = self._ref_ids.get(key)
        entry = self._refs.get(oid) if oid is not None else None
        if entry is None or entry[0].obj is not value:
            if len(self._refs) >= self.max_objects:
                raise LimitExceeded(f"more than {self.max_objects} objects exported on this connection")
            self._next_oid += 1
            oid = f"#{self._next_oid}"
            entry = [Export(desc, value, oid), 0]
            self._refs[oid] = entry
            self._ref_ids[key] = oid
        entry[1] += 1
        if self._journal is not None:
            self._journal.append(entry[0].name)
        return Ref(False, entry[0].name, desc.name)

    def _promise_out(self, desc: InterfaceDescription, promise: PromiseBase) -> Ref:
        if not self._call_args:
            raise ValueError("a promise can be passed only as an argument of a call; await it and pass its result")
        journal, call_args = self._journal, self._call_args
        try:
            # (a service connection's promise not sent yet is sent now, ahead of this call)
            oid, its, value = promise.__xrpc_argument__(self.caller)
        finally:
            self._journal, self._call_args = journal, call_args
        if its.name != desc.name:
            raise ValueError(f"a promise of a {its.name} is not a {desc.name}")
        if not oid:
            return self.ref_out(desc, value)  # its result is here: passed as any object is
        return Ref(True, oid, desc.name)

    def ref_in(self, desc: InterfaceDescription, token: Ref) -> Any:
        """A received reference: a proxy to the peer's object, or our own object coming home (or,
        among the arguments of a call, the result of an earlier call of the peer: ``^id``)."""
        if token.interface != desc.name:
            raise ValidationError(f"a reference to a {token.interface} arrived where a {desc.name} is declared")
        if token.home:
            # Only an object this side passed by reference on this connection, and still holds for
            # the peer, may come home: never a named export (its requirement would be bypassed) and
            # never an object of another connection.
            entry = self._refs.get(token.oid)
            if entry is None or entry[0].desc.name != desc.name:
                if token.oid[:1] == "^":
                    return self._promised(desc, token.oid)
                raise ValidationError(f"a reference to {token.oid!r}, which this side did not pass to this peer as a {desc.name}")
            value = entry[0].obj
        else:
            if self._allowance >= 0:
                # a proxy costs far more than its token: the arguments of a call may make only as
                # many as the memory budget has room for
                if self._made >= self._allowance:
                    raise LimitExceeded(
                        f"more than {self._made} references in the arguments of one call do not fit in the memory budget"
                        f" (each is charged {REF_COST} bytes)"
                    )
                self._made += 1
            value = make_proxy(self.caller, desc, token.oid, None, release=self._proxy_gone)
            self.remote_refs += 1
        if self._awaited is not None:
            self._awaited.values.append(value)
        return value

    def _promised(self, desc: InterfaceDescription, oid: str) -> Any:
        """``^id`` among the arguments of a call: the result of the peer's earlier call ``id``, or
        its promise while it is not known (the call then waits for it)."""
        awaited = self._awaited
        promise = self.promise_for(oid)
        if len(oid) > 24:
            oid = oid[:20] + "..."  # (what the peer sent is not echoed at any length)
        if awaited is None:
            raise ValidationError(f"a reference to the result of call {oid!r} arrived outside the arguments of a call")
        if promise is None:
            raise ValidationError(
                f"{oid!r} names no result this side keeps of a call of this peer (a call refused before it ran,"
                " one that returns no object, or whose result was released)"
            )
        if promise.desc.name != desc.name:
            raise ValidationError(f"{oid!r} is the result of a call returning a {promise.desc.name}, not a {desc.name}")
        if promise.done:
            obj = self.promised_object(promise, oid)
            if obj is not None:
                awaited.values.append(obj)
                return obj
        awaited.values.append(promise)
        awaited.promises.append(promise)
        return promise

    def promised_object(self, promise: IncomingPromise, oid: str) -> Any:
        """The object a settled promise stands for as an argument (it passes the checks of a
        pipelined call's target), or None: its call failed (``promise.error``)."""
        if promise.error is not None:
            return None
        export = self.resolved_export(promise, oid)
        return export.obj if export is not None else None

    def decode_arguments(
        self, m: MethodDescription, payload: Any, room: int
    ) -> tuple[tuple[Any, ...], AwaitedArguments | None, int]:
        """Decode the arguments of the peer's call of ``m`` (which has references among them); the
        results of its earlier calls they wait for, if any; and the bytes its proxies are charged
        (``REF_COST`` each).  ``LimitExceeded`` once they would take more than ``room`` bytes."""
        awaited = self._awaited = AwaitedArguments(self)
        self._allowance, self._made = max(0, room) // REF_COST, 0
        try:
            args = m.decode_args(payload, self)
        finally:
            self._awaited = None
            self._allowance = -1
        return args, (awaited if awaited.promises else None), self._made * REF_COST

    def _proxy_gone(self, oid: str) -> None:
        self.remote_refs -= 1
        self._release(oid)

    def fd_out(self, fd: int) -> int:
        return self.fds.fd_out(fd)

    def fd_in(self, seq: int) -> int:
        fd = self.fds.fd_in(seq)
        if self._awaited is not None:
            self._awaited.values.append(fd)
        return fd

    # ---------------------------------------------------------------- the table
    def lookup(self, oid: str) -> Export | None:
        """The export a ``#n`` name stands for, while the peer holds it."""
        entry = self._refs.get(oid)
        return entry[0] if entry is not None else None

    def drop(self, oid: str, count: int) -> None:
        """The peer released ``count`` tokens of ``oid`` (RELEASE), or a frame carrying them never left."""
        entry = self._refs.get(oid)
        if entry is None:
            return
        entry[1] -= count
        if entry[1] <= 0:
            del self._refs[oid]
            export = entry[0]
            key = (id(export.obj), export.desc.name)
            if self._ref_ids.get(key) == oid:
                del self._ref_ids[key]
            # no pipelined call can name the call that returned it any more: frames are ordered
            for call_id in self._promise_of.pop(oid, ()):
                self._promises.pop(call_id, None)

    def begin(self, call: bool = False) -> None:
        """Start journalling the references handed out (one frame is being encoded; ``call``: the
        arguments of a CALL, where promises may stand for objects)."""
        self._journal = []
        self._call_args = call

    def commit(self) -> list[str] | None:
        """The frame left: stop journalling; the references it handed out."""
        journal, self._journal = self._journal, None
        self._call_args = False
        return journal

    def rollback(self) -> None:
        """The frame never left: take back the references handed out since ``begin``."""
        journal, self._journal = self._journal, None
        self._call_args = False
        for oid in journal or ():
            self.drop(oid, 1)

    def clear(self) -> None:
        self._refs.clear()
        self._ref_ids.clear()

    # ---------------------------------------------------------------- results for pipelined calls
    def promise(self, call_id: int, desc: InterfaceDescription) -> IncomingPromise:
        """Keep the result of the peer's call ``call_id`` for calls pipelined on it."""
        p = self._promises[call_id] = IncomingPromise(desc)
        return p

    def promise_for(self, target: str) -> IncomingPromise | None:
        """The result a pipelined call's target (``^id``) names, if it is still kept."""
        try:
            return self._promises.get(int(target[1:]))
        except ValueError:
            return None

    def returned(self, oid: str, call_id: int) -> None:
        """Call ``call_id`` returned our object ``oid``: the result is kept while the peer holds it
        (every call that returned it: the object may be returned many times before it is released)."""
        calls = self._promise_of.setdefault(oid, [])
        if len(calls) >= 2 * _SETTLED_KEPT:
            calls[:] = [c for c in calls if c in self._promises]  # (those evicted since)
        calls.append(call_id)

    def settled(self, call_id: int) -> None:
        """Keep the results of the last few calls for pipelined calls still on their way."""
        ids = self._settled_ids
        if ids is None:
            ids = self._settled_ids = collections.deque()
        ids.append(call_id)
        while len(ids) > _SETTLED_KEPT:
            self._promises.pop(ids.popleft(), None)

    def resolved_export(self, promise: IncomingPromise, name: str) -> Export | None:
        """The object a promise resolved to, as an export: the one it was passed by reference as
        when it still is (its guards, and their cached verdicts, are reused), else a new one."""
        obj = promise.obj
        oid = self._ref_ids.get((id(obj), promise.desc.name))
        entry = self._refs.get(oid) if oid is not None else None
        if entry is not None and entry[0].obj is obj:
            export: Export = entry[0]
            return export
        try:
            return Export(promise.desc, obj, name)
        except TypeError as exc:
            promise.error = exc
            return None
