"""Cap'n Proto's calculator example, ported to xrpc: capabilities passed by reference.

The server evaluates arithmetic expression trees.  Everything interesting is an *object* that
travels by reference rather than by value:

- ``evaluate(...)`` returns a ``Value``: a capability whose ``read()`` returns the number.  Passing
  a ``Value`` back into a later expression refers to the result where it lives, on the server.
- ``get_operator(op)`` returns a ``Function`` implemented by the server (add, subtract, ...).
- ``def_function(param_count, body, ...)`` turns an expression into a new server-side ``Function``.
- The client can implement a ``Function`` itself (``pow`` below) and pass it in; the server calls it
  back over the same connection while it evaluates.

How this differs from Cap'n Proto: xrpc passes objects by reference as parameters, replies and stream
items, also inside ``list``/``dict``/``tuple``/``Optional``, but not inside the fields of a msgspec
Struct.  So an ``Expression`` is plain data (a tagged union of Structs) that refers to capabilities by
*index*, and the capabilities travel next to it in two lists::

    evaluate(expression, values: list[Value], functions: list[Function]) -> Value

``Builder`` below collects those lists while you write the expression.  A capability that travels back
to the process that exported it arrives as the original object (``is``-identical), so when the client
hands the server its own ``add`` function, the server calls it locally, without a round trip.

Promise pipelining works as in Cap'n Proto for calls on a result: ``xrpc.pipeline(calculator)
.evaluate(...).read()`` sends ``read`` without waiting for ``evaluate``'s answer.  A promise cannot be
passed as an argument, though: to reuse a result in a later expression, wait for its ``Value`` and
pass that back (it still never travels to the client as a number).

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
from typing import AsyncIterator, Callable, Protocol, Sequence, TypeVar, Union

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

import xrpc

T = TypeVar("T")


# --------------------------------------------------------------------------- expressions: plain data
class Literal(msgspec.Struct, tag=True, frozen=True):
    """A number."""

    value: float


class PreviousResult(msgspec.Struct, tag=True, frozen=True):
    """The result of an earlier ``evaluate``: ``values[index]``."""

    index: int


class Parameter(msgspec.Struct, tag=True, frozen=True):
    """Inside a ``def_function`` body: the function's parameter number ``index``."""

    index: int


class Call(msgspec.Struct, tag=True, frozen=True):
    """``functions[function](*params)``."""

    function: int
    params: list[Expression]


Expression = Union[Literal, PreviousResult, Parameter, Call]


class Operator(str, enum.Enum):
    ADD = "add"
    SUBTRACT = "subtract"
    MULTIPLY = "multiply"
    DIVIDE = "divide"


class InvalidExpression(Exception):
    """The expression refers to something it does not provide (declared: travels as itself)."""


# --------------------------------------------------------------------------- interfaces: capabilities
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


@xrpc.interface(errors=(InvalidExpression,))
class Calculator(Protocol):
    async def evaluate(self, expression: Expression, values: list[Value], functions: list[Function]) -> Value:
        """Evaluate ``expression``; ``PreviousResult``/``Call`` index into ``values``/``functions``."""
        ...

    async def def_function(self, param_count: int, body: Expression, values: list[Value], functions: list[Function]) -> Function:
        """A new function whose body is ``body`` (``Parameter(i)`` is its i-th parameter)."""
        ...

    async def get_operator(self, op: Operator) -> Function:
        """One of the four basic operators, as a function of two parameters."""
        ...


# --------------------------------------------------------------------------- the server
async def evaluate_expression(expr: Expression, params: list[float], values: list[Value], functions: list[Function]) -> float:
    """Evaluate ``expr`` with the given function parameters and capabilities."""
    match expr:
        case Literal(value=value):
            return value
        case PreviousResult(index=i):
            return await _pick(values, i, "value").read()
        case Parameter(index=i):
            return _pick(params, i, "parameter")
        case Call(function=f, params=args):
            function = _pick(functions, f, "function")
            evaluated = [await evaluate_expression(a, params, values, functions) for a in args]
            return await function.call(evaluated)
    raise InvalidExpression(f"not an expression: {expr!r}")


def _pick(items: Sequence[T], index: int, what: str) -> T:
    if not 0 <= index < len(items):
        raise InvalidExpression(f"{what} #{index} does not exist (there are {len(items)})")
    return items[index]


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
    """A function made by ``def_function``; it keeps the capabilities its body refers to."""

    def __init__(self, param_count: int, body: Expression, values: list[Value], functions: list[Function]) -> None:
        self.param_count = param_count
        self.body = body
        self.values = values
        self.functions = functions

    async def call(self, params: list[float]) -> float:
        if len(params) != self.param_count:
            raise InvalidExpression(f"this function takes {self.param_count} parameters, not {len(params)}")
        return await evaluate_expression(self.body, params, self.values, self.functions)


class CalculatorImpl:
    async def evaluate(self, expression: Expression, values: list[Value], functions: list[Function]) -> Value:
        return ValueImpl(await evaluate_expression(expression, [], values, functions))

    async def def_function(self, param_count: int, body: Expression, values: list[Value], functions: list[Function]) -> Function:
        return DefinedFunction(param_count, body, values, functions)

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
class Builder:
    """Writes an expression and collects the capabilities it refers to, in index order."""

    def __init__(self) -> None:
        self.values: list[Value] = []
        self.functions: list[Function] = []

    def literal(self, value: float) -> Literal:
        return Literal(value)

    def previous(self, value: Value) -> PreviousResult:
        return PreviousResult(self._index(self.values, value))

    def param(self, index: int) -> Parameter:
        return Parameter(index)

    def call(self, function: Function, *params: Expression | float) -> Call:
        args = [Literal(float(p)) if isinstance(p, (int, float)) else p for p in params]
        return Call(self._index(self.functions, function), args)

    @staticmethod
    def _index(items: list, item: object) -> int:  # type: ignore[type-arg]
        for i, existing in enumerate(items):
            if existing is item:
                return i
        items.append(item)
        return len(items) - 1


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

    ``xrpc.pipeline(calculator).evaluate(...).read()`` sends ``read`` at once, addressed to the
    result ``evaluate`` will return (promise pipelining): evaluating and reading cost one round trip.
    """
    results: list[tuple[str, float]] = []
    pipelined = xrpc.pipeline(calculator)

    # 1. A literal.
    b = Builder()
    results.append(("123", await pipelined.evaluate(b.literal(123), b.values, b.functions).read()))

    # 2. Server-side operators, fetched once and used by reference.
    add = await calculator.get_operator(Operator.ADD)
    subtract = await calculator.get_operator(Operator.SUBTRACT)
    multiply = await calculator.get_operator(Operator.MULTIPLY)
    b = Builder()
    expr = b.call(subtract, b.call(add, 123, 45), 67)
    results.append(("123 + 45 - 67", await pipelined.evaluate(expr, b.values, b.functions).read()))

    # 3. Reusing a result where it lives: the Value goes back to the server, never read by the client.
    b = Builder()
    sum_value = await calculator.evaluate(b.call(add, 123, 45), b.values, b.functions)
    b = Builder()
    times_five = pipelined.evaluate(b.call(multiply, b.previous(sum_value), 5), b.values, b.functions).read()
    b = Builder()
    plus_67 = pipelined.evaluate(b.call(add, b.previous(sum_value), 67), b.values, b.functions).read()
    results.append(("(123 + 45) * 5", await times_five))  # both were sent before either was awaited
    results.append(("(123 + 45) + 67", await plus_67))

    # 4. Functions defined on the server: f(x, y) = x * 100 + y, then g(x) = f(x, x + 1) * 2.
    b = Builder()
    f = await calculator.def_function(2, b.call(add, b.call(multiply, b.param(0), 100), b.param(1)), b.values, b.functions)
    b = Builder()
    g = await calculator.def_function(1, b.call(multiply, b.call(f, b.param(0), b.call(add, b.param(0), 1)), 2), b.values, b.functions)
    b = Builder()
    results.append(("f(12, 34)", await pipelined.evaluate(b.call(f, 12, 34), b.values, b.functions).read()))
    b = Builder()
    results.append(("g(21)", await pipelined.evaluate(b.call(g, 21), b.values, b.functions).read()))

    # 5. A callback: pow lives in this process; the server calls it while evaluating 2 ** (4 + 5).
    power = PowerFunction()
    b = Builder()
    expr = b.call(power, 2, b.call(add, 4, 5))
    results.append(("pow(2, 4 + 5)", await pipelined.evaluate(expr, b.values, b.functions).read()))
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
