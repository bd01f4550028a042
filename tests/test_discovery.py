"""ZooKeeper discovery with real workers and a real ZooKeeper: the client's ring follows servers joining and
leaving, a ZooKeeper restart keeps the membership, what ZooKeeper holds is checked before it reaches a
ring, members are writable only with their credentials, and a worker outlives a ZooKeeper that is down."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import pytest

from ringlm.client import Client, ZooKeeperDiscovery
from ringlm.client.discovery import DEFAULT_PATH, member_data, member_path
from ringlm.server.registration import Registration
from tests.conftest import ZooKeeper
from tests.server_helpers import WorkerProcess, free_port, tiny_model_folder, wait_until

FOLLOW_S = 1.0   # the promise: the ring follows membership within a second
CREDENTIALS = "ringlm:s3cret"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory)


def kazoo(hosts: str, credentials: str | None = None):
    """A started plain kazoo session (an operator's, or an intruder's), digest-authenticated if given."""
    from kazoo.client import KazooClient

    client = KazooClient(hosts=hosts, auth_data=[("digest", credentials)] if credentials else None)
    client.start(timeout=30)
    return client


@pytest.fixture
def hosts(zookeeper) -> str:
    """The ZooKeeper hosts string with a fresh chroot, so tests never see each other's servers."""
    admin = kazoo(zookeeper.hosts)
    chroot = f"/test-{uuid.uuid4().hex[:8]}"
    admin.ensure_path(chroot)
    admin.stop()
    admin.close()
    return zookeeper.hosts + chroot


def address(worker: WorkerProcess) -> str:
    return f"127.0.0.1:{worker.port}"


def members(hosts: str) -> dict[str, float]:
    """The membership as a fresh client reads it from ZooKeeper."""
    seen = []
    discovery = ZooKeeperDiscovery(hosts)
    try:
        discovery.watch(seen.append)
    finally:
        discovery.close()
    return seen[-1]


def test_the_ring_follows_servers_joining_and_leaving_and_a_zookeeper_restart_keeps_them(
        zookeeper, hosts, model_dir, tmp_path, caplog):
    with Client(discovery=ZooKeeperDiscovery(hosts), health_interval_s=0.2) as client:
        assert client.servers == {}
        heavy = WorkerProcess(model_dir, tmp_path / "heavy.log", "--zookeeper", hosts, "--weight", "2")
        light = WorkerProcess(model_dir, tmp_path / "light.log", "--zookeeper", hosts)
        try:
            heavy.wait_ready()
            light.wait_ready()
            both = {address(heavy): 2.0, address(light): 1.0}
            wait_until(lambda: client.servers == both, timeout_s=FOLLOW_S, what="both servers on the ring")
            assert client.generate("hello", max_tokens=2).server in both

            zookeeper.stop()
            assert client.servers == both   # ZooKeeper being away changes nothing for the ring
            zookeeper.start()
            wait_until(lambda: members(hosts) == both, timeout_s=20, what="the membership after the restart")

            light.process.send_signal(signal.SIGTERM)   # a draining server leaves at once
            wait_until(lambda: client.servers == {address(heavy): 2.0}, timeout_s=20,
                       what="the drained server to leave the ring")

            done = subprocess.run([sys.executable, "-m", "ringlm.cli", "generate", "--zookeeper", hosts,
                                   "--zookeeper-allowed-networks", "127.0.0.0/8", "--max-tokens", "2", "--json",
                                   "hello"], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["server"] == address(heavy)
            done = subprocess.run([sys.executable, "-m", "ringlm.cli", "generate", "--zookeeper", hosts,
                                   "--zookeeper-allowed-networks", "10.0.0.0/8", "hello"], capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 1 and "no server is available" in done.stderr, done.stderr
        finally:
            heavy.stop()
            light.stop()
        # The last server left: ZooKeeper lists none, and the ring keeps it (only close() empties it).
        wait_until(lambda: "keeping the last 1" in caplog.text, timeout_s=20, what="the empty listing")
        assert client.servers == {address(heavy): 2.0}
    assert client.servers == {}


def test_discovery_ignores_members_it_cannot_trust_and_keeps_its_servers_when_zookeeper_lists_none(
        hosts, caplog):
    admin = kazoo(hosts)
    folder = DEFAULT_PATH

    def join(name: str, data: bytes) -> None:
        admin.create(member_path(folder, name), data, makepath=True)

    good, other = "127.0.0.1:9001", "127.0.0.1:9002"
    join(good, member_data(good, 2.0, "smol"))
    for name, weight in (("127.0.0.1:9003", 1e300), ("127.0.0.1:9004", float("nan")),
                         ("127.0.0.1:9005", float("inf")), ("127.0.0.1:9006", -1.0), ("127.0.0.1:9007", 0)):
        join(name, member_data(name, weight, "smol"))             # json writes NaN and Infinity as such
    join("127.0.0.1:9008", b'{"address": "127.0.0.1:9008", "weight": "heavy", "model": "smol"}')
    join("127.0.0.1:9009", member_data("127.0.0.1:9999", 1.0, "smol"))   # someone else's address
    join("127.0.0.1:0", member_data("127.0.0.1:0", 1.0, "smol"))
    join("10.9.9.9:9010", member_data("10.9.9.9:9010", 1.0, "smol"))     # outside the allowed networks
    join("127.0.0.1:9011", b"\xff not json")
    discovery = ZooKeeperDiscovery(hosts, model="smol", allowed_networks=["127.0.0.0/8"])
    with Client(discovery=discovery, health_interval_s=0) as client:
        assert client.servers == {good: 2.0}
        for ignored in ("9003", "9004", "9005", "9006", "9007", "9008", "9009", "127.0.0.1:0", "10.9.9.9", "9011"):
            assert ignored in caplog.text, ignored   # each named in a warning

        # A mistaken delete of every member, then of the folder itself (a wiped chroot): the ring keeps
        # its servers...
        admin.delete(folder, recursive=True)
        wait_until(lambda: "keeping the last 1" in caplog.text, timeout_s=20, what="the empty listing")
        assert client.servers == {good: 2.0}
        # ...and follows the servers that register again in a new folder.
        join(other, member_data(other, 1.0, "smol"))
        wait_until(lambda: client.servers == {other: 1.0}, timeout_s=20, what="the new folder's member")
    assert client.servers == {}
    admin.stop()
    admin.close()


def test_only_a_members_credentials_can_change_or_delete_it(hosts):
    from kazoo.exceptions import NoAuthError

    server = "127.0.0.1:9100"
    node = member_path(DEFAULT_PATH, server)
    registration = Registration(hosts, server, weight=1.0, model="smol", gevent=False, credentials=CREDENTIALS)
    admin = kazoo(hosts, CREDENTIALS)
    try:
        wait_until(lambda: admin.exists(node), timeout_s=30, what="the registration")
        assert members(hosts) == {server: 1.0}   # everyone may read
        for credentials in (None, "ringlm:wrong"):
            intruder = kazoo(hosts, credentials)
            try:
                with pytest.raises(NoAuthError):
                    intruder.delete(node)
                with pytest.raises(NoAuthError):
                    intruder.set(node, member_data(server, 100.0, "smol"))
                with pytest.raises(NoAuthError):
                    intruder.create(member_path(DEFAULT_PATH, "127.0.0.1:9999"),
                                    member_data("127.0.0.1:9999", 1.0, "smol"))
                with pytest.raises(NoAuthError):
                    intruder.delete(DEFAULT_PATH, recursive=True)
            finally:
                intruder.stop()
                intruder.close()
        assert members(hosts) == {server: 1.0}
        admin.set(node, member_data(server, 3.0, "smol"))   # what the credentials may do
        assert members(hosts) == {server: 3.0}
    finally:
        registration.close()
        admin.stop()
        admin.close()
    assert members(hosts) == {}


def test_a_worker_started_while_zookeeper_is_down_serves_and_registers_once_it_answers(model_dir, tmp_path):
    from kazoo.security import Permissions

    down = ZooKeeper(tmp_path / "zookeeper", free_port())   # not started yet
    auth_file = tmp_path / "zookeeper-auth"
    auth_file.write_text(CREDENTIALS + "\n")
    worker = WorkerProcess(model_dir, tmp_path / "worker.log", "--zookeeper", down.hosts,
                           "--zookeeper-auth-file", str(auth_file))
    try:
        worker.wait_ready()   # it answers health: ZooKeeper being away did not stop it
        assert worker.process.poll() is None
        down.start()
        wait_until(lambda: members(down.hosts) == {address(worker): 1.0}, timeout_s=60,
                   what="the worker's member once ZooKeeper answers")
        admin = kazoo(down.hosts)
        try:
            acl, _ = admin.get_acls(member_path(DEFAULT_PATH, address(worker)))
            assert {(entry.id.scheme, entry.perms) for entry in acl} == {("world", Permissions.READ),
                                                                     ("digest", Permissions.ALL)}
        finally:
            admin.stop()
            admin.close()
        assert worker.stop() == 0
        assert members(down.hosts) == {}   # it left when it drained
    finally:
        worker.stop()
        down.stop()
