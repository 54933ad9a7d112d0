"""The examples and the guides, run as a user would run them.

- Each ``examples/*.py`` (but progress, calculator and renderer, which ``test_streams`` and
  ``test_objects`` run) is started as ``python examples/X.py`` and its output checked.
- ``docs/tutorial.md`` and ``docs/testing.md`` are executed: every ``<!-- file: NAME -->`` code block
  is written to a temporary directory and every ``console`` block's ``$ command`` is run there, its
  output compared with the lines shown under it (``&`` starts a background server whose first line
  is compared; ``<!-- no-test -->`` skips a block).  ``/tmp/`` in the page stands for that directory.
- ``docs/api.md`` must be what ``docs/gen_api.py`` generates from the code as it is now.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from _timeouts import T
from _procs import short_dir

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
EXAMPLE_T = 6 * T  # upper bound for one example or one command (each starts an interpreter)

pytestmark = pytest.mark.timeout(180)


def run_example(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=EXAMPLE_T,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode == 0, f"{name} exited with {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


# --------------------------------------------------------------------------- examples
def test_quickstart() -> None:
    out = run_example("quickstart.py").stdout.splitlines()
    assert out[0] == "distance: 5.0"
    assert out[1:4] == [f"walked to Point(x={x}, y=1.0)" for x in (1.0, 2.0, 3.0)]
    assert out[4] == "NotFound: ('atlantis',)"
    assert out[5].startswith("refused before the method ran: argument 'a' of Geometry.distance refused")


def test_privileged_helper() -> None:
    res = run_example("privileged_helper.py")
    out = res.stdout.splitlines()
    assert out[0] == f'helper accepts: same_user and exe == "{sys.executable}"'
    assert out[1].startswith("installed etc/app.conf (12 bytes, sha256 ")
    assert out[2].startswith("installed bin/tool (18 bytes, sha256 ")
    assert out[3:5] == ["refused: ../../etc/passwd is outside the helper's root", "refused: /etc/shadow is absolute"]
    assert out[5] == "stranger: install_file allowed (var/stranger.txt)"
    assert out[6] == "stranger: uninstall_all refused: PeerRejected (Installer.uninstall_all: refused)"
    assert out[7] == "files: bin/tool, etc/app.conf, var/stranger.txt"
    assert out[8:10] == ["uninstalled 3 files (allowed: this is the app)", "files after: []"]
    assert out[10] == "impostor refused by the app: PeerRejected (not the helper it launched)"
    assert len(out) == 11
    # the refusals are logged (by the helper, and by the app), one line each
    assert len(re.findall(r"refused call Installer\.uninstall_all .*: pid == \d+ failed", res.stderr)) == 1
    assert len(re.findall(r"does not satisfy the requirement: pid == \d+ failed", res.stderr)) == 1


def test_plugin_host() -> None:
    out = run_example("plugin_host.py").stdout.splitlines()
    assert out[:8] == [
        "  [wordcount] activated",
        "loaded wordcount 1.2 (handles .txt, .md)",
        "  [wordcount] progress 1/3",
        "  [wordcount] progress 2/3",
        "  [wordcount] progress 3/3",
        "  [wordcount] counted notes.txt",
        "wordcount: notes.txt -> 9 words, 3 lines",
        "  [wordcount] progress 1/1",
    ]
    assert "wordcount: host objects still held by the plug-in: 0" in out
    assert "shout: notes.txt -> BUY MILK / CALL THE PLUMBER TODAY / XRPC IS TYPED!!!" in out
    assert "shout: empty.txt failed: empty.txt is empty" in out
    assert "shout: host objects still held by the plug-in: 0" in out
    crash = out.index("  [crashy] about to crash")
    assert out[crash + 1] == "crashy: the plug-in process died (ConnectionInterrupted); the host carries on"
    assert out[-1] == "plug-in exit codes: wordcount=0, shout=0, crashy=70"


def test_file_indexer() -> None:
    out = run_example("file_indexer.py").stdout.splitlines()
    assert out[0] == "TODO: 1 match: dir3/file07.txt:26: TODO: rewrite in xrpc"
    assert out[1] == "  indexer report: SearchReport(produced=1, files=40, outcome='finished')"
    assert out[2] == "first 5 needles: " + ", ".join(f"dir0/file00.txt:{n}" for n in (1, 3, 5, 7, 9))
    m = re.fullmatch(r"  indexer report: stopped early after (\d+) of (\d+) matches, (\d+) files opened", out[3])
    assert m, out[3]
    produced, total, files = map(int, m.groups())
    assert total == 500
    # backpressure: with a window of 8 the indexer ran at most about two windows ahead, then stopped
    assert 5 <= produced <= 5 + 2 * 8, produced
    assert files < 40
    assert out[4] == "BadRoot: missing is not a directory"


_SPAN = re.compile(r"span (\S+) kind=(\w+) trace=([0-9a-f]{32}) span=([0-9a-f]{16}) parent=(\S+) status=(.*)")


def _check_otel_output(stdout: str) -> None:
    lines = stdout.splitlines()
    client_at = lines.index("client spans:")
    server_at = lines.index("server spans (printed by the service process):")
    client = {m.group(1): m.groups() for line in lines[client_at:server_at] if (m := _SPAN.fullmatch(line))}
    server = {m.group(1): m.groups() for line in lines[server_at:] if (m := _SPAN.fullmatch(line))}
    assert set(client) == {"Shop/price", "Shop/buy", "Shop/restock", "visit"}
    assert set(server) == {"Shop/price", "Shop/buy", "Shop/restock"}
    trace_ids = {s[2] for s in [*client.values(), *server.values()]}
    assert len(trace_ids) == 1, "every span belongs to the one trace of the visit"
    root = client["visit"]
    assert root[1] == "INTERNAL" and root[4] == "-"
    for name, (_, kind, _, span_id, parent, status) in server.items():
        assert kind == "SERVER"
        assert parent == client[name][3], f"the server span of {name} is a child of its client span"
        assert client[name][4] == root[3] and client[name][1] == "CLIENT"
    assert server["Shop/buy"][5] == client["Shop/buy"][5] == "ERROR OutOfStock"
    assert server["Shop/price"][5] == server["Shop/restock"][5] == "OK"
    assert "price of tea: 3.5" in lines and "OutOfStock: only 2 cake left" in lines
    assert "restocked: [10, 20, 30]" in lines


def test_otel_middleware() -> None:
    """Runs with whatever is installed: OpenTelemetry's SDK if importable, the built-in tracer otherwise."""
    probe = subprocess.run([sys.executable, "-c", "import opentelemetry.sdk.trace"], capture_output=True, timeout=EXAMPLE_T)
    res = run_example("otel_middleware.py")
    first = res.stdout.splitlines()[0]
    if probe.returncode == 0:
        assert first == "tracing with OpenTelemetry (opentelemetry-sdk)"
    else:
        assert first == "opentelemetry is not installed: printing spans with a tiny built-in tracer instead"
    _check_otel_output(res.stdout)


def test_otel_middleware_without_opentelemetry(tmp_path: Path) -> None:
    """The fallback, even where OpenTelemetry is installed: a stub package that fails to import."""
    stub = tmp_path / "opentelemetry"
    stub.mkdir()
    (stub / "__init__.py").write_text('raise ImportError("hidden from this test")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    res = run_example("otel_middleware.py", env=env)
    assert res.stdout.splitlines()[0] == "opentelemetry is not installed: printing spans with a tiny built-in tracer instead"
    _check_otel_output(res.stdout)


# --------------------------------------------------------------------------- the API reference
def test_api_reference_is_current(tmp_path: Path) -> None:
    out = tmp_path / "api.md"
    res = subprocess.run([sys.executable, str(DOCS / "gen_api.py"), str(out)], capture_output=True, text=True, timeout=EXAMPLE_T, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    generated = out.read_text(encoding="utf-8")
    assert generated == (DOCS / "api.md").read_text(encoding="utf-8"), "docs/api.md is stale: run python docs/gen_api.py"


def test_api_reference_covers_every_public_name() -> None:
    import xrpc

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    for name in xrpc.__all__:
        assert f"### `xrpc.{name}`" in text, name
    assert " at 0x" not in text  # no object addresses: the output is the same on every run


# --------------------------------------------------------------------------- the guides, executed
class Block:
    def __init__(self, marker: str, lang: str, body: str) -> None:
        self.marker, self.lang, self.body = marker, lang, body


def parse_blocks(path: Path) -> list[Block]:
    """Fenced code blocks, each with the ``<!-- ... -->`` marker on the line before it (if any)."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```") and len(line) > 3:
            marker = lines[i - 1].strip() if i > 0 and lines[i - 1].startswith("<!--") else ""
            end = lines.index("```", i + 1)
            blocks.append(Block(marker, line[3:].strip(), "\n".join(lines[i + 1 : end]) + "\n"))
            i = end + 1
        else:
            i += 1
    return blocks


class Session:
    """A directory to run a guide in, and the background servers it started."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.background: list[subprocess.Popen[str]] = []
        self.env = {**os.environ, "NO_COLOR": "1"}

    def local(self, text: str) -> str:
        return text.replace("/tmp/", f"{self.dir}/")

    def write(self, block: Block) -> None:
        name = block.marker.removeprefix("<!-- file:").removesuffix("-->").strip()
        Path(self.dir, name).write_text(self.local(block.body), encoding="utf-8")

    def argv(self, command: str) -> list[str]:
        words = shlex.split(self.local(command))
        if words[0] == "python":
            words[0] = sys.executable
            if words[1:3] == ["-m", "pytest"]:
                words[3:3] = ["-p", "no:cacheprovider"]
            return words
        if words[0] == "xrpc":
            return [sys.executable, "-m", "xrpc", *words[1:]]
        raise AssertionError(f"the guide runs a command this test does not know: {command}")

    def console(self, block: Block) -> None:
        steps: list[tuple[str, list[str]]] = []
        for line in block.body.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(self.local(line))
        for command, expected in steps:
            if command.endswith(" &"):
                self.start(command[:-2], expected)
            else:
                self.run(command, expected)

    def start(self, command: str, expected: list[str]) -> None:
        proc = subprocess.Popen(self.argv(command), cwd=self.dir, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.background.append(proc)
        assert proc.stdout is not None
        first = proc.stdout.readline().rstrip("\n")
        assert [first] == expected[:1], f"$ {command}"

    def run(self, command: str, expected: list[str]) -> None:
        res = subprocess.run(self.argv(command), cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=EXAMPLE_T)
        shown = (res.stdout + res.stderr).splitlines()
        if expected and expected[0].startswith("error:"):
            assert res.returncode != 0, f"$ {command}"
        else:
            assert res.returncode == 0, f"$ {command}\n{res.stdout}\n{res.stderr}"
        if expected:
            assert shown == expected, f"$ {command}"
        elif "pytest" in command:
            assert re.search(r"\b\d+ passed\b", res.stdout) and " failed" not in res.stdout, res.stdout

    def close(self) -> None:
        for proc in self.background:
            proc.terminate()
        for proc in self.background:
            proc.wait(timeout=EXAMPLE_T)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def session() -> Iterator[Session]:
    directory = short_dir()
    s = Session(directory)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(directory, ignore_errors=True)


def execute(session: Session, path: Path, *, files_only: bool = False) -> int:
    ran = 0
    for block in parse_blocks(path):
        if block.marker.startswith("<!-- file:"):
            session.write(block)
        elif block.lang == "console" and block.marker != "<!-- no-test -->" and not files_only:
            session.console(block)
            ran += 1
    return ran


def test_tutorial(session: Session) -> None:
    assert execute(session, DOCS / "tutorial.md") >= 8
    assert {"notes_api.py", "notes_service.py", "notes_server.py", "test_notes.py"} <= set(os.listdir(session.dir))


def test_testing_guide(session: Session) -> None:
    execute(session, DOCS / "tutorial.md", files_only=True)
    assert execute(session, DOCS / "testing.md") == 1
