"""The client against three real worker processes (tiny model): routing, affinity, retries, deadlines,
typed errors, the CLI, and kill -9 under load (nothing lost, streams resume identically)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from ringlm.client import Client
from ringlm.client.errors import (DeadlineExceededError, InvalidRequestError, NoServerAvailableError,
                                  ServerUnavailableError)
from ringlm.idl import ringlm_thrift as thrift
from tests.server_helpers import WorkerProcess, connect, free_port, tiny_model_folder, wait_until

STORY = "Once upon a time"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """Three workers; the failure test at the end kills, drains and restarts them (so it runs last)."""
    logs = tmp_path_factory.mktemp("cluster")
    workers = [WorkerProcess(model_dir, logs / f"worker{i}.log", "--drain-grace-s", "60") for i in range(3)]
    try:
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def address(worker: WorkerProcess) -> str:
    return f"127.0.0.1:{worker.port}"


def fast_client(servers, **options) -> Client:
    """Health checks and back-offs short enough for a test to watch them happen."""
    return Client(servers, health_interval_s=0.2, first_backoff_s=0.2, max_backoff_s=1.0, **options)


@pytest.fixture
def client(cluster):
    with fast_client([address(w) for w in cluster]) as client:
        yield client


def session_homed_at(client: Client, node: str, start: int = 0) -> str:
    """A session key whose home on the ring is `node`."""
    return next(f"session-{i}" for i in range(start, start + 10_000) if client.ring.node_for(f"session-{i}") == node)


# -- results, routing, affinity

def test_generate_returns_a_full_result_and_its_seed_reproduces_it_on_every_server(client):
    first = client.generate(STORY, max_tokens=12, temperature=0.9, seed=11, ignore_eos=True)
    assert first.finish_reason == "length"
    assert len(first.token_ids) == first.usage.completion_tokens == 12
    assert first.usage.prompt_tokens > 0 and first.timings.total_ms > 0
    assert first.server in client.servers
    assert client.detokenize(first.token_ids) == first.text
    for node in client.servers:
        again = client.generate(STORY, session=session_homed_at(client, node), max_tokens=12, temperature=0.9,
                                seed=11, ignore_eos=True)
        assert again.server == node
        assert (again.token_ids, again.text) == (first.token_ids, first.text)


def test_stream_yields_the_text_generate_returns(client):
    whole = client.generate(STORY, max_tokens=20, temperature=0.7, seed=3, ignore_eos=True)
    stream = client.stream(STORY, max_tokens=20, temperature=0.7, seed=3, ignore_eos=True)
    chunks = list(stream)
    assert len(chunks) > 1
    assert "".join(chunks) == whole.text == stream.result.text
    assert stream.result.token_ids == whole.token_ids
    assert stream.result.failed_over_from == []


def test_closing_a_stream_half_read_cancels_it_on_the_server(client):
    stream = client.stream(STORY, max_tokens=240, ignore_eos=True)
    next(stream)
    server = stream.server
    stream.close()
    wait_until(lambda: client.status_all()[server]["open_streams"] == 0, timeout_s=10,
               what="the server to drop the stream")
    assert stream.result is None


def test_second_turn_of_a_chat_session_lands_on_the_same_server_with_cached_prompt_tokens(client):
    messages = [{"role": "user", "content": "Tell me about consistent hashing."}]
    first = client.generate(messages=messages, session="chat-42", max_tokens=8)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And bounded loads?"}]
    second = client.generate(messages=messages, session="chat-42", max_tokens=8)
    assert first.server == second.server == client.ring.node_for("chat-42")
    assert second.usage.cached_prompt_tokens > 0


def test_requests_without_a_session_spread_over_the_ring(client):
    results = client.generate_many([{"prompt": f"prompt number {i}", "max_tokens": 2} for i in range(24)],
                                   concurrency=6)
    assert [r.usage.completion_tokens for r in results] == [2] * 24
    assert {r.server for r in results} == set(client.servers)


def test_top_logprobs_come_back_from_generate_and_from_a_streams_result(client):
    options = dict(session="alternatives", max_tokens=8, ignore_eos=True, top_logprobs=3)
    whole = client.generate(STORY, **options)
    assert len(whole.top_logprobs) == len(whole.logprobs) == len(whole.token_ids) == 8
    for token, logprob, alternatives in zip(whole.token_ids, whole.logprobs, whole.top_logprobs):
        assert len(alternatives) == 3
        assert alternatives[0][0] == token   # greedy: the chosen token is the likeliest
        assert alternatives[0][1] == pytest.approx(logprob, abs=1e-5)
        assert [lp for _, lp in alternatives] == sorted((lp for _, lp in alternatives), reverse=True)
    stream = client.stream(STORY, **options)
    assert "".join(stream) == whole.text
    assert stream.result.token_ids == whole.token_ids
    assert [[t for t, _ in row] for row in stream.result.top_logprobs] == [[t for t, _ in row]
                                                                          for row in whole.top_logprobs]
    assert stream.result.logprobs == pytest.approx(whole.logprobs, abs=1e-5)
    plain = client.generate(STORY, max_tokens=2)
    assert plain.top_logprobs is None and plain.logprobs is None


def test_tokenize_and_detokenize_round_trip(client):
    ids = client.tokenize("naïve café ☕")
    assert ids and all(isinstance(i, int) for i in ids)
    assert client.detokenize(ids) == "naïve café ☕"


def test_status_all_reports_every_server(client):
    report = client.status_all()
    assert set(report) == set(client.servers)
    assert all(status["server"] == node and status["draining"] is False for node, status in report.items())


# -- typed errors, retries and deadlines

def test_generate_and_stream_skip_a_draining_node_alike(cluster):
    with Client([address(w) for w in cluster], health_interval_s=0) as client:   # no checker to undo the mark
        home, *_ = cluster
        session = session_homed_at(client, address(home))
        client.pool.node(address(home)).draining = True
        generated = client.generate(STORY, session=session, max_tokens=2)
        stream = client.stream(STORY, session=session, max_tokens=2)
        list(stream)
        assert generated.server == stream.result.server == client.ring.nodes_for(session)[1]

def test_a_bad_request_is_a_typed_error_naming_the_field(client):
    with pytest.raises(InvalidRequestError) as error:
        client.generate(STORY, max_tokens=4, temperature=-1.0)
    assert error.value.field == "sampling.temperature" and isinstance(error.value, ValueError)
    with pytest.raises(TypeError, match="temprature"):
        client.generate(STORY, temprature=0.5)
    with pytest.raises(TypeError, match="exactly one"):
        client.generate(STORY, messages=[{"role": "user", "content": "hi"}])


def test_the_deadline_ends_a_long_generation_with_its_partial_result(client):
    with pytest.raises(DeadlineExceededError) as error:
        client.generate(STORY, max_tokens=240, ignore_eos=True, deadline_ms=150)
    assert isinstance(error.value, TimeoutError)
    assert error.value.partial.finish_reason == "deadline"
    assert len(error.value.partial.token_ids) < 240


def test_a_dead_home_node_sends_the_request_to_the_next_node_clockwise_and_is_ejected(cluster):
    dead = f"127.0.0.1:{free_port()}"
    with fast_client([dead] + [address(w) for w in cluster]) as client:
        session = session_homed_at(client, dead)
        result = client.generate(STORY, session=session, max_tokens=3)
        assert result.server == client.ring.nodes_for(session)[1]
        assert not client.pool.node(dead).available()
        assert client.server_for(session) != dead   # while ejected, nothing is routed there


def test_when_every_server_is_down_the_error_names_each(tmp_path):
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    with fast_client(dead) as client:
        with pytest.raises(NoServerAvailableError) as error:
            client.generate(STORY, max_tokens=3)
    assert set(error.value.errors) == set(dead)
    assert all(isinstance(e, ServerUnavailableError) for e in error.value.errors.values())
    assert isinstance(error.value, ConnectionError)


def test_an_oversize_request_is_refused_by_the_client_and_reaches_no_server(client, cluster):
    refused = [w.log().count("frame length") for w in cluster]
    prompt = "x" * (1 << 20)   # over the servers' (and the client's) max_frame_bytes once serialized
    for call in (lambda: client.generate(prompt, max_tokens=2), lambda: list(client.stream(prompt, max_tokens=2))):
        with pytest.raises(InvalidRequestError, match="max_frame_bytes"):
            call()
    assert [w.log().count("frame length") for w in cluster] == refused   # no server saw a frame
    assert all(node.available() and node.suspected is None for node in client.pool.nodes.values())


def never_ejected(client: Client, log_text: str) -> bool:
    """Every node available, none waiting for a probe, and none ever ejected (the pool logs each ejection)."""
    settled = all(node.available() and node.suspected is None for node in client.pool.nodes.values())
    return settled and " ejected for " not in log_text


def test_a_server_hanging_up_on_a_request_makes_it_suspect_and_its_probe_keeps_it(cluster, caplog):
    # This client's frames may be larger than the servers accept: they close the connection on them,
    # which is this request's fault, not the servers'.
    with fast_client([address(w) for w in cluster], max_frame_bytes=4 << 20) as client:
        with pytest.raises(NoServerAvailableError) as error:
            client.generate("x" * (2 << 20), max_tokens=2)
        assert len(error.value.errors) == client.config.max_nodes_per_request == 3
        assert all(isinstance(e, ServerUnavailableError) and e.sent for e in error.value.errors.values())
        wait_until(lambda: all(node.suspected is None for node in client.pool.nodes.values()), timeout_s=30,
                   what="the probes of the suspect nodes")
        assert never_ejected(client, caplog.text), caplog.text
        assert client.generate(STORY, max_tokens=2).server in client.servers


def test_a_generate_outlasting_its_read_timeout_does_not_eject_its_server(cluster, caplog):
    with fast_client([address(w) for w in cluster], generate_timeout_s=0.01, max_nodes_per_request=1) as client:
        with pytest.raises(NoServerAvailableError) as error:
            client.generate(STORY, max_tokens=240, ignore_eos=True)   # 240 engine steps: far more than 10 ms
        (server, timeout), = error.value.errors.items()
        assert isinstance(timeout, ServerUnavailableError) and timeout.sent and "timed out" in timeout.message
        wait_until(lambda: client.pool.node(server).suspected is None, timeout_s=30, what="the probe")
        assert never_ejected(client, caplog.text), caplog.text


def test_a_server_that_never_answers_cannot_hold_a_request_past_its_deadline():
    silent = socket.socket()   # accepts connections into its backlog and never replies
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        with fast_client([f"127.0.0.1:{silent.getsockname()[1]}"]) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                client.generate(STORY, max_tokens=3, deadline_ms=300)
            # without the deadline it would wait generate_timeout_s (600 s)
            assert time.monotonic() - started < 10
    finally:
        silent.close()


# -- the command line

def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringlm.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=120)


def test_generate_command_prints_the_whole_result_as_json_and_streams_the_same_text(client):
    servers = ",".join(client.servers)
    done = run_cli("generate", "--servers", servers, "--max-tokens", "10", "--temperature", "0.8", "--seed", "7",
                   "--session", "cli", "--json", STORY)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"text", "token_ids", "finish_reason", "usage", "timings", "server"} <= set(result)
    assert result["server"] == client.ring.node_for("cli")
    expected = client.generate(STORY, max_tokens=10, temperature=0.8, seed=7)
    assert (result["text"], result["token_ids"]) == (expected.text, expected.token_ids)
    streamed = run_cli("generate", "--servers", servers, "--max-tokens", "10", "--temperature", "0.8",
                       "--seed", "7", "--stream", STORY)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == expected.text + "\n"


def test_generate_command_reports_errors_in_words(client):
    done = run_cli("generate", "--servers", ",".join(client.servers), "--temperature", "-2", STORY)
    assert done.returncode == 2
    assert "sampling.temperature" in done.stderr and "Traceback" not in done.stderr


def test_chat_command_keeps_one_session_across_turns(client):
    done = run_cli("chat", "--servers", ",".join(client.servers), "--max-tokens", "6", "--verbose",
                   stdin="Hello there\nHow are you?\n")
    assert done.returncode == 0, done.stderr
    turns = re.findall(r"\[server (\S+) cached (\d+)\]", done.stderr)
    assert len(turns) == 2
    assert turns[0][0] == turns[1][0]   # the conversation stays on its server
    assert int(turns[1][1]) > 0          # which kept the first turn's KV


def test_the_client_works_under_gevent_monkey_patching(client):
    servers = sorted(client.servers)
    script = textwrap.dedent(f"""
        from gevent import monkey
        monkey.patch_all()
        import json
        from ringlm.client import Client
        with Client({servers!r}) as client:
            results = client.generate_many([{{"prompt": f"green {{i}}", "max_tokens": 3}} for i in range(12)],
                                           concurrency=6)
            text = "".join(client.stream({STORY!r}, max_tokens=5))
        print(json.dumps({{"servers": sorted({{r.server for r in results}}), "text": text}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert len(report["servers"]) > 1
    assert report["text"] == client.generate(STORY, max_tokens=5).text


# -- failure under load (last: it kills, drains and restarts workers of the module's cluster)

def test_kill_9_under_load_loses_no_request_and_streams_resume_identically(cluster, model_dir, tmp_path):
    victim, drained, _ = cluster
    gone = address(victim)
    client = fast_client([address(w) for w in cluster])
    # The streams get their own client whose loose load bound keeps all three on their home, the victim.
    streamer = fast_client([address(w) for w in cluster], load_factor=100)
    try:
        streams, resumed = start_paused_streams(streamer, gone, count=3)
        outcome = {}
        load = threading.Thread(target=lambda: outcome.update(results=client.generate_many(
            [{"prompt": f"load {i}", "max_tokens": 8, "ignore_eos": True, "temperature": 0.9}
             for i in range(200)], concurrency=16, return_exceptions=True)))
        load.start()
        wait_until(lambda: victim.log().count("outcome=") >= 10, timeout_s=60, what="load on the victim")
        victim.process.kill()   # kill -9: no drain, no goodbye
        victim.process.wait()
        resumed.set()
        load.join(timeout=300)

        results = outcome["results"]
        assert len(results) == 200
        assert all(getattr(r, "finish_reason", r) == "length" for r in results), results
        for stream, thread in streams:
            thread.join(timeout=120)
            assert stream.result is not None and stream.result.failed_over_from == [gone]
            options = stream.request.sampling
            uninterrupted = client.generate(stream.request.prompt, max_tokens=stream.request.max_tokens,
                                            temperature=options.temperature, top_k=options.top_k,
                                            seed=options.seed, ignore_eos=True, logprobs=True)
            assert uninterrupted.server != gone
            assert stream.result.token_ids == uninterrupted.token_ids
            assert stream.result.text == uninterrupted.text
            check_logprobs_survived_the_failover(stream.result, uninterrupted)

        check_drained_server_gets_no_new_requests(client, drained)
        cluster[0] = WorkerProcess(model_dir, tmp_path / "restarted.log", port=victim.port).wait_ready()
        wait_until(lambda: client.pool.node(gone).available(), timeout_s=30, what="re-admission")
        assert client.generate(STORY, session=session_homed_at(client, gone), max_tokens=2).server == gone
    finally:
        client.close()
        streamer.close()


def check_logprobs_survived_the_failover(resumed, uninterrupted) -> None:
    """Every token's logprob arrived with its chunk; the alternatives of the tokens the dead server sent
    (at least the 5 before the pause) went with it, the rest came from the server that finished."""
    assert resumed.logprobs == pytest.approx(uninterrupted.logprobs, abs=1e-4)
    lost = resumed.top_logprobs.count(None)
    assert 5 <= lost < len(resumed.token_ids) == len(resumed.top_logprobs)
    assert resumed.top_logprobs[:lost] == [None] * lost
    assert all(len(alternatives) == 2 for alternatives in resumed.top_logprobs[lost:])


def start_paused_streams(client: Client, node: str, count: int):
    """Long streams homed on `node`, each consumed by a thread that stops after a few tokens until
    `resumed` is set (so they are surely mid-stream when the node dies).

    top_k keeps the draw among a few well-separated candidates: over the tiny random model's
    near-flat full vocabulary, the float noise between batch shapes (prefill vs decode, batch mates)
    moves a draw that lands within ~1e-6 of a token boundary to the neighbouring id."""
    resumed = threading.Event()
    streams = []
    for i in range(count):
        stream = client.stream(f"{STORY} {i}", session=session_homed_at(client, node, start=1000 * i),
                               max_tokens=120, temperature=0.8, top_k=20, ignore_eos=True, top_logprobs=2)
        started = threading.Event()

        def consume(stream=stream, started=started):
            for _ in stream:
                if len(stream.token_ids) >= 5:
                    started.set()
                    resumed.wait()

        thread = threading.Thread(target=consume)
        thread.start()
        assert started.wait(timeout=60), "a stream did not start"
        assert stream.server == node
        streams.append((stream, thread))
    return streams, resumed


def check_drained_server_gets_no_new_requests(client: Client, worker: WorkerProcess) -> None:
    """SIGTERM a worker while it runs a long request: once the client sees it draining, requests
    homed there go elsewhere and the worker's request log gains nothing new."""
    node = address(worker)
    direct = connect(worker.port)   # straight to the worker, whatever the ring's bounded loads would pick
    long = threading.Thread(target=direct.generate, args=(thrift.GenerateRequest(
        prompt=STORY, max_tokens=240, ignore_eos=True),))
    long.start()
    wait_until(lambda: client.status_all()[node]["running"] == 1, what="the long request to run")
    worker.process.send_signal(signal.SIGTERM)
    wait_until(lambda: not client.pool.node(node).available(), timeout_s=10, what="the client to see the drain")
    refused = worker.log().count("outcome=overloaded")   # all a draining server can do with a new request
    results = [client.generate(STORY, session=session_homed_at(client, node, start=100 * i), max_tokens=2)
               for i in range(10)]
    assert all(r.server != node for r in results)
    assert worker.log().count("outcome=overloaded") == refused
    long.join(timeout=60)
    direct.close()
