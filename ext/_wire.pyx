# cython: language_level=3
# distutils: language = c++
"""Walks a Thrift binary-protocol struct against the IDL's declared types, in C: the wire checker's inner loop.

The walk runs on the gevent hub before anything else reads a frame, so its
cost is paid by every connection of the worker: in Python a 1 MiB frame of
empty structs took 0.4 s of CPU, here under 10 ms. `Schema` holds
the shapes of the IDL's structs as flat arrays of ints (built once by
`ringlm.server.wire` from thriftpy2's thrift_spec); `Schema.walk` goes over
one struct exactly as thriftpy2's Cython reader (thriftpy2/protocol/cybin)
will, and raises MalformedMessage wherever that reader would trust the bytes
less than the frame allows.
"""

cimport cython
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint32_t
from libcpp.vector cimport vector

cdef enum:
    T_STOP = 0
    T_BOOL = 2
    T_BYTE = 3
    T_DOUBLE = 4
    T_I16 = 6
    T_I32 = 8
    T_I64 = 10
    T_STRING = 11
    T_STRUCT = 12
    T_MAP = 13
    T_SET = 14
    T_LIST = 15
    UNDECLARED = -1   # a node for what the IDL does not declare here: walked by its wire types

TYPE_NAMES = {T_BOOL: "bool", T_BYTE: "byte", T_DOUBLE: "double", T_I16: "i16", T_I32: "i32", T_I64: "i64",
              T_STRING: "string", T_STRUCT: "struct", T_MAP: "map", T_SET: "set", T_LIST: "list"}


class MalformedMessage(ValueError):
    """The bytes are not a well-formed strict binary-protocol message of the IDL."""


cdef struct Frame:
    const uint8_t* data
    Py_ssize_t size


cdef inline int fixed_size(int type_code) noexcept nogil:
    if type_code == T_BOOL or type_code == T_BYTE:
        return 1
    if type_code == T_I16:
        return 2
    if type_code == T_I32:
        return 4
    if type_code == T_I64 or type_code == T_DOUBLE:
        return 8
    return 0


cdef inline Py_ssize_t advance(const Frame* frame, Py_ssize_t pos, int64_t count) except -1:
    if count < 0 or count > frame.size - pos:
        raise MalformedMessage(f"{count} bytes at byte {pos} run past the frame's {frame.size} bytes")
    return pos + count


cdef inline int32_t read_count(const Frame* frame, Py_ssize_t pos) except? -1:
    """The i32 length or element count at pos (in the frame), which must not be negative."""
    cdef const uint8_t* p = frame.data + advance(frame, pos, 4) - 4
    cdef int32_t value = <int32_t>((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3])
    if value < 0:
        raise MalformedMessage(f"negative length {value} at byte {pos}")
    return value


cdef inline bint known(int type_code) noexcept nogil:
    return fixed_size(type_code) != 0 or T_STRING <= type_code <= T_LIST


cdef unknown_type(int type_code, Py_ssize_t pos):
    return MalformedMessage(f"unknown type code {type_code} before byte {pos}")


def type_name(int type_code) -> str:
    return TYPE_NAMES.get(type_code, f"type code {type_code}")


@cython.final   # its methods are then called directly, not through a vtable
cdef class Schema:
    """The shapes of an IDL's structs, and the walk over one struct on the wire.

    A node is three ints in `nodes`: its type code, then for a struct the
    index of its first field in `fields` and how many it has, for a list or
    a set its element's node, for a map its key's and its value's nodes.
    A field is two ints in `fields`: its id and its node.
    """

    cdef vector[int32_t] nodes
    cdef vector[int32_t] fields
    cdef readonly int max_depth
    # thriftpy2 builds a Python object for every declared struct it reads (about 1.4 us each): a 1 MiB
    # frame of empty ChatMessages is a million of them, 1.4 s on the hub. So a call may carry at most
    # this many declared structs; skipped (undeclared) ones cost thriftpy2 nothing but the walk.
    cdef readonly int max_structs
    cdef int structs_seen

    def __init__(self, nodes, fields, int max_depth, int max_structs):
        self.nodes = nodes
        self.fields = fields
        self.max_depth = max_depth
        self.max_structs = max_structs

    def walk(self, bytes frame, Py_ssize_t start, int node) -> int:
        """The offset just past the struct of shape `node` that starts at `start`; MalformedMessage when
        it does not fit the frame, nests deeper than max_depth, or has container types the IDL does not."""
        if not 0 <= node < <Py_ssize_t>self.nodes.size() // 3 or self.nodes[3 * node] != T_STRUCT:
            raise ValueError(f"node {node} is not a struct of this schema")
        cdef Frame view = Frame(<const uint8_t*>frame, len(frame))
        if not 0 <= start <= view.size:
            raise ValueError(f"start {start} is outside the frame")
        self.structs_seen = -1   # the arguments struct itself does not count
        return self.walk_struct(&view, start, node, 0)

    cdef Py_ssize_t walk_struct(self, const Frame* frame, Py_ssize_t pos, int node, int depth) except -1:
        """Like thriftpy2's read_struct: a known field whose wire type is its declared type is read by the
        declaration; an unknown field, or one of another type, is skipped by the types on the wire."""
        cdef int first = 0, end = 0, i, declared
        cdef int wire_type
        cdef int16_t field_id
        if depth > self.max_depth:
            raise MalformedMessage(f"structs and containers nest deeper than {self.max_depth}")
        if node != UNDECLARED:
            first = self.nodes[3 * node + 1]
            end = first + self.nodes[3 * node + 2]
            self.structs_seen += 1
            if self.structs_seen > self.max_structs:
                raise MalformedMessage(f"more than {self.max_structs} structs in one call")
        while True:
            pos = advance(frame, pos, 1)
            wire_type = frame.data[pos - 1]
            if wire_type == T_STOP:
                return pos
            pos = advance(frame, pos, 2)
            field_id = <int16_t>((frame.data[pos - 2] << 8) | frame.data[pos - 1])
            declared = UNDECLARED
            for i in range(first, end):
                if self.fields[2 * i] == field_id:
                    if self.nodes[3 * self.fields[2 * i + 1]] == wire_type:
                        declared = self.fields[2 * i + 1]
                    break
            pos = self.walk_value(frame, pos, wire_type, declared, depth)

    cdef Py_ssize_t walk_value(self, const Frame* frame, Py_ssize_t pos, int wire_type, int node,
                               int depth) except -1:
        """One value of this wire type; `node` is its declared shape (same type code) or UNDECLARED."""
        cdef int size = fixed_size(wire_type)
        cdef int key_type, value_type, key = UNDECLARED, value = UNDECLARED
        cdef int32_t count
        if size:
            return advance(frame, pos, size)
        if wire_type == T_STRING:
            return advance(frame, pos + 4, read_count(frame, pos))
        if wire_type == T_STRUCT:
            return self.walk_struct(frame, pos, node, depth + 1)
        if wire_type == T_LIST or wire_type == T_SET:
            count = read_count(frame, advance(frame, pos, 1))
            value_type = frame.data[pos]
            if node != UNDECLARED:
                value = self.expect(value_type, self.nodes[3 * node + 1],
                                    "set element" if wire_type == T_SET else "list element")
            return self.walk_items(frame, pos + 5, count, False, 0, UNDECLARED, value_type, value, depth + 1)
        if wire_type == T_MAP:
            count = read_count(frame, advance(frame, pos, 2))
            key_type, value_type = frame.data[pos], frame.data[pos + 1]
            if node != UNDECLARED:
                # thriftpy2 reads a map's string keys and values as whatever the IDL declares.
                key = self.expect(key_type, self.nodes[3 * node + 1], "map key")
                value = self.expect(value_type, self.nodes[3 * node + 2], "map value")
            return self.walk_items(frame, pos + 6, count, True, key_type, key, value_type, value, depth + 1)
        raise unknown_type(wire_type, pos)

    cdef int expect(self, int wire_type, int node, str what) except -2:
        """`node`, the declared shape of a container's elements, if the wire's type is the declared one:
        thriftpy2 reads some mismatches by the declaration, which the frame was never checked for."""
        cdef int declared = self.nodes[3 * node]
        if wire_type != declared:
            raise MalformedMessage(f"a {what} is {type_name(wire_type)} on the wire, {type_name(declared)} in the IDL")
        return node

    cdef Py_ssize_t walk_items(self, const Frame* frame, Py_ssize_t pos, int32_t count, bint pairs, int key_type,
                               int key, int value_type, int value, int depth) except -1:
        """`count` values, or key-value pairs."""
        cdef int key_size = fixed_size(key_type) if pairs else 0   # a list's key_type means nothing
        cdef int value_size = fixed_size(value_type)
        cdef int32_t i
        if depth > self.max_depth:
            raise MalformedMessage(f"structs and containers nest deeper than {self.max_depth}")
        if pairs and not known(key_type):
            raise unknown_type(key_type, pos)
        if not known(value_type):
            raise unknown_type(value_type, pos)
        if value_size and (key_size or not pairs):
            return advance(frame, pos, <int64_t>count * (key_size + value_size))
        # Every other value takes at least a byte, so the frame bounds the loop before it starts.
        if count > frame.size - pos:
            raise MalformedMessage(f"{count} elements at byte {pos} cannot fit in the frame")
        for i in range(count):
            if pairs:
                pos = self.walk_value(frame, pos, key_type, key, depth)
            pos = self.walk_value(frame, pos, value_type, value, depth)
        return pos
