"""Model files to `Llama`: GGUF files and Hugging Face folders in, and (for tests) out.

Both readers produce a `ModelConfig` and the weights under their Hugging Face
names and layout, cast to the serving dtype as they are read; then
`Llama.from_hf_weights` fuses them. GGUF needs two translations: its tensor
names (`blk.N.attn_q.weight` ...) and, for the llama architecture, the row
order of the q/k projections, which llama.cpp's converter permutes so its
rotary kernel can rotate adjacent pairs; it is permuted back here (qwen2 files
are not permuted: llama.cpp rotates them in the Hugging Face "neox" layout).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor

from ringlm.ext.model_files import resolve_model_path
from ringlm.server.model.llama import (ARCHITECTURES, Llama, ModelConfig, RopeScaling,
                                      hf_weight_shapes, rope_inv_freq)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Hugging Face module -> GGUF tensor stem, globally and within a layer.
GGUF_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                     "lm_head": "output"}
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


class ModelFormatError(ValueError):
    """A model file that cannot be read, or whose contents do not make a model."""


class UnsupportedModelError(ValueError):
    """A readable model that this decoder does not implement (architecture or feature)."""


def load_model(name_or_path: str | Path, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None) -> Llama:
    """Load "default", a .gguf file or a Hugging Face folder onto `device` in `dtype`.

    Defaults: CUDA when available, else the CPU; bfloat16 on a GPU, float32 on
    the CPU (measured fastest there: CPUs without bfloat16 matmul units convert).
    """
    path = resolve_model_path(name_or_path)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    config, weights = read_checkpoint(path, dtype)
    model = Llama.from_hf_weights(config, weights, device, dtype)
    log.info("loaded %s (%s, %d layers) on %s as %s", path, config.architecture,
             config.num_layers, device, dtype)
    return model


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A dtype, its name, or None for the device's default."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def read_checkpoint(path: Path, dtype: torch.dtype = torch.float32
                    ) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and Hugging Face-named weights in `dtype` of a .gguf file or a Hugging Face folder.

    Each tensor is cast as it is read, so a large model never sits in memory as float32.
    """
    path = Path(path)
    if path.is_dir():
        return read_hf(path, dtype)
    if path.suffix != ".gguf":
        raise ModelFormatError(f"{path}: expected a .gguf file or a Hugging Face model folder")
    return read_gguf(path, dtype)


# GGUF ----------------------------------------------------------------------------------------

def read_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and dequantized weights (Hugging Face names and layout, `dtype`) of a GGUF file."""
    reader = _open_gguf(path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = config_from_gguf(reader, path)
    weights = {}
    for name in hf_weight_shapes(config):
        tensor = tensors.get(gguf_name(name))
        if tensor is None:
            raise ModelFormatError(f"{path}: tensor '{gguf_name(name)}' ({name}) is missing")
        weights[name] = torch.from_numpy(_dequantize(tensor, path)).to(dtype)
    if config.architecture == "llama":
        for i in range(config.num_layers):
            attn = f"model.layers.{i}.self_attn."
            weights[attn + "q_proj.weight"] = unpermute_rope_rows(
                weights[attn + "q_proj.weight"], config.num_heads)
            weights[attn + "k_proj.weight"] = unpermute_rope_rows(
                weights[attn + "k_proj.weight"], config.num_kv_heads)
    _check_shapes(path, weights, hf_weight_shapes(config))
    return config, weights


def _open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise ModelFormatError(f"{path}: not a readable GGUF file ({error})") from error


def _dequantize(tensor: gguf.ReaderTensor, path: Path) -> np.ndarray:
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise UnsupportedModelError(f"{path}: tensor '{tensor.name}' is stored as "
                                    f"{tensor.tensor_type.name}, which cannot be dequantized") from error
    # GGUF lists dimensions fastest-first; numpy wants them slowest-first.
    array = array.reshape([int(n) for n in reversed(tensor.shape)])
    return array if array.flags.writeable else array.copy()  # F32 arrays view the mapped file


def gguf_name(hf_name: str) -> str:
    """GGUF tensor name of a Hugging Face one: model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight."""
    stem, kind = hf_name.rsplit(".", 1)
    if stem in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[stem]}.{kind}"
    _, _, layer, module = stem.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[module]}.{kind}"


def unpermute_rope_rows(weight: Tensor, num_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows (j, pair) back to (pair, j).

    llama.cpp rotates adjacent pairs (2j, 2j+1); Hugging Face rotates (j, j + D/2).
    """
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def permute_rope_rows(weight: Tensor, num_heads: int) -> Tensor:
    """llama.cpp's q/k row permutation, the inverse of `unpermute_rope_rows`."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def config_from_gguf(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    """The decoder config stored in a GGUF file's metadata."""
    field = partial(_gguf_field, reader, path)
    arch = field("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: architecture '{arch}' is not supported "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelFormatError(f"{path}: tensor 'token_embd.weight' is missing")
    hidden, heads = field(f"{arch}.embedding_length"), field(f"{arch}.attention.head_count")
    head_dim = field(f"{arch}.attention.key_length", hidden // heads)
    if field(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(f"{path}: rotary embeddings on part of each head are not supported")
    return ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=field(f"{arch}.feed_forward_length"),
        num_layers=field(f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=field(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=field(f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=field(f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=_gguf_rope_scaling(reader, arch, tensors, path),
        max_position_embeddings=field(f"{arch}.context_length"),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        architecture=arch,
    )


def _gguf_field(reader: gguf.GGUFReader, path: Path, key: str, default=None):
    """A metadata value; `default` when absent, or an error naming the key when that is None."""
    value = reader.fields.get(key)
    if value is None:
        if default is None:
            raise ModelFormatError(f"{path}: metadata key '{key}' is missing")
        return default
    value = value.contents()
    # GGUF stores floats as float32; their shortest repr gives back the converter's 1e-05.
    return float(str(np.float32(value))) if isinstance(value, float) else value


def _gguf_rope_scaling(reader: gguf.GGUFReader, arch: str, tensors: Mapping,
                       path: Path) -> RopeScaling | None:
    if "rope_freqs.weight" in tensors:  # llama3 scaling, stored as per-frequency divisors
        factors = _dequantize(tensors["rope_freqs.weight"], path)
        return RopeScaling("factors", freq_factors=tuple(float(f) for f in factors))
    kind = _gguf_field(reader, path, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=_gguf_field(reader, path, f"{arch}.rope.scaling.factor"))
    raise UnsupportedModelError(f"{path}: rope scaling '{kind}' is not supported (linear, llama3 are)")


def save_gguf(config: ModelConfig, weights: Mapping[str, Tensor], path: Path,
              tensor_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> Path:
    """Write a GGUF file as llama.cpp's converter would: matrices in `tensor_type`, norms F32."""
    path = Path(path)
    arch = config.architecture
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _write_gguf_rope_scaling(writer, config)
    for name in hf_weight_shapes(config):
        array = weights[name].float()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            array = permute_rope_rows(array, heads)
        _add_gguf_tensor(writer, gguf_name(name), array.numpy(), tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_gguf_rope_scaling(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    scaling = config.rope_scaling
    if scaling is None:
        return
    if scaling.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)
        return
    # llama3 (or explicit factors) scaling goes in as llama.cpp writes it: frequency divisors.
    factors = rope_inv_freq(replace(config, rope_scaling=None)) / rope_inv_freq(config)
    writer.add_tensor("rope_freqs.weight", factors.numpy())


def _add_gguf_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray,
                     tensor_type: gguf.GGMLQuantizationType) -> None:
    if array.ndim == 1 or tensor_type == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array.astype(np.float32))
    elif tensor_type == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type)


# Hugging Face --------------------------------------------------------------------------------

def read_hf(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and weights in `dtype` of a Hugging Face folder (config.json and *.safetensors)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelFormatError(f"{folder}: no config.json, so not a Hugging Face model folder")
    try:
        config = config_from_hf(json.loads(config_file.read_text()), config_file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFormatError(f"{config_file}: not valid JSON ({error})") from error
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder}: no *.safetensors files (other weight formats "
                               f"such as pytorch_model.bin are not supported)")
    shapes = hf_weight_shapes(config)
    weights = {}
    for file in files:
        weights |= _read_safetensors(file, shapes, dtype)
    _check_shapes(folder, weights, shapes)
    return config, weights


def _read_safetensors(file: Path, wanted: Mapping[str, tuple[int, ...]],
                      dtype: torch.dtype) -> dict[str, Tensor]:
    try:
        with safetensors.safe_open(file, framework="pt") as tensors:
            return {name: tensors.get_tensor(name).to(dtype)
                    for name in tensors.keys() if name in wanted}
    except (safetensors.SafetensorError, OSError) as error:
        raise ModelFormatError(f"{file}: not a readable safetensors file ({error})") from error


def config_from_hf(hf: Mapping, source: Path | str = "config.json") -> ModelConfig:
    """The decoder config of a Hugging Face config.json."""
    arch = hf.get("model_type")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{source}: model_type '{arch}' is not supported "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
    unsupported = [key for key, value in [
        ("attention_bias", arch == "llama" and hf.get("attention_bias")),
        ("mlp_bias", hf.get("mlp_bias")),
        ("use_sliding_window", hf.get("use_sliding_window")),
        (f"hidden_act={hf.get('hidden_act')}", hf.get("hidden_act", "silu") != "silu")] if value]
    if unsupported:
        raise UnsupportedModelError(f"{source}: {', '.join(unsupported)} not supported")
    try:
        heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
            rope_scaling=_hf_rope_scaling(rope, source),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=arch == "qwen2",
            architecture=arch,
        )
    except KeyError as error:
        raise ModelFormatError(f"{source}: key {error} is missing") from error


def _hf_rope_scaling(rope: Mapping, source: Path | str) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=rope["factor"])
    if kind == "llama3":
        return RopeScaling("llama3", factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                           high_freq_factor=rope["high_freq_factor"],
                           original_max_position_embeddings=rope["original_max_position_embeddings"])
    raise UnsupportedModelError(f"{source}: rope scaling '{kind}' is not supported (linear, llama3 are)")


def config_to_hf(config: ModelConfig) -> dict:
    """A Hugging Face config.json for `config` (transformers loads it)."""
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind == "factors":
        raise ValueError("rope scaling by explicit per-frequency factors has no config.json form")
    rope_scaling = None if scaling is None else {"rope_type": scaling.kind, "factor": scaling.factor}
    if scaling is not None and scaling.kind == "llama3":
        rope_scaling |= {"low_freq_factor": scaling.low_freq_factor,
                         "high_freq_factor": scaling.high_freq_factor,
                         "original_max_position_embeddings": scaling.original_max_position_embeddings}
    return {
        "architectures": [HF_CLASSES[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": "float32",
    }


def save_hf(config: ModelConfig, weights: Mapping[str, Tensor], folder: Path) -> Path:
    """Write `folder`/config.json and `folder`/model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    tensors = {name: weights[name].contiguous() for name in hf_weight_shapes(config)}
    safetensors.torch.save_file(tensors, folder / "model.safetensors")
    return folder


# Shared --------------------------------------------------------------------------------------

def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """Random float32 weights under Hugging Face names, scaled to keep activations near unit size."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in hf_weight_shapes(config).items():
        noise = torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.1 * noise
        elif name.endswith(".bias"):
            weights[name] = 0.1 * noise
        elif name == "model.embed_tokens.weight":
            weights[name] = noise
        else:
            weights[name] = noise / shape[1] ** 0.5
    return weights


def _check_shapes(source: Path, weights: Mapping[str, Tensor],
                  shapes: Mapping[str, tuple[int, ...]]) -> None:
    missing = [name for name in shapes if name not in weights]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelFormatError(f"{source}: tensors missing: {', '.join(missing[:3])}{more}")
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != shape:
            raise ModelFormatError(f"{source}: tensor '{name}' has shape "
                                   f"{tuple(weights[name].shape)}, the config needs {shape}")
