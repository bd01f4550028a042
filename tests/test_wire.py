"""The frame checker against thriftpy2's Cython parser: whatever the checker accepts, the parser reads within the frame.

In process, on crafted frames: each one is a way the two could disagree.
"""

from __future__ import annotations

import struct

import pytest
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TProcessor
from thriftpy2.transport.memory import TCyMemoryBuffer

from ringlm.idl import ringlm_thrift as thrift
from ringlm.server import wire
from tests.wire_fuzz import seed_calls

# Reading past the end of a TCyMemoryBuffer does not raise: it yields what is left, then nothing.
# Zeros after the frame make such a read visible (they are consumed) and harmless (zero lengths, STOP).
GUARD = bytes(4096)


def call(method: str, args=None, seqid: int = 7) -> bytes:
    protocol = TCyBinaryProtocol(TCyMemoryBuffer())
    protocol.write_message_begin(method, 1, seqid)
    protocol.write_struct(args if args is not None else getattr(thrift.Generator, f"{method}_args")())
    return protocol.trans.getvalue()


def header(method: str, seqid: int = 7) -> bytes:
    return call(method, seqid=seqid)[:-1]   # without the empty struct's STOP


def field(type_code: int, field_id: int) -> bytes:
    return struct.pack("!bh", type_code, field_id)


def string(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def parsed_bytes(frame: bytes) -> int:
    """How many bytes thriftpy2's processor reads to parse the call in `frame`."""
    protocol = TCyBinaryProtocol(TCyMemoryBuffer(frame + GUARD), strict_decode=True)
    TProcessor(thrift.Generator, None).process_in(protocol)
    return len(frame) + len(GUARD) - len(protocol.trans.getvalue())


# A map<i32, double> (SamplingOptions.logit_bias) whose wire says map<string, string>. The checker
# used to walk it as strings (a length, then that many bytes); thriftpy2 substitutes the declared
# types for string wire types in maps, reads an i32 key and a double value, and goes on parsing
# field headers from inside the "string": here an unknown string field whose length runs 200 bytes
# past the frame (on a live server, 2**31 - 1 of them: gigabytes, per 61-byte frame).
HIDDEN = field(11, 99) + struct.pack("!i", 200)
MAP_AS_STRINGS = (header("generate") + field(12, 1) + field(12, 4) + field(13, 9)
                  + struct.pack("!bbi", 11, 11, 1) + string(bytes(8) + HIDDEN) + string(b"") + b"\x00\x00\x00")


def test_a_map_whose_wire_types_differ_from_the_idl_is_malformed():
    assert parsed_bytes(MAP_AS_STRINGS) > len(MAP_AS_STRINGS)   # what the parser would do with it
    header_ = wire.read_header(MAP_AS_STRINGS)
    with pytest.raises(wire.MalformedMessage, match="map"):
        wire.check_body(MAP_AS_STRINGS, header_)


def test_every_valid_call_is_accepted_and_ends_where_the_parser_ends():
    for frame in seed_calls():
        assert wire.check_body(frame, wire.read_header(frame)) == parsed_bytes(frame) == len(frame)


def test_a_list_whose_element_type_differs_from_the_idl_is_malformed():
    # thriftpy2 would skip these elements by their wire type and see an empty list: safe, but a list<i32>
    # of strings is no call a client means, and refusing it keeps the walk one rule: containers as declared.
    body = header("detokenize") + field(15, 1) + struct.pack("!bi", 11, 1) + string(b"12") + b"\x00"
    with pytest.raises(wire.MalformedMessage, match="list element is string on the wire, i32 in the IDL"):
        wire.check_body(body, wire.read_header(body))


@pytest.mark.parametrize("body", [
    header("tokenize") + field(15, 1) + struct.pack("!bi", 11, 2) + string(b"a") + string(b"b") + b"\x00",
    header("generate") + field(12, 1) + field(13, 3) + struct.pack("!bbi", 11, 11, 1) + string(b"k") * 2
    + b"\x00\x00",
    header("health") + field(13, 9) + struct.pack("!bbi", 11, 15, 1) + string(b"k") + struct.pack("!bi", 8, 1)
    + struct.pack("!i", 5) + b"\x00",
    header("health") + field(12, 300) + field(14, 1) + struct.pack("!bi", 12, 2) + b"\x00\x00" + b"\x00\x00",
    # The class of the one make-fuzz finding: thriftpy2's pure-Python reader would read this list field by its
    # declaration; the Cython one, which the worker uses, skips it as the string it says it is.
    header("generate") + field(12, 1) + field(11, 3) + string(struct.pack("!bi", 12, 2**31 - 1)) + b"\x00\x00",
], ids=["field-of-another-type", "wrong-type-map-field", "unknown-map", "unknown-struct-of-sets",
        "string-for-a-list-field"])
def test_fields_thriftpy2_skips_are_walked_by_their_wire_types(body):
    """A known field of another type, or an unknown field: skipped by wire types, in step with the parser."""
    assert wire.check_body(body, wire.read_header(body)) == parsed_bytes(body) == len(body)


def test_type_codes_outside_the_binary_protocol_are_malformed():
    # thriftpy2 reads 18 (its BINARY) as a string, and skips 1, 9, 16 and 17 by reading nothing.
    for type_code in (1, 9, 16, 17, 18):
        body = header("tokenize") + field(type_code, 1) + string(b"x") + b"\x00"
        with pytest.raises(wire.MalformedMessage, match=f"unknown type code {type_code}"):
            wire.check_body(body, wire.read_header(body))


def test_a_fuzzer_finding_against_the_old_checker_stays_fixed():
    """Found by `python -m tests.wire_fuzz --seed 2` against the checker that walked by wire types alone (a
    4,933-byte generate call, cut down): logit_bias sent as a map<i32, string> of 512 empty strings. That
    checker walked 8 bytes an entry; thriftpy2 reads the declared double, 12, and ran 2,048 bytes past."""
    body = (header("generate") + field(12, 1) + field(12, 4) + field(13, 9) + struct.pack("!bbi", 8, 11, 512)
            + (struct.pack("!i", 0) + string(b"")) * 512 + b"\x00\x00\x00")
    assert parsed_bytes(body) > len(body)
    with pytest.raises(wire.MalformedMessage, match="map value is string on the wire, double in the IDL"):
        wire.check_body(body, wire.read_header(body))


def test_a_call_carries_a_bounded_number_of_declared_structs():
    """Each declared struct becomes a Python object in thriftpy2's parser: a 1 MiB frame of empty chat
    messages would be a million of them, seconds on the hub. Skipped (undeclared) structs do not count."""
    def chat(count: int) -> bytes:
        messages = [thrift.ChatMessage(role="user", content="")] * count
        return call("generate", thrift.Generator.generate_args(request=thrift.GenerateRequest(messages=messages)))

    at_the_limit = chat(wire.MAX_STRUCTS - 2)   # the request and its messages
    wire.check_body(at_the_limit, wire.read_header(at_the_limit))
    too_many = chat(wire.MAX_STRUCTS)
    with pytest.raises(wire.MalformedMessage, match=f"more than {wire.MAX_STRUCTS} structs"):
        wire.check_body(too_many, wire.read_header(too_many))
    empty_structs = (header("health") + field(15, 99) + b"\x0c" + struct.pack("!i", 100_000) + b"\x00" * 100_000
                     + b"\x00")
    wire.check_body(empty_structs, wire.read_header(empty_structs))   # an unknown field: skipped, not built
