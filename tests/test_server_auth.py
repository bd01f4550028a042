"""Before authenticate(), a worker that requires a token reads nothing it does not have to.

Calls that need authentication are refused by name with Unauthorized before
their arguments are checked or parsed; health, ready and authenticate are
read, in small frames only. One worker with --auth-token-file serves the module; raw
sockets send what a client without the token might.
"""

from __future__ import annotations

import struct

import pytest
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport.memory import TCyMemoryBuffer

from ringlm.idl import ringlm_thrift as thrift
from ringlm.server.handler import AUTH_FREE_METHODS
from ringlm.server.worker import PRE_AUTH_MAX_FRAME_BYTES
from tests.server_helpers import frame, message, raw_connection, recv_exactly, running_worker, tiny_model_folder

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth")
    (folder / "token").write_text(TOKEN)
    with running_worker(tiny_model_folder(tmp_path_factory), folder / "worker.log",
                        "--auth-token-file", str(folder / "token")) as worker:
        yield worker


def call(sock, body: bytes):
    """Send one framed message; (seqid, the result struct or TApplicationException)."""
    sock.sendall(frame(body))
    size, = struct.unpack("!i", recv_exactly(sock, 4))
    protocol = TCyBinaryProtocol(TCyMemoryBuffer(recv_exactly(sock, size)))
    name, message_type, seqid = protocol.read_message_begin()
    reply = TApplicationException() if message_type == TMessageType.EXCEPTION \
        else getattr(thrift.Generator, f"{name}_result")()
    protocol.read_struct(reply)
    return seqid, reply


def header(method: str, seqid: int) -> bytes:
    return message(method, seqid=seqid)[:-1]


def field(type_code: int, field_id: int) -> bytes:
    return struct.pack("!bh", type_code, field_id)


def authenticate(sock) -> None:
    _, result = call(sock, message("authenticate", thrift.Generator.authenticate_args(token=TOKEN)))
    assert result.unauthorized is None


def test_every_method_that_needs_the_token_declares_unauthorized():
    """The worker's refusal is the method's own typed Unauthorized: each of them must declare it."""
    for method in set(thrift.Generator.thrift_services) - AUTH_FREE_METHODS:
        spec = getattr(thrift.Generator, f"{method}_result").thrift_spec
        assert any(len(entry) == 4 and entry[2] is thrift.Unauthorized for entry in spec.values()), method


# Arguments the checker would refuse (a list<ChatMessage> claiming more elements than the frame holds,
# a map of the wrong types, a string past the end): refused for the missing token instead, unread.
UNREAD_ARGUMENTS = {
    "apply_chat_template": field(15, 1) + struct.pack("!bi", 12, 2**31 - 1) + b"\x00",
    "generate": field(12, 1) + field(12, 4) + field(13, 9) + struct.pack("!bbi", 11, 11, 1) + b"\x00",
    "tokenize": field(11, 1) + struct.pack("!i", 1_000_000) + b"abc",
    "open_stream": b"",
    "next_chunk": field(8, 2) + b"\x00\x01",
    "cancel": field(1, 1),
    "detokenize": field(15, 1) + struct.pack("!bi", 11, 3) + b"\x00",
    "status": b"\xff",
}


@pytest.mark.parametrize("method", sorted(UNREAD_ARGUMENTS))
def test_calls_that_need_the_token_are_refused_by_name_before_their_arguments_are_read(server, method):
    sock = raw_connection(server.port)
    seqid, result = call(sock, header(method, seqid=4242) + UNREAD_ARGUMENTS[method])
    assert seqid == 4242
    assert isinstance(result.unauthorized, thrift.Unauthorized), result
    assert "authenticate" in result.unauthorized.message
    authenticate(sock)   # the connection goes on, and once authenticated the same bytes are read
    seqid, error = call(sock, header(method, seqid=4243) + UNREAD_ARGUMENTS[method])
    assert seqid == 4243
    assert isinstance(error, TApplicationException) and error.type == TApplicationException.PROTOCOL_ERROR
    sock.close()


def test_the_refusal_covers_every_method_that_needs_the_token():
    assert set(UNREAD_ARGUMENTS) == set(thrift.Generator.thrift_services) - AUTH_FREE_METHODS


def test_health_before_authenticate_takes_a_small_frame_only(server):
    sock = raw_connection(server.port)
    assert call(sock, message("health"))[1].success is True
    assert call(sock, message("ready"))[1].success is True
    # An unknown field: a list of empty structs filling the frame past the limit.
    count = PRE_AUTH_MAX_FRAME_BYTES
    large = header("health", seqid=9) + field(15, 7) + struct.pack("!bi", 12, count) + b"\x00" * count + b"\x00"
    seqid, error = call(sock, large)
    assert seqid == 9
    assert isinstance(error, TApplicationException) and error.type == TApplicationException.PROTOCOL_ERROR
    assert f"at most {PRE_AUTH_MAX_FRAME_BYTES}" in error.message
    authenticate(sock)
    assert call(sock, large)[1].success is True   # the same frame, once authenticated
    sock.close()


def test_a_wrong_token_is_refused_and_the_connection_stays_unauthenticated(server):
    sock = raw_connection(server.port)
    _, result = call(sock, message("authenticate", thrift.Generator.authenticate_args(token="wrong")))
    assert isinstance(result.unauthorized, thrift.Unauthorized)
    _, result = call(sock, message("status"))
    assert isinstance(result.unauthorized, thrift.Unauthorized)
    sock.close()
