"""systemd units for a service: the ``.socket`` and ``.service`` pair that ``xrpc service unit`` writes.

Theory of operation
-------------------
``render_units(desc, scope)`` turns a service description into the text of two unit files, with
no I/O: ``NAME.socket`` listens where clients look for the service (``Accept=no``: one process
serves every connection), and ``NAME.service`` runs what the built-in launcher would run
(``desc.argv()``), as ``Type=notify`` (``serve_service`` and ``python -m xrpc.service`` send
``READY=1``), with the description's environment and working directory.  A ``system`` unit adds
sandboxing defaults for a helper that runs as root or as its own user; drop-ins
(``systemctl edit NAME.service``) loosen them where a service needs more.

Where the socket is: the description's ``url`` when it is a ``unix://`` one, else
``%t/xrpc/sockets/NAME.sock``.  ``%t`` is the manager's runtime directory: ``$XDG_RUNTIME_DIR`` for a
user manager, which is where a client of the built-in launcher looks (``socket_path``), and
``/run`` for the system manager.  ``listen=`` overrides it (a unix path, or a TCP address for a
service that remote clients reach).

Every value written into a unit is either quoted the way systemd unquotes it (``ExecStart=`` words
and ``Environment=`` assignments: C escapes, ``%%`` for ``%``, ``$$`` for ``$`` where systemd
substitutes variables) or checked to be something systemd reads back literally (paths, names);
what cannot be written so is refused with a ``ServiceDescriptionError`` that names the key.  No
value can end a line, so none can add a directive.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Literal, Mapping, Sequence

from ._services import ServiceDescription, ServiceDescriptionError
from ._transports import ParsedURL

__all__ = (
    "HARDENING",
    "SCOPES",
    "Scope",
    "UnitExists",
    "install_units",
    "listen_url",
    "next_steps",
    "render_units",
    "unit_dir",
    "unit_notes",
    "unit_search_dirs",
)

Scope = Literal["user", "system"]
SCOPES: tuple[Scope, ...] = ("user", "system")

#: What a ``system`` unit sets for a helper, before what the description asks
#: (``RestrictAddressFamilies=`` gets ``AF_INET AF_INET6`` when the socket is TCP).
HARDENING: tuple[tuple[str, str], ...] = (
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectControlGroups", "yes"),
    ("RestrictAddressFamilies", "AF_UNIX"),
    ("RestrictNamespaces", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("LockPersonality", "yes"),
    ("RestrictRealtime", "yes"),
    ("SystemCallArchitectures", "native"),
)

_DEFAULT_SOCKET = "%t/xrpc/sockets/{name}.sock"
_SOCKET_MODE = "0600"  # as the built-in launcher's sockets: only the owner connects unless the description says so
_MAX_UNIX_PATH = 107
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_UNIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z")  # a service name, as descriptions take it
_PREFIXES = "@-:+!|"  # what systemd reads as flags at the start of ExecStart='s first word
_HOME_DIRS = ("/home", "/root", "/run/user")  # what ProtectHome=yes hides
_TMP_DIRS = ("/tmp", "/var/tmp")  # what PrivateTmp=yes replaces


class UnitExists(ServiceDescriptionError):
    """``install_units`` found a unit file that differs from the one it would write (and no ``force``)."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


def _refuse(desc: ServiceDescription, key: str, why: str) -> ServiceDescriptionError:
    return ServiceDescriptionError(f"{desc.path}: {key} cannot go into a systemd unit: {why}")


# --------------------------------------------------------------------------- quoting
def _escape(text: str, *, dollars: bool) -> str:
    """``text`` as the inside of a double-quoted systemd word: C escapes for quotes, backslashes
    and control characters, ``%%`` for ``%`` (specifiers), ``$$`` for ``$`` where systemd
    substitutes variables (``ExecStart=`` arguments, not ``Environment=``)."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif _CONTROL.match(ch):
            out.append(f"\\x{ord(ch):02x}")
        elif ch == "%":
            out.append("%%")
        elif ch == "$" and dollars:
            out.append("$$")
        else:
            out.append(ch)
    return "".join(out)


def _literal(desc: ServiceDescription, key: str, text: str) -> str:
    """``text`` for a directive that systemd reads literally (a path): only ``%`` is special; what
    it would read otherwise (a control character, surrounding blanks, a trailing backslash that
    joins the next line) is refused."""
    if _CONTROL.search(text):
        raise _refuse(desc, key, f"{text!r} holds a control character")
    if text != text.strip():
        raise _refuse(desc, key, f"{text!r} begins or ends with a blank, which systemd strips")
    if text.endswith("\\"):
        raise _refuse(desc, key, f"{text!r} ends with a backslash, which systemd reads as a continued line")
    return text.replace("%", "%%")


def _abs_path(desc: ServiceDescription, key: str, path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if not text.startswith("/"):
        raise _refuse(desc, key, f"{text!r} is not an absolute path")
    return _literal(desc, key, text)


def _comment(text: str) -> str:
    """``text`` for a comment line: no control character, no backslash left at the end."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text.replace("\\", "\\\\"))


# --------------------------------------------------------------------------- what goes in
def listen_url(desc: ServiceDescription, listen: str | None = None) -> str | None:
    """The URL the socket unit listens on: ``listen``, else the description's ``unix://`` url,
    else None (the default ``%t/xrpc/sockets/NAME.sock``)."""
    if listen is not None:
        return listen
    if desc.url is not None and desc.url.startswith("unix:"):
        return desc.url
    return None


def _listen_stream(desc: ServiceDescription, listen: str | None) -> tuple[str, bool]:
    """The ``ListenStream=`` value, and whether it is TCP."""
    url = listen_url(desc, listen)
    key = "'url'" if listen is None else "the listen URL"
    if url is None:
        return _DEFAULT_SOCKET.format(name=desc.name), False
    try:
        parsed = ParsedURL(url)
    except ValueError as exc:
        raise _refuse(desc, key, str(exc)) from None
    if parsed.scheme == "unix":
        if not parsed.path.startswith("/"):
            raise _refuse(desc, key, f"{url!r}: a socket unit listens on an absolute path (unix:///abs/path.sock)")
        if len(os.fsencode(parsed.path)) > _MAX_UNIX_PATH:
            raise _refuse(desc, key, f"{url!r}: the path is longer than a Unix socket's {_MAX_UNIX_PATH} bytes")
        return _abs_path(desc, key, parsed.path), False
    if parsed.scheme in ("tcp", "tls"):
        try:
            address = ipaddress.ip_address(parsed.host)
        except ValueError:
            raise _refuse(desc, key, f"{url!r}: ListenStream= takes an IP address (0.0.0.0, [::], 127.0.0.1), not a host name") from None
        if not parsed.port:
            raise _refuse(desc, key, f"{url!r}: a socket unit listens on a fixed port, not port 0")
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"{host}:{parsed.port}", True
    raise _refuse(desc, key, f"{url!r}: a socket unit listens on unix:// or tcp:// (tls://), not {parsed.scheme}://")


def _exec_start(desc: ServiceDescription) -> tuple[str, list[str]]:
    """The ``ExecStart=`` value and the absolute paths the program needs."""
    if desc.command is None and desc.module is None:
        raise ServiceDescriptionError(
            f"{desc.path}: {desc.name!r} has no 'command' or 'module': there is nothing for a .service unit to run"
        )
    argv = desc.argv()
    program = argv[0]
    key = "'command'[0]" if desc.command is not None else "'python'"
    if "/" in program and not program.startswith("/"):
        program = str(desc.working_directory / program)  # as the launcher runs it: from the working directory
    if not program.startswith("/") and program[:1] in _PREFIXES:
        raise _refuse(desc, key, f"{program!r} begins with {program[0]!r}, which systemd reads as a flag: give its absolute path")
    if _CONTROL.search(program) or any(c in program for c in "\"'\\$"):
        raise _refuse(desc, key, f"{program!r}: systemd runs no program whose path holds a quote, a backslash, a '$' or a control character")
    words = [_escape(program, dollars=False)] + [_escape(a, dollars=True) for a in argv[1:]]
    needs = [program] if program.startswith("/") else []
    if desc.module is not None:
        needs.append(str(desc.path))
    return " ".join(f'"{w}"' for w in words), needs


def _environment(desc: ServiceDescription, listen: str | None) -> list[str]:
    """The ``Environment=`` lines: the description's, then what the built-in launcher tells a
    service, but for the readiness pipe and the lock (``serve_service`` finds the inherited
    socket and reports readiness to systemd)."""
    lines = [_env_line(desc, k, v) for k, v in desc.environment.items()]
    lines += [_env_line(desc, "XRPC_SERVICE_NAME", desc.name), _env_line(desc, "XRPC_SERVICE_FILE", str(desc.path))]
    if desc.command is None:
        return lines  # python -m xrpc.service reads the description itself
    url = listen_url(desc, listen)
    if url is None:
        path = _DEFAULT_SOCKET.format(name=desc.name)  # safe characters, and a %t for systemd to expand
        lines += [f'Environment="XRPC_SERVICE_URL=unix://{path}"', f'Environment="XRPC_SERVICE_SOCKET={path}"']
    else:
        lines.append(_env_line(desc, "XRPC_SERVICE_URL", url))
        parsed = ParsedURL(url)  # checked by _listen_stream
        if parsed.scheme == "unix":
            lines.append(_env_line(desc, "XRPC_SERVICE_SOCKET", parsed.path))
    if desc.idle_exit is not None:
        lines.append(_env_line(desc, "XRPC_IDLE_EXIT", repr(desc.idle_exit)))
    return lines


def _env_line(desc: ServiceDescription, name: str, value: str) -> str:
    if not _ENV_NAME.match(name):
        raise _refuse(desc, f"'environment' name {name!r}", "systemd takes variable names of letters, digits and '_' only")
    if _CONTROL.search(value.replace("\n", "").replace("\t", "")):
        raise _refuse(desc, f"'environment'[{name!r}]", f"{value!r} holds a control character other than a newline or a tab")
    return f'Environment="{name}={_escape(value, dollars=False)}"'


def _timespan(seconds: float) -> str:
    """``seconds`` as systemd reads a time span: whole milliseconds (at least one; systemd reads no
    exponent such as ``1e-05s``), or ``infinity`` past what its 64-bit microseconds hold."""
    ms = math.ceil(seconds * 1000)
    if ms >= 2**64 // 1000:
        return "infinity"
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{max(ms, 1)}ms"


def _under(path: str, dirs: Sequence[str]) -> str | None:
    for d in dirs:
        if path == d or path.startswith(d + "/"):
            return d
    return None


# --------------------------------------------------------------------------- the units
def render_units(desc: ServiceDescription, scope: Scope = "user", *, listen: str | None = None) -> dict[str, str]:
    """The ``NAME.socket`` and ``NAME.service`` units for ``desc``, by file name.

    ``scope`` is ``"user"`` (a user manager: ``systemctl --user``) or ``"system"`` (adds the
    hardening of ``HARDENING``, ``User=`` / ``DynamicUser=`` from the description).  ``listen``
    overrides where the socket listens.  Raises ``ServiceDescriptionError`` for a value that a unit
    cannot hold (it names the key).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, not {scope!r}")
    name = desc.name
    if not _UNIT_NAME.match(name) or ".." in name:
        raise ServiceDescriptionError(f"{desc.path}: {name!r} is not a valid service name")
    stream, inet = _listen_stream(desc, listen)
    exec_start, _ = _exec_start(desc)
    origin = f"# Generated by 'xrpc service unit' ({scope} scope) from {_comment(str(desc.path))}\n"

    sock = [origin, "[Unit]", f"Description=xrpc service {name} (socket)", "", "[Socket]", f"ListenStream={stream}", "Accept=no"]
    sock.append(f"SocketMode={(desc.socket_mode or _SOCKET_MODE).zfill(4)}")
    if desc.socket_user is not None:
        sock.append(f"SocketUser={desc.socket_user}")
    if desc.socket_group is not None:
        sock.append(f"SocketGroup={desc.socket_group}")
    if not inet:
        sock.append("RemoveOnStop=yes")
    sock += ["", "[Install]", "WantedBy=sockets.target"]

    notify = desc.module is not None or desc.readiness == "pipe"
    svc = [origin, "[Unit]", f"Description=xrpc service {name}", f"Requires={name}.socket", f"After={name}.socket", "", "[Service]"]
    svc.append("Type=notify" if notify else "Type=simple")
    if notify:
        svc.append("NotifyAccess=main")
    svc.append(f"ExecStart={exec_start}")
    svc.append("WorkingDirectory=" + _abs_path(desc, "'working_directory'", desc.working_directory))
    svc += _environment(desc, listen)
    if desc.log_file is not None:
        log = _abs_path(desc, "'log_file'", desc.log_file)
        svc += [f"StandardOutput=append:{log}", f"StandardError=append:{log}"]
    svc += ["Restart=on-failure", f"TimeoutStartSec={_timespan(desc.launch_timeout)}"]
    if scope == "system":
        if desc.user is not None:
            svc.append(f"User={desc.user}")
        if desc.dynamic_user:
            svc.append("DynamicUser=yes")
        protect_home = "read-only" if _home_paths(desc) else "yes"
        for key, value in HARDENING:
            if key == "ProtectHome":
                value = protect_home
            elif key == "RestrictAddressFamilies" and inet:
                value = "AF_UNIX AF_INET AF_INET6"
            svc.append(f"{key}={value}")
    return {f"{name}.socket": "\n".join(sock) + "\n", f"{name}.service": "\n".join(svc) + "\n"}


def _needed_paths(desc: ServiceDescription) -> list[str]:
    _, needs = _exec_start(desc)
    needs.append(str(desc.working_directory))
    if desc.log_file is not None:
        needs.append(str(desc.log_file))
    return needs


def _home_paths(desc: ServiceDescription) -> list[str]:
    return [p for p in _needed_paths(desc) if _under(p, _HOME_DIRS)]


def unit_notes(desc: ServiceDescription, scope: Scope = "user", *, listen: str | None = None) -> list[str]:
    """What the person installing the units should know: keys a user unit cannot apply, paths the
    sandbox hides or makes read-only, where clients of a system service must connect."""
    notes = []
    _listen_stream(desc, listen)  # refuses what render_units refuses
    if scope == "user":
        ignored = [k for k, v in (("user", desc.user), ("dynamic_user", desc.dynamic_user)) if v]
        if ignored:
            verb = "apply" if len(ignored) > 1 else "applies"
            notes.append(f"{' and '.join(map(repr, ignored))} {verb} only to a --system unit: a user manager runs services as its own user")
        return notes
    for path in _home_paths(desc):
        notes.append(f"{path} is under {_under(path, _HOME_DIRS)}: the unit sets ProtectHome=read-only instead of yes")
    for path in _needed_paths(desc):
        if _under(path, _TMP_DIRS):
            notes.append(f"{path} is under {_under(path, _TMP_DIRS)}, which PrivateTmp=yes hides from the service: move it")
    if (desc.dynamic_user or desc.user not in (None, "root", "0")) and desc.module is not None:
        notes.append(f"the service runs as {desc.user or 'a dynamic user'}: it must be able to read {desc.path} and the Python it runs")
    if listen_url(desc, listen) is None:
        path = _DEFAULT_SOCKET.format(name=desc.name).replace("%t", "/run")
        notes.append(
            f"clients of a system service connect to its socket, {path}: "
            f'give the description url = "unix://{path}" and launcher = "systemd" so that they connect there instead of launching it'
        )
    if desc.launcher != "systemd":
        notes.append('the description says launcher = "builtin": add launcher = "systemd" so that clients never launch what systemd starts')
    return notes


# --------------------------------------------------------------------------- installing
def unit_dir(scope: Scope) -> Path:
    """Where units are installed: ``$XDG_CONFIG_HOME/systemd/user`` (default ``~/.config``) or
    ``/etc/systemd/system``."""
    if scope == "system":
        return Path("/etc/systemd/system")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "systemd" / "user"


def unit_search_dirs(scope: Scope) -> list[Path]:
    """The other directories the service manager of ``scope`` reads units from (besides
    ``unit_dir(scope)``): a unit of the same name there is another program's, which a unit written
    by ``install_units`` would replace or be hidden by."""
    if scope == "system":
        names = ["/run/systemd/system", "/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"]
    else:
        data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        names = [
            "/etc/systemd/user",
            f"{data}/systemd/user",
            "/run/systemd/user",
            "/usr/local/lib/systemd/user",
            "/usr/lib/systemd/user",
            "/lib/systemd/user",
        ]
    return [Path(n) for n in names]


def install_units(
    units: Mapping[str, str], directory: Path, *, force: bool = False, elsewhere: Sequence[Path] = ()
) -> list[tuple[Path, str]]:
    """Write ``units`` into ``directory``: (path, ``"written"`` or ``"unchanged"``) for each.

    A unit file that exists with other content raises ``UnitExists`` unless ``force``; then nothing
    is written.  So does a unit of the same name in one of the directories ``elsewhere`` (another
    program's unit, such as a distribution's ``ssh.service``, that this one would replace).  Each
    file is written whole (a new temporary file renamed into place), mode 0644.
    """
    plan: list[tuple[Path, str, bool]] = []
    for filename, text in units.items():
        path = directory / filename
        for other in elsewhere:
            found = other / filename
            if os.path.abspath(other) != os.path.abspath(directory) and os.path.lexists(found) and not force:
                raise UnitExists(
                    f"{found} exists: the service manager already has a unit named {filename}, which {path} would "
                    "replace or be hidden by; choose another service name, or pass --force to write it anyway",
                    path=found,
                )
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        except (OSError, UnicodeDecodeError) as exc:
            if not force:
                raise UnitExists(f"{path} exists and cannot be read ({exc}): pass --force to replace it", path=path) from None
            current = None
        if current is not None and current != text and not force:
            raise UnitExists(f"{path} exists with other content: pass --force to replace it", path=path)
        plan.append((path, text, current != text))
    directory.mkdir(parents=True, exist_ok=True)
    done = []
    for path, text, changed in plan:
        if changed:
            # a new file of a random name (O_EXCL): never one that someone put there (a link to another file)
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
            tmp = Path(name)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    os.fchmod(f.fileno(), 0o644)  # the file opened, not whatever the name holds by now
                    f.write(text)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        done.append((path, "written" if changed else "unchanged"))
    return done


def next_steps(name: str, scope: Scope) -> str:
    """The commands that start the installed units."""
    flag = " --user" if scope == "user" else ""
    return f"systemctl{flag} daemon-reload && systemctl{flag} enable --now {name}.socket"
