"""Server process: ``python -m benchmarks.server --system NAME --dir TMPDIR [--loop L]``.

Prints one JSON ready line (``{"ready": true, "url": ..., "pid": ...}``) on stdout, then serves
until its stdin reaches EOF (the runner closed it or went away).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._common import install_watchdog, raise_nofile_limit
from .systems import SYSTEMS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.server")
    p.add_argument("--system", required=True, choices=sorted(SYSTEMS))
    p.add_argument("--dir", required=True, help="directory for unix sockets")
    p.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"))
    p.add_argument("--max-conns", type=int, default=1200)
    opts = p.parse_args(argv)
    spec = SYSTEMS[opts.system]
    opts.spec = spec
    opts.transport = spec.transport
    if spec.loop in ("asyncio", "uvloop"):
        opts.loop = spec.loop
    install_watchdog(watch_stdin=True)
    raise_nofile_limit()
    module = importlib.import_module(spec.module)
    module.serve(opts)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
