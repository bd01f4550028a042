"""Wire check per frame: the native checker against the pure-Python one it replaced, on worst-case 1 MiB frames.

The worker checks every frame on the gevent hub before authentication, so the
cost of the worst frame the frame limit (1 MiB by default) lets through is
what one client can take from all the others. Each shape packs a full
frame with the smallest values a walk has to visit one by one. The old
checker is main's server/wire.py before issue 11, read from git; "parse" is
thriftpy2's Cython parser reading the same frame afterwards (only when the
checker accepted it and the call needs no authentication or is made after
it), for scale. Each figure is the median of several rounds of CPU time
(`time.process_time`: on a shared machine wall time mostly measures the
neighbours; on an idle one the two agree).
"""

from __future__ import annotations

import importlib.util
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TProcessor
from thriftpy2.transport.memory import TCyMemoryBuffer

from ringlm.idl import ringlm_thrift as thrift
from ringlm.server import wire
from ringlm.server.worker import PRE_AUTH_MAX_FRAME_BYTES

ROUNDS = 5
FRAME_BYTES = 1 << 20                # the worker's default --max-frame-bytes
OLD_CHECKER = "0d16be7:server/wire.py"   # main just before issue 11
ROOT = Path(__file__).resolve().parent.parent


def header(method: str) -> bytes:
    protocol = TCyBinaryProtocol(TCyMemoryBuffer())
    protocol.write_message_begin(method, 1, 1)
    return protocol.trans.getvalue()


def field(type_code: int, field_id: int) -> bytes:
    return struct.pack("!bh", type_code, field_id)


def filled(prefix: bytes, element: bytes, suffix: bytes, count_at: int) -> bytes:
    """prefix + as many elements as fit in FRAME_BYTES + suffix, with the element count written at count_at."""
    count = (FRAME_BYTES - len(prefix) - len(suffix)) // len(element)
    frame = bytearray(prefix + element * count + suffix)
    struct.pack_into("!i", frame, count_at, count)
    return bytes(frame)


def shapes() -> dict[str, bytes]:
    def list_field(method: str, field_id: int, element_type: int) -> bytes:
        return header(method) + field(15, field_id) + struct.pack("!bi", element_type, 0)

    chat = list_field("apply_chat_template", 1, 12)
    stop = header("generate") + field(12, 1) + field(15, 6) + struct.pack("!bi", 11, 0)
    unknown = list_field("health", 9, 12)
    nested = list_field("health", 9, 15)
    ids = list_field("detokenize", 1, 8)
    return {
        "apply_chat_template: empty ChatMessage structs": filled(chat, b"\x00", b"\x00", len(chat) - 4),
        "generate: empty stop strings": filled(stop, struct.pack("!i", 0), b"\x00\x00", len(stop) - 4),
        "health: an unknown field, a list of empty structs": filled(unknown, b"\x00", b"\x00", len(unknown) - 4),
        "health: an unknown field, a list of empty lists": filled(nested, struct.pack("!bi", 8, 0), b"\x00",
                                                                  len(nested) - 4),
        "detokenize: i32 token ids": filled(ids, struct.pack("!i", 1), b"\x00", len(ids) - 4),
        "tokenize: a 40-byte text (typical)": header("tokenize")[:-1] + field(11, 1)
        + struct.pack("!i", 40) + b"x" * 40 + b"\x00",
    }


def old_checker():
    """The pure-Python check_body(frame, start) of main before issue 11."""
    source = subprocess.run(["git", "show", OLD_CHECKER], cwd=ROOT, check=True, capture_output=True).stdout
    with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("wire_before_issue_11", file.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    Path(file.name).unlink()
    return module.check_body


def microseconds(function, frame: bytes) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.process_time()
        function(frame)
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e6


def parse(frame: bytes) -> None:
    TProcessor(thrift.Generator, None).process_in(TCyBinaryProtocol(TCyMemoryBuffer(frame)))


def main() -> str:
    old = old_checker()
    lines = [f"Frames of up to {FRAME_BYTES:,} bytes, median of {ROUNDS} rounds, microseconds of CPU per frame.", "",
             "| frame | bytes | old checker (Python) | new checker (native) | faster | thriftpy2 parse after it |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, frame in shapes().items():
        message = wire.read_header(frame)
        wire.check_body(frame, message)   # every shape is one the new checker accepts
        before = microseconds(lambda f: old(f, message.body_start), frame)
        after = microseconds(lambda f: wire.check_body(f, message), frame)
        parsed = microseconds(parse, frame)
        lines.append(f"| {name} | {len(frame):,} | {before:,.0f} | {after:,.1f} | {before / after:,.0f}x "
                     f"| {parsed:,.0f} |")
    lines += ["", f"Before authentication a worker that requires a token reads only `health`, `ready` and `authenticate`, "
              f"in frames of at most {PRE_AUTH_MAX_FRAME_BYTES:,} bytes, and refuses every other call by its name, unread."]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
