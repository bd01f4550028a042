"""ZooKeeper discovery with real workers: the client's ring follows servers joining and leaving, and a
ZooKeeper restart keeps the membership."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import pytest

from ringlm.client import Client, ZooKeeperDiscovery
from tests.server_helpers import WorkerProcess, tiny_model_folder, wait_until

FOLLOW_S = 1.0   # the promise: the ring follows membership within a second


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory)


@pytest.fixture
def hosts(zookeeper) -> str:
    """The ZooKeeper hosts string with a fresh chroot, so tests never see each other's servers."""
    from kazoo.client import KazooClient

    chroot = f"/test-{uuid.uuid4().hex[:8]}"
    admin = KazooClient(hosts=zookeeper.hosts)
    admin.start(timeout=30)
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
        zookeeper, hosts, model_dir, tmp_path):
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
                                   "--max-tokens", "2", "--json", "hello"], capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["server"] == address(heavy)
        finally:
            heavy.stop()
            light.stop()
        wait_until(lambda: client.servers == {}, timeout_s=FOLLOW_S, what="the ring to empty")

