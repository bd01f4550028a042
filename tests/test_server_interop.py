"""Interop: code that the Apache Thrift compiler generates from idl/ringlm.thrift, with the `thrift` PyPI library,
gets the same answers from a ringlm server as thriftpy2 does; and the compiler takes the IDL for every client language."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

import pytest

from ringlm.idl import IDL_PATH
from ringlm.idl import ringlm_thrift as thrift
from tests.server_helpers import connect, running_worker, tiny_model_folder

COMPILER = shutil.which("thrift")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="the Apache Thrift compiler is not installed "
                                                         "(`make thrift-compiler` installs it)")
LANGUAGES = {"py": "ringlm_rpc/Generator.py", "java": "org/ringlm/Generator.java", "go": "ringlm/ringlm.go",
             "js:node": "Generator.js", "cpp": "Generator.h"}


@pytest.fixture(scope="module")
def apache(tmp_path_factory):
    """The generated Python package (ringlm_rpc) imported, with the `thrift` library's framed binary client."""
    out = tmp_path_factory.mktemp("apache")
    subprocess.run([COMPILER, "--gen", "py", "-out", str(out), str(IDL_PATH)], check=True)
    sys.path.insert(0, str(out))
    try:
        generator = importlib.import_module("ringlm_rpc.Generator")
        ttypes = importlib.import_module("ringlm_rpc.ttypes")
    finally:
        sys.path.remove(str(out))
    return generator, ttypes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("interop") / "worker.log"
    with running_worker(tiny_model_folder(tmp_path_factory), log) as worker:
        yield worker


@pytest.fixture
def clients(apache, server):
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import TSocket, TTransport

    generator, _ = apache
    transport = TTransport.TFramedTransport(TSocket.TSocket("127.0.0.1", server.port))
    transport.open()
    ours = connect(server.port)
    yield generator.Client(TBinaryProtocol.TBinaryProtocol(transport)), ours
    transport.close()
    ours.close()


def test_tokenize_and_detokenize_agree(clients):
    theirs, ours = clients
    for text in ("Hello world", "naïve café ☕ 0.5 s", "<|im_start|>user"):
        ids = ours.tokenize(text, True, True)
        assert theirs.tokenize(text, True, True) == ids
        assert theirs.detokenize(ids, False) == ours.detokenize(ids, False) == text


def test_generate_agrees_field_by_field(apache, clients):
    _, ttypes = apache
    theirs, ours = clients
    options = dict(max_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=2, stop=["zzz"], priority=2)
    mine = ours.generate(thrift.GenerateRequest(
        prompt="Hello", sampling=thrift.SamplingOptions(temperature=0.7, seed=3, logit_bias={42: 1.5}), **options))
    other = theirs.generate(ttypes.GenerateRequest(
        prompt="Hello", sampling=ttypes.SamplingOptions(temperature=0.7, seed=3, logit_bias={42: 1.5}), **options))
    assert other.token_ids == mine.token_ids and other.text == mine.text
    assert other.finish_reason == mine.finish_reason == ttypes.FinishReason.LENGTH
    assert other.logprobs == pytest.approx(mine.logprobs)
    assert [[(t.token_id, t.logprob) for t in row] for row in other.top_logprobs] == \
           [[(t.token_id, t.logprob) for t in row] for row in mine.top_logprobs]
    assert (other.usage.prompt_tokens, other.usage.completion_tokens) == (mine.usage.prompt_tokens, 12)
    assert other.server == mine.server


def test_streams_and_chat_agree(apache, clients):
    _, ttypes = apache
    theirs, ours = clients
    messages = [("user", "What is a hash ring?")]
    rendered = ours.apply_chat_template([thrift.ChatMessage(role=r, content=c) for r, c in messages], True)
    assert theirs.apply_chat_template([ttypes.ChatMessage(role=r, content=c) for r, c in messages], True) == rendered
    stream_id = theirs.open_stream(ttypes.GenerateRequest(
        messages=[ttypes.ChatMessage(role=r, content=c) for r, c in messages], max_tokens=10, ignore_eos=True))
    chunks = []
    while not (chunks and chunks[-1].done):
        chunks.append(theirs.next_chunk(stream_id, 1000))
    mine = ours.generate(thrift.GenerateRequest(prompt_ids=ours.tokenize(rendered, False, True), max_tokens=10,
                                                ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == chunks[-1].result.token_ids == mine.token_ids
    assert "".join(c.text for c in chunks) == mine.text


def test_typed_errors_and_status_agree(apache, clients):
    _, ttypes = apache
    theirs, ours = clients
    with pytest.raises(ttypes.InvalidRequest) as error:
        theirs.generate(ttypes.GenerateRequest(prompt="Hello", max_tokens=-3))
    assert error.value.field == "max_tokens"
    with pytest.raises(ttypes.InvalidRequest) as error:
        theirs.detokenize([-1], False)
    assert error.value.field == "token_ids"
    assert theirs.cancel("nothing-like-this") is False
    theirs.authenticate("anything")   # auth is off: any token is accepted
    status, mine = theirs.status(), ours.status()
    assert (status.server, status.model, status.pid, status.slots, status.vocab_size, status.waiting) == \
           (mine.server, mine.model, mine.pid, mine.slots, mine.vocab_size, mine.waiting)
    assert theirs.health() is True


@pytest.mark.parametrize("language", sorted(LANGUAGES))
def test_the_compiler_generates_every_client_language(tmp_path, language):
    subprocess.run([COMPILER, "--gen", language, "-out", str(tmp_path), str(IDL_PATH)], check=True,
                   capture_output=True)
    assert (tmp_path / LANGUAGES[language]).is_file()
