"""Generators of hostile input shared by the fuzz and attack suites.

Everything random is drawn from a ``random.Random`` the caller seeds, so a run is reproducible.
An attack *plan* returns ``(chunks, closes_by_itself)``: the byte strings to send on one raw
connection, and whether they are certainly invalid, so that the server must close the connection
without waiting for the attacker to end its stream.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import anyio
import xrpc

from _wire import GOODBYE_TAG, HELLO, body_frame, decode_frames, read_to_end


Plan = Callable[[random.Random, int], "tuple[list[bytes], bool]"]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with one to four bytes changed, flipped, dropped or inserted."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(buf))
        op = rng.random()
        if op < 0.5:
            buf[i] = rng.randrange(256)
        elif op < 0.7:
            buf[i] ^= 1 << rng.randrange(8)
        elif op < 0.85 and len(buf) > 5:
            del buf[i]
        else:
            buf.insert(i, rng.randrange(256))
    return bytes(buf)


def nested(depth: int, kind: str) -> bytes:
    """``depth`` nested msgpack containers around a nil (arrays, maps, or both in turn)."""
    if kind == "array":
        return b"\x91" * depth + b"\xc0"
    if kind == "map":
        return b"\x81\xa1k" * depth + b"\xc0"
    return b"\x91\x81\xa1k" * (depth // 2) + b"\xc0"


def random_body_frame(rng: random.Random) -> bytes:
    """A frame of 1 to 64 random bytes behind a correct length prefix."""
    return body_frame(rng.randbytes(rng.randint(1, 64)))


def cut_anywhere(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` cut at up to four random places, so that frames also arrive split."""
    cuts = sorted(rng.randrange(len(data)) for _ in range(rng.randint(0, 4)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)]) if b > a]


def goodbyes_in(data: bytes) -> int:
    """How many GOODBYE frames a byte string of server frames holds (stops at anything odd)."""
    frames = decode_frames(data, stop_at_empty=True, stop_at_garbage=True)
    return sum(1 for f in frames if isinstance(f, list) and f and f[0] == GOODBYE_TAG)


async def send_and_read_to_end(path: str, chunks: list[bytes], *, eof: bool, timeout: float) -> tuple[bytes, str]:
    """Send ``chunks`` on a new raw Unix connection (and end our stream if ``eof``), then read until
    the server closes it: (what came, "eof" / "reset" / "timeout")."""
    async with await anyio.connect_unix(path) as stream:
        try:
            for chunk in chunks:
                await stream.send(chunk)
            if eof:
                await stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the server already hung up: fine
        try:
            return await read_to_end(stream, timeout)
        except TimeoutError:
            return b"", "timeout"


class Plans:
    """The attack plans that need only a way to make a valid CALL frame of the service attacked.

    ``call(call_id, rng)`` makes one; ``mutated_share`` is the share of calls ``hello_then_mutated_calls``
    mutates.  The plans are methods, so ``plan.__name__`` names them in reports.
    """

    def __init__(self, call: Callable[[int, random.Random], bytes], *, mutated_share: float) -> None:
        self.call = call
        self.mutated_share = mutated_share

    def plan_random_bytes(self, rng: random.Random, n: int) -> tuple[list[bytes], bool]:
        return [rng.randbytes(rng.randint(1, 64)) for _ in range(n)], False

    def plan_random_bodies(self, rng: random.Random, n: int) -> tuple[list[bytes], bool]:
        return [random_body_frame(rng) for _ in range(n)], False

    def plan_hello_then_random_bodies(self, rng: random.Random, n: int) -> tuple[list[bytes], bool]:
        return [HELLO, *(random_body_frame(rng) for _ in range(n - 1))], False

    def plan_hello_then_mutated_calls(self, rng: random.Random, n: int) -> tuple[list[bytes], bool]:
        frames = [HELLO]
        for k in range(n - 1):
            f = self.call(2 * k + 1, rng)
            frames.append(mutate(f, rng) if rng.random() < self.mutated_share else f)
        return frames, False

    def plan_mutated_hello(self, rng: random.Random, n: int) -> tuple[list[bytes], bool]:
        return [mutate(HELLO, rng), *(self.call(2 * k + 1, rng) for k in range(n - 1))], False

    def plan_huge_prefix(self, rng: random.Random, n: int) -> tuple[list[bytes], bool]:
        head = [HELLO] if rng.random() < 0.5 else []
        over = xrpc.Limits().max_frame + 1
        size = rng.choice([0xFFFFFFFF, 0x80000000, over, rng.randint(over, 0xFFFFFFFF)])
        return [*head, size.to_bytes(4, "big") + rng.randbytes(8), *(rng.randbytes(16) for _ in range(n - 1 - len(head)))], True

    def plan_zero_length(self, rng: random.Random, n: int) -> tuple[list[bytes], bool]:
        head = [HELLO] if rng.random() < 0.5 else []
        return [*head, b"\x00\x00\x00\x00", *(random_body_frame(rng) for _ in range(n - 1 - len(head)))], True

    def plan_truncated(self, rng: random.Random, n: int) -> tuple[list[bytes], bool]:
        frames = [HELLO, *(self.call(2 * k + 1, rng) for k in range(n - 2))]
        last = self.call(2 * n + 1, rng)
        frames.append(last[: rng.randint(1, len(last) - 1)])
        return frames, False

    def plan_call_before_hello(self, rng: random.Random, n: int) -> tuple[list[bytes], bool]:
        return [self.call(2 * k + 1, rng) for k in range(n)], True


def shuffled_jobs(plans: list[Any], connections: int, rng: random.Random) -> list[tuple[Any, random.Random]]:
    """``connections`` (plan, its own seeded Random) pairs, the plans taken in turn, in random order."""
    jobs = [(plans[i % len(plans)], random.Random(rng.getrandbits(64))) for i in range(connections)]
    rng.shuffle(jobs)
    return jobs


async def run_jobs(jobs: list[tuple[Any, random.Random]], parallel: int, one: Callable[[Any, random.Random], Any]) -> None:
    """Run ``await one(plan, rng)`` for every job, ``parallel`` at a time."""

    async def worker() -> None:
        while jobs:
            plan, r = jobs.pop()
            await one(plan, r)

    async with anyio.create_task_group() as tg:
        for _ in range(parallel):
            tg.start_soon(worker)
