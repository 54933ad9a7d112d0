"""``python -m xrpc_codegen`` (installed: ``xrpc-codegen``): the command line of ``codegen``."""

import sys

from codegen.__main__ import main

__all__ = ("main",)

if __name__ == "__main__":
    sys.exit(main())
