"""xrpc codegen: schemas, typed stubs and compatibility reports from ``xrpc.describe()``.

* ``build_schema(interfaces)`` / ``load_targets("pkg.mod:Iface")``: the versioned JSON schema of one
  or more interfaces, as a plain dict.
* ``render_stubs(schema)``: a Python module declaring the same types, errors and Protocols.
* ``compare(old, new)``: every change between two schemas, judged for old clients talking to a new
  server and for new clients talking to an old server.

The command line is ``python -m codegen`` (installed: ``xrpc-codegen``).  This package uses only
relative imports, so it works both as ``codegen`` from a checkout and as ``xrpc_codegen`` when
installed.
"""

from ._check import Change, compare, has_breaking
from ._document import SCHEMA_VERSION, SchemaDoc, load_schema, parse_schema
from ._errors import CodegenError
from ._export import build_schema, load_targets
from ._stubs import render_stubs

__all__ = (
    "SCHEMA_VERSION",
    "Change",
    "CodegenError",
    "SchemaDoc",
    "build_schema",
    "compare",
    "has_breaking",
    "load_schema",
    "load_targets",
    "parse_schema",
    "render_stubs",
)
