"""ringlm.server.engine: continuous batching over one model, with no concurrency library and no Thrift.

`Engine` takes requests (`submit` -> `RequestHandle`) and runs them step by
step: `Scheduler` plans each step, `ModelRunner` computes it, the engine hands
out tokens and text. A server supplies where the model step runs (`offload`)
and the Event class its callers wait on; tests and offline use need neither.
"""

from ringlm.server.engine.config import EngineConfig
from ringlm.server.engine.engine import Engine
from ringlm.server.engine.request import (EngineError, FinishReason, GenerationRequest, GenerationResult,
                                          InvalidRequest, Output, Overloaded, Priority, RequestHandle)

__all__ = ["Engine", "EngineConfig", "EngineError", "FinishReason", "GenerationRequest", "GenerationResult",
           "InvalidRequest", "Output", "Overloaded", "Priority", "RequestHandle"]
