"""Tokens per second over a sliding window, in constant memory (one counter per second of the window)."""

from __future__ import annotations

import math

WINDOW_SECONDS = 10


class Throughput:
    """Counts events into one-second buckets; `per_second` averages the last WINDOW_SECONDS of them.

    Memory stays fixed however many tokens arrive and however rarely anyone reads
    the rate (a per-token log would grow until the next read)."""

    def __init__(self, window_seconds: int = WINDOW_SECONDS):
        self.window_seconds = window_seconds
        self._counts = [0] * window_seconds
        self._seconds = [-1] * window_seconds   # which whole second each bucket counts

    def add(self, now: float, count: int = 1) -> None:
        second = math.floor(now)
        bucket = second % self.window_seconds
        if self._seconds[bucket] != second:
            self._seconds[bucket], self._counts[bucket] = second, 0
        self._counts[bucket] += count

    def per_second(self, now: float) -> float:
        """Events in the last window (the current, partial second included) over the window's length."""
        oldest = math.floor(now) - self.window_seconds + 1
        return sum(count for count, second in zip(self._counts, self._seconds) if second >= oldest) / self.window_seconds
