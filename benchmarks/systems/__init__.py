"""The systems under test.

Each module in this package has ``serve(opts)`` (runs a server, prints the ready line, blocks),
``client(opts)`` (returns a workload adapter, see ``benchmarks.workloads``) and ``probe(opts)``
(imports what it needs and returns facts to report, or raises).  Only this registry is imported by
the runner; the modules themselves are imported in the server, client and probe subprocesses.
"""

from __future__ import annotations

import dataclasses

from .._common import WORKLOADS


@dataclasses.dataclass(frozen=True)
class SystemSpec:
    name: str
    module: str
    requires: tuple[str, ...]
    description: str
    workloads: tuple[str, ...] = WORKLOADS
    # "asyncio"/"uvloop": the loop is part of the system; "option": the --loop flag applies;
    # None: the system brings its own I/O model.
    loop: str | None = None
    transport: str = "unix"


SYSTEMS: dict[str, SystemSpec] = {
    s.name: s
    for s in (
        SystemSpec(
            "raw-asyncio", "benchmarks.systems.raw", ("msgspec",),
            "asyncio Protocol, 4-byte length-prefixed msgpack frames (the floor)", loop="asyncio",
        ),
        SystemSpec(
            "raw-uvloop", "benchmarks.systems.raw", ("msgspec", "uvloop"),
            "the raw-asyncio code on uvloop's event loop", loop="uvloop",
        ),
        SystemSpec(
            "blocking-socket", "benchmarks.systems.blocking", (),
            "threaded blocking-socket server, sendall/recv_into (1 MiB echo only)", workloads=("bytes",),
        ),
        SystemSpec(
            "grpc-aio", "benchmarks.systems.grpc_aio", ("grpc", "msgspec"),
            "grpcio grpc.aio, generic handlers, msgpack (msgspec) messages", loop="asyncio",
        ),
        SystemSpec("pyro5", "benchmarks.systems.pyro", ("Pyro5",), "Pyro5 thread-pool daemon"),
        SystemSpec("rpyc", "benchmarks.systems.rpyc_service", ("rpyc",), "rpyc Service on a ThreadedServer"),
        SystemSpec(
            "pycapnp", "benchmarks.systems.pycapnp_system", ("capnp",),
            "pycapnp Cap'n Proto RPC on its asyncio (kj_loop) integration", loop="asyncio",
        ),
        SystemSpec(
            "thriftpy2", "benchmarks.systems.thriftpy2_system", ("thriftpy2",),
            "thriftpy2 contrib.aio, binary protocol, buffered transport", loop="asyncio",
        ),
        SystemSpec(
            "xrpc-unix", "benchmarks.systems.xrpc_system", ("xrpc", "msgspec"), "xrpc over a unix socket",
            loop="option",
        ),
        SystemSpec(
            "xrpc-tcp", "benchmarks.systems.xrpc_system", ("xrpc", "msgspec"), "xrpc over TCP on 127.0.0.1",
            loop="option", transport="tcp",
        ),
    )
}

BASELINE = "raw-asyncio"

FLOORS: tuple[str, ...] = ("raw-asyncio", "raw-uvloop", "blocking-socket")
"""The reference systems: every result is also reported as a ratio to each of these that ran."""
