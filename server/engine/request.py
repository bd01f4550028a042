"""One generation request as the engine sees it: what was asked, how far it got, and the caller's handle on it.

`GenerationRequest` is the input (built by the Thrift handler or a test);
`RequestState` is the engine's running state for it (only the engine's thread
mutates it); `RequestHandle` is the caller's side: `poll` for new output,
`result` for the whole of it, `cancel`. Waiting uses the Event class the engine
was given (`threading.Event` by default, gevent's in a server), so nothing here
depends on a concurrency library.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ringlm.ext.sampling import SamplingParams
from ringlm.ext.tokenizer import IncrementalDecoder
from ringlm.server.engine.stop import StopMatcher


class Priority(enum.IntEnum):
    LOW = 0
    NORMAL = 1
    HIGH = 2


class FinishReason(str, enum.Enum):
    STOP = "stop"            # EOS, a stop token id or a stop string
    LENGTH = "length"        # max_tokens, or the sequence filled its cache slot
    DEADLINE = "deadline"    # the deadline passed while queued or running
    CANCELLED = "cancelled"  # cancel(request_id), or the client went away
    ERROR = "error"          # the model gave logits with no distribution (NaN, all -inf), or its step failed
    SENT_AWAY = "sent_away"  # the server is draining: the caller should run it elsewhere (send_away)


class EngineError(Exception):
    """Base of the errors `Engine.submit` raises before a request is queued."""


class InvalidRequest(EngineError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Overloaded(EngineError):
    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(f"{message} (retry after {retry_after_ms} ms)")
        self.retry_after_ms = retry_after_ms


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    priority: Priority = Priority.NORMAL
    deadline: float | None = None     # time.monotonic() seconds
    top_logprobs: int = 0             # alternatives per token, 0 for none
    # Tokens an earlier server already generated for this request (stream failover):
    # they count as generated (max_tokens, penalties) and are not sent again.
    resume_ids: tuple[int, ...] = ()


@dataclass
class Output:
    """What a request produced since the caller last polled; `finished` on the last one."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None   # the stop string or token id that ended it


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


@dataclass
class Timestamps:
    """time.monotonic() at each milestone of a request, None until it is reached."""

    arrival: float
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None

    def milliseconds(self) -> dict[str, float]:
        def since(start, end):
            return round((end - start) * 1000, 3) if start is not None and end is not None else 0.0
        return {"queue_ms": since(self.arrival, self.admitted),
                "ttft_ms": since(self.arrival, self.first_token),
                "total_ms": since(self.arrival, self.finished)}


class PenaltyHistory:
    """The ids a request generated, in a buffer sized for max_tokens: the sampler reads a view, no copy."""

    def __init__(self, capacity: int, initial: tuple[int, ...] = ()):
        self._ids = np.empty(capacity, dtype=np.int32)
        self._length = 0
        for token in initial:
            self.append(token)

    def append(self, token: int) -> None:
        self._ids[self._length] = token
        self._length += 1

    def view(self) -> np.ndarray:
        return self._ids[:self._length]


class RequestState:
    """Engine-side state of one request; only the engine's thread mutates it."""

    def __init__(self, request: GenerationRequest, decoder: IncrementalDecoder, arrival_order: int,
                 new_event: Callable[[], object]):
        self.request = request
        self.arrival_order = arrival_order
        self.token_ids: list[int] = [*request.prompt_ids, *request.resume_ids]   # prompt, then generated
        self.num_prompt = len(request.prompt_ids)
        self.cached = 0                 # leading tokens whose KV is in the slot
        self.cached_prompt_tokens = 0   # prompt tokens served from the prefix cache
        self.slot: int | None = None
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.text_parts: list[str] = []   # one per new token, then the tail held back until the end
        self.decoder = decoder
        self.stop = StopMatcher(request.stop)
        # Replay resumed tokens through the decoder and the stop matcher, dropping their text:
        # both then hold exactly what the earlier server held, so the text continues seamlessly.
        for token in request.resume_ids:
            self.stop.push(decoder.feed(token))
        self.penalty_history = (PenaltyHistory(request.max_tokens, request.resume_ids)
                                if request.sampling.uses_penalties else None)
        self.times = Timestamps(arrival=time.monotonic())
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.end_requested: FinishReason | None = None   # cancel or send_away: ended at the next step
        self.preemptions = 0
        self.produced = new_event()       # set whenever new output is ready
        self.ended = new_event()          # set once, when the request is finished

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_new_tokens(self) -> int:
        """Tokens generated here (resumed ones came from an earlier server)."""
        return len(self.logprobs)

    @property
    def pending(self) -> int:
        """Tokens to run through the model before the next token can be sampled."""
        return len(self.token_ids) - self.cached

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def effective_priority(self, now: float, aging_s: float) -> int:
        """The priority it is admitted with: one level up for every `aging_s` seconds it has waited
        since arrival (0: never), so a steady stream of higher priorities cannot starve it."""
        boost = int((now - self.times.arrival) / aging_s) if aging_s > 0 else 0
        return min(int(self.request.priority) + max(boost, 0), int(Priority.HIGH))

    def sort_key(self, now: float, aging_s: float = 0.0) -> tuple:
        """Admission order: (aged) priority, then deadline, then arrival."""
        deadline = self.request.deadline if self.request.deadline is not None else float("inf")
        return (-self.effective_priority(now, aging_s), deadline, self.arrival_order)

    def new_tokens(self, start: int, end: int) -> list[int]:
        """Ids of the tokens generated here, [start, end) counted from the first one."""
        first = self.num_prompt + len(self.request.resume_ids)
        return self.token_ids[first + start:first + end]

    def result(self) -> GenerationResult:
        new_tokens = self.new_tokens(0, self.num_new_tokens)
        return GenerationResult(
            request_id=self.request_id, text="".join(self.text_parts), token_ids=new_tokens,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason, logprobs=list(self.logprobs),
            top_logprobs=list(self.top_logprobs), prompt_tokens=self.num_prompt,
            cached_prompt_tokens=self.cached_prompt_tokens, completion_tokens=len(new_tokens),
            **self.times.milliseconds())


class RequestHandle:
    """The caller's side of a request: `poll` for output as it comes, `result` to wait for the end.

    The engine never builds an object per token for the caller: a poll returns everything
    produced since the previous one, read from the request's state; a caller that only
    wants the result wakes once, when the request ends.
    """

    def __init__(self, state: RequestState, cancel: Callable[[str], bool]):
        self._state = state
        self._cancel = cancel
        self._tokens_read = 0
        self._ended_read = False
        self.request_id = state.request_id

    @property
    def finished(self) -> bool:
        """Whether the request has ended (its last output may still be unread)."""
        return self._state.ended.is_set()

    @property
    def finished_at(self) -> float | None:
        """time.monotonic() when the request ended, None while it runs."""
        return self._state.times.finished if self.finished else None

    def cancel(self) -> bool:
        """End the request at the engine's next step (its tokens so far are kept); False if already over."""
        return self._cancel(self.request_id)

    def poll(self, timeout: float | None = None) -> Output:
        """Wait up to `timeout` seconds (None: without limit) for output, then return all that is new:
        an empty Output when nothing came, one with `finished` set (once) when the request ended."""
        state = self._state
        if self._ended_read:
            raise RuntimeError(f"request {self.request_id} has ended and its last output was read")
        if self._tokens_read == state.num_new_tokens and not state.ended.is_set():
            state.produced.clear()
            if self._tokens_read == state.num_new_tokens and not state.ended.is_set():
                state.produced.wait(timeout)
        return self._take()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the end (one wake-up, not one per token) and return the whole result."""
        if not self._state.ended.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self._state.result()

    def __iter__(self):
        """Each new Output until the finished one (a convenience over `poll`)."""
        while not self._ended_read:
            output = self.poll()
            if output.token_ids or output.text or output.finished:
                yield output

    def _take(self) -> Output:
        state = self._state
        ended = state.ended.is_set()
        start, end = self._tokens_read, state.num_new_tokens
        parts = state.text_parts[start:] if ended else state.text_parts[start:end]
        output = Output(state.new_tokens(start, end), "".join(parts), state.logprobs[start:end],
                        state.top_logprobs[start:end])
        self._tokens_read = end
        if ended:
            self._ended_read = True
            output.finished, output.finish_reason, output.stop_reason = (True, state.finish_reason,
                                                                         state.stop_reason)
        return output
