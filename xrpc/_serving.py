"""The serving side of a connection: exports, the one authorization checkpoint, dispatch of the
peer's calls (inline on the reader, or in a task of their own, in the order they arrived), and the
answers.

Every CALL goes through ``Serving.on_call``: find the target (an export name, a reference ``#n``,
or the result of an earlier call ``^id``), find the method, pass ``authorize`` (the connection's
requirement and the method's guards; a pipelined call passes it again once its target is known),
check the limits, decode the arguments, then serve.  A plain function (or a coroutine that never
awaits) without middleware runs inline, on the reader; everything else runs in a task, holding its
arguments against the memory budget until it ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import inspect
import logging
import math
import types
from typing import Any, Awaitable, Callable

import anyio
import anyio.abc
import msgspec

from ._calls import Side, StreamHandler
from ._codes import error_frame_args, refusal
from ._errors import LimitExceeded, LocalProtocolError, ObjectNotFound, ValidationError
from ._interface import InterfaceDescription, MethodDescription, MethodKind, describe
from ._middleware import CallContext, metadata, run_chain
from ._limits import Limits
from ._objects import AwaitedArguments, Export, IncomingPromise, OneShotExport
from ._peer import Peer
from ._protocol import Call, CallFlags, CallRecord, ErrorCode, ExportInfo, Ref
from ._streams import Credit, InStream, StreamQueue, resume

__all__ = ("InCall", "Serving")

log = logging.getLogger("xrpc")

_GUARD_CACHE_SIZE = 256  # requirement verdicts cached per connection
# Arguments of at most this many bytes are not drawn from the budget while their call runs (the
# frame is let go once they are decoded): max_calls_in_flight of them hold at most 4 MiB.
_SMALL_ARGS = 1024
_NO_PAYLOAD = msgspec.Raw(b"")
_NO_KW: dict[str, Any] = {}  # (never written to)
# results that are never awaitable, so that the common ones skip inspect.isawaitable's ABC check
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})
_force_setattr = msgspec.structs.force_setattr
_size_encoder = msgspec.msgpack.Encoder()


class InCall(StreamHandler):
    """Callee-side state of one incoming call served in a task.

    Under anyio task groups a call with a deadline runs in ``scope``; one without has no scope of
    its own until it suspends: from then on the task that runs it runs nothing else, and that
    task's scope becomes ``scope`` (see ``Serving._run_starts``); cancelled before it starts, it
    starts in a cancelled scope.  On the asyncio fast path it is the native ``task``, cancelled
    directly, with ``deadline`` enforced by a scope inside the task.
    """

    __slots__ = ("scope", "task", "deadline", "promise", "held", "oneway")

    def __init__(self, scope: anyio.CancelScope | None) -> None:
        super().__init__(None, None)
        self.held = 0  # bytes of arguments drawn from the connection's budget while the call runs
        self.promise: IncomingPromise | None = None
        self.scope = scope
        self.task: asyncio.Task[None] | None = None
        self.deadline = math.inf
        self.oneway = False  # nobody waits for a reply (it is still run once the peer has gone)

    def on_cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
        elif self.task is not None:
            self.task.cancel()
        else:  # (anyio task groups) not started yet: it starts cancelled
            self.scope = anyio.CancelScope()
            self.scope.cancel()


def _run_inline(fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    """Call ``fn``, an ``async def`` that never awaits, and run its coroutine to its end now.

    (Only such a function's coroutine is run here, outside any task: a plain function that returns
    a coroutine is called directly, and what it returns is awaited in a task of its own.)"""
    result = fn(*args, **kw)
    if type(result) is types.CoroutineType:
        cvar = _sniffio_cvar
        token = cvar.set("asyncio") if cvar is not None else None
        try:
            yielded = result.send(None)
        except StopIteration as stop:
            return stop.value
        finally:
            if cvar is not None and token is not None:
                cvar.reset(token)
        # it suspended after all (a wrapper hid its awaits): a task finishes what it started
        return resume(result, yielded)  # pragma: no cover
    return result


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    return fn(*args, **kw)


_sniffio_cvar: contextvars.ContextVar[str | None] | None
try:  # anyio finds its backend through sniffio; on the reader there is no current task to ask
    from sniffio import current_async_library_cvar as _sniffio_cvar
except ImportError:  # pragma: no cover
    _sniffio_cvar = None


@types.coroutine
def _finish_in(ctx: contextvars.Context, step: Any, yielded: Any) -> Any:
    """Finish awaiting ``step`` (a coroutine advanced once, which yielded ``yielded``) with each
    of its steps run in ``ctx``: what ``await step`` does after its first suspension."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:
            try:
                yielded = ctx.run(step.throw, exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = ctx.run(step.send, sent)
            except StopIteration as stop:
                return stop.value


def _refusal(exc: BaseException) -> str:
    """What the log says about a refused value: where, never the value (it may be a secret)."""
    arg = getattr(exc, "argument", "")
    return f"argument {arg!r} does not fit its declared type" if arg else "a value does not fit its declared type"


def _explain(requirement: Any, peer: Peer) -> str:
    try:
        return str(requirement.explain(peer))
    except Exception as exc:  # a custom requirement that fails to explain itself still refuses
        return f"{requirement} failed ({exc!r})"


def _encoded_size(value: Any) -> int:
    """About how many bytes ``value`` takes encoded (0 if it cannot be told without exporting
    anything); used only while the peer is behind, to charge a held answer to the budget."""
    try:
        return len(_size_encoder.encode(value))
    except Exception:
        return 0


class Serving(Side):
    """The calls one connection serves.

    ``room_for(size)`` waits while the peer is behind, holding an answer of about ``size`` bytes
    (False: the connection is over); ``answered(start)`` tells the connection a task sent an
    answer (the core's ``emitted`` count before it), so that its reading keeps pace.
    """

    __slots__ = (
        "limits", "exports", "shared", "requirement", "room_for", "answered", "serving", "streams", "tasks", "_guard_cache",
        "_starts", "_starting", "plain",
    )

    def __init__(
        self,
        *parts: Any,
        limits: Limits,
        exports: dict[str, Export],
        shared: dict[str, Export],
        requirement: Any,
        room_for: Callable[[int], Awaitable[bool]],
        answered: Callable[[int], None],
    ) -> None:
        super().__init__(*parts)
        self.limits = limits
        self.exports = exports
        self.shared = shared
        self.requirement = requirement
        self.room_for = room_for
        self.answered = answered
        self.serving = 0  # calls being served
        self.streams = 0  # stream calls being served
        self.tasks: set[asyncio.Task[None]] = set()  # calls served in asyncio tasks
        self._guard_cache: dict[int, tuple[Any, bool]] = {}  # id(requirement) -> (requirement, verdict)
        # calls waiting to start, in the order they arrived (non-asyncio backends: ``_run_starts``;
        # made on the first call, as an empty deque holds a block of 0.5 KiB)
        self._starts: collections.deque[tuple[Any, InCall]] | None = None
        self._starting = False  # a task is starting them
        # calls of ``Export.plain`` methods may take the short path in ``on_call``: set once the
        # connection runs on an asyncio loop, for a side without middleware or requirement
        self.plain = False

    # ---------------------------------------------------------------- exports
    def all_exports(self) -> list[Export]:
        merged = dict(self.shared)
        merged.update(self.exports)
        return list(merged.values())

    def lookup(self, name: str) -> Export | None:
        e = self.exports.get(name)
        if e is None:
            e = self.shared.get(name)
            if e is None and name[:1] == "#":
                e = self.objects.lookup(name)
        return e

    def not_found(self, name: str) -> str:
        """The message refusing a call to ``name``: for a name, the names this peer may call (what
        the handshake announced to it already)."""
        if name[:1] in ("#", "^"):
            return f"no object is exported as {name!r}"
        names = sorted(info.name for info in self.announced())
        shown = ", ".join(repr(n) for n in names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        return f"no object is exported as {name!r} (exported: {shown or 'nothing'})"

    def announced(self) -> list[ExportInfo]:
        """What HELLO/WELCOME announces: the exports this peer may call, each with only the methods
        it may call.  The fingerprint stays the whole interface's, so a peer with the same
        interface still skips the compatibility check; an export none of whose methods the peer
        may call is left out."""
        out = []
        for e in self.all_exports():
            info = e.info()
            if e.guards or self.requirement is not None:
                allowed = [name for name, m in e.desc.methods.items() if self.authorize(e, m, quiet=True)]
                if not allowed:
                    continue
                if len(allowed) != len(info.methods):
                    info = ExportInfo(info.name, info.interface, info.fingerprint, {n: info.methods[n] for n in allowed})
            out.append(info)
        return out

    # ---------------------------------------------------------------- the authorization checkpoint
    def authorize(self, export: Export | None, m: MethodDescription, quiet: bool = False) -> bool:
        """The one authorization checkpoint every incoming call passes, however it is addressed
        (export name, reference ``#id``, pipelined result ``^id``) and however it is served
        (inline or in a task; unary, one-way, stream or client stream).

        It checks the connection's requirement (a server's ``requirement=``; on a client, what its
        server must satisfy) and ``export.guards[m]``: the export's, the interface's and the
        implementation's requirements for ``m`` combined.  ``export`` is None for a pipelined call
        whose target is not known yet: then only the interface's requirement can be checked, and
        the call comes back here with its export once the target is known.  A refusal is logged
        (with the reason, which the peer never sees; not when ``quiet``: what is announced to the
        peer is decided here too) and returns False.
        """
        requirement = self.requirement
        if requirement is None or self.satisfies(requirement):
            requirement = export.guards.get(m.name) if export is not None else m.requirement
            if requirement is None or self.satisfies(requirement):
                return True
        if not quiet:
            peer = self.connection.peer
            log.warning("refused call %s from %s: %s", m.qualname, peer.describe(), _explain(requirement, peer))
        return False

    def satisfies(self, requirement: Any) -> bool:
        """Whether the peer satisfies ``requirement``, cached for the connection (the peer's facts
        do not change).  The cache holds the requirement itself, so its id cannot be reused by
        another object while the verdict is cached."""
        key = id(requirement)
        hit = self._guard_cache.get(key)
        if hit is not None and hit[0] is requirement:
            return hit[1]
        try:
            ok = requirement.check(self.connection.peer) is True
        except Exception:
            log.exception("requirement %s failed to evaluate", requirement)
            ok = False
        if len(self._guard_cache) >= _GUARD_CACHE_SIZE:
            self._guard_cache.clear()  # bounded: exports created and dropped in a loop cannot grow it
        self._guard_cache[key] = (requirement, ok)
        return ok

    # ---------------------------------------------------------------- dispatch of a CALL
    def _refuse(self, call_id: int, oneway: int, code: int, message: str) -> None:
        if not oneway:
            self.core.send_error(call_id, *refusal(code, message))

    def on_call(self, msg: Call, rec: CallRecord | None) -> None:
        core = self.core
        call_id = msg.id
        if self.plain and msg.flags == 0 and msg.deadline is None and not msg.meta and rec is not None:
            # The common call: a unary method of a named export that runs inline and that no
            # requirement guards, with nothing but its arguments.  ``Export.plain`` holds only
            # methods for which every check below passes but the connection's own: whether the
            # call was cancelled, the calls-in-flight limit.  Anything else, including arguments
            # that do not decode, takes the general path.
            target = self.exports.get(msg.obj)
            if target is None:
                target = self.shared.get(msg.obj)
            if target is not None:
                hit = target.plain.get(msg.method)
                if hit is not None and core.incoming.get(call_id) is rec and self.serving < self.limits.max_calls_in_flight:
                    pm = hit[0]
                    try:
                        args = pm.decode_args(msg.payload)
                    except (ValidationError, LimitExceeded):
                        pass
                    else:
                        try:
                            result = _run_inline(hit[1], args, _NO_KW) if hit[2] else hit[1](*args)
                        except Exception as exc:
                            self._send_exception(call_id, pm, exc)
                            return
                        del args
                        if type(result) not in _PLAIN and inspect.isawaitable(result):
                            self._finish_later(msg, pm, target, result)
                            return
                        try:
                            core.send_reply(call_id, pm.encode_reply(result))
                        except Exception:  # refused or too large: encoded again, to send the error that says why
                            self._send_answer(call_id, pm, result, None)
                        return
        if rec is not None and core.incoming.get(call_id) is not rec:
            # cancelled in the same read, before it started: nothing to run, nobody to answer; calls
            # passing its promise fail as for any cancelled call
            self._cancelled_before_start(msg)
            return
        oneway = msg.flags & CallFlags.ONEWAY
        promise: IncomingPromise | None = None
        export: Export | None
        desc: InterfaceDescription | None
        if msg.obj[:1] == "^":
            # pipelined: the target is the object an earlier call of the peer returns
            promise = self.objects.promise_for(msg.obj)
            export = None
            desc = promise.desc if promise is not None else None
        else:
            export = self.lookup(msg.obj)
            desc = export.desc if export is not None else None
        peer_name = self.connection.peer.describe
        if desc is None:
            self._refuse(call_id, oneway, ErrorCode.OBJECT_NOT_FOUND, self.not_found(msg.obj))
            log.info("call to unknown object %r from %s", msg.obj, peer_name())
            return
        m = desc.methods.get(msg.method)
        if m is None or m.flags != msg.flags:
            what = "has no method" if m is None else "was called with the wrong kind for method"
            self._refuse(call_id, oneway, ErrorCode.METHOD_NOT_FOUND, f"{desc.name} {what} {msg.method!r}")
            log.info("call to unknown method %s.%s from %s", desc.name, msg.method, peer_name())
            return
        # the authorization checkpoint (a pipelined call passes it again once its target is known)
        if (export is None or export.guards or self.requirement is not None) and not self.authorize(export, m):
            self._refuse(call_id, oneway, ErrorCode.PEER_REJECTED, f"{m.qualname}: refused")
            return
        limits = self.limits
        if rec is not None and rec.flags & (CallFlags.STREAM_IN | CallFlags.STREAM_OUT):
            if self.streams >= limits.max_streams:
                self._refuse(call_id, 0, ErrorCode.LIMIT, f"more than {limits.max_streams} streams open")
                return
        if self.serving >= limits.max_calls_in_flight:
            self._refuse(call_id, oneway, ErrorCode.LIMIT, f"more than {limits.max_calls_in_flight} calls in flight")
            return
        deadline = msg.deadline
        loop = self.link.loop
        # A plain-function implementation runs inline, on the reader, without a task: the quickest
        # path, for methods that do not wait for anything.  Its arguments are gone when it returns.
        inline = (
            export is not None
            and loop is not None
            and m.name in export.inline
            and m.kind in (MethodKind.UNARY, MethodKind.ONEWAY)
            and not self.middleware
            and not m.reply_refs
            and deadline is None
        )
        # A call served in a task holds its decoded arguments until it ends: they are drawn from
        # the memory budget.  Admitted only if the frame and its decoded arguments (both alive
        # while they are decoded) fit beside what is held; small ones are not counted.
        size = 0 if inline else len(msg.payload)
        meta = msg.meta
        if meta and not inline:  # metadata lives as long as the call too
            size += sum(len(k) + len(v) for k, v in meta.items())
        flow = self.flow
        if size > _SMALL_ARGS and flow.held + 2 * size > limits.max_buffered:
            reason = (
                f"{m.qualname}: its {size} bytes of arguments do not fit in the memory budget of {limits.max_buffered} bytes"
                f" beside the {flow.held} bytes held for this connection (calls in flight: {flow.calls_held})"
            )
            log.warning("refused call from %s: %s", peer_name(), reason)
            self._refuse(call_id, oneway, ErrorCode.LIMIT, reason)
            return
        # Arguments are decoded now, in frame order: a RELEASE read after this CALL cannot drop an
        # object the arguments carry back before they are decoded.
        awaited: AwaitedArguments | None = None
        charged = 0
        try:
            if m.ref_args:
                # the proxies its references become are charged to the budget too (a token of a
                # dozen bytes makes a proxy of hundreds): refused once they do not fit
                room = limits.max_buffered - flow.held - 2 * len(msg.payload)
                args, awaited, charged = self.objects.decode_arguments(m, msg.payload, room)
                if not inline:
                    size += charged
            else:
                args = m.decode_args(msg.payload, self.objects)
        except (ValidationError, LimitExceeded) as exc:
            why = str(exc) if isinstance(exc, LimitExceeded) else _refusal(exc)
            log.warning("refused call %s from %s: %s", m.qualname, peer_name(), why)
            if not oneway:
                core.send_error(call_id, *error_frame_args(exc))
            return
        if awaited is not None:
            # Some arguments stand for results of the peer's earlier calls: the call waits for them
            # in a task, holding its payload (decoded again once they are known).
            if inline:
                inline = False
                size = len(msg.payload) + charged + (sum(len(k) + len(v) for k, v in meta.items()) if meta else 0)
                if size > _SMALL_ARGS and flow.held + 2 * size > limits.max_buffered:
                    self._refuse(call_id, oneway, ErrorCode.LIMIT, f"{m.qualname}: its {size} bytes of arguments do not fit in the memory budget")
                    return
            payload = msg.payload
            awaited.payload = payload.copy() if len(payload) < 65536 else payload  # (a small one points into the whole read)
        if inline:
            assert export is not None
            self._serve_inline(msg, m, export, args)
            return
        # the task keeps ``msg``: let go of the frame (or the whole read) its payload points into
        _force_setattr(msg, "payload", _NO_PAYLOAD)
        if loop is None:
            inc = InCall(anyio.CancelScope(deadline=anyio.current_time() + deadline) if deadline is not None else None)
            inc.oneway = bool(oneway)
        else:
            inc = InCall(None)
        if rec is not None:
            rec.handler = inc
            if rec.flags & CallFlags.STREAM_IN:
                inc.queue = StreamQueue(flow, self.objects, call_id)
            if rec.flags & CallFlags.STREAM_OUT:
                inc.credit = Credit()
            if m.reply_iface is not None:
                inc.promise = self.objects.promise(call_id, describe(m.reply_iface))
        self.serving += 1
        if inc.queue is not None or inc.credit is not None:
            self.streams += 1
        if size > _SMALL_ARGS:
            inc.held = size
            flow.hold_call(size)
        if awaited is not None:
            coro = self._serve_when_ready(msg, m, export, promise, inc, args, awaited)
        elif promise is None:
            assert export is not None
            coro = self._serve(msg, m, export, inc, args)
        else:
            coro = self._serve_pipelined(msg, m, promise, inc, args)
        self._start(coro, inc, deadline)

    def _cancelled_before_start(self, msg: Call) -> None:
        """The peer cancelled call ``msg`` before it started: if it returns an object, keep its
        result as failed, so that a call passing its promise fails naming it (ObjectNotFound) as
        when the call is cancelled while it runs."""
        if msg.obj[:1] == "^":
            target = self.objects.promise_for(msg.obj)
            desc = target.desc if target is not None else None
        else:
            export = self.lookup(msg.obj)
            desc = export.desc if export is not None else None
        m = desc.methods.get(msg.method) if desc is not None else None
        if m is None or m.reply_iface is None or m.flags != msg.flags:
            return
        self.objects.promise(msg.id, describe(m.reply_iface)).settle(error=ObjectNotFound(f"call {msg.id} was cancelled"))
        self.objects.settled(msg.id)

    def _start(self, coro: Any, inc: InCall, deadline: float | None) -> None:
        loop = self.link.loop
        if loop is None:
            starts = self._starts
            if starts is None:
                starts = self._starts = collections.deque()
            starts.append((coro, inc))
            if not self._starting:
                tg = self.link.tg
                assert tg is not None
                self._starting = True
                tg.start_soon(self._run_starts)
            return
        task = loop.create_task(coro)
        inc.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if inc.held:
            # a task cancelled before its first step never runs its ``finally``
            task.add_done_callback(lambda _: self._release_call(inc))
        if deadline is not None:
            inc.deadline = loop.time() + deadline

    def _release_call(self, inc: InCall) -> None:
        """The call ended (reply, error, cancel, or the connection closed): its arguments' bytes
        go back to the budget (once)."""
        n = inc.held
        if n:
            inc.held = 0
            self.flow.release_call(n)

    async def _run_starts(self) -> None:
        """Start the queued calls in the order they arrived (non-asyncio backends, whose scheduler
        may start new tasks in any order), each in a context of its own, in this task: a call
        that finishes without suspending costs no task (nor, without a deadline, a scope).  The
        first one that suspends keeps this task, which finishes it under this task's scope (the
        call's ``scope`` if it has none of its own: a CANCEL cancels it), and a new task takes over
        the calls queued behind it, so a slow call holds up no other."""
        starts = self._starts
        assert starts is not None
        tg = self.link.tg
        assert tg is not None
        coro: Any = None
        dropped = False  # the calls that expect a reply were let go once the connection ended
        active = True  # this task starts the queued calls (until one suspends)
        with anyio.CancelScope() as scope:
            try:
                while starts:
                    if not dropped and tg.cancel_scope.cancel_called:
                        # The connection is over: a queued call whose reply can no longer go out is
                        # not started (each would take a scheduler round, and leave its Cancelled
                        # with the task group until the last).  A one-way call the peer sent before
                        # it left is still delivered, as on asyncio.
                        dropped = True
                        for _ in range(len(starts)):
                            coro, inc = starts.popleft()
                            if inc.oneway:
                                starts.append((coro, inc))
                            else:
                                coro.close()
                                self._let_go(inc)
                        coro = None
                        if not starts:
                            break
                    coro, inc = starts.popleft()
                    ctx = contextvars.copy_context()
                    try:
                        yielded = ctx.run(coro.send, None)
                    except StopIteration:
                        coro = None
                        continue
                    # it suspended: the calls behind it go on in another task
                    if starts:
                        tg.start_soon(self._run_starts)
                    else:
                        self._starting = False
                    active = False
                    step, coro = coro, None
                    if inc.scope is None:
                        inc.scope = scope
                    await _finish_in(ctx, step, yielded)
                    return
                self._starting = False
            except BaseException:
                if coro is not None:
                    coro.close()
                if active:  # a call failed as it started (a bug): the connection ends with it
                    while starts:
                        starts.popleft()[0].close()
                    self._starting = False
                raise

    # ---------------------------------------------------------------- serving
    def _serve_inline(self, msg: Call, m: MethodDescription, export: Export, args: tuple[Any, ...]) -> None:
        call_id = msg.id
        fn = export.methods[m.name]
        kw: dict[str, Any] = {}
        if m.kwonly:
            args, kw = m.call_args(args)
        run = _run_inline if export.is_async[m.name] else _call
        try:
            if msg.meta:
                ctx = contextvars.copy_context()
                ctx.run(metadata.set, msg.meta)
                result = ctx.run(run, fn, args, kw)
            else:
                result = run(fn, args, kw)
        except Exception as exc:
            if m.kind is MethodKind.ONEWAY:
                log.warning("one-way call %s raised %r", m.qualname, exc)
            else:
                self._send_exception(call_id, m, exc)
            return
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            self._finish_later(msg, m, export, result)
            return
        if m.kind is MethodKind.ONEWAY:
            return
        self._send_answer(call_id, m, result, None)
        # the reader flushes once it has handled every frame of this read

    def _finish_later(self, msg: Call, m: MethodDescription, export: Export, result: Any) -> None:
        """The method returned an awaitable after all: finish it in a task."""

        async def finish() -> Any:
            return await result

        self._serve_later(msg, m, export, finish)

    def _serve_later(self, msg: Call, m: MethodDescription, export: Export, fn: Callable[[], Any]) -> None:
        """Serve a call whose implementation turned out to need awaiting, in a task of its own."""
        inc = InCall(None)
        rec = self.core.incoming.get(msg.id)
        if rec is not None:
            rec.handler = inc  # a CANCEL reaches the task
        self.serving += 1
        size = len(msg.payload)
        if size > _SMALL_ARGS:
            # it holds its arguments from now on (it has started: it is not refused)
            inc.held = size
            self.flow.hold_call(size)
        _force_setattr(msg, "payload", _NO_PAYLOAD)
        self._start(self._serve(msg, m, OneShotExport(export, m.name, fn), inc, ()), inc, None)

    async def _serve_pipelined(self, msg: Call, m: MethodDescription, promise: IncomingPromise, inc: InCall, args: tuple[Any, ...]) -> None:
        """A call on the result of an earlier call: wait for that result, pass the authorization
        checkpoint with it (its implementation may carry ``@xrpc.requires``), then serve as usual."""
        if not await self._waited(msg, m, inc, promise.wait):
            return
        export: Export | None = None
        if promise.error is None:
            export = self.objects.resolved_export(promise, msg.obj)
        if export is None:
            error = (ErrorCode.OBJECT_NOT_FOUND, f"{msg.obj}: the call it depends on failed ({promise.error!r})")
        elif not self.authorize(export, m):
            error = (ErrorCode.PEER_REJECTED, f"{m.qualname}: refused")
        else:
            await self._serve(msg, m, export, inc, args)
            return
        self._unserved(msg, inc, error)

    async def _serve_when_ready(
        self,
        msg: Call,
        m: MethodDescription,
        export: Export | None,
        promise: IncomingPromise | None,
        inc: InCall,
        args: tuple[Any, ...],
        awaited: AwaitedArguments,
    ) -> None:
        """A call some of whose arguments are results of the peer's earlier calls (promises passed
        as arguments): wait for them, decode the arguments again with those objects in place, then
        serve as usual.  If one failed, the call fails naming the argument; the method never runs."""
        if not await self._waited(msg, m, inc, awaited.wait):
            return
        try:
            args = awaited.decode(m)  # (the first decoding's values are let go only now)
        except Exception as exc:
            if isinstance(exc, ValidationError) and awaited.failure:
                where = f"argument {exc.argument!r} of {m.qualname}" if exc.argument else m.qualname
                error = (ErrorCode.OBJECT_NOT_FOUND, f"{where}: {awaited.failure}")
            elif isinstance(exc, ValidationError):  # pragma: no cover - the same bytes decode the same way
                error = (ErrorCode.VALIDATION, str(exc))
            else:  # a descriptor among them could not be duplicated (out of descriptors)
                error = (ErrorCode.LIMIT, f"{m.qualname}: its arguments could not be taken ({type(exc).__name__})")
            log.info("call %s from %s not served: %s", m.qualname, self.connection.peer.describe(), error[1])
            self._unserved(msg, inc, error)
            return
        awaited.payload = None
        if promise is None:
            assert export is not None
            await self._serve(msg, m, export, inc, args)
        else:
            await self._serve_pipelined(msg, m, promise, inc, args)

    async def _waited(self, msg: Call, m: MethodDescription, inc: InCall, wait: Callable[[], Awaitable[None]]) -> bool:
        """Wait for what a call depends on before it is served, within its deadline; a CANCEL ends
        the wait.  False: the call ended (what it held is given back, a deadline answered)."""
        scope = inc.scope
        if scope is None:  # asyncio: a CANCEL cancels the task
            scope = anyio.CancelScope(deadline=inc.deadline)
        try:
            with scope:
                await wait()
        except BaseException:
            self._unserved(msg, inc, None)
            raise
        if not scope.cancel_called:
            if inc.scope is not None:
                inc.scope = anyio.CancelScope(deadline=scope.deadline)  # (a scope is entered once)
            return True
        timeout = (ErrorCode.TIMEOUT, f"{m.qualname} did not finish before its deadline")
        self._unserved(msg, inc, timeout if anyio.current_time() >= scope.deadline else None)
        return False

    def _let_go(self, inc: InCall) -> None:
        """A call served in a task is over, run or not: it no longer counts as served (nor as a
        stream), its arguments' bytes go back to the budget, its client stream's queue is emptied."""
        self.serving -= 1
        if inc.held:
            self._release_call(inc)
        if inc.queue is not None or inc.credit is not None:
            self.streams -= 1
            if inc.queue is not None:
                inc.queue.discard()

    def _unserved(self, msg: Call, inc: InCall, error: tuple[int, str] | None) -> None:
        """A call served in a task ends without running: what it held goes back, ``error`` is the
        answer (None: nothing is sent, it was cancelled)."""
        self._let_go(inc)
        if msg.id in self.core.incoming:
            if error is not None and not msg.flags & CallFlags.ONEWAY:
                self.core.send_error(msg.id, *refusal(*error))
                self.link.kick()
            else:
                self.core.forget_incoming(msg.id)
        if inc.promise is not None:
            inc.promise.settle(error=ObjectNotFound(f"{msg.obj} failed"))
            self.objects.settled(msg.id)

    async def _serve(self, msg: Call, m: MethodDescription, export: Export, inc: InCall, args: tuple[Any, ...]) -> None:
        core = self.core
        call_id = msg.id
        scope = inc.scope
        try:
            if msg.meta:
                metadata.set(msg.meta)
            fn: Callable[..., Any]
            if m.kwonly:
                args, kw = m.call_args(args)
                fn = functools.partial(export.methods[m.name], **kw)
            else:
                fn = export.methods[m.name]
            if self.middleware:
                fn = self._intercepted(m, fn)
            if inc.queue is not None:
                args = (*args, InStream(inc.queue, m))
                if m.stream_param is not None:
                    pos = m.params.index(m.stream_param)
                    if pos != len(args) - 1:
                        lst = list(args)
                        lst.insert(pos, lst.pop())
                        args = tuple(lst)
            if scope is not None:
                with scope:
                    await self._invoke(call_id, m, export, fn, args, inc)
                timed_out = scope.cancelled_caught and call_id in core.incoming
            elif inc.deadline != math.inf:
                with anyio.CancelScope(deadline=inc.deadline) as deadline_scope:
                    await self._invoke(call_id, m, export, fn, args, inc)
                timed_out = deadline_scope.cancelled_caught and call_id in core.incoming
            else:
                await self._invoke(call_id, m, export, fn, args, inc)
                timed_out = False
            if timed_out:
                # the deadline passed (a CANCEL from the peer removes the call from the table)
                core.send_error(call_id, *refusal(ErrorCode.TIMEOUT, f"{m.qualname} did not finish before its deadline"))
                self.link.kick()
        finally:
            self._let_go(inc)
            core.forget_incoming(call_id)
            if inc.promise is not None:
                inc.promise.settle(error=ObjectNotFound(f"call {call_id} returned no object"))
                self.objects.settled(call_id)

    async def _invoke(self, call_id: int, m: MethodDescription, export: Export, fn: Callable[..., Any], args: tuple[Any, ...], inc: InCall) -> None:
        kind = m.kind
        try:
            if kind.streams_out:
                await self._serve_stream(call_id, m, fn, args, inc)
                return
            if export.is_async[m.name] and not m.kwonly:
                result = await fn(*args)
            else:
                result = fn(*args)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            if inc.promise is not None:
                inc.promise.settle(error=exc)  # what calls depending on its result report
            if kind is MethodKind.ONEWAY:
                log.warning("one-way call %s raised %r", m.qualname, exc)
            elif await self.room_for(len(str(exc)) + 64):
                start = self.core.emitted
                self._send_exception(call_id, m, exc)
                self.answered(start)
            return
        if kind is not MethodKind.ONEWAY:
            if self.link.out_full():
                try:
                    room = await self.room_for(_encoded_size(result))
                except BaseException:
                    # cancelled while the peer is behind (cut off, say): this frame stays in the
                    # exception's traceback, a cycle only the collector frees; the answer goes now
                    del result
                    raise
                if not room:
                    return
            start = self.core.emitted
            self._send_answer(call_id, m, result, inc.promise)
            del result
            if self.serving == 1:
                self.link.send_now()  # the last call being served: no other reply can join this write
            else:
                self.link.kick()  # left to the coalescing flush at the end of the loop iteration
            self.answered(start)

    def _send_answer(self, call_id: int, m: MethodDescription, result: Any, promise: IncomingPromise | None) -> None:
        """Send REPLY for ``result``, or the ERROR that says why it cannot go (objects exported for a
        reply that never leaves are taken back)."""
        core = self.core
        objects = self.objects
        try:
            if m.reply_refs:
                objects.begin()
            try:
                payload = m.encode_reply(result, objects)
                core.send_reply(call_id, payload)
            except BaseException:
                objects.rollback()
                raise
            if m.reply_refs:
                objects.commit()
                if promise is not None and type(payload) is Ref and not payload.home:
                    objects.returned(payload.oid, call_id)
            if promise is not None:
                # only a result that went out stands for calls depending on it: a refused reply
                # (LimitExceeded, an object that lacks a method) fails them like any failed call
                promise.settle(result)
        except (LimitExceeded, ValidationError) as exc:
            if promise is not None:
                promise.settle(error=exc)
            log.warning("reply of %s refused: %s", m.qualname, _refusal(exc))
            code, type_name, message, args = error_frame_args(exc)
            core.send_error(call_id, code, type_name, message, [""] if args is not None else None)
        except (TypeError, msgspec.EncodeError, OverflowError) as exc:
            log.warning("reply of %s could not be sent: %s", m.qualname, type(exc).__name__)
            core.send_error(call_id, ErrorCode.INTERNAL, type(exc).__name__, f"the reply of {m.qualname} could not be encoded: {exc}")
        except LocalProtocolError as exc:
            if call_id in core.incoming:  # else the call is gone (cancelled, or the connection closed): nobody to answer
                core.send_error(call_id, *refusal(ErrorCode.LIMIT, f"the reply of {m.qualname} is too large: {exc}"))
        except Exception as exc:  # pragma: no cover - never let a reply break the reader or the task
            log.warning("reply of %s could not be sent: %s", m.qualname, type(exc).__name__)
            if call_id in core.incoming:
                core.send_error(call_id, ErrorCode.INTERNAL, type(exc).__name__, f"the reply of {m.qualname} could not be sent")

    def _intercepted(self, m: MethodDescription, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` run through the server middleware."""

        async def run(*args: Any) -> Any:
            ctx = CallContext(m, self.connection, args, {}, dict(metadata.get() or {}), "server")

            async def last() -> Any:
                result = fn(*args)
                if inspect.isawaitable(result):
                    result = await result
                return result

            return await run_chain(self.middleware, ctx, last)

        return run

    def _send_exception(self, call_id: int, m: MethodDescription, exc: Exception) -> None:
        core = self.core
        if call_id not in core.incoming:
            return
        code, type_name, message, args = error_frame_args(exc, m)
        if code == ErrorCode.REMOTE:
            log.debug("%s raised %r", m.qualname, exc)
        try:
            core.send_error(call_id, code, type_name, message, args)
        except (TypeError, msgspec.EncodeError, OverflowError, LocalProtocolError):
            core.send_error(call_id, code, type_name, message, [message])  # declared arguments that do not encode
        self.link.kick()

    async def _serve_stream(self, call_id: int, m: MethodDescription, fn: Callable[..., Any], args: tuple[Any, ...], inc: InCall) -> None:
        core = self.core
        rec = core.incoming.get(call_id)
        credit = inc.credit
        assert credit is not None
        result = fn(*args)
        if inspect.isawaitable(result) and not hasattr(result, "__aiter__"):
            result = await result
        it = result.__aiter__()
        try:
            alive = lambda: core.incoming.get(call_id) is rec  # noqa: E731
            # items of a plain slot go out as they are: no per-item call
            wrap = functools.partial(m.encode_reply, ctx=self.objects) if (m.reply_refs or m.reply_checked) else None
            if rec is not None and await self.sender.send(rec, it, wrap, credit, alive, m):
                core.send_end(call_id)
                self.link.kick()
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                with anyio.move_on_after(1.0, shield=True):
                    await aclose()
