"""This server's entry in ZooKeeper: the ephemeral znode clients' discovery reads, kept while the server takes work.

The znode's path and data are the client's discovery format
(`ringlm.client.discovery`), so what a server writes is what clients parse.
"""

from __future__ import annotations

import logging

from ringlm.client.discovery import DEFAULT_PATH, member_data, member_path, zookeeper_client

log = logging.getLogger(__name__)


class Registration:
    """A server's own ephemeral znode: created at start, re-created after a lost session, deleted on close."""

    def __init__(self, hosts: str, address: str, weight: float = 1.0, model: str = "",
                 path: str = DEFAULT_PATH, timeout_s: float = 10.0, gevent: bool | None = None):
        self.path = path.rstrip("/")
        self.node_path = member_path(self.path, address)
        self.data = member_data(address, weight, model)
        self._session_lost = False
        self._closed = False
        self.zk = zookeeper_client(hosts, timeout_s, gevent)
        self.zk.add_listener(self._state_changed)
        self._create()
        log.info("registered %s in ZooKeeper at %s", address, self.node_path)

    def _create(self) -> None:
        from kazoo.exceptions import NodeExistsError

        if self._closed:
            return
        self.zk.ensure_path(self.path)
        try:
            self.zk.create(self.node_path, self.data, ephemeral=True)
        except NodeExistsError:
            # A previous life of this address whose session has not expired yet (a quick restart):
            # replace it, or its expiry would take this server off the ring.
            self.zk.delete(self.node_path)
            self.zk.create(self.node_path, self.data, ephemeral=True)

    def _state_changed(self, state) -> None:
        """kazoo's listener (it must not block): after a lost session, re-register once connected again."""
        from kazoo.protocol.states import KazooState

        if state == KazooState.LOST:
            self._session_lost = True
        elif state == KazooState.CONNECTED and self._session_lost:
            self._session_lost = False
            self.zk.handler.spawn(self._create)

    def close(self, timeout_s: float = 5.0) -> None:
        """Leave the cluster now (clients stop routing here at once) and end the session."""
        if self._closed:
            return
        self._closed = True
        try:
            self.zk.delete_async(self.node_path).get(timeout=timeout_s)
        except Exception as error:   # ZooKeeper away or slow: best effort, the znode goes with the session
            log.info("could not delete %s (%r); it goes when the session ends", self.node_path, error)
        self.zk.stop()
        self.zk.close()
