"""ringlm.ext: the Cython hot paths (tokenizer, sampler, ring) and their Python faces."""

import os


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask where the OS has one (a container's
    CPU set or `taskset` shrink it), else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Up to this many usable cores, native thread pools (torch's, the sampler's) get one thread: their
# OpenMP workers spin or wait at barriers, so when the gevent hub, the tokenizer or another process
# holds a core, two threads on two shared cores run several times slower than one. Past it, all but
# the cores kept free for the hub and the tokenizer.
SMALL_MACHINE_CORES = 4
CORES_KEPT_FREE = 2


def default_threads(cores: int | None = None) -> int:
    """Threads a native pool should use on a machine with `cores` usable cores (default: this one's)."""
    cores = usable_cores() if cores is None else cores
    return 1 if cores <= SMALL_MACHINE_CORES else cores - CORES_KEPT_FREE
