"""`ringlm cluster`: N local servers started, waited for and stopped together, for demos and load tests.

The supervisor runs the workers (ports P..P+N-1, restarted if they die); a
watcher thread polls each one's `health` until all answer, then prints where
they are. Ctrl-C or SIGTERM drains and stops them all.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from ringlm.client.probe import answers_health
from ringlm.server.config import WorkerConfig
from ringlm.server.supervisor import Supervisor

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0   # loading a model on a busy 2-core machine can take a minute per worker
POLL_S = 0.25


def wait_until_healthy(addresses: list[tuple[str, int]], timeout_s: float = READY_TIMEOUT_S,
                       stopping=lambda: False) -> bool:
    """True once every (host, port) answers health; False on timeout or when stopping() turns true."""
    deadline = time.monotonic() + timeout_s
    waiting = list(addresses)
    while waiting and time.monotonic() < deadline and not stopping():
        waiting = [(host, port) for host, port in waiting if not answers_health(f"{host}:{port}")]
        if waiting:
            time.sleep(POLL_S)
    return not waiting


def cluster(config: WorkerConfig, count: int) -> int:
    """Run `count` workers until SIGTERM/SIGINT; print their addresses once all are healthy."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [cluster] %(message)s")
    supervisor = Supervisor(config, count)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    addresses = [(host, worker.config.port) for worker in supervisor.workers]

    def announce() -> None:
        started = time.monotonic()
        if wait_until_healthy(addresses, stopping=lambda: supervisor.stopping):
            listing = ",".join(f"{h}:{p}" for h, p in addresses)
            print(f"cluster ready in {time.monotonic() - started:.1f} s: {listing}", flush=True)
            print(f"try: ringlm generate --servers {listing} --chat \"Hello!\"", flush=True)
        elif not supervisor.stopping:
            log.error("not every server answered within %.0f s", READY_TIMEOUT_S)

    threading.Thread(target=announce, name="cluster-ready", daemon=True).start()
    return supervisor.run()

