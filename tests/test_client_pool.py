"""The client's parts without servers: pool ejection and back-off (real sockets to closed ports), routing
keys, requests, error mapping, the failover walk, static discovery, and the helpers for addresses, tokens,
probes, Thrift structs and configuration."""

from __future__ import annotations

import socket
import time

import pytest

from ringlm.client import Client, ClientConfig
from ringlm.client.address import parse_server_list, split_address
from ringlm.client.auth import read_token_file
from ringlm.client.client import build_request, routing_key
from ringlm.client.discovery import StaticDiscovery, member_data, member_path, parse_member
from ringlm.client.errors import (CancelledError, DeadlineExceededError, InvalidRequestError,
                                  NoServerAvailableError, OverloadedError, ServerUnavailableError, from_thrift)
from ringlm.client.failover import Failover, exhausted
from ringlm.client.pool import Node, Pool, PoolConfig
from ringlm.client.probe import answers_health, probe
from ringlm.client.result import FINISH_REASONS, PRIORITIES, result_from_thrift
from ringlm.idl import copy_struct, to_dict
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


def test_a_servers_znode_is_what_discovery_reads_back():
    assert member_path("/ringlm/servers/", "10.0.0.1:9090") == "/ringlm/servers/10.0.0.1:9090"
    assert parse_member(member_data("10.0.0.1:9090", 2.0, "smol"), "smol") == ("10.0.0.1:9090", 2.0)
    assert parse_member(member_data("10.0.0.1:9090", 1.0, "smol"), "other") is None


# -- the failover walk that generate, streams and tokenize share

def test_a_failover_tries_each_node_once_and_a_draining_refusal_marks_the_node():
    nodes = [Node(closed_address(), config()) for _ in range(2)]
    failover = Failover(lambda tried: next((n for n in nodes if n.address not in tried), None), deadline=None)
    seen = []
    with pytest.raises(NoServerAvailableError) as error:
        for node, remaining_ms in failover:
            seen.append((node.address, remaining_ms))
            failover.failed(node, OverloadedError("leaving", draining=True, server=node.address))
    assert seen == [(node.address, None) for node in nodes]
    assert all(node.draining for node in nodes)
    assert set(error.value.errors) == {node.address for node in nodes}


def test_a_failover_past_its_deadline_tries_no_node():
    picked = []
    failover = Failover(picked.append, deadline=time.monotonic() - 0.001)
    with pytest.raises(DeadlineExceededError):
        next(iter(failover))
    assert picked == []


def test_generate_stream_and_tokenize_fail_alike_when_every_node_is_down_or_draining():
    dead = [closed_address() for _ in range(2)]
    with Client(dead, health_interval_s=0) as client:   # no checker: nothing but the requests changes a node
        calls = {"generate": lambda: client.generate("hi", max_tokens=2),
                 "stream": lambda: list(client.stream("hi", max_tokens=2)),
                 "tokenize": lambda: client.tokenize("hi")}
        for name, call in calls.items():
            with pytest.raises(NoServerAvailableError) as error:
                call()
            assert set(error.value.errors) == set(dead), name   # ejected by the first call, still tried
            assert all(isinstance(e, ServerUnavailableError) for e in error.value.errors.values()), name
        for node in client.pool.nodes.values():
            node.draining = True
        for name, call in calls.items():
            with pytest.raises(NoServerAvailableError) as error:
                call()
            assert str(error.value) == "no server is available" and error.value.errors == {}, name


# -- helpers: addresses, the auth token file, probes, Thrift structs, enum names, settings

def test_an_address_is_host_colon_port_and_a_server_list_is_a_comma_separated_run_of_them():
    assert split_address("10.0.0.1:9090") == ("10.0.0.1", 9090)
    assert split_address("[::1]:9090") == ("::1", 9090)
    assert parse_server_list(" a:1, b:2 ,") == ["a:1", "b:2"]
    for bad in ("localhost", "host:", ":9090", "[]:9090", "host:http", "host:0", "host:65536", "host:-1"):
        with pytest.raises(ValueError, match="host:port"):
            split_address(bad)
    with pytest.raises(ValueError, match="host:port"):
        parse_server_list("a:1,b")
    with pytest.raises(ValueError, match="empty"):
        parse_server_list(" , ")


def test_the_auth_token_file_is_read_stripped_and_an_empty_or_missing_one_is_an_error(tmp_path):
    path = tmp_path / "token"
    path.write_text("  s3cret\n")
    assert read_token_file(path) == read_token_file(str(path)) == "s3cret"
    assert read_token_file(None) is None
    path.write_text(" \n")
    with pytest.raises(ValueError, match="the auth token file is empty"):
        read_token_file(path)
    with pytest.raises(FileNotFoundError):
        read_token_file(tmp_path / "missing")


def test_the_probe_finds_no_server_at_a_closed_port_or_a_silent_one():
    closed = closed_address()
    assert answers_health(closed) is False
    with pytest.raises(ServerUnavailableError) as error:
        probe(closed, "status")
    assert error.value.server == closed
    silent = socket.socket()   # accepts connections into its backlog and never replies
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ServerUnavailableError):
            probe(address, timeout_s=0.2)
        assert answers_health(address, timeout_s=0.2) is False
    finally:
        silent.close()


def test_a_thrift_struct_reads_as_a_dict_of_its_fields_and_copies_with_changes():
    fields = to_dict(thrift.ServerStatus(server="h:1", running=2, waiting={"NORMAL": 1}))
    assert list(fields)[:5] == ["server", "model", "draining", "running", "waiting"] and len(fields) == 21
    assert (fields["server"], fields["running"], fields["waiting"], fields["model"]) == ("h:1", 2, {"NORMAL": 1}, None)
    request = thrift.GenerateRequest(prompt="hi", sampling=thrift.SamplingOptions(seed=7), max_tokens=5)
    resumed = copy_struct(request, prompt=None, prompt_ids=[1, 2])
    assert (resumed.prompt, resumed.prompt_ids, resumed.max_tokens) == (None, [1, 2], 5)
    assert resumed.sampling is request.sampling                     # shallow
    assert (request.prompt, request.prompt_ids) == ("hi", None)     # the original is untouched
    with pytest.raises(TypeError):
        copy_struct(request, no_such_field=1)


def test_enum_names_come_from_the_idl():
    assert set(FINISH_REASONS.values()) == {"stop", "length", "deadline", "cancelled", "error"}
    assert FINISH_REASONS[thrift.FinishReason.DEADLINE] == "deadline"
    assert PRIORITIES == {"low": thrift.Priority.LOW, "normal": thrift.Priority.NORMAL, "high": thrift.Priority.HIGH}
    result = result_from_thrift(thrift.GenerateResult(
        finish_reason=thrift.FinishReason.CANCELLED, top_logprobs=[[thrift.TokenLogprob(token_id=5, logprob=-0.5)]]))
    assert result.finish_reason == "cancelled" and result.top_logprobs == [[(5, -0.5)]]


def test_client_settings_are_a_client_config_with_keyword_overrides():
    servers = [closed_address()]
    with Client(servers, health_interval_s=0, load_factor=3.0) as client:
        assert client.config == ClientConfig(health_interval_s=0, load_factor=3.0)
        assert client.ring.load_factor == 3.0 and client.pool.config is client.config
    base = ClientConfig(first_backoff_s=0.1, auth_token="t")
    with Client(servers, config=base, health_interval_s=0) as client:
        assert (client.config.first_backoff_s, client.config.auth_token, client.config.health_interval_s) == (
            0.1, "t", 0)
    assert base.health_interval_s == ClientConfig().health_interval_s   # the caller's config is left as it was
    with pytest.raises(TypeError, match="load_factr"):
        Client(servers, load_factr=2)
