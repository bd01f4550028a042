"""ringlm.server.model: the Llama-family decoder, its KV cache, its weights loader and the torch thread setting."""

from ringlm.server.model.kv_cache import KVCache
from ringlm.server.model.llama import Llama, ModelConfig, PackedBatch, RopeScaling, SequenceChunk
from ringlm.server.model.threads import apply_torch_threads, default_torch_threads
from ringlm.server.model.weights import (ModelFormatError, UnsupportedModelError, load_model,
                                         random_weights)

__all__ = ["KVCache", "Llama", "ModelConfig", "PackedBatch", "RopeScaling", "SequenceChunk",
           "apply_torch_threads", "default_torch_threads", "ModelFormatError",
           "UnsupportedModelError", "load_model", "random_weights"]
