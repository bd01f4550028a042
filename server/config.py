"""The settings of one worker process, and the command-line flags that carry them (`ringlm serve`, workers).

`WorkerConfig` is the one source: each field is a `--flag` (its type from the
type hint, its help text and allowed range from the field's metadata), it
checks itself when built, and it builds the engine's `EngineConfig` and the
handler's `ServiceLimits`, taking their defaults from them. Kept apart from the
worker so that the command line and the supervisor read it without importing
torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass

from ringlm.server.engine.config import EngineConfig


@dataclass
class ServiceLimits:
    """Per-request limits the handler enforces beyond the engine's (prompt length, max_tokens).

    Each is also a WorkerConfig flag, whose help says what it limits.
    """

    max_open_streams: int = 256
    stream_idle_timeout_s: float = 600.0
    max_wait_ms: int = 30_000
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_logit_bias: int = 1024
    max_messages: int = 512
    max_deadline_ms: int = 24 * 3600 * 1000
    max_request_id_length: int = 128
    max_stop_token_ids: int = 64
    max_session_length: int = 256
    step_timeout_s: float = 120.0


def option(default, help: str, *, at_least: float | None = None, above: float | None = None,
           at_most: float | None = None):
    """A WorkerConfig field: its default, its flag's help text and the range a value must lie in."""
    return dataclasses.field(default=default, metadata={"help": help, "at_least": at_least, "above": above,
                                                        "at_most": at_most})


@dataclass
class WorkerConfig:
    """Everything one worker process needs; each field is also a `--flag` of `ringlm serve`."""

    model: str = option("default", "'default' (SmolLM2-135M-Instruct), a .gguf file or a Hugging Face folder")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(9090, "port to listen on (with --workers N: the first of N)", at_least=1, at_most=65535)
    device: str | None = option(None, "torch device (default: cuda:<worker index modulo GPUs> when there are "
                                      "GPUs, else cpu)")
    dtype: str | None = option(None, "float32, bfloat16 or float16 (default: bfloat16 on a GPU, float32 on the CPU)")
    worker_index: int = option(0, "this worker's index among its supervisor's workers (picks its GPU)", at_least=0)
    torch_threads: int | None = option(None, "torch intra-op threads (default: 1 on up to 4 cores, else all but 2)",
                                       at_least=1)

    # the engine's settings (EngineConfig)
    num_slots: int = option(EngineConfig.num_slots, "requests that run at once (one KV-cache slot each)",
                            at_least=1)
    max_seq_len: int = option(EngineConfig.max_seq_len, "prompt + generated tokens per request (capped by the "
                                                        "model's context)", at_least=1)
    max_batch_tokens: int = option(EngineConfig.max_batch_tokens, "tokens per engine step", at_least=1)
    max_tokens_limit: int = option(EngineConfig.max_tokens_limit, "the largest max_tokens a request may ask for",
                                   at_least=1)
    max_waiting: int = option(EngineConfig.max_waiting, "queued requests per priority before Overloaded",
                              at_least=1)
    max_top_logprobs: int = option(EngineConfig.max_top_logprobs, "the largest top_logprobs a request may ask for",
                                   at_least=0)
    priority_aging_s: float = option(EngineConfig.priority_aging_s, "seconds a waiting request takes to move up "
                                                                    "one priority (0: never)", at_least=0)
    prefix_cache: bool = option(EngineConfig.prefix_cache, "reuse the KV cache of earlier requests that share a "
                                                           "prompt's beginning")

    # the handler's per-request limits (ServiceLimits)
    max_open_streams: int = option(ServiceLimits.max_open_streams, "streams open at once before open_stream is "
                                                                   "Overloaded", at_least=1)
    stream_idle_timeout_s: float = option(ServiceLimits.stream_idle_timeout_s, "seconds a finished stream keeps "
                                          "its last chunk for a client that has not polled it", above=0)
    max_wait_ms: int = option(ServiceLimits.max_wait_ms, "the longest a next_chunk call waits for tokens",
                              at_least=1)
    max_stop_strings: int = option(ServiceLimits.max_stop_strings, "stop strings per request", at_least=0)
    max_stop_length: int = option(ServiceLimits.max_stop_length, "characters per stop string", at_least=1)
    max_logit_bias: int = option(ServiceLimits.max_logit_bias, "logit_bias entries per request", at_least=0)
    max_messages: int = option(ServiceLimits.max_messages, "chat messages per request", at_least=1)
    max_deadline_ms: int = option(ServiceLimits.max_deadline_ms, "the longest deadline_ms a request may ask for",
                                  at_least=1)
    max_request_id_length: int = option(ServiceLimits.max_request_id_length, "characters in a request's own id "
                                        "(ids end up in logs and metrics)", at_least=1)
    max_stop_token_ids: int = option(ServiceLimits.max_stop_token_ids, "stop token ids per request", at_least=0)
    max_session_length: int = option(ServiceLimits.max_session_length, "characters in a request's session key",
                                     at_least=1)
    step_timeout_s: float = option(ServiceLimits.step_timeout_s, "a model step running longer than this makes "
                                   "the worker not ready (the watchdog) until it returns", above=0)

    # connections, drain and the rest of the worker
    max_connections: int = option(1024, "open connections; one more is closed at once", at_least=1)
    max_frame_bytes: int = option(1 << 20, "largest framed message; a longer length header closes the connection",
                                  at_least=1)
    idle_timeout_s: float = option(300.0, "seconds a connection may stay silent between calls", above=0)
    auth_timeout_s: float = option(10.0, "with --auth-token-file: seconds a connection may stay unauthenticated "
                                         "(health calls do not extend it)", above=0)
    frame_timeout_s: float = option(10.0, "seconds a frame (and a TLS handshake) may take to arrive once started, "
                                          "and a reply to be taken by the client",
                                    above=0)
    drain_grace_s: float = option(30.0, "seconds SIGTERM waits for running work before exiting", at_least=0)
    metrics_port: int | None = option(None, "serve Prometheus metrics on this port (with --workers N: the first "
                                            "of N)", at_least=1, at_most=65535)
    tls_cert: str | None = option(None, "server certificate (PEM): turns TLS on")
    tls_key: str | None = option(None, "the server certificate's private key (PEM)")
    tls_ca: str | None = option(None, "CA certificate (PEM): clients must present a certificate it signed")
    auth_token_file: str | None = option(None, "file with a shared token: clients must authenticate() with it")
    debug_blocking_ms: float | None = option(None, "report (with its stack) any greenlet that holds the gevent hub "
                                                   "this long", above=0)
    zookeeper: str | None = option(None, "ZooKeeper hosts (host:port,...[/chroot]): register this worker there "
                                         "for clients to find")
    weight: float = option(1.0, "this worker's share of the ring's keys relative to others, as registered in "
                                "ZooKeeper", above=0)
    zookeeper_auth_file: str | None = option(None, "file with ZooKeeper digest credentials (user:password): only "
                                                   "they may change or delete this worker's znode")

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            check_range(item, getattr(self, item.name))
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("--tls-ca (client certificates) needs --tls-cert and --tls-key")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.values_for(EngineConfig))

    def service_limits(self) -> ServiceLimits:
        return ServiceLimits(**self.values_for(ServiceLimits))

    def values_for(self, settings: type) -> dict:
        """This config's values for each field of the dataclass `settings` (every one of them is a flag)."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(settings)}


def check_range(item: dataclasses.Field, value) -> None:
    """Raise ValueError naming the flag when `value` is outside the range in the field's metadata."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return   # None (unset), text and switches have no range
    flag, bounds = flag_name(item.name), item.metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    if bounds["at_least"] is not None and not value >= bounds["at_least"]:
        raise ValueError(f"{flag} must be at least {bounds['at_least']}, got {value}")
    if bounds["above"] is not None and not value > bounds["above"]:
        raise ValueError(f"{flag} must be greater than {bounds['above']}, got {value}")
    if bounds["at_most"] is not None and not value <= bounds["at_most"]:
        raise ValueError(f"{flag} must be at most {bounds['at_most']}, got {value}")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def flag_type(hint) -> type:
    """The type a flag's value parses to: the hint itself, or X for `X | None`."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)] or [hint]
    if len(kinds) != 1:
        raise TypeError(f"a WorkerConfig field must be one type or that type | None, not {hint}")
    return kinds[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per WorkerConfig field, named after it; a boolean gets `--flag` and `--no-flag`."""
    hints = typing.get_type_hints(WorkerConfig)
    for item in dataclasses.fields(WorkerConfig):
        kind = flag_type(hints[item.name])
        how = ({"action": argparse.BooleanOptionalAction} if kind is bool
               else {"type": kind, "metavar": item.name.split("_")[-1].upper()})
        shown = "" if item.default is None else f" (default: {item.default})"
        parser.add_argument(flag_name(item.name), dest=item.name, default=item.default,
                            help=item.metadata["help"] + shown, **how)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """The WorkerConfig of parsed flags; ValueError naming the flag when a value is out of range."""
    return WorkerConfig(**{item.name: getattr(args, item.name) for item in dataclasses.fields(WorkerConfig)})


def config_to_argv(config: WorkerConfig) -> list[str]:
    """The flags that recreate `config` (the supervisor starts workers with them)."""
    argv = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, bool):
            argv.append(flag_name(item.name if value else "no_" + item.name))
        elif value is not None:
            # `--flag=value`, so that a value starting with "-" is not read as a flag
            argv.append(f"{flag_name(item.name)}={value}")
    return argv
