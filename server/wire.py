"""Checks that a Thrift call fits its frame, as thriftpy2's Cython reader will read it, before that reader runs.

thriftpy2's Cython reader trusts the lengths written inside a message: from an
in-memory buffer, a string or list longer than the bytes left reads past them
(uninitialised memory, or billions of loop turns over nothing), and from a
socket it allocates whatever a length says. It also reads some values by the
IDL's declared types rather than the type codes on the wire (a map whose wire
says string keys is read with the declared i32 keys), so a walk by wire types
alone can pass a frame the reader then misreads past its end. So the worker
walks every call here first, by the same rules as the reader: a known field
whose wire type is its declared type is walked by the declaration, and its
containers must carry the declared element types (anything else is
malformed); an unknown field, or a known one of another type, is skipped by
its wire types, as the reader skips it. Every length must fit what is left
of the frame, type codes must be known and nesting is bounded.

The walk itself is native (ext/_wire.pyx) over a table of the IDL's struct
shapes built here once from thriftpy2's thrift_spec: it runs on the gevent
hub before authentication, where a pure-Python walk of a 1 MiB frame of
empty structs took 0.4 s of CPU (under 10 ms here: BENCHMARKS.md, `wire`).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ringlm.ext._wire import MalformedMessage, Schema
from ringlm.idl import ringlm_thrift as thrift

__all__ = ["MalformedMessage", "MessageHeader", "read_header", "check_body", "METHODS"]

T_STRING, T_STRUCT, T_MAP, T_SET, T_LIST, T_BINARY = 11, 12, 13, 14, 15, 18
VERSION_MASK = 0xFFFF0000
VERSION_1 = 0x80010000
MAX_DEPTH = 32   # our IDL nests 4 deep; thriftpy2's own limit is 64
# Declared structs per call (chat messages, mostly: --max-messages is 512 by default). Each becomes a
# Python object in thriftpy2's parser, so this bounds a valid frame's parse to a few milliseconds.
MAX_STRUCTS = 4096

_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")


class MessageHeader(NamedTuple):
    name: str
    message_type: int
    seqid: int
    body_start: int


def compile_schema(service) -> tuple[Schema, dict[str, int]]:
    """The shapes of every struct a call of `service` can carry, and the node of each method's arguments."""
    nodes: list[int] = []
    fields: list[int] = []
    shapes: dict[tuple[int, int, int], int] = {}
    structs: dict[type, int] = {}

    def shape(type_code: int, first: int = 0, second: int = 0) -> int:
        key = (type_code, first, second)
        if key not in shapes:
            shapes[key] = len(nodes) // 3
            nodes.extend(key)
        return shapes[key]

    def struct_shape(cls) -> int:
        if cls not in structs:
            node = structs[cls] = len(nodes) // 3   # before its fields: a struct may contain itself
            nodes.extend((T_STRUCT, 0, 0))
            members = [(field_id, value_shape(spec[0], spec[2] if len(spec) > 3 else None))
                       for field_id, spec in sorted(cls.thrift_spec.items())]
            nodes[3 * node + 1:3 * node + 3] = len(fields) // 2, len(members)
            for member in members:
                fields.extend(member)
        return structs[cls]

    def value_shape(type_code: int, spec) -> int:
        """As thriftpy2's read_struct passes them: a field's spec is its struct class, or its container's
        element spec(s), each a type code or (type code, spec); anything else (an enum class) is unused."""
        if type_code == T_BINARY:
            return shape(T_STRING)   # the same bytes, and thriftpy2 writes its type code as a string's
        if type_code == T_STRUCT:
            return struct_shape(spec)
        if type_code in (T_LIST, T_SET):
            return shape(type_code, element_shape(spec))
        if type_code == T_MAP:
            return shape(T_MAP, element_shape(spec[0]), element_shape(spec[1]))
        return shape(type_code)

    def element_shape(spec) -> int:
        return value_shape(spec, None) if isinstance(spec, int) else value_shape(*spec)

    arguments = {name: struct_shape(getattr(service, f"{name}_args")) for name in service.thrift_services}
    return Schema(nodes, fields, MAX_DEPTH, MAX_STRUCTS), arguments


_SCHEMA, _ARGUMENTS = compile_schema(thrift.Generator)
METHODS = frozenset(_ARGUMENTS)


def read_header(frame: bytes) -> MessageHeader:
    """The method name, message type and sequence id at the start of a frame."""
    if len(frame) < 12:
        raise MalformedMessage(f"a message needs at least 12 bytes, the frame has {len(frame)}")
    version, = _U32.unpack_from(frame, 0)
    if version & VERSION_MASK != VERSION_1:
        raise MalformedMessage(f"not a strict binary-protocol message (version word {version:#010x})")
    name_length, = _I32.unpack_from(frame, 4)
    if not 0 <= name_length <= len(frame) - 12:
        raise MalformedMessage(f"a method name of {name_length} bytes does not fit a frame of {len(frame)}")
    end = 8 + name_length
    name = frame[8:end].decode("utf-8", "replace")
    seqid, = _I32.unpack_from(frame, end)
    return MessageHeader(name, version & 0xFF, seqid, end + 4)


def check_body(frame: bytes, header: MessageHeader) -> int:
    """Raise MalformedMessage unless the arguments of `header`'s method (one of METHODS) start at its
    body_start and read within the frame; the offset just past them."""
    return _SCHEMA.walk(frame, header.body_start, _ARGUMENTS[header.name])
