"""Which sequence holds which KV-cache slot, and finished sequences kept as a prefix cache.

A slot that a finished (or preempted) sequence leaves keeps its keys and
values and remembers their token ids. A new request whose prompt starts with
those tokens takes the slot over and skips recomputing them; a prompt that
shares a prefix with a still-running sequence gets that prefix copied into a
free slot. Memory stays bounded by the fixed number of slots: when a request
needs a slot and none is empty, the least recently used kept prefix is
evicted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

# Copying a prefix out of a running sequence's slot costs a memory copy per
# layer; below this many tokens recomputing is about as cheap.
MIN_COPIED_PREFIX = 16


@dataclass
class Slot:
    index: int
    tokens: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # ids whose KV is here
    busy: bool = False
    last_used: int = 0


@dataclass
class Acquired:
    slot: int
    reused_tokens: int          # leading prompt tokens whose KV is already in the slot
    copy_from: int | None = None  # copy reused_tokens positions from this slot first


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    evictions: int = 0


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class SlotTable:
    """Slot bookkeeping for a KVCache of `num_slots` slots (no tensors here)."""

    def __init__(self, num_slots: int, prefix_cache: bool = True):
        self.slots = [Slot(i) for i in range(num_slots)]
        self.prefix_cache = prefix_cache
        self.stats = PrefixCacheStats()
        self._clock = itertools.count(1)

    @property
    def num_busy(self) -> int:
        return sum(s.busy for s in self.slots)

    @property
    def num_kept(self) -> int:
        """Free slots that still hold a reusable prefix."""
        return sum(not s.busy and len(s.tokens) > 0 for s in self.slots)

    def acquire(self, prompt: list[int] | np.ndarray) -> Acquired | None:
        """A slot for a sequence starting with `prompt`, reusing the longest cached prefix."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        prompt = np.asarray(prompt, dtype=np.int64)
        # Leave at least one prompt token to run: its logits pick the first new token.
        usable = len(prompt) - 1
        kept, kept_length = self._best_match(free, prompt, usable)
        busy, busy_length = self._best_match([s for s in self.slots if s.busy], prompt, usable)
        self.stats.lookups += 1
        if self.prefix_cache and kept is not None and kept_length >= busy_length and kept_length > 0:
            return self._take(kept, prompt[:kept_length])
        target = min(free, key=lambda s: (len(s.tokens) > 0, s.last_used))   # empty first, then LRU
        if len(target.tokens):
            self.stats.evictions += 1
        if self.prefix_cache and busy is not None and busy_length >= MIN_COPIED_PREFIX:
            acquired = self._take(target, prompt[:busy_length])
            acquired.copy_from = busy.index
            return acquired
        return self._take(target, prompt[:0])

    def _best_match(self, slots: list[Slot], prompt: np.ndarray, usable: int):
        best, best_length = None, 0
        if not self.prefix_cache:
            return best, best_length
        for slot in slots:
            length = min(common_prefix_length(slot.tokens, prompt), usable)
            if length > best_length:
                best, best_length = slot, length
        return best, best_length

    def _take(self, slot: Slot, prefix: np.ndarray) -> Acquired:
        """Hand `slot` to a sequence whose first len(prefix) tokens' KV it will hold (kept there, or copied
        in before the next forward): it records those tokens, not what the slot held before a copy."""
        reused = len(prefix)
        if reused:
            self.stats.hits += 1
            self.stats.hit_tokens += reused
        slot.busy = True
        slot.tokens = prefix
        slot.last_used = next(self._clock)
        return Acquired(slot.index, reused)

    def update(self, index: int, tokens: list[int] | np.ndarray) -> None:
        """Record the token ids whose KV a busy slot now holds (for prefix sharing)."""
        self.slots[index].tokens = np.asarray(tokens, dtype=np.int64)

    def release(self, index: int, tokens: list[int] | np.ndarray) -> None:
        """Free a slot; its first len(tokens) positions stay as a cached prefix."""
        slot = self.slots[index]
        slot.busy = False
        slot.tokens = np.asarray(tokens, dtype=np.int64) if self.prefix_cache else np.empty(0, np.int64)
        slot.last_used = next(self._clock)
