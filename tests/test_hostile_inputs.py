"""The hostile-input table: what no well-behaved client sends, against one live worker (issue 11).

Every case must end in a typed answer (the IDL's exceptions, naming the field where there is one),
a TApplicationException, or a closed connection; after each the worker answers `health`, and at the
end its log holds no report from gevent's monitor of a hub blocked for 100 ms or more
(`--debug-blocking-ms 100`). Cases are grouped: framing, protocol, arguments, streams, auth, slow
and half-open clients. Each row is (name, action, expected outcome); an action takes the port and
returns its outcome as a short string, so the table reads as a specification.
"""

from __future__ import annotations

import math
import socket
import struct

import pytest
from thriftpy2.thrift import TApplicationException, TMessageType

from ringlm.idl import ringlm_thrift as thrift
from tests.server_helpers import (answers_health, closed_by_server, connect, frame, message, raw_connection,
                                  read_reply, running_worker, tiny_model_folder, wait_until)

MAX_FRAME = 65536
FRAME_S = 2.0
IDLE_S = 3.0
LIMITS = {"--max-frame-bytes": MAX_FRAME, "--frame-timeout-s": FRAME_S, "--idle-timeout-s": IDLE_S,
          "--max-open-streams": 3, "--max-tokens-limit": 300, "--max-stop-strings": 4, "--max-stop-length": 16,
          "--max-stop-token-ids": 4, "--max-session-length": 32, "--max-logit-bias": 8, "--max-messages": 3,
          "--max-request-id-length": 16, "--max-top-logprobs": 5, "--max-deadline-ms": 60_000}
BLOCKED = "appears to be blocked"   # what gevent's monitor thread writes for a stalled hub


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile") / "worker.log"
    flags = [str(part) for pair in LIMITS.items() for part in pair] + ["--debug-blocking-ms", "100"]
    with running_worker(tiny_model_folder(tmp_path_factory), log, *flags) as worker:
        worker.log_at_ready = len(worker.log())
        yield worker


# -- how an outcome is read

def closed_or_reply(sock: socket.socket, timeout_s: float = 10.0) -> str:
    """'closed', or the reply's outcome when the server answered instead."""
    sock.settimeout(timeout_s)
    try:
        reply = read_reply(sock)
    except (ConnectionResetError, TimeoutError) as error:
        return "closed" if isinstance(error, ConnectionResetError) else "timeout"
    return "closed" if reply is None else outcome_of_reply(*reply)


def outcome_of_reply(message_type: int, name: str, protocol) -> str:
    if message_type == TMessageType.EXCEPTION:
        error = TApplicationException()
        protocol.read_struct(error)
        return f"app:{error.type}"
    result = getattr(thrift.Generator, f"{name}_result")()
    protocol.read_struct(result)
    raised = [value for key, value in vars(result).items() if key != "success" and value is not None]
    return typed(raised[0]) if raised else "ok"


def typed(error: Exception) -> str:
    field = getattr(error, "field", None)
    return f"{type(error).__name__}:{field}" if field else type(error).__name__


def send_raw(data: bytes, then_close: bool = False):
    def action(port: int) -> str:
        sock = raw_connection(port)
        sock.sendall(data)
        if then_close:
            sock.close()
            return "closed"
        return closed_or_reply(sock, timeout_s=FRAME_S + IDLE_S + 5)
    return action


def call(method: str, *args):
    """A well-formed call with bad arguments through a real Thrift client: its typed outcome."""
    def action(port: int) -> str:
        client = connect(port)
        try:
            getattr(client, method)(*args)
            return "ok"
        except (thrift.InvalidRequest, thrift.Overloaded, thrift.Unauthorized, thrift.ModelError,
                thrift.Cancelled, thrift.DeadlineExceeded) as error:
            return typed(error)
        finally:
            client.close()
    return action


def generate(**fields):
    fields = {"prompt": "Hello there", "max_tokens": 4, "ignore_eos": True, **fields}
    return call("generate", thrift.GenerateRequest(**fields))


def sampled(**options):
    return generate(sampling=thrift.SamplingOptions(**options))


# -- raw encodings, for what the Thrift client would refuse to write

def header(method: str) -> bytes:
    return message(method)[:-1]


def field(type_code: int, field_id: int) -> bytes:
    return struct.pack("!bh", type_code, field_id)


def string(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def nested_structs(depth: int) -> bytes:
    return header("generate") + (field(12, 1) * depth) + b"\x00" * (depth + 1)


APP = {"protocol": f"app:{TApplicationException.PROTOCOL_ERROR}",
       "unknown": f"app:{TApplicationException.UNKNOWN_METHOD}"}
USER = thrift.ChatMessage(role="user", content="Hi")

CASES = [
    # framing: the connection is closed, nothing is allocated for a length
    ("length 2**31-1", send_raw(struct.pack("!i", 2**31 - 1) + b"\x80\x01"), "closed"),
    ("length past the frame limit", send_raw(struct.pack("!i", MAX_FRAME + 1) + b"\x80\x01"), "closed"),
    ("length 0", send_raw(struct.pack("!i", 0)), "closed"),
    ("negative length", send_raw(struct.pack("!i", -5)), "closed"),
    ("an HTTP request", send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "closed"),
    ("a TLS hello on the plain port", send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), "closed"),
    ("a frame of garbage", send_raw(frame(b"\xde\xad\xbe\xef" * 25)), "closed"),
    ("a frame too short for a header", send_raw(frame(b"\x80\x01")), "closed"),
    ("a non-strict message", send_raw(frame(b"\x00\x00\x00\x06health\x01\x00\x00\x00\x01\x00")), "closed"),
    ("a frame cut short, then a hang-up", send_raw(struct.pack("!i", 100) + b"\x80\x01\x00\x01", True), "closed"),
    ("half a length header, then a hang-up", send_raw(b"\x00\x00", True), "closed"),
    ("a frame that stops arriving", send_raw(struct.pack("!i", 100) + b"\x80\x01"), "closed"),
    # protocol: a framed message that is malformed gets an application error
    ("an unknown method", send_raw(frame(message("format_disk"))), APP["unknown"]),
    ("a string length past the frame", send_raw(frame(header("tokenize") + field(11, 1) + struct.pack("!i", 9999)
                                                      + b"x\x00")), APP["protocol"]),
    ("a negative string length", send_raw(frame(header("tokenize") + field(11, 1) + struct.pack("!i", -1)
                                                + b"\x00")), APP["protocol"]),
    ("an unknown type code", send_raw(frame(header("tokenize") + field(99, 1) + b"\x00")), APP["protocol"]),
    ("structs nested 100 deep", send_raw(frame(nested_structs(100))), APP["protocol"]),
    ("a list claiming 2**31-1 elements", send_raw(frame(header("detokenize") + field(15, 1) + b"\x08"
                                                        + struct.pack("!i", 2**31 - 1) + b"\x00")), APP["protocol"]),
    ("a map whose element types differ from the IDL", send_raw(frame(
        header("generate") + field(12, 1) + field(12, 4) + field(13, 9) + b"\x0b\x0b" + struct.pack("!i", 1)
        + string(b"a" * 8) + string(b"b" * 8) + b"\x00\x00\x00")), APP["protocol"]),
    ("60,000 empty chat messages (a parse of seconds)", send_raw(frame(
        header("generate") + field(12, 1) + field(15, 3) + b"\x0c" + struct.pack("!i", 60_000) + b"\x00" * 60_000
        + b"\x00\x00")), APP["protocol"]),
    ("a string that is not UTF-8", send_raw(frame(header("tokenize") + field(11, 1) + string(b"\xff\xfe")
                                                  + b"\x00")), APP["protocol"]),
    ("a field of the wrong type", send_raw(frame(header("tokenize") + field(8, 1) + struct.pack("!i", 5)
                                                 + b"\x00")), "InvalidRequest:text"),
    # arguments: each limit and each wrong value, answered by name
    ("no request at all", send_raw(frame(message("generate"))), "InvalidRequest:request"),
    ("an empty prompt", generate(prompt=""), "InvalidRequest:prompt"),
    ("prompt and messages both", generate(messages=[USER]), "InvalidRequest:prompt"),
    ("prompt ids outside the vocabulary", generate(prompt=None, prompt_ids=[10**6]), "InvalidRequest:prompt"),
    ("negative prompt ids", generate(prompt=None, prompt_ids=[-1]), "InvalidRequest:prompt"),
    ("max_tokens 0", generate(max_tokens=0), "InvalidRequest:max_tokens"),
    ("max_tokens past the limit", generate(max_tokens=301), "InvalidRequest:max_tokens"),
    ("resume ids reaching max_tokens", generate(resume_ids=[5] * 4), "InvalidRequest:resume_ids"),
    ("temperature NaN", sampled(temperature=math.nan), "InvalidRequest:sampling.temperature"),
    ("temperature -1", sampled(temperature=-1.0), "InvalidRequest:sampling.temperature"),
    ("top_p 0", sampled(top_p=0.0), "InvalidRequest:sampling.top_p"),
    ("top_k -1", sampled(top_k=-1), "InvalidRequest:sampling.top_k"),
    ("min_p 2", sampled(min_p=2.0), "InvalidRequest:sampling.min_p"),
    ("repetition_penalty 1e39", sampled(repetition_penalty=1e39), "InvalidRequest:sampling.repetition_penalty"),
    ("presence_penalty inf", sampled(presence_penalty=math.inf), "InvalidRequest:sampling.presence_penalty"),
    ("a negative seed", sampled(seed=-1), "InvalidRequest:sampling.seed"),
    ("logit_bias past its limit", sampled(logit_bias={i: 1.0 for i in range(9)}), "InvalidRequest:sampling.logit_bias"),
    ("logit_bias outside the vocabulary", sampled(logit_bias={10**6: 1.0}), "InvalidRequest:sampling.logit_bias"),
    ("a logit_bias of 1e9", sampled(logit_bias={5: 1e9}), "InvalidRequest:sampling.logit_bias"),
    ("too many stop strings", generate(stop=["a"] * 5), "InvalidRequest:stop"),
    ("a stop string too long", generate(stop=["x" * 17]), "InvalidRequest:stop"),
    ("too many stop token ids", generate(stop_token_ids=[5] * 5), "InvalidRequest:stop_token_ids"),
    ("stop token ids outside the vocabulary", generate(stop_token_ids=[10**6]), "InvalidRequest:stop_token_ids"),
    ("a session key too long", generate(session="s" * 33), "InvalidRequest:session"),
    ("a request id too long", generate(request_id="r" * 17), "InvalidRequest:request_id"),
    ("an empty request id", generate(request_id=""), "InvalidRequest:request_id"),
    ("an unknown priority", generate(priority=99), "InvalidRequest:priority"),
    ("deadline_ms 0", generate(deadline_ms=0), "InvalidRequest:deadline_ms"),
    ("deadline_ms past the limit", generate(deadline_ms=60_001), "InvalidRequest:deadline_ms"),
    ("top_logprobs past the limit", generate(top_logprobs=6), "InvalidRequest:top_logprobs"),
    ("no messages", generate(prompt=None, messages=[]), "InvalidRequest:messages"),
    ("more messages than the limit", generate(prompt=None, messages=[USER] * 4), "InvalidRequest:messages"),
    ("tokenize without text", call("tokenize", None, False, False), "InvalidRequest:text"),
    ("detokenize ids outside the vocabulary", call("detokenize", [10**6], False), "InvalidRequest:token_ids"),
    ("detokenize negative ids", call("detokenize", [-1], False), "InvalidRequest:token_ids"),
    ("cancel without an id", call("cancel", None), "InvalidRequest:request_id"),
    ("apply_chat_template of nothing", call("apply_chat_template", [], True), "InvalidRequest:messages"),
    # streams
    ("next_chunk of a stream that does not exist", call("next_chunk", "no-such-stream", 0), "InvalidRequest:stream_id"),
    ("next_chunk with a negative wait", call("next_chunk", "x", -1), "InvalidRequest:wait_ms"),
]


@pytest.mark.parametrize("name, action, expected", CASES, ids=[case[0] for case in CASES])
def test_hostile_input_gets_a_typed_answer_or_a_closed_connection(server, name, action, expected):
    assert action(server.port) == expected
    assert server.process.poll() is None, server.log()
    wait_until(lambda: answers_health(server.port), timeout_s=30, what="the worker to answer health")


def test_another_connections_stream_cannot_be_read(server):
    owner, thief = connect(server.port), connect(server.port)
    stream_id = owner.open_stream(thrift.GenerateRequest(prompt="Hi", max_tokens=4, ignore_eos=True))
    assert call("next_chunk", stream_id, 0)(server.port) == "InvalidRequest:stream_id"
    while not owner.next_chunk(stream_id, 5000).done:
        pass
    owner.close()
    thief.close()


def test_streams_past_the_limit_are_overloaded(server):
    client = connect(server.port)
    streams = [client.open_stream(thrift.GenerateRequest(prompt="Hi", max_tokens=300, ignore_eos=True))
               for _ in range(3)]
    with pytest.raises(thrift.Overloaded) as error:
        client.open_stream(thrift.GenerateRequest(prompt="Hi", max_tokens=4))
    assert error.value.retry_after_ms > 0
    for stream_id in streams:
        client.cancel(stream_id)
    client.close()


def test_a_silent_connection_is_closed_after_the_idle_timeout(server):
    assert closed_by_server(raw_connection(server.port), timeout_s=IDLE_S + 10)


def test_a_client_that_vanishes_mid_generate_is_cancelled(server):
    sock = raw_connection(server.port)
    sock.sendall(frame(message("generate", thrift.Generator.generate_args(
        request=thrift.GenerateRequest(prompt="Hi", max_tokens=300, ignore_eos=True)))))
    client = connect(server.port)
    wait_until(lambda: client.status().running == 1, what="the generation to start")
    sock.close()
    wait_until(lambda: client.status().running == 0, timeout_s=60, what="the generation to be cancelled")
    client.close()


def test_the_hub_never_stalled_and_the_worker_lives(server):
    """Run last (pytest keeps file order): after every case above, no report of a hub blocked >= 100 ms."""
    assert server.process.poll() is None
    assert len(CASES) + 5 >= 50
    assert BLOCKED not in server.log()[server.log_at_ready:], server.log()[server.log_at_ready:][-3000:]
