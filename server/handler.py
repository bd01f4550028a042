"""The Generator service: validates Thrift requests, maps them onto the engine, raises typed errors.

`Service` is shared by every connection of a worker (engine, tokenizer, open
streams, limits); `ConnectionHandler` is created per connection and carries
that connection's authentication and the streams it opened, so a client that
goes away cancels its own work and nobody else's.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent

from ringlm.ext.sampling import SamplingParams
from ringlm.ext.tokenizer import Tokenizer
from ringlm.idl import ringlm_thrift as thrift
from ringlm.server.config import ServiceLimits
from ringlm.server.engine_loop import EngineLoop
from ringlm.server.engine import (Engine, FinishReason, GenerationRequest, GenerationResult, InvalidRequest,
                                  Overloaded, Priority, RequestHandle)

log = logging.getLogger(__name__)
request_log = logging.getLogger("ringlm.requests")

# The IDL's FinishReason names the engine's reasons one for one, but for SENT_AWAY, which never
# reaches a result: it is answered as Overloaded(draining), so the client runs the request elsewhere.
FINISH_REASONS = {reason: getattr(thrift.FinishReason, reason.name) for reason in FinishReason
                  if reason != FinishReason.SENT_AWAY}
SENT_AWAY_MESSAGE = "the server is draining and sent this request away; run it elsewhere"
AUTH_FAILURE_DELAY_S = 0.1        # the first wrong token's delay; it doubles with each one after
MAX_AUTH_FAILURE_DELAY_S = 2.0
MAX_AUTH_FAILURES = 5             # wrong tokens a connection may send before it is closed
MODEL_ERROR_MESSAGE = "the model produced invalid logits (NaN or all -inf) for this request"
NOT_AUTHENTICATED = "this server requires authenticate(token) first on each connection"
AUTH_FREE_METHODS = frozenset({"health", "ready", "authenticate"})   # callable before authenticate()
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "logit_bias")


@dataclass
class OpenStream:
    handle: RequestHandle
    owner: ConnectionHandler
    logprobs: bool                # whether the request asked for them
    last_polled: float = field(default_factory=time.monotonic)


class Service:
    """Everything the connections of one worker share."""

    def __init__(self, engine_loop: EngineLoop, tokenizer: Tokenizer, server_name: str, model_name: str,
                 limits: ServiceLimits | None = None, auth_token: str | None = None, metrics=None):
        self.engine_loop = engine_loop
        self.engine: Engine = engine_loop.engine
        self.tokenizer = tokenizer
        self.server_name = server_name
        self.model_name = model_name
        self.limits = limits or ServiceLimits()
        self.auth_token = auth_token
        self.metrics = metrics
        self.streams: dict[str, OpenStream] = {}
        self.connections = 0
        self.draining = False
        self.started = time.monotonic()

    def new_request_id(self) -> str:
        """An id nobody can guess: `cancel` and stream ids are only as private as the request id."""
        return f"{self.server_name}-{secrets.token_hex(12)}"

    def reap_idle_streams(self) -> None:
        """Drop finished streams whose last chunk nobody polled within the idle timeout of their end or
        their last poll, whichever came later (the worker calls
        this periodically). A running stream is never cancelled for being read slowly: a slow consumer
        keeps it, and an abandoned one ends with its connection (closed, idle, or found dead by TCP
        keepalive)."""
        horizon = time.monotonic() - self.limits.stream_idle_timeout_s
        for stream_id, stream in list(self.streams.items()):
            if stream.handle.finished and max(stream.last_polled, stream.handle.finished_at) < horizon:
                log.info("stream %s finished and not polled for %.0f s: dropped", stream_id,
                         self.limits.stream_idle_timeout_s)
                self.streams.pop(stream_id, None)
                stream.owner.opened_streams.discard(stream_id)

    def not_ready_because(self) -> str | None:
        """Why this worker should get no new work now, or None when it is ready (readiness: the model is
        loaded, since the Service exists; the engine loop runs and is not stuck in a step; not draining)."""
        if self.draining:
            return "draining"
        if not self.engine_loop.running:
            return "the engine loop is not running"
        stuck = self.engine_loop.stuck_for(time.monotonic())
        if stuck > self.limits.step_timeout_s:
            return f"a model step has run for {stuck:.0f} s (the watchdog's limit is {self.limits.step_timeout_s:g} s)"
        return None

    def stats(self) -> dict:
        """The engine's stats plus this worker's streams, connections, draining and readiness."""
        return {**self.engine.stats(), "open_streams": len(self.streams), "connections": self.connections,
                "draining": self.draining, "ready": self.not_ready_because() is None}

    def status(self) -> thrift.ServerStatus:
        stats = self.engine.stats()
        waiting = stats["waiting"]
        slots = stats["slots"]
        not_ready = self.not_ready_because()
        return thrift.ServerStatus(
            server=self.server_name, model=self.model_name, draining=self.draining,
            ready=not_ready is None, not_ready_reason=not_ready or "",
            running=stats["running"], waiting=waiting, slots=slots, slots_busy=stats["slots_busy"],
            load=(stats["running"] + sum(waiting.values())) / max(slots, 1),
            prefix_cache_lookups=stats["prefix_cache_lookups"], prefix_cache_hits=stats["prefix_cache_hits"],
            prefix_cache_hit_tokens=stats["prefix_cache_hit_tokens"],
            tokens_per_second=stats["tokens_per_second"], open_streams=len(self.streams),
            connections=self.connections, max_prompt_tokens=stats["max_seq_len"] - 1,
            max_tokens_limit=self.engine.config.max_tokens_limit,
            vocab_size=self.tokenizer.vocab_size, device=str(self.engine.model.device),
            dtype=str(self.engine.model.dtype).removeprefix("torch."),
            uptime_s=time.monotonic() - self.started, pid=os.getpid())


def invalid(field_name: str, message: str) -> thrift.InvalidRequest:
    return thrift.InvalidRequest(field=field_name, message=message)


def require_text(value, field_name: str) -> str:
    if not isinstance(value, str):
        raise invalid(field_name, "is required (a string)")
    return value


class ConnectionHandler:
    """The IDL's methods, for one connection.

    `wait_peer_gone` blocks until the client hangs up; `generate` watches it so
    that a client that goes away mid-generation cancels it.
    """

    def __init__(self, service: Service, wait_peer_gone: Callable[[], object] | None = None):
        self.service = service
        self.authenticated = service.auth_token is None
        self.auth_failures = 0
        self.closing = False          # the worker closes the connection after this call's reply
        self.opened_streams: set[str] = set()
        self.wait_peer_gone = wait_peer_gone

    # -- authentication

    def authenticate(self, token: str) -> None:
        expected = self.service.auth_token
        if expected is not None and not hmac.compare_digest((token or "").encode(), expected.encode()):
            # Each wrong guess on a connection waits twice as long as the one before it, and after a few the
            # connection is closed: guessing costs time and connections (themselves capped, and closed
            # when unauthenticated for --auth-timeout-s).
            self.auth_failures += 1
            gevent.sleep(min(AUTH_FAILURE_DELAY_S * 2 ** (self.auth_failures - 1), MAX_AUTH_FAILURE_DELAY_S))
            self.closing = self.auth_failures >= MAX_AUTH_FAILURES
            raise thrift.Unauthorized(message="wrong auth token")
        self.authenticated = True

    def refusal(self, method: str) -> thrift.Unauthorized | None:
        """Unauthorized if this connection may not call `method` yet: decided by the name alone, so the
        worker refuses such a call before it reads (or even checks) the arguments."""
        if self.authenticated or method in AUTH_FREE_METHODS:
            return None
        return thrift.Unauthorized(message=NOT_AUTHENTICATED)

    def _check_auth(self) -> None:
        if not self.authenticated:
            raise thrift.Unauthorized(message=NOT_AUTHENTICATED)

    def health(self) -> bool:
        """Liveness: the process answers and its engine loop runs (a dead loop also exits the worker)."""
        return self.service.engine_loop.running

    def ready(self) -> bool:
        """Readiness: whether to send this worker new work (see Service.not_ready_because)."""
        return self.service.not_ready_because() is None

    # -- generation

    def generate(self, request: thrift.GenerateRequest) -> thrift.GenerateResult:
        self._check_auth()
        handle = self._submit(request)
        watcher = gevent.spawn(self._cancel_when_gone, handle) if self.wait_peer_gone else None
        try:
            result = handle.result()
        finally:
            if watcher is not None:
                watcher.kill(block=False)
        self._log(result)
        if result.finish_reason == FinishReason.SENT_AWAY:
            raise thrift.Overloaded(message=SENT_AWAY_MESSAGE, retry_after_ms=0, draining=True)
        if result.finish_reason == FinishReason.ERROR:
            raise thrift.ModelError(message=MODEL_ERROR_MESSAGE)
        thrift_result = self._to_thrift(result, request.logprobs or bool(request.top_logprobs))
        if result.finish_reason == FinishReason.DEADLINE:
            raise thrift.DeadlineExceeded(message=f"deadline of {request.deadline_ms} ms passed",
                                          partial=thrift_result)
        if result.finish_reason == FinishReason.CANCELLED:
            raise thrift.Cancelled(message="the request was cancelled", partial=thrift_result)
        return thrift_result

    def _cancel_when_gone(self, handle: RequestHandle) -> None:
        self.wait_peer_gone()
        log.info("client of %s hung up: cancelled", handle.request_id)
        handle.cancel()

    def open_stream(self, request: thrift.GenerateRequest) -> str:
        self._check_auth()
        limit = self.service.limits.max_open_streams
        if len(self.service.streams) >= limit:
            raise thrift.Overloaded(message=f"{limit} streams are open, the server's limit",
                                    retry_after_ms=self.service.engine.scheduler.retry_after_ms(),
                                    draining=self.service.draining)
        if request is not None and request.request_id in self.service.streams:
            # A finished stream whose last chunk nobody read yet keeps its id until it is read.
            raise invalid("request_id", f"'{request.request_id}' names a stream that is still open")
        handle = self._submit(request)
        self.service.streams[handle.request_id] = OpenStream(
            handle, self, logprobs=request.logprobs or bool(request.top_logprobs))
        self.opened_streams.add(handle.request_id)
        return handle.request_id

    def next_chunk(self, stream_id: str, wait_ms: int) -> thrift.StreamChunk:
        self._check_auth()
        if wait_ms is None or wait_ms < 0:
            raise invalid("wait_ms", "must be >= 0")
        stream = self.service.streams.get(stream_id)
        if stream is None or stream.owner is not self:
            # Another connection's stream is as good as absent: its chunks are its owner's alone.
            raise invalid("stream_id", f"no open stream '{stream_id}' on this connection")
        stream.last_polled = time.monotonic()
        output = stream.handle.poll(min(wait_ms, self.service.limits.max_wait_ms) / 1000)
        chunk = thrift.StreamChunk(token_ids=output.token_ids, text=output.text, done=False,
                                   logprobs=output.logprobs if stream.logprobs else None)
        if output.finished:
            self.service.streams.pop(stream_id, None)
            stream.owner.opened_streams.discard(stream_id)
            result = stream.handle.result()
            self._log(result)
            if result.finish_reason == FinishReason.SENT_AWAY:
                # What came since the last poll is dropped: the client resumes elsewhere from what it has.
                raise thrift.Overloaded(message=SENT_AWAY_MESSAGE, retry_after_ms=0, draining=True)
            chunk.done, chunk.result = True, self._to_thrift(result, stream.logprobs)
        stream.last_polled = time.monotonic()
        return chunk

    def cancel(self, request_id: str) -> bool:
        self._check_auth()
        return self.service.engine.cancel(require_text(request_id, "request_id"))

    def close(self) -> None:
        """The connection ended: cancel the streams it opened."""
        for stream_id in list(self.opened_streams):
            stream = self.service.streams.pop(stream_id, None)
            if stream is not None:
                stream.handle.cancel()
        self.opened_streams.clear()

    # -- tokens

    def tokenize(self, text: str, add_special_tokens: bool, parse_special: bool) -> list[int]:
        self._check_auth()
        require_text(text, "text")
        try:
            return self.service.tokenizer.encode(text, add_special_tokens=bool(add_special_tokens),
                                                 parse_special=bool(parse_special))
        except ValueError as error:
            raise invalid("text", str(error)) from None

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        self._check_auth()
        try:
            return self.service.tokenizer.decode(token_ids or [], skip_special_tokens=bool(skip_special_tokens))
        except ValueError as error:
            raise invalid("token_ids", str(error)) from None

    def apply_chat_template(self, messages: list, add_generation_prompt: bool) -> str:
        self._check_auth()
        return self._render(messages, add_generation_prompt is not False)

    def status(self) -> thrift.ServerStatus:
        self._check_auth()
        return self.service.status()

    # -- conversions

    def _submit(self, request: thrift.GenerateRequest) -> RequestHandle:
        try:
            if self.service.draining:
                raise thrift.Overloaded(message="the server is draining; send new requests elsewhere",
                                        retry_after_ms=0, draining=True)
            try:
                return self.service.engine.submit(self._to_engine(request))
            except InvalidRequest as error:
                raise invalid(error.field, error.message) from None
            except Overloaded as error:
                raise thrift.Overloaded(message=str(error), retry_after_ms=error.retry_after_ms,
                                        draining=False) from None
        except (thrift.InvalidRequest, thrift.Overloaded) as error:
            self._log_refusal(request, error)
            raise

    def _to_engine(self, request: thrift.GenerateRequest) -> GenerationRequest:
        if request is None:
            raise invalid("request", "is required")
        limits = self.service.limits
        if request.request_id is not None and not 0 < len(request.request_id) <= limits.max_request_id_length:
            raise invalid("request_id", f"must be 1..{limits.max_request_id_length} characters")
        if request.session is not None and len(request.session) > limits.max_session_length:
            raise invalid("session", f"at most {limits.max_session_length} characters")
        if len(request.stop_token_ids or ()) > limits.max_stop_token_ids:
            raise invalid("stop_token_ids", f"at most {limits.max_stop_token_ids} stop token ids")
        stop = list(request.stop or [])
        if len(stop) > limits.max_stop_strings or any(len(s) > limits.max_stop_length for s in stop):
            raise invalid("stop", f"at most {limits.max_stop_strings} stop strings of at most "
                                  f"{limits.max_stop_length} characters")
        if request.priority not in (None, *Priority):
            raise invalid("priority", f"unknown priority {request.priority}")
        deadline = None
        if request.deadline_ms is not None:
            if not 0 < request.deadline_ms <= limits.max_deadline_ms:
                raise invalid("deadline_ms", f"must be in 1..{limits.max_deadline_ms}")
            deadline = time.monotonic() + request.deadline_ms / 1000
        max_tokens = 256 if request.max_tokens is None else request.max_tokens
        return GenerationRequest(
            request_id=request.request_id or self.service.new_request_id(),
            prompt_ids=self._prompt_ids(request),
            sampling=self._sampling(request.sampling),
            max_tokens=max_tokens,
            stop=tuple(stop),
            stop_token_ids=tuple(request.stop_token_ids or ()),
            ignore_eos=bool(request.ignore_eos),
            priority=Priority(request.priority if request.priority is not None else Priority.NORMAL),
            deadline=deadline,
            top_logprobs=request.top_logprobs or 0,
            resume_ids=tuple(request.resume_ids or ()))

    def _prompt_ids(self, request: thrift.GenerateRequest) -> list[int]:
        given = [name for name in ("prompt", "prompt_ids", "messages") if getattr(request, name) is not None]
        if len(given) != 1:
            raise invalid("prompt", "give exactly one of prompt, prompt_ids or messages")
        tokenizer = self.service.tokenizer
        try:
            if request.prompt is not None:
                return tokenizer.encode(request.prompt, add_special_tokens=True,
                                        parse_special=bool(request.parse_special))
        except ValueError as error:
            raise invalid(given[0], str(error)) from None
        if request.messages is not None:
            return self._with_template(tokenizer.encode_chat, request.messages,
                                       request.add_generation_prompt is not False)
        return list(request.prompt_ids)

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        return self._with_template(self.service.tokenizer.apply_chat_template, messages, add_generation_prompt)

    def _with_template(self, apply, messages: list, add_generation_prompt: bool):
        """apply(messages as dicts, add_generation_prompt) with the template's failures as InvalidRequest."""
        if not messages or len(messages) > self.service.limits.max_messages:
            raise invalid("messages", f"give 1..{self.service.limits.max_messages} messages")
        plain = [{"role": m.role, "content": m.content} for m in messages if m is not None]
        try:
            return apply(plain, add_generation_prompt)
        except ValueError as error:
            raise invalid("messages", str(error)) from None
        except Exception as error:   # a template's raise_exception() or a rendering fault
            raise invalid("messages", f"the chat template refused them: {error}") from None

    def _sampling(self, options: thrift.SamplingOptions | None) -> SamplingParams:
        if options is None:
            return SamplingParams(temperature=0.0)
        values = {name: getattr(options, name) for name in SAMPLING_FIELDS if getattr(options, name) is not None}
        bias = values.get("logit_bias") or {}
        if len(bias) > self.service.limits.max_logit_bias:
            raise invalid("sampling.logit_bias", f"at most {self.service.limits.max_logit_bias} entries")
        try:
            return SamplingParams(**values)
        except (ValueError, TypeError) as error:
            name = getattr(error, "field", None) or next((n for n in values if n in str(error)), "sampling")
            raise invalid(f"sampling.{name}", str(error)) from None

    def _to_thrift(self, result: GenerationResult, logprobs: bool) -> thrift.GenerateResult:
        per_token = ((result.total_ms - result.ttft_ms) / (result.completion_tokens - 1)
                     if result.completion_tokens > 1 else 0.0)
        top = None
        if result.top_logprobs and any(result.top_logprobs):
            top = [[thrift.TokenLogprob(token_id=int(t), logprob=float(lp)) for t, lp in row]
                   for row in result.top_logprobs]
        return thrift.GenerateResult(
            request_id=result.request_id, text=result.text, token_ids=list(result.token_ids),
            finish_reason=FINISH_REASONS[result.finish_reason],
            stop_reason=None if result.stop_reason is None else str(result.stop_reason),
            logprobs=list(result.logprobs) if logprobs else None,
            top_logprobs=top,
            usage=thrift.Usage(prompt_tokens=result.prompt_tokens,
                               cached_prompt_tokens=result.cached_prompt_tokens,
                               completion_tokens=result.completion_tokens),
            timings=thrift.Timings(queue_ms=result.queue_ms, ttft_ms=result.ttft_ms,
                                   total_ms=result.total_ms, per_token_ms=per_token),
            server=self.service.server_name, prompt_token_count=result.prompt_tokens)

    def _log(self, result: GenerationResult) -> None:
        request_log.info("request id=%s outcome=%s prompt=%d cached=%d completion=%d queue_ms=%.1f "
                         "ttft_ms=%.1f total_ms=%.1f", result.request_id, result.finish_reason.value,
                         result.prompt_tokens, result.cached_prompt_tokens, result.completion_tokens,
                         result.queue_ms, result.ttft_ms, result.total_ms)
        if self.service.metrics is not None:
            self.service.metrics.observe_result(result)

    def _log_refusal(self, request: thrift.GenerateRequest | None, error: Exception) -> None:
        outcome = "invalid" if isinstance(error, thrift.InvalidRequest) else "overloaded"
        detail = f"field={error.field}" if outcome == "invalid" else f"draining={error.draining}"
        request_id = getattr(request, "request_id", None) or "-"
        request_log.info("request id=%s outcome=%s %s message=%r", request_id, outcome, detail, error.message)
        if self.service.metrics is not None:
            self.service.metrics.observe_refusal(outcome)
