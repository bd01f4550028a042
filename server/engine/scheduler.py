"""Admission policy: who waits, who runs next, who is preempted, who is turned away.

Pure bookkeeping, no tensors: waiting sequences are ordered by (priority,
deadline, arrival); each priority has a queue limit past which a new request
is refused at once with a retry-after hint, rather than queued to time out.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from ringlm.server.engine.request import Overloaded, Priority, Sequence

# A retry-after hint is clamped to this range (milliseconds).
MIN_RETRY_AFTER_MS = 50
MAX_RETRY_AFTER_MS = 30_000
# Weight of the newest finished request in the moving average of service time.
SERVICE_TIME_SMOOTHING = 0.1


@dataclass
class SchedulerConfig:
    max_waiting: dict[Priority, int] = field(default_factory=lambda: {p: 256 for p in Priority})


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self._heap: list[tuple[tuple, Sequence]] = []
        self.mean_service_seconds = 1.0   # updated as requests finish

    def __len__(self) -> int:
        return len(self._heap)

    def waiting(self) -> list[Sequence]:
        return [seq for _, seq in sorted(self._heap, key=lambda entry: entry[0])]

    def depth(self, priority: Priority) -> int:
        return sum(seq.request.priority == priority for _, seq in self._heap)

    def check_capacity(self, priority: Priority, parallelism: int) -> None:
        """Raise Overloaded when `priority`'s queue is full."""
        limit = self.config.max_waiting[priority]
        depth = self.depth(priority)
        if depth >= limit:
            raise Overloaded(f"the {priority.name} queue is full ({depth} of {limit} waiting)",
                             self.retry_after_ms(parallelism))

    def retry_after_ms(self, parallelism: int) -> int:
        """About how long until the queue has drained enough to take one more."""
        estimate = (len(self._heap) + 1) * self.mean_service_seconds / max(parallelism, 1) * 1000
        return int(min(max(estimate, MIN_RETRY_AFTER_MS), MAX_RETRY_AFTER_MS))

    def add(self, seq: Sequence) -> None:
        heapq.heappush(self._heap, (seq.sort_key(), seq))

    def peek(self) -> Sequence | None:
        return self._heap[0][1] if self._heap else None

    def pop(self) -> Sequence:
        return heapq.heappop(self._heap)[1]

    def remove_where(self, predicate) -> list[Sequence]:
        """Take out every waiting sequence for which predicate(seq) is true."""
        removed = [seq for _, seq in self._heap if predicate(seq)]
        if removed:
            self._heap = [entry for entry in self._heap if not predicate(entry[1])]
            heapq.heapify(self._heap)
        return removed

    @staticmethod
    def preemption_victim(running: list[Sequence], waiting: Sequence) -> Sequence | None:
        """The running sequence to pause for `waiting`: the lowest priority below it, newest first."""
        lower = [seq for seq in running if seq.request.priority < waiting.request.priority]
        if not lower:
            return None
        return min(lower, key=lambda seq: (seq.request.priority, -seq.arrival_order))

    def observe_service_time(self, seconds: float) -> None:
        self.mean_service_seconds += SERVICE_TIME_SMOOTHING * (seconds - self.mean_service_seconds)
