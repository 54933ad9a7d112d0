"""A privileged helper that serves only its own app (macOS's SMJobBless/SMAppService helpers).

An app that must write where the user cannot (system directories, other users' files) splits that
work into a small helper process.  The helper is the dangerous part, so it checks who is calling:

- **the connection**: only processes of the same user running the same program are accepted,
  ``xrpc.Server(requirement=Requirement.same_user() & Requirement.executable(sys.executable))``
  (the expression ``same_user and exe == "/path/to/python"`` says the same);
- **one method**: ``uninstall_all`` is guarded with ``@xrpc.requires(Requirement.pid(app_pid))``,
  so only the very process that launched the helper may call it; another process of the same
  program is refused with ``xrpc.PeerRejected`` while its other calls work;
- **every path**: ``install_file(path, data)`` writes only below the helper's root directory; a
  path that leaves it is refused with the declared error ``OutsideRoot``.

The app checks the helper too: it connects with ``requirement=Requirement.pid(helper_pid) &
Requirement.same_user()``, so a process squatting on the helper's socket is refused before any call
is sent (``PeerRejected`` from ``connect``).

Run it:  python examples/privileged_helper.py

``main()`` launches the helper as a child process (``python examples/privileged_helper.py helper
URL ROOT APP_PID``) on a Unix socket in a private temporary directory, installs two files, shows the
three refusals (a path outside the root, a stranger calling ``uninstall_all``, an impostor helper),
then uninstalls.  The helper exits when the app closes its standard input, as a helper should when
its app goes away.  Every identity fact comes from the kernel (``SO_PEERCRED``, ``/proc``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread
import msgspec

import xrpc


class Receipt(msgspec.Struct, frozen=True):
    path: str  # relative to the helper's root
    size: int
    sha256: str


class OutsideRoot(Exception):
    """The path leaves the directory the helper manages."""


@xrpc.interface(errors=(OutsideRoot,))
class Installer(Protocol):
    async def install_file(self, path: str, data: bytes, mode: int = 0o644) -> Receipt:
        """Write ``data`` to ``path`` (relative to the helper's root), creating directories."""
        ...

    async def installed(self) -> list[str]:
        """The files below the root, sorted."""
        ...

    async def uninstall_all(self) -> int:
        """Remove every installed file (only the app that launched the helper may)."""
        ...


def make_helper(root: Path, app_pid: int) -> xrpc.Server:
    """The helper's server: same user and same program only; ``uninstall_all`` for the app alone."""
    only_the_app = xrpc.Requirement.pid(app_pid)

    class Helper:
        def _confined(self, path: str) -> Path:
            if os.path.isabs(path):
                raise OutsideRoot(f"{path} is absolute")
            target = (root / path).resolve()
            if not target.is_relative_to(root) or target == root:
                raise OutsideRoot(f"{path} is outside the helper's root")
            return target

        async def install_file(self, path: str, data: bytes, mode: int = 0o644) -> Receipt:
            target = self._confined(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode & 0o755)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return Receipt(str(target.relative_to(root)), len(data), hashlib.sha256(data).hexdigest())

        async def installed(self) -> list[str]:
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

        @xrpc.requires(only_the_app)
        async def uninstall_all(self) -> int:
            files = [p for p in root.rglob("*") if p.is_file()]
            for p in files:
                p.unlink()
            return len(files)

    server = xrpc.Server(requirement=xrpc.Requirement.same_user() & xrpc.Requirement.executable(sys.executable))
    server.export(Installer, Helper())
    return server


async def run_helper(url: str, root: str, app_pid: int) -> None:
    server = make_helper(Path(root).resolve(), app_pid)
    async with server.listen(url) as listener:
        print(listener.url, flush=True)  # tells the app we are ready
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the app closes our stdin (or dies)


async def run_stranger(url: str) -> None:
    """Another process of the same user and program: connected, but refused the guarded method."""
    async with xrpc.connect(url, timeout=10) as conn:
        installer = conn.proxy(Installer)
        receipt = await installer.install_file("var/stranger.txt", b"hi")
        print(f"stranger: install_file allowed ({receipt.path})")
        try:
            await installer.uninstall_all()
        except xrpc.PeerRejected as exc:
            print(f"stranger: uninstall_all refused: PeerRejected ({exc})")


class Child:
    """A child process of this script that prints its URL when ready and exits when stdin closes."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ready(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise SystemExit(f"child {' '.join(self.args)} did not start")
        return line

    def close(self) -> str:
        """Close its stdin, wait for it, return what else it printed."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        rest = self.proc.stdout.read()
        self.proc.stdout.close()
        self.proc.wait(timeout=10)
        return rest


async def app(url: str, helper_pid: int, impostor_url: str) -> None:
    # The app's own check of the helper: the process it launched, running as this user.
    its_helper = xrpc.Requirement.pid(helper_pid) & xrpc.Requirement.same_user()
    async with xrpc.connect(url, requirement=its_helper, timeout=10) as conn:
        installer = conn.proxy(Installer)
        for path, data in (("etc/app.conf", b"threads = 4\n"), ("bin/tool", b"#!/bin/sh\necho hi\n")):
            r = await installer.install_file(path, data, mode=0o755 if path.startswith("bin/") else 0o644)
            print(f"installed {r.path} ({r.size} bytes, sha256 {r.sha256[:12]}...)")
        for bad in ("../../etc/passwd", "/etc/shadow"):
            try:
                await installer.install_file(bad, b"owned")
            except OutsideRoot as exc:
                print(f"refused: {exc}")

        stranger = subprocess.run([sys.executable, __file__, "stranger", url], capture_output=True, text=True, timeout=30)
        print(stranger.stdout, end="")
        if stranger.returncode != 0:
            raise SystemExit(f"the stranger failed: {stranger.stderr}")

        print("files:", ", ".join(await installer.installed()))
        print(f"uninstalled {await installer.uninstall_all()} files (allowed: this is the app)")
        print("files after:", await installer.installed())

    try:
        async with xrpc.connect(impostor_url, requirement=its_helper, timeout=10):
            print("BUG: the impostor was trusted")
    except xrpc.PeerRejected:
        print("impostor refused by the app: PeerRejected (not the helper it launched)")


def main() -> None:
    logging.basicConfig(format="%(name)s: %(levelname)s %(message)s")  # refusals are logged at WARNING
    if len(sys.argv) == 5 and sys.argv[1] == "helper":
        anyio.run(run_helper, sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "stranger":
        anyio.run(run_stranger, sys.argv[2])
        return
    if len(sys.argv) != 1:
        raise SystemExit(f"usage: {sys.argv[0]} [helper URL ROOT APP_PID | stranger URL]")
    with tempfile.TemporaryDirectory(prefix="xrpc-helper-") as tmp:
        root = Path(tmp, "root")
        root.mkdir()
        print("helper accepts:", make_helper(root, os.getpid()).requirement)
        helper = Child("helper", f"unix://{tmp}/helper.sock", str(root), str(os.getpid()))
        impostor = Child("helper", f"unix://{tmp}/impostor.sock", str(root), str(os.getpid()))
        try:
            anyio.run(app, helper.ready(), helper.proc.pid, impostor.ready())
        finally:
            helper.close()
            impostor.close()


if __name__ == "__main__":
    main()
