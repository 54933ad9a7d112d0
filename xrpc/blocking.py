"""A blocking facade for code that is not async (NSXPC's synchronous proxy).

``with xrpc.blocking.connect(url) as conn:`` runs an event loop in a background thread (anyio's
blocking portal) and gives proxies whose methods block until the reply arrives, and whose streams
are plain iterators.  Client-stream parameters take any ordinary iterable.  Calling it from inside
an event loop raises ``RuntimeError`` at once instead of deadlocking.

For type checkers, declare the blocking form of an interface with ``@xrpc.blocking.interface(Iface)``
(or generate it: ``xrpc-codegen stubs --blocking``) and ask for a proxy of that:
``conn.proxy(IfaceBlocking)`` is typed as ``IfaceBlocking``, whose methods return their results.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import inspect
import sys
import types
import typing
from typing import Any, Callable, Iterator, TypeVar, Union

from anyio.from_thread import BlockingPortal, start_blocking_portal
from typing_extensions import Annotated, get_args, get_origin

from ._api import connect as _connect
from ._connection import Connection
from ._errors import InterfaceError
from ._interface import MethodDescription, describe

__all__ = ("connect", "interface", "BlockingConnection")

_T = TypeVar("_T")
_C = TypeVar("_C", bound=type)

# set on a class by @xrpc.blocking.interface: the async interface it is the blocking form of
_ASYNC_FORM = "__xrpc_blocking_of__"
_SYNC_ITERABLES = (collections.abc.Iterable, collections.abc.Iterator)
_SYNC_ITERATORS = (collections.abc.Iterator, collections.abc.Iterable, collections.abc.Generator)


def interface(iface: Any) -> Callable[[_C], _C]:
    """Declare a ``typing.Protocol`` as the blocking form of the ``@xrpc.interface`` class ``iface``.

    Each method is a plain ``def`` with the parameters of the method of the same name in ``iface``:
    ``async def m(...) -> T`` becomes ``def m(...) -> T``, a stream ``-> AsyncIterator[T]`` becomes
    ``-> Iterator[T]``, and a client-stream parameter is typed ``Iterable[T]``.  It may leave methods
    out.  The decorator checks this now (``InterfaceError``) and returns the class unchanged; on a
    blocking connection ``conn.proxy(IfaceBlocking)`` calls ``iface`` and is typed as the class.
    """
    desc = describe(iface)

    def apply(cls: _C) -> _C:
        if not isinstance(cls, type):
            raise InterfaceError(f"@xrpc.blocking.interface applies to a class, not {cls!r}")
        where = cls.__qualname__
        module = sys.modules.get(cls.__module__)
        globalns = dict(vars(module)) if module else {}
        for base in reversed(cls.__mro__):
            if base in (object, typing.Protocol, typing.Generic) or base.__module__ == "typing":
                continue
            for name, fn in vars(base).items():
                if name.startswith("_") or not inspect.isfunction(fn):
                    continue
                m = desc.methods.get(name)
                if m is None:
                    raise InterfaceError(f"{where}.{name}: {desc.name} has no method {name!r}")
                try:
                    hints = typing.get_type_hints(fn, globalns=globalns, localns={cls.__name__: cls}, include_extras=True)
                except Exception as exc:
                    raise InterfaceError(f"{where}.{name}: annotations cannot be resolved: {exc}") from None
                _check_method(f"{where}.{name}", fn, hints, m)
        setattr(cls, _ASYNC_FORM, iface)
        return cls

    return apply


def _check_method(where: str, fn: Any, hints: dict[str, Any], m: MethodDescription) -> None:
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise InterfaceError(f"{where}: a blocking method is a plain def, not async def")
    params = list(inspect.signature(fn).parameters.values())[1:]
    mine = [(p.name, p.kind, p.default) for p in params]
    theirs = [(p.name, p.kind, p.default) for p in m.params]
    if mine != theirs:
        raise InterfaceError(f"{where}: the parameters must be those of {m.interface.name}.{m.name}: {_params(m)}")
    for p in m.params:
        got = hints.get(p.name, Any)
        if p.stream:
            want = _stream_item(p.annotation)
            if get_origin(got) not in _SYNC_ITERABLES or _first_arg(got) != want:
                raise InterfaceError(f"{where}: parameter {p.name!r} is a client stream: annotate it Iterable[{_name(want)}]")
        elif got != p.annotation:
            raise InterfaceError(f"{where}: parameter {p.name!r} must be annotated {_name(p.annotation)} like {m.interface.name}.{m.name}")
    got = hints.get("return", Any)
    if m.kind.streams_out:
        want = _stream_item(m.reply_annotation)
        if get_origin(got) not in _SYNC_ITERATORS or _first_arg(got) != want:
            raise InterfaceError(f"{where}: {m.interface.name}.{m.name} returns a stream: annotate it -> Iterator[{_name(want)}]")
    elif got != m.reply_annotation and not (m.reply_annotation in (None, type(None)) and got in (None, type(None))):
        raise InterfaceError(f"{where}: must return {_name(m.reply_annotation)} like {m.interface.name}.{m.name}")


def _stream_item(tp: Any) -> Any:
    """T in the async form's ``AsyncIterator[T]`` (or ``AsyncIterable[T] | Iterable[T]``)."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        tp = next(t for t in get_args(tp) if _origin(t) not in _SYNC_ITERABLES)
    return _first_arg(tp)


def _origin(tp: Any) -> Any:
    return get_origin(tp)


def _first_arg(tp: Any) -> Any:
    args = get_args(tp)
    return args[0] if args else Any


def _name(tp: Any) -> str:
    if tp is None or tp is type(None):
        return "None"
    return tp.__name__ if isinstance(tp, type) and not get_args(tp) else repr(tp).replace("typing.", "")


def _params(m: MethodDescription) -> str:
    return "(" + ", ".join(p.name for p in m.params) + ")"


def _refuse_inside_event_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("xrpc.blocking is for code that is not async: inside an event loop use xrpc.connect()")
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return
        raise RuntimeError("xrpc.blocking is for code that is not async: inside an event loop use xrpc.connect()")


class BlockingConnection:
    """A connection driven from a background thread; ``proxy()`` gives blocking proxies."""

    def __init__(self, conn: Connection, portal: BlockingPortal) -> None:
        self.connection = conn
        self._portal = portal

    @property
    def peer(self) -> Any:
        return self.connection.peer

    def proxy(self, iface: Callable[..., _T], name: str = "", timeout: float | None = None) -> _T:
        """A proxy whose methods block (streams: ordinary iterators), typed as ``iface``.

        Pass the blocking form (``@xrpc.blocking.interface(Iface)``) for a proxy that type checkers
        see as it behaves; the ``@xrpc.interface`` class itself works too, typed as the async Protocol.
        """
        _refuse_inside_event_loop()
        target = vars(iface).get(_ASYNC_FORM, iface) if isinstance(iface, type) else iface
        inner = self.connection.proxy(target, name, timeout)
        return _BlockingProxy(inner, describe(target), self._portal)  # type: ignore[return-value]

    def export(self, iface: Any, obj: Any, name: str = "") -> None:
        self._portal.call(_export, self.connection, iface, obj, name)


async def _export(conn: Connection, iface: Any, obj: Any, name: str) -> None:
    conn.export(iface, obj, name)


class _BlockingProxy:
    def __init__(self, inner: Any, desc: Any, portal: BlockingPortal) -> None:
        self._inner = inner
        self._desc = desc
        self._portal = portal

    def __repr__(self) -> str:
        return f"<xrpc blocking proxy of {self._inner!r}>"

    def __getattr__(self, name: str) -> Any:
        m = self._desc.methods.get(name)
        if m is None:
            raise AttributeError(f"{self._desc.name} has no method {name!r}")
        method = getattr(self._inner, name)
        portal = self._portal
        if m.kind.streams_out:

            def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
                _refuse_inside_event_loop()
                return _BlockingStream(portal, method, args, kwargs)

            return stream

        def call(*args: Any, **kwargs: Any) -> Any:
            _refuse_inside_event_loop()
            return portal.call(lambda: method(*args, **kwargs))

        return call


class _BlockingStream(Iterator[Any]):
    """A server stream as an ordinary iterator; ``close()`` stops the remote producer."""

    def __init__(self, portal: BlockingPortal, method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._portal = portal
        self._stream = portal.call(_make_stream, method, args, kwargs)
        self._done = False

    def __iter__(self) -> _BlockingStream:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        try:
            return self._portal.call(self._stream.__anext__)
        except StopAsyncIteration:
            self._done = True
            raise StopIteration from None
        except BaseException:
            self._done = True
            raise

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._portal.call(self._stream.aclose)

    def __enter__(self) -> _BlockingStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._done:
            try:
                self.close()
            except Exception:
                pass


async def _make_stream(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return method(*args, **kwargs)


@contextlib.contextmanager
def connect(url: Any, **kwargs: Any) -> Iterator[BlockingConnection]:
    """Connect to ``url`` from blocking code (same options as ``xrpc.connect``)."""
    _refuse_inside_event_loop()
    with start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(_connect(url, **kwargs)) as conn:
            yield BlockingConnection(conn, portal)
