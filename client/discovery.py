"""Which servers make up the cluster: a static list, or ZooKeeper membership that servers join and leave.

In ZooKeeper each server holds an ephemeral znode `<path>/<host:port>` whose
data is JSON {"address", "weight", "model"} (`member_path`, `member_data` and
`parse_member` are that format, for servers and clients alike); it vanishes
when the server's session ends (a crash included), and the server deletes it
itself when it starts draining (`ringlm.server.registration`). Clients watch
the children of `<path>` and hand the ring the new membership on every
change. kazoo's gevent handler is used under gevent (a worker, or a
monkey-patched client), its threading handler otherwise.

Whatever ZooKeeper holds is checked before it reaches a ring, because anyone
who can write there could otherwise steer every client: a member whose
address is not a host:port matching its znode's name, or whose weight is not
a finite number in (0, MAX_WEIGHT], is ignored with a warning; with
`allowed_networks`, so is one whose address resolves outside them. With
credentials (ZooKeeper's digest scheme, "user:password"), the znodes and the
folder a server creates are readable by everyone and writable only with those
credentials. A change that would leave no member at all (a mistaken delete,
a wiped chroot) is ignored with a warning: the ring keeps its last servers,
which clients eject one by one if they really are gone.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from ringlm.client.address import parse_server_list, split_address

log = logging.getLogger(__name__)

DEFAULT_PATH = "/ringlm/servers"
SESSION_TIMEOUT_S = 10.0   # a crashed server leaves the ring this long after (clients eject it sooner)
RECONNECT_MAX_DELAY_S = 10.0   # kazoo's own cap is an hour: a ZooKeeper back after an outage would wait that long
# Weights are relative shares of the ring's keys. 100 leaves room for any mix of hardware (a large GPU
# server beside a small CPU one) while no number a member writes (1e300, inf) can take every key.
MAX_WEIGHT = 100.0

OnChange = Callable[[dict[str, float]], None]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Discovery(Protocol):
    def watch(self, on_change: OnChange) -> None:
        """Call on_change(address -> weight) now and whenever the membership changes."""

    def close(self) -> None:
        """Stop watching."""


def check_weight(weight: object) -> float:
    """`weight` as a float; ValueError unless it is a finite number in (0, MAX_WEIGHT]."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"a weight must be a number, got {weight!r}")
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise ValueError(f"a weight must be a finite number in (0, {MAX_WEIGHT:g}], got {weight!r}")
    return float(weight)


class StaticDiscovery:
    """A fixed list of "host:port" (weight 1 each) or a mapping "host:port" -> weight."""

    def __init__(self, servers: Iterable[str] | Mapping[str, float] | str):
        if isinstance(servers, str):
            servers = parse_server_list(servers)
        self.nodes = dict(servers) if isinstance(servers, Mapping) else {address: 1.0 for address in servers}
        if not self.nodes:
            raise ValueError("the server list is empty")
        for address, weight in self.nodes.items():
            split_address(address)
            self.nodes[address] = check_weight(weight)

    def watch(self, on_change: OnChange) -> None:
        on_change(dict(self.nodes))

    def close(self) -> None:
        pass


# -- the znode format

def member_path(path: str, address: str) -> str:
    """The znode of the server at `address` in the membership folder `path`."""
    return f"{path.rstrip('/')}/{address}"


def member_data(address: str, weight: float, model: str) -> bytes:
    """A server's znode data, as parse_member reads it."""
    return json.dumps({"address": address, "weight": weight, "model": model}).encode()


def parse_member(name: str, data: bytes, model: str | None) -> tuple[str, float] | None:
    """(address, weight) of the znode `name` holding `data`, or None if it serves another model or
    is not a well-formed member (logged: someone wrote it by mistake, or on purpose)."""
    try:
        info = json.loads(data)
        address = info["address"]
        split_address(address)
        if address != name:
            raise ValueError(f"its address {address!r} is not its znode's name")
        weight = check_weight(info.get("weight", 1.0))
    except (ValueError, KeyError, TypeError) as error:
        log.warning("ignoring the server znode %r (%r): %s", name[:200], data[:200], error)
        return None
    if model is not None and info.get("model") != model:
        return None
    return address, weight


# -- who may be a member

def parse_networks(networks: Iterable[str | Network]) -> list[Network]:
    """The CIDRs ("10.0.0.0/8", "fd00::/8") as networks; ValueError naming a malformed one."""
    parsed = []
    for network in networks:
        try:
            parsed.append(ipaddress.ip_network(network.strip() if isinstance(network, str) else network))
        except ValueError as error:
            raise ValueError(f"not a network in CIDR form (like 10.0.0.0/8): {error}") from None
    if not parsed:
        raise ValueError("the allowed networks list no network")
    return parsed


def in_networks(address: str, networks: list[Network]) -> bool:
    """True when every address `address`'s host resolves to lies in one of `networks` (a name that
    resolves anywhere else, or not at all, is not trusted). Names resolve now, not when connecting:
    list members by IP address for a filter DNS cannot change."""
    host, port = split_address(address)
    try:
        resolved = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            resolved = {ipaddress.ip_address(info[4][0].split("%")[0])
                        for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except OSError as error:
            log.warning("ignoring the server %s: its name does not resolve (%s)", address, error)
            return False
    return all(any(ip in network for network in networks) for ip in resolved)


# -- ZooKeeper sessions

def parse_credentials(credentials: str) -> tuple[str, str]:
    """(user, password) of ZooKeeper digest credentials "user:password"."""
    user, sep, password = credentials.partition(":")
    if not (user and sep and password):
        raise ValueError("ZooKeeper credentials are user:password")
    return user, password


def member_acl(credentials: str | None) -> list | None:
    """The ACL of the znodes (and folder) a server creates: everyone reads, only `credentials` write,
    create and delete; None (ZooKeeper's open ACL) without credentials."""
    if credentials is None:
        return None
    from kazoo.security import READ_ACL_UNSAFE, make_digest_acl

    return [*READ_ACL_UNSAFE, make_digest_acl(*parse_credentials(credentials), all=True)]


def under_gevent() -> bool:
    """True when gevent has monkey-patched sockets, so blocking calls must cooperate with its hub."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


def zookeeper_client(hosts: str, gevent: bool | None = None, credentials: str | None = None):
    """A KazooClient, not started, that reconnects forever with a back-off capped at RECONNECT_MAX_DELAY_S
    and authenticates with digest `credentials` ("user:password") when given."""
    from kazoo.client import KazooClient
    from kazoo.retry import KazooRetry

    if gevent if gevent is not None else under_gevent():
        from kazoo.handlers.gevent import SequentialGeventHandler as Handler
    else:
        from kazoo.handlers.threading import SequentialThreadingHandler as Handler
    handler = Handler()
    retry = KazooRetry(max_tries=-1, delay=0.2, backoff=2, max_delay=RECONNECT_MAX_DELAY_S,
                       sleep_func=handler.sleep_func)
    auth = None
    if credentials is not None:
        parse_credentials(credentials)
        auth = [("digest", credentials)]
    return KazooClient(hosts=hosts, timeout=SESSION_TIMEOUT_S, handler=handler, connection_retry=retry,
                       auth_data=auth)


class ZooKeeperDiscovery:
    """The servers registered under `path` (only those serving `model`, when given; only those whose
    address lies in `allowed_networks`, when given). ConnectionError if ZooKeeper does not answer
    within timeout_s."""

    def __init__(self, hosts: str, path: str = DEFAULT_PATH, model: str | None = None,
                 timeout_s: float = 10.0, gevent: bool | None = None, credentials: str | None = None,
                 allowed_networks: Iterable[str | Network] | None = None):
        self.path = path.rstrip("/")
        self.model = model
        self.networks = None if allowed_networks is None else parse_networks(allowed_networks)
        self.last: dict[str, float] = {}   # the membership last handed on (never an empty one after a full one)
        self._folder: int | None = None    # the creation zxid of the folder whose children are watched
        self._closed = False
        self.zk = zookeeper_client(hosts, gevent, credentials)
        try:
            self.zk.start(timeout=timeout_s)
        except Exception as error:   # kazoo's handlers each raise their own timeout class
            self.zk.close()
            raise ConnectionError(f"ZooKeeper at {hosts} did not answer within {timeout_s:g} s: {error}") from None

    def watch(self, on_change: OnChange) -> None:
        from kazoo.recipe.watchers import ChildrenWatch, DataWatch

        def watch_children(folder: int) -> None:
            def children_changed(children: list[str]) -> bool:
                if self._closed or folder != self._folder:
                    return False   # tells kazoo to drop the watch
                members = self.members(children)
                if not members and self.last:
                    log.warning("ZooKeeper lists no usable server under %s; keeping the last %d servers (%s)",
                                self.path, len(self.last), ", ".join(sorted(self.last)))
                    return True
                self.last = members
                on_change(members)
                return True

            # kazoo calls it once now, again on every change, and re-reads after a reconnection.
            ChildrenWatch(self.zk, self.path, children_changed)

        def folder_changed(data, stat) -> bool:
            # A ChildrenWatch ends for good when its folder is deleted (a wiped chroot): watch the
            # children of each folder that appears at the path, told apart by their creation zxid.
            if self._closed:
                return False
            if stat is None:
                if self._folder is None:
                    on_change({})   # no server has created the folder yet (clients leave that to them: its ACL)
                elif self.last:
                    log.warning("ZooKeeper has no folder %s any more; keeping the last %d servers (%s)",
                                self.path, len(self.last), ", ".join(sorted(self.last)))
            elif stat.czxid != self._folder:
                self._folder = stat.czxid
                watch_children(stat.czxid)
            return True

        DataWatch(self.zk, self.path, folder_changed)

    def members(self, children: Iterable[str]) -> dict[str, float]:
        from kazoo.exceptions import NoNodeError

        nodes = {}
        for child in children:
            try:
                data, _ = self.zk.get(member_path(self.path, child))
            except NoNodeError:
                continue   # it left between the listing and the read
            member = parse_member(child, data, self.model)
            if member is None:
                continue
            if self.networks is not None and not in_networks(member[0], self.networks):
                log.warning("ignoring the server %s: not in the allowed networks", member[0])
                continue
            nodes[member[0]] = member[1]
        return nodes

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.zk.stop()
            self.zk.close()
