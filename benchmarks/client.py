"""Client process: runs one workload against a running server and prints the result as JSON.

``python -m benchmarks.client --system NAME --workload W --url URL --mode quick --server-pid PID``
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from typing import Any

from ._common import MODES, WORKLOADS, client_time_budget, install_watchdog, raise_nofile_limit, run_async
from .systems import SYSTEMS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.client")
    p.add_argument("--system", required=True, choices=sorted(SYSTEMS))
    p.add_argument("--workload", required=True, choices=WORKLOADS)
    p.add_argument("--url", required=True)
    p.add_argument("--mode", default="quick", choices=sorted(MODES))
    p.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"))
    p.add_argument("--server-pid", type=int, default=None)
    opts = p.parse_args(argv)
    spec = SYSTEMS[opts.system]
    opts.spec = spec
    opts.transport = spec.transport
    if spec.loop in ("asyncio", "uvloop"):
        opts.loop = spec.loop
    sizes = MODES[opts.mode]
    install_watchdog(watch_stdin=False, deadline=client_time_budget(sizes, opts.workload))
    limits = raise_nofile_limit()

    out: dict[str, Any] = {"system": opts.system, "workload": opts.workload}
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(spec.module)
        adapter = module.client(opts)
        from . import workloads

        if adapter.is_async:
            loop = opts.loop if spec.loop is not None else "asyncio"

            async def measure() -> dict[str, Any]:
                # an adapter may need a context around its whole run (pycapnp: its KJ loop)
                context = getattr(adapter, "loop_context", None)
                if context is None:
                    return await workloads.run_async(adapter, opts.workload, sizes, opts.server_pid)
                async with context():
                    return await workloads.run_async(adapter, opts.workload, sizes, opts.server_pid)

            res = run_async(measure, loop)
        else:
            res = workloads.run_sync(adapter, opts.workload, sizes, opts.server_pid)
        out.update(status="ok", **res)
        out["info"] = dict(getattr(adapter, "info", {}))
    except Exception as e:  # noqa: BLE001 - the runner reports it
        out.update(status="error", error=f"{type(e).__name__}: {e}")
        traceback.print_exc()
    out["client_seconds"] = time.perf_counter() - t0
    if limits is not None:
        out.setdefault("info", {})["nofile"] = list(limits)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
