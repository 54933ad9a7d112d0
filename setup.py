"""Build script: pyproject.toml holds the metadata; this only adds the optional compiled core.

``pip install .`` builds the pure-Python package (no compiler needed).  ``XRPC_COMPILE=1 pip install .``
compiles the sans-IO protocol core (``xrpc/_protocol/_core.py``) with mypyc into a C extension that
is imported in place of the source; ``xrpc._protocol.COMPILED`` tells which is in use.  The compiled
build needs a C compiler and the Python headers; mypy (which ships mypyc) and the runtime
dependencies are fetched into the build environment.  It is for regular installs: an editable install (``pip install -e .``) stays pure
Python, since its extension would land in the source tree and shadow the sources.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import setup

# The modules compiled.  ``_frames.py`` stays Python: its classes are msgspec Structs, whose work is
# C already, and mypyc would build them without their class keywords (array_like, tag, frozen), which
# changes the wire format (a CALL would go out as a map).
COMPILED = ["xrpc/_protocol/_core.py"]
# What the compiled build needs: mypyc (part of mypy), and the runtime dependencies so that mypy
# sees their types while it compiles (as it does when it checks the package).
BUILD_REQUIRES = ["mypy>=1.10", "anyio>=4.4", "msgspec>=0.18.6", "typing-extensions>=4.10"]


def _compile() -> bool:
    value = os.environ.get("XRPC_COMPILE", "").strip().lower()
    if value in ("", "0", "no", "false", "off"):
        return False
    if "editable_wheel" in sys.argv or "develop" in sys.argv:
        raise SystemExit("XRPC_COMPILE: the compiled core needs a regular install (pip install .), not an editable one")
    return True


kwargs: dict[str, Any] = {}
if _compile():
    try:
        from mypyc.build import mypycify
    except ImportError:
        # asked for the build's requirements (PEP 517): setuptools reports setup_requires as such
        kwargs["setup_requires"] = BUILD_REQUIRES
    else:
        kwargs["ext_modules"] = mypycify(
            # the rest of the package is only read for its types (mypy checks it on its own)
            ["--follow-imports=silent", *COMPILED],
            opt_level="3",
            debug_level="0",
        )

setup(**kwargs)
