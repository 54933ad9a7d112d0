"""Distributed tracing with a middleware: OpenTelemetry spans on both sides of every call.

One middleware, installed on both sides, gives every call a span:

- on the client (``xrpc.connect(url, middleware=[tracing])``) it opens a CLIENT span and writes the
  W3C ``traceparent`` of that span into the call's metadata (``ctx.metadata``), which travels with
  the call;
- on the server (``xrpc.Server(middleware=[tracing])``) it reads ``traceparent`` back from the
  metadata and opens a SERVER span as its child, so the two processes' spans form one trace.  The
  server span is the current span while the method runs, so calls the method makes (with the same
  middleware on their connection) continue the trace.
- A failed call marks its span as an error, with the exception recorded.
- For a server stream the middleware wraps the stream's *creation*: it returns a wrapping async
  generator, so the server span ends when the stream does, not when it was created.  On the
  client, the middleware runs when the stream starts, so its ``traceparent`` travels with the
  stream's CALL like any other.

OpenTelemetry is an optional dependency.  With ``opentelemetry-api`` and ``opentelemetry-sdk``
installed, the spans are real OpenTelemetry spans (here printed by a small exporter; use an OTLP
exporter in production).  Without them, the example says so and falls back to a tiny built-in
tracer with the same interface and the same ``traceparent`` format, printing the same lines.

Run it:  python examples/otel_middleware.py

``main()`` starts the service as a child process (``python examples/otel_middleware.py serve URL``)
on a Unix socket in a temporary directory, makes three traced calls, then prints the client's spans
and the spans the service printed.
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
import subprocess
import sys
import tempfile
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Protocol

import anyio
import anyio.to_thread

import xrpc

try:
    from opentelemetry import propagate, trace  # type: ignore[import-not-found,unused-ignore]
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # type: ignore[import-not-found,unused-ignore]
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    HAVE_OTEL = False
else:
    HAVE_OTEL = True


# --------------------------------------------------------------------------- one line per finished span
def span_line(name: str, kind: str, trace_id: int, span_id: int, parent_id: int | None, error: str | None) -> str:
    parent = f"{parent_id:016x}" if parent_id else "-"
    status = f"ERROR {error}" if error else "OK"
    return f"span {name} kind={kind} trace={trace_id:032x} span={span_id:016x} parent={parent} status={status}"


# --------------------------------------------------------------------------- the tiny built-in tracer
class MiniSpan:
    def __init__(self, name: str, kind: str, trace_id: int, parent_id: int | None) -> None:
        self.name, self.kind, self.trace_id, self.parent_id = name, kind, trace_id, parent_id
        self.span_id = secrets.randbits(64) or 1
        self.error: str | None = None

    def record_exception(self, exc: BaseException) -> None:
        self.error = type(exc).__name__

    def end(self) -> None:
        print(span_line(self.name, self.kind, self.trace_id, self.span_id, self.parent_id, self.error), flush=True)


_current_span: contextvars.ContextVar[MiniSpan | None] = contextvars.ContextVar("current_span", default=None)


class MiniTracer:
    """Just enough of OpenTelemetry's tracer for this example: spans, a current span, traceparent."""

    def start_span(self, name: str, kind: str, parent: tuple[int, int] | None = None) -> MiniSpan:
        if parent is None:
            current = _current_span.get()
            parent = (current.trace_id, current.span_id) if current is not None else None
        if parent is None:
            return MiniSpan(name, kind, secrets.randbits(128) or 1, None)
        return MiniSpan(name, kind, parent[0], parent[1])

    @contextlib.contextmanager
    def start_as_current_span(self, name: str, kind: str, parent: tuple[int, int] | None = None) -> Iterator[MiniSpan]:
        span = self.start_span(name, kind, parent)
        token = _current_span.set(span)
        try:
            yield span
        except BaseException as exc:
            span.record_exception(exc)
            raise
        finally:
            _current_span.reset(token)
            span.end()

    def inject(self, carrier: dict[str, str]) -> None:
        span = _current_span.get()
        if span is not None:
            carrier["traceparent"] = f"00-{span.trace_id:032x}-{span.span_id:016x}-01"

    def extract(self, carrier: Mapping[str, str]) -> tuple[int, int] | None:
        parts = carrier.get("traceparent", "").split("-")
        if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
            return None
        try:
            return int(parts[1], 16), int(parts[2], 16)
        except ValueError:
            return None


# --------------------------------------------------------------------------- OpenTelemetry, when installed
if HAVE_OTEL:

    class LineExporter(SpanExporter):  # type: ignore[misc,unused-ignore]
        """Prints each finished span as one line (an OTLP exporter would send it to a collector)."""

        def export(self, spans: Any) -> SpanExportResult:
            for s in spans:
                assert isinstance(s, ReadableSpan) and s.context is not None
                error = None
                if not s.status.is_ok:
                    types = [str(e.attributes.get("exception.type")) for e in s.events if e.name == "exception" and e.attributes]
                    error = types[0].rsplit(".", 1)[-1] if types else "error"
                parent = s.parent.span_id if s.parent is not None else None
                print(span_line(s.name, s.kind.name, s.context.trace_id, s.context.span_id, parent, error), flush=True)
            return SpanExportResult.SUCCESS

    class OtelTracer:
        """The same small interface as ``MiniTracer``, on a real OpenTelemetry tracer."""

        KINDS = {"CLIENT": trace.SpanKind.CLIENT, "SERVER": trace.SpanKind.SERVER, "INTERNAL": trace.SpanKind.INTERNAL}

        def __init__(self, service: str) -> None:
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(LineExporter()))
            self._tracer = provider.get_tracer(service)

        def start_span(self, name: str, kind: str, parent: Any = None) -> Any:
            return self._tracer.start_span(name, context=parent, kind=self.KINDS[kind])

        def start_as_current_span(self, name: str, kind: str, parent: Any = None) -> Any:
            return self._tracer.start_as_current_span(name, context=parent, kind=self.KINDS[kind])

        def inject(self, carrier: dict[str, str]) -> None:
            propagate.inject(carrier)

        def extract(self, carrier: Mapping[str, str]) -> Any:
            return propagate.extract(dict(carrier))


def make_tracer(service: str) -> Any:
    return OtelTracer(service) if HAVE_OTEL else MiniTracer()


# --------------------------------------------------------------------------- the middleware
def tracing_middleware(tracer: Any) -> xrpc.Middleware:
    """A span per call, on the side it is installed on; the trace travels in the call metadata."""

    async def tracing(ctx: xrpc.CallContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        name = ctx.method.qualname.replace(".", "/")  # OpenTelemetry's RPC convention: Service/Method
        if ctx.side == "client":
            with tracer.start_as_current_span(name, "CLIENT"):
                tracer.inject(ctx.metadata)  # the traceparent travels with this call
                return await call_next()
        parent = tracer.extract(ctx.metadata)
        if ctx.method.kind.streams_out:
            span = tracer.start_span(name, "SERVER", parent)
            try:
                stream = await call_next()
            except BaseException as exc:
                span.record_exception(exc)
                span.end()
                raise
            return _traced_stream(span, stream)
        with tracer.start_as_current_span(name, "SERVER", parent):
            return await call_next()

    return tracing


async def _traced_stream(span: Any, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        async for item in stream:
            yield item
    except BaseException as exc:
        span.record_exception(exc)
        if HAVE_OTEL and isinstance(exc, Exception):
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        raise
    finally:
        span.end()


# --------------------------------------------------------------------------- the service
class OutOfStock(Exception):
    """Declared: reaches the caller as itself (and marks the span as an error)."""


@xrpc.interface(errors=(OutOfStock,))
class Shop(Protocol):
    async def price(self, item: str) -> float: ...

    async def buy(self, item: str, count: int) -> str: ...

    def restock(self, item: str, batches: int) -> AsyncIterator[int]: ...


class ShopService:
    PRICES = {"tea": 3.5, "cake": 4.25}

    async def price(self, item: str) -> float:
        return self.PRICES[item]

    async def buy(self, item: str, count: int) -> str:
        if count > 2:
            raise OutOfStock(f"only 2 {item} left")
        return f"{count} x {item}"

    async def restock(self, item: str, batches: int) -> AsyncIterator[int]:
        for i in range(batches):
            yield (i + 1) * 10


async def serve(url: str) -> None:
    server = xrpc.Server(middleware=[tracing_middleware(make_tracer("shop"))])
    server.export(Shop, ShopService())
    async with server.listen(url) as listener:
        print(listener.url, flush=True)  # tells the parent we are ready
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin


async def client(url: str) -> None:
    tracer = make_tracer("shop-client")
    async with xrpc.connect(url, middleware=[tracing_middleware(tracer)], timeout=10) as conn:
        shop = conn.proxy(Shop)
        with tracer.start_as_current_span("visit", "INTERNAL"):  # one trace for the whole visit
            print("price of tea:", await shop.price("tea"))
            try:
                await shop.buy("cake", 5)
            except OutOfStock as exc:
                print("OutOfStock:", exc)
            # a stream too: the client middleware runs when the stream starts
            print("restocked:", [n async for n in shop.restock("tea", 3)])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        anyio.run(serve, sys.argv[2])
        return
    if len(sys.argv) != 1:
        raise SystemExit(f"usage: {sys.argv[0]} [serve URL]")
    if HAVE_OTEL:
        print("tracing with OpenTelemetry (opentelemetry-sdk)")
    else:
        print("opentelemetry is not installed: printing spans with a tiny built-in tracer instead")
    with tempfile.TemporaryDirectory(prefix="xrpc-otel-") as tmp:
        proc = subprocess.Popen([sys.executable, __file__, "serve", f"unix://{tmp}/shop.sock"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            url = proc.stdout.readline().strip()
            if not url:
                raise SystemExit("the service did not start")
            print("client spans:")
            anyio.run(client, url)
        finally:
            proc.stdin.close()
            server_output = proc.stdout.read()
            proc.stdout.close()
            proc.wait(timeout=10)
    print("server spans (printed by the service process):")
    print(server_output, end="")


if __name__ == "__main__":
    main()
