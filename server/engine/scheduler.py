"""Scheduling: who waits, who is turned away, who runs, who is preempted, and what each step computes.

Plain bookkeeping on request states and slot numbers, with no torch and no
concurrency library, so it is tested with plain objects. `schedule` makes one
step's `Plan`: requests to end before any work (cancelled, past their
deadline), prefix copies into newly taken slots, and the batch: one token per
decoding request (in slot order), then prefill chunks within the token budget.

Waiting requests are ordered by (priority, deadline, arrival), a request's
priority rising one level for every `priority_aging_s` it has waited so that
low priorities are never starved; each priority has a queue limit past which a new request is refused at once with a
retry-after hint, rather than queued to time out. When no slot is free, the
newest running request of the lowest priority below the waiting one is
preempted: its KV stays behind as a cached prefix and it re-queues.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ringlm.server.engine.request import FinishReason, Overloaded, Priority, RequestState
from ringlm.server.engine.slots import SlotTable

# A retry-after hint is clamped to this range (milliseconds).
MIN_RETRY_AFTER_MS = 50
MAX_RETRY_AFTER_MS = 30_000
# Weight of the newest finished request in the moving average of service time.
SERVICE_TIME_SMOOTHING = 0.1
# How often the waiting queue is re-ordered for aging (seconds): aging works in steps of
# `priority_aging_s`, so a check a second is plenty and keeps steps from paying O(waiting) each.
AGING_CHECK_S = 1.0


@dataclass(frozen=True)
class PrefixCopy:
    """Copy the first `length` cache positions of one slot into another before the step runs."""

    source_slot: int
    target_slot: int
    length: int


@dataclass(frozen=True)
class ScheduledChunk:
    """`count` of a request's tokens from position `start`; `sample`: its last one picks the next token."""

    state: RequestState
    start: int
    count: int
    sample: bool

    @property
    def token_ids(self) -> list[int]:
        return self.state.token_ids[self.start:self.start + self.count]


@dataclass
class Plan:
    """One step: what ends before any work, what the runner copies, and what it computes."""

    ended: list[tuple[RequestState, FinishReason]] = field(default_factory=list)
    prefix_copies: list[PrefixCopy] = field(default_factory=list)
    chunks: list[ScheduledChunk] = field(default_factory=list)

    @property
    def sampled(self) -> list[ScheduledChunk]:
        """The chunks whose last token's logits pick a new token, in batch order."""
        return [chunk for chunk in self.chunks if chunk.sample]


class Scheduler:
    def __init__(self, num_slots: int, max_batch_tokens: int,
                 max_waiting: int | Mapping[Priority, int], prefix_cache: bool = True,
                 priority_aging_s: float = 0.0):
        self.slots = SlotTable(num_slots, prefix_cache)
        self.max_batch_tokens = max_batch_tokens
        self.max_waiting = (dict(max_waiting) if isinstance(max_waiting, Mapping)
                            else {p: max_waiting for p in Priority})
        self.running: list[RequestState] = []
        self._heap: list[tuple[tuple, RequestState]] = []
        self.priority_aging_s = priority_aging_s
        self._next_aging = 0.0
        self.preemptions = 0
        self.mean_service_seconds = 1.0   # updated as requests finish

    # ------------------------------------------------------------ the queue

    def __len__(self) -> int:
        """Requests waiting (not running)."""
        return len(self._heap)

    def depth(self, priority: Priority) -> int:
        return sum(state.request.priority == priority for _, state in self._heap)

    def check_capacity(self, priority: Priority) -> None:
        """Raise Overloaded when `priority`'s queue is full."""
        limit, depth = self.max_waiting[priority], self.depth(priority)
        if depth >= limit:
            raise Overloaded(f"the {priority.name} queue is full ({depth} of {limit} waiting)",
                             self.retry_after_ms())

    def retry_after_ms(self) -> int:
        """About how long until the queue has drained enough to take one more."""
        parallelism = len(self.slots.slots)
        estimate = (len(self._heap) + 1) * self.mean_service_seconds / parallelism * 1000
        return int(min(max(estimate, MIN_RETRY_AFTER_MS), MAX_RETRY_AFTER_MS))

    def add(self, state: RequestState, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        heapq.heappush(self._heap, (state.sort_key(now, self.priority_aging_s), state))

    def _age(self, now: float) -> None:
        """Re-key the waiting queue so requests that waited long move up (see RequestState.effective_priority)."""
        if self.priority_aging_s <= 0 or now < self._next_aging:
            return
        self._next_aging = now + AGING_CHECK_S
        self._heap = [(state.sort_key(now, self.priority_aging_s), state) for _, state in self._heap]
        heapq.heapify(self._heap)

    def _remove_waiting(self, states: list[RequestState]) -> None:
        gone = set(map(id, states))
        self._heap = [entry for entry in self._heap if id(entry[1]) not in gone]
        heapq.heapify(self._heap)

    # ------------------------------------------------------------ one step

    def schedule(self, now: float) -> Plan:
        """End what must end, admit what fits (preempting when a higher priority waits), plan the batch."""
        plan = Plan(ended=self._end_cancelled_and_expired(now))
        self._age(now)
        self._admit(plan, now)
        plan.chunks = self._batch()
        return plan

    def _end_cancelled_and_expired(self, now: float) -> list[tuple[RequestState, FinishReason]]:
        def reason(state: RequestState) -> FinishReason | None:
            if state.end_requested is not None:
                return state.end_requested
            if state.request.deadline is not None and now >= state.request.deadline:
                return FinishReason.DEADLINE
            return None

        waiting = [state for _, state in self._heap if reason(state) is not None]
        self._remove_waiting(waiting)
        running = [state for state in self.running if reason(state) is not None]
        for state in running:
            self.release(state)
        return [(state, reason(state)) for state in waiting + running]

    def _admit(self, plan: Plan, now: float) -> None:
        while self._heap:
            state = self._heap[0][1]
            acquired = self.slots.acquire(state.token_ids)
            if acquired is None:
                victim = self.preemption_victim(self.running, state, now, self.priority_aging_s)
                if victim is None:
                    return
                self._preempt(victim)
                continue
            heapq.heappop(self._heap)
            if acquired.copy_from is not None:
                plan.prefix_copies.append(PrefixCopy(acquired.copy_from, acquired.slot, acquired.reused_tokens))
            state.slot, state.cached = acquired.slot, acquired.reused_tokens
            if state.times.admitted is None:
                state.times.admitted = now
                state.cached_prompt_tokens = min(acquired.reused_tokens, state.num_prompt)
            self.running.append(state)

    @staticmethod
    def preemption_victim(running: list[RequestState], waiting: RequestState, now: float = 0.0,
                          aging_s: float = 0.0) -> RequestState | None:
        """The running request to pause for `waiting`: the lowest (aged) priority below it, newest first."""
        def priority(state: RequestState) -> int:
            return state.effective_priority(now, aging_s)

        lower = [state for state in running if priority(state) < priority(waiting)]
        if not lower:
            return None
        return min(lower, key=lambda state: (priority(state), -state.arrival_order))

    def _preempt(self, state: RequestState) -> None:
        """Pause a running request; its KV stays behind as a cached prefix for its return."""
        self.release(state)
        state.cached = 0
        state.preemptions += 1
        self.preemptions += 1
        self.add(state)   # keyed by its first arrival: with aging on, it returns ahead of newer peers

    def _batch(self) -> list[ScheduledChunk]:
        """Every decode (one token each, in slot order), then prefill chunks within the budget."""
        budget = self.max_batch_tokens
        chunks = []
        # Slot order lets the model's padded decode call read cache views instead of gathering.
        decoding = sorted((state for state in self.running if state.pending == 1), key=lambda state: state.slot)
        prefilling = [state for state in self.running if state.pending > 1]
        for state in decoding + prefilling:
            # Prompts and generated tokens being recomputed (resume_ids, a preempted request's
            # return) are prefilled alike, in chunks: a failover after 1,000 tokens costs a few
            # steps, not 1,000 (their logits may differ from the first computation's in the last
            # bits, as any chunking does; see the determinism notes in docs/architecture.md).
            count = min(state.pending, budget)
            if count <= 0:
                break
            chunks.append(ScheduledChunk(state, state.cached, count, sample=count == state.pending))
            budget -= count
        return chunks

    # ------------------------------------------------------------ after the step

    def advance(self, chunk: ScheduledChunk) -> None:
        """The chunk's tokens are in the cache now; a prefilled prefix becomes shareable."""
        state = chunk.state
        state.cached += chunk.count
        if chunk.start < state.num_prompt or chunk.count > 1:   # a prefill: decodes skip the O(length) copy
            self.slots.update(state.slot, state.token_ids[:state.cached])

    def release(self, state: RequestState) -> None:
        """Take a request off the running list and free its slot, keeping its KV as a cached prefix."""
        if state in self.running:
            self.running.remove(state)
        if state.slot is not None:
            self.slots.release(state.slot, state.token_ids[:state.cached])
            state.slot = None

    def observe_service_time(self, seconds: float) -> None:
        self.mean_service_seconds += SERVICE_TIME_SMOOTHING * (seconds - self.mean_service_seconds)
