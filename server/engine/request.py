"""One generation request as the engine sees it: what was asked, how far it got, where its output goes.

`GenerationRequest` is the input (built by the Thrift handler or a test);
`Sequence` is the engine's running state for it; `Output` events flow to the
caller through a gevent queue and end with one whose `finished` is set.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import gevent.queue

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
    ERROR = "error"          # the model gave logits with no distribution (NaN, all -inf)


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
    """New tokens of one step (possibly none when text is held back), or the final event."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None   # the stop string or token id that ended it


@dataclass
class Timings:
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


class Sequence:
    """Engine-side state of one request; only the engine loop mutates it."""

    def __init__(self, request: GenerationRequest, decoder: IncrementalDecoder, arrival_order: int):
        self.request = request
        self.arrival_order = arrival_order
        self.token_ids: list[int] = [*request.prompt_ids, *request.resume_ids]   # prompt, then generated
        self.num_prompt = len(request.prompt_ids)
        self.cached = 0                 # leading tokens whose KV is in the slot
        self.cached_prompt_tokens = 0   # prompt tokens served from the prefix cache
        self.slot: int | None = None
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.text_parts: list[str] = []
        self.decoder = decoder
        self.stop = StopMatcher(request.stop)
        # Replay resumed tokens through the decoder and the stop matcher, dropping their text:
        # both then hold exactly what the earlier server held, so the text continues seamlessly.
        for token in request.resume_ids:
            self.stop.push(decoder.feed(token))
        self.queue: gevent.queue.Queue = gevent.queue.Queue()
        self.timings = Timings(arrival=time.monotonic())
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.cancel_requested = False
        self.preemptions = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def pending(self) -> int:
        """Tokens to run through the model before the next token can be sampled."""
        return len(self.token_ids) - self.cached

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sort_key(self) -> tuple:
        """Admission order: priority, then deadline, then arrival."""
        deadline = self.request.deadline if self.request.deadline is not None else float("inf")
        return (-int(self.request.priority), deadline, self.arrival_order)
