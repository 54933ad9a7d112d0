"""A garden service that uses every kind of method and a tree of nested user types.

tests/test_codegen.py exports its schema, generates stubs from it, and has a client built on the
generated Protocol talk to a server that exports the interface defined here.
"""

from __future__ import annotations

import datetime
import enum
from typing import Annotated, AsyncIterator, Protocol

import anyio
import msgspec

import xrpc


class Color(enum.Enum):
    GREEN = "green"
    RED = "red"
    GOLD = "gold"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Leaf(msgspec.Struct):
    """One leaf."""

    name: str
    weight: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    tags: list[str] = []


class Branch(msgspec.Struct, kw_only=True):
    """A branch holds leaves by kind.

    The field order puts a required field after optional ones, hence kw_only.
    """

    note: str | None = None
    leaves: dict[str, list[Leaf]]
    color: Color = Color.GREEN
    cut: datetime.datetime | None = None


class Tree(msgspec.Struct):
    name: str
    branches: list[Branch]
    priority: Priority = Priority.LOW
    rings: dict[int, str] = {}
    seed: bytes = b""


class Circle(msgspec.Struct):
    radius: float


class Square(msgspec.Struct, frozen=True):
    side: float = 1.0


class Shed:
    class Tool(msgspec.Struct, array_like=True):
        """Travels as an array; its wire key is Shed.Tool."""

        name: str
        uses: int = 0


class GardenError(Exception):
    """Base of the garden's declared errors."""


class NotFound(GardenError):
    """Nothing by that name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@xrpc.interface(name="test.ToolShed")
class ToolShed(Protocol):
    """Handed out by reference from Garden.open_shed."""

    async def take(self, name: str) -> Shed.Tool: ...


@xrpc.interface(name="test.Garden", errors=(GardenError, NotFound))
class Garden(Protocol):
    """Grow trees remotely."""

    async def plant(self, tree: Tree, count: int = 1, label: str = "new", color: Color = Color.RED) -> Tree:
        """Plant ``count`` copies of a tree; echoes the tree back, relabelled."""
        ...

    async def find(self, name: str, default: Leaf | None = None) -> Leaf | None:
        """Raises NotFound for the name "missing"."""
        ...

    @xrpc.oneway
    async def log(self, text: str) -> None: ...

    def grow(self, tree: Tree, steps: int = 3) -> AsyncIterator[Leaf]: ...

    async def weigh(self, leaves: AsyncIterator[Leaf], scale: float = 1.0) -> float: ...

    def echo(self, branches: AsyncIterator[Branch]) -> AsyncIterator[Branch]: ...

    async def area(self, shape: Circle | Square) -> float: ...

    async def store(self, item: Annotated[object, xrpc.allow(Circle, Shed.Tool)]) -> str: ...

    async def stamp(self, when: Annotated[datetime.datetime, msgspec.Meta(tz=True)], shift: datetime.timedelta = datetime.timedelta(hours=1)) -> datetime.datetime: ...

    async def tools(self, names: frozenset[str], pair: tuple[int, str] = (1, "a")) -> list[Shed.Tool]: ...

    async def open_shed(self, owner: str, *, uses: int = 1) -> ToolShed:
        """An object passed by reference; ``uses`` is keyword-only."""
        ...


@xrpc.interface(name="test.Plain")
class Plain(Protocol):
    """An interface whose generated twin must have the same fingerprint."""

    async def get(self, key: str, tree: Tree | None = None, limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10) -> list[Leaf]: ...

    def watch(self, colors: list[Color]) -> AsyncIterator[dict[str, Branch]]: ...


class ToolShedImpl:
    def __init__(self, owner: str, uses: int) -> None:
        self.owner = owner
        self.uses = uses

    async def take(self, name: str) -> Shed.Tool:
        return Shed.Tool(f"{self.owner}'s {name}", self.uses)


class GardenImpl:
    """The server side of Garden."""

    def __init__(self) -> None:
        self.logged: list[str] = []
        self.log_event = anyio.Event()

    async def plant(self, tree: Tree, count: int = 1, label: str = "new", color: Color = Color.RED) -> Tree:
        return Tree(f"{tree.name}:{label}:{count}:{color.value}", tree.branches, tree.priority, tree.rings, tree.seed)

    async def find(self, name: str, default: Leaf | None = None) -> Leaf | None:
        if name == "missing":
            raise NotFound(name)
        if name == "broken":
            raise GardenError("broken", 7)
        if name == "none":
            return default
        return Leaf(name, 2.5, ["found"])

    async def log(self, text: str) -> None:
        self.logged.append(text)
        self.log_event.set()

    async def grow(self, tree: Tree, steps: int = 3) -> AsyncIterator[Leaf]:
        for i in range(steps):
            yield Leaf(f"{tree.name}-{i}", float(i))

    async def weigh(self, leaves: AsyncIterator[Leaf], scale: float = 1.0) -> float:
        total = 0.0
        async for leaf in leaves:
            total += leaf.weight
        return total * scale

    async def echo(self, branches: AsyncIterator[Branch]) -> AsyncIterator[Branch]:
        async for b in branches:
            yield Branch(note=(b.note or "") + "!", leaves=b.leaves, color=b.color, cut=b.cut)

    async def area(self, shape: Circle | Square) -> float:
        if isinstance(shape, Circle):
            return 3.0 * shape.radius**2
        return shape.side**2

    async def store(self, item: object) -> str:
        return f"{type(item).__qualname__}:{item!r}"

    async def stamp(self, when: datetime.datetime, shift: datetime.timedelta = datetime.timedelta(hours=1)) -> datetime.datetime:
        return when + shift

    async def tools(self, names: frozenset[str], pair: tuple[int, str] = (1, "a")) -> list[Shed.Tool]:
        return [Shed.Tool(n, pair[0]) for n in sorted(names)]

    async def open_shed(self, owner: str, *, uses: int = 1) -> ToolShed:
        return ToolShedImpl(owner, uses)
