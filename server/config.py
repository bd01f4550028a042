"""The settings of one worker process, and the command-line flags that carry them (`ringlm serve`, workers).

Kept apart from the worker so that the command line and the supervisor read
them without importing torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass


@dataclass
class WorkerConfig:
    """Everything one worker process needs; each field is also a `--flag` of `ringlm serve`."""

    model: str = "default"
    host: str = "127.0.0.1"
    port: int = 9090
    device: str | None = None
    dtype: str | None = None
    worker_index: int = 0
    torch_threads: int | None = None
    num_slots: int = 16
    max_seq_len: int = 2048
    max_batch_tokens: int = 256
    max_tokens_limit: int = 4096
    max_waiting: int = 256
    max_connections: int = 1024
    max_frame_bytes: int = 1 << 20
    idle_timeout_s: float = 300.0
    frame_timeout_s: float = 10.0
    max_open_streams: int = 256
    stream_idle_timeout_s: float = 60.0
    drain_grace_s: float = 30.0
    metrics_port: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    auth_token_file: str | None = None
    debug_blocking_ms: float | None = None
    zookeeper: str | None = None
    zookeeper_auth_file: str | None = None
    weight: float = 1.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


HELP = {
    "model": "'default' (SmolLM2-135M-Instruct), a .gguf file or a Hugging Face folder",
    "host": "address to listen on",
    "port": "port to listen on (with --workers N: the first of N)",
    "device": "torch device (default: cuda:<worker index modulo GPUs> when there are GPUs, else cpu)",
    "dtype": "float32, bfloat16 or float16 (default: bfloat16 on a GPU, float32 on the CPU)",
    "worker_index": "this worker's index among its supervisor's workers (picks its GPU)",
    "torch_threads": "torch intra-op threads (default: 1 on up to 4 cores, else all but 2)",
    "num_slots": "requests that run at once (one KV-cache slot each)",
    "max_seq_len": "prompt + generated tokens per request (capped by the model's context)",
    "max_batch_tokens": "tokens per engine step",
    "max_tokens_limit": "the largest max_tokens a request may ask for",
    "max_waiting": "queued requests per priority before Overloaded",
    "max_connections": "open connections; one more is closed at once",
    "max_frame_bytes": "largest framed message; a longer length header closes the connection",
    "idle_timeout_s": "seconds a connection may stay silent between calls",
    "frame_timeout_s": "seconds a frame (and a TLS handshake) may take to arrive once started",
    "max_open_streams": "streams open at once before open_stream is Overloaded",
    "stream_idle_timeout_s": "seconds a stream may go unpolled before it is cancelled",
    "drain_grace_s": "seconds SIGTERM waits for running work before exiting",
    "metrics_port": "serve Prometheus metrics on this port (with --workers N: the first of N)",
    "tls_cert": "server certificate (PEM): turns TLS on",
    "tls_key": "the server certificate's private key (PEM)",
    "tls_ca": "CA certificate (PEM): clients must present a certificate it signed",
    "auth_token_file": "file with a shared token: clients must authenticate() with it",
    "debug_blocking_ms": "report (with its stack) any greenlet that holds the gevent hub this long",
    "zookeeper": "ZooKeeper hosts (host:port,...[/chroot]): register this worker there for clients to find",
    "zookeeper_auth_file": "file with ZooKeeper digest credentials (user:password): only they may change or "
                           "delete this worker's znode",
    "weight": "this worker's share of the ring's keys relative to others, as registered in ZooKeeper",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per WorkerConfig field, named after it."""
    for item in dataclasses.fields(WorkerConfig):
        kind = {"int": int, "float": float}.get(str(item.type).split(" ")[0], str)
        shown = "" if item.default is None else f" (default: {item.default})"
        parser.add_argument("--" + item.name.replace("_", "-"), dest=item.name, type=kind, default=item.default,
                            metavar=item.name.split("_")[-1].upper(), help=HELP[item.name] + shown)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(**{item.name: getattr(args, item.name) for item in dataclasses.fields(WorkerConfig)})


def config_to_argv(config: WorkerConfig) -> list[str]:
    """The flags that recreate `config` (the supervisor starts workers with them)."""
    argv = []
    for item in dataclasses.fields(WorkerConfig):
        value = getattr(config, item.name)
        if value is not None:
            argv += ["--" + item.name.replace("_", "-"), str(value)]
    return argv
