"""Static typing: proxies are typed as their interface (mypy --strict), and xrpc itself is strict-clean."""

import os
import re
import shutil
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


# --------------------------------------------------------------------------- an editable install, as the README makes it
_CLIENT_OK = '''\
# pyright: strict
"""A client that must type-check, against xrpc installed with ``pip install -e``."""

from __future__ import annotations

from typing import AsyncIterable, AsyncIterator, Iterable, Iterator, Protocol

import msgspec
from typing_extensions import assert_type

import xrpc
import xrpc_codegen


class Point(msgspec.Struct):
    x: float
    y: float


@xrpc.interface
class Geometry(Protocol):
    async def distance(self, a: Point, b: Point) -> float: ...
    def walk(self, start: Point, steps: int) -> AsyncIterator[Point]: ...
    async def centroid(self, points: AsyncIterable[Point] | Iterable[Point]) -> Point: ...


@xrpc.blocking.interface(Geometry)
class GeometryBlocking(Protocol):
    def distance(self, a: Point, b: Point) -> float: ...
    def walk(self, start: Point, steps: int) -> Iterator[Point]: ...
    def centroid(self, points: Iterable[Point]) -> Point: ...


async def main(url: str) -> None:
    async with xrpc.connect(url) as conn:
        geo = conn.proxy(Geometry)
        assert_type(geo, Geometry)
        assert_type(await geo.distance(Point(0, 0), Point(3, 4)), float)
        assert_type(await geo.centroid([Point(0, 0), Point(2, 2)]), Point)
        async for p in geo.walk(Point(0, 0), 2):
            assert_type(p, Point)
    async with xrpc.connect_service("org.example.geometry", timeout=1.0) as service:
        assert_type(service, xrpc.ServiceConnection)
        assert_type(await service.proxy(Geometry).distance(Point(0, 0), Point(1, 1)), float)


def blocking(url: str) -> None:
    with xrpc.blocking.connect(url) as conn:
        geo = conn.proxy(GeometryBlocking)
        assert_type(geo.distance(Point(0, 0), Point(3, 4)), float)
        for p in geo.walk(Point(0, 0), 2):
            assert_type(p, Point)
        assert_type(geo.centroid([Point(0, 0)]), Point)


def stubs() -> str:
    return xrpc_codegen.render_stubs(xrpc_codegen.build_schema([Geometry]), blocking=True)
'''

_CLIENT_BAD = '''\
"""A client every marked line of which a type checker must refuse."""

from __future__ import annotations

from client_ok import Geometry, GeometryBlocking, Point

import xrpc


async def misuse(url: str) -> None:
    async with xrpc.connect(url) as conn:
        geo = conn.proxy(Geometry)
        await geo.distance("a", Point(1, 1))  # E
        text: str = await geo.distance(Point(0, 0), Point(1, 1))  # E
        await geo.centroid(Point(0, 0))  # E
        print(text)
    with xrpc.blocking.connect(url) as bconn:
        bgeo = bconn.proxy(GeometryBlocking)
        await bgeo.distance(Point(0, 0), Point(1, 1))  # E
        bgeo.walk(Point(0, 0), "three")  # E
        number: int = bgeo.centroid([Point(0, 0)])  # E
        print(number)
    async with xrpc.connect_service(3) as service:  # E
        print(service)
'''

_PYRIGHT_LINE = re.compile(r"^\s*(?P<file>/[^:]+):(?P<line>\d+):\d+ - (?P<level>error|warning): (?P<msg>.*)$")


@pytest.fixture(scope="module")
def editable_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with this checkout installed by ``pip install -e`` (the README's way)."""
    venv = tmp_path_factory.mktemp("editable") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120 * T)
    python = venv / "bin" / "python"
    r = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=400 * T,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return python


def _clients(tmp_path: Path) -> tuple[Path, Path]:
    ok = tmp_path / "client_ok.py"
    ok.write_text(_CLIENT_OK)
    bad = tmp_path / "client_bad.py"
    bad.write_text(_CLIENT_BAD)
    return ok, bad


@pytest.mark.timeout(900)
def test_an_editable_install_is_a_plain_path_entry(editable_install: Path) -> None:
    """No import hook: a ``.pth`` line names the checkout, and both package names import from it."""
    site = subprocess.run(
        [str(editable_install), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=30 * T,
    ).stdout.strip()
    lines = [line for pth in Path(site).glob("*.pth") for line in pth.read_text().splitlines()]
    assert str(ROOT) in lines, lines
    assert not [line for line in lines if "__editable__" in line and line.startswith("import")], lines
    r = subprocess.run(
        [str(editable_install), "-c", "import codegen, xrpc, xrpc_codegen; print(xrpc.__file__, xrpc_codegen.render_stubs is codegen.render_stubs)"],
        capture_output=True, text=True, timeout=30 * T, cwd="/",
    )
    assert r.stdout.split() == [str(ROOT / "xrpc" / "__init__.py"), "True"], r.stdout + r.stderr
    r = subprocess.run([str(editable_install.parent / "xrpc-codegen"), "check", "--help"], capture_output=True, text=True, timeout=30 * T)
    assert r.returncode == 0 and "usage: xrpc-codegen check" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(900)
def test_mypy_sees_xrpc_through_an_editable_install(editable_install: Path, tmp_path: Path) -> None:
    ok, bad = _clients(tmp_path)

    def mypy(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--no-color-output", "--show-error-codes",
             "--python-executable", str(editable_install), "--cache-dir", str(tmp_path / "cache"), path.name],
            cwd=tmp_path,  # not the checkout: xrpc is found only through the install
            env={k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")},
            capture_output=True, text=True, timeout=60 * T,
        )

    r = mypy(ok)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr
    r = mypy(bad)
    assert r.returncode == 1, r.stdout + r.stderr
    errors = {int(m["line"]) for m in map(_ERROR.match, r.stdout.splitlines()) if m and Path(m["file"]).name == bad.name}
    assert errors == set(_marked(bad, "# E")), r.stdout


@pytest.mark.timeout(900)
def test_pyright_sees_xrpc_through_an_editable_install(editable_install: Path, tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.skip("pyright needs Node.js, which is not installed")
    ok, bad = _clients(tmp_path)

    def pyright(path: Path) -> tuple[subprocess.CompletedProcess[str], dict[int, list[str]]]:
        r = subprocess.run(
            [sys.executable, "-m", "pyright", "--pythonpath", str(editable_install), path.name],
            cwd=tmp_path,
            env=dict({k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, PYRIGHT_PYTHON_IGNORE_WARNINGS="1"),
            capture_output=True, text=True, timeout=120 * T,
        )
        found: dict[int, list[str]] = {}
        for line in r.stdout.splitlines():
            m = _PYRIGHT_LINE.match(line)
            if m:
                assert Path(m["file"]).name == path.name, r.stdout
                found.setdefault(int(m["line"]), []).append(m["msg"])
        return r, found

    r, found = pyright(ok)
    assert r.returncode == 0 and found == {}, r.stdout + r.stderr
    assert "0 errors" in r.stdout, r.stdout
    r, found = pyright(bad)
    assert r.returncode == 1, r.stdout + r.stderr
    assert set(found) == set(_marked(bad, "# E")), r.stdout
