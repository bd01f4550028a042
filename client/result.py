"""What a generation returns to the user: plain dataclasses free of Thrift types, and the names of the IDL's enums."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ringlm.idl import ringlm_thrift as thrift

# The IDL's enums under the lower-case names users write and read ("stop", "high").
FINISH_REASONS = {value: name.lower() for value, name in thrift.FinishReason._VALUES_TO_NAMES.items()}
PRIORITIES = {name.lower(): value for name, value in thrift.Priority._NAMES_TO_VALUES.items()}

TokenAlternatives = list[tuple[int, float]]   # (token id, logprob), likeliest first


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0     # prompt tokens whose KV the server found in its prefix cache
    completion_tokens: int = 0


@dataclass
class Timings:
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    per_token_ms: float = 0.0


@dataclass
class Result:
    """One finished generation. After a stream failover, `server` is the server that finished it,
    `failed_over_from` the ones that died under it, and usage/timings are the last server's.

    `logprobs` (when asked for with logprobs or top_logprobs) holds each new token's log-probability;
    `top_logprobs` (when asked for) each new token's likeliest alternatives. A stream that failed over
    has None in place of the alternatives of tokens a dead server sent: they went with it.
    """

    text: str
    token_ids: list[int]
    finish_reason: str                # stop, length, deadline, cancelled or error
    usage: Usage
    timings: Timings
    server: str
    request_id: str = ""
    stop_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[TokenAlternatives | None] | None = None
    failed_over_from: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def result_from_thrift(result: thrift.GenerateResult) -> Result:
    usage = result.usage or thrift.Usage(prompt_tokens=0, cached_prompt_tokens=0, completion_tokens=0)
    timings = result.timings or thrift.Timings(queue_ms=0.0, ttft_ms=0.0, total_ms=0.0, per_token_ms=0.0)
    return Result(
        text=result.text or "", token_ids=list(result.token_ids or []),
        finish_reason=FINISH_REASONS.get(result.finish_reason, str(result.finish_reason)),
        usage=Usage(usage.prompt_tokens or 0, usage.cached_prompt_tokens or 0, usage.completion_tokens or 0),
        timings=Timings(timings.queue_ms or 0.0, timings.ttft_ms or 0.0, timings.total_ms or 0.0,
                        timings.per_token_ms or 0.0),
        server=result.server or "", request_id=result.request_id or "", stop_reason=result.stop_reason,
        logprobs=list(result.logprobs) if result.logprobs is not None else None,
        top_logprobs=alternatives_from_thrift(result.top_logprobs))


def alternatives_from_thrift(rows: list[list[thrift.TokenLogprob]] | None) -> list[TokenAlternatives] | None:
    if rows is None:
        return None
    return [[(alternative.token_id, alternative.logprob) for alternative in row] for row in rows]
