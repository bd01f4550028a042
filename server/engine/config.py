"""The engine's settings: sizes and limits, one dataclass with no torch, so the command line reads it cheaply."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    num_slots: int = 16              # requests running at once (each owns one KV-cache slot)
    max_seq_len: int = 2048          # prompt + generated tokens per request (capped by the model)
    max_batch_tokens: int = 256      # tokens per step: decodes first, prefill chunks fill the rest
    max_tokens_limit: int = 4096     # the largest max_tokens a request may ask for
    max_waiting: int = 256           # queued requests per priority before Overloaded
    max_top_logprobs: int = 20       # the largest top_logprobs a request may ask for
    priority_aging_s: float = 30.0   # a waiting request moves up a priority per this many seconds (0: never)
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("num_slots", "max_seq_len", "max_batch_tokens", "max_tokens_limit", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.priority_aging_s < 0:
            raise ValueError(f"EngineConfig.priority_aging_s must be >= 0, got {self.priority_aging_s}")
        if self.max_top_logprobs < 0:
            raise ValueError(f"EngineConfig.max_top_logprobs must be >= 0, got {self.max_top_logprobs}")
