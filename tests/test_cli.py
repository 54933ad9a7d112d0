"""The ``xrpc`` command line, run as a real program: ``python -m xrpc inspect | call | list | serve``.

Every command runs in a subprocess (bounded by ``SUBPROCESS_T``) against servers started with ``xrpc serve``;
the tests wait for a server by reading the URL line it prints once it listens.  The fixtures'
interface is ``tests/cli_fixtures/geometry.py``.  A few in-process tests check the dynamic
interface ``xrpc call`` builds from a remote description.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Protocol

import pytest

import xrpc
from xrpc._cli import CLIError, DeclaredError, Exit, dynamic_interface
from xrpc._introspect import ExportDescription, MethodInfo, ParamInfo, describe_export

from cli_fixtures.geometry import Counter, Geometry, GeometryImpl
from _timeouts import T
from _procs import short_dir

HERE = Path(__file__).parent
ROOT = HERE.parent
SUBPROCESS_T = 3 * T  # the bound on every subprocess and every wait for output (each starts an interpreter)
GEOMETRY = "cli_fixtures.geometry:Geometry"
SERVICE = "com.example.clitest"


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    """The environment of every CLI process: the fixtures importable, a private runtime dir."""
    runtime = short_dir()
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    e["XRPC_RUNTIME_DIR"] = runtime
    e["XRPC_SERVICE_PATH"] = ""
    e.pop("XDG_RUNTIME_DIR", None)
    e["NO_COLOR"] = "1"
    try:
        yield e
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def xrpc_cli(env: dict[str, str], *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m xrpc ARGS`` to completion (at most ``T`` seconds)."""
    return subprocess.run(
        [sys.executable, "-m", "xrpc", *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=SUBPROCESS_T,
        cwd=str(HERE),
    )


def read_line(proc: subprocess.Popen[bytes], timeout: float = SUBPROCESS_T) -> str:
    """One line of ``proc``'s stdout, waiting at most ``timeout`` seconds for it."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no complete line on stdout within {timeout}s (got {buf!r})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 1)  # one byte at a time: never read past the line
            if not chunk:
                raise AssertionError(f"stdout closed after {buf!r}; exit code {proc.wait(timeout)}")
            buf += chunk
    return buf.decode().rstrip("\n")


def xrpc_popen(env: dict[str, str], *args: str, stdin: int) -> subprocess.Popen[bytes]:
    """Start ``python -m xrpc ARGS`` with pipes for its output."""
    return subprocess.Popen(
        [sys.executable, "-m", "xrpc", *args], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(HERE)
    )


def kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` unless it has ended, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=SUBPROCESS_T)


@contextlib.contextmanager
def served(env: dict[str, str], *args: str, stop: int = signal.SIGTERM) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run ``xrpc serve ARGS``; yield the process and the URL it printed; stop it with ``stop``.

    On the way out the exit code must be 0 (unless the body already ended the process).
    """
    proc = xrpc_popen(env, "serve", *args, stdin=subprocess.DEVNULL)
    try:
        try:
            url = read_line(proc)
        except AssertionError:
            proc.kill()
            _, err = proc.communicate(timeout=SUBPROCESS_T)
            raise AssertionError(f"xrpc serve did not print its URL: {err.decode()}") from None
        yield proc, url
        if proc.poll() is None:
            proc.send_signal(stop)
        _, err = proc.communicate(timeout=SUBPROCESS_T)
        assert proc.returncode == 0, err.decode()
    finally:
        kill(proc)


def lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines()]


def error_of(result: subprocess.CompletedProcess[str]) -> str:
    """The ``error: ...`` line of a failed run (the last line of stderr)."""
    err = result.stderr.strip().splitlines()
    assert err, f"nothing on stderr (exit {result.returncode}, stdout {result.stdout!r})"
    text = result.stderr.strip()
    assert "error: " in text, text
    return text[text.index("error: ") :]


@pytest.fixture(scope="module")
def server(env: dict[str, str]) -> Iterator[str]:
    """One ``xrpc serve`` process exporting ``GeometryImpl`` as ``Geometry`` on a Unix socket."""
    d = short_dir()
    try:
        with served(env, "cli_fixtures.geometry:make_geometry", "--iface", GEOMETRY, f"unix://{d}/s.sock") as (_, url):
            yield url
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- help
def test_help_lists_every_command_and_the_exit_codes(env: dict[str, str]) -> None:
    r = xrpc_cli(env, "--help")
    assert r.returncode == 0
    for word in ("inspect", "call", "list", "serve", "exit codes", "examples"):
        assert word in r.stdout
    for command in ("inspect", "call", "list", "serve"):
        r = xrpc_cli(env, command, "--help")
        assert r.returncode == 0, r.stderr
        assert "examples:" in r.stdout and f"xrpc {command}" in r.stdout
        assert "exit codes:" in r.stdout and "4  no such object" in r.stdout


def test_no_command_and_unknown_option_are_usage_errors(env: dict[str, str]) -> None:
    assert xrpc_cli(env).returncode == Exit.USAGE
    assert xrpc_cli(env, "call").returncode == Exit.USAGE
    assert xrpc_cli(env, "inspect", GEOMETRY, "--bogus").returncode == Exit.USAGE


# --------------------------------------------------------------------------- inspect (local)
def test_inspect_an_interface_prints_methods_kinds_types_defaults_errors(env: dict[str, str]) -> None:
    r = xrpc_cli(env, "inspect", GEOMETRY)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.splitlines()[0] == "Geometry"
    assert f"fingerprint  {xrpc.describe(Geometry).fingerprint}" in out
    assert "errors       NotFound" in out
    assert "unary          distance(a: Point, b: Point) -> float" in out
    assert "The Euclidean distance between two points." in out
    assert "server-stream  walk(start: Point, steps: int = 3) -> stream[Point]" in out
    assert "client-stream  centroid(points: stream[Point]) -> Point" in out
    assert "bidi-stream    chat(lines: stream[str]) -> stream[str]" in out
    assert "oneway         log(text: str) -> None" in out
    assert "scale(factor: float, offset: float = 0.0, label: Optional[str] = None) -> str" in out
    assert "area(shape: object {Circle | Square | plain data}) -> float" in out


def test_inspect_json_of_an_interface_is_one_object(env: dict[str, str]) -> None:
    r = xrpc_cli(env, "inspect", GEOMETRY, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    desc = xrpc.describe(Geometry)
    assert d["name"] == d["interface"] == "Geometry"
    assert d["fingerprint"] == desc.fingerprint
    assert d["errors"] == ["NotFound"]
    assert d["python"] == GEOMETRY
    methods = {m["name"]: m for m in d["methods"]}
    assert list(methods) == list(desc.methods)
    assert {n: m["kind"] for n, m in methods.items()} == {n: m.kind.value for n, m in desc.methods.items()}
    walk = methods["walk"]
    assert walk["reply"] == "Point"
    assert walk["params"] == [
        {"name": "start", "type": "Point", "required": True, "stream": False, "allowed": []},
        {"name": "steps", "type": "int", "required": False, "stream": False, "allowed": [], "default": "3"},
    ]
    assert methods["centroid"]["params"][0]["stream"] is True
    assert methods["area"]["params"][0]["allowed"] == ["Circle", "Square", "plain data"]


def test_inspect_a_module_lists_every_interface_in_it(env: dict[str, str]) -> None:
    r = xrpc_cli(env, "inspect", "cli_fixtures.geometry", "--json")
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)
    assert [d["interface"] for d in records] == ["Geometry", "cli.Counter"]  # not NotAnInterface
    assert records[1]["fingerprint"] == xrpc.describe(Counter).fingerprint
    text = xrpc_cli(env, "inspect", "cli_fixtures.geometry")
    assert text.returncode == 0
    assert "cli.Counter" in text.stdout and "add(n: int) -> int" in text.stdout


@pytest.mark.parametrize(
    "target",
    ["cli_fixtures.geometry:NotAnInterface", "cli_fixtures.geometry:Missing", "cli_fixtures.nothere:Geometry", "no-colon-or-url!"],
)
def test_inspect_of_what_cannot_be_loaded_is_a_usage_error(env: dict[str, str], target: str) -> None:
    r = xrpc_cli(env, "inspect", target)
    assert r.returncode == Exit.USAGE, r.stderr
    assert error_of(r).startswith("error: ")
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- inspect (live)
def test_inspect_a_live_server_prints_every_export(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "inspect", server, "--json")
    assert r.returncode == 0, r.stderr
    exports = json.loads(r.stdout)
    assert [e["name"] for e in exports] == ["Geometry"]  # the introspection service itself is not listed
    assert exports[0]["fingerprint"] == xrpc.describe(Geometry).fingerprint
    assert exports[0] == json.loads(json.dumps(_builtins(describe_export("Geometry", xrpc.describe(Geometry)))))
    text = xrpc_cli(env, "inspect", server)
    assert text.returncode == 0
    # the server does not send default values: optional parameters show "..."
    assert "server-stream  walk(start: Point, steps: int = ...) -> stream[Point]" in text.stdout


def _builtins(value: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(value)


def test_inspect_of_a_dead_url_cannot_connect(env: dict[str, str]) -> None:
    d = short_dir()
    try:
        r = xrpc_cli(env, "inspect", f"unix://{d}/nobody.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert r.returncode == Exit.CONNECT
    assert "nobody.sock" in error_of(r)


# --------------------------------------------------------------------------- call
def test_call_unary_with_args(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "distance", "--arg", 'a={"x": 0, "y": 0}', "--arg", 'b={"x": 3, "y": 4}')
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == [5.0]


def test_call_with_json_and_an_object_prefix(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "Geometry.lookup", "--json", '{"name": "origin"}')
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == [{"x": 0.0, "y": 0.0}]


def test_call_args_that_are_not_json_are_strings(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "scale", "--arg", "factor=2", "--arg", "offset=0.5", "--arg", "label=three words")
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == ["three words*2.0+0.5"]


def test_call_server_stream_prints_one_json_line_per_item(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "walk", "--arg", 'start={"x": 10, "y": 1}', "--arg", "steps=3")
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == [{"x": 11.0, "y": 1.0}, {"x": 12.0, "y": 1.0}, {"x": 13.0, "y": 1.0}]


def test_call_client_stream_reads_json_lines_from_stdin(env: dict[str, str], server: str) -> None:
    points = '{"x": 1, "y": 1}\n\n{"x": 3, "y": 5}\n'  # blank lines are skipped
    r = xrpc_cli(env, "call", server, "centroid", input=points)
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == [{"x": 2.0, "y": 3.0}]


def test_call_bidi_stream_answers_each_line_as_it_arrives(env: dict[str, str], server: str) -> None:
    proc = xrpc_popen(env, "call", server, "chat", stdin=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b'"hello"\n')
        proc.stdin.flush()
        assert read_line(proc) == '"HELLO"'  # printed while stdin is still open
        out, err = proc.communicate(b'"again"\n', timeout=SUBPROCESS_T)
    finally:
        kill(proc)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == ['"AGAIN"']


def test_call_oneway_prints_nothing_and_arrives(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "log", "--arg", "text=oneway-from-cli")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    h = xrpc_cli(env, "call", server, "history")
    assert h.returncode == 0, h.stderr
    assert "oneway-from-cli" in lines(h.stdout)[0]


def test_call_of_a_method_returning_none_prints_nothing(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "sleep", "--arg", "seconds=0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""


def test_call_leaves_optional_arguments_to_the_server(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "scale", "--arg", "factor=3")
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == ["x*3.0+0.0"]  # the server's defaults: offset=0.0, label=None


def test_call_allowed_class_argument_as_name_and_value(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "area", "--arg", 'shape=["Square", {"side": 3}]')
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == [9.0]


def test_call_declared_error_exits_1_with_its_type(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "lookup", "--arg", "name=atlantis")
    assert r.returncode == Exit.CALL_FAILED
    assert error_of(r) == "error: NotFound: no point named 'atlantis'"
    assert r.stdout == ""


def test_call_undeclared_error_is_a_remote_error(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "crash")
    assert r.returncode == Exit.CALL_FAILED
    assert error_of(r) == "error: RemoteError: RuntimeError: boom"


def test_call_wrongly_typed_argument_is_refused_by_the_server(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "walk", "--arg", 'start={"x": 0, "y": 0}', "--arg", "steps=many")
    assert r.returncode == Exit.CALL_FAILED
    err = error_of(r)
    assert err.startswith("error: ValidationError: ") and "'steps'" in err
    assert r.stdout == ""


def test_call_timeout_exits_1(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "sleep", "--arg", "seconds=60", "--timeout", "0.5")
    assert r.returncode == Exit.CALL_FAILED
    assert error_of(r).startswith("error: TimeoutError")


@pytest.mark.parametrize(
    "method",
    ["nosuchmethod", "Elsewhere.distance"],
)
def test_call_unknown_method_or_object_exits_4(env: dict[str, str], server: str, method: str) -> None:
    r = xrpc_cli(env, "call", server, method)
    assert r.returncode == Exit.NOT_FOUND, r.stderr
    err = error_of(r)
    assert "distance" in err or "Geometry" in err  # says what there is


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["distance", "--arg", 'a={"x": 0, "y": 0}'], "missing required argument 'b'"),
        (["distance", "--json", "{}"], "missing required arguments 'a', 'b'"),
        (["lookup", "--arg", "name=x", "--arg", "nmae=y"], "has no argument 'nmae'"),
        (["lookup", "--arg", "name=x", "--json", '{"name": "y"}'], "given both"),
        (["lookup", "--arg", "name"], "NAME=VALUE"),
        (["lookup", "--json", "[1, 2]"], "one JSON object"),
        (["lookup", "--json", "{nope"], "not valid JSON"),
        (["centroid", "--arg", "points=[]"], "is a stream"),
        (["scale", "--arg", "factor=1", "--arg", "label=x"], "give 'offset' too"),
        (["Geometry.lookup", "--object", "Geometry"], "not both"),
    ],
)
def test_call_argument_errors_exit_2(env: dict[str, str], server: str, args: list[str], message: str) -> None:
    r = xrpc_cli(env, "call", server, *args)
    assert r.returncode == Exit.USAGE, r.stderr
    assert message in error_of(r)
    assert "Traceback" not in r.stderr


def test_call_with_bad_json_on_stdin_exits_2(env: dict[str, str], server: str) -> None:
    r = xrpc_cli(env, "call", server, "centroid", input='{"x": 1, "y": 1}\nnot json\n')
    assert r.returncode == Exit.USAGE
    assert "stdin line 2" in error_of(r)


def test_call_cannot_connect_exits_3(env: dict[str, str]) -> None:
    d = short_dir()
    try:
        r = xrpc_cli(env, "call", f"unix://{d}/nobody.sock", "distance")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert r.returncode == Exit.CONNECT
    assert "nobody.sock" in error_of(r)


def test_call_unknown_service_exits_3(env: dict[str, str]) -> None:
    r = xrpc_cli(env, "call", "com.example.nothere", "distance")
    assert r.returncode == Exit.CONNECT
    assert "no service named 'com.example.nothere'" in error_of(r)


def test_call_bad_url_is_a_usage_error(env: dict[str, str]) -> None:
    r = xrpc_cli(env, "call", "gopher://example", "distance")
    assert r.returncode == Exit.USAGE
    assert "unsupported scheme" in error_of(r)


# --------------------------------------------------------------------------- serve
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_prints_its_url_serves_and_exits_0_on_signal(env: dict[str, str], stop: int) -> None:
    with served(env, "cli_fixtures.geometry:GeometryImpl", "--iface", GEOMETRY, "--name", "geo", "tcp://127.0.0.1:0", stop=stop) as (proc, url):
        assert url.startswith("tcp://127.0.0.1:") and not url.endswith(":0")
        r = xrpc_cli(env, "call", url, "geo.lookup", "--arg", "name=origin")
        assert r.returncode == 0, r.stderr
        assert lines(r.stdout) == [{"x": 0.0, "y": 0.0}]
    assert proc.returncode == 0


def test_serve_an_instance_on_a_unix_socket_removes_it_on_exit(env: dict[str, str]) -> None:
    d = short_dir()
    try:
        sock = Path(d) / "s.sock"
        with served(env, "cli_fixtures.geometry:instance", "--iface", GEOMETRY, f"unix://{sock}") as (_, url):
            assert url == f"unix://{sock}"
            r = xrpc_cli(env, "call", url, "distance", "--json", '{"a": {"x": 1, "y": 1}, "b": {"x": 1, "y": 3}}')
            assert r.returncode == 0, r.stderr
            assert lines(r.stdout) == [2.0]
        assert not sock.exists()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_serve_a_server_factory_with_several_exports(env: dict[str, str]) -> None:
    with served(env, "cli_fixtures.geometry:make_server", "tcp://127.0.0.1:0") as (_, url):
        r = xrpc_cli(env, "call", url, "counter.add", "--arg", "n=5")
        assert (r.returncode, lines(r.stdout)) == (0, [5]), r.stderr
        r = xrpc_cli(env, "call", url, "add", "--object", "counter", "--arg", "n=2")
        assert (r.returncode, lines(r.stdout)) == (0, [7]), r.stderr
        ambiguous = xrpc_cli(env, "call", url, "add", "--arg", "n=1")
        assert ambiguous.returncode == Exit.USAGE
        assert "'Geometry', 'counter'" in error_of(ambiguous)
        inspected = xrpc_cli(env, "inspect", url, "--json")
        assert [e["name"] for e in json.loads(inspected.stdout)] == ["Geometry", "counter"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cli_fixtures.geometry:GeometryImpl", "tcp://127.0.0.1:0"], "--iface"),
        (["cli_fixtures.geometry:CounterImpl", "--iface", GEOMETRY, "tcp://127.0.0.1:0"], "does not implement Geometry"),
        (["cli_fixtures.geometry:GeometryImpl", "--iface", GEOMETRY, "gopher://x"], "unsupported scheme"),
        (["cli_fixtures.geometry:nothing", "--iface", GEOMETRY, "tcp://127.0.0.1:0"], "no attribute"),
    ],
)
def test_serve_usage_errors_exit_2(env: dict[str, str], args: list[str], message: str) -> None:
    r = xrpc_cli(env, "serve", *args)
    assert r.returncode == Exit.USAGE, r.stderr
    assert message in error_of(r)
    assert r.stdout == ""


# --------------------------------------------------------------------------- list and services
@pytest.fixture
def service_env(env: dict[str, str]) -> Iterator[tuple[dict[str, str], Path]]:
    """A private runtime dir and search path holding one description, of SERVICE (restart manual)."""
    runtime = Path(short_dir())
    services = runtime / "descriptions"
    services.mkdir()
    (services / f"{SERVICE}.json").write_text(
        json.dumps({"name": SERVICE, "module": "cli_fixtures.geometry:make_server", "restart": "manual"})
    )
    e = dict(env, XRPC_RUNTIME_DIR=str(runtime), XRPC_SERVICE_PATH=str(services))
    try:
        yield e, runtime
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def _listed(e: dict[str, str]) -> dict[str, Any]:
    r = xrpc_cli(e, "list", "--json")
    assert r.returncode == 0, r.stderr
    return {row["name"]: row for row in json.loads(r.stdout)}


def test_list_shows_services_and_whether_they_run(service_env: tuple[dict[str, str], Path]) -> None:
    e, runtime = service_env
    row = _listed(e)[SERVICE]
    assert row["status"] == "stopped" and row["running"] is False
    assert row["kind"] == "module" and row["target"] == "cli_fixtures.geometry:make_server"
    assert row["description"].endswith(f"{SERVICE}.json")
    sock = runtime / "xrpc" / "sockets" / f"{SERVICE}.sock"
    assert row["socket"] == str(sock)
    # not running, and 'manual': nothing launches it
    r = xrpc_cli(e, "call", SERVICE, "counter.add", "--arg", "n=1")
    assert r.returncode == Exit.CONNECT
    assert "not running" in error_of(r)

    os.makedirs(sock.parent, mode=0o700, exist_ok=True)  # the failed call above may have made it
    with served(e, "cli_fixtures.geometry:make_server", f"unix://{sock}"):
        row = _listed(e)[SERVICE]
        assert row["status"] == "running" and row["running"] is True
        text = xrpc_cli(e, "list")
        assert text.returncode == 0
        header, *rows = text.stdout.splitlines()
        assert header.split() == ["NAME", "STATUS", "KIND", "TARGET", "DESCRIPTION"]
        assert [r.split()[:3] for r in rows if r.startswith(SERVICE)] == [[SERVICE, "running", "module"]]
        # the service is reached by name
        r = xrpc_cli(e, "call", SERVICE, "counter.add", "--arg", "n=4")
        assert (r.returncode, lines(r.stdout)) == (0, [4]), r.stderr
        inspected = xrpc_cli(e, "inspect", SERVICE, "--json")
        assert inspected.returncode == 0, inspected.stderr
        assert [x["interface"] for x in json.loads(inspected.stdout)] == ["Geometry", "cli.Counter"]
    assert _listed(e)[SERVICE]["status"] == "stopped"


def test_list_reports_a_malformed_description(service_env: tuple[dict[str, str], Path]) -> None:
    e, runtime = service_env
    (runtime / "descriptions" / "com.example.broken.json").write_text('{"name": "com.example.other"}')
    rows = _listed(e)
    assert rows["com.example.broken"]["status"] == "invalid"
    assert "com.example.other" in rows["com.example.broken"]["error"]
    assert rows[SERVICE]["status"] == "stopped"
    text = xrpc_cli(e, "list")
    assert text.returncode == 0
    assert "com.example.broken" in text.stderr


# --------------------------------------------------------------------------- the dynamic interface (in process)
def _export(methods: list[MethodInfo], interface: str = "remote.Thing", errors: list[str] | None = None) -> ExportDescription:
    return ExportDescription("thing", interface, "0" * 16, methods, errors or [])


def test_dynamic_interface_mirrors_the_remote_one() -> None:
    original = xrpc.describe(Geometry)
    dyn = dynamic_interface(describe_export("Geometry", original))
    d = xrpc.describe(dyn)
    assert d.name == "Geometry"
    assert list(d.methods) == list(original.methods)
    for name, m in original.methods.items():
        dm = d.methods[name]
        assert dm.kind is m.kind, name
        assert [(p.name, p.stream, p.has_default) for p in dm.params] == [(p.name, p.stream, p.has_default) for p in m.params]
        assert (dm.reply is None) == (m.reply is None), name
    assert [e.__qualname__ for e in d.errors] == ["NotFound"]
    assert all(issubclass(e, DeclaredError) for e in d.errors)


@contextlib.asynccontextmanager
async def dynamic_proxy(iface: type, impl: object, name: str) -> AsyncIterator[Any]:
    """A proxy, of the interface ``dynamic_interface`` builds from ``iface``'s description, to
    ``impl`` exported as ``name`` over an in-memory connection."""
    server = xrpc.Server()
    server.export(iface, impl)
    dyn = dynamic_interface(describe_export(name, xrpc.describe(iface)))
    async with xrpc.testing.connect(server) as conn:
        yield conn.proxy(dyn, name)


async def test_dynamic_proxy_calls_a_real_server_in_memory() -> None:
    async with dynamic_proxy(Geometry, GeometryImpl(), "Geometry") as geo:
        assert await geo.distance({"x": 0, "y": 0}, {"x": 0, "y": 2}) == 2.0
        assert [p async for p in geo.walk({"x": 0, "y": 0}, 2)] == [{"x": 1.0, "y": 0.0}, {"x": 2.0, "y": 0.0}]
        assert await geo.scale(2, 1.5, "y") == "y*2.0+1.5"
        with pytest.raises(DeclaredError) as info:
            await geo.lookup("nowhere")
        assert type(info.value).__qualname__ == "NotFound" and info.value.args == ("no point named 'nowhere'",)
        with pytest.raises(xrpc.ValidationError):
            await geo.distance(1, 2)


async def test_dynamic_interface_for_given_arguments_leaves_the_defaults_to_the_server() -> None:
    server = xrpc.Server()
    server.export(Geometry, GeometryImpl())
    export = describe_export("Geometry", xrpc.describe(Geometry))
    full = dynamic_interface(export)
    trimmed = dynamic_interface(export, arguments={"scale": ["factor"]})
    assert [p.name for p in xrpc.describe(trimmed).methods["scale"].params] == ["factor"]
    async with xrpc.testing.connect(server) as conn:
        assert await conn.proxy(trimmed, "Geometry").scale(2) == "x*2.0+0.0"
    async with xrpc.testing.connect(server) as conn:  # (a connection caches proxies by interface name)
        with pytest.raises(xrpc.ValidationError):  # every parameter of a signature is sent: offset=None
            await conn.proxy(full, "Geometry").scale(2)


@xrpc.interface
class KeywordOnly(Protocol):
    async def f(self, a: int = 1, *, b: int) -> int: ...


class KeywordOnlyImpl:
    async def f(self, a: int = 1, *, b: int) -> int:
        return a * 10 + b


async def test_dynamic_interface_handles_a_required_argument_after_an_optional_one() -> None:
    async with dynamic_proxy(KeywordOnly, KeywordOnlyImpl(), "KeywordOnly") as k:
        assert await k.f(a=4, b=2) == 42


@pytest.mark.parametrize(
    "bad",
    [
        _export([MethodInfo("class", "unary", [], "int")]),
        _export([MethodInfo("__init__", "unary", [], "int")]),
        _export([MethodInfo("a-b", "unary", [], "int")]),
        _export([MethodInfo("m", "unary", [ParamInfo("import", "int", True)], "int")]),
        _export([MethodInfo("m", "unary", [ParamInfo("self", "int", True)], "int")]),
        _export([MethodInfo("m", "unary", [ParamInfo("x y", "int", True)], "int")]),
        _export([MethodInfo("m", "unary", [ParamInfo("a", "int", True), ParamInfo("a", "int", True)], "int")]),
        _export([MethodInfo("m", "teleport", [], "int")]),
        _export([MethodInfo("m", "unary", [], "int")], interface="bad name"),
        _export([MethodInfo("m", "unary", [], "int")], errors=["os.system()"]),
        _export([MethodInfo("m", "unary", [], "int")], errors=["lambda"]),
    ],
)
def test_dynamic_interface_refuses_names_that_are_not_identifiers(bad: ExportDescription) -> None:
    with pytest.raises(CLIError) as info:
        dynamic_interface(bad)
    assert info.value.code == Exit.CONNECT


def test_no_forbidden_builtins_in_the_cli() -> None:
    # the dynamic interface is made from function objects and type(), never from source text
    import re

    forbidden = re.compile(r"\b(pickle|marshal|shelve)\b|\beval\s*\(|\bexec\s*\(|\bcompile\s*\(")
    for path in (ROOT / "xrpc" / "_cli.py", ROOT / "xrpc" / "__main__.py"):
        assert not forbidden.search(path.read_text()), path
