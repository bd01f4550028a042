"""Shared pytest fixtures: torch threads, the real default model (loaded once), tiny random models, ZooKeeper."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from ringlm.ext.model_files import default_model_path
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


class ZooKeeper:
    """A private ZooKeeper started by scripts/zookeeper.sh (data in `folder`, so a restart keeps sessions)."""

    SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "zookeeper.sh"

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.hosts = f"127.0.0.1:{port}"

    def start(self) -> None:
        subprocess.run([str(self.SCRIPT), "start", str(self.folder), str(self.port)], check=True,
                       capture_output=True, timeout=90)

    def stop(self) -> None:
        subprocess.run([str(self.SCRIPT), "stop", str(self.folder)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory) -> ZooKeeper:
    """ZooKeeper on a free port for the whole session (Debian's package: `make zookeeper` installs it)."""
    from tests.server_helpers import free_port

    if not Path("/usr/share/java/zookeeper.jar").exists():
        pytest.skip("ZooKeeper is not installed (/usr/share/java/zookeeper.jar): run `make zookeeper`")
    server = ZooKeeper(tmp_path_factory.mktemp("zookeeper"), free_port())
    server.start()
    yield server
    server.stop()
