"""Loading models: GGUF and Hugging Face round trips, transformers as the oracle, clear errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import pytest
import torch
from torch.testing import assert_close

from ringlm.ext.model_files import ModelNotFoundError
from ringlm.server.model.kv_cache import KVCache
from ringlm.server.model.llama import Llama, ModelConfig, PackedBatch, RopeScaling, SequenceChunk
from ringlm.server.model.weights import (ModelFormatError, UnsupportedModelError, load_model,
                                         permute_rope_rows, random_weights, read_gguf,
                                         resolve_dtype, save_gguf, save_hf, unpermute_rope_rows)

Q = gguf.GGMLQuantizationType
TOKENS = [3, 17, 99, 42, 7, 64, 5, 120, 1, 88, 23, 61]
LLAMA3 = RopeScaling("llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64)
CONFIGS = {
    "llama": ModelConfig.tiny(),
    "llama-tied": ModelConfig.tiny(tie_word_embeddings=True),
    "qwen2": ModelConfig.tiny(architecture="qwen2", qkv_bias=True, tie_word_embeddings=True),
}


def last_logits(model: Llama, tokens: list[int] = TOKENS) -> torch.Tensor:
    cache = KVCache(model.config, 1, 32, model.dtype)
    return model(PackedBatch.pack([SequenceChunk(0, tokens, 0)], device=model.device), cache)[0]


def expected_model(config: ModelConfig, seed: int = 0) -> Llama:
    return Llama.from_hf_weights(config, random_weights(config, seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_folder_round_trip(name, tmp_path):
    config = CONFIGS[name]
    save_hf(config, random_weights(config), tmp_path)
    model = load_model(tmp_path, device="cpu")
    assert model.config == config and model.dtype == torch.float32
    assert torch.equal(last_logits(model), last_logits(expected_model(config)))


@pytest.mark.parametrize("name", CONFIGS)
def test_saved_hf_folder_matches_transformers(name, tmp_path):
    from transformers import AutoModelForCausalLM
    config = CONFIGS[name]
    save_hf(config, random_weights(config), tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([TOKENS])).logits[0, -1]
    assert_close(last_logits(expected_model(config)), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_gguf_float32_round_trip_is_exact(name, tmp_path):
    config = CONFIGS[name]
    weights = random_weights(config)
    read_config, read_weights = read_gguf(save_gguf(config, weights, tmp_path / "tiny.gguf"))
    assert read_config == config
    for tensor_name, tensor in weights.items():
        assert torch.equal(read_weights[tensor_name], tensor), tensor_name


@pytest.mark.parametrize("name", CONFIGS)
def test_gguf_matches_transformers_gguf_loader(name, tmp_path):
    """transformers un-permutes llama q/k rows itself: an independent check of the layout."""
    from transformers import AutoModelForCausalLM
    config = CONFIGS[name]
    save_gguf(config, random_weights(config), tmp_path / "tiny.gguf", Q.Q8_0)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    with torch.no_grad():
        expected = reference(torch.tensor([TOKENS])).logits[0, -1]
    assert_close(last_logits(load_model(tmp_path / "tiny.gguf", device="cpu")), expected,
                 atol=1e-4, rtol=0)


@pytest.mark.parametrize("tensor_type, tolerance", [
    (Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 1e-2), (Q.Q4_1, 0.1), (Q.Q4_0, 0.15)])
def test_gguf_quantized_weights_dequantize_close(tensor_type, tolerance, tmp_path):
    config = ModelConfig.tiny()
    weights = random_weights(config)
    _, read_weights = read_gguf(save_gguf(config, weights, tmp_path / "q.gguf", tensor_type))
    for name, tensor in weights.items():
        error = (read_weights[name] - tensor).norm() / tensor.norm()
        limit = tolerance if tensor.ndim == 2 else 0  # norms stay float32, as llama.cpp keeps them
        assert error <= limit, f"{name}: relative error {error:.2e} as {tensor_type.name}"


@pytest.mark.parametrize("scaling", [RopeScaling("linear", factor=2.0), LLAMA3], ids=["linear", "llama3"])
def test_gguf_keeps_rope_scaling(scaling, tmp_path):
    config = ModelConfig.tiny(rope_scaling=scaling)
    model = load_model(save_gguf(config, random_weights(config), tmp_path / "rope.gguf"), device="cpu")
    if scaling.kind == "llama3":  # GGUF keeps llama3 scaling as per-frequency divisors
        assert model.config.rope_scaling.kind == "factors"
    tokens = TOKENS * 2  # positions up to 23, where the scaled frequencies have turned further
    assert_close(last_logits(model, tokens), last_logits(expected_model(config), tokens),
                 atol=1e-5, rtol=0)
    unscaled = expected_model(replace(config, rope_scaling=None))
    assert not torch.allclose(last_logits(unscaled, tokens), last_logits(model, tokens), atol=1e-3)


def test_rope_row_permutation_pairs_halves():
    head_dim, heads = 8, 2
    rows = torch.arange(heads * head_dim, dtype=torch.float32)[:, None]  # row i holds i
    permuted = permute_rope_rows(rows, heads)[:head_dim, 0].tolist()
    # llama.cpp interleaves each head's halves: rows j and j + head_dim/2 become neighbours.
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7]
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(rows, heads), heads), rows)


def test_default_model_config(real_model):
    config = real_model.config
    assert (config.architecture, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert real_model.device.type == "cpu" and real_model.dtype == torch.float32


def test_dtype_choice():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="'int8' is not one of"):
        resolve_dtype("int8", torch.device("cpu"))


# Errors -------------------------------------------------------------------------------------

def test_missing_model_names_the_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        load_model(tmp_path / "nope.gguf")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_gguf_names_the_file(damage, tmp_path):
    path = save_gguf(ModelConfig.tiny(), random_weights(ModelConfig.tiny()), tmp_path / "bad.gguf")
    data = path.read_bytes()
    path.write_bytes({"garbage": b"not a gguf file at all" * 10, "truncated": data[:len(data) // 2],
                      "empty": b""}[damage])
    with pytest.raises(ModelFormatError, match=r"bad\.gguf.*(GGUF|tensor)"):
        load_model(path, device="cpu")


def test_gguf_missing_tensor_is_named(tmp_path):
    path = save_gguf(ModelConfig.tiny(), random_weights(ModelConfig.tiny()), tmp_path / "short.gguf")
    # Rename one tensor in place (same length), so the file stays well formed but lacks it.
    path.write_bytes(path.read_bytes().replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_up.weighX"))
    with pytest.raises(ModelFormatError, match=r"short\.gguf: tensor 'blk\.1\.ffn_up\.weight'"):
        load_model(path, device="cpu")


def test_unsupported_gguf_architecture(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match=r"gpt2\.gguf: architecture 'gpt2'"):
        load_model(tmp_path / "gpt2.gguf", device="cpu")


def write_hf_folder(folder: Path) -> Path:
    return save_hf(ModelConfig.tiny(), random_weights(ModelConfig.tiny()), folder)


@pytest.mark.parametrize("edit, error, message", [
    (lambda d: (d / "config.json").unlink(), ModelFormatError, "no config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), ModelFormatError, "config.json: not valid JSON"),
    (lambda d: (d / "model.safetensors").unlink(), ModelFormatError, r"no \*\.safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), ModelFormatError,
     "model.safetensors: not a readable safetensors file"),
    (lambda d: (d / "config.json").write_text('{"model_type": "gpt2"}'), UnsupportedModelError,
     "model_type 'gpt2' is not supported"),
    (lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')),
     ModelFormatError, r"tensors missing: model\.layers\.2\."),
    (lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"vocab_size": 128', '"vocab_size": 100')),
     ModelFormatError, r"'model\.embed_tokens\.weight' has shape \(128, 64\), the config needs \(100, 64\)"),
    (lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"rope_scaling": null', '"rope_scaling": {"rope_type": "yarn"}')),
     UnsupportedModelError, "rope scaling 'yarn'"),
], ids=["no-config", "bad-json", "no-weights", "corrupt-weights", "architecture", "missing-tensor",
        "wrong-shape", "rope-type"])
def test_broken_hf_folder_errors(edit, error, message, tmp_path):
    folder = write_hf_folder(tmp_path / "model")
    edit(folder)
    with pytest.raises(error, match=message):
        load_model(folder, device="cpu")


def test_other_files_are_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"123")
    with pytest.raises(ModelFormatError, match=r"weights\.bin: expected a \.gguf file"):
        load_model(path)
