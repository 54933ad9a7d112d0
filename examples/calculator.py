"""Cap'n Proto's calculator example, in its own shape: capabilities inside records, pipelining.

The server evaluates arithmetic expression trees.  Everything interesting is an *object* that
travels by reference rather than by value, exactly where Cap'n Proto's schema puts it:

- ``evaluate(expression)`` returns a ``Value``: a capability whose ``read()`` returns the number.
- An ``Expression`` is a tagged union of records.  ``PreviousResult.value`` is a ``Value`` and
  ``Call.function`` a ``Function``: capabilities inside the records, passed by reference.
- ``get_operator(op)`` returns a ``Function`` implemented by the server (add, subtract, ...).
- ``def_function(param_count, body)`` turns an expression into a new server-side ``Function``.
- The client can implement a ``Function`` itself (``pow`` below) and pass it in; the server calls it
  back over the same connection while it evaluates.

Promise pipelining works as in Cap'n Proto.  ``xrpc.pipeline(calculator)`` makes every call return a
promise at once: ``.read()`` on the promise of ``evaluate`` is sent without waiting for
``evaluate``'s answer, and a promise can stand where its result is expected, in an argument or inside
a record.  So "fetch the operators, evaluate an expression, then use its result in two more
expressions" costs one round trip: every call leaves at once, and the server resolves each promise
to the object the earlier call returned, on its side.  A capability that comes back to the process
that exported it arrives as the original object, so the server's own ``Value``s and ``Function``s are
used locally, without a round trip.

Run it:  python examples/calculator.py

``main()`` starts the server as a child process (``python examples/calculator.py serve URL``), connects
to it over a Unix socket, runs the same checks as Cap'n Proto's ``calculator-client.c++`` and prints
each result.
"""

from __future__ import annotations

import contextlib
import enum
import operator
import shutil
import subprocess
import sys
import tempfile
from typing import Any, AsyncIterator, Callable, Protocol, Union

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

import xrpc


# --------------------------------------------------------------------------- interfaces: capabilities
class InvalidExpression(Exception):
    """The expression cannot be evaluated (declared: travels as itself)."""


@xrpc.interface
class Value(Protocol):
    async def read(self) -> float:
        """The number this value stands for."""
        ...


@xrpc.interface(errors=(InvalidExpression,))
class Function(Protocol):
    async def call(self, params: list[float]) -> float:
        """Apply the function to already evaluated parameters."""
        ...


# --------------------------------------------------------------------------- expressions: records holding capabilities
class Literal(msgspec.Struct, tag="literal", frozen=True):
    """A number."""

    value: float


class PreviousResult(msgspec.Struct, tag="previousResult", frozen=True):
    """The result of an earlier ``evaluate``, where it lives (a capability)."""

    value: Value


class Parameter(msgspec.Struct, tag="parameter", frozen=True):
    """Inside a ``def_function`` body: the function's parameter number ``index``."""

    index: int


class Call(msgspec.Struct, tag="call", frozen=True):
    """``function(*params)``: the function is a capability, the parameters expressions."""

    function: Function
    params: list[Expression]


Expression = Union[Literal, PreviousResult, Parameter, Call]


class Operator(str, enum.Enum):
    ADD = "add"
    SUBTRACT = "subtract"
    MULTIPLY = "multiply"
    DIVIDE = "divide"


@xrpc.interface(errors=(InvalidExpression,))
class Calculator(Protocol):
    async def evaluate(self, expression: Expression) -> Value:
        """Evaluate ``expression``; the result stays here, the caller gets a ``Value`` for it."""
        ...

    async def def_function(self, param_count: int, body: Expression) -> Function:
        """A new function whose body is ``body`` (``Parameter(i)`` is its i-th parameter)."""
        ...

    async def get_operator(self, op: Operator) -> Function:
        """One of the four basic operators, as a function of two parameters."""
        ...


# --------------------------------------------------------------------------- the server
async def evaluate_expression(expr: Expression, params: list[float]) -> float:
    """Evaluate ``expr`` with the given function parameters."""
    match expr:
        case Literal(value=value):
            return value
        case PreviousResult(value=value):
            return await value.read()
        case Parameter(index=i):
            if not 0 <= i < len(params):
                raise InvalidExpression(f"parameter #{i} does not exist (there are {len(params)})")
            return params[i]
        case Call(function=function, params=args):
            return await function.call([await evaluate_expression(a, params) for a in args])
    raise InvalidExpression(f"not an expression: {expr!r}")


class ValueImpl:
    """A result, kept on the server; the client holds a reference to it."""

    def __init__(self, value: float) -> None:
        self.value = value

    async def read(self) -> float:
        return self.value


class OperatorFunction:
    """``add``, ``subtract``, ``multiply`` or ``divide``."""

    OPERATIONS: dict[Operator, Callable[[float, float], float]] = {
        Operator.ADD: operator.add,
        Operator.SUBTRACT: operator.sub,
        Operator.MULTIPLY: operator.mul,
        Operator.DIVIDE: operator.truediv,
    }

    def __init__(self, op: Operator) -> None:
        self.op = op

    async def call(self, params: list[float]) -> float:
        if len(params) != 2:
            raise InvalidExpression(f"{self.op.value} takes 2 parameters, not {len(params)}")
        return self.OPERATIONS[self.op](params[0], params[1])


class DefinedFunction:
    """A function made by ``def_function``; its body keeps the capabilities it refers to."""

    def __init__(self, param_count: int, body: Expression) -> None:
        self.param_count = param_count
        self.body = body

    async def call(self, params: list[float]) -> float:
        if len(params) != self.param_count:
            raise InvalidExpression(f"this function takes {self.param_count} parameters, not {len(params)}")
        return await evaluate_expression(self.body, params)


class CalculatorImpl:
    async def evaluate(self, expression: Expression) -> Value:
        return ValueImpl(await evaluate_expression(expression, []))

    async def def_function(self, param_count: int, body: Expression) -> Function:
        return DefinedFunction(param_count, body)

    async def get_operator(self, op: Operator) -> Function:
        return OperatorFunction(op)


async def serve(url: str) -> None:
    """Serve a ``Calculator`` on ``url``; print the bound URL; stop when stdin reaches end of file."""
    server = xrpc.Server()
    server.export(Calculator, CalculatorImpl())
    async with server.listen(url) as listener:
        print(listener.url, flush=True)
        stdin = anyio.wrap_file(sys.stdin.buffer)
        while await stdin.read(4096):
            pass


# --------------------------------------------------------------------------- the client
def call(function: Any, *params: Expression | float) -> Call:
    """``Call(function, params)``, with numbers written as numbers."""
    return Call(function, [Literal(float(p)) if isinstance(p, (int, float)) else p for p in params])


class PowerFunction:
    """A ``Function`` implemented by the client: the server calls it back."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, params: list[float]) -> float:
        if len(params) != 2:
            raise InvalidExpression(f"pow takes 2 parameters, not {len(params)}")
        self.calls += 1
        return float(params[0] ** params[1])


async def run_checks(calculator: Calculator) -> list[tuple[str, float]]:
    """The checks of Cap'n Proto's calculator client; returns (description, result) pairs.

    Every call goes through ``xrpc.pipeline(calculator)``: it returns a promise at once, and a
    promise stands where its result is expected (``Call.function``, ``PreviousResult.value``), so
    each check is sent in full before anything is awaited.
    """
    results: list[tuple[str, float]] = []
    pipelined = xrpc.pipeline(calculator)

    # 1. A literal: evaluate, and read the result in the same round trip.
    results.append(("123", await pipelined.evaluate(Literal(123)).read()))

    # 2. Server-side operators, used by reference before they have arrived.
    add = pipelined.get_operator(Operator.ADD)
    subtract = pipelined.get_operator(Operator.SUBTRACT)
    results.append(("123 + 45 - 67", await pipelined.evaluate(call(subtract, call(add, 123, 45), 67)).read()))

    # 3. Pipelining evaluations: the sum is never read by the client; two more expressions use it
    #    where it lives, and all of it leaves before the first answer comes back.
    multiply = pipelined.get_operator(Operator.MULTIPLY)
    sum_value = pipelined.evaluate(call(add, 123, 45))
    times_five = pipelined.evaluate(call(multiply, PreviousResult(sum_value), 5)).read()
    plus_67 = pipelined.evaluate(call(add, PreviousResult(sum_value), 67)).read()
    results.append(("(123 + 45) * 5", await times_five))
    results.append(("(123 + 45) + 67", await plus_67))

    # 4. Functions defined on the server: f(x, y) = x * 100 + y, then g(x) = f(x, x + 1) * 2.
    f = pipelined.def_function(2, call(add, call(multiply, Parameter(0), 100), Parameter(1)))
    g = pipelined.def_function(1, call(multiply, call(f, Parameter(0), call(add, Parameter(0), 1)), 2))
    f_result = pipelined.evaluate(call(f, 12, 34)).read()
    g_result = pipelined.evaluate(call(g, 21)).read()
    results.append(("f(12, 34)", await f_result))
    results.append(("g(21)", await g_result))

    # 5. A callback: pow lives in this process; the server calls it while evaluating 2 ** (4 + 5).
    power = PowerFunction()
    results.append(("pow(2, 4 + 5)", await pipelined.evaluate(call(power, 2, call(add, 4, 5))).read()))
    assert power.calls == 1, "the server should have called pow back exactly once"
    return results


@contextlib.asynccontextmanager
async def calculator_process() -> AsyncIterator[str]:
    """Start ``serve`` in a child process on a fresh Unix socket; yield its URL; stop it afterwards."""
    directory = tempfile.mkdtemp(prefix="xr", dir="/tmp")  # short: Unix socket paths are limited
    try:
        proc = await anyio.open_process(
            [sys.executable, __file__, "serve", f"unix://{directory}/calc.sock"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            with anyio.fail_after(30):
                url = (await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 4096)).decode().strip()
            yield url
            await proc.stdin.aclose()  # the child stops at end of file
            with anyio.move_on_after(10):
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.aclose()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def main() -> list[tuple[str, float]]:
    async with calculator_process() as url:
        async with xrpc.connect(url) as conn:
            calculator = conn.proxy(Calculator, timeout=30)
            results = await run_checks(calculator)
    for description, result in results:
        print(f"{description} = {result:g}")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        anyio.run(serve, sys.argv[2])
    elif len(sys.argv) == 1:
        anyio.run(main)
    else:
        sys.exit(f"usage: {sys.argv[0]} [serve URL]")
