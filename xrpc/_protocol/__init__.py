"""The sans-IO core of xrpc: wire messages and the protocol state machine (no I/O here)."""

from importlib.machinery import EXTENSION_SUFFIXES as _EXTENSION_SUFFIXES

from . import _core, _frames
from ._core import *  # noqa: F403
from ._frames import *  # noqa: F403

__all__: list[str] = []
__all__ += _core.__all__
__all__ += _frames.__all__

# True when the protocol core was compiled to a C extension (``XRPC_COMPILE=1 pip install .``),
# False for the pure-Python package.
COMPILED: bool = _core.__file__.endswith(tuple(_EXTENSION_SUFFIXES))
