"""Peer processes for the object tests: each role serves on a Unix socket in its own process.

Usage::

    python tests/objects_fixtures/nodes.py vault URL                # "B": owns the counters
    python tests/objects_fixtures/nodes.py relay URL VAULT_URL      # "A": holds B's counters, serves C
    python tests/objects_fixtures/nodes.py anonymous BROKER_URL     # serves on listen_anonymous() and
                                                                    # registers its endpoint with a broker
    python tests/objects_fixtures/nodes.py files URL                # reads and makes file descriptors

Every role prints one line on stdout once it is ready (the bound URL, or ``registered``) and runs
until its stdin reaches end of file, so it never outlives the test that started it.  The test process
imports the interfaces from here, so all processes share them.
"""

from __future__ import annotations

import os
import sys
from typing import Awaitable, Callable, Protocol

import anyio
import msgspec

import xrpc


class Tables(msgspec.Struct):
    """Reference tables of one process: objects it exports, proxies it holds, objects it keeps."""

    exported: int  # objects exported by reference, over all its connections
    remote_refs: int  # live proxies to objects of its peers
    live: int = 0  # objects of the application still alive (vault: counters)


@xrpc.interface
class Listener(Protocol):
    async def changed(self, total: int, pid: int) -> int:
        """Called back with the new total and the pid of the process that owns the counter."""
        ...


@xrpc.interface
class Counter(Protocol):
    async def increment(self, by: int) -> int: ...

    async def owner(self) -> int:
        """The pid of the process where the counter lives."""
        ...

    async def increment_and_notify(self, by: int, listener: Listener) -> int:
        """Increment, call ``listener.changed(total, pid)`` back, return what it returned."""
        ...


@xrpc.interface
class Vault(Protocol):
    async def open(self, name: str) -> Counter: ...

    async def is_mine(self, name: str, counter: Counter) -> bool:
        """True if ``counter`` arrived here as the very object ``open(name)`` handed out."""
        ...

    async def tables(self) -> Tables: ...


@xrpc.interface
class Relay(Protocol):
    async def fetch(self, name: str) -> Counter:
        """A counter obtained from the vault and passed on (A keeps no reference of its own)."""
        ...

    async def give_back(self, name: str, counter: Counter) -> bool:
        """Pass ``counter`` to the vault's ``is_mine``."""
        ...

    async def tables(self) -> Tables: ...

    async def pid(self) -> int: ...


@xrpc.interface
class Greeter(Protocol):
    async def greet(self, name: str) -> str: ...

    async def pid(self) -> int: ...


@xrpc.interface
class Broker(Protocol):
    async def register(self, name: str, endpoint: xrpc.Endpoint) -> None: ...

    async def lookup(self, name: str) -> xrpc.Endpoint: ...


@xrpc.interface
class Files(Protocol):
    async def read(self, fd: xrpc.FileDescriptor) -> bytes:
        """The whole content of the file behind ``fd`` (read from offset 0; ``fd`` is closed after)."""
        ...

    async def identity(self, fd: xrpc.FileDescriptor) -> tuple[int, int]:
        """(st_dev, st_ino) of the file behind ``fd``."""
        ...

    async def create(self, content: bytes) -> xrpc.FileDescriptor:
        """A new anonymous file holding ``content``."""
        ...

    async def open_fds(self) -> int:
        """How many descriptors this process has open."""
        ...

    async def pid(self) -> int: ...


def _tables(server: xrpc.Server, *clients: xrpc.Connection, live: int = 0) -> Tables:
    conns = [*server.connections, *clients]
    return Tables(
        exported=sum(c.exported_objects for c in conns),
        remote_refs=sum(c.remote_refs for c in conns),
        live=live,
    )


class CounterImpl:
    def __init__(self, name: str) -> None:
        self.name = name
        self.total = 0

    async def increment(self, by: int) -> int:
        self.total += by
        return self.total

    async def owner(self) -> int:
        return os.getpid()

    async def increment_and_notify(self, by: int, listener: Listener) -> int:
        self.total += by
        return await listener.changed(self.total, os.getpid())


async def _until_stdin_eof() -> None:
    stdin = anyio.wrap_file(sys.stdin.buffer)
    while await stdin.read(4096):
        pass


async def vault(url: str) -> None:
    import weakref

    server = xrpc.Server()
    counters: weakref.WeakValueDictionary[str, CounterImpl] = weakref.WeakValueDictionary()

    class VaultImpl:
        async def open(self, name: str) -> Counter:
            c = counters.get(name)
            if c is None:
                c = counters[name] = CounterImpl(name)
            return c

        async def is_mine(self, name: str, counter: Counter) -> bool:
            return counter is counters.get(name)

        async def tables(self) -> Tables:
            return _tables(server, live=len(counters))

    server.export(Vault, VaultImpl())
    async with server.listen(url) as listener:
        print(listener.url, flush=True)
        await _until_stdin_eof()


async def relay(url: str, vault_url: str) -> None:
    server = xrpc.Server()
    async with xrpc.connect(vault_url) as conn:
        the_vault = conn.proxy(Vault)

        class RelayImpl:
            async def fetch(self, name: str) -> Counter:
                return await the_vault.open(name)

            async def give_back(self, name: str, counter: Counter) -> bool:
                return await the_vault.is_mine(name, counter)

            async def tables(self) -> Tables:
                return _tables(server, conn)

            async def pid(self) -> int:
                return os.getpid()

        server.export(Relay, RelayImpl())
        async with server.listen(url) as listener:
            print(listener.url, flush=True)
            await _until_stdin_eof()


async def anonymous(broker_url: str) -> None:
    class GreeterImpl:
        async def greet(self, name: str) -> str:
            return f"hello {name}, from {os.getpid()}"

        async def pid(self) -> int:
            return os.getpid()

    server = xrpc.Server()
    server.export(Greeter, GreeterImpl())
    async with server.listen_anonymous() as listener:
        async with xrpc.connect(broker_url) as conn:
            await conn.proxy(Broker).register("greeter", listener.endpoint)
        print("registered", flush=True)
        await _until_stdin_eof()


async def files(url: str) -> None:
    class FilesImpl:
        async def read(self, fd: xrpc.FileDescriptor) -> bytes:
            with fd:
                size = os.fstat(fd.fileno()).st_size
                return os.pread(fd.fileno(), size, 0)

        async def identity(self, fd: xrpc.FileDescriptor) -> tuple[int, int]:
            with fd:
                st = os.fstat(fd.fileno())
                return st.st_dev, st.st_ino

        async def create(self, content: bytes) -> xrpc.FileDescriptor:
            fd = os.memfd_create("files-node", os.MFD_CLOEXEC)
            os.write(fd, content)
            made.append(fd)  # a duplicate travels; ours is closed when the process stops
            return xrpc.FileDescriptor(fd)

        async def open_fds(self) -> int:
            return len(os.listdir("/proc/self/fd"))

        async def pid(self) -> int:
            return os.getpid()

    made: list[int] = []
    server = xrpc.Server()
    server.export(Files, FilesImpl())
    try:
        async with server.listen(url) as listener:
            print(listener.url, flush=True)
            await _until_stdin_eof()
    finally:
        for fd in made:
            os.close(fd)


if __name__ == "__main__":
    roles: dict[str, tuple[Callable[..., Awaitable[None]], int]] = {"vault": (vault, 1), "relay": (relay, 2), "anonymous": (anonymous, 1), "files": (files, 1)}
    if len(sys.argv) < 2 or sys.argv[1] not in roles or len(sys.argv) - 2 != roles[sys.argv[1]][1]:
        sys.exit(f"usage: {sys.argv[0]} vault URL | relay URL VAULT_URL | anonymous BROKER_URL | files URL")
    fn, _ = roles[sys.argv[1]]
    anyio.run(fn, *sys.argv[2:])
