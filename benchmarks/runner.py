"""The orchestrator behind ``python -m benchmarks``.

For every (workload, system) pair it starts a fresh server process, runs one client process against
it and collects the client's JSON result; this process itself imports no peer library.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from ._common import MODES, WORKLOAD_INFO, WORKLOADS, Sizes, client_time_budget
from .systems import BASELINE, FLOORS, SYSTEMS

ROOT = Path(__file__).resolve().parent.parent
SERVER_READY_TIMEOUT = 30.0
PROBE_TIMEOUT = 120.0


# --------------------------------------------------------------------------------------------------
# subprocesses


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    return env


def _tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-limit:]


class ServerProcess:
    """A benchmark server subprocess; stops when ``stop()`` is called or this process exits."""

    def __init__(self, system: str, workdir: Path, loop: str, max_conns: int) -> None:
        self.system = system
        self.stderr_path = workdir / f"{system}.server.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.server", "--system", system, "--dir", str(workdir),
             "--loop", loop, "--max-conns", str(max_conns)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            cwd=str(ROOT), env=_child_env(),
        )
        self.url: str | None = None
        self.pid: int = self.proc.pid
        self.info: dict[str, Any] = {}

    def wait_ready(self, timeout: float = SERVER_READY_TIMEOUT) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"server not ready after {timeout:.0f} s")
                if not sel.select(left):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise RuntimeError(
                        f"server exited with code {self.proc.returncode}: {_tail(self.stderr_path)}"
                    )
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(msg, dict) and msg.get("ready"):
                        self.url = msg["url"]
                        self.pid = int(msg.get("pid", self.proc.pid))
                        self.info = dict(msg.get("info") or {})
                        return

    def stop(self) -> None:
        proc = self.proc
        try:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            self._stderr.close()


def run_client(system: str, workload: str, url: str, mode: str, loop: str, server_pid: int) -> dict[str, Any]:
    timeout = client_time_budget(MODES[mode], workload) + 15.0
    cmd = [sys.executable, "-m", "benchmarks.client", "--system", system, "--workload", workload,
           "--url", url, "--mode", mode, "--loop", loop, "--server-pid", str(server_pid)]
    try:
        cp = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, cwd=str(ROOT),
            env=_child_env(),
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"client timed out after {timeout:.0f} s"}
    out = cp.stdout.decode(errors="replace")
    err_text = cp.stderr.decode(errors="replace").strip()
    res: dict[str, Any] | None = None
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and "status" in msg:
                res = msg
                break
    if res is None:
        err = err_text.splitlines()
        res = {"status": "error", "error": f"client exited {cp.returncode}: {' | '.join(err[-3:])[-600:]}"}
    if res.get("status") != "ok" and err_text:
        res["stderr_tail"] = err_text[-4000:]
    return res


def probe(systems: Sequence[str], loop: str) -> dict[str, dict[str, Any]]:
    """Ask one probe subprocess per system (all at once) whether it can run, with a timeout."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    out: dict[str, dict[str, Any]] = {}
    try:
        for s in systems:
            procs[s] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.probe", "--systems", s, "--loop", loop],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=str(ROOT), env=_child_env(),
            )
        deadline = time.monotonic() + PROBE_TIMEOUT
        for s, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                out[s] = {"status": "not available", "reason": f"not available: probe timed out after {PROBE_TIMEOUT:.0f} s"}
                continue
            lines = [ln for ln in stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
            try:
                out[s] = json.loads(lines[-1])[s]
            except (IndexError, ValueError, KeyError):
                why = " | ".join(stderr.decode(errors="replace").strip().splitlines()[-2:])[-300:]
                out[s] = {"status": "not available", "reason": f"not available: probe exited {proc.returncode}: {why}"}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


# --------------------------------------------------------------------------------------------------
# progress


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.n = 0
        self.bar: Any = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True, leave=False)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(label)
        elif self.enabled:
            sys.stderr.write(f"[{self.n + 1}/{self.total}] {label} ...\n")
            sys.stderr.flush()

    def done(self, label: str, summary: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(summary, refresh=True)
        elif self.enabled:
            sys.stderr.write(f"[{self.n}/{self.total}] {label}: {summary}\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------
# formatting


def fmt_number(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "?"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_ratio(r: float | None) -> str:
    if r is None or not math.isfinite(r):
        return "—"
    if r >= 100:
        return f"{r:.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    return f"{r:.2f}×"


def cost_ratio(value: float | None, base: float | None, better: str) -> float | None:
    """How many times raw-asyncio's cost: above 1 is slower (or heavier) than the floor."""
    if value is None or base is None or not math.isfinite(value) or not math.isfinite(base):
        return None
    if value <= 0 or base <= 0:
        return None
    return value / base if better == "lower" else base / value


def cell_text(res: dict[str, Any] | None) -> str:
    if res is None:
        return "—"
    status = res.get("status")
    if status != "ok":
        return {"n/a": "n/a", "error": "error", "not installed": "not installed",
                "not available": "not available"}.get(str(status), str(status))
    unit = res.get("unit", "")
    text = f"{fmt_number(res['value'])} {unit}"
    if res.get("workload") == "latency" and "p99_us" in res.get("detail", {}):
        text = f"{text}, p99 {fmt_number(res['detail']['p99_us'])} {unit}"
    if res.get("partial"):
        text += "*"
    return f"{text} ({fmt_ratio(res.get('ratio'))})"


def render_table(report: dict[str, Any]) -> str:
    systems: list[str] = list(report["systems"])
    workloads: list[str] = list(report["workloads"])
    header = ["workload (unit)", *systems]
    rows = [header, ["---"] + ["---:"] * len(systems)]
    status_row = ["status"]
    for s in systems:
        st = report["systems"][s]
        reason = str(st.get("reason", st["status"]))
        status_row.append("ok" if st["status"] == "ok" else reason if len(reason) <= 90 else reason[:87] + "...")
    rows.append(status_row)
    for w in workloads:
        info = report["workloads"][w]
        arrow = "lower is better" if info["better"] == "lower" else "higher is better"
        label = f"{w} ({info['unit']}, {arrow})"
        row = [label]
        for s in systems:
            row.append(cell_text(report["results"].get(s, {}).get(w)))
        rows.append(row)
    return "\n".join("| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows)


def render_floor_table(report: dict[str, Any]) -> str:
    """One row per (workload, floor that ran it): every system's cost relative to that floor."""
    systems: list[str] = list(report["systems"])
    rows = [["workload ÷ floor", *systems], ["---"] + ["---:"] * len(systems)]
    for w in report["workloads"]:
        for floor in report["floors"].get(w, []):
            row = [f"{w} ÷ {floor}"]
            for s in systems:
                res = report["results"].get(s, {}).get(w) or {}
                row.append(fmt_ratio((res.get("ratios") or {}).get(floor)) if res.get("status") == "ok" else "—")
            rows.append(row)
    if len(rows) == 2:
        return ""
    return "\n".join("| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows)


def render_notes(report: dict[str, Any]) -> list[str]:
    notes: list[str] = []
    meta = report["meta"]
    notes.append(
        f"Mode `{meta['mode']}` on {meta['cpus']} CPU(s), Python {meta['python']}, {meta['platform']}; "
        f"took {meta['seconds']:.0f} s."
    )
    notes.append(
        "Cells show the measured number and, in brackets, the cost relative to raw-asyncio in the same "
        "run (time per operation, or memory, divided by raw-asyncio's): 1.00× is the floor, 2.00× is "
        "twice as slow or heavy."
    )
    if BASELINE not in report["systems"] or report["systems"][BASELINE]["status"] != "ok":
        notes.append(f"No ratios: {BASELINE} was not part of this run.")
    sz = meta["sizes"]
    if report.get("floor_table"):
        notes.append(
            "The second table gives every system's cost relative to each floor that ran the workload "
            "(" + ", ".join(f for f in FLOORS if any(f in fl for fl in report["floors"].values())) + "), "
            "computed the same way; blocking-socket runs only the 1 MiB echo."
        )
    if meta["loop_option"] == "uvloop":
        notes.append(
            "--loop uvloop: the xrpc systems ran on uvloop; raw-uvloop is their like-for-like floor "
            "(the first table still divides by raw-asyncio, the second by each floor)."
        )
    if sz["stream_n"] != 100_000 and "stream" in report["workloads"]:
        notes.append(
            f"stream: {sz['stream_n']:,} items per stream in this mode (full mode: 100,000); streams are "
            "repeated until a minimum time has passed."
        )
    if sz["idle_conns"] != 1000 and "idle-memory" in report["workloads"]:
        notes.append(f"idle-memory: {sz['idle_conns']:,} idle connections in this mode (full mode: 1,000).")
    for s, st in report["systems"].items():
        if st["status"] != "ok":
            notes.append(f"{s}: skipped, {st.get('reason', st['status'])}.")
    loops = []
    for s, st in report["systems"].items():
        lp = (st.get("info") or {}).get("loop")
        if st["status"] == "ok" and lp:
            loops.append(f"{s}: {lp}")
    if loops:
        notes.append("Event loops: " + ", ".join(loops) + ".")
    cores = [f"{s}: {st['info']['core']}" for s, st in report["systems"].items() if st["status"] == "ok" and (st.get("info") or {}).get("core")]
    if cores:
        notes.append("xrpc protocol core (compiled: `XRPC_COMPILE=1 pip install .`): " + ", ".join(cores) + ".")
    pyro = report["systems"].get("pyro5")
    if pyro and pyro["status"] == "ok":
        ser = (pyro.get("info") or {}).get("serializer", "?")
        extra = "" if ser == "msgpack" else " (msgpack is used when the `msgpack` package is installed)"
        notes.append(
            f"pyro5: serializer {ser}{extra}; thread-pool server with THREADPOOL_SIZE raised above the "
            "idle connection count; stream uses Pyro5 item streaming "
            "(one round trip per item); inflight uses 64 threads with one proxy each."
        )
    if "rpyc" in report["systems"] and report["systems"]["rpyc"]["status"] == "ok":
        notes.append(
            "rpyc: ThreadedServer; remote methods looked up once per connection; stream iterates a remote "
            "generator (one round trip per item); inflight uses 64 threads with one connection each."
        )
    if "grpc-aio" in report["systems"] and report["systems"]["grpc-aio"]["status"] == "ok":
        notes.append(
            "grpc-aio: generic handlers with msgspec msgpack (de)serializers; every channel uses a local "
            "subchannel pool so it opens its own connection; inflight multiplexes 64 calls on one channel."
        )
    if "pycapnp" in report["systems"] and report["systems"]["pycapnp"]["status"] == "ok":
        notes.append(
            "pycapnp: Cap'n Proto RPC inside capnp.kj_loop() on asyncio, one TwoPartyServer per connection; "
            "stream is a Sink capability the server pushes one record into per call (`-> stream`; pycapnp "
            "sends these as plain calls, so the server keeps up to 64 pushes outstanding); inflight "
            "multiplexes 64 calls on one connection."
        )
    if "thriftpy2" in report["systems"] and report["systems"]["thriftpy2"]["status"] == "ok":
        notes.append(
            "thriftpy2: contrib.aio client and server, binary protocol, buffered transport; a connection "
            "carries one call at a time, so inflight uses 64 connections in one event loop; Thrift has no "
            "streams, so stream is one call returning a list of all the records."
        )
    if "blocking-socket" in report["systems"]:
        notes.append("blocking-socket measures only the 1 MiB echo (the server echoes frames undecoded).")
    for s, per in report["results"].items():
        for w, res in per.items():
            if res.get("status") == "error":
                notes.append(f"{s} / {w}: error: {res.get('error', '?')}")
            elif res.get("partial") and res.get("note"):
                notes.append(f"{s} / {w}*: {res['note']}.")
    return notes


# --------------------------------------------------------------------------------------------------
# plot


def write_plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in report["systems"] if report["systems"][s]["status"] == "ok"]
    workloads = list(report["workloads"])
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * len(workloads) + 2), 5.0))
    any_bar = False
    for k, s in enumerate(systems):
        xs, ys = [], []
        for j, w in enumerate(workloads):
            r = report["results"].get(s, {}).get(w, {}).get("ratio")
            if r is not None and math.isfinite(r) and r > 0:
                xs.append(j - 0.4 + width * (k + 0.5))
                ys.append(r)
        if xs:
            ax.bar(xs, ys, width=width, label=s)
            any_bar = True
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads)
    if any_bar:
        ax.set_yscale("log")
        ax.legend(fontsize="small", ncol=2)
    ax.set_ylabel("cost vs raw-asyncio (×, lower is better)")
    ax.set_title(f"xrpc benchmarks ({report['meta']['mode']} mode)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# main


def _split(value: str | None, allowed: Iterable[str], what: str) -> list[str]:
    allowed = list(allowed)
    if not value:
        return allowed
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return [n for n in allowed if n in names]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run every workload against every installed RPC system and print a markdown table.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="smaller counts and shorter caps (under 2 minutes)")
    mode.add_argument("--tiny", action="store_const", dest="mode", const="tiny",
                      help="smoke-test sizes; the numbers mean nothing")
    p.set_defaults(mode="full")
    p.add_argument("--systems", help=f"comma-separated subset of: {', '.join(SYSTEMS)}")
    p.add_argument("--workloads", help=f"comma-separated subset of: {', '.join((*WORKLOADS, WORKERS))} "
                                       "(workers: the multi-worker xrpc server, with xrpc-unix)")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="event loop for the xrpc systems (raw-asyncio/raw-uvloop have theirs fixed)")
    p.add_argument("--json", metavar="FILE", help="write the full results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the ratios (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return p.parse_args(argv)


def run(opts: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    systems = _split(opts.systems, SYSTEMS, "systems")
    workloads = _split(opts.workloads, (*WORKLOADS, WORKERS), "workloads")
    with_workers = WORKERS in workloads and "xrpc-unix" in systems
    workloads = [w for w in workloads if w != WORKERS]
    sizes: Sizes = MODES[opts.mode]
    availability = probe(systems, opts.loop)

    report: dict[str, Any] = {
        "meta": {
            "mode": opts.mode,
            "loop_option": opts.loop,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(terse=True),
            "cpus": os.cpu_count(),
            "sizes": {k: getattr(sizes, k) for k in sizes.__dataclass_fields__},
            "baseline": BASELINE,
        },
        "systems": {},
        "workloads": {
            w: {"unit": WORKLOAD_INFO[w].unit, "better": WORKLOAD_INFO[w].better,
                "label": WORKLOAD_INFO[w].label, "description": WORKLOAD_INFO[w].description}
            for w in workloads
        },
        "results": {s: {} for s in systems},
    }
    for s in systems:
        spec = SYSTEMS[s]
        st = dict(availability.get(s) or {"status": "not available", "reason": "not probed"})
        st["description"] = spec.description
        st["transport"] = spec.transport
        report["systems"][s] = st

    plan: list[tuple[str, str]] = []
    for w in workloads:
        for s in systems:
            st = report["systems"][s]
            if st["status"] != "ok":
                report["results"][s][w] = {"status": st["status"], "workload": w}
            elif w not in SYSTEMS[s].workloads:
                report["results"][s][w] = {"status": "n/a", "workload": w}
            else:
                plan.append((w, s))

    progress = _Progress(len(plan), enabled=not opts.no_progress)
    workdir = Path(tempfile.mkdtemp(prefix="xrpc-bench-"))
    try:
        for k, (w, s) in enumerate(plan):
            label = f"{w} · {s}"
            progress.start(label)
            celldir = workdir / f"{k:02d}"
            celldir.mkdir()
            res = _run_cell(s, w, opts.mode, opts.loop, sizes, celldir)
            res["workload"] = w
            report["results"][s][w] = res
            if res.get("status") == "ok":
                summary = f"{fmt_number(res['value'])} {res.get('unit', '')}"
                # the server may know facts the probe did not (e.g. the serializer it really uses)
                for k, v in (res.get("server_info") or {}).items():
                    report["systems"][s].setdefault("info", {}).setdefault(k, v)
            else:
                summary = str(res.get("error", res.get("status")))[:60]
            progress.done(label, summary)
    finally:
        progress.close()
        shutil.rmtree(workdir, ignore_errors=True)

    report["floors"] = {}
    for w in workloads:
        better = WORKLOAD_INFO[w].better
        base = report["results"].get(BASELINE, {}).get(w, {})
        base_v = base.get("value") if base.get("status") == "ok" else None
        floors = {
            f: report["results"][f][w]["value"]
            for f in FLOORS
            if f in report["results"] and report["results"][f].get(w, {}).get("status") == "ok"
        }
        report["floors"][w] = list(floors)
        for s in systems:
            res = report["results"][s][w]
            if res.get("status") == "ok":
                res["ratio"] = cost_ratio(res.get("value"), base_v, better)
                res["ratios"] = {f: cost_ratio(res.get("value"), v, better) for f, v in floors.items()}
    if with_workers and report["systems"]["xrpc-unix"]["status"] == "ok":
        report["workers"] = run_workers(opts.mode, not opts.no_progress)
    report["meta"]["seconds"] = time.monotonic() - started
    report["table"] = render_table(report)
    report["floor_table"] = render_floor_table(report)
    report["workers_table"] = render_workers(report.get("workers"))
    report["notes"] = render_notes(report)
    return report


# --------------------------------------------------------------------------------------------------
# the multi-worker server (xrpc only)

WORKERS = "workers"
WORKER_COUNTS = (1, 2)
# rounds per worker count (alternating), seconds a round, warm-up seconds
WORKER_ROUNDS = {"full": (3, 3.0, 1.0), "quick": (1, 1.5, 0.5), "tiny": (1, 0.3, 0.1)}


def run_workers(mode: str, progress: bool) -> dict[str, Any]:
    """Calls/s of an xrpc server with 1 and with 2 worker processes under 4 client processes
    (``benchmarks.workers``: pipelined load generators, 64 calls in flight each, unix socket)."""
    from . import workers as wk

    rounds, seconds, warmup = WORKER_ROUNDS[mode]
    args = argparse.Namespace(client="pipelined", clients=wk.CLIENTS, connections=1, seconds=seconds, warmup=warmup)
    rates: dict[int, list[float]] = {w: [] for w in WORKER_COUNTS}
    cpu: dict[int, list[float]] = {w: [] for w in WORKER_COUNTS}
    directory = tempfile.mkdtemp(prefix="xrpc-bench-")
    try:
        for k in range(rounds):  # alternating, so that a change in the machine's load hits both
            for w in WORKER_COUNTS:
                if progress:
                    sys.stderr.write(f"workers · {w} worker(s), round {k + 1} of {rounds}\n")
                r = wk.one_round(f"unix://{directory}/w{w}-{k}.sock", w, args)
                rates[w].append(r["rate"])
                cpu[w].append(r["server_us"])
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a failed round is reported, not raised
        return {"status": "error", "error": f"{type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    median = {w: _median(v) for w, v in rates.items()}
    return {
        "status": "ok",
        "clients": wk.CLIENTS,
        "inflight": wk.INFLIGHT,
        "rounds": rounds,
        "seconds": seconds,
        "rates": {str(w): v for w, v in rates.items()},
        "median": {str(w): v for w, v in median.items()},
        "server_cpu_us": {str(w): _median(v) for w, v in cpu.items()},
        "ratio": median[WORKER_COUNTS[-1]] / median[WORKER_COUNTS[0]] if median[WORKER_COUNTS[0]] else None,
    }


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def render_workers(res: dict[str, Any] | None) -> str:
    if not res:
        return ""
    if res.get("status") != "ok":
        return f"Multi-worker server: not measured ({res.get('error')})."
    lines = [
        f"Multi-worker server (xrpc-unix): {res['clients']} client processes x {res['inflight']} calls in flight, "
        f"median of {res['rounds']} round(s) of {res['seconds']:g} s per worker count:",
        "",
        "| workers | calls/s | server CPU µs/call | ratio to 1 worker |",
        "|---:|---:|---:|---:|",
    ]
    base = res["median"][str(WORKER_COUNTS[0])]
    for w in WORKER_COUNTS:
        m = res["median"][str(w)]
        lines.append(f"| {w} | {fmt_number(m)} | {res['server_cpu_us'][str(w)]:.1f} | {m / base:.2f}× |" if base else f"| {w} | {fmt_number(m)} | | |")
    return "\n".join(lines)


def _run_cell(system: str, workload: str, mode: str, loop: str, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    spec = SYSTEMS[system]
    srv_loop = spec.loop if spec.loop in ("asyncio", "uvloop") else loop
    server = ServerProcess(system, workdir, srv_loop, max_conns=sizes.idle_conns + 64)
    try:
        try:
            server.wait_ready()
        except Exception as e:  # noqa: BLE001
            return {"status": "error", "error": f"server: {e}"}
        assert server.url is not None
        res = run_client(system, workload, server.url, mode, srv_loop, server.pid)
        res["server_info"] = server.info
        if res.get("status") != "ok" and server.proc.poll() is not None:
            res["error"] = f"{res.get('error')}; server exited: {_tail(server.stderr_path)}"
        return res
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib)")
    report = run(opts)
    out = [report["table"], ""]
    if report["floor_table"]:
        out += ["Cost relative to each floor:", "", report["floor_table"], ""]
    if report["workers_table"]:
        out += [report["workers_table"], ""]
    out += ["Notes:", ""]
    out += [f"- {n}" for n in report["notes"]]
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
            f.write("\n")
    if opts.plot:
        write_plot(report, opts.plot)
    return 0
