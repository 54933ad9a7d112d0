"""codegen: schema export, stubs that interoperate with the original server, compatibility checks, CLI.

The interfaces of the check table are defined inside small functions (so two versions of ``Item`` can
coexist); this module therefore does not use ``from __future__ import annotations``: annotations are
evaluated where the classes are in scope.
"""

import datetime
import enum
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, AsyncIterator, Callable, Iterator, Optional, Protocol

import anyio
import anyio.from_thread
import msgspec
import pytest

import xrpc
from xrpc._interface import DictPlan, RefPlan, SeqPlan, TuplePlan

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import codegen  # noqa: E402
from codegen_fixtures import service  # noqa: E402
from _timeouts import T  # noqa: E402



# --------------------------------------------------------------------------- helpers
def _json_round(doc: dict[str, Any]) -> dict[str, Any]:
    """What a reader of the written file sees."""
    return json.loads(json.dumps(doc))  # type: ignore[no-any-return]


def _import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # msgspec and xrpc resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _cli(*args: str, timeout: float = 120) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "codegen", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _mypy_strict(path: Path, cache: Path) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        # errors are reported for ``path`` only, not for xrpc or msgspec (--follow-imports=silent)
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary", "--cache-dir", str(cache), str(path)],
        cwd=ROOT,  # so mypy finds xrpc from the checkout
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30 * T,
    )


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return _json_round(codegen.build_schema(codegen.load_targets("codegen_fixtures.service")))


@pytest.fixture(scope="module")
def stub_path(schema: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stubs") / "garden_stubs.py"
    path.write_text(codegen.render_stubs(schema, "garden.json"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gen(stub_path: Path) -> Iterator[ModuleType]:
    name = "xrpc_codegen_generated_garden"
    try:
        yield _import_file(stub_path, name)
    finally:
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------- schema export
def test_schema_describes_every_method_kind_and_type(schema: dict[str, Any]) -> None:
    assert schema["xrpc_schema"] == codegen.SCHEMA_VERSION == 1
    assert [i["name"] for i in schema["interfaces"]] == ["test.Garden", "test.Plain", "test.ToolShed"]
    garden = schema["interfaces"][0]
    assert garden["fingerprint"] == xrpc.describe(service.Garden).fingerprint
    assert garden["doc"] == "Grow trees remotely."
    methods = {m["name"]: m for m in garden["methods"]}
    assert {n: m["kind"] for n, m in methods.items()} == {
        "plant": "unary",
        "find": "unary",
        "log": "oneway",
        "grow": "server_stream",
        "weigh": "client_stream",
        "echo": "bidi_stream",
        "area": "unary",
        "store": "unary",
        "stamp": "unary",
        "tools": "unary",
        "open_shed": "unary",
    }
    plant = methods["plant"]
    assert [(p["name"], p["required"], p.get("default")) for p in plant["params"]] == [
        ("tree", True, None),
        ("count", False, 1),
        ("label", False, "new"),
        ("color", False, "red"),
    ]
    assert plant["params"][0]["type"] == {"$ref": "#/$defs/Tree"}
    assert plant["doc"].startswith("Plant ``count`` copies")
    assert methods["log"]["reply"] is None
    assert methods["weigh"]["params"][0]["stream"] is True
    assert methods["grow"]["reply"] == {"$ref": "#/$defs/Leaf"}
    # errors keep their wire names and hierarchy
    assert [(e["name"], e["bases"]) for e in garden["errors"]] == [("GardenError", []), ("NotFound", ["GardenError"])]
    assert garden["errors"][1]["fields"] == [{"name": "name", "type": {"type": "string"}, "required": True}]
    # allow-lists: the key is the wire name (__qualname__), plain data has the key ""
    store = methods["store"]["params"][0]
    assert [(a["key"], a["type"]) for a in store["allowed"]] == [
        ("Circle", {"$ref": "#/$defs/Circle"}),
        ("Shed.Tool", {"$ref": "#/$defs/Tool"}),
        ("", {}),
    ]
    assert [a["key"] for a in methods["area"]["params"][0]["allowed"]] == ["Circle", "Square"]
    # msgpack facts JSON Schema cannot state
    assert methods["stamp"]["params"][0]["type"] == {"type": "string", "format": "date-time", "x-xrpc-python": "datetime"}
    assert methods["stamp"]["params"][1]["default"] == "PT3600S"
    assert methods["tools"]["params"][0]["type"]["x-xrpc-python"] == "frozenset"
    # an object passed by reference names its interface, and keyword-only parameters say so
    assert methods["open_shed"]["reply"] == {"x-xrpc-interface": "test.ToolShed"}
    assert methods["open_shed"]["params"][1] == {"name": "uses", "type": {"type": "integer"}, "required": False, "stream": False, "keyword_only": True, "default": 1}


def test_schema_defs_hold_nested_user_types(schema: dict[str, Any]) -> None:
    defs = schema["$defs"]
    assert set(defs) == {"Branch", "Circle", "Color", "Leaf", "Priority", "Square", "Tool", "Tree"}
    branch = defs["Branch"]
    assert branch["required"] == ["leaves"]
    assert branch["properties"]["leaves"] == {
        "type": "object",
        "additionalProperties": {"type": "array", "items": {"$ref": "#/$defs/Leaf"}},
    }
    assert branch["properties"]["cut"]["anyOf"][0] == {"type": "string", "x-xrpc-python": "datetime"}
    assert defs["Tree"]["properties"]["rings"]["x-xrpc-keys"] == {"type": "integer"}
    assert defs["Color"]["x-xrpc-class"]["members"] == {"GREEN": "green", "RED": "red", "GOLD": "gold"}
    tool = defs["Tool"]
    assert tool["type"] == "array"
    assert tool["x-xrpc-class"] == {"key": "Shed.Tool", "kind": "struct", "array_like": True, "fields": ["name", "uses"]}
    assert defs["Square"]["x-xrpc-class"]["frozen"] is True


def test_build_schema_refuses_what_it_cannot_describe() -> None:
    class NotAnInterface(Protocol):
        async def f(self) -> int: ...

    with pytest.raises(codegen.CodegenError, match="is not an @xrpc.interface class"):
        codegen.build_schema([NotAnInterface])

    @xrpc.interface(name="Dup")
    class A(Protocol):
        async def f(self) -> int: ...

    @xrpc.interface(name="Dup")
    class B(Protocol):
        async def f(self) -> int: ...

    with pytest.raises(codegen.CodegenError, match="share the name 'Dup'"):
        codegen.build_schema([A, B])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("codegen_fixtures.nope", "no module named 'codegen_fixtures.nope'"),
        ("codegen_fixtures.service:Nope", "has no attribute 'Nope'"),
        ("codegen_fixtures.service:GardenImpl", "is not an @xrpc.interface class"),
        ("codegen_fixtures", "defines no @xrpc.interface class"),
        ("not a module", "expected MODULE or MODULE:INTERFACE"),
    ],
)
def test_load_targets_errors(spec: str, message: str) -> None:
    with pytest.raises(codegen.CodegenError, match=message):
        codegen.load_targets(spec)


def test_load_targets_selects_interfaces() -> None:
    assert codegen.load_targets("codegen_fixtures.service:Plain,Garden") == [service.Plain, service.Garden]
    assert codegen.load_targets("codegen_fixtures.service") == [service.Garden, service.Plain, service.ToolShed]
    # an interface passed by reference comes along with the one that hands it out
    doc = codegen.build_schema([service.Garden])
    assert [i["name"] for i in doc["interfaces"]] == ["test.Garden", "test.ToolShed"]


# --------------------------------------------------------------------------- stubs
def test_stubs_declare_structs_enums_errors_and_protocols(gen: ModuleType, stub_path: Path) -> None:
    text = stub_path.read_text(encoding="utf-8")
    assert "@xrpc.interface(name=\"test.Garden\", errors=(GardenError, NotFound))" in text
    assert "class Branch(msgspec.Struct, kw_only=True):" in text
    assert "class Tool(msgspec.Struct, array_like=True):" in text
    assert "    @xrpc.oneway\n    async def log(self, text: str) -> None: ..." in text
    assert "def grow(self, tree: Tree, steps: int = 3) -> AsyncIterator[Leaf]: ..." in text
    assert "async def weigh(self, leaves: AsyncIterator[Leaf], scale: float = 1.0) -> float: ..." in text
    assert "def echo(self, branches: AsyncIterator[Branch]) -> AsyncIterator[Branch]: ..." in text
    assert "item: Annotated[object, xrpc.allow(Circle, Tool)]" in text
    assert "shift: datetime.timedelta = datetime.timedelta(seconds=3600)" in text
    assert "async def open_shed(self, owner: str, *, uses: int = 1) -> ToolShed:" in text
    assert text.index("class ToolShed(Protocol)") < text.index("class Garden(Protocol)")

    assert issubclass(gen.Leaf, msgspec.Struct) and issubclass(gen.Color, enum.Enum)
    assert [(m.name, m.value) for m in gen.Color] == [("GREEN", "green"), ("RED", "red"), ("GOLD", "gold")]
    assert gen.Tool.__qualname__ == "Shed.Tool"  # the wire key of a widened slot
    assert issubclass(gen.NotFound, gen.GardenError) and issubclass(gen.GardenError, Exception)
    assert gen.Leaf("x") == gen.Leaf("x", 1.0, [])  # defaults preserved
    assert gen.Tree("t", []).priority is gen.Priority.LOW
    d = xrpc.describe(gen.Garden)
    assert d.name == "test.Garden"
    assert {n: m.kind.value for n, m in d.methods.items()} == {
        n: m.kind.value for n, m in xrpc.describe(service.Garden).methods.items()
    }
    assert list(d.error_map) == ["GardenError", "NotFound"]


def test_stub_schema_is_a_fixed_point(schema: dict[str, Any], gen: ModuleType) -> None:
    """Exporting the generated module gives the original schema back (bar what stubs cannot carry)."""
    again = _json_round(codegen.build_schema([gen.Garden, gen.Plain]))  # ToolShed comes by reference
    assert again["$defs"] == schema["$defs"]
    assert [i["name"] for i in again["interfaces"]] == [i["name"] for i in schema["interfaces"]]
    for old, new in zip(schema["interfaces"], again["interfaces"]):
        assert new["methods"] == old["methods"]
        # a generated error has no constructor of its own, so it states no fields
        assert [{k: v for k, v in e.items() if k != "fields"} for e in new["errors"]] == [
            {k: v for k, v in e.items() if k != "fields"} for e in old["errors"]
        ]


def test_generated_interface_has_the_original_fingerprint(gen: ModuleType) -> None:
    assert xrpc.describe(gen.Plain).fingerprint == xrpc.describe(service.Plain).fingerprint


def test_generated_stubs_pass_mypy_strict(stub_path: Path, tmp_path: Path) -> None:
    r = _mypy_strict(stub_path, tmp_path / "mypy-cache")
    assert r.returncode == 0, r.stdout + r.stderr


async def test_generated_client_talks_to_the_original_server(gen: ModuleType) -> None:
    server = xrpc.Server()
    impl = service.GardenImpl()
    server.export(service.Garden, impl)
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server, timeout=T) as conn:
            p = conn.proxy(gen.Garden, timeout=T)
            cut = datetime.datetime(2024, 5, 1, 12, 30)
            branch = gen.Branch(leaves={"big": [gen.Leaf("l1", 0.5, ["x"])], "none": []}, note="n", color=gen.Color.GOLD, cut=cut)
            tree = gen.Tree("oak", [branch], gen.Priority.HIGH, {1: "one", 20: "twenty"}, b"\x00\xff")

            # unary, defaults filled in by the generated signature
            planted = await p.plant(tree, 2)
            assert isinstance(planted, gen.Tree)
            assert planted == gen.Tree("oak:new:2:red", [branch], gen.Priority.HIGH, {1: "one", 20: "twenty"}, b"\x00\xff")
            assert (await p.plant(tree, color=gen.Color.GOLD, label="x")).name == "oak:x:1:gold"

            assert await p.find("x") == gen.Leaf("x", 2.5, ["found"])
            assert await p.find("none") is None
            assert await p.find("none", gen.Leaf("d")) == gen.Leaf("d")

            # declared errors arrive as the generated classes
            with pytest.raises(gen.NotFound) as excinfo:
                await p.find("missing")
            assert excinfo.value.args == ("missing",)
            with pytest.raises(gen.GardenError) as excinfo2:
                await p.find("broken")
            assert type(excinfo2.value) is gen.GardenError and excinfo2.value.args == ("broken", 7)

            # one-way
            await p.log("hello")
            await impl.log_event.wait()
            assert impl.logged == ["hello"]

            # server stream
            grown = [leaf async for leaf in p.grow(tree, 2)]
            assert grown == [gen.Leaf("oak-0", 0.0), gen.Leaf("oak-1", 1.0)]
            assert len([leaf async for leaf in p.grow(tree)]) == 3

            # client stream
            async def leaves() -> AsyncIterator[Any]:
                yield gen.Leaf("a", 1.0)
                yield gen.Leaf("b", 2.0)

            assert await p.weigh(leaves(), 2.0) == 6.0
            assert await p.weigh(leaves()) == 3.0

            # two-way stream
            async def branches() -> AsyncIterator[Any]:
                yield branch
                yield gen.Branch(leaves={})

            echoed = [b async for b in p.echo(branches())]
            assert echoed == [
                gen.Branch(leaves=branch.leaves, note="n!", color=gen.Color.GOLD, cut=cut),
                gen.Branch(leaves={}, note="!"),
            ]

            # widened slots: the wire key of each generated class matches the original's
            assert await p.area(gen.Circle(2.0)) == 12.0
            assert await p.area(gen.Square(3.0)) == 9.0
            assert await p.store(gen.Tool("saw", 3)) == "Shed.Tool:Tool(name='saw', uses=3)"
            assert await p.store(gen.Circle(1.5)) == "Circle:Circle(radius=1.5)"
            assert await p.store({"plain": [1, 2]}) == "dict:{'plain': [1, 2]}"
            with pytest.raises(xrpc.ValidationError):
                await p.store(gen.Leaf("not allowed"))

            # msgpack-only types: aware datetime, timedelta default, frozenset, tuple default
            when = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
            assert await p.stamp(when) == when + datetime.timedelta(hours=1)
            assert await p.tools(frozenset({"b", "a"})) == [gen.Tool("a", 1), gen.Tool("b", 1)]
            assert await p.tools(frozenset({"c"}), (5, "z")) == [gen.Tool("c", 5)]

            # an object passed by reference arrives as a proxy typed by the generated Protocol
            shed = await p.open_shed("ann", uses=4)
            assert await shed.take("rake") == gen.Tool("ann's rake", 4)
            assert await (await p.open_shed("bo")).take("hoe") == gen.Tool("bo's hoe", 1)


def test_blocking_stubs_declare_a_checked_blocking_form_that_calls_the_original_server(schema: dict[str, Any], tmp_path: Path) -> None:
    """``--blocking``: each Protocol is followed by its blocking form, for typed ``xrpc.blocking`` proxies."""
    text = codegen.render_stubs(schema, "garden.json", blocking=True)
    assert "@xrpc.blocking.interface(Garden)\nclass GardenBlocking(Protocol):" in text
    assert "    def grow(self, tree: Tree, steps: int = 3) -> Iterator[Leaf]: ..." in text
    assert "    def weigh(self, leaves: Iterable[Leaf], scale: float = 1.0) -> float: ..." in text
    assert "    def log(self, text: str) -> None: ..." in text
    assert "async def" not in text.split("class GardenBlocking", 1)[1].split("\n\n\n", 1)[0]
    plain = codegen.render_stubs(schema, "garden.json")
    assert "Blocking" not in plain and "Iterable" not in plain
    path = tmp_path / "garden_blocking_stubs.py"
    path.write_text(text, encoding="utf-8")
    r = _mypy_strict(path, tmp_path / "mypy-cache")
    assert r.returncode == 0, r.stdout + r.stderr
    name = "xrpc_codegen_generated_garden_blocking"
    bgen = _import_file(path, name)  # the decorator checks each blocking form against its Protocol here
    try:
        assert bgen.__all__[-3:] == ("GardenBlocking", "PlainBlocking", "ToolShedBlocking")
        server = xrpc.Server()
        server.export(service.Garden, service.GardenImpl())
        with anyio.from_thread.start_blocking_portal() as portal:
            with portal.wrap_async_context_manager(server.listen("tcp://127.0.0.1:0")) as listener:
                with xrpc.blocking.connect(listener.url, timeout=T) as conn:
                    p = conn.proxy(bgen.GardenBlocking, timeout=T)
                    tree = bgen.Tree("oak", [])
                    assert p.plant(tree, 2).name == "oak:new:2:red"
                    assert [leaf.name for leaf in p.grow(tree, 2)] == ["oak-0", "oak-1"]
                    assert p.weigh([bgen.Leaf("a", 1.0), bgen.Leaf("b", 2.0)], 2.0) == 6.0
                    assert [b.note for b in p.echo([bgen.Branch(leaves={}, note="n")])] == ["n!"]
                    with pytest.raises(bgen.NotFound):
                        p.find("missing")
    finally:
        sys.modules.pop(name, None)


def test_cli_stubs_blocking(tmp_path: Path) -> None:
    out = tmp_path / "garden.json"
    assert _cli("schema", "codegen_fixtures.service", "-o", str(out)).returncode == 0
    r = _cli("stubs", str(out), "--blocking")
    assert r.returncode == 0, r.stderr
    assert "class GardenBlocking(Protocol):" in r.stdout
    assert "class GardenBlocking" not in _cli("stubs", str(out)).stdout


async def test_original_client_talks_to_a_server_built_on_the_stubs(gen: ModuleType) -> None:
    """The stubs also serve: an implementation exported under the generated Protocol."""

    class PlainImpl:
        async def get(self, key: str, tree: Any = None, limit: int = 10) -> list[Any]:
            return [gen.Leaf(f"{key}-{i}", float(i)) for i in range(min(limit, 2))]

        async def watch(self, colors: list[Any]) -> AsyncIterator[dict[str, Any]]:
            for c in colors:
                yield {c.value: gen.Branch(leaves={}, color=c)}

    server = xrpc.Server()
    server.export(gen.Plain, PlainImpl())
    with anyio.fail_after(T):
        async with xrpc.testing.connect(server, timeout=T) as conn:
            p = conn.proxy(service.Plain, timeout=T)
            assert await p.get("k") == [service.Leaf("k-0", 0.0), service.Leaf("k-1", 1.0)]
            got = [x async for x in p.watch([service.Color.RED, service.Color.GOLD])]
            assert got == [
                {"red": service.Branch(leaves={}, color=service.Color.RED)},
                {"gold": service.Branch(leaves={}, color=service.Color.GOLD)},
            ]
            with pytest.raises(xrpc.ValidationError):
                await p.get("k", limit=0)  # the generated constraint (ge=1) is enforced by the server


def _schema_of(defs: dict[str, Any], params: list[dict[str, Any]], reply: Any = None, kind: str = "unary") -> dict[str, Any]:
    method = {"name": "m", "kind": kind, "params": params, "reply": reply}
    return {"xrpc_schema": 1, "interfaces": [{"name": "svc.Foreign", "methods": [method]}], "$defs": defs}


def test_stubs_from_a_schema_without_xrpc_hints(tmp_path: Path) -> None:
    """Plain JSON Schema (no x-xrpc-* keys) still gives valid, typed code."""
    defs = {
        "Mode": {"title": "Mode", "enum": ["fast-path", "slow", "class"]},
        "Level": {"title": "Level", "enum": [1, 2]},
        "Point": {
            "title": "Point",
            "type": "object",
            "properties": {
                "x": {"type": "number", "minimum": 0, "description": "from the left"},
                "class": {"type": "string", "default": "p"},
                "mode": {"$ref": "#/$defs/Mode", "default": "slow"},
                "tags": {"type": "array", "items": {"type": "string"}, "default": ["a"]},
                "extra": {"type": "integer"},
                "id": {"type": "string", "format": "uuid"},
            },
            "required": ["x", "id"],
        },
        "Pair": {"title": "Pair", "type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2},
    }
    params: list[dict[str, Any]] = [
        {"name": "p", "type": {"$ref": "#/$defs/Point"}},
        {"name": "level", "type": {"$ref": "#/$defs/Level"}, "required": False, "default": 2},
        {"name": "opaque", "type": {"type": "integer"}, "required": False, "default_repr": "<sentinel>"},
        {"name": "pair", "type": {"$ref": "#/$defs/Pair"}},
        {"name": "when", "type": {"type": "string", "format": "date"}, "required": False, "default": "2024-02-29"},
    ]
    text = codegen.render_stubs(_schema_of(defs, params, {"type": "object", "additionalProperties": {"type": "integer"}}))
    path = tmp_path / "foreign.py"
    path.write_text(text, encoding="utf-8")
    r = _mypy_strict(path, tmp_path / "mypy-cache")
    assert r.returncode == 0, r.stdout + r.stderr + text
    assert "FAST_PATH = \"fast-path\"" in text and "CLASS = \"class\"" in text
    assert "class_: str = msgspec.field(default=\"p\", name=\"class\")" in text
    assert "extra: int | msgspec.UnsetType = msgspec.UNSET" in text
    assert "tags: list[str] = msgspec.field(default_factory=lambda: [\"a\"])" in text
    assert "# 'opaque' has a default the schema cannot carry (<sentinel>)" in text
    assert "when: datetime.date = datetime.date(2024, 2, 29)" in text
    # a required parameter after a defaulted one becomes keyword-only
    assert "level: Level = Level.V2, *, opaque: int, pair: Pair" in text
    mod = _import_file(path, "xrpc_codegen_generated_foreign")
    try:
        pt = mod.Point(x=1.0, id="00000000-0000-0000-0000-000000000000")  # kw_only: required after optional
        assert msgspec.to_builtins(pt)["class"] == "p"
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(mod.Pair(1, "a"))) == [1, "a"]
        assert xrpc.describe(mod.Foreign).name == "svc.Foreign"
    finally:
        sys.modules.pop("xrpc_codegen_generated_foreign", None)


def test_stubs_for_descriptors_shared_memory_and_parameter_kinds(tmp_path: Path) -> None:
    @xrpc.interface(name="test.Files")
    class Files(Protocol):
        async def send(self, fd: xrpc.FileDescriptor, /, label: str = "x", *, mode: int) -> xrpc.SharedBuffer: ...

    doc = _json_round(codegen.build_schema([Files]))
    params = doc["interfaces"][0]["methods"][0]["params"]
    assert [(p["name"], p["type"], p.get("positional_only", False), p.get("keyword_only", False)) for p in params] == [
        ("fd", {"x-xrpc-python": "fd"}, True, False),
        ("label", {"type": "string"}, False, False),
        ("mode", {"type": "integer"}, False, True),
    ]
    text = codegen.render_stubs(doc)
    assert 'async def send(self, fd: xrpc.FileDescriptor, /, label: str = "x", *, mode: int) -> xrpc.SharedBuffer: ...' in text
    path = tmp_path / "files_stubs.py"
    path.write_text(text, encoding="utf-8")
    r = _mypy_strict(path, tmp_path / "mypy-cache")
    assert r.returncode == 0, r.stdout + r.stderr
    mod = _import_file(path, "xrpc_codegen_generated_files")
    try:
        assert _json_round(codegen.build_schema([mod.Files]))["interfaces"] == doc["interfaces"]
    finally:
        sys.modules.pop("xrpc_codegen_generated_files", None)


def test_schema_and_stubs_follow_references_inside_containers(tmp_path: Path) -> None:
    """Codegen finds the interfaces a method passes by reference from the slots' plans, however
    deep in a container they sit, and the stubs declare them with the same plans."""

    @xrpc.interface(name="test.Leaf")
    class Leaf(Protocol):
        async def name(self) -> str: ...

    @xrpc.interface(name="test.Twig")
    class Twig(Protocol):
        async def length(self) -> float: ...

    @xrpc.interface(name="test.Tree")
    class Tree(Protocol):
        async def graft(self, leaves: list[Leaf], where: dict[str, tuple[Twig, int]]) -> int: ...
        async def first(self) -> Optional[Leaf]: ...
        def twigs(self, stop: int) -> AsyncIterator[tuple[Twig, ...]]: ...

    doc = _json_round(codegen.build_schema([Tree]))
    assert [i["name"] for i in doc["interfaces"]] == ["test.Tree", "test.Twig", "test.Leaf"]
    graft = doc["interfaces"][0]["methods"][0]
    assert graft["params"][0]["type"] == {"type": "array", "items": {"x-xrpc-interface": "test.Leaf"}}
    text = codegen.render_stubs(doc)
    assert "async def graft(self, leaves: list[Leaf], where: dict[str, tuple[Twig, int]]) -> int: ..." in text
    assert "async def first(self) -> Leaf | None: ..." in text
    assert "def twigs(self, stop: int) -> AsyncIterator[tuple[Twig, ...]]: ..." in text
    path = tmp_path / "tree_stubs.py"
    path.write_text(text, encoding="utf-8")
    mod = _import_file(path, "xrpc_codegen_generated_tree")
    try:
        # (Tree's fingerprint is not compared: a slot holding a reference enters it by the Python
        # name of its type, which differs between the original module and the stubs)
        for orig, made in ((Twig, mod.Twig), (Leaf, mod.Leaf)):
            assert xrpc.describe(made).fingerprint == xrpc.describe(orig).fingerprint
        made_graft = xrpc.describe(mod.Tree).methods["graft"]
        assert [p.slot.plan for p in made_graft.params] == [  # type: ignore[union-attr]
            SeqPlan(RefPlan(mod.Leaf), list),
            DictPlan(str, TuplePlan((RefPlan(mod.Twig), None), (mod.Twig, int))),
        ]
        again = _json_round(codegen.build_schema([mod.Tree]))["interfaces"]
        assert [(i["name"], i["methods"]) for i in again] == [(i["name"], i["methods"]) for i in doc["interfaces"]]
    finally:
        sys.modules.pop("xrpc_codegen_generated_tree", None)


@pytest.mark.parametrize(
    "doc, message",
    [
        ([], "expected a JSON object"),
        ({"interfaces": []}, "no \"xrpc_schema\" key"),
        ({"xrpc_schema": 99, "interfaces": []}, "unsupported schema version 99"),
        ({"xrpc_schema": 1, "interfaces": [{"name": "X", "methods": [{"name": "m", "kind": "sideways"}]}]}, r"\$.interfaces\[0\].methods\[0\].kind"),
        (_schema_of({}, [{"name": "p", "type": {"$ref": "#/$defs/Missing"}}]), "unresolved \\$ref '#/\\$defs/Missing'"),
    ],
)
def test_parse_schema_refuses_bad_documents(doc: Any, message: str) -> None:
    with pytest.raises(codegen.CodegenError, match=message):
        codegen.render_stubs(doc)


# --------------------------------------------------------------------------- compatibility table
Case = Callable[[], tuple[type, type]]
CASES: list[Any] = []
_B, _C = "breaking", "compatible"


def case(name: str, *expected: tuple[str, str, str]) -> Callable[[Case], Case]:
    """Register an OLD/NEW pair; ``expected`` lists (substring of the change, backward, forward)."""

    def register(fn: Case) -> Case:
        CASES.append(pytest.param(fn, expected, id=name))
        return fn

    return register


@case("nothing changed")
def _same() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        """Docs may change freely."""

        async def a(self, x: int) -> int:
            """So may method docs."""
            ...

    return Old, New


@case("method added", ("method added", _C, _B))
def _method_added() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self) -> int: ...

        async def b(self) -> int: ...

    return Old, New


@case("method removed", ("method removed", _B, _C))
def _method_removed() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self) -> int: ...

        async def b(self) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self) -> int: ...

    return Old, New


@case("parameter added with default", ("parameter 'limit' added with a default", _C, _B))
def _param_added_default() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: int, limit: int = 10) -> int: ...

    return Old, New


@case("parameter added without default", ("parameter 'limit' added without a default", _B, _B))
def _param_added_required() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: int, limit: int) -> int: ...

    return Old, New


@case("parameter removed", ("parameter 'y' removed", _B, _B))
def _param_removed() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int, y: int) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: int) -> int: ...

    return Old, New


@case("defaulted parameter removed", ("parameter 'y' removed", _B, _C))
def _param_removed_default() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int, y: int = 0) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: int) -> int: ...

    return Old, New


@case("parameter renamed", ("parameter 'y' renamed to 'z'", _B, _B))
def _param_renamed() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int, y: str) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: int, z: str) -> int: ...

    return Old, New


@case("parameters swapped", ("parameter 'x' moved from position 1 to 2", _B, _B), ("parameter 'y' moved from position 2 to 1", _B, _B))
def _param_moved() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int, y: int) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, y: int, x: int) -> int: ...

    return Old, New


@case("parameter type widened", ("parameter 'x': type widened from int to float", _C, _B))
def _param_widened() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: float) -> None: ...

    return Old, New


@case("parameter type narrowed", ("parameter 'x': type narrowed from float to int", _B, _C))
def _param_narrowed() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: float) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: int) -> None: ...

    return Old, New


@case("parameter made optional", ("parameter 'x': type now includes None", _C, _B))
def _param_optional() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: str) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: str | None) -> None: ...

    return Old, New


@case("parameter type changed", ("parameter 'x': type changed incompatibly from str to int", _B, _B))
def _param_changed() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: str) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: int) -> None: ...

    return Old, New


@case("reply narrowed", ("reply: type no longer includes None", _C, _B))
def _reply_narrowed() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self) -> int | None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self) -> int: ...

    return Old, New


@case("reply widened", ("reply: type widened from int to float", _B, _C))
def _reply_widened() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self) -> float: ...

    return Old, New


@case("reply added", ("reply changed from None to int", _C, _B))
def _reply_added() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self) -> int: ...

    return Old, New


@case("default added", ("parameter 'x' now has a default", _C, _B))
def _default_added() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: int = 3) -> None: ...

    return Old, New


@case("default removed", ("parameter 'x' no longer has a default", _B, _C))
def _default_removed() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int = 3) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: int) -> None: ...

    return Old, New


@case("default value changed", ("default of parameter 'x' changed from 3 to 4", _C, _C))
def _default_changed() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int = 3) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: int = 4) -> None: ...

    return Old, New


@case("two-way became one-way", ("two-way method became one-way", _B, _B))
def _unary_to_oneway() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        @xrpc.oneway
        async def a(self, x: int) -> None: ...

    return Old, New


@case("one-way became two-way", ("one-way method became two-way", _B, _B))
def _oneway_to_unary() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        @xrpc.oneway
        async def a(self, x: int) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, x: int) -> None: ...

    return Old, New


@case("unary became a server stream", ("kind changed from unary to server_stream", _B, _B))
def _unary_to_stream() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, x: int) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        def a(self, x: int) -> AsyncIterator[int]: ...

    return Old, New


@case("client stream became two-way", ("kind changed from client_stream to bidi_stream", _B, _B))
def _client_to_bidi() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, xs: AsyncIterator[int]) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        def a(self, xs: AsyncIterator[int]) -> AsyncIterator[int]: ...

    return Old, New


@case("client stream items widened", ("client stream items ('xs'): type widened from int to float", _C, _B))
def _client_items_widened() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, xs: AsyncIterator[int]) -> int: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, xs: AsyncIterator[float]) -> int: ...

    return Old, New


@case("server stream items widened", ("server stream items: type widened from int to float", _B, _C))
def _server_items_widened() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        def a(self) -> AsyncIterator[int]: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        def a(self) -> AsyncIterator[float]: ...

    return Old, New


@case("struct field added with default (argument)", ("field 'note' added to Item with a default", _C, _C))
def _field_added_default() -> tuple[type, type]:
    class Item(msgspec.Struct):
        name: str

    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, item: Item) -> None: ...

    class Item(msgspec.Struct):  # type: ignore[no-redef]
        name: str
        note: str = ""

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, item: Item) -> None: ...

    return Old, New


@case("struct field added without default (argument)", ("field 'qty' added to Item without a default", _B, _C))
def _field_added_required_arg() -> tuple[type, type]:
    class Item(msgspec.Struct):
        name: str

    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, items: list[Item]) -> None: ...

    class Item(msgspec.Struct):  # type: ignore[no-redef]
        name: str
        qty: int

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, items: list[Item]) -> None: ...

    return Old, New


@case("struct field added without default (reply)", ("field 'qty' added to Item without a default", _C, _B))
def _field_added_required_reply() -> tuple[type, type]:
    class Item(msgspec.Struct):
        name: str

    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self) -> Item: ...

    class Item(msgspec.Struct):  # type: ignore[no-redef]
        name: str
        qty: int

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self) -> Item: ...

    return Old, New


@case("required struct field removed (reply)", ("field 'qty' removed from Item", _B, _C))
def _field_removed_reply() -> tuple[type, type]:
    class Item(msgspec.Struct):
        name: str
        qty: int

    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self) -> Item: ...

    class Item(msgspec.Struct):  # type: ignore[no-redef]
        name: str

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self) -> Item: ...

    return Old, New


@case("nested field type narrowed", ("parameter 'order' at items{}[].qty: field 'qty' of Item: type narrowed from float to int", _B, _C))
def _nested_field_narrowed() -> tuple[type, type]:
    class Item(msgspec.Struct):
        qty: float

    class Order(msgspec.Struct):
        items: dict[str, list[Item]]

    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, order: Order) -> None: ...

    class Item(msgspec.Struct):  # type: ignore[no-redef]
        qty: int

    class Order(msgspec.Struct):  # type: ignore[no-redef]
        items: dict[str, list[Item]]

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, order: Order) -> None: ...

    return Old, New


@case("enum value added (argument)", ("enum Color: value 'blue' added", _C, _B))
def _enum_added_arg() -> tuple[type, type]:
    class Color(enum.Enum):
        RED = "red"

    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, c: Color) -> None: ...

    class Color(enum.Enum):  # type: ignore[no-redef]
        RED = "red"
        BLUE = "blue"

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, c: Color) -> None: ...

    return Old, New


@case("enum value removed (argument)", ("enum Color: value 'blue' removed", _B, _C))
def _enum_removed_arg() -> tuple[type, type]:
    class Color(enum.Enum):
        RED = "red"
        BLUE = "blue"

    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, c: Color) -> None: ...

    class Color(enum.Enum):  # type: ignore[no-redef]
        RED = "red"

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, c: Color) -> None: ...

    return Old, New


@case("enum value added (reply)", ("enum Color: value 'blue' added", _B, _C))
def _enum_added_reply() -> tuple[type, type]:
    class Color(enum.Enum):
        RED = "red"

    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self) -> list[Color]: ...

    class Color(enum.Enum):  # type: ignore[no-redef]
        RED = "red"
        BLUE = "blue"

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self) -> list[Color]: ...

    return Old, New


class Circle(msgspec.Struct):
    r: float


class Square(msgspec.Struct):
    s: float


class Hexagon(msgspec.Struct):
    h: float


@case("allow-list widened (argument)", ("parameter 'shape': class 'Hexagon' now allowed", _C, _B))
def _allow_widened() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, shape: Annotated[object, xrpc.allow(Circle, Square)]) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, shape: Annotated[object, xrpc.allow(Circle, Square, Hexagon)]) -> None: ...

    return Old, New


@case("allow-list narrowed (argument)", ("parameter 'shape': class 'Square' no longer allowed", _B, _C))
def _allow_narrowed() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, shape: Circle | Square) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, shape: Annotated[Circle, xrpc.allow(Circle)]) -> None: ...

    return Old, New


@case("allow-list widened (reply)", ("reply: class 'Hexagon' now allowed", _B, _C))
def _allow_widened_reply() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self) -> Circle | Square: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self) -> Circle | Square | Hexagon: ...

    return Old, New


@case("direct slot became widened", ("parameter 'shape': now widened with xrpc.allow", _B, _B))
def _direct_to_widened() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, shape: Circle) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, shape: Annotated[object, xrpc.allow(Circle)]) -> None: ...

    return Old, New


class Gone(Exception):
    pass


class Busy(Exception):
    pass


@case("declared error added", ("declared error 'Busy' added", _C, _C))
def _error_added() -> tuple[type, type]:
    @xrpc.interface(name="Same", errors=(Gone,))
    class Old(Protocol):
        async def a(self) -> None: ...

    @xrpc.interface(name="Same", errors=(Gone, Busy))
    class New(Protocol):
        async def a(self) -> None: ...

    return Old, New


@case("declared error removed", ("declared error 'Gone' removed", _B, _C))
def _error_removed() -> tuple[type, type]:
    @xrpc.interface(name="Same", errors=(Gone,))
    class Old(Protocol):
        async def a(self) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self) -> None: ...

    return Old, New


@case("constraint tightened (argument)", ("parameter 'n': constraints narrowed (minimum 0 -> 1)", _B, _C))
def _constraint_tightened() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, n: Annotated[int, msgspec.Meta(ge=0)]) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, n: Annotated[int, msgspec.Meta(ge=1)]) -> None: ...

    return Old, New


@case("constraint loosened (argument)", ("parameter 'n': constraints widened (maximum 10 -> -)", _C, _B))
def _constraint_loosened() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, n: Annotated[int, msgspec.Meta(le=10)]) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, n: int) -> None: ...

    return Old, New


@case("aware datetime became naive-or-aware", ("parameter 'when': datetime widened from aware only to any timezone", _C, _B))
def _datetime_widened() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, when: Annotated[datetime.datetime, msgspec.Meta(tz=True)]) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, when: datetime.datetime) -> None: ...

    return Old, New


@case("requirement added", ("requirement 'same_user' added", _B, _C))
def _requirement_added() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        @xrpc.requires("same_user")
        async def a(self) -> None: ...

    return Old, New


@case(
    "array-like struct field appended with default",
    ("parameter 't': field 'uses' (position 2) added to Tool with a default", _C, _C),
    ("reply: field 'uses' (position 2) added to Tool with a default", _C, _C),
)
def _array_like_appended() -> tuple[type, type]:
    class Tool(msgspec.Struct, array_like=True):
        name: str

    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, t: Tool) -> Tool: ...

    class Tool(msgspec.Struct, array_like=True):  # type: ignore[no-redef]
        name: str
        uses: int = 0

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, t: Tool) -> Tool: ...

    return Old, New


@case("integer dict keys became strings", ("parameter 'm' at {}: keys: type changed incompatibly from int to str", _B, _B))
def _dict_keys_changed() -> tuple[type, type]:
    @xrpc.interface(name="Same")
    class Old(Protocol):
        async def a(self, m: dict[int, str]) -> None: ...

    @xrpc.interface(name="Same")
    class New(Protocol):
        async def a(self, m: dict[str, str]) -> None: ...

    return Old, New


def _two_interfaces(with_extra: bool) -> list[type]:
    @xrpc.interface(name="Same")
    class Main(Protocol):
        async def a(self) -> None: ...

    @xrpc.interface(name="Extra")
    class Extra(Protocol):
        async def b(self) -> None: ...

    return [Main, Extra] if with_extra else [Main]


@pytest.mark.parametrize("make, expected", CASES)
def test_compatibility_table(make: Case, expected: tuple[tuple[str, str, str], ...]) -> None:
    old, new = make()
    changes = codegen.compare(_json_round(codegen.build_schema([old])), _json_round(codegen.build_schema([new])))
    got = [(c.change, c.verdict("backward"), c.verdict("forward")) for c in changes]
    unmatched = list(got)
    for substring, backward, forward in expected:
        hits = [g for g in unmatched if substring in g[0]]
        assert len(hits) == 1, f"{substring!r} not found exactly once in {got}"
        assert hits[0][1:] == (backward, forward), f"{hits[0][0]!r}: {hits[0][1:]} != {(backward, forward)}"
        unmatched.remove(hits[0])
    assert unmatched == [], f"unexpected changes: {unmatched}"
    assert codegen.has_breaking(changes) == any(b == _B for _, b, _ in expected)
    assert codegen.has_breaking(changes, "forward") == any(f == _B for _, _, f in expected)
    for c in changes:
        assert c.interface == "Same" and c.method in ("a", "b", None)
        row = c.to_dict()
        assert set(row) >= {"interface", "method", "change", "verdict", "reason"} and row["reason"]


def test_compatibility_table_is_large_enough() -> None:
    assert len(CASES) >= 25


def test_interface_removed_and_added() -> None:
    both = _json_round(codegen.build_schema(_two_interfaces(True)))
    one = _json_round(codegen.build_schema(_two_interfaces(False)))
    removed = codegen.compare(both, one)
    assert [(c.interface, c.change, c.verdict(), c.verdict("forward")) for c in removed] == [("Extra", "interface removed", _B, _C)]
    added = codegen.compare(one, both)
    assert [(c.interface, c.change, c.verdict(), c.verdict("forward")) for c in added] == [("Extra", "interface added", _C, _B)]
    assert codegen.has_breaking(added, "both") and not codegen.has_breaking(added)


def test_a_recursive_type_is_compared_without_looping() -> None:
    old = {
        "Node": {
            "title": "Node",
            "type": "object",
            "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}, "v": {"type": "integer"}},
            "required": ["kids", "v"],
        }
    }
    new = json.loads(json.dumps(old))
    new["Node"]["properties"]["v"] = {"type": "number"}
    changes = codegen.compare(
        _schema_of(old, [{"name": "n", "type": {"$ref": "#/$defs/Node"}}]),
        _schema_of(new, [{"name": "n", "type": {"$ref": "#/$defs/Node"}}]),
    )
    assert [(c.change, c.verdict()) for c in changes] == [("parameter 'n': field 'v' of Node: type widened from int to float", _C)]


# --------------------------------------------------------------------------- CLI
def test_cli_schema_stubs_check_round_trip(tmp_path: Path) -> None:
    schema_file = tmp_path / "garden.json"
    r = _cli("schema", "codegen_fixtures.service", "-o", str(schema_file))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    doc = json.loads(schema_file.read_text(encoding="utf-8"))
    assert [i["name"] for i in doc["interfaces"]] == ["test.Garden", "test.Plain", "test.ToolShed"]

    r = _cli("schema", "codegen_fixtures.service:Plain")
    assert r.returncode == 0, r.stderr
    assert [i["name"] for i in json.loads(r.stdout)["interfaces"]] == ["test.Plain"]

    stubs = tmp_path / "garden_stubs.py"
    r = _cli("stubs", str(schema_file), "-o", str(stubs))
    assert r.returncode == 0, r.stderr
    assert "class Garden(Protocol):" in stubs.read_text(encoding="utf-8")
    r = _cli("stubs", str(schema_file))
    assert r.returncode == 0 and r.stdout == stubs.read_text(encoding="utf-8")

    r = _cli("check", str(schema_file), str(schema_file))
    assert r.returncode == 0, r.stderr
    assert "no changes" in r.stdout
    r = _cli("check", str(schema_file), str(schema_file), "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_cli_check_exit_codes_and_json(tmp_path: Path) -> None:
    old, new = _param_added_required()
    old_file, new_file = tmp_path / "old.json", tmp_path / "new.json"
    old_file.write_text(json.dumps(codegen.build_schema([old])), encoding="utf-8")
    new_file.write_text(json.dumps(codegen.build_schema([new])), encoding="utf-8")

    r = _cli("check", str(old_file), str(new_file))
    assert r.returncode == 1, r.stderr
    assert "BREAKING" in r.stdout and "Same.a: parameter 'limit' added without a default" in r.stdout
    assert "1 change, 1 breaking (old client -> new server)" in r.stdout

    r = _cli("check", str(old_file), str(new_file), "--json")
    assert r.returncode == 1
    rows = json.loads(r.stdout)
    assert rows == [
        {
            "interface": "Same",
            "method": "a",
            "change": "parameter 'limit' added without a default",
            "verdict": "breaking",
            "reason": "old clients do not send it and the new server requires it",
            "old_client_new_server": "breaking",
            "new_client_old_server": "breaking",
        }
    ]

    # the reverse change (parameter removed, it had no default) is breaking both ways
    r = _cli("check", str(new_file), str(old_file), "--json")
    assert r.returncode == 1
    assert [row["change"] for row in json.loads(r.stdout)] == ["parameter 'limit' removed"]

    # compatible changes exit 0 in the default direction, 1 when forward compatibility is asked for
    old, new = _method_added()
    old_file.write_text(json.dumps(codegen.build_schema([old])), encoding="utf-8")
    new_file.write_text(json.dumps(codegen.build_schema([new])), encoding="utf-8")
    assert _cli("check", str(old_file), str(new_file)).returncode == 0
    r = _cli("check", str(old_file), str(new_file), "--direction", "forward", "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)[0]["verdict"] == "breaking"
    assert _cli("check", str(old_file), str(new_file), "--direction", "both").returncode == 1


def test_cli_usage_and_input_errors(tmp_path: Path) -> None:
    r = _cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "exit codes" in r.stdout
    for sub in ("schema", "stubs", "check"):
        r = _cli(sub, "--help")
        assert r.returncode == 0 and "examples:" in r.stdout

    assert _cli().returncode == 2
    assert _cli("frobnicate").returncode == 2
    assert _cli("check", "only-one.json").returncode == 2
    assert _cli("check", "a.json", "b.json", "--direction", "sideways").returncode == 2

    r = _cli("schema", "codegen_fixtures.does_not_exist")
    assert r.returncode == 2 and "no module named 'codegen_fixtures.does_not_exist'" in r.stderr
    r = _cli("schema", "codegen_fixtures.service:Missing")
    assert r.returncode == 2 and "has no attribute 'Missing'" in r.stderr
    r = _cli("schema", "codegen_fixtures")
    assert r.returncode == 2 and "defines no @xrpc.interface class" in r.stderr

    missing = tmp_path / "missing.json"
    r = _cli("stubs", str(missing))
    assert r.returncode == 2 and "cannot read" in r.stderr
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json", encoding="utf-8")
    r = _cli("check", str(garbage), str(garbage))
    assert r.returncode == 2 and "not JSON" in r.stderr
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"xrpc_schema": 2, "interfaces": []}), encoding="utf-8")
    r = _cli("stubs", str(future))
    assert r.returncode == 2 and "unsupported schema version 2" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"xrpc_schema": 1, "interfaces": [{"name": 3}]}), encoding="utf-8")
    r = _cli("check", str(bad), str(bad))
    assert r.returncode == 2 and "invalid schema" in r.stderr
    r = _cli("stubs", str(future), "-o", str(tmp_path / "no" / "such" / "dir.py"))
    assert r.returncode == 2


def test_package_works_under_its_installed_name(tmp_path: Path) -> None:
    """The package works under another name (the installed alias is ``xrpc_codegen``): nothing in it imports ``codegen`` by name."""
    shutil.copytree(ROOT / "codegen", tmp_path / "xrpc_codegen", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-c", "import sys, xrpc_codegen.__main__ as m; sys.exit(m.main(['check', '--help']))"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=12 * T,
    )
    assert r.returncode == 0, r.stderr
    assert "usage: xrpc-codegen check" in r.stdout
    for path in (ROOT / "codegen").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import codegen" not in text and "from codegen" not in text, path


def test_codegen_is_mypy_strict_clean(tmp_path: Path) -> None:
    r = _mypy_strict(ROOT / "codegen", tmp_path / "mypy-cache")
    assert r.returncode == 0, r.stdout + r.stderr
