"""Proxies: objects typed as an interface whose methods are remote calls.

One proxy class is built per interface description and cached; an instance holds only its
``Caller`` (a connection, or a service connection that finds a connection per call), the remote
object's name and a default timeout, so proxies are cheap and many share one connection.  All
behaviour lives in the caller; a proxy method only checks what the peer announced and forwards its
arguments.  Every proxy feature (pipelining, middleware, timeouts, compatibility checks) works on
every ``Caller``.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from ._errors import ValidationError
from ._interface import InterfaceDescription, MethodDescription, MethodKind, describe, is_default

__all__ = ("Caller", "PromiseBase", "ProxyBase", "cached_proxy", "check_compat", "make_proxy", "pipeline", "pipelined_method", "proxy_target")


class Caller(Protocol):
    """What a proxy calls through.  ``Connection`` and ``ServiceConnection`` implement it."""

    url: str

    async def call_unary(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        """Send a unary call to ``obj`` and return its decoded reply (or raise its error)."""

    async def call_oneway(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Send a one-way call (no reply)."""

    async def call_client_stream(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        """Send a call whose stream argument is an (async) iterable; return its reply."""

    def call_stream(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> AsyncIterator[Any]:
        """A server or two-way stream; the call starts on the first iteration."""

    def call_pipelined(self, obj: str, m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Awaitable[Any]:
        """A promise for a unary call (``xrpc.pipeline``): awaitable, and its methods pipeline."""


def check_compat(compat: dict[str, Any], m: MethodDescription, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse a call the peer's version of the interface cannot take (``compat`` is what
    ``Connection`` worked out from the peer's announced signatures)."""
    verdict = compat.get(m.name)
    if verdict is None:
        return
    if isinstance(verdict, BaseException):
        raise type(verdict)(*verdict.args)
    for i in verdict:
        p = m.value_params[i]
        pos = m.params.index(p)  # ``args`` hold a stream argument too, in its place
        given = args[pos] if pos < len(args) else kwargs.get(p.name, p.default)
        if not is_default(given, p.default):
            raise ValidationError(
                f"{m.qualname}: the peer's version has no parameter {p.name!r}; it cannot take the value passed",
                method=m.name,
                argument=p.name,
            )

_classes: dict[int, type] = {}


class ProxyBase:
    """Base of every proxy class."""

    __slots__ = ("_xrpc_conn", "_xrpc_obj", "_xrpc_timeout", "_xrpc_ref", "_xrpc_compat", "__weakref__")
    _xrpc_desc: InterfaceDescription

    def __init__(self, conn: Caller, obj: str, timeout: float | None, compat: dict[str, Any] | None = None) -> None:
        self._xrpc_conn = conn
        self._xrpc_obj = obj
        self._xrpc_timeout = timeout
        self._xrpc_ref: Any = None  # for a proxy received by reference: the finalizer that releases it
        self._xrpc_compat = compat  # differences from the peer's announced interface, if any

    def __repr__(self) -> str:
        return f"<xrpc proxy {self._xrpc_desc.name} {self._xrpc_obj!r} via {self._xrpc_conn.url or 'connection'}>"

    async def aclose(self) -> None:
        """Release this proxy: an object passed by reference is released on its exporter.

        Later calls on this proxy raise ``xrpc.ObjectNotFound``.  Proxies from ``conn.proxy()``
        name a fixed export and stay usable.
        """
        ref = self._xrpc_ref
        if ref is not None:
            self._xrpc_ref = None
            self._xrpc_obj = "#released"
            ref()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


# Makes ``inspect.iscoroutinefunction(fn)`` true for a function that returns a coroutine (3.12+).
# Without it (3.10, 3.11) a unary method stays an ``async def``: code that asks whether to await a
# callable must still be told yes.
_mark_coroutine: Callable[[Callable[..., Any]], Any] | None = getattr(inspect, "markcoroutinefunction", None)


def _method(m: MethodDescription) -> Callable[..., Any]:
    kind = m.kind
    fn: Callable[..., Any]
    if kind is MethodKind.UNARY:

        async def held(self: ProxyBase, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            # the proxy stays alive while its call runs (a reference is released once it is gone)
            if self._xrpc_compat is not None:
                check_compat(self._xrpc_compat, m, args, kwargs)
            return await self._xrpc_conn.call_unary(self._xrpc_obj, m, args, kwargs, self._xrpc_timeout)

        if _mark_coroutine is not None:
            # not itself a coroutine function (but marked as one): for a proxy of a named export
            # that the peer's interface matches, it returns the call's coroutine (one frame fewer
            # per call)
            def fn(self: ProxyBase, *args: Any, **kwargs: Any) -> Any:
                if self._xrpc_compat is not None or self._xrpc_ref is not None:
                    return held(self, args, kwargs)
                return self._xrpc_conn.call_unary(self._xrpc_obj, m, args, kwargs, self._xrpc_timeout)

            _mark_coroutine(fn)
        else:

            async def fn(self: ProxyBase, *args: Any, **kwargs: Any) -> Any:
                if self._xrpc_compat is not None:
                    check_compat(self._xrpc_compat, m, args, kwargs)
                return await self._xrpc_conn.call_unary(self._xrpc_obj, m, args, kwargs, self._xrpc_timeout)

    elif kind is MethodKind.ONEWAY:

        async def fn(self: ProxyBase, *args: Any, **kwargs: Any) -> Any:
            if self._xrpc_compat is not None:
                check_compat(self._xrpc_compat, m, args, kwargs)
            await self._xrpc_conn.call_oneway(self._xrpc_obj, m, args, kwargs)

    elif kind is MethodKind.CLIENT_STREAM:

        async def fn(self: ProxyBase, *args: Any, **kwargs: Any) -> Any:
            if self._xrpc_compat is not None:
                check_compat(self._xrpc_compat, m, args, kwargs)
            return await self._xrpc_conn.call_client_stream(self._xrpc_obj, m, args, kwargs, self._xrpc_timeout)

    else:

        def fn(self: ProxyBase, *args: Any, **kwargs: Any) -> Any:
            if self._xrpc_compat is not None:
                check_compat(self._xrpc_compat, m, args, kwargs)
            return self._xrpc_conn.call_stream(self._xrpc_obj, m, args, kwargs, self._xrpc_timeout)

    fn.__name__ = m.name
    fn.__qualname__ = f"{m.interface.name}Proxy.{m.name}"
    fn.__doc__ = m.doc
    return fn


def proxy_class(desc: InterfaceDescription) -> type:
    cls = _classes.get(id(desc))
    if cls is None or cls._xrpc_desc is not desc:  # type: ignore[attr-defined]
        ns: dict[str, Any] = {"__slots__": (), "_xrpc_desc": desc}
        for m in desc.methods.values():
            ns[m.name] = _method(m)
        cls = type(f"{desc.name}Proxy", (ProxyBase,), ns)
        _classes[id(desc)] = cls
    return cls


def make_proxy(
    conn: Caller,
    desc: InterfaceDescription,
    obj: str,
    timeout: float | None,
    compat: dict[str, Any] | None = None,
    release: Callable[[str], Any] | None = None,
) -> Any:
    """A proxy of ``desc`` for the remote object ``obj``.  ``release(obj)`` is called once the
    proxy is released (``aclose``) or garbage-collected: for objects received by reference."""
    p = proxy_class(desc)(conn, obj, timeout, compat)
    if release is not None:
        p._xrpc_ref = weakref.finalize(p, release, obj)
    return p


def cached_proxy(
    cache: dict[tuple[int, str, float | None], Any],
    caller: Caller,
    iface: Any,
    name: str,
    timeout: float | None,
    compat: Callable[[InterfaceDescription, str], dict[str, Any] | None] | None = None,
) -> Any:
    """The proxy of ``iface`` for ``name`` through ``caller``, made once per (interface, name,
    timeout) and kept in ``cache``; ``compat`` works out what the peer announced differently."""
    desc = describe(iface)
    key = name or desc.name
    cache_key = (id(desc), key, timeout)
    p = cache.get(cache_key)
    if p is None:
        p = cache[cache_key] = make_proxy(caller, desc, key, timeout, compat(desc, key) if compat is not None else None)
    return p


def pipelined_method(m: MethodDescription, name: str) -> MethodDescription:
    """The method ``name`` of the object ``m`` returns, for a call pipelined on its result."""
    iface = m.reply_iface
    if iface is None:
        raise AttributeError(f"{m.qualname} does not return an object: there is nothing to pipeline on")
    found = describe(iface).methods.get(name)
    if found is None:
        raise AttributeError(f"{describe(iface).name} has no method {name!r}")
    return found


def proxy_target(value: Any) -> tuple[Caller, str, InterfaceDescription] | None:
    """For a proxy: its caller, the name of its remote object and its interface; else None."""
    if isinstance(value, ProxyBase):
        return value._xrpc_conn, value._xrpc_obj, value._xrpc_desc
    return None


class PromiseBase:
    """Base of the promises ``xrpc.pipeline`` gives.  A promise passed as an argument where the
    interface its call returns is expected travels as a reference to that call's result, which the
    peer resolves on its side (the call is sent at once; the result never travels back)."""

    __slots__ = ()

    def __xrpc_argument__(self, caller: Caller) -> tuple[str, InterfaceDescription, Any]:
        """This promise as an argument of a call made through ``caller`` (a connection's calling
        side): ``("^id", interface of the result, None)`` while its answer is on the way, or
        ``("", interface, result)`` once the result is here.  ``ValueError`` if it cannot be
        passed there (another connection, a call that returns no object, a call never sent)."""
        raise NotImplementedError


class _PipelineView:
    """``xrpc.pipeline(proxy)``: the same methods, returning ``Promise`` objects."""

    __slots__ = ("_proxy",)

    def __init__(self, proxy: ProxyBase) -> None:
        self._proxy = proxy

    def __getattr__(self, name: str) -> Callable[..., Any]:
        proxy = self._proxy
        m = proxy._xrpc_desc.methods.get(name)
        if m is None:
            raise AttributeError(f"{proxy._xrpc_desc.name} has no method {name!r}")

        def call(*args: Any, **kwargs: Any) -> Any:
            if proxy._xrpc_compat is not None:
                check_compat(proxy._xrpc_compat, m, args, kwargs)
            return proxy._xrpc_conn.call_pipelined(proxy._xrpc_obj, m, args, kwargs, proxy._xrpc_timeout)

        return call


def pipeline(proxy: Any) -> Any:
    """A view of ``proxy`` whose unary methods return promises: awaitable, and when the method
    returns an object, its methods can be called at once (promise pipelining)::

        value = await xrpc.pipeline(store).open("a.txt").read()   # one round trip, not two
    """
    if not isinstance(proxy, ProxyBase):
        raise TypeError(f"xrpc.pipeline() takes a proxy, got {type(proxy).__qualname__}")
    return _PipelineView(proxy)

