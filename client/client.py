"""The ringlm client: routes each request over the consistent-hash ring, retries elsewhere, resumes streams.

The routing key is the session (so a conversation returns to the server that
holds its KV cache) or, without one, a hash of the prompt's beginning (so
requests sharing a system prompt share a prefix cache). The ring's bounded
loads move a key off a node carrying more than `load_factor` times the mean.

A request that meets a connection error, Overloaded or a draining server is
sent to the next distinct available node clockwise, never past its deadline,
to at most `max_nodes_per_request` nodes and only while the client's retry
budget lasts; the deadline travels to each server as the time that remains.
Every sampled request carries a seed (a random one if the caller gave none), so a
generation retried from scratch gives the same tokens, and a stream whose
server dies is reopened on the next node with the prompt's ids plus the
tokens already received (`resume_ids`): the caller sees one uninterrupted,
identical stream. Both walk the same `Failover` (failover.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from ringlm.client.discovery import Discovery, StaticDiscovery
from ringlm.client.errors import CancelledError, DeadlineExceededError, ModelError, RinglmError
from ringlm.client.failover import RETRYABLE, Failover, RetryBudget, deadline_from, exhausted
from ringlm.client.pool import Node, Pool, PoolConfig
from ringlm.client.result import PRIORITIES, Result, Timings, Usage, result_from_thrift
from ringlm.client.ring import Ring
from ringlm.idl import copy_struct, to_dict
from ringlm.idl import ringlm_thrift as thrift

log = logging.getLogger(__name__)

T = TypeVar("T")

SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "logit_bias")
REQUEST_OPTIONS = ("stop_token_ids", "ignore_eos", "logprobs", "top_logprobs", "add_generation_prompt",
                   "parse_special")
PREFIX_KEY_CHARS = 256         # prompts that share this much share a routing key (and a prefix cache)
PREFIX_KEY_MESSAGES = 2        # for chats: the system prompt and the first user turn
STREAM_POLL_MS = 1000
DEADLINE_SLACK_S = 1.0         # past the deadline, how long the server's answer (with the partial) may take
Message = Mapping[str, str]


def routing_key(prompt: str | None, messages: Sequence[Message] | None, session: str | None) -> str:
    """The session, or a hash of the prompt's beginning: what picks a request's home node."""
    if session is not None:
        return session
    if messages is not None:
        opening = json.dumps([[m["role"], m["content"]] for m in messages[:PREFIX_KEY_MESSAGES]])
    else:
        opening = (prompt or "")[:PREFIX_KEY_CHARS]
    return "prompt:" + hashlib.blake2b(opening.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def build_request(prompt: str | None, messages: Sequence[Message] | None, *, session: str | None,
                  max_tokens: int, priority: str, stop: Sequence[str] | None, seed: int | None,
                  options: dict) -> thrift.GenerateRequest:
    """The Thrift request. Without sampling options it is greedy (the server's default); with any,
    it always carries a seed so that a retry or a resumed stream reproduces it exactly."""
    if (prompt is None) == (messages is None):
        raise TypeError("give exactly one of prompt or messages=")
    unknown = set(options) - set(SAMPLING_OPTIONS) - set(REQUEST_OPTIONS)
    if unknown:
        raise TypeError(f"unknown generation options: {', '.join(sorted(unknown))}")
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    sampling = {name: options[name] for name in SAMPLING_OPTIONS if options.get(name) is not None}
    sampling_options = None
    if sampling or seed is not None:
        sampling_options = thrift.SamplingOptions(**sampling, seed=secrets.randbits(63) if seed is None else seed)
    chat = None if messages is None else [thrift.ChatMessage(role=m["role"], content=m["content"])
                                          for m in messages]
    extra = {name: options[name] for name in REQUEST_OPTIONS if options.get(name) is not None}
    return thrift.GenerateRequest(prompt=prompt, messages=chat, sampling=sampling_options, max_tokens=max_tokens,
                                  stop=list(stop) if stop else None, priority=PRIORITIES[priority],
                                  session=session, **extra)


@dataclass
class ClientConfig(PoolConfig):
    """A Client's settings: its pool's (timeouts, health checks, back-off, auth token, TLS) and these."""

    load_factor: float = 1.25             # the ring's bound: a node takes at most this times the mean load
    generate_timeout_s: float = 600.0     # the longest a generate without a deadline waits for its answer
    max_nodes_per_request: int = 3        # distinct nodes one request tries: after three failures the fault is
                                          # likelier the cluster's or the request's than one node's
    # Retries may add this share to the requests sent (20%: an outage costs the cluster at most 1.2x
    # the load)...
    retry_budget_ratio: float = 0.2
    # ...plus this many a second, so that a client sending little (a chat, a CLI call) can still fail
    # over when a server dies (Finagle's RetryBudget uses the same two figures).
    retry_budget_floor_per_s: float = 10.0


class Client:
    """A consistent-hash client over a cluster of ringlm servers (a static list or a discovery source).

    Settings come from `config` with any ClientConfig field given as a keyword on top, e.g.
    `Client(servers, auth_token=token, load_factor=2)`.
    """

    def __init__(self, servers: Iterable[str] | Mapping[str, float] | str | None = None, *,
                 discovery: Discovery | None = None, config: ClientConfig | None = None, **settings):
        if (servers is None) == (discovery is None):
            raise TypeError("give exactly one of servers or discovery=")
        self.config = dataclasses.replace(config or ClientConfig(), **settings)
        if self.config.max_nodes_per_request < 1:
            raise ValueError(f"max_nodes_per_request must be at least 1, got {self.config.max_nodes_per_request}")
        self.pool = Pool(self.config)
        self.ring = Ring(load_factor=self.config.load_factor)
        self.retry_budget = RetryBudget(self.config.retry_budget_ratio, self.config.retry_budget_floor_per_s)
        self._lock = threading.Lock()
        self.discovery = discovery or StaticDiscovery(servers)
        self.discovery.watch(self._set_nodes)
        self.pool.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop discovery and the health checker, close every connection, empty the ring."""
        self.discovery.close()
        self.pool.close()
        self._set_nodes({})

    # -- membership and routing

    def _set_nodes(self, nodes: Mapping[str, float]) -> None:
        """Discovery's callback: the servers now in the cluster (address -> weight)."""
        with self._lock:
            self.pool.set_nodes(nodes)
            self.ring.set_nodes(nodes)
        log.info("ring: %s", ", ".join(sorted(nodes)) or "no servers")

    @property
    def servers(self) -> dict[str, float]:
        return self.ring.nodes

    def server_for(self, key: str) -> str:
        """The node a request with this routing key goes to first, loads and health considered."""
        node = self._pick(key, set())
        if node is None:
            raise exhausted(self.pool.unavailable())
        return node.address

    def failover(self, key: str, deadline: float | None) -> Failover:
        """The nodes a request with this routing key tries, in turn, until `deadline` (time.monotonic())."""
        return Failover(lambda tried: self._pick(key, tried), deadline, budget=self.retry_budget,
                        max_nodes=self.config.max_nodes_per_request, unavailable=self.pool.unavailable)

    def _pick(self, key: str, tried: set[str]) -> Node | None:
        """The first untried available node for key, bounded by load; None when every node is tried,
        ejected or draining (an ejected node comes back when the checker's probe finds it answering)."""
        with self._lock:   # the ring and the pool change together under it: their nodes agree
            try:
                address = self.ring.node_for_bounded(key, self.pool.loads(),
                                                     exclude=tried | self.pool.unavailable().keys())
            except LookupError:   # no node, or every one excluded
                return None
            return self.pool.node(address)

    def _with_failover(self, key: str, deadline: float | None,
                       attempt: Callable[[Node, int | None], T]) -> T:
        """attempt(node, remaining_ms) on each node of the key's failover until one answers (the
        failover raises when the deadline passes or no node is left)."""
        failover = self.failover(key, deadline)
        for node, remaining_ms in failover:
            try:
                return attempt(node, remaining_ms)
            except RETRYABLE as error:
                failover.failed(node, error)

    def _timeout_s(self, remaining_ms: int | None) -> float:
        """How long to wait for a generate's answer: the remaining deadline plus slack for the
        server's reply (it ends the request at the deadline), else generate_timeout_s."""
        if remaining_ms is None:
            return self.config.generate_timeout_s
        return remaining_ms / 1000 + DEADLINE_SLACK_S

    # -- generation

    def generate(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                 session: str | None = None, max_tokens: int = 256, deadline_ms: int | None = None,
                 priority: str = "normal", stop: Sequence[str] | None = None, seed: int | None = None,
                 **options) -> Result:
        """Generate text for a prompt or chat messages; options are the sampling fields
        (temperature, top_k, top_p, min_p, penalties, logit_bias) and stop_token_ids, ignore_eos,
        logprobs, top_logprobs, add_generation_prompt, parse_special (a prompt's control-token text as control
        tokens: for trusted text only)."""
        request = build_request(prompt, messages, session=session, max_tokens=max_tokens, priority=priority,
                                stop=stop, seed=seed, options=options)
        deadline = deadline_from(deadline_ms)

        def attempt(node: Node, remaining_ms: int | None) -> Result:
            request.deadline_ms = remaining_ms
            return result_from_thrift(node.call("generate", request, timeout_s=self._timeout_s(remaining_ms)))

        return self._with_failover(routing_key(prompt, messages, session), deadline, attempt)

    def stream(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
               session: str | None = None, max_tokens: int = 256, deadline_ms: int | None = None,
               priority: str = "normal", stop: Sequence[str] | None = None, seed: int | None = None,
               **options) -> Stream:
        """Like generate, but an iterator of text chunks as they are generated; the Stream's
        `result` holds the whole Result once it is exhausted."""
        request = build_request(prompt, messages, session=session, max_tokens=max_tokens, priority=priority,
                                stop=stop, seed=seed, options=options)
        return Stream(self, request, routing_key(prompt, messages, session), deadline_from(deadline_ms))

    def generate_many(self, requests: Iterable[str | Mapping], concurrency: int = 8,
                      return_exceptions: bool = False) -> list[Result | RinglmError]:
        """Run many generations, `concurrency` at a time; results in the requests' order.

        A request is a prompt or a dict of generate()'s arguments. With return_exceptions, a failed
        request's typed error takes its place in the list instead of being raised.
        """
        def one(request: str | Mapping) -> Result | RinglmError:
            try:
                return self.generate(request) if isinstance(request, str) else self.generate(**request)
            except RinglmError as error:
                if return_exceptions:
                    return error
                raise

        with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="ringlm-generate") as pool:
            return list(pool.map(one, requests))

    # -- tokens and status

    def tokenize(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        return self._with_failover(secrets.token_hex(8), None, lambda node, _: node.call(
            "tokenize", text, add_special_tokens, parse_special))

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._with_failover(secrets.token_hex(8), None, lambda node, _: node.call(
            "detokenize", list(token_ids), skip_special_tokens))

    def status_all(self) -> dict[str, dict | RinglmError]:
        """Every known server's status as a dict, or the error that kept it from answering."""
        report: dict[str, dict | RinglmError] = {}
        for address, node in sorted(self.pool.nodes.items()):
            try:
                status = node.call("status")
            except RinglmError as error:
                report[address] = error
                continue
            node.note_status(status)
            report[address] = to_dict(status)
        return report


class Stream:
    """The text chunks of one generation as they arrive, continued on the next ring node if its server dies.

    Iterate it for text; afterwards `result` is the whole Result. `close()` (or dropping it
    half-read) closes its connection, which cancels the generation on the server.
    """

    def __init__(self, client: Client, request: thrift.GenerateRequest, key: str, deadline: float | None):
        self.client = client
        self.request = request
        self.key = key
        self.deadline = deadline
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []   # per token, when the request asked for them
        self.text = ""
        self.result: Result | None = None
        self.server: str | None = None    # the server generating it now
        self.failed_over_from: list[str] = []
        self._chunks = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def _run(self) -> Iterator[str]:
        failover = self.client.failover(self.key, self.deadline)
        for node, remaining_ms in failover:
            try:
                yield from self._on(node, remaining_ms)
                break   # it returns only once the result is in
            except RETRYABLE as error:
                failover.failed(node, error)
                if self.token_ids:
                    self.failed_over_from.append(node.address)
                    log.info("stream on %s broke after %d tokens; resuming elsewhere", node.address,
                             len(self.token_ids))
        self._raise_for_ending()

    def _on(self, node: Node, remaining_ms: int | None) -> Iterator[str]:
        """Open (or resume) the stream on one node and relay its chunks until it is done."""
        poll_timeout_s = STREAM_POLL_MS / 1000 + self.client.config.read_timeout_s
        with node.connection() as connection:   # one connection throughout: closing it cancels the stream
            request = self._request_for(connection, remaining_ms)
            if request is None:
                return   # everything had arrived before the server died
            stream_id = connection.call("open_stream", request, timeout_s=poll_timeout_s)
            self.server = node.address
            while True:
                chunk = connection.call("next_chunk", stream_id, STREAM_POLL_MS, timeout_s=poll_timeout_s)
                self.token_ids += chunk.token_ids or []
                self.logprobs += chunk.logprobs or []
                if chunk.text:
                    self.text += chunk.text
                    yield chunk.text   # abandoned here, the connection closes: the server cancels the stream
                if chunk.done:
                    self._finish(result_from_thrift(chunk.result))
                    return

    def _request_for(self, connection, remaining_ms: int | None) -> thrift.GenerateRequest | None:
        """The request as first sent, or after a failover the same request plus what arrived so far
        (`resume_ids`): the next server tokenizes the prompt or messages as the first did (same model,
        same rules, control tokens in user text kept plain), so nothing is tokenized here."""
        request = self.request
        request.deadline_ms = remaining_ms
        if not self.token_ids:
            return request
        if len(self.token_ids) >= request.max_tokens:
            self._finish(Result(text="", token_ids=[], finish_reason="length", usage=Usage(),
                                timings=Timings(), server=connection.address))
            return None
        return copy_struct(request, request_id=None, resume_ids=list(self.token_ids))

    def _finish(self, last: Result) -> None:
        """The whole result: all text, tokens and logprobs; usage, timings and the alternatives of
        each token from the server that finished (those of the servers that died went with them)."""
        last.usage = Usage(prompt_tokens=last.usage.prompt_tokens, cached_prompt_tokens=last.usage.cached_prompt_tokens,
                           completion_tokens=len(self.token_ids))
        last.text, last.token_ids = self.text, list(self.token_ids)
        last.logprobs = list(self.logprobs) if self.request.logprobs or self.request.top_logprobs else None
        if self.request.top_logprobs:
            received = last.top_logprobs or []
            last.top_logprobs = [None] * (len(self.token_ids) - len(received)) + received
        last.failed_over_from = list(self.failed_over_from)
        self.result = last

    def _raise_for_ending(self) -> None:
        """A stream that the server ended by deadline, cancellation or model failure raises like generate."""
        result = self.result
        if result.finish_reason == "deadline":
            raise DeadlineExceededError("the deadline passed", partial=result, server=result.server)
        if result.finish_reason == "cancelled":
            raise CancelledError("the request was cancelled", partial=result, server=result.server)
        if result.finish_reason == "error":
            raise ModelError("the model failed for this request", server=result.server)
