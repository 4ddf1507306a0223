"""Hypothesis strategies for any protobuf message, built by walking its ``Descriptor``.

Used by the gRPC fuzz targets (tests/reliability/test_fuzz_grpc.py) so that every request type of
every service is generated from the .proto contract itself: a field added to a request is fuzzed
without anyone touching the tests. Values lean towards the edges a hand-written server forgets:
extreme and negative integers, NaN and infinities, empty, long and non-ASCII strings, bytes,
enum numbers the server does not know (proto3 enums are open), several oneof members, nested
messages down to a depth.

``overrides`` maps a field's full name (``edgefleet.v1.FetchTargetRequest.target_path``) to a
strategy of plausible values for the whole field (a list for a repeated one, a message for a
message field); the walker mixes them in, so a fuzzer gets past the first checks
(a real token, a real target path) to the code behind them. :func:`variants_of` starts from a
well-formed request instead and changes a few of its fields, at any depth.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, cast

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

HUGE_TEXT: Final = 256 * 1024
"""Length of the "huge" strings and bytes: past every field bound we set, under gRPC's 4 MiB cap."""
MAX_REPEATED: Final = 4
MAX_DEPTH: Final = 3

_INT_RANGES: Final[Mapping[int, tuple[int, int]]] = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1),
}

Overrides = Mapping[str, st.SearchStrategy[Any]]


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({e for e in (low, low + 1, -1, 0, 1, 2, 1 << 20, 1 << 31, high - 1, high) if low <= e <= high})
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(["", ".", "..", "../../etc/passwd", "/", "a/../b", "\x00", "é" * 10, "-" * 300]),
        st.just("x" * HUGE_TEXT),
    )


def _binary() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=64), st.just(b"\xff" * HUGE_TEXT))


def _enum(descriptor: EnumDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in descriptor.values]
    unknown = [max(known) + 1, -1, (1 << 31) - 1, -(1 << 31)]
    return st.one_of(st.sampled_from(known), st.sampled_from(unknown))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        return _integers(*_INT_RANGES[kind])
    if kind == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        return _enum(field.enum_type)
    others: dict[int, st.SearchStrategy[Any]] = {
        FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
        FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
        FieldDescriptor.TYPE_BOOL: st.booleans(),
        FieldDescriptor.TYPE_STRING: _text(),
        FieldDescriptor.TYPE_BYTES: _binary(),
    }
    if kind not in others:
        raise TypeError(f"no strategy for field {field.full_name} of type {kind}")
    return others[kind]


def _single(field: FieldDescriptor, depth: int, overrides: Overrides) -> st.SearchStrategy[Any]:
    """Values for one (non-repeated) occurrence of ``field``; messages come back as Message objects."""
    if field.message_type is not None:
        return message_strategy(field.message_type, overrides=overrides, depth=depth + 1)
    return _scalar(field)


def _field_value(field: FieldDescriptor, depth: int, overrides: Overrides) -> st.SearchStrategy[Any]:
    plain = _generated(field, depth, overrides)
    hint = overrides.get(field.full_name)
    return plain if hint is None else st.one_of(hint, hint, plain)  # the plausible value twice as often


def _map_entry(field: FieldDescriptor) -> Descriptor | None:
    """The key/value entry type of a map field; ``None`` for any other field."""
    entry = field.message_type
    return entry if entry is not None and entry.GetOptions().map_entry else None


def _generated(field: FieldDescriptor, depth: int, overrides: Overrides) -> st.SearchStrategy[Any]:
    entry = _map_entry(field)
    if entry is not None:
        keys = _single(entry.fields_by_name["key"], depth, overrides)
        values = _single(entry.fields_by_name["value"], depth, overrides)
        return st.dictionaries(keys, values, max_size=MAX_REPEATED)
    if field.is_repeated:
        return st.lists(_single(field, depth, overrides), max_size=MAX_REPEATED)
    return _single(field, depth, overrides)


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    entry = _map_entry(field)
    if entry is not None:
        target = getattr(message, field.name)
        for key, item in value.items():
            if entry.fields_by_name["value"].message_type is not None:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        getattr(message, field.name).extend(value)
    elif field.message_type is not None:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def message_strategy(
    descriptor: Descriptor, *, overrides: Overrides | None = None, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with any subset of fields set (at most one per oneof)."""
    hints = overrides or {}
    cls = GetMessageClass(descriptor)
    if depth > MAX_DEPTH:
        return st.just(cls())
    in_oneof = {f.name for o in descriptor.oneofs for f in o.fields}
    free = {f.name: _field_value(f, depth, hints) for f in descriptor.fields if f.name not in in_oneof}
    # A oneof: none of its members, or one of them with a value.
    oneofs = [
        st.one_of(st.none(), *(st.tuples(st.just(f.name), _field_value(f, depth, hints)) for f in o.fields))
        for o in descriptor.oneofs
    ]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        chosen: dict[str, Any] = draw(st.fixed_dictionaries({}, optional=free))
        for choice in draw(st.tuples(*oneofs)):
            if choice is not None:
                chosen[choice[0]] = choice[1]
        for name, value in chosen.items():
            _assign(message, descriptor.fields_by_name[name], value)
        return message

    return build()


FieldPath = tuple[tuple[str, int | None], ...]
"""Fields from a message down to one of its (nested) fields: (field name, element index if repeated)."""


def _field_paths(message: Message, here: FieldPath = (), depth: int = 0) -> list[FieldPath]:
    paths: list[FieldPath] = []
    for field in message.DESCRIPTOR.fields:
        paths.append((*here, (field.name, None)))
        if field.message_type is None or _map_entry(cast("FieldDescriptor", field)) or depth >= MAX_DEPTH:
            continue
        if field.is_repeated:
            for index, item in enumerate(getattr(message, field.name)):
                paths.extend(_field_paths(item, (*here, (field.name, index)), depth + 1))
        elif message.HasField(field.name):
            paths.extend(_field_paths(getattr(message, field.name), (*here, (field.name, None)), depth + 1))
    return paths


def variants_of(seed: Message, *, overrides: Overrides | None = None) -> st.SearchStrategy[Message]:
    """``seed`` (a well-formed request) with one to three of its fields, at any depth, cleared or regenerated.

    Where :func:`message_strategy` rarely gets every field of a large request right at once, a
    variant is valid but for the fields changed, so it reaches the checks behind the first ones.
    """
    hints = overrides or {}
    paths = _field_paths(seed)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = type(seed)()
        message.CopyFrom(seed)
        chosen = draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique=True))
        for path in sorted(chosen, key=len, reverse=True):  # deepest first: a cleared parent is not walked into
            parent = message
            for name, index in path[:-1]:
                parent = getattr(parent, name)[index] if index is not None else getattr(parent, name)
            name = path[-1][0]
            field = cast("FieldDescriptor", parent.DESCRIPTOR.fields_by_name[name])
            parent.ClearField(name)
            if draw(st.integers(0, 3)):  # mostly a new value, sometimes just gone
                _assign(parent, field, draw(_field_value(field, MAX_DEPTH - 1, hints)))
        return message

    return build()
