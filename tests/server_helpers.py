"""Helpers for the server tests: a tiny model folder, worker processes on free ports, clients, raw frames."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.rpc import make_client
from thriftpy2.thrift import TMessageType
from thriftpy2.transport import TCyFramedTransportFactory
from thriftpy2.transport.memory import TCyMemoryBuffer

from ringlm.client import probe
from ringlm.idl import ringlm_thrift as thrift

READY_TIMEOUT_S = 120.0   # a worker imports torch and loads the model: seconds, slower on a busy machine
POLL_S = 0.1


def write_tiny_model(folder: Path) -> Path:
    """A Hugging Face folder: a two-layer random model with SmolLM2's real tokenizer and chat template."""
    from ringlm.ext.tokenizer import Tokenizer
    from ringlm.ext.model_files import default_model_path
    from ringlm.server.model import ModelConfig, random_weights
    from ringlm.server.model.weights import save_hf
    from tests.tokenizer_oracle import hf_tokenizer

    spec = Tokenizer.from_gguf(default_model_path()).spec
    config = ModelConfig.tiny(vocab_size=len(spec.tokens), max_position_embeddings=512)
    save_hf(config, random_weights(config, seed=3), folder)
    hf_tokenizer(spec).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": spec.chat_template, "add_bos_token": spec.add_bos,
        "bos_token": spec.tokens[spec.bos_id] if spec.bos_id is not None else None,
        "eos_token": spec.tokens[spec.eos_id]}))
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connect(port: int, timeout_s: float = 30.0, **tls):
    """A thriftpy2 client (Cython binary protocol, framed transport), as ringlm's own clients use."""
    return make_client(thrift.Generator, "127.0.0.1", port, proto_factory=TCyBinaryProtocolFactory(),
                       trans_factory=TCyFramedTransportFactory(), timeout=int(timeout_s * 1000), **tls)


def wait_until(condition, timeout_s: float = 30.0, what: str = "condition"):
    """Poll condition() until it returns something true; that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def answers_health(port: int, ssl_context=None) -> bool:
    """The client's own health probe, on a local worker's port."""
    return probe.answers_health(f"127.0.0.1:{port}", ssl_context=ssl_context)


class WorkerProcess:
    """`python -m ringlm.server.worker` on a free port; stderr goes to a log file the tests can read."""

    def __init__(self, model: Path, log_path: Path, *flags: str, port: int | None = None,
                 soft_open_files: int | None = None, **tls):
        self.port = port or free_port()
        self.log_path = log_path
        self.tls = tls
        argv = [sys.executable, "-m", "ringlm.server.worker", "--model", str(model), "--port", str(self.port),
                "--torch-threads", "1", "--max-seq-len", "256", *flags]

        def limit_open_files() -> None:   # in the child, before it runs: as a low `ulimit -Sn` would
            import resource
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft_open_files, hard))

        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=limit_open_files if soft_open_files else None)

    def wait_ready(self) -> WorkerProcess:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not answers_health(self.port, **self.tls):
            if self.process.poll() is not None:
                raise AssertionError(f"the worker exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the worker did not answer within {READY_TIMEOUT_S} s:\n{self.log()}")
            time.sleep(POLL_S)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@contextmanager
def running_worker(model: Path, log_path: Path, *flags: str, **tls):
    worker = WorkerProcess(model, log_path, *flags, **tls)
    try:
        yield worker.wait_ready()
    finally:
        worker.stop()


# -- raw frames, for what no well-behaved client sends

def message(method: str, args=None, seqid: int = 1) -> bytes:
    """A binary-protocol call of `method` with `args` (a thriftpy2 struct), unframed."""
    protocol = TCyBinaryProtocol(TCyMemoryBuffer())
    protocol.write_message_begin(method, TMessageType.CALL, seqid)
    if args is None:
        protocol.trans.write(b"\x00")   # an empty struct: just STOP
    else:
        protocol.write_struct(args)
    return protocol.trans.getvalue()


def frame(body: bytes) -> bytes:
    return struct.pack("!i", len(body)) + body


def raw_connection(port: int, timeout_s: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_reply(sock: socket.socket):
    """(message type, name, the result struct's raw bytes) of the next reply, or None if the server closed."""
    header = recv_exactly(sock, 4)
    if header is None:
        return None
    size, = struct.unpack("!i", header)
    body = recv_exactly(sock, size)
    protocol = TCyBinaryProtocol(TCyMemoryBuffer(body))
    name, message_type, _ = protocol.read_message_begin()
    return message_type, name, protocol


def recv_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def closed_by_server(sock: socket.socket, timeout_s: float = 10.0) -> bool:
    """True when the server closes the connection (EOF or reset) within timeout_s."""
    sock.settimeout(timeout_s)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def write_certificates(folder: Path) -> Path:
    """A CA (ca.pem), a server certificate for 127.0.0.1 (server.pem, server.key) and a client certificate
    (client.pem, client.key), all signed by the CA, written into folder with the openssl command."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca_key, ca_cert = folder / "ca.key", folder / "ca.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_cert),
            "-days", "2", "-subj", "/CN=ringlm test CA")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        key, request, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(request),
                "-subj", f"/CN=ringlm test {name}")
        (folder / f"{name}.ext").write_text(extension + "\n")
        openssl("x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(folder / f"{name}.ext"))
    return folder


def tiny_model_folder(tmp_path_factory) -> Path:
    """The tiny model folder, written once per test session and shared by the server test modules."""
    folder = tmp_path_factory.getbasetemp() / "tiny-model"
    if not (folder / "tokenizer_config.json").exists():
        write_tiny_model(folder)
    return folder


# -- `ringlm serve`: the supervisor and its workers

def consecutive_free_ports(count: int) -> int:
    """A port P such that P..P+count-1 are free now."""
    for _ in range(50):
        base = free_port()
        try:
            for offset in range(count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise AssertionError("no run of free ports")


def parent_pid(pid: int) -> int | None:
    """The parent of process `pid` (from /proc), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])   # the name in parentheses may hold spaces


class SupervisedCluster:
    """`ringlm serve --workers N` on consecutive free ports: the supervisor process, whose workers
    are found through their `status` (its pid) and killed one by one with `kill_worker`."""

    def __init__(self, model: Path | str, log_path: Path, workers: int, *flags: str, metrics: bool = False):
        self.port = consecutive_free_ports(workers)
        self.ports = [self.port + index for index in range(workers)]
        self.addresses = [f"127.0.0.1:{port}" for port in self.ports]
        self.metrics_port = consecutive_free_ports(workers) if metrics else None
        self.log_path = log_path
        argv = [sys.executable, "-m", "ringlm.cli", "serve", "--model", str(model), "--port", str(self.port),
                "--workers", str(workers), "--torch-threads", "1", "--max-seq-len", "256", *flags]
        if self.metrics_port is not None:
            argv += ["--metrics-port", str(self.metrics_port)]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> SupervisedCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def status(self, port: int, timeout_s: float = 5.0):
        """The worker's ServerStatus, or None when it does not answer (dead, restarting, loading)."""
        try:
            return probe.probe(f"127.0.0.1:{port}", "status", timeout_s=timeout_s)
        except Exception:   # refused, reset or timed out: not there now
            return None

    def worker_pid(self, port: int) -> int | None:
        """The pid of the worker answering on `port`, if it is this supervisor's child."""
        status = self.status(port)
        if status is None or parent_pid(status.pid) != self.process.pid:
            return None
        return status.pid

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> SupervisedCluster:
        """Wait until every worker answers `status` as ready; fails with the log if the supervisor exits."""
        deadline = time.monotonic() + timeout_s
        waiting = list(self.ports)
        while waiting:
            if self.process.poll() is not None:
                raise AssertionError(f"the supervisor exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"workers on {waiting} not ready within {timeout_s} s:\n{self.log()[-5000:]}")
            waiting = [port for port in waiting if not getattr(self.status(port), "ready", False)]
            if waiting:
                time.sleep(POLL_S)
        return self

    def kill_worker(self, port: int) -> int | None:
        """SIGKILL the worker on `port` (never the supervisor); its pid, or None when none answered."""
        pid = self.worker_pid(port)
        if pid is None:
            return None
        os.kill(pid, signal.SIGKILL)
        return pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM the supervisor (its workers drain) and wait; kill it if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()   # its workers get SIGTERM from the kernel (PR_SET_PDEATHSIG)
                self.process.wait()
        return self.process.returncode
