"""Differential fuzzing of the wire checker against thriftpy2's Cython parser.

The property: whatever `wire` accepts, thriftpy2's processor parses from a
TCyMemoryBuffer without reading past the frame and stops exactly where the
checker says the arguments end, raising nothing; and the checker raises
nothing but MalformedMessage. The frames are valid calls of every
Generator method, serialized by thriftpy2, mutated where their structure puts
meaning (type codes, lengths, counts) and blindly (bytes, truncation,
insertion, deletion, splicing two calls), plus random bytes after a header.

    python -m tests.wire_fuzz --cases 5000 --seed 1      # seeded (tests/test_wire_fuzz.py runs one)
    python -m tests.wire_fuzz --atheris CORPUS -max_total_time=3600   # coverage-guided (`make fuzz`)

A read past the frame shows as guard bytes consumed. A read far past it
(gigabytes, or 2**31 turns of a loop) would take the process down instead,
so the seeded test runs this module in a subprocess under a memory limit,
and each frame is written to --current before it is parsed: after a crash
that file holds the culprit.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TMessageType, TProcessor
from thriftpy2.transport.memory import TCyMemoryBuffer

from ringlm.idl import ringlm_thrift as thrift
from ringlm.server import wire

# Reading past the end of a TCyMemoryBuffer does not raise: it yields what is left, then nothing. Zeros
# after the frame make such a read visible (they are consumed) and mostly harmless (zero lengths, STOP).
GUARD = bytes(4096)
PROCESSOR = TProcessor(thrift.Generator, None)   # process_in only reads: no handler is called
TYPE_CODES = [*range(20), 0x7F, 0x80, 0xFF]
INTERESTING_I32 = [0, 1, 2, 3, 4, 7, 8, 12, 15, 16, 255, 256, 4096, 65535, 2**24, 2**31 - 1, -1, -2, -2**31]


class Finding(AssertionError):
    """The checker and the parser disagree on a frame."""

    def __init__(self, message: str, frame: bytes):
        super().__init__(f"{message}\nframe: {frame.hex()}")
        self.frame = frame


def encode_call(method: str, args=None, seqid: int = 1) -> bytes:
    protocol = TCyBinaryProtocol(TCyMemoryBuffer())
    protocol.write_message_begin(method, TMessageType.CALL, seqid)
    protocol.write_struct(args if args is not None else getattr(thrift.Generator, f"{method}_args")())
    return protocol.trans.getvalue()


def seed_calls() -> list[bytes]:
    """Valid calls of every method of the service, with every field set and with none."""
    messages = [thrift.ChatMessage(role="system", content="Be brief."), thrift.ChatMessage(role="user", content="Hi")]
    sampling = thrift.SamplingOptions(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                      presence_penalty=0.5, frequency_penalty=0.25, seed=7,
                                      logit_bias={5: 1.5, 9: -2.0, 12: 0.0})
    full = thrift.GenerateRequest(
        prompt="Hello", prompt_ids=[1, 2, 3], messages=messages, sampling=sampling, max_tokens=16,
        stop=["\n", "END"], stop_token_ids=[2, 7], priority=thrift.Priority.HIGH, deadline_ms=1000,
        request_id="r-1", session="s-1", logprobs=True, top_logprobs=3, ignore_eos=True,
        add_generation_prompt=False, resume_ids=[4, 5])
    arguments = {
        "generate": [{"request": full}, {"request": thrift.GenerateRequest(prompt="x")}],
        "open_stream": [{"request": full}, {"request": thrift.GenerateRequest(messages=messages)}],
        "next_chunk": [{"stream_id": "s-1", "wait_ms": 100}],
        "cancel": [{"request_id": "r-1"}],
        "tokenize": [{"text": "héllo <|im_end|>", "add_special_tokens": True, "parse_special": False}],
        "detokenize": [{"token_ids": [1, 2, 300], "skip_special_tokens": True}],
        "apply_chat_template": [{"messages": messages, "add_generation_prompt": True}],
        "status": [{}],
        "health": [{}],
        "ready": [{}],
        "authenticate": [{"token": "s3cret"}],
    }
    assert set(arguments) == wire.METHODS, "a method of the service has no seed call"
    calls = []
    for method, variants in arguments.items():
        args_type = getattr(thrift.Generator, f"{method}_args")
        calls.append(encode_call(method))
        calls += [encode_call(method, args_type(**fields)) for fields in variants]
    return calls


class Landmarks(NamedTuple):
    """Where a call keeps the bytes that mutations should hit (read by the wire types; what cannot be
    read is left out)."""

    types: list[int]                               # type codes: of fields, elements, keys, values
    counts: list[int]                              # i32 lengths and counts
    containers: list[tuple[tuple[int, ...], int]]  # each container's element type codes and its count


def landmarks(frame: bytes) -> Landmarks:
    types, counts, containers = [], [], []

    def i32(pos: int) -> int:
        counts.append(pos)
        return struct.unpack_from("!i", frame, pos)[0]

    def value(pos: int, type_code: int) -> int:
        fixed = {2: 1, 3: 1, 4: 8, 6: 2, 8: 4, 10: 8}.get(type_code)
        if fixed:
            return pos + fixed
        if type_code == 11:
            return pos + 4 + max(i32(pos), 0)
        if type_code == 12:
            while frame[pos] != 0:
                types.append(pos)
                pos = value(pos + 3, frame[pos])
            types.append(pos)
            return pos + 1
        if type_code in (14, 15):
            marks, count_at = (pos,), pos + 1
        elif type_code == 13:
            marks, count_at = (pos, pos + 1), pos + 2
        else:
            raise ValueError(type_code)
        types.extend(marks)
        containers.append((marks, count_at))
        count, pos = i32(count_at), count_at + 4
        element_types = [frame[mark] for mark in marks]
        for _ in range(min(count, len(frame))):
            for element_type in element_types:
                pos = value(pos, element_type)
        return pos

    try:
        value(wire.read_header(frame).body_start, 12)
    except (IndexError, struct.error, ValueError, wire.MalformedMessage):
        pass
    return Landmarks(types, counts, containers)


class Mutator:
    """Seeded mutations of the seed calls."""

    def __init__(self, seeds: list[bytes], rng: random.Random):
        self.seeds = seeds
        self.marks = [landmarks(seed) for seed in seeds]
        self.rng = rng

    def frame(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.05:   # a valid header before random bytes
            method = rng.choice(sorted(wire.METHODS))
            return encode_call(method)[:-1] + rng.randbytes(rng.randrange(64))
        index = rng.randrange(len(self.seeds))
        frame = bytearray(self.seeds[index])
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            frame = self.mutate(frame, self.marks[index])
        return bytes(frame)

    def mutate(self, frame: bytearray, marks: Landmarks) -> bytearray:
        rng = self.rng
        choice = rng.randrange(10)
        if choice == 0 and marks.types:  # a type code: of a field, an element, a key or a value
            pos = rng.choice(marks.types)
            if pos < len(frame):
                frame[pos] = rng.choice(TYPE_CODES)
        elif choice == 1 and marks.counts:   # a length or a count
            pos = rng.choice(marks.counts)
            if pos + 4 <= len(frame):
                candidates = INTERESTING_I32 + [len(frame) - pos, len(frame) - pos - 4, rng.randrange(-99, 99)]
                struct.pack_into("!i", frame, pos, rng.choice(candidates))
        elif choice == 2 and frame:      # a byte
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        elif choice == 3 and frame:      # cut short
            del frame[rng.randrange(len(frame)):]
        elif choice == 4:                # bytes inserted: random, or a piece of another call
            pos = rng.randrange(len(frame) + 1)
            frame[pos:pos] = rng.randbytes(rng.randrange(1, 9)) if rng.random() < 0.5 else self.piece()
        elif choice == 5 and frame:      # bytes removed
            start = rng.randrange(len(frame))
            del frame[start:start + rng.randrange(1, 9)]
        elif choice == 6:                # this call's start, another's end
            other = rng.choice(self.seeds)
            frame = frame[:rng.randrange(len(frame) + 1)] + other[rng.randrange(len(other) + 1):]
        elif choice == 7 and frame:      # a piece repeated
            start = rng.randrange(len(frame))
            piece = frame[start:start + rng.randrange(1, 32)]
            frame[start:start] = piece * rng.randrange(1, 4)
        elif choice == 8 and marks.counts:   # a count made large, with as many elements' worth of bytes
            self.resize(frame, rng.choice(marks.counts))
        elif choice == 9 and marks.containers:   # a container's element types changed, and its size
            positions, count_at = rng.choice(marks.containers)
            code = 11 if rng.random() < 0.5 else rng.choice(TYPE_CODES)   # strings: read by the IDL in maps
            for pos in positions:
                if pos < len(frame) and rng.random() < 0.8:
                    frame[pos] = code
            if rng.random() < 0.7:
                self.resize(frame, count_at)
        return frame

    def resize(self, frame: bytearray, count_at: int) -> None:
        """A count made larger, followed by as many zeroed elements of a likely size."""
        if count_at + 4 <= len(frame):
            count = self.rng.randrange(1, 2000)
            struct.pack_into("!i", frame, count_at, count)
            frame[count_at + 4:count_at + 4] = bytes(self.rng.choice((1, 4, 8, 12, 16))) * count

    def piece(self) -> bytes:
        seed = self.rng.choice(self.seeds)
        start = self.rng.randrange(len(seed))
        return seed[start:start + self.rng.randrange(1, 24)]


def check(frame: bytes, before_parse=None) -> str:
    """The verdict on one frame ("header", "unknown method", "rejected" or "accepted");
    raises Finding where the checker and the parser disagree."""
    try:
        header = wire.read_header(frame)
    except wire.MalformedMessage:
        return "header"
    if header.name not in wire.METHODS:
        return "unknown method"   # the worker answers these by name, reading nothing else
    try:
        end = wire.check_body(frame, header)
    except wire.MalformedMessage:
        return "rejected"
    except Exception as error:
        raise Finding(f"the checker raised {error!r} instead of MalformedMessage", frame) from error
    if before_parse is not None:
        before_parse(frame)
    # Not strict_decode as the worker parses: that raises at a string that is not UTF-8, and thriftpy2
    # empties the buffer when read_struct raises, which hides how far it read. Decoding reads no bytes,
    # so the worker's strict parse reads a prefix of what this one does.
    protocol = TCyBinaryProtocol(TCyMemoryBuffer(frame + GUARD))
    try:
        PROCESSOR.process_in(protocol)
    except Exception as error:
        raise Finding(f"thriftpy2 raised {error!r} on a frame the checker accepted", frame) from error
    consumed = len(frame) + len(GUARD) - len(protocol.trans.getvalue())
    if consumed > len(frame):
        raise Finding(f"thriftpy2 read {consumed - len(frame)} bytes past a frame of {len(frame)} that the "
                      f"checker accepted", frame)
    if consumed != end:
        raise Finding(f"thriftpy2 stopped at byte {consumed}, the checker at {end}", frame)
    return "accepted"


def run(cases: int, seed: int, current: Path | None = None) -> Counter:
    """`cases` seeded cases (every seed call first); the verdicts counted. Raises the first Finding."""
    seeds = seed_calls()
    mutator = Mutator(seeds, random.Random(seed))
    remember = None
    if current is not None:
        handle = current.open("w")

        def remember(frame: bytes) -> None:
            handle.seek(0)
            handle.write(frame.hex())
            handle.truncate()
            handle.flush()

    verdicts = Counter(check(frame, remember) for frame in seeds)
    assert verdicts["accepted"] == len(seeds), verdicts
    for _ in range(cases - len(seeds)):
        verdicts[check(mutator.frame(), remember)] += 1
    return verdicts


def fuzz_with_atheris(argv: list[str]) -> None:
    """libFuzzer's loop over `check`. The checker and thriftpy2's Cython reader are native code built
    without coverage instrumentation, so coverage comes from Python run on each input only to be
    measured: `landmarks` (a walk by wire types, bounded by the frame) on every input, and thriftpy2's
    pure-Python reader on the inputs the checker accepts. That reader is the Cython one's twin but for
    one rule (found by this fuzzer: it reads a known field sent as a string by the field's declared
    type, where the Cython reader skips it), so on an accepted frame it may still fail, or loop over
    skips that read nothing: it runs with its skips counted and its errors ignored."""
    import atheris
    from thriftpy2.protocol import binary
    from thriftpy2.transport.memory import TMemoryBuffer

    class ProbeStopped(Exception):
        pass

    # Only these are instrumented: atheris.instrument_all() ran about 40 inputs a second here, this about 700.
    binary.read_struct = atheris.instrument_func(binary.read_struct)
    binary.read_val = atheris.instrument_func(binary.read_val)
    skip = atheris.instrument_func(binary.skip)
    skips_left = 0

    def bounded_skip(*args):
        nonlocal skips_left
        skips_left -= 1
        if skips_left < 0:
            raise ProbeStopped
        return skip(*args)

    binary.skip = bounded_skip
    walk = atheris.instrument_func(landmarks)
    seeds = seed_calls()

    def target(data: bytes) -> None:
        nonlocal skips_left
        walk(data)
        if check(data) == "accepted":
            skips_left = 2 * len(data)   # every skip the Cython reader made read a byte at least
            try:
                PROCESSOR.process_in(binary.TBinaryProtocol(TMemoryBuffer(data)))
            except Exception:   # ProbeStopped, or the pure-Python reader's own reading past the frame
                pass

    mutator = Mutator(seeds, random.Random())

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        if seed % 2:
            return atheris.Mutate(data, max_size)
        mutator.rng.seed(seed)
        frame, marks = bytearray(data), landmarks(data)
        for _ in range(mutator.rng.choice((1, 2, 3))):
            frame = mutator.mutate(frame, marks)
        return bytes(frame[:max_size])

    corpus = next((Path(arg) for arg in argv[1:] if not arg.startswith("-")), None)
    if corpus is not None and not corpus.is_file():   # a file is one input to run again, not a corpus
        corpus.mkdir(parents=True, exist_ok=True)
        for index, seed in enumerate(seeds):
            (corpus / f"seed-{index:02d}").write_bytes(seed)
    atheris.Setup(argv, target, custom_mutator=mutate)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if "--atheris" in argv:
        fuzz_with_atheris([arg for arg in argv if arg != "--atheris"])
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.wire_fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--current", type=Path, help="write each frame here before parsing it")
    options = parser.parse_args(argv[1:])
    try:
        verdicts = run(options.cases, options.seed, options.current)
    except Finding as finding:
        print(f"FINDING {finding}", flush=True)
        return 1
    print(" ".join(f"{verdict}={count}" for verdict, count in sorted(verdicts.items())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
