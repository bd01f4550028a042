"""Ring lookups per second: ringlm's ketama ring against uhashring in ketama mode, one run.

Both rings hold the same 16 weighted nodes and look up the same 200,000
session keys; each figure is the median of several rounds.
"""

from __future__ import annotations

import statistics
import time

from uhashring import HashRing

from ringlm.client.ring import Ring

ROUNDS = 5
NODES = {f"10.0.{i // 8}.{i % 8}:9090": 1 + i % 3 for i in range(16)}
KEYS = [f"session-{i}" for i in range(200_000)]


def lookups_per_second(lookup) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for key in KEYS:
            lookup(key)
        times.append(time.perf_counter() - start)
    return len(KEYS) / statistics.median(times)


def main() -> str:
    ours = Ring(NODES)
    theirs = HashRing(nodes={n: {"weight": w} for n, w in NODES.items()}, hash_fn="ketama")
    assert all(ours.node_for(k) == theirs.get_node(k) for k in KEYS[:10_000])
    rows = {
        "ringlm Ring.node_for": lookups_per_second(ours.node_for),
        "uhashring get_node (ketama)": lookups_per_second(theirs.get_node),
        "ringlm node_for_bounded (idle loads)": lookups_per_second(lambda k: ours.node_for_bounded(k, {})),
    }
    base = rows["uhashring get_node (ketama)"]
    lines = [f"{len(NODES)} weighted nodes, {len(KEYS):,} keys, median of {ROUNDS} rounds.", "",
             "| lookup | lookups/s | vs uhashring |", "|---|---:|---:|"]
    lines += [f"| {name} | {rate:,.0f} | {rate / base:.1f}x |" for name, rate in rows.items()]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
