"""A file indexer that streams its results piecemeal (Spotlight's mdworker, a code search daemon).

Searching a tree can take long and find a lot.  Rather than build a list and send it at the end,
the indexer sends each match as it finds it, on a server stream::

    def search(self, root: str, pattern: str) -> AsyncIterator[Match]: ...

- **Piecemeal**: the first results reach the caller while the indexer is still walking the tree.
- **Backpressure**: the caller connects with ``xrpc.Limits(window=8)``, so the indexer may run at
  most about that many matches ahead of what the caller has taken; a slow caller holds the walk
  back at its ``yield`` instead of filling memory.
- **Early cancellation**: the caller wants only the first few results, so it ``break``s.  Leaving the
  ``aclosing(...)`` block closes the stream, which cancels the search in the indexer: its generator
  stops at the ``yield`` it was waiting at, and its ``finally`` runs.  ``last_search()`` tells how
  far it got.
- **Errors**: a root that is not a directory ends the stream with the declared error ``BadRoot``.

Run it:  python examples/file_indexer.py

``main()`` writes a small tree of files into a temporary directory, starts the indexer as a child
process (``python examples/file_indexer.py serve URL``) on a Unix socket there, and runs three
searches against it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import AsyncIterator, Protocol

import anyio
import anyio.to_thread
import msgspec

import xrpc


class Match(msgspec.Struct, frozen=True):
    path: str  # relative to the searched root
    line: int
    text: str


class SearchReport(msgspec.Struct, frozen=True):
    produced: int  # matches the indexer yielded
    files: int  # files it opened
    outcome: str  # "finished" or "stopped early"


class BadRoot(Exception):
    """The root to search is not a directory."""


@xrpc.interface(errors=(BadRoot,))
class Indexer(Protocol):
    def search(self, root: str, pattern: str) -> AsyncIterator[Match]:
        """Every line under ``root`` that contains ``pattern`` (plain text, not a regular expression)."""
        ...

    async def last_search(self) -> SearchReport:
        """How the most recent search ended (waits until it has)."""
        ...


class IndexerService:
    def __init__(self) -> None:
        self._report: SearchReport | None = None
        self._ended = anyio.Event()

    async def search(self, root: str, pattern: str) -> AsyncIterator[Match]:
        if not os.path.isdir(root):
            raise BadRoot(f"{root} is not a directory")
        self._ended = ended = anyio.Event()
        produced = files = 0
        outcome = "stopped early"
        try:
            for directory, subdirs, names in os.walk(root):
                subdirs.sort()
                for name in sorted(names):
                    path = os.path.join(directory, name)
                    text = await anyio.to_thread.run_sync(_read_text, path)
                    files += 1
                    for number, line in enumerate(text.splitlines(), 1):
                        if pattern in line:
                            produced += 1
                            yield Match(os.path.relpath(path, root), number, line.strip())  # waits here without credit
            outcome = "finished"
        finally:  # runs on cancellation too
            self._report = SearchReport(produced, files, outcome)
            ended.set()

    async def last_search(self) -> SearchReport:
        with anyio.fail_after(10):
            await self._ended.wait()
        assert self._report is not None
        return self._report


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


async def serve(url: str) -> None:
    server = xrpc.Server()
    server.export(Indexer, IndexerService())
    async with server.listen(url) as listener:
        print(listener.url, flush=True)  # tells the parent we are ready
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin


def make_tree(root: Path, files: int = 40, lines: int = 25) -> int:
    """Write a tree of text files; return how many lines contain "needle"."""
    needles = 0
    for i in range(files):
        sub = root / f"dir{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        body = []
        for j in range(lines):
            if (i + j) % 2 == 0:
                body.append(f"line {j}: a needle in file {i}")
                needles += 1
            else:
                body.append(f"line {j}: only hay")
        if i == 7:
            body.append("TODO: rewrite in xrpc")
        (sub / f"file{i:02d}.txt").write_text("\n".join(body) + "\n")
    return needles


async def client(url: str, root: str, needles: int) -> None:
    async with xrpc.connect(url, limits=xrpc.Limits(window=8), timeout=10) as conn:
        indexer = conn.proxy(Indexer)

        todo = [m async for m in indexer.search(root, "TODO")]
        print(f"TODO: {len(todo)} match: {todo[0].path}:{todo[0].line}: {todo[0].text}")
        print(f"  indexer report: {await indexer.last_search()}")

        first: list[Match] = []
        async with contextlib.aclosing(indexer.search(root, "needle")) as results:  # type: ignore[type-var]
            async for m in results:
                first.append(m)
                if len(first) == 5:
                    break  # leaving the block cancels the search in the indexer
        print("first 5 needles:", ", ".join(f"{m.path}:{m.line}" for m in first))
        report = await indexer.last_search()
        print(f"  indexer report: {report.outcome} after {report.produced} of {needles} matches, {report.files} files opened")

        try:
            async for _ in indexer.search(os.path.join(root, "missing"), "needle"):
                pass
        except BadRoot as exc:
            print(f"BadRoot: {exc.args[0].removeprefix(root + os.sep)}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        anyio.run(serve, sys.argv[2])
        return
    if len(sys.argv) != 1:
        raise SystemExit(f"usage: {sys.argv[0]} [serve URL]")
    with tempfile.TemporaryDirectory(prefix="xrpc-indexer-") as tmp:
        root = Path(tmp, "tree")
        needles = make_tree(root)
        proc = subprocess.Popen([sys.executable, __file__, "serve", f"unix://{tmp}/indexer.sock"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            url = proc.stdout.readline().strip()
            if not url:
                raise SystemExit("the indexer did not start")
            anyio.run(client, url, str(root), needles)
        finally:
            proc.stdin.close()
            proc.stdout.close()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
