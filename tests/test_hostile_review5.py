"""Hostile review of service description files, URL parsing, ``xrpc call --arg`` and socket
activation's environment.

A local user who may write a description, pick a URL, pass odd command-line bytes, or set
LISTEN_* / NOTIFY_SOCKET plays against the parsers.  Every attack asserts a typed refusal naming
the problem (never a traceback, a hang, or a silently different value).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from xrpc._cli import main as cli_main
from xrpc._cli import parse_json_args, parse_kv
from xrpc._services import ServiceDescriptionError, find_service, load_description
from xrpc._systemd import SocketActivationError, parse_listen_env, sd_notify
from xrpc._transports import ParsedURL

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def svc_dir(tmp_path: Path) -> Path:
    d = tmp_path / "services"
    d.mkdir(mode=0o700)
    os.chmod(tmp_path, 0o700)
    return d


def _write(d: Path, filename: str, raw: bytes) -> Path:
    p = d / filename
    p.write_bytes(raw)
    os.chmod(p, 0o600)
    return p


def _refused(p: Path, *words: str) -> str:
    with pytest.raises(ServiceDescriptionError) as info:
        load_description(p)
    text = str(info.value)
    assert str(p) in text
    for w in words:
        assert w in text, text
    return text


# --------------------------------------------------------------------------- description files
@pytest.mark.parametrize("ext", ["json", "toml"])
def test_a_deeply_nested_description_is_refused_not_a_recursion_error(svc_dir: Path, ext: str) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    if ext == "json":
        raw = b'{"name": "deep", "module": "a:b", "environment": ' + deep + b"}"
    else:
        raw = b'name = "deep"\nmodule = "a:b"\nenvironment = ' + deep + b"\n"
    _refused(_write(svc_dir, f"deep.{ext}", raw), "nested too deeply")


def test_a_deeply_nested_toml_inline_table_is_refused(svc_dir: Path) -> None:
    raw = b'name = "deep"\nmodule = "a:b"\nx = ' + b"{a = " * 5000 + b"1" + b"}" * 5000 + b"\n"
    _refused(_write(svc_dir, "deep.toml", raw), "nested too deeply")


def test_a_json_key_given_twice_is_refused_as_toml_refuses_it(svc_dir: Path) -> None:
    # json.loads keeps the last: the file would run what a reader of its first lines did not expect
    _refused(_write(svc_dir, "dup.json", b'{"name": "dup", "module": "a:b", "module": "evil:run"}'), "'module' is given twice")
    _refused(_write(svc_dir, "dup2.toml", b'name = "dup2"\nmodule = "a:b"\nmodule = "evil:run"\n'), "not valid TOML")


def test_a_module_with_a_trailing_newline_is_refused(svc_dir: Path) -> None:
    # '$' matches before a final newline; the pattern must anchor at the very end
    _refused(_write(svc_dir, "nl.json", json.dumps({"name": "nl", "module": "a:b\n"}).encode()), "'module' must look like")


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"command": ["/bin/tr\0ue"]}, ("'command'[0]", "NUL")),
        ({"command": ["/bin/true"], "working_directory": "/\0"}, ("'working_directory'", "NUL")),
        ({"command": ["/bin/true"], "log_file": "log\0"}, ("'log_file'", "NUL")),
        ({"module": "a:b", "python": "/usr/bin/python3\0"}, ("'python'", "NUL")),
        ({"command": ["/bin/true"], "environment": {"A": "x\0y"}}, ("'environment'", "NUL")),
        ({"command": ["/bin/true"], "environment": {"A=B": "x"}}, ("'environment'", "'A=B'")),
        ({"command": ["/bin/true"], "environment": {"": "x"}}, ("'environment'",)),
        ({"command": ["/bin/true"], "environment": {"A": "\ud800"}}, ("'environment'", "surrogate")),
        ({"command": ["/bin/\ud800"]}, ("'command'[0]", "surrogate")),
    ],
)
def test_strings_that_cannot_be_an_argv_path_or_environment_are_refused_when_read(
    svc_dir: Path, extra: dict, words: tuple[str, ...]
) -> None:
    # before: accepted, then a ValueError / UnicodeEncodeError out of subprocess or open() at launch
    raw = json.dumps({"name": "odd", **extra}).encode()
    _refused(_write(svc_dir, "odd.json", raw), *words)


def test_hostile_descriptions_that_held(svc_dir: Path) -> None:
    cases = {
        "nan": (b'{"name":"nan","module":"a:b","launch_timeout":NaN}', "'launch_timeout'"),
        "nanidle": (b'{"name":"nanidle","module":"a:b","idle_exit":NaN}', "'idle_exit'"),
        "inf": (b'{"name":"inf","module":"a:b","launch_timeout":1e999}', "'launch_timeout'"),
        "big": (b'{"name":"big","module":"a:b","launch_timeout":' + b"9" * 400 + b"}", "'launch_timeout'"),
        "huge": (b'{"name":"huge","module":"a:b","idle_exit":' + b"9" * 10_000 + b"}", "not valid JSON"),
        "neg": (b'{"name":"neg","module":"a:b","idle_exit":-1}', "'idle_exit'"),
        "bool": (b'{"name":"bool","module":"a:b","launch_timeout":true}', "'launch_timeout'"),
        "cmdint": (b'{"name":"cmdint","command":["/bin/true", 3]}', "'command'"),
        "cmdempty": (b'{"name":"cmdempty","command":[]}', "'command'"),
        "cmdstr": (b'{"name":"cmdstr","command":"/bin/true"}', "'command'"),
        "envint": (b'{"name":"envint","module":"a:b","environment":{"A":1}}', "'environment'"),
        "unknown": (b'{"name":"unknown","module":"a:b","exec":"x","zzz":1}', "'exec', 'zzz'"),
        "list": (b"[1]", "table of keys"),
        "badutf": (b'{"name":"badutf","module":"a:b","x":"\xff"}', "not valid JSON"),
        "url": (b'{"name":"url","url":"tcp://h:99999999999999999999"}', "'url'"),
    }
    for name, (raw, word) in cases.items():
        _refused(_write(svc_dir, f"{name}.json", raw), word)
    _refused(_write(svc_dir, "badutf8.toml", b'name = "badutf8"\nmodule = "a:b"\n# \xff\n'), "not valid TOML")
    _refused(_write(svc_dir, "date.toml", b'name = "date"\nmodule = "a:b"\nlaunch_timeout = 1979-05-27\n'), "'launch_timeout'")


def test_a_fifo_or_directory_named_as_a_description_is_not_read(svc_dir: Path) -> None:
    os.mkfifo(svc_dir / "fifo.toml", 0o600)
    (svc_dir / "dir.toml").mkdir(mode=0o700)
    from xrpc._services import ServiceNotFound

    for name in ("fifo", "dir"):
        with pytest.raises(ServiceNotFound):
            find_service(name, search_path=[svc_dir])  # neither hangs on the FIFO nor reads the directory


# --------------------------------------------------------------------------- URLs
@pytest.mark.parametrize("url", ["unix:///tmp/a\tb.sock", "unix:///tmp/a\nb.sock", "tcp://127.0.0.1:80\n", "tcp://h\r:1", "memory://a\x00"])
def test_a_url_with_control_characters_is_refused_not_silently_changed(url: str) -> None:
    # urlsplit drops tabs and newlines: unix:///tmp/a\tb.sock connected to /tmp/ab.sock
    with pytest.raises(ValueError, match="control characters"):
        ParsedURL(url)


def test_a_unix_url_whose_path_is_not_utf8_or_holds_nul_is_refused() -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        ParsedURL("unix:///tmp/%ff.sock")  # was silently the path '/tmp/\ufffd.sock'
    with pytest.raises(ValueError, match="NUL"):
        ParsedURL("unix:///tmp/a%00b.sock")
    assert ParsedURL("unix:///tmp/%C3%A9%20x.sock").path == "/tmp/\u00e9 x.sock"


@pytest.mark.parametrize("url", ["tcp://h: 5", "tcp://h:+5", "tcp://h:\u0665", "tcp://h:5:6", "tcp://[::1:5", "tcp://:5", "tcp://h", "unix://x/y", "unix://", "ftp://h:1"])
def test_odd_urls_that_held(url: str) -> None:
    with pytest.raises(ValueError):
        ParsedURL(url)


# --------------------------------------------------------------------------- xrpc call --arg / --json
def test_a_non_utf8_arg_or_json_is_a_usage_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    bad = os.fsdecode(b"\xff")  # what argv holds for a byte that is not UTF-8
    for argv in (["call", "unix:///nonexistent/x.sock", "m", "--arg", "x=" + bad], ["call", "unix:///nonexistent/x.sock", "m", "--json", bad]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "UTF-8" in err and "Traceback" not in err


def test_a_deeply_nested_arg_or_json_is_a_usage_error_not_a_recursion_error(capsys: pytest.CaptureFixture[str]) -> None:
    deep = "[" * 100_000 + "]" * 100_000  # too deep for the decoder on every Python (3.13 takes 3,000)
    for argv in (["call", "unix:///nonexistent/x.sock", "m", "--arg", "x=" + deep], ["call", "unix:///nonexistent/x.sock", "m", "--json", '{"x":' + deep + "}"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "nested too deeply" in err and "Traceback" not in err


def test_arg_parsing_that_held() -> None:
    assert parse_kv(["n=3", "s=origin", "q=\"3\"", "e="]) == {"n": 3, "s": "origin", "q": "3", "e": ""}
    assert parse_json_args('{"a": 1}') == {"a": 1}


def test_a_peer_describing_an_absurdly_nested_type_does_not_crash_coercion() -> None:
    from xrpc._cli import coerce_kv
    from xrpc._introspect import MethodInfo, ParamInfo

    deep = "Optional[" * 5000 + "str" + "]" * 5000
    m = MethodInfo(name="m", kind="unary", params=[ParamInfo(name="x", type=deep, required=True)], reply="None")
    given = {"x": 3}
    coerce_kv(m, {"x": "3"}, given)
    assert given == {"x": 3}


# --------------------------------------------------------------------------- socket activation
@pytest.mark.parametrize("fds", [" 1", "+1", "1_0", "\u0661", "0x1", "-1", "4097", "9" * 5000, ""])
def test_listen_fds_that_is_not_plain_ascii_digits_is_refused(fds: str) -> None:
    with pytest.raises(SocketActivationError):
        parse_listen_env({"LISTEN_FDS": fds, "LISTEN_PID": "42"}, 42)


@pytest.mark.parametrize("pid", [" 42", "+42", "4_2", "\u0664\u0662", "42\n"])
def test_listen_pid_that_is_not_plain_ascii_digits_is_refused(pid: str) -> None:
    with pytest.raises(SocketActivationError):
        parse_listen_env({"LISTEN_FDS": "1", "LISTEN_PID": pid}, 42)


def test_listen_fdnames_that_held() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "42"}
    assert parse_listen_env({**env, "LISTEN_FDNAMES": "a:"}, 42) == [(3, "a"), (4, "")]
    for names in ("a", "a:b:c", ":::", "x" * 100_000):
        with pytest.raises(SocketActivationError):
            parse_listen_env({**env, "LISTEN_FDNAMES": names}, 42)


def test_notify_socket_with_bytes_that_are_not_utf8_does_not_crash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    name = b"\0xrpc-hostile5-\xff" + str(os.getpid()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + os.fsdecode(name[1:]))  # as os.environ decodes it
        assert sd_notify("READY=1") is True  # was UnicodeEncodeError
        assert rx.recv(100) == b"READY=1"
    for target in ("/nonexistent/notify", "@", "relative", "/" + "x" * 5000, str(tmp_path)):
        monkeypatch.setenv("NOTIFY_SOCKET", target)
        assert sd_notify("READY=1") is False
