"""A plug-in host: each plug-in runs in its own process and calls back into the host.

This is how XPC services are used for plug-ins (Quick Look generators, Safari extensions, audio units
hosted out of process): a plug-in that crashes or misbehaves takes down its own process, never the
host, and it can do only what the host hands it.

- The host calls the plug-in through the ``Plugin`` interface (``activate``, ``process``,
  ``deactivate``).
- ``activate(host: Host)`` hands the plug-in a ``Host`` *capability*: ``Host`` is an
  ``@xrpc.interface``, so the object travels by reference and the plug-in gets a proxy whose calls
  run in the host (``log``, ``progress``, ``setting``).  The plug-in keeps it and calls back while
  it works, in the middle of the host's own call to ``process``.  It sees nothing else of the host.
- ``deactivate()`` lets the plug-in release the capability (``await host.aclose()``); the host sees
  its export table empty again.
- A plug-in process that dies mid-call fails that call with ``xrpc.ConnectionInterrupted``; the
  host carries on with the others.

Run it:  python examples/plugin_host.py

``main()`` launches each plug-in as a child process (``python examples/plugin_host.py plugin NAME
URL``) listening on a Unix socket in a temporary directory, connects to it, and prints what happens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Protocol

import anyio
import anyio.to_thread
import msgspec

import xrpc


class PluginInfo(msgspec.Struct, frozen=True):
    name: str
    version: str
    handles: list[str]  # file name extensions


class PluginFailed(Exception):
    """Declared: a plug-in reports a failure it understands with this."""


@xrpc.interface
class Host(Protocol):
    """What the host lets a plug-in do: passed to it by reference."""

    async def log(self, text: str) -> None: ...

    async def progress(self, done: int, total: int) -> None: ...

    async def setting(self, key: str) -> str | None: ...


@xrpc.interface(errors=(PluginFailed,))
class Plugin(Protocol):
    async def activate(self, host: Host) -> PluginInfo: ...

    async def process(self, name: str, text: str) -> str: ...

    async def deactivate(self) -> None: ...


# --------------------------------------------------------------------------- plug-ins (child processes)
class PluginBase:
    info: PluginInfo
    host: Host | None = None

    async def activate(self, host: Host) -> PluginInfo:
        self.host = host  # a proxy: calls on it run in the host process
        await host.log("activated")
        return self.info

    async def deactivate(self) -> None:
        if self.host is not None:
            await self.host.log("bye")
            await self.host.aclose()  # type: ignore[attr-defined]  # give the capability back
            self.host = None

    def _host(self) -> Host:
        if self.host is None:
            raise PluginFailed("not activated")
        return self.host


class WordCount(PluginBase):
    info = PluginInfo("wordcount", "1.2", [".txt", ".md"])

    async def process(self, name: str, text: str) -> str:
        host = self._host()
        lines = text.splitlines()
        words = 0
        for i, line in enumerate(lines, 1):
            words += len(line.split())
            await host.progress(i, len(lines))
        await host.log(f"counted {name}")
        return f"{words} words, {len(lines)} lines"


class Shout(PluginBase):
    info = PluginInfo("shout", "0.9", [".txt"])

    async def process(self, name: str, text: str) -> str:
        host = self._host()
        mark = await host.setting("shout.mark") or "!"
        if not text.strip():
            raise PluginFailed(f"{name} is empty")
        return " / ".join(line.upper() for line in text.splitlines()) + mark


class Crashy(PluginBase):
    info = PluginInfo("crashy", "0.0.1", [".bin"])

    async def process(self, name: str, text: str) -> str:
        await self._host().log("about to crash")
        os._exit(70)  # a segfault, an abort(), an OOM kill: the process is gone


PLUGINS = {"wordcount": WordCount, "shout": Shout, "crashy": Crashy}


async def serve_plugin(name: str, url: str) -> None:
    server = xrpc.Server()
    server.export(Plugin, PLUGINS[name]())
    async with server.listen(url) as listener:
        print(listener.url, flush=True)  # tells the host we are ready
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the host closes our stdin


# --------------------------------------------------------------------------- the host
class HostServices:
    """The host's side of the ``Host`` capability, one per plug-in."""

    SETTINGS = {"shout.mark": "!!!"}

    def __init__(self, plugin: str) -> None:
        self.plugin = plugin

    async def log(self, text: str) -> None:
        print(f"  [{self.plugin}] {text}")

    async def progress(self, done: int, total: int) -> None:
        print(f"  [{self.plugin}] progress {done}/{total}")

    async def setting(self, key: str) -> str | None:
        return self.SETTINGS.get(key)


DOCUMENTS = [("notes.txt", "buy milk\ncall the plumber today\nxrpc is typed\n"), ("empty.txt", "  \n")]


async def use_plugin(name: str, url: str) -> None:
    async with xrpc.connect(url, timeout=10) as conn:
        plugin = conn.proxy(Plugin)
        try:
            info = await plugin.activate(HostServices(name))
            print(f"loaded {info.name} {info.version} (handles {', '.join(info.handles)})")
            for doc, text in DOCUMENTS:
                try:
                    print(f"{name}: {doc} -> {await plugin.process(doc, text)}")
                except PluginFailed as exc:
                    print(f"{name}: {doc} failed: {exc}")
            await plugin.deactivate()
            print(f"{name}: host objects still held by the plug-in: {conn.exported_objects}")
        except xrpc.ConnectionInterrupted:
            print(f"{name}: the plug-in process died (ConnectionInterrupted); the host carries on")


class Child:
    """A plug-in process: prints its URL when ready, exits when its stdin closes."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, "plugin", name, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ready(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise SystemExit(f"plug-in {self.name} did not start")
        return line

    def close(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:  # it is gone already
            pass
        self.proc.stdout.close()
        return self.proc.wait(timeout=10)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "plugin":
        anyio.run(serve_plugin, sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) != 1:
        raise SystemExit(f"usage: {sys.argv[0]} [plugin NAME URL]")
    with tempfile.TemporaryDirectory(prefix="xrpc-plugins-") as tmp:
        children = {name: Child(name, f"unix://{tmp}/{name}.sock") for name in PLUGINS}
        try:
            for name, child in children.items():
                anyio.run(use_plugin, name, child.ready())
        finally:
            codes = {name: child.close() for name, child in children.items()}
        print("plug-in exit codes:", ", ".join(f"{n}={c}" for n, c in codes.items()))


if __name__ == "__main__":
    main()
