"""The benchmark runner works end to end on tiny sizes (no speed is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _timeouts import T

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("latency", "inflight", "stream", "bytes", "connect", "idle-memory")


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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

    # the markdown table went to stdout, one row per workload plus header, rule and status rows
    table = [ln for ln in cp.stdout.splitlines() if ln.startswith("|")]
    assert "raw-asyncio" in table[0] and "blocking-socket" in table[0]
    assert len(table) == 3 + len(WORKLOADS)
    assert report["table"].splitlines() == table


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
