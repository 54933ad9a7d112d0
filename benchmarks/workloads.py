"""The six workloads, written once against a small adapter interface.

Each system supplies an adapter, either asynchronous (``is_async = True``: every method is a
coroutine and the workloads run in one event loop) or blocking (``is_async = False``: plain methods,
concurrency through threads).  An adapter has::

    open() -> conn              # a fresh connection, ready to call
    close(conn)
    add(conn, a, b) -> int
    stream(conn, n, deadline) -> int    # items received; may stop early once perf_counter() > deadline
    echo(conn, data) -> bytes

and an ``info`` dict with anything worth reporting (library version, serializer, loop).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from ._common import MIB, Sizes, percentile, rss_bytes

Result = dict[str, Any]


class WorkloadError(RuntimeError):
    pass


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise WorkloadError(what)


# --------------------------------------------------------------------------------------------------
# results


def _latency_result(samples_ns: list[int], warmup: int) -> Result:
    s = sorted(x / 1000.0 for x in samples_ns)
    return {
        "value": percentile(s, 0.5),
        "unit": "µs",
        "detail": {
            "median_us": percentile(s, 0.5),
            "p99_us": percentile(s, 0.99),
            "p90_us": percentile(s, 0.90),
            "min_us": s[0],
            "calls": len(s),
            "warmup_calls": warmup,
        },
    }


def _rate(count: int, elapsed: float) -> float:
    return count / elapsed if elapsed > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# asynchronous adapters


async def run_async(adapter: Any, workload: str, sizes: Sizes, server_pid: int | None) -> Result:
    if workload == "latency":
        return await _a_latency(adapter, sizes)
    if workload == "inflight":
        return await _a_inflight(adapter, sizes)
    if workload == "stream":
        return await _a_stream(adapter, sizes)
    if workload == "bytes":
        return await _a_bytes(adapter, sizes)
    if workload == "connect":
        return await _a_connect(adapter, sizes)
    if workload == "idle-memory":
        return await _a_idle_memory(adapter, sizes, server_pid)
    raise ValueError(workload)


async def _a_latency(ad: Any, z: Sizes) -> Result:
    conn = await ad.open()
    try:
        for i in range(z.latency_warmup):
            _check(await ad.add(conn, i, 1) == i + 1, "wrong sum")
        samples: list[int] = []
        clock = time.perf_counter_ns
        deadline = clock() + int(z.latency_time * 1e9)
        for i in range(z.latency_calls):
            t0 = clock()
            r = await ad.add(conn, i, 7)
            t1 = clock()
            samples.append(t1 - t0)
            _check(r == i + 7, "wrong sum")
            if t1 > deadline:
                break
    finally:
        await ad.close(conn)
    return _latency_result(samples, z.latency_warmup)


async def _a_inflight(ad: Any, z: Sizes) -> Result:
    conn = await ad.open()
    done = 0

    async def worker(k: int, deadline: float, cap: int) -> None:
        nonlocal done
        i = 0
        while done < cap and time.perf_counter() < deadline:
            _check(await ad.add(conn, k, i) == k + i, "wrong sum")
            i += 1
            done += 1

    try:
        await asyncio.gather(
            *(worker(k, time.perf_counter() + z.inflight_warmup_time, z.inflight_max) for k in range(z.inflight))
        )
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + z.inflight_time
        await asyncio.gather(*(worker(k, deadline, z.inflight_max) for k in range(z.inflight)))
        elapsed = time.perf_counter() - t0
        # an adapter whose connection carries one call at a time pools several (thriftpy2)
        connections = ad.connections(conn) if hasattr(ad, "connections") else 1
    finally:
        await ad.close(conn)
    return {
        "value": _rate(done, elapsed),
        "unit": "calls/s",
        "detail": {"calls": done, "seconds": elapsed, "concurrency": z.inflight, "connections": connections},
    }


async def _a_stream(ad: Any, z: Sizes) -> Result:
    conn = await ad.open()
    try:
        warm = min(z.stream_n, 1000)
        _check(await ad.stream(conn, warm, time.perf_counter() + z.stream_time) == warm, "short warm-up stream")
        t0 = time.perf_counter()
        total = streams = 0
        while True:
            got = await ad.stream(conn, z.stream_n, t0 + z.stream_time)
            total += got
            streams += 1
            elapsed = time.perf_counter() - t0
            if _stream_enough(got, elapsed, streams, z):
                break
    finally:
        await ad.close(conn)
    return _stream_result(total, streams, elapsed, z)


def _stream_enough(got: int, elapsed: float, streams: int, z: Sizes) -> bool:
    """Stop after a cut-short stream, once past the minimum time, or before overrunning the cap."""
    if got < z.stream_n or elapsed >= z.stream_min_time:
        return True
    return elapsed + elapsed / streams > z.stream_time


def _stream_result(total: int, streams: int, elapsed: float, z: Sizes) -> Result:
    res: Result = {
        "value": _rate(total, elapsed),
        "unit": "items/s",
        "detail": {"items": total, "streams": streams, "items_per_stream": z.stream_n, "seconds": elapsed},
    }
    if total < z.stream_n:
        res["partial"] = True
        res["note"] = f"stopped at the {z.stream_time:g} s cap after {total:,} of {z.stream_n:,} items"
    return res


async def _a_bytes(ad: Any, z: Sizes) -> Result:
    data = os.urandom(z.bytes_size)
    conn = await ad.open()
    try:
        for _ in range(2):
            _check(await ad.echo(conn, data) == data, "echo mismatch")
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + z.bytes_time
        while n < z.bytes_iters:
            _check(len(await ad.echo(conn, data)) == z.bytes_size, "echo length mismatch")
            n += 1
            if time.perf_counter() > deadline:
                break
        elapsed = time.perf_counter() - t0
    finally:
        await ad.close(conn)
    return _bytes_result(n, elapsed, z)


def _bytes_result(n: int, elapsed: float, z: Sizes) -> Result:
    return {
        "value": _rate(n * z.bytes_size, elapsed) / MIB,
        "unit": "MiB/s",
        "detail": {"echoes": n, "size": z.bytes_size, "seconds": elapsed},
    }


async def _a_connect(ad: Any, z: Sizes) -> Result:
    conn = await ad.open()  # warm-up: lazy imports, first-time code paths
    _check(await ad.add(conn, 1, 2) == 3, "wrong sum")
    await ad.close(conn)
    samples: list[float] = []
    deadline = time.perf_counter() + z.connect_time
    for i in range(z.connect_reps):
        t0 = time.perf_counter()
        conn = await ad.open()
        r = await ad.add(conn, i, 2)
        t1 = time.perf_counter()
        await ad.close(conn)
        _check(r == i + 2, "wrong sum")
        samples.append((t1 - t0) * 1000.0)
        if t1 > deadline:
            break
    return _connect_result(samples)


def _connect_result(samples: list[float]) -> Result:
    s = sorted(samples)
    return {
        "value": percentile(s, 0.5),
        "unit": "ms",
        "detail": {"median_ms": percentile(s, 0.5), "p90_ms": percentile(s, 0.9), "min_ms": s[0], "connects": len(s)},
    }


async def _a_idle_memory(ad: Any, z: Sizes, pid: int | None) -> Result:
    _check(pid is not None, "no server pid")
    assert pid is not None
    conn = await ad.open()
    _check(await ad.add(conn, 1, 2) == 3, "wrong sum")
    await ad.close(conn)
    await asyncio.sleep(0.3)
    before = rss_bytes(pid)
    _check(before is not None, "cannot read the server's RSS (no /proc and no psutil)")
    conns: list[Any] = []
    deadline = time.perf_counter() + z.idle_time
    try:
        for i in range(z.idle_conns):
            c = await ad.open()
            conns.append(c)
            _check(await ad.add(c, i, 1) == i + 1, "wrong sum")
            if time.perf_counter() > deadline:
                break
        await asyncio.sleep(0.5)
        after = rss_bytes(pid)
    finally:
        for c in reversed(conns):
            try:
                await ad.close(c)
            except Exception:
                pass
    return _idle_result(before, after, len(conns), z)


def _idle_result(before: int | None, after: int | None, n: int, z: Sizes) -> Result:
    _check(before is not None and after is not None and n > 0, "no RSS reading")
    assert before is not None and after is not None
    res: Result = {
        "value": (after - before) / n / 1024.0,
        "unit": "KiB/conn",
        "detail": {"connections": n, "rss_before_mib": before / MIB, "rss_after_mib": after / MIB},
    }
    if n < z.idle_conns:
        res["partial"] = True
        res["note"] = f"opened {n} of {z.idle_conns} connections within the {z.idle_time:g} s cap"
    return res


# --------------------------------------------------------------------------------------------------
# blocking adapters


def run_sync(adapter: Any, workload: str, sizes: Sizes, server_pid: int | None) -> Result:
    if workload == "latency":
        return _s_latency(adapter, sizes)
    if workload == "inflight":
        return _s_inflight(adapter, sizes)
    if workload == "stream":
        return _s_stream(adapter, sizes)
    if workload == "bytes":
        return _s_bytes(adapter, sizes)
    if workload == "connect":
        return _s_connect(adapter, sizes)
    if workload == "idle-memory":
        return _s_idle_memory(adapter, sizes, server_pid)
    raise ValueError(workload)


def _s_latency(ad: Any, z: Sizes) -> Result:
    conn = ad.open()
    try:
        for i in range(z.latency_warmup):
            _check(ad.add(conn, i, 1) == i + 1, "wrong sum")
        samples: list[int] = []
        clock = time.perf_counter_ns
        deadline = clock() + int(z.latency_time * 1e9)
        for i in range(z.latency_calls):
            t0 = clock()
            r = ad.add(conn, i, 7)
            t1 = clock()
            samples.append(t1 - t0)
            _check(r == i + 7, "wrong sum")
            if t1 > deadline:
                break
    finally:
        ad.close(conn)
    return _latency_result(samples, z.latency_warmup)


def _s_inflight(ad: Any, z: Sizes) -> Result:
    lock = threading.Lock()
    counts = [0] * z.inflight
    errors: list[BaseException] = []
    ready = threading.Barrier(z.inflight + 1)
    go = threading.Barrier(z.inflight + 1)
    window: dict[str, float] = {}

    def worker(k: int) -> None:
        conn = None
        try:
            conn = ad.open()
            i = 0
            warm_end = time.perf_counter() + z.inflight_warmup_time
            while time.perf_counter() < warm_end:
                _check(ad.add(conn, k, i) == k + i, "wrong sum")
                i += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(e)
        try:
            ready.wait(timeout=60)
            go.wait(timeout=60)
        except threading.BrokenBarrierError:
            return
        try:
            if conn is None:
                return
            deadline = window["deadline"]
            n = 0
            while time.perf_counter() < deadline and n * z.inflight < z.inflight_max:
                _check(ad.add(conn, k, n) == k + n, "wrong sum")
                n += 1
            counts[k] = n
        except BaseException as e:  # noqa: BLE001
            with lock:
                errors.append(e)
        finally:
            if conn is not None:
                try:
                    ad.close(conn)
                except Exception:
                    pass

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(z.inflight)]
    for t in threads:
        t.start()
    ready.wait(timeout=60)
    t0 = time.perf_counter()
    window["deadline"] = t0 + z.inflight_time
    go.wait(timeout=60)
    for t in threads:
        t.join(timeout=z.inflight_time + 60)
    elapsed = time.perf_counter() - t0
    if errors:
        raise WorkloadError(f"{len(errors)} worker(s) failed: {errors[0]!r}")
    done = sum(counts)
    return {
        "value": _rate(done, elapsed),
        "unit": "calls/s",
        "detail": {"calls": done, "seconds": elapsed, "concurrency": z.inflight, "connections": z.inflight},
    }


def _s_stream(ad: Any, z: Sizes) -> Result:
    conn = ad.open()
    try:
        warm = min(z.stream_n, 1000)
        _check(ad.stream(conn, warm, time.perf_counter() + z.stream_time) == warm, "short warm-up stream")
        t0 = time.perf_counter()
        total = streams = 0
        while True:
            got = ad.stream(conn, z.stream_n, t0 + z.stream_time)
            total += got
            streams += 1
            elapsed = time.perf_counter() - t0
            if _stream_enough(got, elapsed, streams, z):
                break
    finally:
        ad.close(conn)
    return _stream_result(total, streams, elapsed, z)


def _s_bytes(ad: Any, z: Sizes) -> Result:
    data = os.urandom(z.bytes_size)
    conn = ad.open()
    try:
        for _ in range(2):
            _check(ad.echo(conn, data) == data, "echo mismatch")
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + z.bytes_time
        while n < z.bytes_iters:
            _check(len(ad.echo(conn, data)) == z.bytes_size, "echo length mismatch")
            n += 1
            if time.perf_counter() > deadline:
                break
        elapsed = time.perf_counter() - t0
    finally:
        ad.close(conn)
    return _bytes_result(n, elapsed, z)


def _s_connect(ad: Any, z: Sizes) -> Result:
    conn = ad.open()
    _check(ad.add(conn, 1, 2) == 3, "wrong sum")
    ad.close(conn)
    samples: list[float] = []
    deadline = time.perf_counter() + z.connect_time
    for i in range(z.connect_reps):
        t0 = time.perf_counter()
        conn = ad.open()
        r = ad.add(conn, i, 2)
        t1 = time.perf_counter()
        ad.close(conn)
        _check(r == i + 2, "wrong sum")
        samples.append((t1 - t0) * 1000.0)
        if t1 > deadline:
            break
    return _connect_result(samples)


def _s_idle_memory(ad: Any, z: Sizes, pid: int | None) -> Result:
    _check(pid is not None, "no server pid")
    assert pid is not None
    conn = ad.open()
    _check(ad.add(conn, 1, 2) == 3, "wrong sum")
    ad.close(conn)
    time.sleep(0.3)
    before = rss_bytes(pid)
    _check(before is not None, "cannot read the server's RSS (no /proc and no psutil)")
    conns: list[Any] = []
    deadline = time.perf_counter() + z.idle_time
    try:
        for i in range(z.idle_conns):
            c = ad.open()
            conns.append(c)
            _check(ad.add(c, i, 1) == i + 1, "wrong sum")
            if time.perf_counter() > deadline:
                break
        time.sleep(0.5)
        after = rss_bytes(pid)
    finally:
        for c in reversed(conns):
            try:
                ad.close(c)
            except Exception:
                pass
    return _idle_result(before, after, len(conns), z)
