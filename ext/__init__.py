"""ringlm.ext: the Cython hot paths (tokenizer, sampler, ring) and their Python faces."""

import os


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask where the OS has one (a container's
    CPU set or `taskset` shrink it), else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
