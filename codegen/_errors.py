"""The one exception codegen raises for bad input: a module that cannot be loaded, a schema file that
is not a schema, a type with no JSON Schema.  The CLI turns it into exit code 2."""

from __future__ import annotations

__all__ = ("CodegenError",)


class CodegenError(Exception):
    """Input that codegen cannot work with; the message says what and where."""
