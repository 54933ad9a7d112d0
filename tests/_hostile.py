"""Helpers that make an in-process connection behave like a hostile peer."""

from __future__ import annotations

from typing import Any, Callable

import xrpc


class _Forger:
    """An object table that writes every object it passes as ``forge(desc, value)`` says."""

    def __init__(self, real: Any, forge: Callable[[Any, Any], Any]) -> None:
        self.real, self.forge = real, forge

    def ref_out(self, desc: Any, value: Any) -> Any:
        return self.forge(desc, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def forge_references(conn: xrpc.Connection, forge: Callable[[Any, Any], Any]) -> None:
    """From now on ``conn`` sends, for every object it passes by reference, the token ``forge``
    returns (``forge(desc, value)``) instead of exporting the object."""
    conn._calls.objects = _Forger(conn._objects, forge)


def behave(conn: xrpc.Connection) -> None:
    """Undo ``forge_references``: ``conn`` behaves again."""
    conn._calls.objects = conn._objects
