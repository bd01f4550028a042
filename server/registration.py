"""This server's entry in ZooKeeper: the ephemeral znode clients' discovery reads, kept while the server takes work.

The znode's path, data and ACL are the client's discovery format
(`ringlm.client.discovery`), so what a server writes is what clients parse.
Registering never holds the server up: kazoo connects in the background,
retrying with a back-off capped at RECONNECT_MAX_DELAY_S for as long as
ZooKeeper is away (a worker that loaded its model serves direct clients
meanwhile), and the znode is created on every connection that begins a
session: the first one, and each after a lost session took the znode with it.
"""

from __future__ import annotations

import logging

from ringlm.client.discovery import (DEFAULT_PATH, check_weight, member_acl, member_data, member_path,
                                     zookeeper_client)

log = logging.getLogger(__name__)


class Registration:
    """A server's own ephemeral znode: created once ZooKeeper answers, re-created after a lost session,
    deleted on close. With digest `credentials` ("user:password"), only they may change or delete it
    (and the folder, when this creates it); everyone may read them."""

    def __init__(self, hosts: str, address: str, weight: float = 1.0, model: str = "",
                 path: str = DEFAULT_PATH, gevent: bool | None = None, credentials: str | None = None):
        self.path = path.rstrip("/")
        self.node_path = member_path(self.path, address)
        self.data = member_data(address, check_weight(weight), model)
        self.acl = member_acl(credentials)
        self.registered = False   # our znode exists in the current session (or is being created)
        self._closed = False
        self.zk = zookeeper_client(hosts, gevent, credentials)
        self.zk.add_listener(self._state_changed)
        self.zk.start_async()

    def _state_changed(self, state) -> None:
        """kazoo's listener (it must not block): create the znode once a session begins."""
        from kazoo.protocol.states import KazooState

        if state == KazooState.LOST:
            self.registered = False   # ephemeral znodes end with their session
        elif state == KazooState.CONNECTED and not self.registered and not self._closed:
            self.registered = True
            self.zk.handler.spawn(self._create)

    def _create(self) -> None:
        from kazoo.exceptions import KazooException, NodeExistsError, NoAuthError

        try:
            self.zk.ensure_path(self.path, acl=self.acl)
            try:
                self.zk.create(self.node_path, self.data, acl=self.acl, ephemeral=True)
            except NodeExistsError:
                # A previous life of this address whose session has not expired yet (a quick restart):
                # replace it, or its expiry would take this server off the ring.
                self.zk.delete(self.node_path)
                self.zk.create(self.node_path, self.data, acl=self.acl, ephemeral=True)
        except NoAuthError:
            log.error("ZooKeeper refused to register %s: the folder's ACL does not let these credentials "
                      "create or replace it (--zookeeper-auth-file)", self.node_path)
            return
        except KazooException as error:   # the connection went again: its return brings us back here
            self.registered = False
            log.warning("could not register %s yet: %r", self.node_path, error)
            return
        log.info("registered in ZooKeeper at %s", self.node_path)

    def close(self, timeout_s: float = 5.0) -> None:
        """Leave the cluster now (clients stop routing here at once) and end the session."""
        if self._closed:
            return
        self._closed = True
        if self.registered and self.zk.connected:
            try:
                self.zk.delete_async(self.node_path).get(timeout=timeout_s)
            except Exception as error:   # ZooKeeper away or slow: best effort, the znode goes with the session
                log.info("could not delete %s (%r); it goes when the session ends", self.node_path, error)
        self.zk.stop()
        self.zk.close()
