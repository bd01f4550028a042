"""Ketama consistent hashing with node weights and bounded loads: which server answers a key.

Compatible with libmemcached's ketama (and `uhashring` in ketama mode): a node
of weight w among nodes of total weight W gets 40 * N * w // W point groups,
each group md5("node-i") giving 4 points on a 32-bit circle; a key goes to the
first point at or after md5(key)'s first 4 bytes (little-endian), wrapping.
Adding or removing a node moves only the keys that land on its points.

Bounded loads (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with
Bounded Loads"): with a load factor c, a node may carry at most
ceil(c * (total load + 1) / N) in-flight requests; a key whose home node is
full walks clockwise to the next distinct node that has room, so one hot
session cannot melt one server while most keys still land at home.

The md5 and the binary search run in C (ext/_ring.pyx); this module keeps
the membership and the policy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ringlm.ext._ring import Continuum, ketama_points, key_hash

POINT_GROUPS_PER_NODE = 40   # libmemcached: 160 points per server of average weight

__all__ = ["Ring", "key_hash"]


class Ring:
    """Nodes ("host:port" -> weight) on a ketama circle."""

    def __init__(self, nodes: Mapping[str, float] | None = None, load_factor: float = 1.25):
        if load_factor < 1:
            raise ValueError(f"load_factor must be >= 1, got {load_factor}")
        self.load_factor = load_factor
        self._weights: dict[str, float] = {}
        self._continuum = Continuum([], [], [])
        for node, weight in (nodes or {}).items():
            self._check(node, weight)
            self._weights[node] = weight
        self._rebuild()

    @staticmethod
    def _check(node: str, weight: float) -> None:
        if not isinstance(node, str) or not node:
            raise ValueError(f"a node name must be a non-empty string, got {node!r}")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"node {node}: weight must be a positive number, got {weight!r}")

    def _rebuild(self) -> None:
        total = sum(self._weights.values())
        owner_of: dict[int, int] = {}
        for index, (node, weight) in enumerate(self._weights.items()):   # a later node wins a collision
            groups = int(POINT_GROUPS_PER_NODE * len(self._weights) * weight // total)
            for point in ketama_points(node, groups):
                owner_of[point] = index
        points = sorted(owner_of)
        self._continuum = Continuum(points, [owner_of[p] for p in points], list(self._weights))

    # -- membership

    @property
    def nodes(self) -> dict[str, float]:
        return dict(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def add(self, node: str, weight: float = 1) -> None:
        self._check(node, weight)
        self._weights[node] = weight
        self._rebuild()

    def remove(self, node: str) -> None:
        if node not in self._weights:
            raise KeyError(f"node {node} is not on the ring")
        del self._weights[node]
        self._rebuild()

    def set_nodes(self, nodes: Mapping[str, float]) -> None:
        """Replace the membership (e.g. from discovery), rebuilding once."""
        for node, weight in nodes.items():
            self._check(node, weight)
        self._weights = dict(nodes)
        self._rebuild()

    # -- lookup

    def node_for(self, key: str) -> str:
        """The key's home node."""
        return self._continuum.node_for(key)

    def nodes_for(self, key: str) -> list[str]:
        """Every node once, in the order the key meets them clockwise: home first, then fallbacks."""
        return self._continuum.nodes_for(key)

    def capacity(self, loads: Mapping[str, int]) -> int:
        """Most in-flight requests a node may hold before keys spill to the next node."""
        total = sum(loads.get(node, 0) for node in self._weights)
        return max(1, math.ceil(self.load_factor * (total + 1) / max(len(self._weights), 1)))

    def node_for_bounded(self, key: str, loads: Mapping[str, int],
                         exclude: frozenset[str] | set[str] = frozenset()) -> str:
        """The first node clockwise from the key that is under capacity and not excluded.

        Falls back to the first non-excluded node when every node is full.
        """
        home = self._continuum.node_for(key)
        limit = self.capacity(loads)
        if home not in exclude and loads.get(home, 0) < limit:
            return home   # the common case, without walking the ring
        fallback = None
        for node in self._continuum.nodes_for(key):
            if node in exclude:
                continue
            if loads.get(node, 0) < limit:
                return node
            fallback = fallback or node
        if fallback is None:
            raise LookupError("every node on the ring is excluded")
        return fallback
