"""The nodes one request tries, within its deadline and the client's retry budget, and the error when none answered.

`Client.generate`, `tokenize`, `detokenize` and `Stream` all walk one
`Failover`: the request's home node first, then each next distinct available
node clockwise (never an ejected or draining one), until one answers, the
deadline passes, or the request may try no more. Only refusals that another
node may not share are retried: a connection error and Overloaded (draining
included); every other error is the request's own and ends it.

Retries are what turns one slow or failing server into load on all the
others, so two limits bound them: a request tries at most
`max_nodes_per_request` distinct nodes, and all of a client's retries come
out of one `RetryBudget`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

from ringlm.client.errors import (DeadlineExceededError, NoServerAvailableError, OverloadedError, RinglmError,
                                  ServerUnavailableError)
from ringlm.client.pool import Node

log = logging.getLogger(__name__)

RETRYABLE = (ServerUnavailableError, OverloadedError)

# pick(tried addresses) -> the next node to try, or None when no untried node is available.
Pick = Callable[[set[str]], Node | None]


class RetryBudget:
    """The retries a client may send: `ratio` of its requests plus `floor_per_s` a second.

    A token bucket whose balance relaxes toward `floor_per_s * window_s` with time constant `window_s`
    (so the floor refills it at `floor_per_s`, and neither a quiet hour nor a busy one banks more than
    about one window's worth), plus `ratio` for every request sent. A retry spends one token; with
    none left the request fails with the errors it met. Over any stretch of time, retries therefore
    add at most `ratio` to the requests sent, plus `floor_per_s` a second, plus one window's balance.
    """

    def __init__(self, ratio: float, floor_per_s: float, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if ratio < 0 or floor_per_s < 0 or window_s <= 0:
            raise ValueError("a retry budget needs ratio >= 0, floor_per_s >= 0 and window_s > 0")
        self.ratio, self.floor_per_s, self.window_s = ratio, floor_per_s, window_s
        self.clock = clock
        self._resting = floor_per_s * window_s
        self._balance = self._resting
        self._updated = clock()
        self._lock = threading.Lock()

    def _relax(self) -> None:
        now = self.clock()
        fade = math.exp(-(now - self._updated) / self.window_s)
        self._balance = self._resting + (self._balance - self._resting) * fade
        self._updated = now

    def sent(self) -> None:
        """A request went out for the first time: it earns `ratio` of a retry."""
        with self._lock:
            self._relax()
            self._balance += self.ratio

    def take(self) -> bool:
        """Spend one retry; False when the budget has none left."""
        with self._lock:
            self._relax()
            if self._balance < 1:
                return False
            self._balance -= 1
            return True


class Failover:
    """The nodes one request tries, in turn. Iterate it for (node, milliseconds left or None); tell it
    each retryable refusal with `failed`. The iteration raises DeadlineExceededError once the deadline
    has passed, and `exhausted`'s error once the request may try no further node."""

    def __init__(self, pick: Pick, deadline: float | None, *, budget: RetryBudget, max_nodes: int,
                 unavailable: Callable[[], dict[str, RinglmError]]):
        self.pick = pick
        self.deadline = deadline
        self.budget = budget
        self.max_nodes = max_nodes
        self.unavailable = unavailable   # the nodes no request may try now, each with why
        self.tried: set[str] = set()
        self.errors: dict[str, RinglmError] = {}

    def __iter__(self) -> Iterator[tuple[Node, int | None]]:
        while True:
            remaining_ms = remaining(self.deadline)
            if len(self.tried) >= self.max_nodes:
                raise exhausted(self.errors, f"all {len(self.tried)} servers tried failed (max_nodes_per_request)")
            node = self.pick(self.tried)
            if node is None:
                raise exhausted({**self.unavailable(), **self.errors})
            if not self.tried:
                self.budget.sent()
            elif not self.budget.take():
                raise exhausted(self.errors, f"{len(self.tried)} servers tried failed and the client's retry "
                                             f"budget is spent")
            self.tried.add(node.address)
            yield node, remaining_ms

    def failed(self, node: Node, error: RinglmError) -> None:
        """Note a node's refusal; a draining one gets no new requests until its status says otherwise."""
        if isinstance(error, OverloadedError) and error.draining:
            node.draining = True
        self.errors[node.address] = error
        log.info("%s failed (%s); trying the next node", node.address, error)


def deadline_from(deadline_ms: int | None) -> float | None:
    """The absolute (monotonic) deadline of a request given `deadline_ms` from now."""
    if deadline_ms is None:
        return None
    if deadline_ms <= 0:
        raise ValueError(f"deadline_ms must be positive, got {deadline_ms}")
    return time.monotonic() + deadline_ms / 1000


def remaining(deadline: float | None) -> int | None:
    """Milliseconds left before the deadline (None without one); DeadlineExceededError once it passed."""
    if deadline is None:
        return None
    left = int((deadline - time.monotonic()) * 1000)
    if left <= 0:
        raise DeadlineExceededError("the deadline passed before any server could answer")
    return left


def exhausted(errors: dict[str, RinglmError], message: str = "no server is available") -> RinglmError:
    """The error for a request that may try no more nodes, given each node's refusal (or why it was
    not tried: ejected, draining)."""
    if errors and all(isinstance(e, OverloadedError) and not e.draining for e in errors.values()):
        wait_ms = min(e.retry_after_ms for e in errors.values())
        return OverloadedError(f"all {len(errors)} servers are overloaded", retry_after_ms=wait_ms)
    return NoServerAvailableError(message, errors)
