"""The built-in introspection service every server offers (what ``xrpc call`` and ``xrpc inspect``
read): the objects a connection can reach and their interfaces, from the same descriptions the
runtime uses.  It is exported under the name ``xrpc.introspect`` and reveals names and types only.
"""

from __future__ import annotations

from typing import Protocol

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
        """Every object this connection can call by name, with its interface."""
        ...


def describe_export(name: str, desc: InterfaceDescription) -> ExportDescription:
    methods = []
    for m in desc.methods.values():
        d = m.describe()
        params = [
            ParamInfo(p["name"], p["type"], "default" not in p, bool(p.get("stream", False)), list(p.get("allowed", [])))
            for p in d["params"]
        ]
        methods.append(MethodInfo(m.name, m.kind.value, params, d["reply"]["type"], m.doc or ""))
    return ExportDescription(name, desc.name, desc.fingerprint, methods, [e.__qualname__ for e in desc.errors])
