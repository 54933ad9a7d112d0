"""Coverage-guided fuzzing of ``xrpc._protocol.ProtocolCore.receive_data`` with atheris.

Not collected by pytest (the file name does not start with ``test_``).  Run it with atheris
installed (``pip install atheris``)::

    python tests/fuzz_atheris.py --seed-corpus corpus/     # valid and mutated frame sequences
    python tests/fuzz_atheris.py -max_total_time=600 corpus/
    python tests/fuzz_atheris.py crash-<hash>          # replay one input

Without atheris, ``python tests/fuzz_atheris.py FILE...`` replays inputs through the same target,
and ``python tests/fuzz_atheris.py --random N`` feeds it N random inputs built from valid frames.

The target's contract: whatever bytes arrive, in whatever pieces, ``receive_data`` either returns
validated messages or raises ``RemoteProtocolError``; once it has raised, every later call raises it
too; it never raises anything else, and it never buffers more than one frame's worth of input.
"""

from __future__ import annotations

import random
import sys

try:
    import atheris  # type: ignore[import-untyped]
except ImportError:  # replay and random modes work without it
    atheris = None


import msgspec

from xrpc._errors import RemoteProtocolError
from xrpc._protocol import PROTOCOL_VERSION, Call, Message, ProtocolCore, Welcome

from _wire import HELLO, frame

MAX_FRAME = 64 * 1024
_MESSAGE_TYPES = tuple(getattr(Message, "__args__", ()))


WELCOME = frame(Welcome(PROTOCOL_VERSION, 1 << 20))


def feed(data: bytes) -> None:
    """The fuzz target.  The first byte picks the side and the prelude, the second the chunking."""
    if len(data) < 2:
        return
    mode, cut = data[0], data[1]
    body = data[2:]
    client = bool(mode & 1)
    core = ProtocolCore(client=client, max_frame=MAX_FRAME)
    if client:
        core.send_hello()
        core.data_to_send()
    if mode & 2:  # start from an open connection, so that the input reaches the call tables
        body = (WELCOME if client else HELLO) + body
    step = 1 + cut % 97 if cut else len(body) or 1
    failed = False
    for i in range(0, len(body), step):
        try:
            events = core.receive_data(body[i : i + step])
        except RemoteProtocolError:
            failed = True
            break
        for msg, _rec in events:
            assert isinstance(msg, _MESSAGE_TYPES), type(msg)
        # never more buffered than one frame (header included) plus one read
        assert len(core._in) <= MAX_FRAME + 4 + step, len(core._in)
    if failed:
        try:
            core.receive_data(b"\x00\x00\x00\x01\x90")
        except RemoteProtocolError:
            return
        raise AssertionError("receive_data accepted input after it failed")
    try:
        core.receive_data(b"")  # the peer closes: a half frame is a protocol error, nothing else
    except RemoteProtocolError:
        pass


def _random_input(rng: random.Random, mutate: bool = True) -> bytes:
    frames = [HELLO, WELCOME]
    for k in range(rng.randint(0, 6)):
        args = msgspec.msgpack.encode([rng.randint(-5, 5), "x" * rng.randint(0, 5)])
        frames.append(frame(Call(2 * k + 1, "Svc", "add", msgspec.Raw(args), rng.choice([0, 1, 2, 4]))))
    data = bytearray(b"".join(rng.sample(frames, rng.randint(0, len(frames)))))
    for _ in range(rng.randint(0, 8) if mutate else 0):
        if data and rng.random() < 0.7:
            data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            data[rng.randint(0, len(data)) : 0] = rng.randbytes(rng.randint(1, 8))
    return bytes([rng.randrange(256), rng.randrange(256)]) + bytes(data)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--seed-corpus":
        import os

        os.makedirs(argv[2], exist_ok=True)
        rng = random.Random(1)
        for i in range(200):
            with open(os.path.join(argv[2], f"seed-{i:03d}"), "wb") as f:
                f.write(_random_input(rng, mutate=i % 2 == 0))
        return 0
    if len(argv) >= 2 and argv[1] == "--random":
        rng = random.Random(0)
        for _ in range(int(argv[2]) if len(argv) > 2 else 10_000):
            feed(_random_input(rng))
        return 0
    if atheris is None:
        if len(argv) < 2:
            print("atheris is not installed: pass input files to replay, or --random N", file=sys.stderr)
            return 2
        for path in argv[1:]:
            with open(path, "rb") as f:
                feed(f.read())
        return 0
    atheris.instrument_all()  # the protocol core is pure Python: instrument what is loaded
    atheris.Setup(argv, feed)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
