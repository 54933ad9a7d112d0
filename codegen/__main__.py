"""The command line: ``python -m codegen {schema,stubs,check}`` (installed: ``xrpc-codegen``).

Exit codes: 0 success (no breaking change), 1 breaking changes found, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Sequence

from ._check import DIRECTION_TEXT, Direction, compare, has_breaking
from ._document import load_schema
from ._errors import CodegenError
from ._export import build_schema, load_targets
from ._stubs import render_stubs

__all__ = ("main",)

EXIT_OK = 0
EXIT_BREAKING = 1
EXIT_USAGE = 2

_PROG = "xrpc-codegen"

_DESCRIPTION = """\
Schemas, typed stubs and compatibility checks for xrpc interfaces.

commands:
  schema   export the JSON schema of @xrpc.interface classes
  stubs    generate a typed Python module (msgspec Structs + Protocols) from a schema
  check    compare two schemas and report compatible and breaking changes
"""

_EPILOG = """\
examples:
  %(prog)s schema myapp.api:Store -o store.json      one interface
  %(prog)s schema myapp.api -o api.json              every interface in the module
  %(prog)s stubs api.json -o myclient/api_stubs.py
  %(prog)s stubs api.json --blocking -o api_stubs.py  with the blocking forms too
  %(prog)s check released.json api.json              exit 1 if an old client would break
  %(prog)s check released.json api.json --json       machine-readable, for CI

exit codes: 0 ok, 1 breaking changes found, 2 usage or input error
"""


def _prog() -> str:
    if os.path.basename(sys.argv[0]) == "__main__.py" and __package__:
        # ``python -m codegen`` or ``python -m xrpc_codegen`` (which runs this module's main)
        return f"python -m {os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0])))}"
    return _PROG


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog=_prog(), description=_DESCRIPTION, epilog=_EPILOG, formatter_class=raw)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser(
        "schema",
        help="export the JSON schema of interfaces",
        formatter_class=raw,
        description="Write the versioned JSON schema of @xrpc.interface classes, read through xrpc.describe().",
        epilog="examples:\n  %(prog)s myapp.api:Store\n  %(prog)s myapp.api:Store,Catalog -o api.json\n  %(prog)s myapp.api -o api.json",
    )
    s.add_argument("targets", nargs="+", metavar="MODULE[:IFACE[,IFACE]]", help="a module (every interface in it) or module:Interface")
    s.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")

    t = sub.add_parser(
        "stubs",
        help="generate a typed Python module from a schema",
        formatter_class=raw,
        description="Generate msgspec Structs, enums, declared errors and @xrpc.interface Protocols from a schema.\n"
        "The module only declares; a client built on it interoperates with the original server.",
        epilog="examples:\n  %(prog)s api.json -o api_stubs.py\n  %(prog)s api.json > api_stubs.py\n  %(prog)s api.json --blocking -o api_stubs.py",
    )
    t.add_argument("schema", metavar="SCHEMA.json")
    t.add_argument("-o", "--output", metavar="FILE.py", help="write here instead of standard output")
    t.add_argument(
        "--blocking",
        action="store_true",
        help="also declare each interface's blocking form (NameBlocking, for xrpc.blocking proxies)",
    )

    c = sub.add_parser(
        "check",
        help="report compatible and breaking changes between two schemas",
        formatter_class=raw,
        description="Compare OLD and NEW schemas.  Each change is judged for an old client calling a new server\n"
        "(backward, the default) and for a new client calling an old server (forward).\n"
        "Exit 1 if any change breaks the chosen direction.",
        epilog="examples:\n  %(prog)s v1.json v2.json\n  %(prog)s v1.json v2.json --json\n  %(prog)s v1.json v2.json --direction both",
    )
    c.add_argument("old", metavar="OLD.json")
    c.add_argument("new", metavar="NEW.json")
    c.add_argument("--json", action="store_true", help="print a JSON list of {interface, method, change, verdict, reason, ...}")
    c.add_argument(
        "--direction",
        choices=("backward", "forward", "both"),
        default="backward",
        help="backward: old client -> new server (default); forward: new client -> old server; both",
    )
    return p


def _write(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    try:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise CodegenError(f"{output}: cannot write: {exc.strerror or exc}") from None


def _schema(args: argparse.Namespace) -> int:
    classes: list[type] = []
    for target in args.targets:
        for cls in load_targets(target):
            if cls not in classes:
                classes.append(cls)
    doc = build_schema(classes)
    _write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", args.output)
    return EXIT_OK


def _stubs(args: argparse.Namespace) -> int:
    doc = load_schema(args.schema)
    _write(render_stubs(doc, os.path.basename(args.schema), blocking=args.blocking), args.output)
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    direction: Direction = args.direction
    changes = compare(load_schema(args.old), load_schema(args.new))
    breaking = has_breaking(changes, direction)
    if args.json:
        sys.stdout.write(json.dumps([c.to_dict(direction) for c in changes], indent=2, ensure_ascii=False) + "\n")
    else:
        lines = []
        for c in changes:
            where = c.interface + (f".{c.method}" if c.method else "")
            lines.append(f"{c.verdict(direction).upper() if not c.ok(direction) else c.verdict(direction):<11} {where}: {c.change}")
            lines.append(f"{'':<11} {c.reason(direction)}")
        n_break = sum(not c.ok(direction) for c in changes)
        if changes:
            lines.append(f"{len(changes)} change{'s' if len(changes) != 1 else ''}, {n_break} breaking ({DIRECTION_TEXT[direction]})")
        else:
            lines.append(f"no changes ({DIRECTION_TEXT[direction]})")
        sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_BREAKING if breaking else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "schema":
            return _schema(args)
        if args.command == "stubs":
            return _stubs(args)
        return _check(args)
    except CodegenError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        # never let a crash look like "breaking changes found" (exit 1) to a CI job
        traceback.print_exc()
        print(f"{parser.prog} {args.command}: internal error (see the traceback above)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
