"""One server process: Thrift over gevent sockets in front of one engine, with transport limits, TLS and drain.

Each connection is one greenlet (bounded by `max_connections`; one over the
limit is closed at once rather than left waiting in the backlog). It reads
framed messages itself instead of using thriftpy2's framed transport, so that
a frame's length is checked against `max_frame_bytes` before its body is read
(a 2 GB length header costs nothing) and the whole frame must arrive within
`frame_timeout_s` (a client trickling a byte a second is dropped). Each frame
is checked by `wire` and then parsed by thriftpy2's Cython binary protocol
from memory. Between calls a connection may stay silent for `idle_timeout_s`.

The model and sampler run in gevent's threadpool (`engine_loop`), so the hub
keeps answering sockets during a model step. SIGTERM drains: stop accepting,
refuse new generations with Overloaded(draining=True), finish what is running
within `drain_grace_s`, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import struct
import sys
import time

import gevent
import gevent.event
import gevent.pool
import gevent.socket
from gevent import ssl
from gevent.server import StreamServer
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TApplicationException, TProcessor
from thriftpy2.transport.memory import TCyMemoryBuffer

from ringlm.client.auth import read_token_file
from ringlm.idl import ringlm_thrift as thrift
from ringlm.server import wire
from ringlm.server.config import WorkerConfig, add_arguments, config_from_args
from ringlm.server.handler import ConnectionHandler, Service

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct("!i")
RECV_BYTES = 65536
PEER_RECHECK_S = 0.25      # how often a call with unread bytes behind it rechecks for a hang-up
REAP_INTERVAL_S = 1.0
DRAIN_POLL_S = 0.05
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 30, 10, 3   # a vanished peer is noticed in ~60 s
RESERVED_FILES = 256       # open files beyond the connections: model files, metrics, ZooKeeper, threads
DRAIN_ANSWER_S = 5.0       # after the grace, how long sent-away callers have to collect their answer
# Before authenticate() only health, ready and authenticate(token) are read: their frames are small, so
# an unknown client gets nothing walked at length (their unknown fields included).
PRE_AUTH_MAX_FRAME_BYTES = 4096


class FrameError(Exception):
    """The client broke the framing (length out of bounds, too slow, garbage): the connection is closed."""


class InboundConnection:
    """One connection a client opened to this worker (the server's side, in its own greenlet): reads checked
    frames, runs each through the processor, writes the reply."""

    def __init__(self, worker: Worker, sock: socket.socket):
        self.worker = worker
        self.config = worker.config
        self.sock = sock
        self.buffer = bytearray()
        self.handler = ConnectionHandler(worker.service, wait_peer_gone=self.wait_peer_gone)
        self.processor = TProcessor(thrift.Generator, self.handler)
        self.auth_deadline = time.monotonic() + self.config.auth_timeout_s

    def serve(self) -> None:
        try:
            while (frame := self.read_frame()) is not None:
                self.worker.calls_in_progress += 1
                try:
                    self.reply(self.process(frame))
                finally:
                    self.worker.calls_in_progress -= 1
                if self.handler.closing:
                    raise FrameError(f"{self.handler.auth_failures} wrong auth tokens")
        finally:
            self.handler.close()   # the streams this connection opened die with it

    def reply(self, data: bytes) -> None:
        """Send a reply; a client that does not take it within the frame timeout is dropped."""
        self.sock.settimeout(self.config.frame_timeout_s)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise FrameError(f"the client did not take a {len(data)}-byte reply within "
                             f"{self.config.frame_timeout_s:g} s") from None

    # -- framing

    def silence_allowed(self) -> tuple[float, str]:
        """How long the connection may now stay silent, and what to say when it did: the idle timeout,
        or less while it has not authenticated on a server that wants a token."""
        if self.handler.authenticated:
            return self.config.idle_timeout_s, f"idle for {self.config.idle_timeout_s:g} s"
        left = self.auth_deadline - time.monotonic()
        if left <= 0:
            raise FrameError(f"not authenticated within {self.config.auth_timeout_s:g} s")
        return min(left, self.config.idle_timeout_s), f"not authenticated within {self.config.auth_timeout_s:g} s"

    def read_frame(self) -> bytes | None:
        """The next frame's body, or None when the client closed the connection between frames."""
        if not self.buffer:
            timeout_s, reason = self.silence_allowed()
            self.sock.settimeout(timeout_s)
            try:
                chunk = self.sock.recv(RECV_BYTES)
            except TimeoutError:
                raise FrameError(reason) from None
            if not chunk:
                return None
            self.buffer += chunk
        deadline = time.monotonic() + self.config.frame_timeout_s
        size, = FRAME_HEADER.unpack(self.take(4, deadline))
        if not 0 < size <= self.config.max_frame_bytes:
            raise FrameError(f"frame length {size} is outside 1..{self.config.max_frame_bytes}")
        return self.take(size, deadline)

    def take(self, count: int, deadline: float) -> bytes:
        while len(self.buffer) < count:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.0) or 1e-6)
            try:
                chunk = self.sock.recv(min(RECV_BYTES, count - len(self.buffer)))
            except TimeoutError:
                raise FrameError(f"a frame took longer than {self.config.frame_timeout_s:g} s to arrive") from None
            if not chunk:
                raise FrameError(f"the connection closed inside a frame ({len(self.buffer)} of {count} bytes)")
            self.buffer += chunk
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def wait_peer_gone(self) -> None:
        """Block until the client hangs up (a long call watches this to cancel work nobody will read)."""
        fd = self.sock.fileno()
        poller = select.poll()   # the real one (nothing is monkey-patched), asked without blocking
        poller.register(fd, select.POLLRDHUP)
        while not poller.poll(0):
            gevent.socket.wait_read(fd)
            if not poller.poll(0):
                gevent.sleep(PEER_RECHECK_S)   # readable but open: the client sent more; don't spin

    # -- messages

    def process(self, frame: bytes) -> bytes:
        """Run one framed call; returns the framed reply."""
        try:
            header = wire.read_header(frame)
        except wire.MalformedMessage as error:
            raise FrameError(str(error)) from None   # no method name or sequence id to reply to
        output = TCyBinaryProtocol(TCyMemoryBuffer())
        try:
            if not self.answer_unread(header, len(frame), output):
                wire.check_body(frame, header)
                self.call(TCyBinaryProtocol(TCyMemoryBuffer(frame), strict_decode=True), output)
        except wire.MalformedMessage as error:
            output = TCyBinaryProtocol(TCyMemoryBuffer())
            self.processor.send_exception(output, header.name, TApplicationException(
                TApplicationException.PROTOCOL_ERROR, f"malformed {header.name} call: {error}"), header.seqid)
        reply = output.trans.getvalue()
        return FRAME_HEADER.pack(len(reply)) + reply

    def answer_unread(self, header: wire.MessageHeader, frame_size: int, output: TCyBinaryProtocol) -> bool:
        """Answer by its name alone a call whose arguments are not worth reading (an unknown method, or one
        that needs authentication on a connection without it); true if answered. MalformedMessage for a
        call allowed before authentication that is larger than such calls are."""
        name, seqid = header.name, header.seqid
        if name not in wire.METHODS:
            self.processor.send_exception(output, name, TApplicationException(
                TApplicationException.UNKNOWN_METHOD, f"no method {name!r}"), seqid)
            return True
        if (refusal := self.handler.refusal(name)) is not None:
            result = getattr(thrift.Generator, f"{name}_result")()
            self.processor.handle_exception(refusal, result)   # every such method declares Unauthorized
            self.processor.send_result(output, name, result, seqid)
            return True
        if not self.handler.authenticated and frame_size > PRE_AUTH_MAX_FRAME_BYTES:
            raise wire.MalformedMessage(f"{frame_size} bytes: before authenticate() a call takes at most "
                                        f"{PRE_AUTH_MAX_FRAME_BYTES}")
        return False

    def call(self, input_protocol: TCyBinaryProtocol, output: TCyBinaryProtocol) -> None:
        """thriftpy2's TProcessor.process, except that an undeclared error becomes INTERNAL_ERROR."""
        processor = self.processor
        try:
            name, seqid, result, call = processor.process_in(input_protocol)
        except UnicodeDecodeError:
            raise wire.MalformedMessage("a string is not valid UTF-8") from None
        except Exception as error:   # whatever else thriftpy2 cannot read from a well-framed message
            raise wire.MalformedMessage(f"{type(error).__name__}: {error}") from None
        if isinstance(result, TApplicationException):
            return processor.send_exception(output, name, result, seqid)
        try:
            result.success = call()
        except TApplicationException as error:
            return processor.send_exception(output, name, error, seqid)
        except Exception as error:
            if not processor.handle_exception(error, result):
                log.exception("%s failed", name)
                return processor.send_exception(output, name, TApplicationException(
                    TApplicationException.INTERNAL_ERROR, f"{name} failed: {type(error).__name__}: {error}"),
                    seqid)
        processor.send_result(output, name, result, seqid)


class Worker:
    """The listening socket, its connections, the stream reaper and the drain."""

    def __init__(self, config: WorkerConfig, service: Service, ssl_context: ssl.SSLContext | None = None):
        self.config = config
        self.service = service
        self.ssl_context = ssl_context
        self.pool = gevent.pool.Pool(config.max_connections)
        self.server = StreamServer((config.host, config.port), self.handle, spawn=self.spawn)
        self.calls_in_progress = 0
        self.stopped = gevent.event.Event()
        self.exit_code = 0
        self.registration = None   # our ZooKeeper znode, while we take new work
        self.leaving: gevent.Greenlet | None = None

    def serve_forever(self) -> int:
        """Serve until drained or the engine dies; returns the process exit code."""
        self.server.start()
        log.info("serving %s on %s (tls=%s auth=%s)", self.service.model_name, self.config.address,
                 self.ssl_context is not None, self.service.auth_token is not None)
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self.drain)
        if self.config.zookeeper:
            self.register()
        reaper = gevent.spawn(self.reap_streams)
        self.stopped.wait()
        reaper.kill()
        if self.leaving is not None:
            self.leaving.join()   # the drain began leaving ZooKeeper: let the delete reach it before exiting
        self.deregister()
        self.server.stop(timeout=1)
        return self.exit_code

    def register(self) -> None:
        """Join the cluster in ZooKeeper once listening, so clients never see a server that cannot answer;
        in the background, so a ZooKeeper that is away delays joining, never serving."""
        from ringlm.server.registration import Registration
        self.registration = Registration(self.config.zookeeper, self.config.address, weight=self.config.weight,
                                         model=self.service.model_name, gevent=True,
                                         credentials=read_token_file(self.config.zookeeper_auth_file))

    def deregister(self) -> None:
        registration, self.registration = self.registration, None
        if registration is not None:
            registration.close()

    def spawn(self, function, *args) -> gevent.Greenlet:
        """StreamServer's spawn: a pooled greenlet per connection; past the limit an unpooled one,
        which `handle` closes at once (the pool's own spawn would stop accepting and leave clients hanging)."""
        if self.pool.full():
            return gevent.spawn(function, *args)
        return self.pool.spawn(function, *args)

    def handle(self, sock: socket.socket, address) -> None:
        if gevent.getcurrent() not in self.pool:
            log.warning("refused %s: %d connections is the limit", address[0], self.config.max_connections)
            sock.close()
            return
        self.service.connections += 1
        try:
            keep_alive(sock)
            if self.ssl_context is not None:
                sock = self.handshake(sock)
            InboundConnection(self, sock).serve()
        except (FrameError, ssl.SSLError, OSError) as error:
            log.info("closed %s:%s: %s", address[0], address[1], error)
        finally:
            self.service.connections -= 1
            sock.close()

    def handshake(self, sock: socket.socket) -> ssl.SSLSocket:
        tls = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(self.config.frame_timeout_s)   # a client that stalls the handshake is dropped
        try:
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        return tls

    def reap_streams(self) -> None:
        while True:
            gevent.sleep(REAP_INTERVAL_S)
            self.service.reap_idle_streams()

    def drain(self) -> None:
        """Stop accepting, refuse new work, let running work finish (up to the grace period), then stop."""
        if self.service.draining:
            return
        sent_away = self.service.engine.send_away()   # queued work goes elsewhere now, not after the grace
        log.info("draining: finishing %d requests within %g s, %d queued ones sent away",
                 len(self.service.engine.in_flight) - sent_away, self.config.drain_grace_s, sent_away)
        self.service.draining = True
        self.server.close()
        self.leaving = gevent.spawn(self.deregister)   # clients stop sending here now, not at exit
        gevent.spawn(self._finish_drain)

    def busy(self) -> bool:
        return bool(self.service.engine.in_flight or self.service.streams or self.calls_in_progress)

    def _finish_drain(self) -> None:
        self._wait_while_busy(self.config.drain_grace_s)
        if self.busy():
            # Running work past the grace is sent away too: each caller gets Overloaded(draining) and
            # runs it elsewhere (a stream resumes from its tokens), rather than a closed connection.
            log.warning("drain grace period over with work left: %d requests sent away, %d calls",
                        self.service.engine.send_away(running=True), self.calls_in_progress)
            self._wait_while_busy(DRAIN_ANSWER_S)
        self.stopped.set()

    def _wait_while_busy(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.busy() and time.monotonic() < deadline:
            gevent.sleep(DRAIN_POLL_S)

    def engine_died(self, loop: gevent.Greenlet) -> None:
        """Without its engine loop a worker can only hang its callers: exit so the supervisor restarts it."""
        log.critical("the engine loop died: %r", loop.exception)
        self.exit_code = 1
        self.stopped.set()


def check_registration(config: WorkerConfig) -> None:
    """Refuse, before the model loads, what ZooKeeper registration would refuse later: a weight clients
    would ignore, a credentials file that is missing or empty."""
    if config.zookeeper_auth_file and not config.zookeeper:
        raise ValueError("--zookeeper-auth-file needs --zookeeper")
    if config.zookeeper:
        from ringlm.client.discovery import check_weight
        try:
            check_weight(config.weight)
        except ValueError as error:
            raise ValueError(f"--weight: {error}") from None
        read_token_file(config.zookeeper_auth_file)


def keep_alive(sock: socket.socket) -> None:
    """TCP keepalive probes, so a peer that vanished without closing (a dead host, a cut link) is noticed
    in about a minute and its running generation cancelled, instead of running to max_tokens."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                          ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, option):   # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def raise_open_file_limit(max_connections: int) -> int:
    """Raise this process's soft limit on open files so --max-connections (plus the model's files, the
    metrics server and ZooKeeper) fits; a ValueError naming the flag when the hard limit is too low."""
    import resource

    needed = max_connections + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ValueError(f"--max-connections {max_connections} needs {needed} open files, but the hard limit "
                         f"(ulimit -Hn) is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        soft = needed
    return soft


def tls_context(config: WorkerConfig) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(config.tls_ca)
    return context


def build_service(config: WorkerConfig) -> Service:
    """Load the model and tokenizer and put an engine behind a Service (seconds: torch and weights)."""
    import torch

    from ringlm.ext.tokenizer import Tokenizer
    from ringlm.server.engine_loop import EngineLoop, gevent_engine
    from ringlm.server.model import apply_torch_threads, load_model

    apply_torch_threads(config.torch_threads)   # before the model: torch reads it when it first runs
    device = config.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{config.worker_index % torch.cuda.device_count()}"
    model = load_model(config.model, device=device, dtype=config.dtype)
    tokenizer = Tokenizer.from_model(config.model)
    engine_loop = EngineLoop(gevent_engine(model, tokenizer, config.engine_config()))
    return Service(engine_loop, tokenizer, server_name=config.address, model_name=str(config.model),
                   limits=config.service_limits(), auth_token=read_token_file(config.auth_token_file))


def run(config: WorkerConfig) -> int:
    """Load, serve until SIGTERM has drained the worker, return the exit code."""
    if config.debug_blocking_ms:
        # gevent's monitor thread prints the stack of any greenlet that holds the hub this long.
        gevent.config.monitor_thread = True
        gevent.config.max_blocking_time = config.debug_blocking_ms / 1000
    raise_open_file_limit(config.max_connections)
    check_registration(config)
    ssl_context = tls_context(config)
    service = build_service(config)
    worker = Worker(config, service, ssl_context)
    if config.metrics_port is not None:
        from ringlm.server.metrics import Metrics
        service.metrics = Metrics(service.stats)
        service.metrics.serve(config.host, config.metrics_port)
    service.engine_loop.start().link_exception(worker.engine_died)
    code = worker.serve_forever()
    service.engine_loop.stop()
    log.info("stopped (exit code %d)", code)
    return code


def configure_logging(config: WorkerConfig) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s [{config.address} pid={os.getpid()}] %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ringlm.server.worker",
                                     description="One ringlm server process (`ringlm serve` starts these).")
    add_arguments(parser)
    try:
        config = config_from_args(parser.parse_args(argv))
    except ValueError as error:
        parser.error(str(error))   # exits 2 with the usage line, as a malformed flag does
    configure_logging(config)
    try:
        return run(config)
    except (ValueError, OSError) as error:
        log.error("cannot start: %s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
