"""Shared pytest fixtures: torch threads, the real default model (loaded once), tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ringlm.models import default_model_path
from ringlm.server.model.llama import Llama, ModelConfig
from ringlm.server.model.threads import apply_torch_threads
from ringlm.server.model.weights import load_model, random_weights


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> int:
    """One torch thread: test runs share a couple of cores, where more threads only spin."""
    return apply_torch_threads(1)


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    """The default model's GGUF file (SmolLM2-135M-Instruct, Q4_1) from the installed package."""
    return default_model_path()


@pytest.fixture(scope="session")
def real_model(real_model_path: Path) -> Llama:
    """The default model on the CPU in float32, loaded once per session (it takes seconds)."""
    return load_model(real_model_path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def real_model_transformers(real_model_path: Path):
    """transformers' LlamaForCausalLM from the same GGUF (its own dequantizing loader): the oracle."""
    from transformers import AutoModelForCausalLM  # seconds to import: only when asked for
    return AutoModelForCausalLM.from_pretrained(
        real_model_path.parent, gguf_file=real_model_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture(scope="session")
def tiny_model(tiny_config: ModelConfig) -> Llama:
    """A two-layer random-weight model on the CPU in float32: fast enough for any test."""
    return Llama.from_hf_weights(tiny_config, random_weights(tiny_config, seed=0))
