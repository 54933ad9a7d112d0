"""The built-in introspection service every server offers (what ``xrpc call`` and ``xrpc inspect``
read): the objects a connection can reach and their interfaces, from the same descriptions the
runtime uses.  It is exported under the name ``xrpc.introspect`` and reveals names, types and
docstrings, and only of what the calling peer may call: an export whose requirement it fails is
left out, and so is a method guarded by ``@xrpc.requires`` that it fails.
"""

from __future__ import annotations

from typing import Collection, Protocol

import msgspec

from ._interface import InterfaceDescription, interface

__all__ = ("INTROSPECT_NAME", "Introspection", "ExportDescription", "MethodInfo", "ParamInfo", "describe_export")

INTROSPECT_NAME = "xrpc.introspect"


class ParamInfo(msgspec.Struct, frozen=True):
    name: str
    type: str
    required: bool
    stream: bool = False
    allowed: list[str] = []


class MethodInfo(msgspec.Struct, frozen=True):
    name: str
    kind: str
    params: list[ParamInfo]
    reply: str
    doc: str = ""


class ExportDescription(msgspec.Struct, frozen=True):
    name: str
    interface: str
    fingerprint: str
    methods: list[MethodInfo]
    errors: list[str] = []


@interface(name="xrpc.Introspection")
class Introspection(Protocol):
    async def exports(self) -> list[ExportDescription]:
        """Every object this connection may call by name, with its interface (the methods it may call)."""
        ...


def describe_export(name: str, desc: InterfaceDescription, only: Collection[str] | None = None) -> ExportDescription:
    """``desc`` exported as ``name``; with ``only``, just those methods (what a peer may call)."""
    methods = []
    for m in desc.methods.values():
        if only is not None and m.name not in only:
            continue
        d = m.describe()
        params = [
            ParamInfo(p["name"], p["type"], "default" not in p, bool(p.get("stream", False)), list(p.get("allowed", [])))
            for p in d["params"]
        ]
        methods.append(MethodInfo(m.name, m.kind.value, params, d["reply"]["type"], m.doc or ""))
    return ExportDescription(name, desc.name, desc.fingerprint, methods, [e.__qualname__ for e in desc.errors])
