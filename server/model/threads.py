"""How many intra-op threads torch may use, chosen deliberately by whoever creates the model.

torch's default (one thread per core) is wrong for a server on a small machine:
its OpenMP workers spin while they wait, so when the gevent hub, the tokenizer,
the sampler or another process holds a core, a 2-thread matmul on 2 cores runs
about 4x slower than a 1-thread one, while 1 thread holds steady. A worker
process therefore calls `apply_torch_threads` once, before it loads the model,
with its `--torch-threads` setting or None for `default_torch_threads()`.
"""

from __future__ import annotations

import logging

import torch

from ringlm.ext import default_threads, usable_cores

log = logging.getLogger(__name__)


def default_torch_threads(cores: int | None = None) -> int:
    """1 on small machines, else every usable core but two (ringlm.ext.default_threads)."""
    return default_threads(cores)


def apply_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count (None: the default for this machine); returns it."""
    threads = default_torch_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"torch needs at least one intra-op thread, got {threads}")
    torch.set_num_threads(threads)
    log.info("torch intra-op threads: %d (usable cores: %d)", threads, usable_cores())
    return threads
