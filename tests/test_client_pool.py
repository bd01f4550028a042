"""The client's parts without servers: pool ejection and back-off (real sockets to closed ports), routing
keys, requests, error mapping, static discovery."""

from __future__ import annotations

import time

import pytest

from ringlm.client.client import build_request, exhausted, routing_key
from ringlm.client.discovery import StaticDiscovery, parse_member
from ringlm.client.errors import (CancelledError, DeadlineExceededError, InvalidRequestError,
                                  NoServerAvailableError, OverloadedError, ServerUnavailableError, from_thrift)
from ringlm.client.pool import Node, Pool, PoolConfig
from ringlm.idl import ringlm_thrift as thrift
from tests.server_helpers import free_port


def closed_address() -> str:
    return f"127.0.0.1:{free_port()}"   # nothing listens there: connections are refused at once


def config(**overrides) -> PoolConfig:
    return PoolConfig(**{"first_backoff_s": 0.5, "max_backoff_s": 2.0, "health_interval_s": 0, **overrides})


# -- ejection and back-off

def test_a_refused_connection_ejects_the_node_for_a_doubling_capped_backoff():
    node = Node(closed_address(), config())
    backoffs = []
    for _ in range(4):
        backoffs.append(node.backoff_s)
        with pytest.raises(ServerUnavailableError) as error:
            node.call("health")
        assert error.value.server == node.address and isinstance(error.value, ConnectionError)
        assert not node.available() and node.ejected_until > time.monotonic()
    assert backoffs == [0.5, 1.0, 2.0, 2.0]
    assert node.in_flight == 0


def test_the_checker_probes_an_ejected_node_only_once_its_backoff_has_passed():
    pool = Pool(config())
    address = closed_address()
    pool.set_nodes([address])
    node = pool.node(address)
    with pytest.raises(ServerUnavailableError):
        node.call("health")
    ejected_until, backoff = node.ejected_until, node.backoff_s
    pool.check_all()
    assert (node.ejected_until, node.backoff_s) == (ejected_until, backoff)   # not probed yet
    node.ejected_until = time.monotonic() - 0.01   # as if the back-off had passed
    pool.check_all()
    assert node.backoff_s == 2 * backoff and not node.available()            # probed, failed, longer back-off


def test_unavailable_nodes_are_the_ejected_and_the_draining():
    pool = Pool(config())
    first, second, third = (closed_address() for _ in range(3))
    pool.set_nodes([first, second, third])
    pool.node(first).eject("test")
    pool.node(second).draining = True
    assert pool.unavailable() == {first, second}
    pool.node(first).readmit()
    assert pool.unavailable() == {second}


def test_a_nodes_load_is_our_in_flight_calls_plus_the_work_its_status_reports_beyond_them():
    pool = Pool(config())
    first, second = closed_address(), closed_address()
    pool.set_nodes([first, second])
    node = pool.node(first)
    node.in_flight = 2
    node.note_status(thrift.ServerStatus(running=5, waiting={"NORMAL": 1}, draining=False))
    assert pool.loads() == {first: 6, second: 0}   # 2 of ours + 4 of others
    node.in_flight = 0                              # ours finished: only the others' remain
    assert pool.loads()[first] == 4
    node.eject("test")                              # a failed server's last report no longer holds
    assert pool.loads()[first] == 0
    node.note_status(thrift.ServerStatus(running=0, waiting={}, draining=True))
    assert node.draining


def test_membership_changes_keep_the_state_of_nodes_that_stay():
    pool = Pool(config())
    kept, dropped, added = closed_address(), closed_address(), closed_address()
    pool.set_nodes([kept, dropped])
    pool.node(kept).draining = True
    pool.set_nodes([kept, added])
    assert set(pool.nodes) == {kept, added} and pool.node(kept).draining
    with pytest.raises(ValueError, match="host:port"):
        pool.set_nodes(["no-port"])


# -- routing keys and requests

def test_the_session_is_the_routing_key_else_the_prompts_beginning():
    assert routing_key("anything", None, "chat-7") == "chat-7"
    shared = "You are a helpful assistant. " * 20
    assert routing_key(shared + "question one", None, None) == routing_key(shared + "question two", None, None)
    assert routing_key("one", None, None) != routing_key("two", None, None)
    first_turn = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    later_turn = first_turn + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    assert routing_key(None, first_turn, None) == routing_key(None, later_turn, None)


def test_a_sampled_request_always_carries_a_seed_and_a_greedy_one_needs_none():
    def request(seed=None, **options):
        return build_request("hi", None, session=None, max_tokens=5, priority="normal", stop=None, seed=seed,
                             options=options)
    assert request().sampling is None
    seeds = {request(temperature=0.8).sampling.seed for _ in range(5)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)
    assert request(seed=42, top_k=3).sampling.seed == 42
    assert request(seed=42, top_k=3).sampling.top_k == 3
    with pytest.raises(TypeError, match="bogus"):
        request(bogus=1)
    with pytest.raises(ValueError, match="priority"):
        build_request("hi", None, session=None, max_tokens=5, priority="urgent", stop=None, seed=None, options={})


# -- errors

def test_thrift_exceptions_map_to_typed_errors_with_their_details():
    invalid = from_thrift(thrift.InvalidRequest(field="max_tokens", message="too many"), "h:1")
    assert isinstance(invalid, InvalidRequestError) and invalid.field == "max_tokens" and invalid.server == "h:1"
    overloaded = from_thrift(thrift.Overloaded(message="full", retry_after_ms=250, draining=True), "h:1")
    assert isinstance(overloaded, OverloadedError) and overloaded.retry_after_ms == 250 and overloaded.draining
    partial = thrift.GenerateResult(request_id="r", text="ab", token_ids=[1, 2],
                                    finish_reason=thrift.FinishReason.DEADLINE, server="h:1")
    late = from_thrift(thrift.DeadlineExceeded(message="late", partial=partial), "h:1")
    assert isinstance(late, DeadlineExceededError) and late.partial.token_ids == [1, 2]
    assert late.partial.finish_reason == "deadline"
    assert isinstance(from_thrift(thrift.Cancelled(message="bye"), "h:1"), CancelledError)


def test_a_request_every_node_refused_reports_overload_only_if_all_were_overloaded():
    full = {"a:1": OverloadedError("full", retry_after_ms=300), "b:2": OverloadedError("full", retry_after_ms=100)}
    error = exhausted(full)
    assert isinstance(error, OverloadedError) and error.retry_after_ms == 100
    mixed = {**full, "c:3": ServerUnavailableError("refused", server="c:3")}
    error = exhausted(mixed)
    assert isinstance(error, NoServerAvailableError) and set(error.errors) == {"a:1", "b:2", "c:3"}
    assert isinstance(exhausted({}), NoServerAvailableError)


# -- discovery

def test_static_discovery_checks_addresses_and_reports_weights():
    seen = []
    StaticDiscovery(["a:1", "b:2"]).watch(seen.append)
    StaticDiscovery({"a:1": 2.0}).watch(seen.append)
    StaticDiscovery("a:1, c:3").watch(seen.append)
    assert seen == [{"a:1": 1.0, "b:2": 1.0}, {"a:1": 2.0}, {"a:1": 1.0, "c:3": 1.0}]
    with pytest.raises(ValueError, match="empty"):
        StaticDiscovery([])
    with pytest.raises(ValueError, match="host:port"):
        StaticDiscovery(["localhost"])


def test_a_server_znode_is_read_with_its_weight_and_filtered_by_model():
    data = b'{"address": "10.0.0.1:9090", "weight": 2, "model": "smol"}'
    assert parse_member(data, None) == ("10.0.0.1:9090", 2.0)
    assert parse_member(data, "smol") == ("10.0.0.1:9090", 2.0)
    assert parse_member(data, "other") is None
    assert parse_member(b"not json", None) is None
    assert parse_member(b'{"address": "no-port"}', None) is None
