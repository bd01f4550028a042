"""Connections to each server of the ring: pooled per node, timed out, size-checked, health-checked, ejected while down.

A node is *available* when it is neither ejected nor draining. Failures are
judged by where they happen. One that stops a connection being made
(refused, connect timeout, TLS handshake) ejects the node at once, for a
back-off that doubles with each consecutive ejection (first_backoff_s ..
max_backoff_s). One after the call was sent (reset, EOF, read timeout) may
be the call's own doing or just a long answer, so it only makes the node
*suspect*: the background checker probes it at once and ejects it only if
the probe fails too. The checker also probes ejected nodes when their
back-off ends, re-admitting those that answer, and polls the others'
`status` for their load and draining flag. In-flight counts per node feed
the ring's bounded loads.

Each call's frame is measured before it is sent: a server closes the
connection on a frame over its max_frame_bytes, which would look like a
server failure, so a call over the client's max_frame_bytes is refused here
as the caller's InvalidRequestError and no server ever sees it.

Only the standard library's `socket` and `threading` are used, looked up at
call time, so the pool works from plain threads and, once gevent has
monkey-patched them, from greenlets.
"""

from __future__ import annotations

import collections
import logging
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TApplicationException, TClient
from thriftpy2.transport import TCyFramedTransport, TSocket, TSSLSocket, TTransportException
from thriftpy2.transport.memory import TCyMemoryBuffer

from ringlm.client.address import split_address
from ringlm.client.errors import (InvalidRequestError, OverloadedError, RinglmError, ServerUnavailableError,
                                  UnauthorizedError, from_thrift)
from ringlm.idl import ringlm_thrift as thrift

log = logging.getLogger(__name__)

TRANSPORT_ERRORS = (TTransportException, OSError, EOFError)
THRIFT_ERRORS = (thrift.InvalidRequest, thrift.Overloaded, thrift.DeadlineExceeded, thrift.Cancelled,
                 thrift.Unauthorized, thrift.ModelError)
FRAME_HEADER = struct.Struct("!i")

@dataclass
class PoolConfig:
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 30.0          # calls that answer at once (status, tokenize); generate sets its own
    max_idle_per_node: int = 8
    max_idle_age_s: float = 60.0          # well under the server's idle timeout, so a kept connection is alive
    health_interval_s: float = 1.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    auth_token: str | None = None
    ssl_context: ssl.SSLContext | None = None
    max_frame_bytes: int = 1 << 20        # the servers' default: they close a connection that sends more


@contextmanager
def typed_errors(address: str, sent: bool) -> Iterator[None]:
    """Raise what talking to `address` fails with as the client's typed errors: the server's declared
    Thrift exceptions as theirs, its undeclared failures as RinglmError, a broken or refused
    connection (refused, reset, EOF, timeout, TLS) as ServerUnavailableError with `sent`."""
    try:
        yield
    except THRIFT_ERRORS as error:
        raise from_thrift(error, address) from None
    except TApplicationException as error:
        raise RinglmError(f"server error: {error}", server=address) from None
    except TRANSPORT_ERRORS as error:
        raise ServerUnavailableError(f"{type(error).__name__}: {error}", server=address, sent=sent) from error


class FrameTooLarge(Exception):
    """A call whose frame is larger than max_frame_bytes (`size` bytes); nothing of it was sent."""

    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


class FrameWriter(TCyMemoryBuffer):
    """The sending side of a connection: the protocol writes one call into this buffer, and its flush
    sends it as one frame, or raises FrameTooLarge, sending nothing, when the server would refuse it."""

    def __init__(self, socket: TSocket, max_frame_bytes: int):
        super().__init__()
        self.socket = socket
        self.max_frame_bytes = max_frame_bytes

    def flush(self) -> None:
        body = self.getvalue()
        self.clean()   # the next call starts empty, whether this one goes out or not
        if len(body) > self.max_frame_bytes:
            raise FrameTooLarge(len(body))
        self.socket.write(FRAME_HEADER.pack(len(body)) + body)


class Connection:
    """One framed binary-protocol connection to a server, with a timeout per call; it raises only
    the client's typed errors."""

    def __init__(self, address: str, config: PoolConfig):
        self.address = address
        host, port = split_address(address)
        timeouts = {"socket_timeout": config.read_timeout_s * 1000,
                    "connect_timeout": config.connect_timeout_s * 1000}
        if config.ssl_context is not None:
            self.socket = TSSLSocket(host, port, ssl_context=config.ssl_context, **timeouts)
        else:
            self.socket = TSocket(host, port, **timeouts)
        with typed_errors(address, sent=False):   # connect and, with TLS, the handshake
            self.socket.open()
        self.client = TClient(thrift.Generator, iprot=TCyBinaryProtocol(TCyFramedTransport(self.socket)),
                              oprot=TCyBinaryProtocol(FrameWriter(self.socket, config.max_frame_bytes)))
        self.max_frame_bytes = config.max_frame_bytes
        self.last_used = time.monotonic()
        if config.auth_token is not None:
            try:
                self.call("authenticate", config.auth_token, timeout_s=config.read_timeout_s)
            except BaseException:
                self.close()
                raise

    def call(self, method: str, *args, timeout_s: float):
        self.socket.set_timeout(max(timeout_s, 0.001) * 1000)
        try:
            with typed_errors(self.address, sent=True):
                return getattr(self.client, method)(*args)
        except FrameTooLarge as error:
            raise InvalidRequestError(
                f"the {method} request is {error.size} bytes serialized, over max_frame_bytes "
                f"({self.max_frame_bytes}), the largest frame servers read: not sent") from None

    def close(self) -> None:
        self.socket.close()


class Node:
    """One server: its idle connections, in-flight count, ejection and suspicion, and last reported status."""

    def __init__(self, address: str, config: PoolConfig, on_suspect: Callable[[], None] = lambda: None):
        self.address = address
        self.config = config
        self.on_suspect = on_suspect      # wakes the pool's checker
        self.in_flight = 0
        self.ejected_until: float | None = None
        self.ejection_reason = ""
        self.suspected: str | None = None  # why a call failed after sending, until a probe settles it
        self.backoff_s = config.first_backoff_s
        self.draining = False
        self.others_load = 0              # other clients' running + waiting, as of the last status
        self._idle: collections.deque[Connection] = collections.deque()
        self._lock = threading.Lock()

    def available(self) -> bool:
        return self.ejected_until is None and not self.draining

    def unavailable_error(self) -> RinglmError | None:
        """Why no request is sent here now (None when one may be)."""
        if self.draining:
            return OverloadedError("draining", draining=True, server=self.address)
        if self.ejected_until is not None:
            return ServerUnavailableError(f"ejected: {self.ejection_reason}", server=self.address, sent=False)
        return None

    def eject(self, reason: str) -> None:
        with self._lock:
            self.ejected_until = time.monotonic() + self.backoff_s
            self.ejection_reason = reason
            self.suspected = None
            log.warning("%s ejected for %.1f s: %s", self.address, self.backoff_s, reason)
            self.backoff_s = min(self.backoff_s * 2, self.config.max_backoff_s)
            self.others_load = 0   # a failed server runs nothing for anyone; its last report is stale
        self._drop_idle()          # they lead to a server that just failed

    def suspect(self, reason: str) -> None:
        """A call failed after it was sent: have the checker probe the node now."""
        log.info("%s suspect, probing it: %s", self.address, reason)
        self.suspected = reason
        # A reset often means the server restarted, which breaks every kept connection: the probe and
        # the next calls must not judge the server by those.
        self._drop_idle()
        self.on_suspect()

    def note_status(self, status: thrift.ServerStatus) -> None:
        """Take in a status: draining, and the load beyond ours (the server counts our calls too, and
        ours are counted live, so a report never outlives the requests of ours it included)."""
        self.draining = bool(status.draining) or status.ready is False   # not ready: no new work either
        self.others_load = max(0, status.running + sum((status.waiting or {}).values()) - self.in_flight)

    @property
    def load(self) -> int:
        return self.in_flight + self.others_load

    def readmit(self) -> None:
        """A probe answered: the node takes requests again."""
        if self.ejected_until is not None:
            log.info("%s re-admitted", self.address)
        self.ejected_until = None
        self.suspected = None

    def close(self) -> None:
        self._drop_idle()

    @contextmanager
    def connection(self, fresh: bool = False) -> Iterator[Connection]:
        """A connection held for one call or one stream (it counts as in flight meanwhile); a new one
        when `fresh`, else a kept one if there is one.

        A failure to connect ejects the node; a transport failure after sending makes it suspect.
        The connection goes back to the pool only when the server's last answer was read whole (a
        result or a typed error other than Unauthorized); anything else, a stream abandoned mid-way
        included, closes it, which also makes the server cancel what the connection had open.
        """
        with self._lock:   # threads share nodes: += is not atomic
            self.in_flight += 1
        connection = None
        reusable = False
        try:
            connection = (None if fresh else self._take_idle()) or Connection(self.address, self.config)
            yield connection
            reusable = True
            self.backoff_s = self.config.first_backoff_s   # it answered: the next ejection starts short again
        except ServerUnavailableError as error:
            if error.sent:
                self.suspect(error.message)
            else:
                self.eject(error.message)
            raise
        except UnauthorizedError:
            raise   # the connection was never authorized: not reusable
        except RinglmError:
            reusable = True   # a typed answer, read whole (or a call refused before sending)
            raise
        finally:
            with self._lock:
                self.in_flight -= 1
            if connection is not None:
                if reusable:
                    self._give_back(connection)
                else:
                    connection.close()

    def _take_idle(self) -> Connection | None:
        horizon = time.monotonic() - self.config.max_idle_age_s
        with self._lock:
            while self._idle:
                connection = self._idle.pop()
                if connection.last_used >= horizon:
                    return connection
                connection.close()
        return None

    def _give_back(self, connection: Connection) -> None:
        connection.last_used = time.monotonic()
        with self._lock:
            if self.ejected_until is None and len(self._idle) < self.config.max_idle_per_node:
                self._idle.append(connection)
                return
        connection.close()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = list(self._idle), collections.deque()
        for connection in idle:
            connection.close()

    def call(self, method: str, *args, timeout_s: float | None = None, fresh: bool = False):
        """One call on a pooled connection (a new one when `fresh`)."""
        with self.connection(fresh) as connection:
            return connection.call(method, *args, timeout_s=timeout_s or self.config.read_timeout_s)


class Pool:
    """The nodes of the ring, and a background checker that ejects, re-admits and refreshes them."""

    def __init__(self, config: PoolConfig | None = None):
        self.config = config or PoolConfig()
        self._nodes: dict[str, Node] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()    # a node turned suspect: probe it before the next round
        self._checker: threading.Thread | None = None

    # -- membership

    def set_nodes(self, addresses: Iterable[str]) -> None:
        wanted = set(addresses)
        for address in wanted - self._nodes.keys():
            split_address(address)
            self._nodes[address] = Node(address, self.config, on_suspect=self._wake.set)
        for address in set(self._nodes) - wanted:
            self._nodes.pop(address).close()

    def node(self, address: str) -> Node:
        return self._nodes[address]

    @property
    def nodes(self) -> dict[str, Node]:
        return dict(self._nodes)

    def unavailable(self) -> dict[str, RinglmError]:
        """The ejected and draining nodes, each with why."""
        reasons = {address: node.unavailable_error() for address, node in list(self._nodes.items())}
        return {address: error for address, error in reasons.items() if error is not None}

    def loads(self) -> dict[str, int]:
        """Each node's load for bounded hashing: our in-flight calls plus other clients' work."""
        return {address: node.load for address, node in self._nodes.items()}

    # -- health

    def start(self) -> None:
        """Start the checker; without health_interval_s (0) there is none, and nothing re-admits a node."""
        if self._checker is None and self.config.health_interval_s:
            self._checker = threading.Thread(target=self._check_forever, name="ringlm-health", daemon=True)
            self._checker.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._checker is not None:
            self._checker.join(timeout=self.config.connect_timeout_s + self.config.read_timeout_s)
        for node in list(self._nodes.values()):
            node.close()

    def _check_forever(self) -> None:
        next_round = time.monotonic() + self.config.health_interval_s
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_round - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            if time.monotonic() >= next_round:
                self.check_all()
                next_round = time.monotonic() + self.config.health_interval_s
            else:
                self.check_suspects()

    def check_all(self) -> None:
        """Probe every node that is admitted or whose back-off has ended."""
        now = time.monotonic()
        for node in list(self._nodes.values()):
            if node.ejected_until is None or node.ejected_until <= now:
                self.check(node)

    def check_suspects(self) -> None:
        for node in list(self._nodes.values()):
            if node.suspected is not None and node.ejected_until is None:
                self.check(node)

    def check(self, node: Node) -> bool:
        """Refresh one node from its `status` (`health` if status needs a token we lack); True if it answered.

        A node in doubt (suspect or ejected) is probed on a new connection and ejected if that fails;
        a healthy one on a kept connection, whose failure makes it suspect, so it is probed again at once
        on a new one (a kept connection may have gone stale without the server failing).
        """
        fresh = node.suspected is not None or node.ejected_until is not None
        try:
            try:
                status = node.call("status", timeout_s=self.config.connect_timeout_s, fresh=fresh)
            except UnauthorizedError:
                node.call("health", timeout_s=self.config.connect_timeout_s, fresh=fresh)
                status = None
        except ServerUnavailableError as error:
            if fresh and error.sent:   # a failed connect has ejected it already
                node.eject(error.message)
            return False
        except RinglmError as error:
            node.eject(str(error))
            return False
        if status is not None:
            node.note_status(status)
        node.readmit()
        return True
