"""systemd units made from service descriptions (``xrpc service unit``).

The rendered units are read back directive by directive, checked with ``systemd-analyze verify`` when
it is installed (it parses them as systemd does, checks that the program of ``ExecStart=`` exists and
warns about anything it cannot read), and the ``.service``'s command and environment are run under
``systemd-socket-activate`` the way a socket unit would start them.  No test can start the units
under a real systemd: the test machines run none.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import anyio
import anyio.to_thread
import pytest

import xrpc
from xrpc import ServiceDescriptionError
from xrpc._services import ServiceDescription, load_description
from xrpc._units import HARDENING, install_units, render_units, unit_notes

from _procs import short_dir
from _timeouts import T

HERE = Path(__file__).parent
ROOT = HERE.parent
NAME = "com.example.unit"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)")


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(short_dir())
    os.chmod(d, 0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def describe(**fields: Any) -> ServiceDescription:
    fields.setdefault("path", Path(f"/etc/xrpc/services/{NAME}.toml"))
    if "command" not in fields:
        fields.setdefault("module", "helper.service:make_server")
    return ServiceDescription(name=NAME, **fields)


def directives(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections and their ``Key=value`` lines, in order; anything else fails."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), [])
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Za-z]+", key) and current is not None, f"not a directive: {line!r}"
        current.append((key, value))
    return sections


def values(text: str, section: str, key: str) -> list[str]:
    return [v for k, v in directives(text)[section] if k == key]


def one(text: str, section: str, key: str) -> str:
    found = values(text, section, key)
    assert len(found) == 1, (key, found)
    return found[0]


# systemd's reading of a double-quoted word (ExecStart= arguments, Environment= assignments):
# C escapes, then %% for a literal %, then (ExecStart= arguments only) $$ for a literal $
_C_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v", "s": " "}


def unquote_words(value: str, *, dollars: bool) -> list[str]:
    words = []
    i = 0
    while i < len(value):
        if value[i] == " ":
            i += 1
            continue
        assert value[i] == '"', f"an unquoted word in {value!r}"
        i += 1
        out = []
        while value[i] != '"':
            ch = value[i]
            if ch == "\\":
                nxt = value[i + 1]
                if nxt == "x":
                    out.append(chr(int(value[i + 2 : i + 4], 16)))
                    i += 4
                    continue
                out.append(_C_ESCAPES[nxt])
                i += 2
                continue
            if ch == "%":
                assert value[i + 1] in "%t", f"a specifier other than %t in {value!r}"
                i += value[i + 1] == "%"  # %t stays: the manager's runtime directory
            if ch == "$" and dollars:
                assert value[i + 1] == "$", f"a variable in {value!r}"
                i += 1
            out.append(ch)
            i += 1
        words.append("".join(out))
        i += 1
    return words


def exec_argv(service: str) -> list[str]:
    return unquote_words(one(service, "Service", "ExecStart"), dollars=True)


def environment(service: str) -> dict[str, str]:
    env = {}
    for value in values(service, "Service", "Environment"):
        [word] = unquote_words(value, dollars=False)
        k, _, v = word.partition("=")
        env[k] = v
    return env


def verify(units: dict[str, str], directory: Path, *, user: bool = False) -> None:
    """``systemd-analyze verify`` the units: it must exit 0 and say nothing about them."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)")
    directory.mkdir(exist_ok=True)
    for filename, text in units.items():
        (directory / filename).write_text(text)
    env = dict(os.environ)
    args = [SYSTEMD_ANALYZE, "verify", "--man=no"]
    if user:
        runtime = directory / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)  # a user manager needs one
        args.append("--user")
    r = subprocess.run([*args, *(str(directory / f) for f in units)], capture_output=True, text=True, timeout=T, env=env)
    about = [line for line in (r.stdout + r.stderr).splitlines() if str(directory) in line or NAME in line]
    assert r.returncode == 0 and not about, r.stdout + r.stderr


# --------------------------------------------------------------------------- what the units say
def test_a_system_module_service_with_its_own_user(workdir: Path) -> None:
    desc = describe(environment={"PYTHONPATH": "/opt/helper"}, user="root", socket_mode="660", socket_group="root", idle_exit=30)
    units = render_units(desc, "system")
    assert sorted(units) == [f"{NAME}.service", f"{NAME}.socket"]
    sock, service = units[f"{NAME}.socket"], units[f"{NAME}.service"]
    assert one(sock, "Socket", "ListenStream") == f"%t/xrpc/sockets/{NAME}.sock"  # /run/xrpc/sockets under the system manager
    assert one(sock, "Socket", "Accept") == "no"
    assert (one(sock, "Socket", "SocketMode"), one(sock, "Socket", "SocketGroup")) == ("0660", "root")
    assert values(sock, "Socket", "SocketUser") == []
    assert one(sock, "Install", "WantedBy") == "sockets.target"
    assert (one(service, "Unit", "Requires"), one(service, "Unit", "After")) == (f"{NAME}.socket", f"{NAME}.socket")
    assert (one(service, "Service", "Type"), one(service, "Service", "NotifyAccess")) == ("notify", "main")
    assert exec_argv(service) == desc.argv() == [sys.executable, "-m", "xrpc.service", NAME, "--description", str(desc.path)]
    assert one(service, "Service", "WorkingDirectory") == "/"
    assert environment(service) == {"PYTHONPATH": "/opt/helper", "XRPC_SERVICE_NAME": NAME, "XRPC_SERVICE_FILE": str(desc.path)}
    assert one(service, "Service", "Restart") == "on-failure"
    assert one(service, "Service", "User") == "root" and values(service, "Service", "DynamicUser") == []
    for key, value in HARDENING:
        assert one(service, "Service", key) == value
    assert "Install" not in directives(service)  # started by its socket
    verify(units, workdir)


def test_a_system_service_with_a_dynamic_user_and_a_socket_owner(workdir: Path) -> None:
    desc = describe(dynamic_user=True, user="helper", socket_user="root", socket_mode="0600")
    units = render_units(desc, "system")
    service = units[f"{NAME}.service"]
    assert (one(service, "Service", "User"), one(service, "Service", "DynamicUser")) == ("helper", "yes")
    assert one(units[f"{NAME}.socket"], "Socket", "SocketUser") == "root"
    verify(units, workdir)
    assert any("must be able to read" in n for n in unit_notes(desc, "system"))


def test_a_user_command_service(workdir: Path) -> None:
    desc = describe(command=("/bin/sh", "-c", "exec serve"), working_directory=workdir, idle_exit=2.5, environment={"A": "1"})
    units = render_units(desc, "user")
    service = units[f"{NAME}.service"]
    assert exec_argv(service) == ["/bin/sh", "-c", "exec serve"]
    assert one(service, "Service", "WorkingDirectory") == str(workdir)
    sock = f"%t/xrpc/sockets/{NAME}.sock"  # $XDG_RUNTIME_DIR/xrpc/sockets, where the built-in launcher's clients look
    assert one(units[f"{NAME}.socket"], "Socket", "ListenStream") == sock
    assert one(units[f"{NAME}.socket"], "Socket", "SocketMode") == "0600"  # as the built-in launcher's sockets
    assert environment(service) == {
        "A": "1",
        "XRPC_SERVICE_NAME": NAME,
        "XRPC_SERVICE_FILE": str(desc.path),
        "XRPC_SERVICE_URL": f"unix://{sock}",
        "XRPC_SERVICE_SOCKET": sock,
        "XRPC_IDLE_EXIT": "2.5",
    }
    keys = {k for k, _ in directives(service)["Service"]}
    assert not keys & {k for k, _ in HARDENING} and "User" not in keys  # a user manager sandboxes nothing by default
    verify(units, workdir, user=True)


def test_a_user_unit_leaves_out_user_and_says_so() -> None:
    desc = describe(user="helper", dynamic_user=True)
    service = render_units(desc, "user")[f"{NAME}.service"]
    assert values(service, "Service", "User") == values(service, "Service", "DynamicUser") == []
    assert unit_notes(desc, "user") == ["'user' and 'dynamic_user' apply only to a --system unit: a user manager runs services as its own user"]


def test_a_command_that_knows_nothing_of_readiness_is_a_simple_service() -> None:
    service = render_units(describe(command=("/usr/bin/thing",), readiness="socket"), "user")[f"{NAME}.service"]
    assert one(service, "Service", "Type") == "simple" and values(service, "Service", "NotifyAccess") == []


def test_the_socket_of_a_unix_url_and_a_tcp_listen_address(workdir: Path) -> None:
    desc = describe(url="unix:///run/helper/h%20s.sock")
    assert one(render_units(desc, "system")[f"{NAME}.socket"], "Socket", "ListenStream") == "/run/helper/h s.sock"
    assert not any("clients of a system service" in n for n in unit_notes(desc, "system"))
    assert any("url = \"unix:///run/xrpc/sockets/" in n for n in unit_notes(describe(), "system"))

    units = render_units(describe(), "system", listen="tcp://0.0.0.0:4433")
    sock, service = units[f"{NAME}.socket"], units[f"{NAME}.service"]
    assert one(sock, "Socket", "ListenStream") == "0.0.0.0:4433" and values(sock, "Socket", "RemoveOnStop") == []
    assert one(service, "Service", "RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    verify(units, workdir)
    sock = render_units(describe(), "system", listen="tls://[::]:4433")[f"{NAME}.socket"]
    assert one(sock, "Socket", "ListenStream") == "[::]:4433"
    for listen, message in [
        ("tcp://example.com:80", "takes an IP address"),
        ("tcp://127.0.0.1:0", "not port 0"),
        ("memory://x", "not memory://"),
        ("unix:relative.sock", "absolute path"),
        ("unix:///" + "x" * 120, "longer than a Unix socket"),
    ]:
        with pytest.raises(ServiceDescriptionError, match=message):
            render_units(describe(), "system", listen=listen)


@pytest.mark.parametrize("name", ["../../etc/x", "a b", "x\ny", ""])
def test_a_name_that_is_no_service_name_has_no_units(name: str) -> None:
    with pytest.raises(ServiceDescriptionError, match="is not a valid service name"):
        render_units(ServiceDescription(name=name, path=Path("/x.toml"), module="a:b"))


def test_a_description_with_nothing_to_run_has_no_units() -> None:
    desc = ServiceDescription(name=NAME, path=Path("/x.toml"), url="tls://10.0.0.1:4433")
    with pytest.raises(ServiceDescriptionError, match="nothing for a .service unit to run"):
        render_units(desc)


# --------------------------------------------------------------------------- hostile values
def test_hostile_values_are_escaped_into_one_directive_each(workdir: Path) -> None:
    bindir = workdir / "bin 100%"
    bindir.mkdir()
    program = bindir / "true"
    program.symlink_to("/bin/true")  # systemd-analyze checks that the program exists: the escaped path must read back
    home = workdir / "cwd %h"
    args = ("a b", "line\nExecStartPre=/bin/evil", '"quoted" \\ back', "$HOME ${USER}", "%n", "tab\there", "\x1b[0m")
    env = {"NL": "x\nExecStartPre=/bin/evil", "PCT": "%n %%", "DOLLAR": "$HOME", "Q": 'say "hi" \\'}
    desc = describe(command=(str(program), *args), working_directory=home, environment=env, path=workdir / f"{NAME}\n[Service].toml")
    units = render_units(desc, "system")
    service = units[f"{NAME}.service"]
    assert exec_argv(service) == [str(program), *args]
    got = environment(service)
    assert {k: got[k] for k in env} == env
    assert one(service, "Service", "WorkingDirectory") == str(home).replace("%", "%%")
    assert values(service, "Service", "ExecStartPre") == [] and list(directives(service)) == ["Unit", "Service"]
    verify(units, workdir)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"environment": {"BAD-NAME": "1"}}, "'environment' name 'BAD-NAME'"),
        ({"environment": {"A": "bell\x07"}}, "control character other than a newline"),
        ({"working_directory": Path("/srv/x\ny")}, "'working_directory' .* control character"),
        ({"working_directory": Path("/srv/x ")}, "begins or ends with a blank"),
        ({"working_directory": Path("/srv/x\\")}, "continued line"),
        ({"log_file": Path("/var/log/x\n")}, "'log_file'"),
        ({"command": ('/usr/bin/a"b',)}, "quote, a backslash"),
        ({"command": ("/usr/bin/$x",)}, "a '\\$'"),
        ({"command": ("-rm",)}, "which systemd reads as a flag"),
        ({"python": "/opt/py\tthon"}, "'python'"),
        ({"url": "unix:///run/x\\"}, "continued line"),
    ],
)
def test_what_a_unit_cannot_hold_is_refused_naming_the_key(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ServiceDescriptionError, match=message) as info:
        render_units(describe(**fields), "system")
    assert "cannot go into a systemd unit" in str(info.value)


def test_a_relative_program_runs_from_the_working_directory() -> None:
    desc = describe(command=("bin/serve", "--x"), working_directory=Path("/srv/app"))
    assert exec_argv(render_units(desc)[f"{NAME}.service"]) == ["/srv/app/bin/serve", "--x"]
    assert exec_argv(render_units(describe(command=("serve",)))[f"{NAME}.service"]) == ["serve"]  # systemd looks it up


def test_paths_the_sandbox_hides_are_noted_and_home_made_read_only() -> None:
    desc = describe(python="/home/alice/venv/bin/python", path=Path("/tmp/d/com.example.unit.toml"))
    service = render_units(desc, "system")[f"{NAME}.service"]
    assert one(service, "Service", "ProtectHome") == "read-only"
    notes = unit_notes(desc, "system")
    assert any("/home/alice/venv/bin/python is under /home" in n for n in notes)
    assert any("PrivateTmp=yes hides" in n and "/tmp/d/" in n for n in notes)


# --------------------------------------------------------------------------- description keys
def _write(directory: Path, text: str) -> Path:
    path = directory / f"{NAME}.toml"
    path.write_text(f'name = "{NAME}"\n' + text)
    return path


def test_the_unit_keys_of_a_description(workdir: Path) -> None:
    d = load_description(
        _write(workdir, 'module = "a:b"\nsocket_mode = "0660"\nsocket_user = "alice"\nsocket_group = "wheel"\nuser = "helper"\ndynamic_user = true\n')
    )
    assert (d.socket_mode, d.socket_user, d.socket_group, d.user, d.dynamic_user) == ("0660", "alice", "wheel", "helper", True)
    d = load_description(_write(workdir, 'module = "a:b"\nlauncher = "systemd"\nurl = "unix:///run/xrpc/sockets/x.sock"\n'))
    assert d.url == "unix:///run/xrpc/sockets/x.sock" and d.module == "a:b"  # a local service a manager starts


@pytest.mark.parametrize(
    "text, message",
    [
        ('module = "a:b"\nsocket_mode = "999"\n', "'socket_mode' must be an octal mode written as a string"),
        ('module = "a:b"\nsocket_mode = 432\n', "'socket_mode' must be an octal mode"),
        ('module = "a:b"\nsocket_group = "wheel\\n[Service]"\n', "'socket_group' must be a group name"),
        ('module = "a:b"\nuser = "a b"\n', "'user' must be a user name"),
        ('module = "a:b"\nsocket_user = "%n"\n', "'socket_user' must be a user name"),
        ('module = "a:b"\ndynamic_user = "yes"\n', "'dynamic_user' must be true or false"),
        ('module = "a:b"\ncommand = ["x"]\nlauncher = "systemd"\nurl = "unix:///run/x.sock"\n', "one of 'command'"),
        ('module = "a:b"\nurl = "unix:///run/x.sock"\n', 'or add launcher = "systemd"'),
        ('module = "a:b"\nurl = "tls://10.0.0.1:1"\n', "a service with a 'url' runs elsewhere"),
    ],
)
def test_bad_unit_keys_name_the_key(workdir: Path, text: str, message: str) -> None:
    with pytest.raises(ServiceDescriptionError, match=re.escape(message)):
        load_description(_write(workdir, text))


# --------------------------------------------------------------------------- the command
def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xrpc", *args], capture_output=True, text=True, env=env, timeout=3 * T, cwd=str(HERE))


@pytest.fixture
def cli_env(workdir: Path) -> dict[str, str]:
    services = workdir / "services"
    services.mkdir(mode=0o700)
    (services / f"{NAME}.toml").write_text(f'name = "{NAME}"\nmodule = "helper.service:make_server"\nsocket_mode = "0660"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRPC_")}
    env.pop("XDG_RUNTIME_DIR", None)
    env.update(XRPC_SERVICE_PATH=str(services), PYTHONPATH=str(ROOT), NO_COLOR="1")
    env["XRPC_RUNTIME_DIR"] = str(workdir / "rt")
    return env


def test_the_command_prints_both_units(cli_env: dict[str, str]) -> None:
    r = cli(cli_env, "service", "unit", NAME, "--system")
    assert r.returncode == 0, r.stderr
    desc = load_description(Path(cli_env["XRPC_SERVICE_PATH"]) / f"{NAME}.toml")
    units = render_units(desc, "system")
    assert r.stdout == "\n".join(f"# --- {f} ---\n{t}" for f, t in units.items())
    assert "note: clients of a system service connect to its socket" in r.stderr


def test_a_user_unit_listens_where_this_user_s_clients_look(cli_env: dict[str, str]) -> None:
    """With XRPC_RUNTIME_DIR set, clients look there rather than in the manager's runtime directory."""
    r = cli(cli_env, "service", "unit", NAME, "--user")
    assert r.returncode == 0, r.stderr
    expected = Path(cli_env["XRPC_RUNTIME_DIR"]) / "xrpc" / "sockets" / f"{NAME}.sock"
    assert f"ListenStream={expected}\n" in r.stdout
    env = dict(cli_env)
    del env["XRPC_RUNTIME_DIR"]
    assert f"ListenStream=%t/xrpc/sockets/{NAME}.sock\n" in cli(env, "service", "unit", NAME).stdout


def test_install_writes_refuses_to_overwrite_and_forces(cli_env: dict[str, str], workdir: Path) -> None:
    target = workdir / "units"
    r = cli(cli_env, "service", "unit", NAME, "--system", "--install", "--directory", str(target))
    assert r.returncode == 0, r.stderr
    socket_file, service_file = target / f"{NAME}.socket", target / f"{NAME}.service"
    assert r.stdout.splitlines() == [
        f"written {socket_file}",
        f"written {service_file}",
        f"next: systemctl daemon-reload && systemctl enable --now {NAME}.socket",
    ]
    assert oct(service_file.stat().st_mode & 0o777) == "0o644"
    assert "SocketMode=0660" in socket_file.read_text()
    written = service_file.read_text()

    again = cli(cli_env, "service", "unit", NAME, "--system", "--install", "--directory", str(target))
    assert again.returncode == 0 and again.stdout.splitlines()[:2] == [f"unchanged {socket_file}", f"unchanged {service_file}"]

    service_file.write_text(written + "# edited by hand\n")
    user = cli(cli_env, "service", "unit", NAME, "--user", "--install", "--directory", str(target))
    assert user.returncode == 2
    assert f"error: {socket_file} exists with other content: pass --force to replace it" in user.stderr
    assert service_file.read_text() == written + "# edited by hand\n"  # nothing written
    forced = cli(cli_env, "service", "unit", NAME, "--user", "--install", "--force", "--directory", str(target))
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.splitlines()[-1] == f"next: systemctl --user daemon-reload && systemctl --user enable --now {NAME}.socket"
    assert "ProtectSystem" not in service_file.read_text() and service_file.read_text() != written


def test_install_units_is_all_or_nothing(workdir: Path) -> None:
    units = render_units(describe(), "user")
    (workdir / f"{NAME}.service").write_text("[Service]\n")
    with pytest.raises(ServiceDescriptionError, match="exists with other content"):
        install_units(units, workdir)
    assert not (workdir / f"{NAME}.socket").exists()
    assert [s for _, s in install_units(units, workdir, force=True)] == ["written", "written"]
    assert [s for _, s in install_units(units, workdir)] == ["unchanged", "unchanged"]


def test_command_errors(cli_env: dict[str, str]) -> None:
    r = cli(cli_env, "service", "unit", "com.example.nope")
    assert r.returncode == 3 and "no service named 'com.example.nope'" in r.stderr
    r = cli(cli_env, "service", "unit", "bad name")
    assert r.returncode == 2 and "not a valid service name" in r.stderr
    r = cli(cli_env, "service", "unit", NAME, "--listen", "tcp://example.com:1")
    assert r.returncode == 2 and "takes an IP address" in r.stderr
    assert cli(cli_env, "service", "unit", NAME, "--user", "--system").returncode == 2
    r = cli(cli_env, "service")
    assert r.returncode == 2 and "unit" in r.stderr


def test_help_and_docs_agree() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = cli(env, "service", "unit", "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "exit codes:" in r.stdout
    options = set(re.findall(r"--[a-z]+", r.stdout.split("examples:")[0])) - {"--help"}
    assert options == {"--user", "--system", "--install", "--force", "--directory", "--listen"}
    doc = (ROOT / "docs" / "cli.md").read_text()
    synopsis = "xrpc service unit NAME [--user|--system] [--install [--force] [--directory DIR]] [--listen URL]"
    assert synopsis in doc
    assert all(o in synopsis for o in options)
    assert "service" in cli(env, "--help").stdout
    guide = (ROOT / "docs" / "services.md").read_text()
    assert "## Privileged helper with systemd" in guide and "xrpc service unit com.example.helper --system --install" in guide


# --------------------------------------------------------------------------- run as the unit says
@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed (Debian/Ubuntu: apt-get install systemd)")
async def test_the_service_unit_s_command_serves_the_socket_unit_s_socket(workdir: Path) -> None:
    """What systemd would do with the units, as far as this machine allows: listen where the socket
    unit says, start the ``ExecStart=`` argv with the ``Environment=`` and ``WorkingDirectory=`` on
    the first connection, with the socket named as the socket unit names it, and get READY=1 on
    ``$NOTIFY_SOCKET`` (``Type=notify``)."""
    from services_fixtures.probe import Client, Probe

    sock_path = workdir / "u.sock"
    description = workdir / f"{NAME}.toml"
    description.write_text(f'name = "{NAME}"\nmodule = "services_fixtures.probe:make_server"\nidle_exit = 0\nenvironment = {{ PYTHONPATH = "{HERE}" }}\n')
    units = render_units(load_description(description), "user", listen=f"unix://{sock_path}")
    service = units[f"{NAME}.service"]
    assert one(units[f"{NAME}.socket"], "Socket", "ListenStream") == str(sock_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_", "XRPC_", "PYTHON"))}
    setenv = [a for k, v in {**environment(service), "NOTIFY_SOCKET": str(workdir / "notify")}.items() for a in ("-E", f"{k}={v}")]
    argv = [SOCKET_ACTIVATE or "", "-l", str(sock_path), "--fdname", f"{NAME}.socket", *setenv, *exec_argv(service)]
    proc = subprocess.Popen(argv, env=env, cwd=one(service, "Service", "WorkingDirectory"), stderr=subprocess.PIPE)
    try:
        with anyio.fail_after(3 * T):
            while not sock_path.exists():  # polled: systemd-socket-activate says nothing on a pipe when it listens
                assert proc.poll() is None, "systemd-socket-activate exited"
                await anyio.sleep(0.01)

            class Hello:
                async def hello(self, token: str) -> str:
                    return f"ack {token}"

                async def started(self, what: str) -> None:
                    pass

            async with xrpc.connect(f"unix://{sock_path}", exports=[(Client, Hello())], timeout=3 * T) as conn:
                assert await conn.proxy(Probe).pid() == proc.pid  # it exec'd into the unit's command
            notify.setblocking(False)
            said = b""
            while b"READY=1" not in said:
                await anyio.wait_readable(notify)
                said += notify.recv(4096) + b"\n"
            assert await anyio.to_thread.run_sync(proc.wait) == 0  # idle_exit = 0
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(T)
        assert proc.stderr is not None
        proc.stderr.close()


async def test_clients_of_a_unix_url_with_a_module_connect_there_and_never_launch(workdir: Path) -> None:
    """The description a socket unit is made from is also the one its clients find: they connect
    to its url (where systemd listens) and launch nothing, even when nothing listens."""
    from services_fixtures.probe import Probe, make_server

    marker = workdir / "launched"
    sock = workdir / "h.sock"
    (workdir / f"{NAME}.toml").write_text(
        f'name = "{NAME}"\nmodule = "services_fixtures.probe:make_server"\nlauncher = "systemd"\nurl = "unix://{sock}"\n'
        f'environment = {{ PYTHONPATH = "{HERE}", PROBE_LOG = "{marker}" }}\n'
    )
    with anyio.fail_after(3 * T):
        async with xrpc.connect_service(NAME, search_path=[workdir], timeout=T) as sc:
            with pytest.raises(xrpc.ServiceUnavailable, match=re.escape(f"there is no socket at {sock}: the socket unit {NAME}.socket")):
                await sc.proxy(Probe).pid()
            async with make_server().listen(f"unix://{sock}"):  # what the socket unit's service serves
                assert await sc.proxy(Probe).pid() == os.getpid()
        assert sc.launches == 0 and not marker.exists()
