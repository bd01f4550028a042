"""The client's parts without servers: pool ejection, suspicion and back-off (real sockets to closed ports
and to sockets that hang up), the frame size check, routing keys, requests, error mapping, the failover
walk and its retry budget, static discovery and the znode format, and the helpers for addresses, tokens,
probes, Thrift structs and configuration."""

from __future__ import annotations

import math
import socket
import ssl
import threading
import time
from contextlib import contextmanager

import pytest

from ringlm.client import Client, ClientConfig
from ringlm.client.address import parse_server_list, split_address
from ringlm.client.auth import read_token_file
from ringlm.client.client import build_request, routing_key
from ringlm.client.discovery import (MAX_WEIGHT, StaticDiscovery, in_networks, member_acl, member_data, member_path,
                                     parse_credentials, parse_member, parse_networks)
from ringlm.client.errors import (CancelledError, DeadlineExceededError, InvalidRequestError,
                                  NoServerAvailableError, OverloadedError, ServerUnavailableError, from_thrift)
from ringlm.client.failover import Failover, RetryBudget, exhausted
from ringlm.client.pool import Node, Pool, PoolConfig
from ringlm.client.probe import answers_health, probe
from ringlm.client.result import FINISH_REASONS, PRIORITIES, result_from_thrift
from ringlm.idl import copy_struct, to_dict
from ringlm.idl import ringlm_thrift as thrift
from tests.server_helpers import free_port, wait_until


def closed_address() -> str:
    return f"127.0.0.1:{free_port()}"   # nothing listens there: connections are refused at once


def config(**overrides) -> PoolConfig:
    return PoolConfig(**{"first_backoff_s": 0.5, "max_backoff_s": 2.0, "health_interval_s": 0, **overrides})


@contextmanager
def listening(serve_connection):
    """A local server that runs serve_connection(sock) for each connection it accepts; its address."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def accept_forever():
        while True:
            try:
                sock, _ = server.accept()
            except OSError:
                return   # closed: the test is over
            with sock:
                serve_connection(sock)

    threading.Thread(target=accept_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def hang_up(sock: socket.socket) -> None:
    """Read the call, then close without answering: a failure after sending."""
    sock.recv(65536)


def silent_server():
    """A socket that accepts connections into its backlog and never replies."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    return silent


# -- ejection and back-off

def test_a_refused_connection_ejects_the_node_for_a_doubling_capped_backoff():
    node = Node(closed_address(), config())
    backoffs = []
    for _ in range(4):
        backoffs.append(node.backoff_s)
        with pytest.raises(ServerUnavailableError) as error:
            node.call("health")
        assert error.value.server == node.address and isinstance(error.value, ConnectionError)
        assert error.value.sent is False
        assert not node.available() and node.ejected_until > time.monotonic()
    assert backoffs == [0.5, 1.0, 2.0, 2.0]
    assert node.in_flight == 0


def test_a_failed_tls_handshake_ejects_the_node_at_once():
    with listening(lambda sock: None) as address:   # a plain TCP server that hangs up on the handshake
        node = Node(address, config(ssl_context=ssl.create_default_context()))
        with pytest.raises(ServerUnavailableError) as error:
            node.call("health")
        assert error.value.sent is False and not node.available()


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
    pool.node(first).eject("refused")
    pool.node(second).draining = True
    unavailable = pool.unavailable()
    assert set(unavailable) == {first, second}
    assert isinstance(unavailable[first], ServerUnavailableError) and unavailable[first].message == "ejected: refused"
    assert isinstance(unavailable[second], OverloadedError) and unavailable[second].draining
    pool.node(first).readmit()
    assert set(pool.unavailable()) == {second}


def test_a_call_that_fails_after_sending_makes_the_node_suspect_and_only_a_failed_probe_ejects_it():
    test_over = threading.Event()

    def stall(sock: socket.socket) -> None:
        sock.recv(65536)
        test_over.wait(60)

    for serve in (hang_up, stall):   # end of file, then a read timeout
        with listening(serve) as address:
            pool = Pool(config(read_timeout_s=0.2, connect_timeout_s=0.2))
            pool.set_nodes([address])
            node = pool.node(address)
            with pytest.raises(ServerUnavailableError) as error:
                node.call("health")
            assert error.value.sent is True
            assert node.available() and node.suspected == error.value.message   # not ejected by the call
            pool.check_suspects()                                                   # the probe fails too
            assert not node.available() and node.suspected is None
            assert node.unavailable_error().message.startswith("ejected: ")
    test_over.set()


def test_the_checker_probes_a_suspect_node_at_once_not_at_its_next_round():
    with listening(hang_up) as address:
        pool = Pool(config(health_interval_s=3600))
        pool.set_nodes([address])
        pool.start()
        try:
            node = pool.node(address)
            with pytest.raises(ServerUnavailableError):
                node.call("health")
            wait_until(lambda: not node.available(), timeout_s=60, what="the checker's probe to eject it")
        finally:
            pool.close()


def test_a_call_over_max_frame_bytes_is_refused_before_a_byte_is_sent():
    received = []
    with listening(lambda sock: received.append(sock.recv(1 << 22))) as address:
        with Client([address], max_frame_bytes=1000, health_interval_s=0) as client:
            for call in (lambda: client.generate("x" * 1000), lambda: list(client.stream("x" * 1000)),
                         lambda: client.tokenize("x" * 1000)):
                with pytest.raises(InvalidRequestError, match=r"the (generate|open_stream|tokenize) request is "
                                                              r"\d+ bytes serialized, over max_frame_bytes \(1000\)"):
                    call()
            node = client.pool.node(address)
            assert node.available() and node.suspected is None and node.in_flight == 0
        # closing the client closed the connection that carried nothing: the server read end of file
        wait_until(lambda: received, timeout_s=30, what="the connection to close")
    assert received == [b""]


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


def test_static_discovery_refuses_weights_a_ring_cannot_use():
    for weight in (0, -1, math.nan, math.inf, 1e300, MAX_WEIGHT * 1.01, "2", True, None):
        with pytest.raises(ValueError, match="weight"):
            StaticDiscovery({"a:1": weight})
    assert StaticDiscovery({"a:1": MAX_WEIGHT}).nodes == {"a:1": MAX_WEIGHT}


def test_a_server_znode_is_read_with_its_weight_and_filtered_by_model():
    address = "10.0.0.1:9090"
    data = b'{"address": "10.0.0.1:9090", "weight": 2, "model": "smol"}'
    assert parse_member(address, data, None) == (address, 2.0)
    assert parse_member(address, data, "smol") == (address, 2.0)
    assert parse_member(address, data, "other") is None
    assert parse_member(address, b"not json", None) is None
    assert parse_member(address, b'{"weight": 1}', None) is None
    assert parse_member("no-port", b'{"address": "no-port"}', None) is None


def test_a_znode_with_an_unusable_weight_or_address_is_ignored_with_a_warning(caplog):
    def member(weight_json: str, address: str = "10.0.0.1:9090", name: str = "10.0.0.1:9090"):
        return parse_member(name, f'{{"address": "{address}", "weight": {weight_json}}}'.encode(), None)

    for weight in ("1e300", "NaN", "Infinity", "-Infinity", "1e999", "-1", "0", "100.5", '"2"', "true", "null",
                   "[1]"):
        caplog.clear()
        assert member(weight) is None, weight
        assert "ignoring the server znode" in caplog.text and "weight" in caplog.text, weight
    assert member("100") == ("10.0.0.1:9090", 100.0) and member("0.25") == ("10.0.0.1:9090", 0.25)
    assert member("1", name="10.0.0.2:9090") is None              # another server's address under its name
    assert member("1", address="10.0.0.1:0", name="10.0.0.1:0") is None
    assert member("1", address="10.0.0.1:65536", name="10.0.0.1:65536") is None
    assert member("1", address="10.0.0.1", name="10.0.0.1") is None


def test_a_servers_znode_is_what_discovery_reads_back():
    address = "10.0.0.1:9090"
    assert member_path("/ringlm/servers/", address) == "/ringlm/servers/10.0.0.1:9090"
    assert parse_member(address, member_data(address, 2.0, "smol"), "smol") == (address, 2.0)
    assert parse_member(address, member_data(address, 1.0, "smol"), "other") is None


def test_allowed_networks_admit_only_addresses_that_resolve_inside_them():
    networks = parse_networks(["10.0.0.0/8", " fd00::/8", "127.0.0.0/8", "::1/128"])
    assert in_networks("10.1.2.3:9090", networks) and in_networks("[fd00::1]:9090", networks)
    assert in_networks("localhost:9090", networks)                           # resolved to loopback
    assert not in_networks("localhost:9090", parse_networks(["10.0.0.0/8"]))
    assert not in_networks("192.168.1.1:9090", networks) and not in_networks("[fe80::1]:9090", networks)
    assert not in_networks("no-such-host.invalid:9090", networks)
    for bad in (["10.0.0.1/8"], ["10.0.0.0/33"], ["ten"], [""], []):
        with pytest.raises(ValueError, match="network"):
            parse_networks(bad)


def test_zookeeper_credentials_are_user_colon_password_and_give_everyone_read_only():
    assert parse_credentials("ringlm:pa:ss") == ("ringlm", "pa:ss")
    for bad in ("ringlm", ":secret", "ringlm:"):
        with pytest.raises(ValueError, match="user:password"):
            parse_credentials(bad)
    assert member_acl(None) is None
    world, owner = member_acl("ringlm:secret")
    assert (world.id.scheme, world.id.id, world.perms) == ("world", "anyone", 1)             # READ only
    assert (owner.id.scheme, owner.id.id.split(":")[0], owner.perms) == ("digest", "ringlm", 31)   # ALL


# -- the failover walk that generate, streams and tokenize share

def walk(nodes, **limits) -> Failover:
    """A failover over `nodes` in their order, with a generous budget unless told otherwise."""
    options = {"budget": RetryBudget(ratio=0, floor_per_s=100), "max_nodes": len(nodes),
               "unavailable": lambda: {}, **limits}
    return Failover(lambda tried: next((n for n in nodes if n.address not in tried), None), None, **options)


def test_a_failover_tries_each_node_once_and_a_draining_refusal_marks_the_node():
    nodes = [Node(closed_address(), config()) for _ in range(2)]
    failover = walk(nodes)
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
    failover = Failover(picked.append, time.monotonic() - 0.001, budget=RetryBudget(0, 10), max_nodes=3,
                        unavailable=dict)
    with pytest.raises(DeadlineExceededError):
        next(iter(failover))
    assert picked == []


def test_a_failover_stops_at_max_nodes_and_when_the_retry_budget_is_spent():
    nodes = [Node(closed_address(), config()) for _ in range(4)]

    def tried(failover: Failover) -> tuple[list[str], NoServerAvailableError]:
        seen = []
        with pytest.raises(NoServerAvailableError) as error:
            for node, _ in failover:
                seen.append(node.address)
                failover.failed(node, ServerUnavailableError("reset", server=node.address))
        assert set(error.value.errors) == set(seen)   # it fails with the errors it met
        return seen, error.value

    seen, error = tried(walk(nodes, max_nodes=2))
    assert seen == [n.address for n in nodes[:2]] and "max_nodes_per_request" in str(error)
    budget = RetryBudget(ratio=0, floor_per_s=0.1)   # one retry in the bucket (0.1/s over a 10 s window)
    seen, _ = tried(walk(nodes, budget=budget))
    assert seen == [n.address for n in nodes[:2]]
    seen, error = tried(walk(nodes, budget=budget))
    assert seen == [nodes[0].address] and "retry budget is spent" in str(error)


def test_the_retry_budget_allows_a_ratio_of_the_requests_plus_a_floor_per_second():
    now = [0.0]
    budget = RetryBudget(ratio=0.25, floor_per_s=0, clock=lambda: now[0])   # a ratio binary floats hold exactly

    def retries_allowed() -> int:
        count = 0
        while budget.take():
            count += 1
        return count

    assert retries_allowed() == 0
    for _ in range(100):
        budget.sent()
    assert retries_allowed() == 25                 # a quarter of the requests sent
    for _ in range(100):
        budget.sent()
    now[0] += 10.0                                 # a window later, what was not spent has faded to 1/e
    assert retries_allowed() == int(25 / math.e)
    floor = RetryBudget(ratio=0, floor_per_s=10, window_s=10, clock=lambda: now[0])
    assert sum(floor.take() for _ in range(200)) == 100   # a window's worth at the start
    now[0] += 1.0
    assert sum(floor.take() for _ in range(200)) == int(100 * (1 - math.exp(-0.1)))   # ~10 a second
    now[0] += 3600.0
    assert sum(floor.take() for _ in range(200)) == 100   # an idle hour banks no more than a window
    with pytest.raises(ValueError):
        RetryBudget(ratio=-0.1, floor_per_s=1)


def test_a_client_with_no_retry_budget_left_tries_only_the_home_node():
    dead = [closed_address() for _ in range(3)]
    with Client(dead, health_interval_s=0, retry_budget_ratio=0, retry_budget_floor_per_s=0) as client:
        with pytest.raises(NoServerAvailableError) as error:
            client.generate("hi", max_tokens=2)
        assert list(error.value.errors) == [client.ring.node_for(routing_key("hi", None, None))]
        assert "retry budget" in str(error.value)
        assert len(client.pool.unavailable()) == 1   # the others were never contacted


def test_generate_stream_and_tokenize_fail_at_once_when_every_node_is_ejected_or_draining():
    dead = [closed_address() for _ in range(2)]
    with Client(dead, health_interval_s=0) as client:   # no checker: nothing but the requests changes a node
        with pytest.raises(NoServerAvailableError) as error:
            client.generate("hi", max_tokens=2)          # tries both: each refuses and is ejected
        assert set(error.value.errors) == set(dead)
        assert all(isinstance(e, ServerUnavailableError) for e in error.value.errors.values())
        backoffs = {address: node.backoff_s for address, node in client.pool.nodes.items()}
        calls = {"generate": lambda: client.generate("hi", max_tokens=2),
                 "stream": lambda: list(client.stream("hi", max_tokens=2)),
                 "tokenize": lambda: client.tokenize("hi")}
        for name, call in calls.items():
            with pytest.raises(NoServerAvailableError) as error:
                call()
            assert {address: e.message for address, e in error.value.errors.items()} == {
                address: f"ejected: TTransportException: {client.pool.node(address).ejection_reason.split(': ', 1)[1]}"
                for address in dead}, name
        # nothing was sent: a refused connection would have ejected them again, for a longer back-off
        assert {address: node.backoff_s for address, node in client.pool.nodes.items()} == backoffs
        for node in client.pool.nodes.values():
            node.readmit()
            node.draining = True
        for name, call in calls.items():
            with pytest.raises(NoServerAvailableError) as error:
                call()
            assert {address: e.message for address, e in error.value.errors.items()} == dict.fromkeys(
                dead, "draining"), name
        assert {address: node.backoff_s for address, node in client.pool.nodes.items()} == backoffs


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
    assert list(fields)[:5] == ["server", "model", "draining", "running", "waiting"]
    assert len(fields) == len(thrift.ServerStatus.thrift_spec) > 20
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
