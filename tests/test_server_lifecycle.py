"""Worker, supervisor and cluster processes over their life: drain, restart after kill -9, `ringlm status`, TLS, auth."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ringlm.idl import ringlm_thrift as thrift
from tests.server_helpers import (WorkerProcess, answers_health, connect, consecutive_free_ports, free_port, pid_alive,
                                  running_worker, tiny_model_folder, wait_until, write_certificates)

LONG = 240


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory)


def long_request(**fields) -> thrift.GenerateRequest:
    return thrift.GenerateRequest(**{"prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True, **fields})


def run_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringlm.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s)


# -- drain

def test_sigterm_drains_finishes_running_work_refuses_new_work_and_exits_0(model_dir, tmp_path):
    worker = WorkerProcess(model_dir, tmp_path / "worker.log", "--drain-grace-s", "60").wait_ready()
    try:
        results = {}

        def generate():
            own = connect(worker.port)
            results["generate"] = own.generate(long_request())
            own.close()

        thread = threading.Thread(target=generate)
        thread.start()
        client = connect(worker.port)
        wait_until(lambda: client.status().running == 1, what="the generation to start")
        assert client.ready() is True and client.status().ready is True
        stream_id = client.open_stream(long_request())
        wait_until(lambda: client.status().running == 2, what="the stream to run (queued ones are sent away)")
        worker.process.send_signal(signal.SIGTERM)

        assert wait_until(lambda: client.status().draining, what="status to report draining")
        status = client.status()
        assert (status.ready, status.not_ready_reason) == (False, "draining")
        assert client.ready() is False and client.health() is True   # alive, but takes nothing new
        for call in (client.generate, client.open_stream):
            with pytest.raises(thrift.Overloaded) as error:
                call(long_request())
            assert error.value.draining is True
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", worker.port), timeout=5)
        chunks = []
        while not (chunks and chunks[-1].done):
            chunks.append(client.next_chunk(stream_id, 1000))
        assert chunks[-1].result.finish_reason == thrift.FinishReason.LENGTH
        thread.join(timeout=60)
        assert results["generate"].finish_reason == thrift.FinishReason.LENGTH
        assert len(results["generate"].token_ids) == LONG
        client.close()
        assert worker.process.wait(timeout=60) == 0
        assert "draining" in worker.log()
    finally:
        worker.stop()


def generate_in_thread(port: int, request: thrift.GenerateRequest, outcome: dict, key: str) -> threading.Thread:
    """Run generate on its own connection in a thread; its result or typed error lands in outcome[key]."""
    def run():
        own = connect(port)
        try:
            outcome[key] = own.generate(request)
        except thrift.Overloaded as error:
            outcome[key] = error
        finally:
            own.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sigterm_sends_queued_requests_away_at_once_with_a_typed_answer(model_dir, tmp_path):
    worker = WorkerProcess(model_dir, tmp_path / "worker.log", "--num-slots", "1", "--drain-grace-s", "60").wait_ready()
    try:
        client, outcome = connect(worker.port), {}
        running = generate_in_thread(worker.port, long_request(), outcome, "running")
        wait_until(lambda: client.status().running == 1, what="the first generation to start")
        queued = generate_in_thread(worker.port, long_request(), outcome, "queued")
        wait_until(lambda: client.status().waiting["NORMAL"] == 1, what="the second one to queue")
        worker.process.send_signal(signal.SIGTERM)
        queued.join(timeout=60)
        assert isinstance(outcome["queued"], thrift.Overloaded) and outcome["queued"].draining is True
        running.join(timeout=120)
        assert outcome["running"].finish_reason == thrift.FinishReason.LENGTH   # the grace let it finish
        client.close()
        assert worker.process.wait(timeout=60) == 0
    finally:
        worker.stop()


def test_work_still_running_when_the_grace_ends_is_sent_away_not_dropped(model_dir, tmp_path):
    worker = WorkerProcess(model_dir, tmp_path / "worker.log", "--drain-grace-s", "0").wait_ready()
    try:
        client, outcome = connect(worker.port), {}
        running = generate_in_thread(worker.port, long_request(max_tokens=480), outcome, "generate")
        streamer = connect(worker.port)
        stream_id = streamer.open_stream(long_request(max_tokens=480))
        assert streamer.next_chunk(stream_id, 5000).token_ids
        wait_until(lambda: client.status().running == 2, what="both to run")
        worker.process.send_signal(signal.SIGTERM)
        running.join(timeout=60)
        assert isinstance(outcome["generate"], thrift.Overloaded) and outcome["generate"].draining is True
        with pytest.raises(thrift.Overloaded) as error:
            while not streamer.next_chunk(stream_id, 5000).done:
                pass
        assert error.value.draining is True
        for connection in (client, streamer):
            connection.close()
        assert worker.process.wait(timeout=60) == 0
    finally:
        worker.stop()


# -- supervisor and `ringlm status`

def worker_pid(port: int) -> int | None:
    try:
        client = connect(port, timeout_s=2)
    except Exception:   # refused while the worker restarts
        return None
    try:
        return client.status().pid
    except Exception:
        return None
    finally:
        client.close()


def test_supervisor_runs_workers_on_consecutive_ports_restarts_a_killed_one_and_drains(model_dir, tmp_path):
    port, metrics_port = consecutive_free_ports(2), consecutive_free_ports(2)
    servers = f"127.0.0.1:{port},127.0.0.1:{port + 1}"
    with open(tmp_path / "supervisor.log", "wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "ringlm.cli", "serve", "--model", str(model_dir), "--port", str(port),
             "--workers", "2", "--metrics-port", str(metrics_port), "--torch-threads", "1", "--max-seq-len", "256"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        pids = [wait_until(lambda p=p: worker_pid(p), timeout_s=120, what=f"worker on {p}") for p in (port, port + 1)]
        assert len(set(pids)) == 2 and supervisor.pid not in pids

        status = run_cli("status", "--servers", servers)
        assert status.returncode == 0, status.stderr
        reports = [json.loads(line) for line in status.stdout.splitlines()]
        assert [r["status"]["server"] for r in reports] == [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
        assert [r["status"]["pid"] for r in reports] == pids
        assert all(r["ok"] and r["status"]["draining"] is False for r in reports)

        unreachable = run_cli("status", "--servers", f"{servers},127.0.0.1:{free_port()}", "--timeout", "2")
        assert unreachable.returncode == 1
        assert [json.loads(line)["ok"] for line in unreachable.stdout.splitlines()] == [True, True, False]

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + 1}/metrics", timeout=10).read()
        assert b"ringlm_slots" in metrics

        os.kill(pids[0], signal.SIGKILL)
        restarted = wait_until(lambda: (pid := worker_pid(port)) not in (None, pids[0]) and pid, timeout_s=120,
                               what="the killed worker to be restarted")
        assert restarted != pids[0] and worker_pid(port + 1) == pids[1]

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        assert not pid_alive(restarted) and not pid_alive(pids[1])
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_a_worker_that_cannot_start_stops_the_supervisor_instead_of_restarting_for_ever(tmp_path):
    served = subprocess.run([sys.executable, "-m", "ringlm.cli", "serve", "--model", str(tmp_path / "missing.gguf"),
                             "--port", str(consecutive_free_ports(2)), "--workers", "2"],
                            capture_output=True, text=True, timeout=300)
    assert served.returncode == 2, served.stderr
    assert "missing.gguf" in served.stderr and "cannot start with this configuration" in served.stderr


def test_workers_go_when_their_supervisor_is_killed(model_dir, tmp_path):
    port = consecutive_free_ports(1)
    with open(tmp_path / "supervisor.log", "wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "ringlm.cli", "serve", "--model", str(model_dir), "--port", str(port),
             "--workers", "1", "--torch-threads", "1", "--max-seq-len", "256"], stdout=log, stderr=subprocess.STDOUT)
    try:
        pid = wait_until(lambda: worker_pid(port), timeout_s=120, what="the worker")
        supervisor.kill()
        supervisor.wait(timeout=30)
        wait_until(lambda: not pid_alive(pid), timeout_s=60, what="the orphaned worker to exit")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()


def test_cluster_command_starts_count_servers_prints_them_and_stops_them_on_ctrl_c(model_dir, tmp_path):
    port = consecutive_free_ports(2)
    output = tmp_path / "cluster.log"
    with open(output, "wb") as log:
        cluster = subprocess.Popen(
            [sys.executable, "-m", "ringlm.cli", "cluster", "--count", "2", "--base-port", str(port), "--model",
             str(model_dir), "--torch-threads", "1", "--max-seq-len", "256"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "cluster ready" in output.read_text(), timeout_s=180, what="the cluster to be ready")
        assert f"127.0.0.1:{port},127.0.0.1:{port + 1}" in output.read_text()
        pids = [worker_pid(port), worker_pid(port + 1)]
        assert None not in pids and len(set(pids)) == 2
        cluster.send_signal(signal.SIGINT)
        assert cluster.wait(timeout=60) == 0
        assert not any(pid_alive(pid) for pid in pids)
    finally:
        if cluster.poll() is None:
            cluster.kill()
            cluster.wait()


# -- TLS and auth

@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return write_certificates(tmp_path_factory.mktemp("tls"))


def tls_context(certificates, client_certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
    if client_certificate:
        context.load_cert_chain(str(certificates / "client.pem"), str(certificates / "client.key"))
    return context


@pytest.fixture(scope="module")
def secure_server(model_dir, certificates, tmp_path_factory):
    token_file = certificates / "token"
    token_file.write_text("s3cret-token\n")
    flags = ["--tls-cert", str(certificates / "server.pem"), "--tls-key", str(certificates / "server.key"),
             "--tls-ca", str(certificates / "ca.pem"), "--auth-token-file", str(token_file)]
    log = tmp_path_factory.mktemp("secure") / "worker.log"
    with running_worker(model_dir, log, *flags, ssl_context=tls_context(certificates)) as worker:
        yield worker


def test_tls_with_a_client_certificate_and_the_token_is_served(secure_server, certificates):
    client = connect(secure_server.port, ssl_context=tls_context(certificates))
    assert client.health() is True
    client.authenticate("s3cret-token")
    assert client.status().server == f"127.0.0.1:{secure_server.port}"
    assert client.tokenize("Hello world", False, True) == [19556, 905]
    assert client.generate(thrift.GenerateRequest(prompt="Hi", max_tokens=3, ignore_eos=True)).usage.completion_tokens == 3
    client.close()


def test_without_the_token_calls_are_unauthorized_on_every_new_connection(secure_server, certificates):
    client = connect(secure_server.port, ssl_context=tls_context(certificates))
    for call in (client.status, lambda: client.tokenize("x", False, False),
                 lambda: client.generate(thrift.GenerateRequest(prompt="Hi")), lambda: client.cancel("x")):
        with pytest.raises(thrift.Unauthorized):
            call()
    with pytest.raises(thrift.Unauthorized):
        client.authenticate("wrong-token")
    with pytest.raises(thrift.Unauthorized):
        client.status()
    client.authenticate("s3cret-token")
    client.status()
    client.close()
    fresh = connect(secure_server.port, ssl_context=tls_context(certificates))
    with pytest.raises(thrift.Unauthorized):
        fresh.status()
    fresh.close()


def test_plain_tcp_and_tls_without_a_client_certificate_are_refused(secure_server, certificates):
    assert not answers_health(secure_server.port)
    assert not answers_health(secure_server.port, ssl_context=tls_context(certificates, client_certificate=False))
    assert answers_health(secure_server.port, ssl_context=tls_context(certificates))


def test_status_command_speaks_tls_and_auth(secure_server, certificates):
    address = f"127.0.0.1:{secure_server.port}"
    tls = ["--tls-ca", str(certificates / "ca.pem"), "--tls-cert", str(certificates / "client.pem"),
           "--tls-key", str(certificates / "client.key")]
    ok = run_cli("status", "--servers", address, *tls, "--auth-token-file", str(certificates / "token"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["status"]["server"] == address
    refused = run_cli("status", "--servers", address, *tls)
    assert refused.returncode == 1
    assert "Unauthorized" in json.loads(refused.stdout)["error"]


def test_generate_and_chat_speak_tls_and_auth(secure_server, certificates):
    address = f"127.0.0.1:{secure_server.port}"
    tls = ["--tls-ca", str(certificates / "ca.pem"), "--tls-cert", str(certificates / "client.pem"),
           "--tls-key", str(certificates / "client.key"), "--auth-token-file", str(certificates / "token")]
    generated = run_cli("generate", "--servers", address, *tls, "--max-tokens", "3", "--json", "Hello")
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["usage"]["completion_tokens"] == 3
    chat = subprocess.run([sys.executable, "-m", "ringlm.cli", "chat", "--servers", address, *tls,
                           "--max-tokens", "3"], input="Hi\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    plain = run_cli("generate", "--servers", address, "--max-tokens", "3", "Hello")
    assert plain.returncode != 0   # without TLS the server refuses the connection


# -- connections: unauthenticated time, open files, keepalive

def test_an_unauthenticated_connection_is_closed_after_the_auth_timeout_even_if_it_calls_health(model_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    flags = ["--auth-token-file", str(token_file), "--auth-timeout-s", "1"]
    with running_worker(model_dir, tmp_path / "worker.log", *flags) as worker:
        idle, authenticated = connect(worker.port), connect(worker.port)
        authenticated.authenticate("t0ken")

        def still_answers() -> bool:
            try:
                return idle.health()
            except Exception:   # closed by the server: the auth timeout
                return False

        wait_until(lambda: not still_answers(), timeout_s=30, what="the unauthenticated connection to close")
        assert authenticated.health() and authenticated.status().connections >= 1   # authenticated: kept
        authenticated.close()


def test_the_worker_raises_its_open_file_limit_for_its_connections(model_dir, tmp_path):
    worker = WorkerProcess(model_dir, tmp_path / "worker.log", "--max-connections", "2000",
                           soft_open_files=512).wait_ready()
    try:
        limits = Path(f"/proc/{worker.process.pid}/limits").read_text()
        soft = int(next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3])
        assert soft >= 2000
    finally:
        worker.stop()


def test_more_connections_than_the_hard_file_limit_allows_is_refused_at_start(model_dir, tmp_path):
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("the hard limit on open files is unlimited here")
    worker = WorkerProcess(model_dir, tmp_path / "worker.log", "--max-connections", str(hard + 1))
    assert worker.process.wait(timeout=120) == 2
    assert "needs" in worker.log() and "hard limit" in worker.log()


def test_connections_get_tcp_keepalive(model_dir, tmp_path):
    with running_worker(model_dir, tmp_path / "worker.log") as worker:
        client = connect(worker.port)
        assert client.health()
        sockets = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{worker.port} )"],
                                 capture_output=True, text=True, timeout=30).stdout
        assert "keepalive" in sockets, sockets
        client.close()


def test_wrong_tokens_are_slowed_and_then_the_connection_is_closed(model_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    with running_worker(model_dir, tmp_path / "worker.log", "--auth-token-file", str(token_file)) as worker:
        guesser = connect(worker.port)
        started = time.monotonic()
        for _ in range(5):
            with pytest.raises(thrift.Unauthorized):
                guesser.authenticate("guess")
        assert time.monotonic() - started >= 0.1 + 0.2 + 0.4 + 0.8 + 1.6   # the delays, doubling
        with pytest.raises(Exception):   # the fifth wrong token closed the connection
            guesser.authenticate("t0ken")
        honest = connect(worker.port)
        honest.authenticate("t0ken")
        assert honest.status().ready
        honest.close()
