"""Static typing: proxies are typed as their interface (mypy --strict), and xrpc itself is strict-clean."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _timeouts import T

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = Path(__file__).resolve().parent / "typing_examples.py"
_NOTE = re.compile(r'^(?P<file>[^:]+):(?P<line>\d+): note: Revealed type is "(?P<type>.*)"$')
_ERROR = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): error: (?P<msg>.*)$")


def _mypy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--no-color-output", "--hide-error-context", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30 * T,
        env=env,
    )


def _normal(tp: str) -> str:
    # mypy spells builtins either way depending on its version ("builtins.float" or "float")
    return re.sub(r"\bbuiltins\.", "", tp).strip()


def _marked(path: Path, marker: str) -> dict[int, str]:
    out = {}
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if marker in line:
            out[no] = line.split(marker, 1)[1].strip()
    return out


def test_revealed_types_match_the_interface() -> None:
    expected = _marked(EXAMPLES, "# R: ")
    assert len(expected) >= 10
    r = _mypy("--strict", "--follow-imports=silent", str(EXAMPLES.relative_to(ROOT)))
    revealed: dict[int, str] = {}
    problems: list[str] = []
    for line in r.stdout.splitlines():
        m = _NOTE.match(line)
        if m and Path(m["file"]).name == EXAMPLES.name:
            revealed[int(m["line"])] = m["type"]
        elif line.strip():
            problems.append(line)
    assert problems == [], r.stdout + r.stderr
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(revealed) == set(expected)
    for no, want in expected.items():
        assert _normal(revealed[no]) == _normal(want), f"line {no}: revealed {revealed[no]!r}, expected {want!r}"


def test_misuse_of_a_proxy_is_a_type_error(tmp_path: Path) -> None:
    """The proxy is the interface to the checker: wrong argument and result types are caught."""
    bad = tmp_path / "misuse.py"
    bad.write_text(
        "import xrpc\n"
        "from typing_examples import Geometry, Point\n"
        "\n"
        "\n"
        "async def misuse(conn: xrpc.Connection) -> None:\n"
        "    geo = conn.proxy(Geometry)\n"
        "    text: str = await geo.distance(Point(0, 0), Point(1, 1))  # E: assignment\n"
        "    await geo.distance(Point(0, 0))  # E: call-arg\n"
        '    await geo.distance("a", Point(1, 1))  # E: arg-type\n'
        "    await geo.no_such_method()  # E: attr-defined\n"
        "    print(text)\n"
    )
    expected = _marked(bad, "# E: ")
    env = dict(os.environ, MYPYPATH=str(EXAMPLES.parent))
    r = _mypy("--strict", "--follow-imports=silent", "--show-error-codes", str(bad), env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    errors: dict[int, list[str]] = {}
    for line in r.stdout.splitlines():
        m = _ERROR.match(line)
        if m and Path(m["file"]).name == bad.name:
            errors.setdefault(int(m["line"]), []).append(m["msg"])
    assert set(errors) == set(expected), r.stdout
    for no, code in expected.items():
        assert any(msg.endswith(f"[{code}]") for msg in errors[no]), (no, errors[no])


def test_xrpc_is_mypy_strict_clean() -> None:
    r = _mypy("--strict", "xrpc")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "error:" not in r.stdout
