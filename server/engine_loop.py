"""The engine in a gevent server: its step loop as a greenlet, its model step on gevent's threadpool.

The engine itself knows no concurrency library; this module supplies what a
gevent worker needs: `gevent_engine` builds an Engine whose callers wait on
gevent Events and whose model step runs in a native thread (torch and the
Cython sampler release the GIL, so the hub keeps serving sockets meanwhile),
and `EngineLoop` steps it while there is work and sleeps when there is none.
"""

from __future__ import annotations

import logging
import time

import gevent
import gevent.event

from ringlm.ext.tokenizer import Tokenizer
from ringlm.server.engine import Engine, EngineConfig
from ringlm.server.model.llama import Llama

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1


def run_in_threadpool(function, *args):
    """Run `function(*args)` on gevent's native threadpool; this greenlet waits, the hub goes on."""
    return gevent.get_hub().threadpool.apply(function, args)


def gevent_engine(model: Llama, tokenizer: Tokenizer, config: EngineConfig | None = None) -> Engine:
    """An Engine for a gevent server: model steps off the hub, callers waiting on gevent Events."""
    return Engine(model, tokenizer, config, offload=run_in_threadpool, new_event=gevent.event.Event)


class EngineLoop:
    """Steps the engine in a greenlet until `stop`; a step that raises fails its requests, not the loop.

    It also notes when the current step began, so a watchdog (`stuck_for`) can tell a model step
    that never returns (a hung kernel, a deadlocked native thread) from a loop that is merely busy.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._greenlet: gevent.Greenlet | None = None
        self._step_started: float | None = None   # time.monotonic() while a step runs

    @property
    def running(self) -> bool:
        return self._greenlet is not None and not self._greenlet.dead

    def stuck_for(self, now: float) -> float:
        """Seconds the current step has run (0 between steps)."""
        return 0.0 if self._step_started is None else now - self._step_started

    def start(self) -> gevent.Greenlet:
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)
        return self._greenlet

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None

    def _run(self) -> None:
        engine = self.engine
        while True:
            self._step_started = time.monotonic()
            try:
                ran = engine.step()
            except Exception:
                log.exception("engine step failed; failing its %d running requests", len(engine.scheduler.running))
                engine.fail_running()
                ran = True
            finally:
                self._step_started = None
            if ran:
                gevent.sleep(0)   # let handlers read outputs between steps
            else:
                # Nothing ran, and nothing yielded since: a submit or cancel sets the event after this.
                engine.work_ready.clear()
                engine.work_ready.wait(timeout=IDLE_WAIT_S)   # the timeout also catches queued deadlines
