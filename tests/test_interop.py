"""A peer in another language, written from docs/wire.md alone, against a real xrpc server.

``tests/interop/peer.js`` is a Node.js client with its own MessagePack codec.  Against the
``Interop`` service below, served on a Unix socket, it does the handshake, a unary call (with an
integer deadline), calls with a record argument, a server stream longer than the window it grants
(so it must send CREDIT), a client stream, a declared error and refusals, the introspection
export, and GOODBYE; then it checks that a HELLO of another protocol version gets exactly one
GOODBYE (code 3).  It prints ``ok <step>`` per step; the test checks them all.

docs/wire.md's message tables must be what ``docs/gen_wire.py`` generates from the frame
definitions as they are now.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator, Protocol

import anyio
import msgspec
import pytest

import xrpc

from _procs import short_dir
from _timeouts import T

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "tests" / "interop" / "peer.js"
NODE = shutil.which("node")

STEPS = ["handshake", "unary", "struct", "server stream", "client stream", "declared error", "introspection", "goodbye", "version mismatch"]


class Point(msgspec.Struct):
    x: int
    y: int


class Overdrawn(Exception):
    """Declared: travels as ERROR code 2 with its arguments."""


@xrpc.interface(errors=[Overdrawn])
class Interop(Protocol):
    async def add(self, a: int, b: int) -> int: ...
    async def norm2(self, p: Point, scale: int = 1) -> int: ...
    def count(self, n: int) -> AsyncIterator[int]: ...
    async def total(self, label: str, values: AsyncIterator[int]) -> str: ...
    async def withdraw(self, amount: int) -> int: ...


class InteropImpl:
    def __init__(self) -> None:
        self.streamed = 0

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def norm2(self, p: Point, scale: int = 1) -> int:
        return (p.x * p.x + p.y * p.y) * scale

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            self.streamed += 1
            yield i

    async def total(self, label: str, values: AsyncIterator[int]) -> str:
        return f"{label}={sum([v async for v in values])}"

    async def withdraw(self, amount: int) -> int:
        raise Overdrawn(amount, 10)


@pytest.mark.timeout(60)
@pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed: the interoperability peer cannot run")
def test_node_peer_written_from_the_wire_page() -> None:
    impl = InteropImpl()
    server = xrpc.Server()
    server.export(Interop, impl)  # under the interface's name, "Interop"
    directory = short_dir()
    path = os.path.join(directory, "s.sock")

    async def main() -> subprocess.CompletedProcess[bytes]:
        async with server.listen(f"unix://{path}"):
            with anyio.fail_after(3 * T):
                res = await anyio.run_process([str(NODE), str(PEER), path], check=False)
            # the peer's GOODBYEs ended its connections: the server lets them go
            with anyio.fail_after(T):
                while server.connections:
                    await anyio.sleep(0.01)
            return res

    try:
        res = anyio.run(main)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    out = res.stdout.decode()
    assert res.returncode == 0, out + res.stderr.decode()
    done = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("ok ")]
    assert [" ".join(w for w in d.split() if "=" not in w) for d in done] == STEPS, out
    assert "ok handshake window=1024" in out  # what a server announces by default
    assert impl.streamed == 43


def test_wire_page_tables_are_current(tmp_path: Path) -> None:
    out = tmp_path / "wire.md"
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_wire.py"), str(out)], capture_output=True, text=True, timeout=3 * T)
    assert res.returncode == 0, res.stderr
    assert out.read_text(encoding="utf-8") == (ROOT / "docs" / "wire.md").read_text(encoding="utf-8"), (
        "docs/wire.md is stale: run python docs/gen_wire.py"
    )
