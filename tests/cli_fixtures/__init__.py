"""Modules the ``xrpc`` command-line tests import (``tests/test_cli.py``)."""
