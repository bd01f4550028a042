"""Streams belong to the connection that opened them, ids cannot be guessed or reused while open (issue 11, #3)."""

from __future__ import annotations

import re

import pytest

from ringlm.idl import ringlm_thrift as thrift
from tests.server_helpers import connect, running_worker, tiny_model_folder, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_model_folder(tmp_path_factory)
    with running_worker(model, tmp_path_factory.mktemp("streams") / "worker.log") as worker:
        yield worker


@pytest.fixture
def client(server):
    client = connect(server.port)
    yield client
    client.close()


def request(**fields) -> thrift.GenerateRequest:
    return thrift.GenerateRequest(**{"prompt": "Streams belong to", "max_tokens": 8, "ignore_eos": True, **fields})


def drain(client, stream_id: str) -> list[thrift.StreamChunk]:
    chunks = []
    while not (chunks and chunks[-1].done):
        chunks.append(client.next_chunk(stream_id, 5000))
    return chunks


def test_another_connection_cannot_read_a_stream(server, client):
    stream_id = client.open_stream(request())
    thief = connect(server.port)
    try:
        with pytest.raises(thrift.InvalidRequest) as error:
            thief.next_chunk(stream_id, 1000)
        assert error.value.field == "stream_id"
    finally:
        thief.close()
    chunks = drain(client, stream_id)   # the owner still gets every token
    assert [t for c in chunks for t in c.token_ids] == chunks[-1].result.token_ids
    assert len(chunks[-1].result.token_ids) == 8


def test_a_finished_unread_stream_keeps_its_id(server, client):
    stream_id = client.open_stream(request(request_id="mine"))
    wait_until(lambda: client.status().running == 0 and client.status().open_streams == 1,
               what="the stream to finish unread")
    with pytest.raises(thrift.InvalidRequest) as error:
        client.open_stream(request(request_id="mine", max_tokens=2))
    assert error.value.field == "request_id"
    assert len(drain(client, stream_id)[-1].result.token_ids) == 8   # the first one is intact
    assert len(drain(client, client.open_stream(request(request_id="mine", max_tokens=2)))[-1]
               .result.token_ids) == 2   # read, the id is free again


def test_server_made_ids_cannot_be_guessed(client):
    ids = [client.open_stream(request(max_tokens=1)) for _ in range(3)]
    for stream_id in ids:
        drain(client, stream_id)
    randoms = [re.fullmatch(r".+-([0-9a-f]{24})", stream_id).group(1) for stream_id in ids]
    assert len(set(randoms)) == 3
    assert len({int(a, 16) - int(b, 16) for a, b in zip(randoms, randoms[1:])}) == 2   # not a counter


def test_a_slow_reader_keeps_its_stream_and_an_unread_finished_one_is_dropped(tiny_model):
    """The reaper drops finished streams nobody collects; reading slowly never cancels one. Steps are run
    by hand (no engine loop), so "running for a long time" is a fact, not a race."""
    from ringlm.ext.model_files import default_model_path
    from ringlm.ext.tokenizer import Tokenizer
    from ringlm.server.config import ServiceLimits
    from ringlm.server.engine import EngineConfig
    from ringlm.server.engine_loop import EngineLoop, gevent_engine
    from ringlm.server.handler import ConnectionHandler, Service

    tokenizer = Tokenizer.from_gguf(default_model_path())
    engine = gevent_engine(tiny_model, tokenizer, EngineConfig(num_slots=2, max_seq_len=64))
    service = Service(EngineLoop(engine), tokenizer, "test:0", "tiny", ServiceLimits(stream_idle_timeout_s=0.5))
    connection = ConnectionHandler(service)
    stream_id = connection.open_stream(thrift.GenerateRequest(prompt_ids=[1, 2, 3], max_tokens=5, ignore_eos=True))
    engine.step()
    service.streams[stream_id].last_polled -= 3600   # an hour without a poll, still running
    service.reap_idle_streams()
    assert stream_id in service.streams and not service.streams[stream_id].handle.finished
    engine.run_until_idle()
    service.reap_idle_streams()   # finished, but just now: kept
    assert stream_id in service.streams
    service.streams[stream_id].handle._state.times.finished -= 3600   # and it finished an hour ago
    service.reap_idle_streams()
    assert stream_id not in service.streams and stream_id not in connection.opened_streams
