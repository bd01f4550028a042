"""Runs N worker processes on one host (ports P..P+N-1, one device each) and restarts the ones that die.

Each worker is `python -m ringlm.server.worker` with the same flags, its own
port, metrics port and index (which picks its GPU). A worker that exits while
the supervisor is not stopping is restarted after a back-off that doubles on
each quick death and resets once a worker has stayed up a while; a worker
that exits with a configuration error stops the supervisor instead. SIGTERM
(or SIGINT) is passed on to every worker, which drains; the supervisor waits
for them and exits 0 when all of them did. The workers also get SIGTERM from
the kernel if the supervisor itself dies (kill -9 included).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from ringlm.server.config import WorkerConfig, config_to_argv

log = logging.getLogger(__name__)

POLL_S = 0.2
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0      # a worker up this long restarts at once when it next dies
KILL_AFTER_GRACE_S = 10.0  # past the drain grace period, a worker that has not exited is killed
CONFIG_ERROR_EXIT = 2      # a worker's exit code for a configuration it cannot start with (worker.main)
PR_SET_PDEATHSIG = 1       # linux/prctl.h


@dataclass
class WorkerProcess:
    config: WorkerConfig
    process: subprocess.Popen | None = None
    started: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float = 0.0


class Supervisor:
    def __init__(self, config: WorkerConfig, workers: int):
        if workers < 1:
            raise ValueError(f"a supervisor needs at least one worker, got {workers}")
        self.workers = [WorkerProcess(worker_config(config, index)) for index in range(workers)]
        self.stopping = False
        self.config_error = False

    def run(self) -> int:
        """Start the workers, keep them running until SIGTERM/SIGINT, then drain them; the exit code.
        A worker that cannot start with its configuration (a missing model, a port in use) stops them all
        with that exit code: restarting it would fail the same way for ever."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.stop)
        for worker in self.workers:
            self.start(worker)
        while not self.stopping:
            self.restart_dead(time.monotonic())
            time.sleep(POLL_S)
        code = self.wait_for_drain()
        return CONFIG_ERROR_EXIT if self.config_error else code

    def start(self, worker: WorkerProcess) -> None:
        argv = [sys.executable, "-m", "ringlm.server.worker", *config_to_argv(worker.config)]
        worker.process = subprocess.Popen(argv, preexec_fn=die_with_parent(os.getpid()))
        worker.started = time.monotonic()
        log.info("worker %d started on port %d (pid %d)", worker.config.worker_index, worker.config.port,
                 worker.process.pid)

    def restart_dead(self, now: float) -> None:
        for worker in self.workers:
            if worker.process is None:
                if now >= worker.restart_at:
                    self.start(worker)
                continue
            code = worker.process.poll()
            if code is None:
                continue
            worker.process = None
            if code == CONFIG_ERROR_EXIT:
                log.error("worker %d on port %d cannot start with this configuration (its log says why): "
                          "stopping", worker.config.worker_index, worker.config.port)
                self.config_error = True
                self.stop(signal.SIGTERM)
                return
            if now - worker.started >= STABLE_AFTER_S:
                worker.backoff_s = FIRST_BACKOFF_S
            worker.restart_at = now + worker.backoff_s
            log.warning("worker %d on port %d exited with %s; restarting in %.1f s", worker.config.worker_index,
                        worker.config.port, describe_exit(code), worker.backoff_s)
            worker.backoff_s = min(worker.backoff_s * 2, MAX_BACKOFF_S)

    def stop(self, signum: int, frame=None) -> None:
        """Signal handler: pass SIGTERM on so every worker drains."""
        self.stopping = True
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)

    def wait_for_drain(self) -> int:
        deadline = time.monotonic() + self.workers[0].config.drain_grace_s + KILL_AFTER_GRACE_S
        codes = []
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                codes.append(worker.process.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not drain in time: killed", worker.config.worker_index)
                worker.process.kill()
                codes.append(worker.process.wait())
        log.info("all workers stopped (%s)", ", ".join(describe_exit(code) for code in codes) or "none running")
        return 0 if all(code == 0 for code in codes) else 1


def die_with_parent(parent_pid: int):
    """A preexec function for a worker: have the kernel send it SIGTERM (so it drains and leaves the
    ring) when the supervisor dies, even by kill -9, so no worker serves on unsupervised. Linux only;
    elsewhere the worker outlives a killed supervisor."""
    def arrange() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent_pid:   # the supervisor died before the request took effect
                os.kill(os.getpid(), signal.SIGTERM)
    return arrange


def worker_config(config: WorkerConfig, index: int) -> WorkerConfig:
    """Worker `index`'s config: the next port, the next metrics port, its index for the device."""
    metrics_port = None if config.metrics_port is None else config.metrics_port + index
    return dataclasses.replace(config, port=config.port + index, metrics_port=metrics_port, worker_index=index)


def describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


def serve(config: WorkerConfig, workers: int) -> int:
    """`ringlm serve`: supervise `workers` workers until SIGTERM."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [supervisor] %(message)s")
    return Supervisor(config, workers).run()
