"""``python -m xrpc``: the xrpc command line (``xrpc inspect | call | list | serve``, see ``docs/cli.md``)."""

import sys

from ._cli import main

__all__ = ("main",)

if __name__ == "__main__":
    sys.exit(main())
