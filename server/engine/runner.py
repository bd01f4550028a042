"""The model runner: the only code that touches the model, the KV cache and the sampler.

`run(plan)` does one step's device work: the plan's prefix copies, packing
its chunks into one batch, the forward pass, and one sampler call for every
row that picks a token. It runs in whatever thread the engine's caller chose
(a server runs it off its event loop: torch and the Cython sampler release the
GIL), and it only reads request state, never changes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ringlm.ext.sampling import InvalidLogitsError, SampledTokens, sample
from ringlm.server.engine.request import RequestState
from ringlm.server.engine.scheduler import Plan, ScheduledChunk
from ringlm.server.model.kv_cache import KVCache
from ringlm.server.model.llama import Llama, PackedBatch, SequenceChunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]     # the best-ranked alternatives with their logprobs


@dataclass
class StepSamples:
    """One step's sampler output by request, and the requests whose logits had no distribution."""

    tokens: dict[RequestState, SampledToken] = field(default_factory=dict)
    failed: set[RequestState] = field(default_factory=set)


class ModelRunner:
    def __init__(self, model: Llama, cache: KVCache):
        self.model = model
        self.cache = cache

    @classmethod
    def create(cls, model: Llama, num_slots: int, max_seq_len: int) -> ModelRunner:
        """A runner with a cache of `num_slots` slots of up to `max_seq_len` tokens (capped by the model)."""
        max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        return cls(model, KVCache(model.config, num_slots, max_seq_len, dtype=model.dtype, device=model.device))

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def run(self, plan: Plan) -> StepSamples:
        """The plan's prefix copies, its forward pass, then one sampler call for its sampled rows."""
        for copy in plan.prefix_copies:
            self.cache.copy_prefix(copy.source_slot, copy.target_slot, copy.length)
        if not plan.chunks:
            return StepSamples()
        batch = PackedBatch.pack([SequenceChunk(chunk.state.slot, chunk.token_ids, chunk.start, logits=chunk.sample)
                                  for chunk in plan.chunks], device=self.model.device)
        logits = self.model(batch, self.cache)
        rows = plan.sampled
        if not rows:
            return StepSamples()
        if logits.device.type == "cpu":
            logits = logits.float().contiguous()
        try:
            return StepSamples(self._by_state(rows, self._sample(logits, rows)))
        except InvalidLogitsError as error:
            # Fail the rows with no distribution (NaN, all -inf); the others still get a token.
            log.error("model produced invalid logits: %s", error)
            failed = set(error.rows)
            kept = [r for r in range(len(rows)) if r not in failed]
            kept_rows = [rows[r] for r in kept]
            tokens = self._by_state(kept_rows, self._sample(logits[kept], kept_rows)) if kept else {}
            return StepSamples(tokens, {rows[r].state for r in failed})

    @staticmethod
    def _sample(logits, rows: list[ScheduledChunk]) -> SampledTokens:
        states = [chunk.state for chunk in rows]
        return sample(logits, [state.request.sampling for state in states],
                      positions=[len(state.token_ids) for state in states],
                      history=[state.penalty_history.view() if state.penalty_history else () for state in states],
                      top_n=max(state.request.top_logprobs for state in states))

    @staticmethod
    def _by_state(rows: list[ScheduledChunk], sampled: SampledTokens) -> dict[RequestState, SampledToken]:
        by_state = {}
        for r, chunk in enumerate(rows):
            wanted = chunk.state.request.top_logprobs
            top = ([(int(t), float(lp)) for t, lp in zip(sampled.top_ids[r, :wanted], sampled.top_logprobs[r, :wanted])]
                   if wanted else [])
            by_state[chunk.state] = SampledToken(int(sampled.token_ids[r]), float(sampled.logprobs[r]), top)
        return by_state
