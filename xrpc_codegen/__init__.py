"""``codegen`` under its installed name: ``import xrpc_codegen`` is ``import codegen``.

The code lives in the project's ``codegen/`` folder; this package only re-exports it, so an editable
install stays a plain path entry that type checkers follow.
"""

from codegen import *  # noqa: F403
from codegen import __all__ as __all__
