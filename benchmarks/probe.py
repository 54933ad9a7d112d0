"""Availability probe: ``python -m benchmarks.probe --systems a,b --loop L`` prints one JSON object.

For each system: ``{"status": "ok", "info": {...}}``, ``{"status": "not installed", "reason": ...}``
or ``{"status": "not available", "reason": ...}``.  Run as a subprocess so that the runner never
imports a peer library.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import types
from typing import Any

from .systems import SYSTEMS


def probe_system(name: str, loop: str) -> dict[str, Any]:
    spec = SYSTEMS[name]
    missing = [m for m in spec.requires if importlib.util.find_spec(m) is None]
    eff_loop = spec.loop if spec.loop in ("asyncio", "uvloop") else loop
    if spec.loop == "option" and loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        missing.append("uvloop")
    if missing:
        return {"status": "not installed", "reason": "not installed: " + ", ".join(missing)}
    opts = types.SimpleNamespace(system=name, spec=spec, loop=eff_loop, transport=spec.transport)
    try:
        module = importlib.import_module(spec.module)
        info = module.probe(opts)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"status": "not available", "reason": f"not available: {type(e).__name__}: {msg}".rstrip(": ")}
    if spec.loop is not None:
        info.setdefault("loop", eff_loop)
    return {"status": "ok", "info": info}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"))
    opts = p.parse_args(argv)
    out = {name: probe_system(name, opts.loop) for name in opts.systems.split(",") if name}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
