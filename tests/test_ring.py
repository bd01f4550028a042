"""The ketama ring: parity with uhashring, balance, minimal movement, bounded loads."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import pytest
from uhashring import HashRing

from ringlm.client.ring import Ring
from ringlm.ext import _ring

KEYS = [f"session-{i}" for i in range(100_000)]


def test_md5_matches_hashlib():
    rng = random.Random(5)
    for length in [*range(0, 130), 1000, 4096]:
        data = bytes(rng.randrange(256) for _ in range(length))
        assert _ring.md5_digest(data) == hashlib.md5(data).digest()
    assert _ring.key_hash("é🙂") == int.from_bytes(hashlib.md5("é🙂".encode()).digest()[:4], "little")


@pytest.mark.parametrize("nodes", [
    {f"10.0.0.{i}:9090": 1 for i in range(1, 6)},
    {"a:1": 1, "b:2": 3, "c:3": 5, "d:4": 2},
    {f"node{i}.example:{7000 + i}": random.Random(i).randint(1, 10) for i in range(13)},
    {"solo:1": 1},
])
def test_same_node_as_uhashring_ketama(nodes):
    reference = HashRing(nodes={name: {"weight": w} for name, w in nodes.items()}, hash_fn="ketama")
    ring = Ring(nodes)
    assert [ring.node_for(k) for k in KEYS] == [reference.get_node(k) for k in KEYS]


def test_ten_equal_nodes_are_balanced():
    ring = Ring({f"n{i}:1": 1 for i in range(10)})
    counts = Counter(ring.node_for(k) for k in KEYS)
    assert max(counts.values()) / (len(KEYS) / 10) <= 1.15


def test_adding_a_node_moves_about_its_share_and_only_to_it():
    ring = Ring({f"n{i}:1": 1 for i in range(10)})
    before = [ring.node_for(k) for k in KEYS]
    ring.add("n10:1")
    after = [ring.node_for(k) for k in KEYS]
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert all(a == "n10:1" for _, a in moved)
    assert abs(len(moved) / len(KEYS) - 1 / 11) < 0.02
    ring.remove("n10:1")
    assert [ring.node_for(k) for k in KEYS] == before


def test_weights_scale_the_share():
    ring = Ring({"small:1": 1, "big:2": 3})
    counts = Counter(ring.node_for(k) for k in KEYS)
    assert 2.5 < counts["big:2"] / counts["small:1"] < 3.5


def test_nodes_for_walks_each_node_once_from_home():
    ring = Ring({f"n{i}:1": 1 for i in range(5)})
    order = list(ring.nodes_for("some-key"))
    assert order[0] == ring.node_for("some-key") and sorted(order) == sorted(ring.nodes)


def test_bounded_loads_cap_a_zipf_hot_spot():
    ring = Ring({f"n{i}:1": 1 for i in range(8)}, load_factor=1.25)
    rng = random.Random(11)
    sessions = [f"user-{i}" for i in range(1000)]
    weights = [1 / (rank + 1) ** 1.2 for rank in range(len(sessions))]   # Zipf: a few very hot keys
    loads: Counter = Counter()
    in_flight = []
    worst_ratio = 0.0
    for _ in range(20_000):
        if len(in_flight) >= 200:   # requests finish in arrival order; 200 stay in flight
            loads[in_flight.pop(0)] -= 1
        node = ring.node_for_bounded(rng.choices(sessions, weights)[0], loads)
        loads[node] += 1
        in_flight.append(node)
        if len(in_flight) == 200:   # steady state
            mean = sum(loads.values()) / len(ring)
            worst_ratio = max(worst_ratio, max(loads.values()) / math.ceil(1.25 * mean))
    assert worst_ratio <= 1.0   # no node ever above ceil(c * mean)
    unbounded = Counter(ring.node_for(rng.choices(sessions, weights)[0]) for _ in range(200))
    assert max(unbounded.values()) / (200 / 8) > 1.5   # without the bound the hot spot is real


def test_bounded_lookup_skips_excluded_nodes_and_falls_back_when_all_full():
    ring = Ring({"a:1": 1, "b:1": 1})
    home = ring.node_for("k")
    other = next(n for n in ring.nodes if n != home)
    assert ring.node_for_bounded("k", {}, exclude={home}) == other
    assert ring.node_for_bounded("k", {home: 100, other: 100}) == home
    with pytest.raises(LookupError):
        ring.node_for_bounded("k", {}, exclude={home, other})


def test_bad_membership_is_refused():
    with pytest.raises(LookupError, match="no nodes"):
        Ring().node_for("k")
    for bad in ({"a:1": 0}, {"a:1": -1}, {"a:1": float("nan")}, {"": 1}):
        with pytest.raises(ValueError):
            Ring(bad)
    with pytest.raises(ValueError, match="load_factor"):
        Ring({"a:1": 1}, load_factor=0.5)
    with pytest.raises(KeyError):
        Ring({"a:1": 1}).remove("b:1")
