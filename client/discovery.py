"""Which servers make up the cluster: a static list, or ZooKeeper membership that servers join and leave.

In ZooKeeper each server holds an ephemeral znode `<path>/<host:port>` whose
data is JSON {"address", "weight", "model"} (`member_path`, `member_data` and
`parse_member` are that format, for servers and clients alike); it vanishes
when the server's session ends (a crash included), and the server deletes it
itself when it starts draining (`ringlm.server.registration`). Clients watch
the children of `<path>` and hand the ring the new membership on every
change. kazoo's gevent handler is used under gevent (a worker, or a
monkey-patched client), its threading handler otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from ringlm.client.address import parse_server_list, split_address

log = logging.getLogger(__name__)

DEFAULT_PATH = "/ringlm/servers"
SESSION_TIMEOUT_S = 10.0   # a crashed server leaves the ring this long after (clients eject it sooner)

OnChange = Callable[[dict[str, float]], None]


class Discovery(Protocol):
    def watch(self, on_change: OnChange) -> None:
        """Call on_change(address -> weight) now and whenever the membership changes."""

    def close(self) -> None:
        """Stop watching."""


class StaticDiscovery:
    """A fixed list of "host:port" (weight 1 each) or a mapping "host:port" -> weight."""

    def __init__(self, servers: Iterable[str] | Mapping[str, float] | str):
        if isinstance(servers, str):
            servers = parse_server_list(servers)
        self.nodes = dict(servers) if isinstance(servers, Mapping) else {address: 1.0 for address in servers}
        if not self.nodes:
            raise ValueError("the server list is empty")
        for address in self.nodes:
            split_address(address)

    def watch(self, on_change: OnChange) -> None:
        on_change(dict(self.nodes))

    def close(self) -> None:
        pass


def under_gevent() -> bool:
    """True when gevent has monkey-patched sockets, so blocking calls must cooperate with its hub."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


def zookeeper_client(hosts: str, timeout_s: float, gevent: bool | None = None):
    """A started KazooClient; ConnectionError naming the hosts if ZooKeeper does not answer in time."""
    from kazoo.client import KazooClient

    if gevent if gevent is not None else under_gevent():
        from kazoo.handlers.gevent import SequentialGeventHandler as Handler
    else:
        from kazoo.handlers.threading import SequentialThreadingHandler as Handler
    client = KazooClient(hosts=hosts, timeout=SESSION_TIMEOUT_S, handler=Handler())
    try:
        client.start(timeout=timeout_s)
    except Exception as error:   # kazoo's handlers each raise their own timeout class
        client.close()
        raise ConnectionError(f"ZooKeeper at {hosts} did not answer within {timeout_s:g} s: {error}") from None
    return client


def member_path(path: str, address: str) -> str:
    """The znode of the server at `address` in the membership folder `path`."""
    return f"{path.rstrip('/')}/{address}"


def member_data(address: str, weight: float, model: str) -> bytes:
    """A server's znode data, as parse_member reads it."""
    return json.dumps({"address": address, "weight": weight, "model": model}).encode()


def parse_member(data: bytes, model: str | None) -> tuple[str, float] | None:
    """(address, weight) of one server's znode data, or None if it serves another model or is malformed."""
    try:
        info = json.loads(data)
        address, weight = info["address"], float(info.get("weight", 1.0))
        split_address(address)
    except (ValueError, KeyError, TypeError) as error:
        log.warning("ignoring a malformed server znode %r: %s", data[:200], error)
        return None
    if model is not None and info.get("model") != model or weight <= 0:
        return None
    return address, weight


class ZooKeeperDiscovery:
    """The servers registered under `path` (only those serving `model`, when given)."""

    def __init__(self, hosts: str, path: str = DEFAULT_PATH, model: str | None = None,
                 timeout_s: float = 10.0, gevent: bool | None = None):
        self.path = path.rstrip("/")
        self.model = model
        self._closed = False
        self.zk = zookeeper_client(hosts, timeout_s, gevent)
        self.zk.ensure_path(self.path)

    def watch(self, on_change: OnChange) -> None:
        from kazoo.recipe.watchers import ChildrenWatch

        def children_changed(children: list[str]) -> bool:
            if self._closed:
                return False   # tells kazoo to drop the watch
            on_change(self.members(children))
            return True

        # kazoo calls it once now, again on every change, and re-reads after a reconnection.
        ChildrenWatch(self.zk, self.path, children_changed)

    def members(self, children: Iterable[str]) -> dict[str, float]:
        from kazoo.exceptions import NoNodeError

        nodes = {}
        for child in children:
            try:
                data, _ = self.zk.get(member_path(self.path, child))
            except NoNodeError:
                continue   # it left between the listing and the read
            member = parse_member(data, self.model)
            if member is not None:
                nodes[member[0]] = member[1]
        return nodes

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.zk.stop()
            self.zk.close()
