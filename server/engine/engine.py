"""The step loop: continuous batching of every running request through one model and one KV cache.

Each step expires and cancels what must end, admits waiting requests into
free cache slots (reusing cached prefixes, preempting lower priorities when
full), packs one token per decoding request plus prefill chunks up to a token
budget, runs the model and the sampler in a native thread (so the gevent hub
keeps serving sockets), and hands each request its new token and text.

Only the engine loop touches the model, the cache and the sequences; other
greenlets talk to it through `submit`, `cancel` and each request's queue.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass

import gevent
import gevent.event
import numpy as np

from ringlm.ext.sampling import InvalidLogitsError, SamplingParams, sample
from ringlm.ext.tokenizer import Tokenizer
from ringlm.server.engine.config import EngineConfig
from ringlm.server.engine.kv_cache import KVCache
from ringlm.server.engine.request import (FinishReason, GenerationRequest, InvalidRequest, Output,
                                          Priority, Sequence)
from ringlm.server.engine.scheduler import Scheduler, SchedulerConfig
from ringlm.server.engine.slots import SlotTable
from ringlm.server.model.llama import Llama, PackedBatch, SequenceChunk

log = logging.getLogger(__name__)

THROUGHPUT_WINDOW_SECONDS = 10.0


@dataclass
class Samples:
    """One step's sampler output, by sequence: (token, logprob, top alternatives)."""

    by_sequence: dict[Sequence, tuple[int, float, list[tuple[int, float]]]]
    failed: set[Sequence]

    @classmethod
    def of(cls, result, rows: list[Sequence], failed: set) -> Samples:
        if result is None:
            return cls({}, failed)
        token_ids, logprobs = result[0], result[1]
        top_ids, top_logprobs = result[2] if len(result) > 2 else (None, None)
        by_sequence = {}
        for r, seq in enumerate(rows):
            top = ([(int(t), float(lp)) for t, lp in zip(top_ids[r], top_logprobs[r])]
                   if top_ids is not None else [])
            by_sequence[seq] = (int(token_ids[r]), float(logprobs[r]), top)
        return cls(by_sequence, failed)


class RequestHandle:
    """The caller's side of a request: iterate its Output events, or wait for the result."""

    def __init__(self, seq: Sequence):
        self._seq = seq
        self.request_id = seq.request_id
        self._done = False

    def __iter__(self):
        """Each Output as the engine produces it; ends after the finished one (iterate once)."""
        while not self._done:
            output = self._seq.queue.get()
            self._done = output.finished
            yield output

    def result(self) -> GenerationResult:
        """Wait for the end (consuming any outputs not yet read) and return the whole result."""
        for _ in self:
            pass
        return GenerationResult.of(self._seq)


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stop_reason: str | int | None
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    ttft_ms: float
    total_ms: float

    @classmethod
    def of(cls, seq: Sequence) -> GenerationResult:
        new_tokens = seq.generated[len(seq.request.resume_ids):]   # resumed ones came from elsewhere
        return cls(request_id=seq.request_id, text="".join(seq.text_parts), token_ids=new_tokens,
                   finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                   logprobs=list(seq.logprobs), top_logprobs=list(seq.top_logprobs),
                   prompt_tokens=seq.num_prompt, cached_prompt_tokens=seq.cached_prompt_tokens,
                   completion_tokens=len(new_tokens), **seq.timings.milliseconds())


class Engine:
    def __init__(self, model: Llama, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 scheduler: SchedulerConfig | None = None, cache: KVCache | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        max_seq_len = min(self.config.max_seq_len, model.config.max_position_embeddings)
        self.cache = cache or KVCache(model.config, self.config.num_slots, max_seq_len,
                                      dtype=model.dtype, device=model.device)
        self.slots = SlotTable(self.cache.num_slots, self.config.prefix_cache)
        self.scheduler = Scheduler(scheduler or SchedulerConfig(
            max_waiting={p: self.config.max_waiting for p in Priority}))
        self.running: list[Sequence] = []
        self.in_flight: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._seeds = np.random.default_rng()   # seeds for requests that bring none
        self._wakeup = gevent.event.Event()
        self._loop: gevent.Greenlet | None = None
        self._recent_tokens: deque[float] = deque()   # when each token of the last window came
        self.counters = {"steps": 0, "step_seconds": 0.0, "generated_tokens": 0, "prompt_tokens": 0,
                         "preemptions": 0, **{f"finished_{r.value}": 0 for r in FinishReason}}

    # ------------------------------------------------------------ the callers' side

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises InvalidRequest or Overloaded at once instead of queueing it."""
        self._validate(request)
        self.scheduler.check_capacity(request.priority, self.cache.num_slots)
        # The seed is fixed at arrival, so a preempted request resumes with the same draws.
        request = dataclasses.replace(request, sampling=request.sampling.seeded(self._seeds))
        seq = Sequence(request, self.tokenizer.incremental_decoder(skip_special_tokens=True),
                       next(self._arrivals))
        self.in_flight[request.request_id] = seq
        self.scheduler.add(seq)
        self._wakeup.set()
        return RequestHandle(seq)

    def cancel(self, request_id: str) -> bool:
        """End a request at the next step (its tokens so far are kept); False if unknown."""
        seq = self.in_flight.get(request_id)
        if seq is None or seq.finished:
            return False
        seq.cancel_requested = True
        self._wakeup.set()
        return True

    def _validate(self, request: GenerationRequest) -> None:
        prompt, resumed, limit = request.prompt_ids, request.resume_ids, self.cache.max_seq_len
        vocab = self.model.config.vocab_size
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

    # ------------------------------------------------------------ the loop

    def start(self) -> gevent.Greenlet:
        """Run the step loop in a greenlet until `stop`."""
        if self._loop is None or self._loop.dead:
            self._loop = gevent.spawn(self._run)
        return self._loop

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.kill()
            self._loop = None

    def _run(self) -> None:
        while True:
            try:
                ran = self.step()
            except Exception:
                # A fault in one step fails the requests it was running, not the server.
                log.exception("engine step failed; failing its %d running requests", len(self.running))
                self.fail_running()
                ran = True
            if not ran:
                self._wakeup.clear()
                self._wakeup.wait(timeout=0.1)   # also wakes for deadlines of queued requests
            else:
                gevent.sleep(0)                  # let handlers read outputs between steps

    def fail_running(self) -> None:
        """End every running request with FinishReason.ERROR (after a failed step)."""
        for seq in list(self.running):
            self._finish(seq, FinishReason.ERROR)

    def step(self) -> bool:
        """One scheduling round and, if anything is runnable, one model step. True if it ran."""
        self._end_cancelled_and_expired(time.monotonic())
        self._admit()
        chunks, owners = self._plan()
        if not chunks:
            return False
        started = time.perf_counter()
        samples = self._offload(self._forward_and_sample, chunks, owners)
        self._advance(chunks, owners, samples)
        self.counters["steps"] += 1
        self.counters["step_seconds"] += time.perf_counter() - started
        return True

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step until nothing is waiting or running (for tests and offline use)."""
        for _ in range(max_steps):
            if not self.step() and not len(self.scheduler) and not self.running:
                return
        raise RuntimeError(f"still busy after {max_steps} steps")

    # ------------------------------------------------------------ scheduling

    def _end_cancelled_and_expired(self, now: float) -> None:
        def reason(seq: Sequence) -> FinishReason | None:
            if seq.cancel_requested:
                return FinishReason.CANCELLED
            if seq.request.deadline is not None and now >= seq.request.deadline:
                return FinishReason.DEADLINE
            return None

        for seq in self.scheduler.remove_where(lambda s: reason(s) is not None):
            self._finish(seq, reason(seq))
        for seq in [s for s in self.running if reason(s) is not None]:
            self._finish(seq, reason(seq))

    def _admit(self) -> None:
        while (seq := self.scheduler.peek()) is not None:
            acquired = self.slots.acquire(seq.token_ids)
            if acquired is None:
                victim = Scheduler.preemption_victim(self.running, seq)
                if victim is None:
                    return
                self._preempt(victim)
                continue
            self.scheduler.pop()
            if acquired.copy_from is not None:
                self.cache.copy_prefix(acquired.copy_from, acquired.slot, acquired.reused_tokens)
            seq.slot, seq.cached = acquired.slot, acquired.reused_tokens
            if seq.timings.admitted is None:
                seq.timings.admitted = time.monotonic()
                seq.cached_prompt_tokens = min(acquired.reused_tokens, seq.num_prompt)
            self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Pause a running sequence; its KV stays behind as a cached prefix for its return."""
        self.running.remove(seq)
        self.slots.release(seq.slot, seq.token_ids[:seq.cached])
        seq.slot, seq.cached = None, 0
        seq.preemptions += 1
        self.counters["preemptions"] += 1
        self.scheduler.add(seq)

    def _plan(self) -> tuple[list[SequenceChunk], list[Sequence]]:
        """This step's chunks: every decode (one token each), then prefill chunks within the budget."""
        budget = self.config.max_batch_tokens
        chunks, owners = [], []
        # Decodes in slot order: the model's padded decode call then reads cache views, no gather.
        decoding = sorted((seq for seq in self.running if seq.pending == 1), key=lambda seq: seq.slot)
        prefilling = [seq for seq in self.running if seq.pending > 1]
        for seq in decoding + prefilling:
            if seq.cached >= seq.num_prompt:
                # Generated tokens being recomputed (resume_ids, preemption) go one per step, as
                # they were first computed: the decode path's arithmetic, so the same logits.
                count = 1
            else:
                count = min(seq.num_prompt - seq.cached, budget)
            if count <= 0:
                break
            chunks.append(SequenceChunk(seq.slot, seq.token_ids[seq.cached:seq.cached + count],
                                        seq.cached, logits=count == seq.pending))
            owners.append(seq)
            budget -= count
        return chunks, owners

    # ------------------------------------------------------------ model and sampler

    def _offload(self, function, *args):
        if not self.config.offload:
            return function(*args)
        return gevent.get_hub().threadpool.apply(function, args)

    def _forward_and_sample(self, chunks: list[SequenceChunk], owners: list[Sequence]) -> Samples:
        """Runs in a native thread: the model step, then one sampler call for all rows."""
        batch = PackedBatch.pack(chunks, device=self.model.device)
        logits = self.model(batch, self.cache)
        rows = [seq for chunk, seq in zip(chunks, owners) if chunk.logits]
        if not rows:
            return Samples({}, set())
        if logits.device.type == "cpu":
            logits = logits.float().contiguous()
        try:
            return Samples.of(self._sample(logits, rows), rows, failed=set())
        except InvalidLogitsError as error:
            # Fail the rows with no distribution (NaN, all -inf); the others still get a token.
            log.error("model produced invalid logits: %s", error)
            failed = {rows[r] for r in error.rows}
            kept = [i for i, seq in enumerate(rows) if seq not in failed]
            result = self._sample(logits[kept], [rows[i] for i in kept]) if kept else None
            return Samples.of(result, [rows[i] for i in kept], failed)

    @staticmethod
    def _sample(logits, rows: list[Sequence]):
        top_n = max(seq.request.top_logprobs for seq in rows)
        return sample(logits, [seq.request.sampling for seq in rows],
                      positions=[len(seq.token_ids) for seq in rows],
                      history=[seq.generated for seq in rows], top_n=top_n)

    # ------------------------------------------------------------ results

    def _advance(self, chunks: list[SequenceChunk], owners: list[Sequence], samples: Samples) -> None:
        for chunk, seq in zip(chunks, owners):
            seq.cached += len(chunk.token_ids)
            if seq.cached <= seq.num_prompt or not chunk.logits:
                self.slots.update(seq.slot, seq.token_ids[:seq.cached])   # shareable prompt prefix
            if seq in samples.failed:
                self._finish(seq, FinishReason.ERROR)
            elif chunk.logits:
                self._append(seq, *samples.by_sequence[seq])

    def _append(self, seq: Sequence, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        top = top[:seq.request.top_logprobs]
        seq.token_ids.append(token)
        seq.logprobs.append(logprob)
        seq.top_logprobs.append(top)
        now = time.monotonic()
        if seq.timings.first_token is None:
            seq.timings.first_token = now
        self.counters["generated_tokens"] += 1
        self._recent_tokens.append(now)
        request = seq.request
        text = ""
        if token == self.tokenizer.eos_id and not request.ignore_eos:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, token
        elif token in request.stop_token_ids:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, token
        else:
            text = seq.stop.push(seq.decoder.feed(token))
            if seq.stop.matched is not None:
                seq.finish_reason, seq.stop_reason = FinishReason.STOP, seq.stop.matched
            elif len(seq.generated) >= request.max_tokens or len(seq.token_ids) >= self.cache.max_seq_len:
                seq.finish_reason = FinishReason.LENGTH
        seq.text_parts.append(text)
        seq.queue.put(Output([token], text, [seq.logprobs[-1]], [top]))
        if seq.finished:
            self._finish(seq, seq.finish_reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence: free its slot (keeping its prefix), send the final event."""
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            self.slots.release(seq.slot, seq.token_ids[:seq.cached])
            seq.slot = None
        seq.finish_reason = reason
        tail = "" if seq.stop.matched is not None else seq.stop.push(seq.decoder.flush()) + seq.stop.flush()
        seq.text_parts.append(tail)
        seq.timings.finished = time.monotonic()
        self.in_flight.pop(seq.request_id, None)
        self.counters[f"finished_{reason.value}"] += 1
        self.counters["prompt_tokens"] += seq.num_prompt
        if reason in (FinishReason.STOP, FinishReason.LENGTH) and seq.timings.admitted is not None:
            self.scheduler.observe_service_time(seq.timings.finished - seq.timings.admitted)
        seq.queue.put(Output([], tail, [], [], finished=True, finish_reason=reason,
                             stop_reason=seq.stop_reason))

    # ------------------------------------------------------------ stats

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        while self._recent_tokens and self._recent_tokens[0] < now - THROUGHPUT_WINDOW_SECONDS:
            self._recent_tokens.popleft()
        return len(self._recent_tokens) / THROUGHPUT_WINDOW_SECONDS

    def stats(self) -> dict:
        """Load, queues and cache use, for the status call and metrics."""
        steps = self.counters["steps"]
        prefix = self.slots.stats
        return {
            "waiting": {p.name: self.scheduler.depth(p) for p in Priority},
            "running": len(self.running),
            "slots": self.cache.num_slots,
            "slots_busy": self.slots.num_busy,
            "slots_cached_prefixes": self.slots.num_kept,
            "max_seq_len": self.cache.max_seq_len,
            "kv_cache_bytes": self.cache.nbytes,
            "prefix_cache_lookups": prefix.lookups,
            "prefix_cache_hits": prefix.hits,
            "prefix_cache_hit_tokens": prefix.hit_tokens,
            "prefix_cache_evictions": prefix.evictions,
            "tokens_per_second": round(self.tokens_per_second(), 2),
            "mean_step_ms": round(1000 * self.counters["step_seconds"] / steps, 3) if steps else 0.0,
            **self.counters,
        }

