"""Stop strings matched on the generated text as it streams, across token boundaries.

Text that could still turn out to be the start of a stop string is held back,
so a client never receives part of a stop string, and the full stop string is
always inside the held-back text when it completes.
"""

from __future__ import annotations


class StopMatcher:
    """Feed text pieces; get back what may be shown, and whether a stop string ended it."""

    def __init__(self, stop_strings: tuple[str, ...] | list[str] = ()):
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""
        self.matched: str | None = None

    def push(self, piece: str) -> str:
        """Add newly decoded text; return the part that is safe to emit."""
        if self.matched is not None:
            return ""
        self.pending += piece
        if not self.stop_strings:
            emitted, self.pending = self.pending, ""
            return emitted
        found = [(self.pending.find(s), s) for s in self.stop_strings]
        found = [(i, s) for i, s in found if i >= 0]
        if found:
            index, self.matched = min(found)
            emitted, self.pending = self.pending[:index], ""
            return emitted
        keep = self._held_back_length()
        emitted = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return emitted

    def flush(self) -> str:
        """Everything held back (the request ended without a stop string)."""
        emitted, self.pending = ("" if self.matched is not None else self.pending), ""
        return emitted

    def _held_back_length(self) -> int:
        """Length of the longest tail of pending text that begins some stop string."""
        for length in range(min(len(self.pending), max(map(len, self.stop_strings)) - 1), 0, -1):
            tail = self.pending[-length:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return length
        return 0
