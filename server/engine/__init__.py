"""ringlm.server.engine: continuous batching over one model, with no concurrency library and no Thrift.

`Engine` takes requests (`submit` -> `RequestHandle`) and runs them step by
step: `Scheduler` plans each step, `ModelRunner` computes it, the engine hands
out tokens and text. A server supplies where the model step runs (`offload`)
and the Event class its callers wait on; tests and offline use need neither.
"""

import importlib

from ringlm.server.engine.config import EngineConfig

# The module each other public name lives in, loaded on first use: the command line imports this package
# for EngineConfig alone, and the rest brings the tokenizer, numpy and (Engine) torch.
_HOMES = {"Engine": "engine", **dict.fromkeys(("EngineError", "FinishReason", "GenerationRequest", "GenerationResult",
                                               "InvalidRequest", "Output", "Overloaded", "Priority",
                                               "RequestHandle"), "request")}

__all__ = ["EngineConfig", *_HOMES]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
