"""Checks that a Thrift binary-protocol message fits its frame before thriftpy2's Cython reader parses it.

thriftpy2's Cython reader trusts the lengths written inside a message: from an
in-memory buffer, a string or list longer than the bytes left reads past them
(uninitialised memory, or billions of loop turns over nothing), and from a
socket it allocates whatever a length says. So the worker walks every frame
once here first: each length must fit in what is left of the frame, type codes
must be known and nesting is bounded. Lists and maps of fixed-size values are
checked by arithmetic, so a typical call costs a few microseconds.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

T_STOP, T_BOOL, T_BYTE, T_DOUBLE, T_I16, T_I32, T_I64 = 0, 2, 3, 4, 6, 8, 10
T_STRING, T_STRUCT, T_MAP, T_SET, T_LIST = 11, 12, 13, 14, 15
FIXED_SIZES = {T_BOOL: 1, T_BYTE: 1, T_DOUBLE: 8, T_I16: 2, T_I32: 4, T_I64: 8}
VERSION_MASK = 0xFFFF0000
VERSION_1 = 0x80010000
MAX_DEPTH = 32   # our IDL nests 4 deep; thriftpy2's own limit is 64

_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")


class MalformedMessage(ValueError):
    """The bytes are not a well-formed strict binary-protocol message."""


class MessageHeader(NamedTuple):
    name: str
    message_type: int
    seqid: int
    body_start: int


def read_header(frame: bytes) -> MessageHeader:
    """The method name, message type and sequence id at the start of a frame."""
    if len(frame) < 12:
        raise MalformedMessage(f"a message needs at least 12 bytes, the frame has {len(frame)}")
    version, = _U32.unpack_from(frame, 0)
    if version & VERSION_MASK != VERSION_1:
        raise MalformedMessage(f"not a strict binary-protocol message (version word {version:#010x})")
    end = _string_end(frame, 4)
    name = frame[8:end].decode("utf-8", "replace")
    seqid, = _I32.unpack_from(frame, _advance(frame, end, 4) - 4)
    return MessageHeader(name, version & 0xFF, seqid, end + 4)


def check_body(frame: bytes, start: int, max_depth: int = MAX_DEPTH) -> None:
    """Raise MalformedMessage unless a whole struct starts at `start` and fits in the frame."""
    _skip_struct(frame, start, 0, max_depth)


def _advance(frame: bytes, pos: int, count: int) -> int:
    end = pos + count
    if count < 0 or end > len(frame):
        raise MalformedMessage(f"{count} bytes at byte {pos} run past the frame's {len(frame)} bytes")
    return end


def _count(frame: bytes, pos: int) -> int:
    """A length or element count (i32 at pos), which must not be negative."""
    value, = _I32.unpack_from(frame, _advance(frame, pos, 4) - 4)
    if value < 0:
        raise MalformedMessage(f"negative length {value} at byte {pos}")
    return value


def _string_end(frame: bytes, pos: int) -> int:
    return _advance(frame, pos + 4, _count(frame, pos))


def _skip_struct(frame: bytes, pos: int, depth: int, max_depth: int) -> int:
    if depth > max_depth:
        raise MalformedMessage(f"structs nest deeper than {max_depth}")
    while True:
        field_type = frame[_advance(frame, pos, 1) - 1]
        if field_type == T_STOP:
            return pos + 1
        pos = _skip_value(frame, _advance(frame, pos + 1, 2), field_type, depth, max_depth)


def _skip_value(frame: bytes, pos: int, value_type: int, depth: int, max_depth: int) -> int:
    size = FIXED_SIZES.get(value_type)
    if size is not None:
        return _advance(frame, pos, size)
    if value_type == T_STRING:
        return _string_end(frame, pos)
    if value_type == T_STRUCT:
        return _skip_struct(frame, pos, depth + 1, max_depth)
    if value_type in (T_LIST, T_SET):
        _advance(frame, pos, 5)
        return _skip_items(frame, pos + 5, (frame[pos],), _count(frame, pos + 1), depth + 1, max_depth)
    if value_type == T_MAP:
        _advance(frame, pos, 6)
        return _skip_items(frame, pos + 6, (frame[pos], frame[pos + 1]), _count(frame, pos + 2),
                           depth + 1, max_depth)
    raise MalformedMessage(f"unknown type code {value_type} before byte {pos}")


def _skip_items(frame: bytes, pos: int, types: tuple[int, ...], count: int, depth: int,
                max_depth: int) -> int:
    if depth > max_depth:
        raise MalformedMessage(f"containers nest deeper than {max_depth}")
    sizes = [FIXED_SIZES.get(t) for t in types]
    if None not in sizes:
        return _advance(frame, pos, count * sum(sizes))
    # Every other value takes at least one byte, so the loop below is bounded by the frame.
    if count > len(frame) - pos:
        raise MalformedMessage(f"{count} elements at byte {pos} cannot fit in the frame")
    for _ in range(count):
        for item_type in types:
            pos = _skip_value(frame, pos, item_type, depth, max_depth)
    return pos
