"""What a newcomer reads when something is wrong: URLs, unknown exports, a call that does not fit the
method's parameters, and the ``xrpc`` logger."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from typing import AsyncIterator, Protocol

import anyio
import pytest

import xrpc
from _procs import short_dir
from _timeouts import T

pytestmark = pytest.mark.timeout(60)


@xrpc.interface()
class Greeter(Protocol):
    async def greet(self, name: str, *, loud: bool = False) -> str: ...

    def count(self, n: int) -> AsyncIterator[int]: ...

    async def total(self, values: AsyncIterator[int]) -> int: ...

    @xrpc.oneway
    async def poke(self, what: str) -> None: ...


class GreeterService:
    async def greet(self, name: str, *, loud: bool = False) -> str:
        return f"hello {name}{'!' if loud else ''}"

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def total(self, values: AsyncIterator[int]) -> int:
        return sum([v async for v in values])

    async def poke(self, what: str) -> None:
        pass


def server() -> xrpc.Server:
    srv = xrpc.Server()
    srv.export(Greeter, GreeterService())
    srv.export(Greeter, GreeterService(), "second")
    return srv


# --------------------------------------------------------------------------- URLs
async def test_unix_url_with_two_slashes_is_refused_with_both_spellings() -> None:
    for attempt in (xrpc.connect("unix://run/app.sock"), server().listen("unix://run/app.sock")):
        with anyio.fail_after(T), pytest.raises(ValueError) as info:
            async with attempt:
                pass  # pragma: no cover
        text = str(info.value)
        assert "relative" in text and "unix:///run/app.sock" in text and "unix:run/app.sock" in text
    assert not os.path.exists("run/app.sock")


async def test_relative_unix_path_is_spelled_without_slashes() -> None:
    d = short_dir()
    old = os.getcwd()
    os.chdir(d)
    try:
        with anyio.fail_after(T):
            async with server().listen("unix:rel.sock") as listener:
                assert listener.url == "unix:rel.sock"
                assert os.path.exists(os.path.join(d, "rel.sock"))
                async with xrpc.connect(listener.url) as conn:
                    assert await conn.proxy(Greeter).greet("you") == "hello you"
    finally:
        os.chdir(old)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("url", ["tcp://127.0.0.1", "tls://example.org", "tcp://localhost/"])
async def test_tcp_url_without_port_is_refused(url: str) -> None:
    with anyio.fail_after(T):
        with pytest.raises(ValueError, match="needs a port"):
            async with xrpc.connect(url):
                pass  # pragma: no cover
        if url.startswith("tcp"):
            with pytest.raises(ValueError, match="needs a port"):
                async with server().listen(url):
                    pass  # pragma: no cover


# --------------------------------------------------------------------------- unknown exports
async def test_unknown_export_names_what_is_exported() -> None:
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server()) as conn:
            with pytest.raises(xrpc.ObjectNotFound) as info:
                await conn.proxy(Greeter, name="Greetr").greet("x")
    text = str(info.value)
    assert "no object is exported as 'Greetr'" in text
    assert "'Greeter'" in text and "'second'" in text


async def test_unknown_export_lists_only_what_the_peer_may_call() -> None:
    srv = server()
    srv.export(Greeter, GreeterService(), "secret", requirement="uid == 999999")
    with anyio.fail_after(T):
        async with xrpc.testing.connect(srv) as conn:
            with pytest.raises(xrpc.ObjectNotFound) as info:
                await conn.proxy(Greeter, name="nope").greet("x")
    assert "'Greeter'" in str(info.value) and "secret" not in str(info.value)


# --------------------------------------------------------------------------- arguments
async def test_arguments_that_do_not_fit_raise_type_error_like_a_local_call() -> None:
    local = GreeterService()
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server()) as conn:
            g = conn.proxy(Greeter)
            with pytest.raises(TypeError, match=r"^Greeter\.greet\(\) got an unexpected keyword argument 'nam'$"):
                await g.greet(nam="x")  # type: ignore[call-arg]
            with pytest.raises(TypeError, match="unexpected keyword argument 'nam'"):
                await local.greet(nam="x")  # type: ignore[call-arg]
            with pytest.raises(TypeError, match=r"^Greeter\.greet\(\) takes 1 positional argument but 2 were given$"):
                await g.greet("x", True)  # type: ignore[misc]
            with pytest.raises(TypeError, match=r"^Greeter\.greet\(\) missing a required argument: 'name'$"):
                await g.greet()  # type: ignore[call-arg]
            with pytest.raises(TypeError, match="unexpected keyword argument 'm'"):
                async for _ in g.count(m=3):  # type: ignore[call-arg]
                    pass  # pragma: no cover
            with pytest.raises(TypeError, match="unexpected keyword argument 'x'"):
                await g.poke(x="y")  # type: ignore[call-arg]
            with pytest.raises(TypeError, match=r"missing a required argument: 'values'"):
                await g.total()  # type: ignore[call-arg]
            # still a ValidationError too, as it was before it was a TypeError
            with pytest.raises(xrpc.ValidationError) as info:
                await g.greet(nam="x")  # type: ignore[call-arg]
            assert isinstance(info.value, TypeError) and info.value.method == "greet"
            # the connection is fine afterwards
            assert await g.greet("x", loud=True) == "hello x!"


# --------------------------------------------------------------------------- logging
def test_xrpc_logger_has_a_null_handler() -> None:
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("xrpc").handlers)


def test_nothing_is_printed_without_logging_configured() -> None:
    code = (
        "import logging, xrpc\n"
        "logging.getLogger('xrpc').warning('should not be printed')\n"
        "logging.getLogger('xrpc.services').warning('nor this')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=T)
    assert r.returncode == 0 and r.stderr == "", r.stderr


async def test_log_records_do_not_repeat_the_logger_name(caplog: pytest.LogCaptureFixture) -> None:
    srv = server()
    srv.export(Greeter, GreeterService(), "guarded", requirement="uid == 999999")
    with caplog.at_level(logging.INFO, logger="xrpc"):
        with anyio.fail_after(T):
            async with xrpc.testing.connect(srv) as conn:
                with pytest.raises(xrpc.ObjectNotFound):
                    await conn.proxy(Greeter, name="nope").greet("x")
                with pytest.raises((xrpc.PeerRejected, xrpc.ObjectNotFound)):
                    await conn.proxy(Greeter, name="guarded").greet("x")
    records = [r for r in caplog.records if r.name.startswith("xrpc")]
    assert records, "the refusals are logged"
    for r in records:
        assert not r.getMessage().startswith("xrpc"), r.getMessage()


def test_no_log_call_in_the_package_repeats_the_logger_name() -> None:
    import re
    from pathlib import Path

    pattern = re.compile(r"""\blog\w*\.(debug|info|warning|error|exception|critical)\(\s*f?["']xrpc[:.]""")
    root = Path(xrpc.__file__).parent
    offenders = [f"{p.name}: {m.group(0)}" for p in root.rglob("*.py") for m in pattern.finditer(p.read_text())]
    assert offenders == []
