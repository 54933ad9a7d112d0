"""The ``xrpc`` command as a newcomer first meets it: the console script in a directory of their own
modules, and ``--arg`` values read with the parameter's type."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from _procs import short_dir
from test_cli import SUBPROCESS_T, error_of, xrpc_cli
from test_cli import env as env  # noqa: F401  (the fixtures)
from test_cli import server as server  # noqa: F401
from xrpc._cli import Exit

pytestmark = pytest.mark.timeout(120)

SCRIPT = Path(sys.executable).parent / "xrpc"

MODULE = '''
from typing import Protocol
import xrpc

@xrpc.interface()
class Words(Protocol):
    async def echo(self, word: str) -> str: ...
'''


@pytest.fixture
def own_dir(env: dict[str, str]) -> Iterator[tuple[Path, dict[str, str]]]:
    """A directory holding the user's module, and an environment that does not name it on PYTHONPATH."""
    d = Path(short_dir())
    (d / "mywords.py").write_text(MODULE)
    e = dict(env)
    e.pop("PYTHONPATH", None)
    try:
        yield d, e
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_script(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    if not SCRIPT.exists():
        pytest.skip("the xrpc console script is not installed beside this interpreter")
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_T, stdin=subprocess.DEVNULL)


def test_console_script_inspects_a_module_of_the_current_directory(own_dir: tuple[Path, dict[str, str]]) -> None:
    d, e = own_dir
    r = run_script(d, e, "inspect", "mywords")
    assert r.returncode == Exit.OK, r.stderr
    assert r.stdout.startswith("Words\n") and "echo(word: str) -> str" in r.stdout
    r = run_script(d, e, "inspect", "mywords:Words")
    assert r.returncode == Exit.OK, r.stderr


def test_console_script_inspect_of_nothing_known_is_a_usage_error(own_dir: tuple[Path, dict[str, str]]) -> None:
    d, e = own_dir
    r = run_script(d, e, "inspect", "mywordz")
    assert r.returncode == Exit.USAGE, r.stderr
    assert "'mywordz' is neither an importable module nor a service" in r.stderr
    assert "Traceback" not in r.stderr


def test_arg_for_a_str_parameter_is_the_text_as_written(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "lookup", "--arg", "name=2024")
    assert r.returncode == Exit.CALL_FAILED
    assert error_of(r) == "error: NotFound: no point named '2024'"  # the method ran, with "2024"
    for text in ("true", "null", "[1]", "1.5"):
        r = xrpc_cli(env, "call", server, "lookup", "--arg", f"name={text}")
        assert error_of(r) == f"error: NotFound: no point named {text!r}", text
    # a JSON string is still a way to write one
    r = xrpc_cli(env, "call", server, "lookup", "--arg", 'name="origin"')
    assert r.returncode == Exit.OK and r.stdout.strip() == '{"x":0.0,"y":0.0}'


def test_arg_for_an_optional_str_and_for_numbers(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "scale", "--arg", "factor=2", "--arg", "offset=0.5", "--arg", "label=2024")
    assert r.returncode == Exit.OK, r.stderr
    assert r.stdout.strip() == '"2024*2.0+0.5"'
    r = xrpc_cli(env, "call", server, "scale", "--arg", "factor=2", "--arg", "offset=0.5", "--arg", "label=null")
    assert r.stdout.strip() == '"x*2.0+0.5"'  # Optional[str]: null is None
    # an int parameter still takes the number, and refuses text
    r = xrpc_cli(env, "call", server, "walk", "--arg", 'start={"x": 0, "y": 0}', "--arg", "steps=1")
    assert r.returncode == Exit.OK, r.stderr
    r = xrpc_cli(env, "call", server, "walk", "--arg", 'start={"x": 0, "y": 0}', "--arg", "steps=many")
    assert r.returncode == Exit.CALL_FAILED and "'steps'" in error_of(r)


def test_union_members_of_described_types() -> None:
    from xrpc._cli import _union_members  # noqa: PLC0415

    assert _union_members("str") == {"str"}
    assert _union_members("Optional[str]") == {"str", "None"}
    assert _union_members("Union[int, str]") == {"int", "str"}
    assert _union_members("int | str | None") == {"int", "str", "None"}
    assert _union_members("dict[str, int] | None") == {"dict[str, int]", "None"}
    assert _union_members("Optional[Union[list[str], str]]") == {"list[str]", "str", "None"}
