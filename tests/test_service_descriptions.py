"""Service descriptions: decoded into a Struct that refuses unknown keys, with messages naming the key;
TOML read on every supported Python (``tomli`` on 3.10)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from _procs import short_dir
from _timeouts import T
from xrpc import ServiceDescriptionError
from xrpc._services import FAILOVER_POLICIES, LAUNCHERS, DescriptionFile, READINESS, RESTART_POLICIES, load_description

NAME = "com.example.described"


@pytest.fixture
def services() -> Iterator[Path]:
    d = Path(short_dir())
    os.chmod(d, 0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write(directory: Path, text: str, suffix: str = ".toml") -> Path:
    path = directory / f"{NAME}{suffix}"
    path.write_text(text)
    return path


def test_toml_is_read_on_this_python(services: Path) -> None:
    path = write(services, f'name = "{NAME}"\nmodule = "pkg.mod:make"\nidle_exit = 2\nenvironment = {{ A = "1" }}\n')
    d = load_description(path)
    assert (d.name, d.module, d.idle_exit, dict(d.environment)) == (NAME, "pkg.mod:make", 2.0, {"A": "1"})
    assert d.restart == "on-demand" and d.readiness == "pipe" and d.launch_timeout == 10.0


def test_toml_is_read_with_tomli_on_python_3_10(services: Path) -> None:
    """Run under the oldest interpreter declared, if this machine has one with xrpc installed."""
    if sys.version_info < (3, 11):
        import tomli  # noqa: F401  (the dependency is there)

        test_toml_is_read_on_this_python(services)
        return
    candidates = [os.environ.get("XRPC_PYTHON310", ""), str(Path.home() / ".pyenv/versions/3.10.13/bin/python3.10")]
    python = next((p for p in candidates if p and Path(p).exists()), None)
    if python is None:
        pytest.skip("no Python 3.10 on this machine")
    path = write(services, f'name = "{NAME}"\ncommand = ["/bin/true"]\nreadiness = "socket"\n')
    root = Path(__file__).resolve().parent.parent
    code = (
        "import sys\n"
        "from xrpc._services import load_description\n"
        "d = load_description(sys.argv[1])\n"
        "print(sys.version_info[:2], d.command, d.readiness)\n"
    )
    r = subprocess.run([python, "-c", code, str(path)], capture_output=True, text=True, timeout=T, env={**os.environ, "PYTHONPATH": str(root)})
    if r.returncode != 0 and ("No module named 'anyio'" in r.stderr or "No module named 'msgspec'" in r.stderr):
        pytest.skip("Python 3.10 here has not got xrpc's dependencies")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(3, 10) ('/bin/true',) socket"


def test_the_struct_names_every_key_and_its_choices() -> None:
    assert "name" in DescriptionFile.__struct_fields__ and len(DescriptionFile.__struct_fields__) == 20
    assert DescriptionFile.__struct_config__.forbid_unknown_fields
    for value in RESTART_POLICIES:
        DescriptionFile(name="x", restart=value)  # type: ignore[arg-type]
    for value in READINESS:
        DescriptionFile(name="x", readiness=value)  # type: ignore[arg-type]
    for value in LAUNCHERS:
        DescriptionFile(name="x", launcher=value)  # type: ignore[arg-type]
    for value in FAILOVER_POLICIES:
        DescriptionFile(name="x", failover=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, message",
    [
        ("module = 'a:b'\n", "'name' (a string) is required"),
        (f"name = 3\nmodule = 'a:b'\n", "'name' (a string) is required"),
        (f"name = '{NAME}'\nmodule = 'a:b'\nidle_exti = 3\nlunch = 1\n", "unknown keys 'idle_exti', 'lunch' (the keys are name, command"),
        (f"name = '{NAME}'\ncommand = ['x', '']\n", "'command' must be a non-empty list of non-empty strings"),
        (f"name = '{NAME}'\ncommand = 'x'\n", "'command' must be a non-empty list"),
        (f"name = '{NAME}'\nmodule = 'a:b'\nidle_exit = true\n", "'idle_exit' must be a number of seconds >= 0"),
        (f"name = '{NAME}'\nmodule = 'a:b'\nidle_exit = inf\n", "'idle_exit' must be a number of seconds >= 0"),
        (f"name = '{NAME}'\nmodule = 'a:b'\nlaunch_timeout = 0\n", "'launch_timeout' must be a number of seconds > 0"),
        (f"name = '{NAME}'\nmodule = 'a:b'\nreadiness = 'carrier-pigeon'\n", "'readiness' must be one of 'pipe', 'socket', not 'carrier-pigeon'"),
        (f"name = '{NAME}'\nmodule = 'a:b'\nworking_directory = ''\n", "'working_directory' must be a path"),
        (f"name = '{NAME}'\nmodule = 'a:b'\npython = ''\n", "'python' must be the path of an interpreter"),
        (f"name = '{NAME}'\ncommand = ['x']\npython = '/usr/bin/python3'\n", "'python' only applies to a 'module' service"),
        (f"name = '{NAME}'\nurl = 'tcp://h:1'\nmodule = 'a:b'\n", "a service with a 'url' runs elsewhere"),
        (f"name = '{NAME}'\nurl = 'tcp://host'\n", "'url': 'tcp://host': a tcp URL needs a port"),
        (f"name = '{NAME}'\nurl = 5\n", "'url' must be a string"),
        (f"name = '{NAME}'\nmodule = 'a:b'\nlog_file = 1\n", "'log_file' must be a path"),
    ],
)
def test_bad_descriptions_name_the_key(services: Path, text: str, message: str) -> None:
    path = write(services, text)
    with pytest.raises(ServiceDescriptionError) as info:
        load_description(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value), str(info.value)


def test_json_top_level_must_be_a_table(services: Path) -> None:
    path = write(services, "[1, 2]", ".json")
    with pytest.raises(ServiceDescriptionError, match="the description must be a table of keys"):
        load_description(path)


def test_docs_quote_only_public_names() -> None:
    """The guides name what a user can import: ``xrpc.X``, never ``xrpc._module``."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    pages = [p for p in docs.glob("*.md") if p.name not in ("design.md", "api.md")]  # design.md is about the internals
    pages.append(docs.parent / "README.md")
    private = re.compile(r"\bxrpc\._[a-z]")
    quoted = [f"{p.name}: {line.strip()}" for p in pages for line in p.read_text().splitlines() if private.search(line)]
    assert quoted == []
