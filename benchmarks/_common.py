"""Shared pieces for the benchmark servers, clients and runner.

Nothing here imports a peer library: the runner process imports this module too and stays clean.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import threading
import time
from typing import Any, Awaitable, Callable, TypeVar

MIB = 1 << 20

WORKLOADS: tuple[str, ...] = ("latency", "inflight", "stream", "bytes", "connect", "idle-memory")


@dataclasses.dataclass(frozen=True)
class WorkloadInfo:
    name: str
    label: str
    unit: str
    better: str  # "lower" or "higher"
    description: str


WORKLOAD_INFO: dict[str, WorkloadInfo] = {
    "latency": WorkloadInfo(
        "latency", "latency: sequential add(a,b)", "µs", "lower",
        "median (and p99) round trip of one small call, one call at a time, after a warm-up",
    ),
    "inflight": WorkloadInfo(
        "inflight", "inflight: 64 concurrent add(a,b)", "calls/s", "higher",
        "throughput with 64 calls kept outstanding (64 coroutines on one connection; 64 threads with a "
        "connection each for the blocking peers)",
    ),
    "stream": WorkloadInfo(
        "stream", "stream: server stream of small structs", "items/s", "higher",
        "items per second of one server stream of small [int, float, str] records",
    ),
    "bytes": WorkloadInfo(
        "bytes", "bytes: 1 MiB echo", "MiB/s", "higher",
        "MiB of payload echoed per second (each MiB crosses the socket twice)",
    ),
    "connect": WorkloadInfo(
        "connect", "connect: set-up + first call", "ms", "lower",
        "median time to open a new connection and complete the first add(a,b)",
    ),
    "idle-memory": WorkloadInfo(
        "idle-memory", "idle-memory: server RSS per idle connection", "KiB/conn", "lower",
        "growth of the server's resident memory per open idle connection (each made one call first)",
    ),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Counts and time caps of every measurement; each one stops at whichever comes first."""

    latency_warmup: int
    latency_calls: int
    latency_time: float
    inflight: int
    inflight_warmup_time: float
    inflight_time: float
    inflight_max: int
    stream_n: int
    stream_min_time: float
    stream_time: float
    bytes_size: int
    bytes_iters: int
    bytes_time: float
    connect_reps: int
    connect_time: float
    idle_conns: int
    idle_time: float


MODES: dict[str, Sizes] = {
    "full": Sizes(
        latency_warmup=500, latency_calls=50_000, latency_time=4.0,
        inflight=64, inflight_warmup_time=0.3, inflight_time=4.0, inflight_max=400_000,
        stream_n=100_000, stream_min_time=1.0, stream_time=20.0,
        bytes_size=MIB, bytes_iters=500, bytes_time=4.0,
        connect_reps=1000, connect_time=4.0,
        idle_conns=1000, idle_time=60.0,
    ),
    "quick": Sizes(
        latency_warmup=200, latency_calls=10_000, latency_time=1.0,
        inflight=64, inflight_warmup_time=0.15, inflight_time=1.0, inflight_max=200_000,
        stream_n=20_000, stream_min_time=0.3, stream_time=4.0,
        bytes_size=MIB, bytes_iters=200, bytes_time=1.0,
        connect_reps=60, connect_time=1.0,
        idle_conns=200, idle_time=15.0,
    ),
    "tiny": Sizes(
        latency_warmup=10, latency_calls=50, latency_time=0.3,
        inflight=64, inflight_warmup_time=0.05, inflight_time=0.2, inflight_max=5_000,
        stream_n=500, stream_min_time=0.0, stream_time=2.0,
        bytes_size=MIB, bytes_iters=3, bytes_time=0.5,
        connect_reps=3, connect_time=0.5,
        idle_conns=10, idle_time=10.0,
    ),
}


def client_time_budget(sizes: Sizes, workload: str) -> float:
    """Generous wall-clock limit for one client process running ``workload``."""
    base = {
        "latency": sizes.latency_time * 2,
        "inflight": (sizes.inflight_time + sizes.inflight_warmup_time) * 2,
        "stream": sizes.stream_time * 2,
        "bytes": sizes.bytes_time * 2,
        "connect": sizes.connect_time * 2,
        "idle-memory": sizes.idle_time * 2,
    }[workload]
    return base + 30.0


# --------------------------------------------------------------------------------------------------
# process hygiene


def raise_nofile_limit() -> tuple[int, int] | None:
    """Raise RLIMIT_NOFILE's soft limit up to the hard limit; return (soft, hard) after."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, hard
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def install_watchdog(*, watch_stdin: bool, deadline: float | None = None) -> None:
    """End this process when the runner goes away (stdin EOF / reparenting) or past ``deadline`` s."""
    parent = os.getppid()

    def on_stdin() -> None:
        # os.read on the raw descriptor: a daemon thread blocked inside sys.stdin's buffered reader
        # would abort interpreter shutdown.
        try:
            fd = sys.stdin.fileno()
            while os.read(fd, 65536):
                pass
        except (OSError, ValueError):
            pass
        os._exit(0)

    def on_parent() -> None:
        started = time.monotonic()
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)
            if deadline is not None and time.monotonic() - started > deadline:
                sys.stderr.write(f"watchdog: gave up after {deadline:.0f} s\n")
                sys.stderr.flush()
                os._exit(3)

    if watch_stdin:
        threading.Thread(target=on_stdin, name="stdin-watch", daemon=True).start()
    threading.Thread(target=on_parent, name="parent-watch", daemon=True).start()


def announce(url: str, **info: Any) -> None:
    """Print the ready line that the runner waits for."""
    sys.stdout.write(json.dumps({"ready": True, "url": url, "pid": os.getpid(), "info": info}) + "\n")
    sys.stdout.flush()


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes, from /proc or psutil."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------
# event loops

T = TypeVar("T")


def uvloop_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


def run_async(main: Callable[[], Awaitable[T]], loop: str) -> T:
    """Run ``main()`` on the named loop ("asyncio" or "uvloop")."""

    async def wrapper() -> T:
        return await main()

    if loop == "uvloop":
        import uvloop

        if sys.version_info >= (3, 11):
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(wrapper())
        uvloop.install()  # pragma: no cover - 3.10 only
    elif loop != "asyncio":
        raise ValueError(f"unknown loop {loop!r}")
    return asyncio.run(wrapper())


# --------------------------------------------------------------------------------------------------
# statistics


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return percentile(sorted(values), 0.5)
