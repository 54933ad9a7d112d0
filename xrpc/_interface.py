"""Interface introspection: from a ``typing.Protocol`` to a plain, inspectable description.

Theory of operation
-------------------
``@xrpc.interface`` reads every public method of a Protocol class, classifies it (unary, one-way,
server stream, client stream, two-way stream), resolves its annotations and builds, once, what the
runtime needs on the hot path: an array-like msgspec Struct type for the arguments (so binding,
defaults and encoding happen in C), and decoders for arguments, replies and stream items.  The result
is an ``InterfaceDescription`` that the runtime, the CLI and codegen all read; nothing else in xrpc
looks at the Protocol class again.

Allow-lists: the classes a slot may carry are exactly those its annotation names, at any depth of
nesting, because the slot's decoder is built from the annotation.  A slot typed ``object``/``Any``
decodes plain data only.  ``Annotated[Base, xrpc.allow(A, B)]`` (or ``set_classes``) makes a *widened*
slot: on the wire its value travels as ``[class_key, value]`` and the receiver decodes the value with
the decoder of that class alone, so user classes need no tag of their own.  A top-level union of
several user classes is widened the same way.

This module owns the description; it does no I/O.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import datetime
import enum
import hashlib
import inspect
import os
import sys
import types
import typing
from typing import Any, Callable, TypeVar, Union

import msgspec
from typing_extensions import Annotated, Literal, NotRequired, Required, get_args, get_origin, is_typeddict

from ._errors import ArgumentError, InterfaceError, ValidationError
from ._fds import FileDescriptor, SharedBuffer, adopt_fd, received_buffer, sealed_fd
from ._protocol import CallFlags, MethodSig, Ref
from ._requirements import Requirement
from ._requirements import requirement as parse_requirement

__all__ = (
    "MethodKind",
    "Allow",
    "allow",
    "oneway",
    "requires",
    "interface",
    "describe",
    "is_interface",
    "InterfaceDescription",
    "MethodDescription",
    "ParamDescription",
    "Slot",
    "WireContext",
    "Plan",
    "plan_of",
    "RefPlan",
    "FdPlan",
    "BufferPlan",
    "SeqPlan",
    "TuplePlan",
    "DictPlan",
    "OptionalPlan",
    "RecordPlan",
    "UnionPlan",
)

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

_ATTR = "__xrpc_interface__"


class MethodKind(str, enum.Enum):
    """How a remote method is called: what the caller sends and what comes back."""

    UNARY = "unary"
    ONEWAY = "oneway"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"
    BIDI_STREAM = "bidi_stream"

    @property
    def streams_in(self) -> bool:
        return self in (MethodKind.CLIENT_STREAM, MethodKind.BIDI_STREAM)

    @property
    def streams_out(self) -> bool:
        return self in (MethodKind.SERVER_STREAM, MethodKind.BIDI_STREAM)


@dataclasses.dataclass(frozen=True)
class Allow:
    """Marker for ``Annotated[Base, xrpc.allow(A, B)]``: the slot carries exactly these classes."""

    classes: tuple[type, ...]


def allow(*classes: type) -> Allow:
    """Widen a parameter or reply to exactly ``classes`` (used inside ``typing.Annotated``)."""
    for c in classes:
        if not isinstance(c, type):
            raise InterfaceError(f"xrpc.allow() takes classes, got {c!r}")
    return Allow(tuple(classes))


def requires(requirement: Any) -> Callable[[_F], _F]:
    """Guard one method with a peer requirement (in the interface or on the implementation).

    ``requirement`` is an ``xrpc.Requirement`` or an expression string for ``xrpc.requirement()``.
    A peer that does not satisfy it gets ``xrpc.PeerRejected``; the method does not run.
    """
    req = parse_requirement(requirement) if isinstance(requirement, str) else requirement
    if not isinstance(req, Requirement):
        raise InterfaceError(f"xrpc.requires() takes a Requirement or an expression, got {requirement!r}")

    def apply(fn: _F) -> _F:
        fn.__xrpc_requires__ = req  # type: ignore[attr-defined]
        return fn

    return apply


def oneway(fn: _F) -> _F:
    """Mark an ``async def ... -> None`` method as fire-and-forget: no reply, no error comes back."""
    fn.__xrpc_oneway__ = True  # type: ignore[attr-defined]
    return fn


# --------------------------------------------------------------------------- plain data checks
_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes, bytearray, datetime.datetime, datetime.date, datetime.time, datetime.timedelta)


def plain_error(value: Any) -> str | None:
    """None if ``value`` is plain data (what an ``object`` slot may carry); else the offending type."""
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t in _PLAIN_SCALARS:
            continue
        if t is list or t is tuple:
            stack.extend(v)
        elif t is dict:
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            return t.__qualname__
    return None


class _ExtensionRefused(msgspec.ValidationError):
    """A MessagePack extension type in a received value (see ``_refuse_extension``)."""


def _refuse_extension(code: int, data: memoryview) -> Any:
    """The ``ext_hook`` of every decoder of received values.

    xrpc gives no meaning to MessagePack extension types (the timestamp, which is how a ``datetime``
    travels, is decoded by msgspec itself and never reaches this hook).  Without a hook, a slot typed
    ``object``/``Any`` would hand ``msgspec.msgpack.Ext`` objects to the application; the sending side
    refuses them too (they are not plain data).
    """
    raise _ExtensionRefused(f"a MessagePack extension (type {code}) is not plain data")


def _decoder(tp: Any) -> msgspec.msgpack.Decoder[Any]:
    """A decoder for values received in ``tp`` slots: extension types refused at any depth."""
    return msgspec.msgpack.Decoder(tp, ext_hook=_refuse_extension)


_raw_items: msgspec.msgpack.Decoder[list[msgspec.Raw]] = msgspec.msgpack.Decoder(list[msgspec.Raw])


def _class_key(cls: type) -> str:
    return cls.__qualname__


def _is_user_class(tp: Any) -> bool:
    return isinstance(tp, type) and (
        issubclass(tp, msgspec.Struct) or dataclasses.is_dataclass(tp) or (issubclass(tp, tuple) and hasattr(tp, "_fields"))
    )


def _is_any(tp: Any) -> bool:
    return tp is Any or tp is object


_NO_CONTEXT = "objects passed by reference and descriptors travel only on a connection"


class Slot:
    """How one value position (an argument, the reply, a stream item) travels.

    A *direct* slot is encoded as itself and decoded with ``decoder``.  A *widened* slot travels as
    ``[key, value]``; ``classes`` maps each key to its class, ``""`` standing for plain data.
    """

    __slots__ = ("annotation", "wire_type", "classes", "plain", "any_plain", "decoder", "batch_decoder", "_decoders", "plan")

    def __init__(self, annotation: Any, classes: tuple[type, ...] | None = None, plain: Any = None) -> None:
        self.annotation = annotation
        self.plain = plain  # the plain-data type a widened slot also accepts, or None
        self.classes: dict[str, type] | None = None
        self._decoders: dict[str, Any] = {}
        self.any_plain = False
        # where objects passed by reference (and descriptors) sit in the value, if anywhere
        self.plan: Plan | None = plan_of(annotation)
        if self.plan is not None:
            if classes is not None:
                raise InterfaceError("xrpc.allow() cannot widen a slot that carries objects by reference")
            self.wire_type = self.plan.wire_type
            self.decoder = _decoder(self.wire_type)
        elif classes is None:
            self.wire_type = annotation
            self.any_plain = _is_any(annotation)
            self.decoder = _decoder(annotation)
        else:
            self.classes = {}
            for c in classes:
                if _holds_refs(c):
                    raise InterfaceError(f"xrpc.allow() cannot widen a slot to {_short(c)}, which holds objects by reference")
                key = _class_key(c)
                if key in self.classes and self.classes[key] is not c:
                    raise InterfaceError(f"two allowed classes share the name {key!r}")
                self.classes[key] = c
                self._decoders[key] = _decoder(c)
            if plain is not None:
                self._decoders[""] = _decoder(plain)
            self.wire_type = tuple[str, msgspec.Raw]
            self.decoder = _decoder(self.wire_type)
        self.batch_decoder = _decoder(list[self.wire_type])  # type: ignore[name-defined]

    @property
    def widened(self) -> bool:
        return self.classes is not None

    def allowed_names(self) -> list[str]:
        names = sorted(self.classes) if self.classes is not None else []
        if self.plain is not None:
            names.append("plain data")
        return names

    def wrap(self, value: Any) -> Any:
        """Sending side: turn ``value`` into what goes on the wire, or raise ``ValueError``."""
        if self.classes is None:
            if self.any_plain:
                bad = plain_error(value)
                if bad is not None:
                    raise ValueError(f"{bad} is not plain data (the slot is typed {_type_name(self.annotation)}; widen it with xrpc.allow)")
            return value
        t = type(value)
        key = _class_key(t)
        if self.classes.get(key) is t:
            return (key, value)
        if self.plain is not None:
            if _is_any(self.plain):
                bad = plain_error(value)
                if bad is None:
                    return ("", value)
            else:
                return ("", value)
        raise ValueError(f"{t.__qualname__} is not allowed here (allowed: {', '.join(self.allowed_names())})")

    def unwrap(self, wire: Any) -> Any:
        """Receiving side: decode a widened value; raise ``msgspec.ValidationError``."""
        key, raw = wire
        dec = self._decoders.get(key)
        if dec is None:
            raise msgspec.ValidationError(f"class {key!r} is not allowed (allowed: {', '.join(self.allowed_names())})")
        return dec.decode(raw)

    def decode(self, data: Any) -> Any:
        value = self.decoder.decode(data)
        if self.classes is not None:
            value = self.unwrap(value)
        return value

    def decode_batch(self, data: Any, ctx: WireContext | None = None) -> list[Any]:
        """Decode an ITEM payload (an array of values); raise ``msgspec.ValidationError``."""
        values: list[Any] = self.batch_decoder.decode(data)
        if self.classes is not None:
            values = [self.unwrap(v) for v in values]
        elif self.plan is not None:
            values = [self.from_wire(ctx, v) for v in values]
        return values

    def to_wire(self, ctx: WireContext | None, value: Any) -> Any:
        """Sending side of a slot with references: export objects, raise ``ValueError``."""
        plan = self.plan
        if plan is None:
            return value
        if ctx is None:
            raise ValueError(_NO_CONTEXT)
        try:
            return plan.to_wire(ctx, value)
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"expected {_type_name(self.annotation)}: {exc}") from None
        except RecursionError:
            raise ValueError("the value is nested too deeply") from None

    def from_wire(self, ctx: WireContext | None, value: Any) -> Any:
        """Receiving side of a slot with references: references become proxies (or the original object)."""
        plan = self.plan
        if plan is None:
            return value
        if ctx is None:
            raise ValidationError(_NO_CONTEXT)
        try:
            return plan.from_wire(ctx, value)
        except RecursionError:
            raise ValidationError("the value is nested too deeply") from None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": _type_name(_strip_annotated(self.annotation))}
        if self.classes is not None:
            d["allowed"] = self.allowed_names()
        return d


# --------------------------------------------------------------------------- references
class WireContext(typing.Protocol):
    """What the codec needs from the connection a value travels on: objects passed by reference
    and kernel descriptors go in and out through it (plain values need nothing)."""

    def ref_out(self, desc: InterfaceDescription, value: Any) -> Ref:
        """Export ``value`` (an object implementing ``desc``) to the peer; the reference to send."""
        ...

    def ref_in(self, desc: InterfaceDescription, token: Ref) -> Any:
        """A reference received for a ``desc`` slot: a proxy (or this side's own object)."""
        ...

    def fd_out(self, fd: int) -> int:
        """Send a duplicate of descriptor ``fd`` with the frame being encoded; its number on the wire."""
        ...

    def fd_in(self, seq: int) -> int:
        """Take the descriptor numbered ``seq`` that arrived with the frame being decoded (owned)."""
        ...


_SEQUENCES = (list, set, frozenset, collections.abc.Sequence, collections.abc.Set, collections.abc.MutableSequence)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


class Plan:
    """Where, in a value of some type, the parts that do not travel as plain data sit (objects
    passed by reference, file descriptors, shared buffers), and how they go out and come in.

    ``plan_of(annotation)`` builds the plan of a type (None when the type has no such part); a
    ``Slot`` holds it as ``slot.plan``, and codegen reads it.  There is one subclass per kind of
    plan, and each subclass is registered when it is defined: adding a kind is writing one class
    with ``match`` (recognise an annotation), ``wire_type`` (what msgspec decodes on the wire),
    ``to_wire`` and ``from_wire``.  Plans nest: the fields of a plan that hold plans (or tuples of
    plans) are its parts, which ``walk()`` visits.
    """

    __slots__ = ()
    kinds: typing.ClassVar[list[type[Plan]]] = []  # every kind, in the order they are tried

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Plan.kinds.append(cls)
        _HOLDS.clear()  # a type may hold values of the new kind

    @classmethod
    def match(cls, tp: Any) -> Plan | None:
        """The plan of this kind for annotation ``tp`` (without ``Annotated``), or None."""
        raise NotImplementedError

    @property
    def wire_type(self) -> Any:
        """The type the value has on the wire (what the slot's decoder decodes)."""
        raise NotImplementedError

    def to_wire(self, ctx: WireContext, value: Any) -> Any:
        """Sending side: ``value`` as it goes on the wire; raise ``ValueError``/``TypeError``."""
        raise NotImplementedError

    def from_wire(self, ctx: WireContext, value: Any) -> Any:
        """Receiving side: the value for the application; raise ``ValidationError``."""
        raise NotImplementedError

    def parts(self) -> typing.Iterator[Plan]:
        """The plans directly inside this one."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Plan):
                yield v
            elif isinstance(v, tuple):
                yield from (p for p in v if isinstance(p, Plan))

    def walk(self, _records: set[int] | None = None) -> typing.Iterator[Plan]:
        """This plan and every plan inside it, depth first (a record met again, as in a recursive
        type, is not entered twice)."""
        if isinstance(self, RecordPlan):
            if _records is None:
                _records = set()
            if id(self) in _records:
                return
            _records.add(id(self))
        yield self
        for p in self.parts():
            yield from p.walk(_records)


def plan_of(tp: Any) -> Plan | None:
    """The plan of annotation ``tp``, or None if its values are plain data throughout.

    Raises ``InterfaceError`` naming the place (``list[Holder][*].listener``) where ``tp`` holds a
    reference (or a descriptor) in a position nothing can carry it from.
    """
    tp = _strip_annotated(tp)
    plan = _match_kinds(tp)
    if plan is None and _holds_refs(tp):
        raise Misplaced(
            _short(tp),
            f"a reference cannot travel inside {_short(get_origin(tp) or tp)}: only inside msgspec Structs, "
            "dataclasses, TypedDicts, NamedTuples, list/set/tuple items, dict values, Optional[...] "
            "and unions of tagged Structs",
        )
    return plan


def _match_kinds(tp: Any) -> Plan | None:
    for kind in Plan.kinds:
        plan = kind.match(tp)
        if plan is not None:
            return plan
    return None


class Misplaced(InterfaceError):
    """A reference (or a descriptor) where it cannot travel.  ``root`` and ``path`` name the place
    (``list[Holder]`` and ``[*].listener``), ``rule`` says what may hold one."""

    def __init__(self, root: str, rule: str, path: str = "") -> None:
        self.root, self.rule, self.path = root, rule, path
        super().__init__(f"{root}{path}: {rule}")


def _plan_at(outer: Any, step: str, inner: Any) -> Plan | None:
    """``plan_of(inner)``, where ``inner`` sits at ``step`` inside ``outer`` (errors say so)."""
    try:
        return plan_of(inner)
    except Misplaced as exc:
        raise Misplaced(_short(outer), exc.rule, step + exc.path) from None


def _short(tp: Any) -> str:
    """A short name for a type, as it reads in the source (``list[Holder]``, ``Optional[Job]``)."""
    tp = _strip_annotated(tp)
    if tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return f"Optional[{_short(members[0])}]"
        return f"Union[{', '.join(_short(a) for a in args)}]"
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None and args:
        return f"{getattr(origin, '__name__', _type_name(origin))}[{', '.join(_short(a) for a in args)}]"
    if isinstance(tp, type):
        return tp.__qualname__
    return _type_name(tp)


_FIELDS: dict[Any, list[tuple[str, Any]] | None] = {}  # _record_fields, per (hashable) type


def _record_fields(tp: Any) -> list[tuple[str, Any]] | None:
    """The fields (name, annotation) of a record type -- a msgspec Struct, a dataclass, a
    TypedDict or a NamedTuple -- or None if ``tp`` is not one."""
    try:
        return _FIELDS[tp]
    except (KeyError, TypeError):
        pass
    fields = _read_fields(tp)
    if fields is not None:
        try:
            _FIELDS[tp] = fields
        except TypeError:
            pass
    return fields


def _read_fields(tp: Any) -> list[tuple[str, Any]] | None:
    cls = get_origin(tp) or tp
    if not isinstance(cls, type):
        return None
    try:
        if issubclass(cls, msgspec.Struct):
            return [(f.name, f.type) for f in msgspec.structs.fields(tp)]
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls, include_extras=True)
            return [(f.name, hints.get(f.name, Any)) for f in dataclasses.fields(cls)]
        if is_typeddict(cls):
            hints = typing.get_type_hints(cls, include_extras=True)
            return [(k, _strip_required(v)) for k, v in hints.items()]
        if issubclass(cls, tuple) and hasattr(cls, "_fields"):
            hints = typing.get_type_hints(cls, include_extras=True)
            return [(k, hints.get(k, Any)) for k in cls._fields]
    except NameError:
        raise  # a forward reference to a name defined later: the interface is resolved on first use
    except Exception:
        return None  # msgspec says what is wrong with it when it builds the decoder
    return None


def _takes_in_order(cls: type, names: tuple[str, ...]) -> bool:
    """Does ``cls(...)`` take exactly the fields ``names``, in that order, as positional arguments?"""
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return False
    return [p.name for p in params] == list(names) and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)


def _required_keys(cls: Any) -> frozenset[str]:
    """The keys a TypedDict requires (``Required``/``NotRequired`` read from the resolved
    annotations, as msgspec does, since postponed annotations hide them from the class)."""
    required = set(cls.__required_keys__)
    for k, v in typing.get_type_hints(cls, include_extras=True).items():
        origin = get_origin(v)
        if origin is NotRequired:
            required.discard(k)
        elif origin is Required:
            required.add(k)
    return frozenset(required)


def _strip_required(tp: Any) -> Any:
    while get_origin(tp) in (Required, NotRequired):
        tp = get_args(tp)[0]
    return tp


_HOLDS: dict[Any, bool] = {}  # _holds_refs, per (hashable) type


def _holds_refs(tp: Any) -> bool:
    """Does some kind of plan (a reference, a descriptor) sit anywhere inside ``tp``, through the
    fields of records and the arguments of generic types, at any depth?"""
    try:
        return _HOLDS[tp]
    except (KeyError, TypeError):
        pass
    found = _search_refs(tp)
    try:
        _HOLDS[tp] = found
    except TypeError:
        pass
    return found


def _search_refs(tp: Any) -> bool:
    stack: list[Any] = [tp]
    seen: set[Any] = set()
    while stack:
        t = _strip_annotated(stack.pop())
        if get_origin(t) is Literal:
            continue
        try:
            if t in seen:
                continue
            seen.add(t)
        except TypeError:
            pass  # unhashable: not a record, so not part of a cycle
        fields = _record_fields(t)
        if fields is not None:
            stack.extend(ft for _, ft in fields)
            continue
        args = get_args(t)
        if args:
            stack.extend(a for a in args if a is not Ellipsis)
        elif _match_kinds(t) is not None:
            return True
    return False


@dataclasses.dataclass(frozen=True)
class RefPlan(Plan):
    """An object passed by reference, of ``@xrpc.interface`` class ``iface``."""

    iface: type

    @classmethod
    def match(cls, tp: Any) -> Plan | None:
        return cls(tp) if is_interface(tp) else None

    @property
    def wire_type(self) -> Any:
        return Ref

    def to_wire(self, ctx: WireContext, value: Any) -> Any:
        return ctx.ref_out(describe(self.iface), value)

    def from_wire(self, ctx: WireContext, value: Any) -> Any:
        return ctx.ref_in(describe(self.iface), value)


@dataclasses.dataclass(frozen=True)
class FdPlan(Plan):
    """An ``xrpc.FileDescriptor``: a number on the wire, the descriptor beside the frame."""

    @classmethod
    def match(cls, tp: Any) -> Plan | None:
        return cls() if tp is FileDescriptor else None

    @property
    def wire_type(self) -> Any:
        return int

    def to_wire(self, ctx: WireContext, value: Any) -> Any:
        if not isinstance(value, FileDescriptor):
            raise ValueError(f"expected an xrpc.FileDescriptor, got {type(value).__qualname__}")
        return ctx.fd_out(value.fileno())

    def from_wire(self, ctx: WireContext, value: Any) -> Any:
        return adopt_fd(ctx.fd_in(value))


@dataclasses.dataclass(frozen=True)
class BufferPlan(Plan):
    """An ``xrpc.SharedBuffer``: ``[descriptor number, size]`` on the wire, the sealed memfd beside
    the frame."""

    @classmethod
    def match(cls, tp: Any) -> Plan | None:
        return cls() if tp is SharedBuffer else None

    @property
    def wire_type(self) -> Any:
        return tuple[int, int]

    def to_wire(self, ctx: WireContext, value: Any) -> Any:
        if not isinstance(value, SharedBuffer):
            raise ValueError(f"expected an xrpc.SharedBuffer, got {type(value).__qualname__}")
        return (ctx.fd_out(sealed_fd(value)), value.size)

    def from_wire(self, ctx: WireContext, value: Any) -> Any:
        fd = ctx.fd_in(value[0])
        try:
            return received_buffer(fd, value[1])
        except (OSError, ValueError, OverflowError) as exc:
            os.close(fd)
            raise ValidationError(f"the shared buffer was refused: {exc}") from None


@dataclasses.dataclass(frozen=True)
class SeqPlan(Plan):
    """A homogeneous collection (``list[T]``, ``set[T]``, ``tuple[T, ...]``, ...) whose items have
    plan ``item``; an array on the wire, a ``container`` on the receiving side."""

    item: Plan
    container: type  # list, tuple, set or frozenset

    @classmethod
    def match(cls, tp: Any) -> Plan | None:
        origin, args = get_origin(tp), get_args(tp)
        if origin in _SEQUENCES and args:
            container: type = set if origin in (set, collections.abc.Set) else frozenset if origin is frozenset else list
        elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            container = tuple
        else:
            return None
        item = _plan_at(tp, "[*]", args[0])
        return cls(item, container) if item is not None else None

    @property
    def wire_type(self) -> Any:
        return list[self.item.wire_type]  # type: ignore[name-defined]

    def to_wire(self, ctx: WireContext, value: Any) -> Any:
        item = self.item
        return [item.to_wire(ctx, v) for v in value]

    def from_wire(self, ctx: WireContext, value: Any) -> Any:
        item = self.item
        return self.container(item.from_wire(ctx, v) for v in value)


@dataclasses.dataclass(frozen=True)
class TuplePlan(Plan):
    """A fixed-length tuple; ``items[i]`` is the plan of position ``i`` (None: plain data of
    annotation ``types[i]``)."""

    items: tuple[Plan | None, ...]
    types: tuple[Any, ...]

    @classmethod
    def match(cls, tp: Any) -> Plan | None:
        args = get_args(tp)
        if get_origin(tp) is not tuple or not args or (len(args) == 2 and args[1] is Ellipsis):
            return None
        items = tuple(_plan_at(tp, f"[{i}]", a) for i, a in enumerate(args))
        return cls(items, args) if any(p is not None for p in items) else None

    @property
    def wire_type(self) -> Any:
        return tuple[tuple(p.wire_type if p is not None else a for a, p in zip(self.types, self.items))]  # type: ignore[misc]

    def to_wire(self, ctx: WireContext, value: Any) -> Any:
        return [p.to_wire(ctx, v) if p is not None else v for p, v in zip(self.items, value)]

    def from_wire(self, ctx: WireContext, value: Any) -> Any:
        return tuple(p.from_wire(ctx, v) if p is not None else v for p, v in zip(self.items, value))


@dataclasses.dataclass(frozen=True)
class DictPlan(Plan):
    """A mapping whose values have plan ``value`` (keys of annotation ``key`` are plain data)."""

    key: Any
    value: Plan

    @classmethod
    def match(cls, tp: Any) -> Plan | None:
        args = get_args(tp)
        if get_origin(tp) not in _MAPPINGS or len(args) != 2:
            return None
        if _holds_refs(args[0]):
            raise Misplaced(_short(tp), "a mapping key cannot hold a reference (its values can)")
        value = _plan_at(tp, "[*]", args[1])
        return cls(args[0], value) if value is not None else None

    @property
    def wire_type(self) -> Any:
        return dict[self.key, self.value.wire_type]  # type: ignore[name-defined]

    def to_wire(self, ctx: WireContext, value: Any) -> Any:
        plan = self.value
        return {k: plan.to_wire(ctx, v) for k, v in value.items()}

    def from_wire(self, ctx: WireContext, value: Any) -> Any:
        plan = self.value
        return {k: plan.from_wire(ctx, v) for k, v in value.items()}


@dataclasses.dataclass(frozen=True)
class OptionalPlan(Plan):
    """``Optional[T]`` where ``T`` has plan ``inner`` (``absent`` holds ``None``'s type, and
    ``msgspec.UnsetType`` for a field that may be left out).  Other unions are ``UnionPlan``."""

    inner: Plan
    absent: tuple[Any, ...] = (type(None),)

    @classmethod
    def match(cls, tp: Any) -> Plan | None:
        if get_origin(tp) not in (Union, types.UnionType):
            return None
        args = get_args(tp)
        members = [a for a in args if a not in _ABSENT]
        if len(members) != 1:
            return None
        inner = _plan_at(tp, "", members[0])
        if inner is None:
            return None
        absent = tuple(a for a in args if a in _ABSENT)
        return cls(inner) if absent == (type(None),) else cls(inner, absent)

    @property
    def wire_type(self) -> Any:
        return Union[(self.inner.wire_type,) + self.absent]

    def to_wire(self, ctx: WireContext, value: Any) -> Any:
        return value if value is None or value is msgspec.UNSET else self.inner.to_wire(ctx, value)

    def from_wire(self, ctx: WireContext, value: Any) -> Any:
        return value if value is None or value is msgspec.UNSET else self.inner.from_wire(ctx, value)


_ABSENT = (type(None), msgspec.UnsetType)


_RECORD_PLANS: dict[Any, RecordPlan] = {}  # one plan per record type (recursive types meet it again)
_EMPTY_FACTORIES = (list, dict, set, frozenset, tuple)
_BUILDING = object()  # a NamedTuple's wire type being built


@dataclasses.dataclass(eq=False)
class RecordPlan(Plan):
    """A record -- a msgspec Struct, a dataclass, a TypedDict or a NamedTuple -- with references
    somewhere in its fields: ``fields[i]`` is the plan of field ``names[i]`` (None: plain data of
    annotation ``types[i]``).

    On the wire the record is a generated msgspec Struct with the same field names, encoded names,
    tag, array-likeness and defaults (so its plain part encodes as the record itself would), in
    which the fields that hold references have their wire types.  The receiving side builds the
    user's record back.  There is one plan per record type, so that a recursive type (``Call``
    holding ``list[Expression]``, ``Expression`` a union holding ``Call``) is one cycle of plans
    and one recursive wire type.
    """

    cls: type
    kind: str  # "struct", "dataclass", "typeddict" or "namedtuple"
    names: tuple[str, ...]
    types: tuple[Any, ...]
    fields: tuple[Plan | None, ...] = ()
    _wire: Any = dataclasses.field(default=None, repr=False)
    _planned: tuple[tuple[str, Plan | None], ...] = dataclasses.field(default=(), repr=False)
    _index: tuple[tuple[int, Plan], ...] = dataclasses.field(default=(), repr=False)  # the fields with plans
    _wire_positional: bool = dataclasses.field(default=False, repr=False)  # the wire record takes its fields in order
    _user_positional: bool = dataclasses.field(default=False, repr=False)  # and so does the user's class

    @classmethod
    def match(cls, tp: Any) -> Plan | None:
        rtype = get_origin(tp) or tp
        if not isinstance(rtype, type):
            return None
        known = _RECORD_PLANS.get(tp)
        if known is not None:
            return known
        fields = _record_fields(tp)
        if fields is None or not _holds_refs(tp):
            return None
        if issubclass(rtype, msgspec.Struct):
            kind = "struct"
        elif dataclasses.is_dataclass(rtype):
            kind = "dataclass"
        elif is_typeddict(rtype):
            kind = "typeddict"
        else:
            kind = "namedtuple"
        plan = cls(rtype, kind, tuple(n for n, _ in fields), tuple(t for _, t in fields))
        before = set(_RECORD_PLANS)
        _RECORD_PLANS[tp] = plan  # before the fields: a field of this type again finds this plan
        try:
            plan.fields = tuple(_plan_at(tp, f".{n}", t) for n, t in fields)
            if kind == "dataclass":
                for f, p in zip(dataclasses.fields(rtype), plan.fields):
                    if p is not None and not f.init:
                        raise Misplaced(_short(tp), "a dataclass field with init=False cannot hold a reference", f".{f.name}")
        except BaseException:
            for key in set(_RECORD_PLANS) - before:
                del _RECORD_PLANS[key]
            raise
        plan._planned = tuple(zip(plan.names, plan.fields))
        plan._index = tuple((i, p) for i, p in enumerate(plan.fields) if p is not None)
        plan._user_positional = kind in ("struct", "dataclass") and _takes_in_order(rtype, plan.names)
        return plan

    @property
    def name(self) -> str:
        return self.cls.__qualname__

    @property
    def wire_type(self) -> Any:
        if self._wire is None or self._wire is _BUILDING:
            self._build_wire()
        return self._wire

    def _build_wire(self) -> None:
        cls = self.cls
        if self.kind == "namedtuple":
            if self._wire is _BUILDING:
                raise InterfaceError(f"{self.name}: a NamedTuple holding references cannot contain itself (use a msgspec Struct)")
            self._wire = _BUILDING
            try:
                self._wire = tuple[tuple(p.wire_type if p is not None else t for p, t in zip(self.fields, self.types))]  # type: ignore[misc]
            except BaseException:
                self._wire = None
                raise
            return
        specs: list[Any] = []
        options: dict[str, Any] = {}
        if self.kind == "struct":
            cfg = cls.__struct_config__  # type: ignore[attr-defined]
            options.update(
                tag=cfg.tag,
                tag_field=cfg.tag_field,
                array_like=cfg.array_like,
                omit_defaults=cfg.omit_defaults,
                forbid_unknown_fields=cfg.forbid_unknown_fields,
            )
            infos = msgspec.structs.fields(cls)
            rename = {f.name: f.encode_name for f in infos if f.encode_name != f.name}
            if rename:
                options["rename"] = rename
            for f, p in zip(infos, self.fields):
                default: Any = f.default
                if default is msgspec.NODEFAULT and f.default_factory is not msgspec.NODEFAULT:
                    default = msgspec.field(default_factory=f.default_factory)
                specs.append(self._spec(f.name, p, default, f.default_factory))
        elif self.kind == "dataclass":
            for dc, p in zip(dataclasses.fields(cls), self.fields):
                default = dc.default
                factory: Any = dc.default_factory
                if default is dataclasses.MISSING:
                    default = msgspec.field(default_factory=factory) if factory is not dataclasses.MISSING else msgspec.NODEFAULT
                specs.append(self._spec(dc.name, p, default, factory))
        else:  # a TypedDict: keys it does not require are left out of the wire record when absent
            keys = _required_keys(cls)
            for n, p in zip(self.names, self.fields):
                specs.append((n, Any) if n in keys else (n, Any, msgspec.UNSET))
        try:  # positional when the field order allows it: building it is faster
            wire = msgspec.defstruct(cls.__qualname__, specs, module=cls.__module__, **options, kw_only=False)
            self._wire_positional = True
        except TypeError:  # a required field after one with a default
            wire = msgspec.defstruct(cls.__qualname__, specs, module=cls.__module__, **options, kw_only=True)
        self._wire = wire  # before the field types: a field of this type again finds it
        required = _required_keys(cls) if self.kind == "typeddict" else None
        for n, p, t in zip(self.names, self.fields, self.types):
            tp = p.wire_type if p is not None else t
            if required is not None and n not in required:
                tp = Union[tp, msgspec.UnsetType]
            wire.__annotations__[n] = tp

    @staticmethod
    def _spec(name: str, plan: Plan | None, default: Any, factory: Any) -> tuple[Any, ...]:
        if plan is not None and default is not msgspec.NODEFAULT and default is not None and default is not msgspec.UNSET:
            # a default that holds an object cannot stand for a wire value: such a field is always
            # sent (an empty collection can)
            made = factory() if callable(factory) else default
            default = msgspec.field(default_factory=type(made)) if type(made) in _EMPTY_FACTORIES and not made else msgspec.NODEFAULT
        return (name, Any) if default is msgspec.NODEFAULT else (name, Any, default)

    def to_wire(self, ctx: WireContext, value: Any) -> Any:
        kind = self.kind
        expected: Any = dict if kind == "typeddict" else self.cls
        if not isinstance(value, expected):
            raise ValueError(f"expected {self.name}, got {type(value).__qualname__}")
        names = self.names
        if kind == "typeddict":
            values = [value.get(n, msgspec.UNSET) for n in names]
        elif kind == "struct" and type(value) is self.cls:
            values = list(msgspec.structs.astuple(typing.cast(msgspec.Struct, value)))
        elif kind == "namedtuple":
            values = list(value)
        else:
            values = [getattr(value, n) for n in names]
        for i, p in self._index:
            v = values[i]
            if v is msgspec.UNSET:
                continue  # a TypedDict key left out
            try:
                values[i] = p.to_wire(ctx, v)
            except (ValueError, TypeError, AttributeError) as exc:
                raise ValueError(f"{self.name}.{names[i]}: {exc}") from None
        if kind == "namedtuple":
            return values
        wire = self.wire_type
        try:
            return wire(*values) if self._wire_positional else wire(**dict(zip(names, values)))
        except TypeError as exc:
            raise ValueError(f"{self.name}: {exc}") from None

    def from_wire(self, ctx: WireContext, value: Any) -> Any:
        kind = self.kind
        values = list(value) if kind == "namedtuple" else list(msgspec.structs.astuple(value))
        for i, p in self._index:
            v = values[i]
            if v is not msgspec.UNSET:
                values[i] = p.from_wire(ctx, v)
        if kind == "typeddict":
            return {n: v for n, v in zip(self.names, values) if v is not msgspec.UNSET}
        try:
            if kind == "namedtuple" or self._user_positional:
                return self.cls(*values)
            return self.cls(**dict(zip(self.names, values)))
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{self.name} refused: {exc}") from None


@dataclasses.dataclass(frozen=True)
class UnionPlan(Plan):
    """A union whose members that hold references are records (``members[i]`` is the plan of
    ``types[i]``, None for a plain member): the class of the value picks the member's plan, as
    msgspec picks the member by the tags of the wire records on the receiving side."""

    members: tuple[Plan | None, ...]
    types: tuple[Any, ...]
    _by_type: dict[type, Plan] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    _by_wire: dict[Any, Plan] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def match(cls, tp: Any) -> Plan | None:
        if get_origin(tp) not in (Union, types.UnionType):
            return None
        args = get_args(tp)
        plans = tuple(_plan_at(tp, f"<{_short(a)}>", a) for a in args)
        if all(p is None for p in plans):
            return None
        for a, p in zip(args, plans):
            if p is not None and not isinstance(p, RecordPlan):
                raise Misplaced(
                    _short(tp),
                    "a union may hold a reference only as Optional[...] or inside the records it unites "
                    f"(tagged msgspec Structs), not as {_short(a)}",
                )
        plan = cls(plans, args)
        for p in plans:
            if isinstance(p, RecordPlan):
                plan._by_type[dict if p.kind == "typeddict" else p.cls] = p
        return plan

    @property
    def wire_type(self) -> Any:
        wire = Union[tuple(p.wire_type if p is not None else t for p, t in zip(self.members, self.types))]  # type: ignore[valid-type]
        if not self._by_wire:
            for p in self.members:
                if p is not None:
                    self._by_wire[p.wire_type] = p
        return wire

    def to_wire(self, ctx: WireContext, value: Any) -> Any:
        plan = self._by_type.get(type(value))
        if plan is None:
            for c, p in self._by_type.items():
                if isinstance(value, c):
                    plan = p
                    break
            else:
                return value  # a plain member
        return plan.to_wire(ctx, value)

    def from_wire(self, ctx: WireContext, value: Any) -> Any:
        if not self._by_wire:
            self.wire_type
        plan = self._by_wire.get(type(value))
        return value if plan is None else plan.from_wire(ctx, value)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not get_args(tp):
        return tp.__qualname__
    s = repr(tp)
    return s.replace("typing.", "").replace("typing_extensions.", "").replace("collections.abc.", "")


def _make_slot(annotation: Any, where: str) -> Slot:
    """Build the slot for an annotation; ``where`` names it in errors."""
    origin = get_origin(annotation)
    if origin is Annotated:
        args = get_args(annotation)
        base, extras = args[0], args[1:]
        allows = [e for e in extras if isinstance(e, Allow)]
        if allows:
            classes = tuple(c for a in allows for c in a.classes)
            return _widened_slot(base, classes, where)
    if origin in (Union, types.UnionType):
        members = get_args(annotation)
        users = [m for m in members if _is_user_class(m)]
        if len(users) > 1 and not all(_has_tag(m) for m in users):
            holding = [m for m in users if _holds_refs(m)]
            if holding:
                raise InterfaceError(
                    f"{where}: {_short(annotation)}<{_short(holding[0])}>: records holding references share a union "
                    "only as tagged msgspec Structs (tag=True), which the receiver tells apart"
                )
            rest = [m for m in members if m not in users]
            plain: Any = None
            if rest:
                plain = rest[0] if len(rest) == 1 else Union[tuple(rest)]
            try:
                return Slot(annotation, tuple(users), plain)
            except TypeError as exc:
                raise InterfaceError(f"{where}: {exc}") from None
    try:
        slot = Slot(annotation)
    except Misplaced as exc:
        raise InterfaceError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise InterfaceError(f"{where}: type {_type_name(annotation)} cannot travel: {exc}") from None
    if slot.plan is None:
        bad = _custom_type(annotation)
        if bad is not None:
            raise InterfaceError(
                f"{where}: type {_type_name(bad)} cannot travel (use a msgspec Struct, a dataclass, a TypedDict, "
                "plain data, or an @xrpc.interface to pass it by reference)"
            )
    return slot


def _custom_type(annotation: Any) -> Any:
    """The first class inside ``annotation`` that msgspec would treat as opaque, or None."""
    try:
        root = msgspec.inspect.type_info(annotation)
    except (TypeError, ValueError):
        return None
    stack: list[Any] = [root]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, msgspec.inspect.CustomType):
            if node.cls is object:
                continue
            return node.cls
        if isinstance(node, msgspec.inspect.Field):
            stack.append(node.type)
            continue
        if not isinstance(node, msgspec.inspect.Type):
            continue
        for name in node.__struct_fields__:
            value = getattr(node, name)
            if isinstance(value, (msgspec.inspect.Type, msgspec.inspect.Field)):
                stack.append(value)
            elif isinstance(value, tuple):
                stack.extend(v for v in value if isinstance(v, (msgspec.inspect.Type, msgspec.inspect.Field)))
    return None


def _has_tag(cls: type) -> bool:
    cfg = getattr(cls, "__struct_config__", None)
    return cfg is not None and cfg.tag is not None


def _widened_slot(base: Any, classes: tuple[type, ...], where: str) -> Slot:
    plain = None
    if _is_any(base):
        plain = Any
    else:
        for c in classes:
            if isinstance(base, type) and not issubclass(c, base):
                raise InterfaceError(f"{where}: {c.__qualname__} is not a subclass of {_type_name(base)}")
    try:
        return Slot(Annotated[base, Allow(classes)], classes, plain)
    except (TypeError, InterfaceError) as exc:
        raise InterfaceError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- descriptions
@dataclasses.dataclass
class ParamDescription:
    name: str
    annotation: Any
    default: Any = inspect.Parameter.empty
    stream: bool = False  # an AsyncIterator[T] parameter: the client stream; ``slot`` describes T
    slot: Slot | None = None
    kind: Any = inspect.Parameter.POSITIONAL_OR_KEYWORD

    @property
    def has_default(self) -> bool:
        return self.default is not inspect.Parameter.empty


class MethodDescription:
    """One remote method: what the runtime needs to call it and to serve it."""

    def __init__(
        self,
        interface: InterfaceDescription,
        name: str,
        kind: MethodKind,
        params: list[ParamDescription],
        reply: Slot | None,
        reply_annotation: Any,
        doc: str | None,
    ) -> None:
        self.interface = interface
        self.name = name
        self.kind = kind
        self.params = params
        self.reply = reply  # None for -> None; for streams: the item slot
        self.reply_annotation = reply_annotation
        self.doc = doc
        self.requirement: Any = None  # an xrpc.Requirement from @xrpc.requires in the interface
        self.flags = (
            (CallFlags.ONEWAY if kind is MethodKind.ONEWAY else 0)
            | (CallFlags.STREAM_IN if kind.streams_in else 0)
            | (CallFlags.STREAM_OUT if kind.streams_out else 0)
        )
        self.stream_param: ParamDescription | None = next((p for p in params if p.stream), None)
        self.value_params = [p for p in params if not p.stream]
        self._signature = MethodSig(
            kind.value,
            tuple(p.name for p in params),
            tuple(i for i, p in enumerate(params) if p.has_default),
            next((i for i, p in enumerate(params) if p.stream), None),
        )
        self._build()

    def _build(self) -> None:
        fields: list[Any] = []
        for p in self.value_params:
            assert p.slot is not None
            if p.has_default:
                default = p.default
                if not isinstance(default, _IMMUTABLE_DEFAULTS):
                    default = msgspec.field(default_factory=_copier(default))
                fields.append((p.name, p.slot.wire_type, default))
            else:
                fields.append((p.name, p.slot.wire_type))
        # Required parameters after optional ones (keyword-only) need a keyword-only Struct; the
        # arguments are then bound by name.  The wire order is the declaration order either way.
        needs_kw = any(not p.has_default for p in self.value_params[self._first_optional() :])
        try:
            self.args_type: type[msgspec.Struct] = msgspec.defstruct(
                f"{self.interface.name}.{self.name}.args",
                fields,
                array_like=True,
                frozen=True,
                kw_only=needs_kw,
                omit_defaults=False,
                # more arguments than parameters are refused, like a local call's TypeError (and
                # they would be held, unused, for as long as the call runs)
                forbid_unknown_fields=True,
            )
        except (TypeError, ValueError) as exc:
            raise InterfaceError(f"{self.interface.name}.{self.name}: {exc}") from None
        self.args_decoder = _decoder(self.args_type)
        self.kwonly = tuple(p.name for p in self.value_params if p.kind == inspect.Parameter.KEYWORD_ONLY)
        # keyword-only parameters are bound by name too, so that one given by position is refused
        # (a TypeError, as a local call would raise); methods without them keep the quicker path
        self.bind_by_name = needs_kw or bool(self.kwonly)
        self.n_positional = len(self.value_params) - len(self.kwonly)
        self.positions = {p.name: i for i, p in enumerate(self.value_params)}
        # Arguments that need work on the sending side (widened slots, plain-data checks).
        self.checked_args = tuple(
            (i, p) for i, p in enumerate(self.value_params) if p.slot is not None and (p.slot.widened or p.slot.any_plain)
        )
        self.widened_args = tuple((i, p) for i, p in enumerate(self.value_params) if p.slot is not None and p.slot.widened)
        self.ref_args = tuple((i, p) for i, p in enumerate(self.value_params) if p.slot is not None and p.slot.plan is not None)
        self.reply_checked = self.reply is not None and (self.reply.widened or self.reply.any_plain)
        self.reply_refs = self.reply is not None and self.reply.plan is not None
        # a unary method whose reply is one object by reference: calls on that result can be pipelined
        self.reply_iface: Any = (
            self.reply.plan.iface
            if self.reply is not None and isinstance(self.reply.plan, RefPlan) and self.kind is MethodKind.UNARY
            else None
        )
        self.stream_item: Slot | None = self.stream_param.slot if self.stream_param is not None else None
        # the trailing parameters with a default, last first: left at their default, they are not
        # sent (so a peer whose version lacks them can take the call, and its own default applies)
        tail: list[tuple[int, Any]] = []
        for i in range(len(self.value_params) - 1, -1, -1):
            if not self.value_params[i].has_default:
                break
            tail.append((i, self.value_params[i].default))
        self.default_tail = tuple(tail)

    # -------------------------------------------------------------- used by the runtime
    def encode_args(self, args: tuple[Any, ...], kwargs: dict[str, Any], ctx: WireContext | None = None) -> Any:
        """Bind call arguments to the args Struct (caller side); raise ``TypeError`` (that is also an
        ``xrpc.ValidationError``) if they do not fit the parameters, ``ValidationError`` if a value
        is refused."""
        try:
            if self.bind_by_name:
                value = self.args_type(**self._bind(args, kwargs))
            else:
                value = self.args_type(*args, **kwargs)
        except TypeError:
            raise ArgumentError(self._bind_error(args, kwargs), method=self.name) from None
        sent = len(self.value_params)
        if self.default_tail:
            given = msgspec.structs.astuple(value)
            for i, default in self.default_tail:
                if not is_default(given[i], default):
                    break
                sent = i
        if self.checked_args or self.ref_args:
            values = list(msgspec.structs.astuple(value))
            for i, p in self.checked_args + self.ref_args:
                if i >= sent:
                    continue  # not sent
                try:
                    values[i] = p.slot.wrap(values[i]) if p.slot.plan is None else p.slot.to_wire(ctx, values[i])  # type: ignore[union-attr]
                except ValueError as exc:
                    raise ValidationError(
                        f"argument {p.name!r} of {self.qualname}: {exc}", method=self.name, argument=p.name
                    ) from None
            if sent < len(values):
                return tuple(values[:sent])
            if self.bind_by_name:
                value = self.args_type(**dict(zip((p.name for p in self.value_params), values)))
            else:
                value = self.args_type(*values)
        elif sent < len(self.value_params):
            return given[:sent]  # an array of the arguments sent, as the Struct would be
        return value

    def _bind_error(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """Why ``args``/``kwargs`` do not fit the parameters, worded as Python words it for a local call."""
        names = {p.name for p in self.value_params if p.kind != inspect.Parameter.POSITIONAL_ONLY}
        for k in kwargs:
            if k not in names:
                return f"{self.qualname}() got an unexpected keyword argument {k!r}"
        positional = sum(p.kind != inspect.Parameter.KEYWORD_ONLY for p in self.value_params)
        if len(args) > positional:
            return f"{self.qualname}() takes {positional} positional argument{'s' if positional != 1 else ''} but {len(args)} were given"
        sig = inspect.Signature([inspect.Parameter(p.name, p.kind, default=p.default) for p in self.value_params])
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            return f"{self.qualname}() {exc}"
        return f"{self.qualname}() got arguments that do not fit its parameters"  # pragma: no cover

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        positional = [p.name for p in self.value_params if p.kind != inspect.Parameter.KEYWORD_ONLY]
        if len(args) > len(positional):
            raise TypeError(f"takes {len(positional)} positional arguments but {len(args)} were given")
        bound = dict(zip(positional, args))
        for k, v in kwargs.items():
            if k in bound:
                raise TypeError(f"got multiple values for argument {k!r}")
            bound[k] = v
        return bound

    def decode_args(self, payload: Any, ctx: WireContext | None = None) -> tuple[Any, ...]:
        """Decode and check the arguments (callee side); raise ``ValidationError`` naming the argument."""
        try:
            value = self.args_decoder.decode(payload)
            if not self.widened_args and not self.ref_args:
                return msgspec.structs.astuple(value)
            values = list(msgspec.structs.astuple(value))
        except msgspec.ValidationError as exc:
            raise self._arg_error(exc, payload) from None
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError) as exc:
            raise ValidationError(f"arguments of {self.qualname} could not be decoded: {exc}", method=self.name) from None
        for i, p in self.widened_args:
            try:
                values[i] = p.slot.unwrap(values[i])  # type: ignore[union-attr]
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError) as exc:
                raise ValidationError(f"argument {p.name!r} of {self.qualname} refused: {exc}", method=self.name, argument=p.name) from None
        for i, p in self.ref_args:
            try:
                values[i] = p.slot.from_wire(ctx, values[i])  # type: ignore[union-attr]
            except ValidationError as exc:
                raise ValidationError(f"argument {p.name!r} of {self.qualname} refused: {exc}", method=self.name, argument=p.name) from None
        return tuple(values)

    def _first_optional(self) -> int:
        for i, p in enumerate(self.value_params):
            if p.has_default:
                return i
        return len(self.value_params)

    def call_args(self, values: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Split decoded argument values into what the implementation is called with."""
        if not self.kwonly:
            return values, {}
        n = self.n_positional
        return values[:n], dict(zip(self.kwonly, values[n:]))

    def _arg_error(self, exc: Exception, payload: Any = None) -> ValidationError:
        text = str(exc)
        arg = ""
        if isinstance(exc, _ExtensionRefused):
            # the hook's error carries no path: find the argument that holds the extension
            arg = self._argument_with_extension(payload)
        marker = "at `$["
        at = text.find(marker)
        if at >= 0:
            end = text.find("]", at)
            try:
                idx = int(text[at + len(marker) : end])
                arg = self.value_params[idx].name
            except (ValueError, IndexError):
                arg = ""
            if arg:
                text = text[:at] + f"at `{arg}" + text[end + 1 :]
                ann = _strip_annotated(self.value_params[idx].annotation)
                if text.startswith("Expected `object`") and _is_user_class(ann):
                    text = f"Expected `{ann.__qualname__}`" + text[len("Expected `object`") :]
        elif text.startswith("Expected `array` of at "):
            # the argument count: said like a local call's TypeError
            bound, _, rest = text[len("Expected `array` of ") :].partition(" length ")
            limit, _, got = rest.partition(", got ")
            text = f"{got} given, it takes {bound} {limit}"
        where = f"argument {arg!r} of {self.qualname}" if arg else f"arguments of {self.qualname}"
        return ValidationError(f"{where} refused: {text}", method=self.name, argument=arg)

    def _argument_with_extension(self, payload: Any) -> str:
        try:
            raws = _raw_items.decode(payload)
        except (msgspec.DecodeError, RecursionError, ValueError):
            return ""
        for p, raw in zip(self.value_params, raws):
            try:
                p.slot.decoder.decode(raw)  # type: ignore[union-attr]
            except _ExtensionRefused:
                return p.name
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError):
                pass
        return ""

    def encode_reply(self, value: Any, ctx: WireContext | None = None) -> Any:
        """Callee side: what goes into REPLY/ITEM for ``value``; raise ``ValidationError``."""
        if self.reply is None:
            return None
        if self.reply_refs:
            try:
                return self.reply.to_wire(ctx, value)
            except ValueError as exc:
                raise ValidationError(f"reply of {self.qualname}: {exc}", method=self.name) from None
        if self.reply_checked:
            try:
                return self.reply.wrap(value)
            except ValueError as exc:
                raise ValidationError(f"reply of {self.qualname}: {exc}", method=self.name) from None
        return value

    def decode_reply(self, payload: Any, ctx: WireContext | None = None) -> Any:
        """Caller side: decode and check a reply or a reply-stream item."""
        if self.reply is None:
            return None
        try:
            value = self.reply.decode(payload)
            if self.reply_refs:
                value = self.reply.from_wire(ctx, value)
            return value
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError) as exc:
            raise ValidationError(f"reply of {self.qualname} refused: {exc}", method=self.name) from None

    @property
    def qualname(self) -> str:
        return f"{self.interface.name}.{self.name}"

    @property
    def signature(self) -> MethodSig:
        """What the handshake announces of this method: its kind, its parameter names, which of
        them have a default, which one is the stream."""
        return self._signature

    def compat_with(self, remote: MethodSig, where: str) -> Any:
        """How a call of this method fares against the peer's signature ``remote``.

        Returns None (same signature), a string (every call fails: the reason), or a tuple of
        indexes of value parameters the peer lacks (a call fails if it passes one of them).
        """
        if remote == self.signature:
            return None
        if remote.kind != self.kind.value:
            return f"{where} is a {remote.kind.replace('_', ' ')} call there, a {self.kind.value.replace('_', ' ')} call here"
        mine = [p.name for p in self.params]
        for i, name in enumerate(remote.params):
            if i >= len(mine):
                if i not in remote.optional:
                    return f"{where} requires parameter {name!r} there, which this side's interface lacks"
                continue
            if mine[i] != name:
                return f"{where}: parameter {i + 1} is {name!r} there, {mine[i]!r} here"
        extra = tuple(i for i, p in enumerate(self.value_params) if p.name not in remote.params)
        return extra or None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind.value, "params": []}
        for p in self.params:
            assert p.slot is not None
            pd: dict[str, Any] = {"name": p.name, **p.slot.describe()}
            if p.stream:
                pd["stream"] = True
            if p.has_default:
                pd["default"] = repr(p.default)
            d["params"].append(pd)
        d["reply"] = self.reply.describe() if self.reply is not None else {"type": "None"}
        return d

    def __repr__(self) -> str:
        return f"<MethodDescription {self.qualname} {self.kind.value}>"


class InterfaceDescription:
    """The inspectable description of an ``@xrpc.interface`` Protocol."""

    def __init__(self, cls: type, name: str, errors: tuple[type[BaseException], ...]) -> None:
        self.cls = cls
        self.name = name
        self.errors = errors
        self.error_map = {_class_key(e): e for e in errors}
        self.methods: dict[str, MethodDescription] = {}
        self.fingerprint = ""

    def set_classes(self, method: str, argument: str | int, classes: typing.Iterable[type], of_reply: bool = False) -> None:
        """Widen one slot to exactly ``classes`` (NSXPCInterface's setClasses:forSelector:...)."""
        m = self.methods.get(method)
        if m is None:
            raise InterfaceError(f"{self.name} has no method {method!r}")
        classes = tuple(classes)
        if of_reply:
            if m.reply is None:
                raise InterfaceError(f"{m.qualname} has no reply to widen")
            base = _strip_annotated(m.reply.annotation)
            m.reply = _widened_slot(base, classes, f"reply of {m.qualname}")
        else:
            if isinstance(argument, int):
                if not 0 <= argument < len(m.params):
                    raise InterfaceError(f"{m.qualname} has no argument {argument}")
                p = m.params[argument]
            else:
                found = [p for p in m.params if p.name == argument]
                if not found:
                    raise InterfaceError(f"{m.qualname} has no argument {argument!r}")
                p = found[0]
            p.slot = _widened_slot(_strip_annotated(p.annotation), classes, f"argument {p.name!r} of {m.qualname}")
        m._build()
        self.fingerprint = _fingerprint(self)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "errors": [e.__qualname__ for e in self.errors],
            "methods": [m.describe() for m in self.methods.values()],
        }

    def __repr__(self) -> str:
        return f"<InterfaceDescription {self.name} {len(self.methods)} methods {self.fingerprint}>"


_IMMUTABLE_DEFAULTS = (type(None), bool, int, float, str, bytes, complex, enum.Enum, frozenset, datetime.date, datetime.time, datetime.timedelta)


def is_default(value: Any, default: Any) -> bool:
    """Is ``value`` the parameter's ``default`` (so the receiver's own default may stand in)?"""
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # an __eq__ that does not answer with a truth value
        return False


def _copier(value: Any) -> Callable[[], Any]:
    return lambda: copy.deepcopy(value)


def _strip_annotated(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _fingerprint(desc: InterfaceDescription) -> str:
    parts: list[str] = [desc.name]
    for m in sorted(desc.methods.values(), key=lambda m: m.name):
        parts.append(f"{m.name}:{m.kind.value}")
        for p in m.params:
            assert p.slot is not None
            parts.append(f" {p.name}{'?' if p.has_default else ''}{'*' if p.stream else ''}={_type_key(p.slot)}")
        parts.append(f" ->{_type_key(m.reply) if m.reply is not None else 'None'}")
    parts.append("errors:" + ",".join(sorted(desc.error_map)))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _type_key(slot: Slot) -> str:
    """What the fingerprint sees of a slot's type: its JSON Schema without prose (docstrings do
    not change the wire), or for a widened slot its allow-list (names, not module paths)."""
    if slot.classes is not None:
        return "allow:" + ",".join(slot.allowed_names())
    tp = _strip_annotated(slot.annotation)
    if slot.plan is not None:
        if any(isinstance(p, RecordPlan) for p in slot.plan.walk()):
            # records: their fields (plain or by reference) are part of the type
            try:
                schema = msgspec.json.schema(tp, schema_hook=_by_reference_schema)
                return "ref:" + msgspec.json.encode(_without_prose(schema)).decode()
            except Exception:
                pass
        return "ref:" + _type_name(tp)
    try:
        key = msgspec.json.encode(_without_prose(msgspec.json.schema(tp))).decode()
    except Exception:
        key = _type_name(tp)
    return key


def _by_reference_schema(tp: Any) -> dict[str, Any]:
    if is_interface(tp):
        return {"x-interface": vars(tp)[_ATTR]["name"]}  # not describe(): it may be the one being built
    if tp is FileDescriptor or tp is SharedBuffer:
        return {"x-kind": tp.__name__}
    raise NotImplementedError


def _without_prose(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_prose(v) for k, v in node.items() if k not in ("description", "title")}
    if isinstance(node, list):
        return [_without_prose(v) for v in node]
    return node


# --------------------------------------------------------------------------- @interface
_STREAM_ORIGINS = (collections.abc.AsyncIterator, collections.abc.AsyncIterable, collections.abc.AsyncGenerator)


def _stream_item(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(_strip_annotated(tp))
    if origin in _STREAM_ORIGINS:
        args = get_args(_strip_annotated(tp))
        return True, args[0] if args else Any
    return False, None


def _stream_param(tp: Any) -> tuple[bool, Any]:
    """A client-stream parameter: ``AsyncIterator[T]`` (or ``AsyncIterable[T]``), or
    ``AsyncIterable[T] | Iterable[T]`` so that a type checker lets callers pass a plain list."""
    is_stream, item = _stream_item(tp)
    if is_stream:
        return is_stream, item
    bare = _strip_annotated(tp)
    if get_origin(bare) in (Union, types.UnionType):
        members = get_args(bare)
        if len(members) == 2:
            for first, second in (members, members[::-1]):
                is_stream, item = _stream_item(first)
                origin: Any = get_origin(second)
                if is_stream and origin in _SYNC_STREAM_ORIGINS:
                    sync_args = get_args(second)
                    if (sync_args[0] if sync_args else Any) == item:
                        return True, item
    return False, None


_SYNC_STREAM_ORIGINS = (collections.abc.Iterable, collections.abc.Iterator)


def _methods_of(cls: type) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        if base in (object, typing.Protocol, typing.Generic) or base.__module__ == "typing":
            continue
        for name, value in vars(base).items():
            if name.startswith("_"):
                continue
            if isinstance(value, (staticmethod, classmethod, property)):
                raise InterfaceError(f"{cls.__qualname__}.{name}: only plain methods can be remote")
            if inspect.isfunction(value):
                found[name] = value
    return found


def _build(cls: type, name: str, errors: tuple[type[BaseException], ...]) -> InterfaceDescription:
    desc = InterfaceDescription(cls, name, errors)
    module = sys.modules.get(cls.__module__)
    globalns = dict(vars(module)) if module else {}
    localns = {cls.__name__: cls}
    for mname, fn in _methods_of(cls).items():
        where = f"{name}.{mname}"
        try:
            hints = typing.get_type_hints(fn, globalns=globalns, localns=localns, include_extras=True)
        except NameError:
            raise
        except Exception as exc:
            raise InterfaceError(f"{where}: annotations cannot be resolved: {exc}") from None
        sig = inspect.signature(fn)
        is_async = inspect.iscoroutinefunction(fn)
        if "return" not in hints:
            raise InterfaceError(f"{where}: the return type is not annotated (write -> None for no reply)")
        ret = hints["return"]
        ret_stream, ret_item = _stream_item(ret)
        params: list[ParamDescription] = []
        for i, (pname, p) in enumerate(sig.parameters.items()):
            if i == 0:
                if pname != "self":
                    raise InterfaceError(f"{where}: the first parameter must be self")
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise InterfaceError(f"{where}: parameter {pname!r}: *args and **kwargs cannot be remote")
            if pname not in hints:
                raise InterfaceError(f"{where}: parameter {pname!r} is not annotated")
            ann = hints[pname]
            is_stream, item = _stream_param(ann)
            pd = ParamDescription(pname, ann, p.default, is_stream, kind=p.kind)
            if is_stream:
                if p.default is not p.empty:
                    raise InterfaceError(f"{where}: stream parameter {pname!r} cannot have a default")
                pd.slot = _make_slot(item, f"{where}: parameter {pname!r}")
            else:
                pd.slot = _make_slot(ann, f"{where}: parameter {pname!r}")
            params.append(pd)
        streams = [p for p in params if p.stream]
        if len(streams) > 1:
            raise InterfaceError(f"{where}: parameters {', '.join(repr(p.name) for p in streams)}: at most one stream parameter per method")
        is_oneway = getattr(fn, "__xrpc_oneway__", False)
        if ret_stream:
            if is_async:
                raise InterfaceError(f"{where}: a method returning a stream is declared with plain def, not async def")
            kind = MethodKind.BIDI_STREAM if streams else MethodKind.SERVER_STREAM
            reply: Slot | None = _make_slot(ret_item, f"{where}: stream item")
        else:
            if not is_async:
                raise InterfaceError(f"{where}: a remote method must be async def (or plain def returning AsyncIterator[T])")
            if is_oneway:
                if ret is not None and ret is not type(None):
                    raise InterfaceError(f"{where}: a one-way method must return None")
                if streams:
                    raise InterfaceError(f"{where}: a one-way method cannot take a stream")
                kind = MethodKind.ONEWAY
            else:
                kind = MethodKind.CLIENT_STREAM if streams else MethodKind.UNARY
            reply = None if ret is None or ret is type(None) else _make_slot(ret, f"{where}: return type")
        if is_oneway and kind is not MethodKind.ONEWAY:
            raise InterfaceError(f"{where}: a stream method cannot be one-way")
        md = MethodDescription(desc, mname, kind, params, reply, ret, inspect.getdoc(fn))
        md.requirement = getattr(fn, "__xrpc_requires__", None)
        desc.methods[mname] = md
    desc.fingerprint = _fingerprint(desc)
    return desc


_C = TypeVar("_C", bound=type)


@typing.overload
def interface(cls: _C, /) -> _C: ...
@typing.overload
def interface(*, errors: typing.Sequence[type[BaseException]] = (), name: str | None = None) -> Callable[[_C], _C]: ...


def interface(
    cls: Any = None, /, *, errors: typing.Sequence[type[BaseException]] = (), name: str | None = None
) -> Any:
    """Declare a ``typing.Protocol`` as an xrpc interface; validate it now; return it unchanged.

    ``errors`` lists the exception classes that travel as themselves.  ``name`` is the interface's
    name on the wire (default: the class's qualified name).
    """

    def apply(c: type[_T]) -> type[_T]:
        if not isinstance(c, type):
            raise InterfaceError(f"@xrpc.interface applies to a class, not {c!r}")
        for e in errors:
            if not (isinstance(e, type) and issubclass(e, BaseException)):
                raise InterfaceError(f"{c.__qualname__}: errors= takes exception classes, got {e!r}")
        iname = name or c.__qualname__
        state: dict[str, Any] = {"name": iname, "errors": tuple(errors), "desc": None}
        setattr(c, _ATTR, state)
        try:
            state["desc"] = _build(c, iname, tuple(errors))
        except NameError:
            pass  # a forward reference to a name defined later: resolved on first use
        return c

    if cls is not None:
        return apply(cls)
    return apply


def is_interface(obj: Any) -> bool:
    return isinstance(obj, type) and _ATTR in vars(obj)


def describe(cls: Any) -> InterfaceDescription:
    """The description of an ``@xrpc.interface`` class (built once, then shared)."""
    state = vars(cls).get(_ATTR) if isinstance(cls, type) else None
    if state is None:
        raise InterfaceError(f"{cls!r} is not an @xrpc.interface class")
    desc = state["desc"]
    if desc is None:
        try:
            desc = _build(cls, state["name"], state["errors"])
        except NameError as exc:
            raise InterfaceError(f"{state['name']}: annotations cannot be resolved: {exc}") from None
        state["desc"] = desc
    return desc  # type: ignore[no-any-return]
