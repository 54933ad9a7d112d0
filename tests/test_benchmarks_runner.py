"""The benchmark runner works end to end on tiny sizes (no speed is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _timeouts import T

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("latency", "inflight", "stream", "bytes", "connect", "idle-memory")


def _run(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _markdown_tables(stdout: str) -> list[list[str]]:
    """The markdown tables of the runner's output, each as its list of lines."""
    tables: list[list[str]] = []
    previous = False
    for ln in stdout.splitlines():
        is_row = ln.startswith("|")
        if is_row and not previous:
            tables.append([])
        if is_row:
            tables[-1].append(ln)
        previous = is_row
    return tables


@pytest.mark.timeout(300)
def test_tiny_run_writes_json_and_table(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    cp = _run("--tiny", "--systems", "raw-asyncio,blocking-socket", "--json", str(out), "--no-progress")
    assert cp.returncode == 0, cp.stderr

    report = json.loads(out.read_text(encoding="utf-8"))
    assert {"meta", "systems", "workloads", "results", "table", "notes"} <= set(report)
    assert report["meta"]["mode"] == "tiny"
    assert list(report["systems"]) == ["raw-asyncio", "blocking-socket"]
    assert list(report["workloads"]) == list(WORKLOADS)
    for w in WORKLOADS:
        assert {"unit", "better"} <= set(report["workloads"][w])

    raw = report["results"]["raw-asyncio"]
    assert report["systems"]["raw-asyncio"]["status"] == "ok"
    for w in WORKLOADS:
        res = raw[w]
        if w == "idle-memory" and not sys.platform.startswith("linux"):
            continue
        assert res["status"] == "ok", (w, res)
        assert {"value", "unit", "ratio", "detail"} <= set(res)
        assert isinstance(res["value"], (int, float))
    assert raw["latency"]["ratio"] == pytest.approx(1.0)
    assert "p99_us" in raw["latency"]["detail"]

    blocking = report["results"]["blocking-socket"]
    assert blocking["bytes"]["status"] == "ok", blocking["bytes"]
    assert blocking["latency"]["status"] == "n/a"

    # every result is also a ratio to each floor that ran its workload; blocking-socket only the echo
    ran = [w for w in WORKLOADS if raw[w]["status"] == "ok"]
    for w in ran:
        expected = ["raw-asyncio", "blocking-socket"] if w == "bytes" else ["raw-asyncio"]
        assert report["floors"][w] == expected
        assert list(raw[w]["ratios"]) == expected
        assert raw[w]["ratios"]["raw-asyncio"] == pytest.approx(1.0)
    assert blocking["bytes"]["ratios"]["blocking-socket"] == pytest.approx(1.0)
    assert blocking["bytes"]["ratios"]["raw-asyncio"] == pytest.approx(1 / raw["bytes"]["ratios"]["blocking-socket"])

    # stdout: the main table (a row per workload plus header, rule and status rows), then the table
    # of ratios to each floor (a row per workload and floor plus header and rule)
    main, floors = _markdown_tables(cp.stdout)
    assert "raw-asyncio" in main[0] and "blocking-socket" in main[0]
    assert len(main) == 3 + len(WORKLOADS)
    assert report["table"].splitlines() == main
    assert report["floor_table"].splitlines() == floors
    assert len(floors) == 2 + len(ran) + 1
    assert "bytes ÷ blocking-socket" in report["floor_table"]
    assert "latency ÷ blocking-socket" not in report["floor_table"]


@pytest.mark.timeout(300)
def test_filters_and_unknown_names(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    cp = _run("--tiny", "--systems", "raw-asyncio", "--workloads", "latency,connect", "--json", str(out),
              "--no-progress")
    assert cp.returncode == 0, cp.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert list(report["workloads"]) == ["latency", "connect"]
    assert set(report["results"]["raw-asyncio"]) == {"latency", "connect"}

    bad = _run("--systems", "no-such-system", timeout=6 * T)
    assert bad.returncode != 0
    assert "no-such-system" in bad.stderr


@pytest.mark.timeout(300)
def test_the_multi_worker_workload_compares_one_and_two_workers(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    cp = _run("--tiny", "--systems", "xrpc-unix", "--workloads", "workers", "--json", str(out), "--no-progress")
    assert cp.returncode == 0, cp.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    workers = report["workers"]
    assert workers["status"] == "ok", workers
    assert set(workers["median"]) == {"1", "2"}
    assert all(rate > 0 for rate in workers["median"].values())
    assert workers["ratio"] == pytest.approx(workers["median"]["2"] / workers["median"]["1"])
    table = [t for t in _markdown_tables(cp.stdout) if t[0].startswith("| workers |")]
    assert len(table) == 1 and len(table[0]) == 4, cp.stdout  # header, rule, 1 and 2 workers
    assert "workers" not in report["workloads"]  # not a column of the matrix


@pytest.mark.timeout(300)
def test_missing_peer_is_skipped_with_a_reason(tmp_path: Path) -> None:
    # Hide two optional libraries from every process of the run, whether or not they are installed:
    # a None entry in sys.modules makes importlib.util.find_spec report the module as absent.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nsys.modules['capnp'] = None\nsys.modules['uvloop'] = None\n", encoding="utf-8"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hide), env.get("PYTHONPATH", "")) if p)
    out = tmp_path / "out.json"
    cp = _run("--tiny", "--systems", "raw-asyncio,raw-uvloop,blocking-socket,pycapnp", "--workloads",
              "latency,bytes", "--json", str(out), "--no-progress", env=env)
    assert cp.returncode == 0, cp.stderr
    report = json.loads(out.read_text(encoding="utf-8"))

    for system, module in (("pycapnp", "capnp"), ("raw-uvloop", "uvloop")):
        st = report["systems"][system]
        assert st["status"] == "not installed", st
        assert module in st["reason"]
        assert {w: r["status"] for w, r in report["results"][system].items()} == {
            "latency": "not installed", "bytes": "not installed"}
        assert any(n.startswith(f"{system}: skipped, not installed") for n in report["notes"])
    assert report["results"]["raw-asyncio"]["latency"]["status"] == "ok"

    # a floor that did not run is not a reference; the table still has a column for the skipped peer
    assert report["floors"] == {"latency": ["raw-asyncio"], "bytes": ["raw-asyncio", "blocking-socket"]}
    main, floors = _markdown_tables(cp.stdout)
    assert "pycapnp" in main[0] and "pycapnp" in floors[0]
    status = [c.strip() for c in main[2].strip("|").split("|")]
    assert status[0] == "status" and "capnp" in status[4]
    assert "raw-uvloop" not in report["floor_table"].split("\n", 2)[2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("side", ["client", "server"])
def test_the_profiler_reports_each_layer_per_operation(side: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile", "--workload", "latency", "--n", "300", "--side", side, "--top", "5"],
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=T * 4,
    )
    assert out.returncode == 0, out.stderr
    assert "# latency, unix, asyncio: 300 operations" in out.stdout
    assert f"## profile of the {side}" in out.stdout
    layers = [ln.split("|")[1].strip() for ln in out.stdout.splitlines() if ln.startswith("| xrpc ")]
    # the server runs every call's CALL and REPLY through the core, and the client too
    assert "xrpc sans-IO core (frames, call records)" in layers, out.stdout
    assert "xrpc runtime (calls, serving, reading, drivers)" in layers, out.stdout
    fn_rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| `")]
    assert 1 <= len(fn_rows) <= 5
