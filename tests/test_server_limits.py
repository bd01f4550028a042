"""Every limit and every kind of bad input: each gets a typed error or a closed connection, and the server stays up.

One worker with small limits serves the whole module; raw sockets send what
no well-behaved client would.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time

import pytest
from thriftpy2.thrift import TApplicationException, TMessageType

from ringlm.idl import ringlm_thrift as thrift
from tests.server_helpers import (answers_health, closed_by_server, connect, frame, message, raw_connection,
                                  read_reply, running_worker, tiny_model_folder, wait_until)

MAX_FRAME = 65536
MAX_CONNECTIONS = 6
IDLE_S = 2.0
FRAME_S = 2.0
MAX_STREAMS = 3
MAX_TOKENS = 300
MAX_STOP_STRINGS = 4
MAX_MESSAGES = 3
MAX_TOP_LOGPROBS = 5
MAX_STOP_TOKEN_IDS = 3
MAX_SESSION = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("limits") / "worker.log"
    flags = ["--max-frame-bytes", str(MAX_FRAME), "--max-connections", str(MAX_CONNECTIONS),
             "--idle-timeout-s", str(IDLE_S), "--frame-timeout-s", str(FRAME_S),
             "--max-open-streams", str(MAX_STREAMS), "--max-tokens-limit", str(MAX_TOKENS),
             "--max-stop-strings", str(MAX_STOP_STRINGS), "--max-messages", str(MAX_MESSAGES),
             "--max-top-logprobs", str(MAX_TOP_LOGPROBS), "--max-stop-token-ids", str(MAX_STOP_TOKEN_IDS),
             "--max-session-length", str(MAX_SESSION)]
    with running_worker(tiny_model_folder(tmp_path_factory), log, *flags) as worker:
        yield worker


@pytest.fixture
def client(server):
    client = connect(server.port)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def server_still_up(server):
    """After every test: the worker process lives and answers. Answers, eventually: a test that filled
    the connection limit has just closed its sockets, and the server may not have seen those closes
    yet, so a connection made at once can still be one too many (closed at once, by design)."""
    yield
    assert server.process.poll() is None, server.log()
    wait_until(lambda: answers_health(server.port), timeout_s=30, what="the worker to answer health")
    assert server.process.poll() is None, server.log()


def call_raw(sock: socket.socket, body: bytes):
    """Send one framed message; the reply's result struct or TApplicationException."""
    sock.sendall(frame(body))
    reply = read_reply(sock)
    assert reply is not None, "the server closed the connection instead of replying"
    message_type, name, protocol = reply
    if message_type == TMessageType.EXCEPTION:
        error = TApplicationException()
        protocol.read_struct(error)
        return error
    result = getattr(thrift.Generator, f"{name}_result")()
    protocol.read_struct(result)
    return result


def header(method: str, seqid: int = 1) -> bytes:
    """A message header without its argument struct (for arguments written by hand)."""
    return message(method, seqid=seqid)[:-1]


def field(type_code: int, field_id: int) -> bytes:
    return struct.pack("!bh", type_code, field_id)


def string(text: bytes) -> bytes:
    return struct.pack("!i", len(text)) + text


def generate_request(**fields) -> thrift.GenerateRequest:
    fields.setdefault("prompt", "Hello there")
    fields.setdefault("max_tokens", 8)
    fields.setdefault("ignore_eos", True)
    return thrift.GenerateRequest(**fields)


# -- frames

@pytest.mark.parametrize("length", [2**31 - 1, MAX_FRAME + 1, 0, -1, -2**31])
def test_a_frame_length_out_of_bounds_closes_the_connection_before_reading_the_body(server, length):
    rss = server.rss_bytes()
    sock = raw_connection(server.port)
    sock.sendall(struct.pack("!i", length) + b"\x80\x01\x00\x01")
    assert closed_by_server(sock, timeout_s=5)
    assert server.rss_bytes() - rss < 64 << 20   # a 2 GB header did not become a 2 GB buffer


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                                     frame(b"\xde\xad\xbe\xef" * 25), frame(b"\x80\x01")])
def test_garbage_bytes_close_the_connection(server, garbage):
    sock = raw_connection(server.port)
    sock.sendall(garbage)
    assert closed_by_server(sock, timeout_s=5)


def test_a_frame_cut_short_by_a_hang_up_leaves_the_server_up(server):
    sock = raw_connection(server.port)
    body = message("health")
    sock.sendall(struct.pack("!i", len(body) + 50) + body)
    sock.close()


def test_a_frame_that_stops_arriving_is_dropped_after_the_frame_timeout(server):
    sock = raw_connection(server.port)
    sock.sendall(struct.pack("!i", 100) + b"\x80\x01")
    assert closed_by_server(sock, timeout_s=FRAME_S + 5)


def test_a_client_sending_one_byte_a_second_is_dropped(server):
    data = frame(message("tokenize", thrift.Generator.tokenize_args(text="x" * 200)))
    sock = raw_connection(server.port)
    started = time.monotonic()
    with pytest.raises(OSError):
        for byte in data:
            sock.sendall(bytes([byte]))
            if closed_by_server(sock, timeout_s=1.0):
                raise ConnectionResetError("closed by the server")
    assert time.monotonic() - started < len(data) / 2   # dropped long before the frame was complete


def test_an_idle_connection_is_closed_after_the_idle_timeout(server, client):
    sock = raw_connection(server.port)
    assert call_raw(sock, message("health")).success is True
    assert closed_by_server(sock, timeout_s=IDLE_S + 5)


def test_connections_past_the_limit_are_closed_at_once_and_served_again_after(server, client):
    open_now = client.status().connections
    held = [raw_connection(server.port) for _ in range(MAX_CONNECTIONS - open_now)]
    for sock in held:
        assert call_raw(sock, message("health")).success is True
    extra = raw_connection(server.port)
    assert closed_by_server(extra, timeout_s=2)
    held.pop().close()
    wait_until(lambda: client.status().connections < MAX_CONNECTIONS, what="a connection to free up")
    again = raw_connection(server.port)
    assert call_raw(again, message("health")).success is True
    for sock in [again, *held]:
        sock.close()


# -- messages

def test_an_unknown_method_gets_unknown_method(server):
    error = call_raw(raw_connection(server.port), message("format_disk"))
    assert isinstance(error, TApplicationException)
    assert error.type == TApplicationException.UNKNOWN_METHOD


def test_an_unknown_method_is_answered_by_name_with_its_arguments_unread(server):
    error = call_raw(raw_connection(server.port), header("format_disk") + field(15, 1) + b"\x0c\x7f")
    assert isinstance(error, TApplicationException)
    assert error.type == TApplicationException.UNKNOWN_METHOD and "format_disk" in error.message


def test_a_message_cut_short_inside_its_frame_gets_a_protocol_error_and_the_connection_goes_on(server):
    sock = raw_connection(server.port)
    whole = message("tokenize", thrift.Generator.tokenize_args(text="hello", add_special_tokens=False))
    error = call_raw(sock, whole[:-6])
    assert isinstance(error, TApplicationException) and error.type == TApplicationException.PROTOCOL_ERROR
    assert call_raw(sock, message("health")).success is True


@pytest.mark.parametrize("body", [
    header("tokenize") + field(11, 1) + struct.pack("!i", 1_000_000) + b"hello\x00",     # string past the frame
    header("tokenize") + field(11, 1) + struct.pack("!i", -5) + b"\x00",                  # negative length
    header("detokenize") + field(15, 1) + struct.pack("!bi", 8, 2**31 - 1) + b"\x00",     # i32 list past the frame
    header("apply_chat_template") + field(15, 1) + struct.pack("!bi", 12, 2**31 - 1) + b"\x00",  # struct list
    header("tokenize") + field(1, 1) + b"\x00",                                            # unknown type code
    header("tokenize") + (field(12, 1)) * 40 + b"\x00" * 41,                               # nested too deep
    # logit_bias (map<i32, double>) sent as map<string, string>: thriftpy2 reads the declared types and then
    # a field hidden in the "string", whose length runs past the frame (2**31 - 1 would be gigabytes).
    header("generate") + field(12, 1) + field(12, 4) + field(13, 9) + struct.pack("!bbi", 11, 11, 1)
    + string(bytes(8) + field(11, 99) + struct.pack("!i", 200)) + string(b"") + b"\x00\x00\x00",
], ids=["string", "negative-length", "i32-list", "struct-list", "type-code", "depth", "map-declared-types"])
def test_lengths_that_do_not_fit_the_frame_get_a_protocol_error(server, body):
    error = call_raw(raw_connection(server.port), body)
    assert isinstance(error, TApplicationException)
    assert error.type == TApplicationException.PROTOCOL_ERROR


def test_a_field_of_the_wrong_type_is_an_invalid_request(server):
    body = header("tokenize") + field(8, 1) + struct.pack("!i", 42) + b"\x00"   # text sent as an i32
    result = call_raw(raw_connection(server.port), body)
    assert result.invalid.field == "text"
    body = header("generate") + field(12, 1) + field(8, 1) + struct.pack("!i", 42) + b"\x00\x00"
    result = call_raw(raw_connection(server.port), body)
    assert result.invalid.field == "prompt"


def test_invalid_utf8_in_a_string_gets_a_protocol_error(server):
    body = header("tokenize") + field(11, 1) + string(b"caf\xc3 \xff\xfe") + b"\x00"
    error = call_raw(raw_connection(server.port), body)
    assert isinstance(error, TApplicationException) and error.type == TApplicationException.PROTOCOL_ERROR
    assert "UTF-8" in error.message
    body = header("generate") + field(12, 1) + field(11, 1) + string(b"\xed\xa0\x80") + b"\x00\x00"   # a surrogate
    error = call_raw(raw_connection(server.port), body)
    assert isinstance(error, TApplicationException) and error.type == TApplicationException.PROTOCOL_ERROR


BAD_REQUESTS = [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2**31 - 1}, "max_tokens"),
    ({"max_tokens": MAX_TOKENS + 1}, "max_tokens"),
    ({"top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 1000}, "top_logprobs"),
    ({"deadline_ms": -5}, "deadline_ms"),
    ({"deadline_ms": 2**62}, "deadline_ms"),
    ({"priority": 99}, "priority"),
    ({"prompt": None, "prompt_ids": [-1]}, "prompt"),
    ({"prompt": None, "prompt_ids": [2**31 - 1]}, "prompt"),
    ({"prompt": None, "prompt_ids": []}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt_ids": [1, 2]}, "prompt"),
    ({"prompt": "word " * 400}, "prompt"),
    ({"request_id": "x" * 1000}, "request_id"),
    ({"stop": ["s"] * 100}, "stop"),
    ({"sampling": thrift.SamplingOptions(top_k=-1)}, "sampling.top_k"),
    ({"sampling": thrift.SamplingOptions(temperature=-1.0)}, "sampling.temperature"),
    ({"sampling": thrift.SamplingOptions(temperature=math.nan)}, "sampling.temperature"),
    ({"sampling": thrift.SamplingOptions(top_p=0.0)}, "sampling.top_p"),
    ({"sampling": thrift.SamplingOptions(min_p=math.inf)}, "sampling.min_p"),
    ({"sampling": thrift.SamplingOptions(seed=-1)}, "sampling.seed"),
    ({"sampling": thrift.SamplingOptions(logit_bias={-1: 1.0})}, "sampling.logit_bias"),
    ({"sampling": thrift.SamplingOptions(logit_bias={2**31 - 1: 1.0})}, "sampling.logit_bias"),
    ({"sampling": thrift.SamplingOptions(logit_bias={5: 1e9})}, "sampling.logit_bias"),
    ({"prompt": None, "messages": []}, "messages"),
    ({"prompt": None, "messages": [thrift.ChatMessage(role="user")]}, "messages"),
]


@pytest.mark.parametrize("fields, field_name", BAD_REQUESTS, ids=[str(f)[:40] for f, _ in BAD_REQUESTS])
def test_bad_generate_fields_are_invalid_requests_naming_the_field(client, fields, field_name):
    for call in (client.generate, client.open_stream):
        with pytest.raises(thrift.InvalidRequest) as error:
            call(generate_request(**fields))
        assert error.value.field == field_name
        assert error.value.message


def test_bad_arguments_of_the_other_calls_are_invalid_requests(client):
    with pytest.raises(thrift.InvalidRequest) as error:
        client.detokenize([-1], False)
    assert error.value.field == "token_ids"
    with pytest.raises(thrift.InvalidRequest):
        client.detokenize([2**31 - 1], False)
    with pytest.raises(thrift.InvalidRequest) as error:
        client.next_chunk("no-such-stream", 0)
    assert error.value.field == "stream_id"
    stream_id = client.open_stream(generate_request(max_tokens=MAX_TOKENS))
    with pytest.raises(thrift.InvalidRequest) as error:
        client.next_chunk(stream_id, -1)
    assert error.value.field == "wait_ms"
    assert client.cancel(stream_id) is True   # MAX_TOKENS tokens take longer than these calls
    assert client.cancel("no-such-request") is False
    assert client.tokenize("x" * 60_000, False, False)   # big but within the frame limit


def test_limits_set_by_flags_hold_at_their_edge(client):
    """Limits below their defaults (16 stop strings, 512 messages, 20 alternatives, 64 stop token ids, 256-character
    sessions): the flags reached the worker."""
    user = thrift.ChatMessage(role="user", content="Hi")
    at_the_limit = generate_request(stop=["zz"] * MAX_STOP_STRINGS, top_logprobs=MAX_TOP_LOGPROBS, max_tokens=2,
                                    stop_token_ids=[120] * MAX_STOP_TOKEN_IDS, session="s" * MAX_SESSION)
    assert len(client.generate(at_the_limit).top_logprobs[0]) == MAX_TOP_LOGPROBS
    assert client.generate(generate_request(prompt=None, messages=[user] * MAX_MESSAGES, max_tokens=2)).token_ids
    for fields, field_name in [({"stop": ["zz"] * (MAX_STOP_STRINGS + 1)}, "stop"),
                               ({"prompt": None, "messages": [user] * (MAX_MESSAGES + 1)}, "messages"),
                               ({"top_logprobs": MAX_TOP_LOGPROBS + 1}, "top_logprobs"),
                               ({"stop_token_ids": [120] * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
                               ({"session": "s" * (MAX_SESSION + 1)}, "session")]:
        with pytest.raises(thrift.InvalidRequest) as error:
            client.generate(generate_request(**fields))
        assert error.value.field == field_name


def test_open_streams_past_the_limit_are_overloaded(client):
    streams = [client.open_stream(generate_request(max_tokens=MAX_TOKENS)) for _ in range(MAX_STREAMS)]
    with pytest.raises(thrift.Overloaded) as error:
        client.open_stream(generate_request())
    assert error.value.draining is False and error.value.retry_after_ms > 0
    for stream_id in streams:
        client.cancel(stream_id)
    wait_until(lambda: client.status().running == 0, what="the streams to end")


def test_other_clients_requests_in_flight_complete_unchanged(server, client):
    sampled = generate_request(max_tokens=200, sampling=thrift.SamplingOptions(temperature=0.8, seed=11))
    expected = client.generate(sampled)
    results = {}

    def generate_meanwhile():
        own = connect(server.port)
        try:
            results["generate"] = own.generate(sampled)
        finally:
            own.close()

    thread = threading.Thread(target=generate_meanwhile)
    thread.start()
    wait_until(lambda: client.status().running == 1, what="the generation to start")
    stream_id = client.open_stream(sampled)
    for abuse in (struct.pack("!i", 2**31 - 1) + b"\x80", b"GET / HTTP/1.0\r\n\r\n", frame(b"\x80\x01\x00\x01")):
        sock = raw_connection(server.port)
        sock.sendall(abuse)
        assert closed_by_server(sock, timeout_s=5)
    for body in (message("format_disk"), header("tokenize") + field(11, 1) + string(b"\xff") + b"\x00"):
        assert isinstance(call_raw(raw_connection(server.port), body), TApplicationException)
    chunks = []
    while not (chunks and chunks[-1].done):
        chunks.append(client.next_chunk(stream_id, 1000))
    thread.join(timeout=60)
    assert results["generate"].token_ids == expected.token_ids
    assert chunks[-1].result.token_ids == expected.token_ids
    assert "".join(c.text for c in chunks) == expected.text
