"""The engine: continuous batching of every request through one model runner, one step at a time.

`step()` is three calls: the scheduler plans (ends, admissions, preemptions,
the batch), the runner computes (prefix copies, forward, sampling) through the
`offload` function the caller supplied (a server runs it on a native thread so
its event loop keeps serving sockets), and the engine post-processes: each
request's new token, stop checks, finishing. Callers talk to it through
`submit` (a `RequestHandle` back) and `cancel`; nothing here imports a
concurrency library: waiting uses the Event class the caller passes.

Only one thread at a time may call `step`; `submit` and `cancel` must come
from that same thread or greenlet hub (a server's engine loop and its
handlers share one gevent hub).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from ringlm.ext.sampling import SamplingParams
from ringlm.ext.tokenizer import Tokenizer
from ringlm.server.engine.config import EngineConfig
from ringlm.server.engine.request import (FinishReason, GenerationRequest, InvalidRequest, Priority,
                                          RequestHandle, RequestState)
from ringlm.server.engine.runner import ModelRunner, SampledToken, StepSamples
from ringlm.server.engine.scheduler import Plan, Scheduler
from ringlm.server.engine.throughput import Throughput
from ringlm.server.model.llama import Llama

log = logging.getLogger(__name__)

T = TypeVar("T")


def run_here(function: Callable[..., T], *args) -> T:
    """The default `offload`: run the model step in the calling thread."""
    return function(*args)


class Engine:
    def __init__(self, model: Llama, tokenizer: Tokenizer, config: EngineConfig | None = None, *,
                 offload: Callable[..., StepSamples] = run_here,
                 new_event: Callable[[], object] = threading.Event):
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.runner = ModelRunner.create(model, self.config.num_slots, self.config.max_seq_len)
        self.scheduler = Scheduler(self.config.num_slots, self.config.max_batch_tokens, self.config.max_waiting,
                                   self.config.prefix_cache, self.config.priority_aging_s)
        self.offload = offload
        self.new_event = new_event
        self.in_flight: dict[str, RequestState] = {}
        self.work_ready = new_event()            # set by submit and cancel: the loop has something to do
        self._arrivals = itertools.count()
        self._seeds = np.random.default_rng()     # seeds for requests that bring none
        self.throughput = Throughput()
        self.counters = {"steps": 0, "step_seconds": 0.0, "generated_tokens": 0, "prompt_tokens": 0,
                         **{f"finished_{r.value}": 0 for r in FinishReason}}

    @property
    def model(self) -> Llama:
        return self.runner.model

    @property
    def max_seq_len(self) -> int:
        return self.runner.cache.max_seq_len

    # ------------------------------------------------------------ the callers' side

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises InvalidRequest or Overloaded at once instead of queueing it."""
        self._validate(request)
        self.scheduler.check_capacity(request.priority)
        # The seed is fixed at arrival, so a preempted request resumes with the same draws.
        request = dataclasses.replace(request, sampling=request.sampling.seeded(self._seeds))
        state = RequestState(request, self.tokenizer.incremental_decoder(skip_special_tokens=True),
                             next(self._arrivals), self.new_event)
        self.in_flight[request.request_id] = state
        self.scheduler.add(state)
        self.work_ready.set()
        return RequestHandle(state, self.cancel)

    def cancel(self, request_id: str) -> bool:
        """End a request at the next step (its tokens so far are kept); False if unknown or over."""
        state = self.in_flight.get(request_id)
        if state is None or state.finished:
            return False
        state.end_requested = FinishReason.CANCELLED
        self.work_ready.set()
        return True

    def send_away(self, running: bool = False) -> int:
        """End every waiting request (and with `running`, every running one too) at the next step
        with FinishReason.SENT_AWAY, for a draining server whose callers should go elsewhere.
        Returns how many were marked."""
        marked = 0
        for state in self.in_flight.values():
            if state.end_requested is None and (running or state.slot is None):
                state.end_requested = FinishReason.SENT_AWAY
                marked += 1
        self.work_ready.set()
        return marked

    def _validate(self, request: GenerationRequest) -> None:
        prompt, resumed, limit = request.prompt_ids, request.resume_ids, self.max_seq_len
        vocab = self.runner.vocab_size
        if not request.request_id:
            raise InvalidRequest("request_id", "must not be empty")
        if request.request_id in self.in_flight:
            raise InvalidRequest("request_id", f"'{request.request_id}' is already in flight")
        if not prompt:
            raise InvalidRequest("prompt", "is empty")
        if len(prompt) + len(resumed) >= limit:
            raise InvalidRequest("prompt", f"has {len(prompt) + len(resumed)} tokens with resume_ids; "
                                           f"the limit is {limit - 1}")
        for name, ids in (("prompt", prompt), ("resume_ids", resumed)):
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                raise InvalidRequest(name, f"token ids must be in 0..{vocab - 1}")
        if not 1 <= request.max_tokens <= self.config.max_tokens_limit:
            raise InvalidRequest("max_tokens", f"must be in 1..{self.config.max_tokens_limit}, "
                                               f"got {request.max_tokens}")
        if len(resumed) >= request.max_tokens:
            raise InvalidRequest("resume_ids", f"{len(resumed)} tokens already reach max_tokens")
        if not 0 <= request.top_logprobs <= self.config.max_top_logprobs:
            raise InvalidRequest("top_logprobs", f"must be in 0..{self.config.max_top_logprobs}")
        if not isinstance(request.sampling, SamplingParams):
            raise InvalidRequest("sampling", "must be a SamplingParams")
        if any(token >= vocab for token in request.sampling.logit_bias or ()):
            raise InvalidRequest("sampling.logit_bias", f"token ids must be in 0..{vocab - 1}")
        if any(not 0 <= token < vocab for token in request.stop_token_ids):
            raise InvalidRequest("stop_token_ids", f"token ids must be in 0..{vocab - 1}")

    # ------------------------------------------------------------ the step

    def step(self) -> bool:
        """Schedule, run (through `offload`), post-process. True if the model ran."""
        plan = self.scheduler.schedule(time.monotonic())
        for state, reason in plan.ended:
            self._finish(state, reason)
        if not plan.chunks:
            return False
        started = time.perf_counter()
        samples = self.offload(self.runner.run, plan)
        self._post_process(plan, samples)
        self.counters["steps"] += 1
        self.counters["step_seconds"] += time.perf_counter() - started
        return True

    def has_work(self) -> bool:
        return bool(self.in_flight)

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step until nothing is waiting or running (for tests and offline use)."""
        for _ in range(max_steps):
            if not self.step() and not self.has_work():
                return
        raise RuntimeError(f"still busy after {max_steps} steps")

    def fail_running(self) -> None:
        """End every running request with FinishReason.ERROR (after a step that raised)."""
        for state in list(self.scheduler.running):
            self._finish(state, FinishReason.ERROR)

    # ------------------------------------------------------------ post-processing

    def _post_process(self, plan: Plan, samples: StepSamples) -> None:
        for chunk in plan.chunks:
            state = chunk.state
            self.scheduler.advance(chunk)
            if state in samples.failed:
                self._finish(state, FinishReason.ERROR)
            elif chunk.sample:
                self._append(state, samples.tokens[state])

    def _append(self, state: RequestState, sampled: SampledToken) -> None:
        token, request = sampled.token_id, state.request
        state.token_ids.append(token)
        state.logprobs.append(sampled.logprob)
        state.top_logprobs.append(sampled.top)
        if state.penalty_history is not None:
            state.penalty_history.append(token)
        now = time.monotonic()
        if state.times.first_token is None:
            state.times.first_token = now
        self.counters["generated_tokens"] += 1
        self.throughput.add(now)
        text = ""
        if token == self.tokenizer.eos_id and not request.ignore_eos:
            state.finish_reason, state.stop_reason = FinishReason.STOP, token
        elif token in request.stop_token_ids:
            state.finish_reason, state.stop_reason = FinishReason.STOP, token
        else:
            text = state.stop.push(state.decoder.feed(token))
            if state.stop.matched is not None:
                state.finish_reason, state.stop_reason = FinishReason.STOP, state.stop.matched
            elif state.num_generated >= request.max_tokens or len(state.token_ids) >= self.max_seq_len:
                state.finish_reason = FinishReason.LENGTH
        state.text_parts.append(text)
        if state.finished:
            self._finish(state, state.finish_reason)
        else:
            state.produced.set()

    def _finish(self, state: RequestState, reason: FinishReason) -> None:
        """End a request: free its slot (keeping its prefix), flush held-back text, wake its caller."""
        self.scheduler.release(state)
        state.finish_reason = reason
        tail = "" if state.stop.matched is not None else state.stop.push(state.decoder.flush()) + state.stop.flush()
        state.text_parts.append(tail)
        state.times.finished = time.monotonic()
        self.in_flight.pop(state.request_id, None)
        self.counters[f"finished_{reason.value}"] += 1
        self.counters["prompt_tokens"] += state.num_prompt
        if reason in (FinishReason.STOP, FinishReason.LENGTH) and state.times.admitted is not None:
            self.scheduler.observe_service_time(state.times.finished - state.times.admitted)
        state.ended.set()
        state.produced.set()

    # ------------------------------------------------------------ stats

    def stats(self) -> dict:
        """Load, queues and cache use, for the status call and metrics."""
        steps = self.counters["steps"]
        slots = self.scheduler.slots
        prefix = slots.stats
        return {
            "waiting": {p.name: self.scheduler.depth(p) for p in Priority},
            "running": len(self.scheduler.running),
            "slots": len(slots.slots),
            "slots_busy": slots.num_busy,
            "slots_cached_prefixes": slots.num_kept,
            "max_seq_len": self.max_seq_len,
            "kv_cache_bytes": self.runner.cache.nbytes,
            "prefix_cache_lookups": prefix.lookups,
            "prefix_cache_hits": prefix.hits,
            "prefix_cache_hit_tokens": prefix.hit_tokens,
            "prefix_cache_evictions": prefix.evictions,
            "tokens_per_second": round(self.throughput.per_second(time.monotonic()), 2),
            "mean_step_ms": round(1000 * self.counters["step_seconds"] / steps, 3) if steps else 0.0,
            "preemptions": self.scheduler.preemptions,
            **self.counters,
        }
