"""The order in which one request tries the cluster's nodes, its deadline, and the error when every node refused.

`Client.generate`, `tokenize`, `detokenize` and `Stream` all walk one
`Failover`: the request's home node first, then each next distinct node
clockwise, skipping draining ones, until one answers, the deadline passes or
no node is left. Only refusals that another node may not share are retried:
a connection error and Overloaded (draining included); every other error is
the request's own and ends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from ringlm.client.errors import (DeadlineExceededError, NoServerAvailableError, OverloadedError, RinglmError,
                                  ServerUnavailableError)
from ringlm.client.pool import Node

log = logging.getLogger(__name__)

RETRYABLE = (ServerUnavailableError, OverloadedError)

# pick(tried addresses) -> the next node to try, or None when only tried or draining nodes are left.
Pick = Callable[[set[str]], Node | None]


class Failover:
    """The nodes one request tries, in turn. Iterate it for (node, milliseconds left or None); tell it
    each retryable refusal with `failed`. The iteration raises DeadlineExceededError once the deadline
    has passed, and `exhausted`'s error once no node is left."""

    def __init__(self, pick: Pick, deadline: float | None):
        self.pick = pick
        self.deadline = deadline
        self.tried: set[str] = set()
        self.errors: dict[str, RinglmError] = {}

    def __iter__(self) -> Iterator[tuple[Node, int | None]]:
        while True:
            remaining_ms = remaining(self.deadline)
            node = self.pick(self.tried)
            if node is None:
                raise exhausted(self.errors)
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


def exhausted(errors: dict[str, RinglmError]) -> RinglmError:
    """The error for a request that every candidate node refused."""
    if errors and all(isinstance(e, OverloadedError) and not e.draining for e in errors.values()):
        wait_ms = min(e.retry_after_ms for e in errors.values())
        return OverloadedError(f"all {len(errors)} servers are overloaded", retry_after_ms=wait_ms)
    if not errors:
        return NoServerAvailableError("no server is available")
    return NoServerAvailableError(f"all {len(errors)} servers tried failed", errors)
