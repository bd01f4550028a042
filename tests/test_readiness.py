"""Readiness and the watchdog: a model step that never returns makes the worker not ready, and it recovers."""

from __future__ import annotations

import threading

import gevent
import pytest

from ringlm.ext.tokenizer import Tokenizer
from ringlm.ext.model_files import default_model_path
from ringlm.server.config import ServiceLimits
from ringlm.server.engine import EngineConfig, GenerationRequest
from ringlm.server.engine_loop import EngineLoop, gevent_engine
from ringlm.server.handler import ConnectionHandler, Service


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


def wait_for(condition, timeout_s: float = 60.0) -> None:
    with gevent.Timeout(timeout_s, AssertionError("timed out waiting for a condition")):
        while not condition():
            gevent.sleep(0.01)


def test_a_stuck_step_makes_the_worker_not_ready_until_it_returns(tiny_model, tokenizer):
    engine = gevent_engine(tiny_model, tokenizer, EngineConfig(num_slots=2, max_seq_len=64))
    service = Service(EngineLoop(engine), tokenizer, "test:0", "tiny", ServiceLimits(step_timeout_s=0.2))
    handler = ConnectionHandler(service)
    assert service.not_ready_because() == "the engine loop is not running" and not handler.health()
    hung, real_run = threading.Event(), engine.runner.run

    def hanging_run(plan):   # a kernel that does not return until released (in the native thread)
        hung.wait(timeout=120)
        return real_run(plan)

    engine.runner.run = hanging_run
    service.engine_loop.start()
    try:
        assert handler.ready() and handler.health()
        handle = engine.submit(GenerationRequest("r", [1, 2, 3], max_tokens=3))   # the tiny vocabulary
        wait_for(lambda: service.not_ready_because() is not None)
        assert "a model step has run for" in service.not_ready_because()
        assert not handler.ready() and handler.health()          # alive, but send it nothing new
        assert service.status().ready is False and "watchdog" in service.status().not_ready_reason
        hung.set()
        wait_for(lambda: handle.finished)
        assert handle.result().completion_tokens == 3
        assert handler.ready() and service.status().ready is True
    finally:
        hung.set()
        service.engine_loop.stop()
