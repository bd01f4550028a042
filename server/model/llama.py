"""The Llama-family decoder (SmolLM2, Llama 2/3, Qwen2) with a packed-batch forward over a KV cache.

One forward call runs one engine step: the new tokens of several sequences are
packed end to end (a prefill chunk of one request next to single decode tokens
of others), each token carries its position and its sequence's cache slot, the
new keys/values are written into the `KVCache`, and logits come back only for
the rows the engine asked for (normally each sequence's last new token).

Weights are fused for serving (q/k/v into one projection, gate/up into one) so
a step makes fewer, larger matmuls; `Llama.from_hf_weights` takes the
unfused Hugging Face names and layout, which both loaders produce.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ringlm.server.model.kv_cache import KVCache

ARCHITECTURES = ("llama", "qwen2")
ROPE_SCALING_KINDS = ("linear", "llama3", "factors")

# Decode rows whose context is at most this long are attended in one padded
# call; longer ones one sequence at a time. Measured on a 2-core AVX2 CPU with
# SmolLM2's heads: the padded call (which gathers each row's keys/values up to
# the longest context, unless the slots are consecutive) wins by up to 2x for
# 8-32 rows at contexts <= 128, while the per-sequence calls (no copy, ~60 us
# overhead each) win from ~256 on. On CUDA per-sequence launches cost more
# than any copy, so there it is unlimited.
CPU_BATCHED_DECODE_MAX_CONTEXT = 192


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for contexts past the trained length.

    kind "linear" divides every frequency by `factor`; "llama3" divides the low
    frequencies by `factor`, keeps the high ones and blends in between (Llama
    3.1+); "factors" divides frequency i by `freq_factors[i]`, which is how GGUF
    files store llama3 scaling (the `rope_freqs` tensor).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALING_KINDS:
            raise ValueError(f"rope scaling kind '{self.kind}' is not one of {ROPE_SCALING_KINDS}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on the q, k and v projections
    architecture: str = "llama"  # the GGUF architecture / Hugging Face model_type

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture '{self.architecture}' is not one of {ARCHITECTURES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) is not a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """A config of a few ten-thousand weights with grouped-query attention, for fast tests.

        Every matrix row is a multiple of 32 long, so GGUF block quantization applies.
        """
        fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
        return cls(**(fields | overrides))


def hf_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names this config needs, with their shapes."""
    hidden, q_size = config.hidden_size, config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden),
              "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "input_layernorm.weight": (hidden,),
            layer + "post_attention_layernorm.weight": (hidden,),
            layer + "self_attn.q_proj.weight": (q_size, hidden),
            layer + "self_attn.k_proj.weight": (kv_size, hidden),
            layer + "self_attn.v_proj.weight": (kv_size, hidden),
            layer + "self_attn.o_proj.weight": (hidden, q_size),
            layer + "mlp.gate_proj.weight": (config.intermediate_size, hidden),
            layer + "mlp.up_proj.weight": (config.intermediate_size, hidden),
            layer + "mlp.down_proj.weight": (hidden, config.intermediate_size),
        }
        if config.qkv_bias:
            shapes |= {layer + "self_attn.q_proj.bias": (q_size,),
                       layer + "self_attn.k_proj.bias": (kv_size,),
                       layer + "self_attn.v_proj.bias": (kv_size,)}
    return shapes


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Rotary angular frequency of each dimension pair, float32 [head_dim // 2]."""
    dim = config.head_dim
    # float32 as in the reference implementations the checkpoints were trained with; on the CPU
    # explicitly, so it is real even while the model is built on the meta device.
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    inv_freq = 1.0 / config.rope_theta ** exponents
    scaling = config.rope_scaling
    if scaling is None:
        pass
    elif scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "factors":
        if len(scaling.freq_factors) != dim // 2:
            raise ValueError(f"rope freq_factors has {len(scaling.freq_factors)} entries, "
                             f"head_dim {dim} needs {dim // 2}")
        inv_freq = inv_freq / torch.tensor(scaling.freq_factors, device="cpu")
    else:  # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between
        wavelen = 2 * math.pi / inv_freq
        context = scaling.original_max_position_embeddings
        smooth = (context / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > context / scaling.low_freq_factor, inv_freq / scaling.factor,
                               torch.where(wavelen < context / scaling.high_freq_factor, inv_freq,
                                           blended))
    return inv_freq


class SequenceChunk(NamedTuple):
    """The new tokens of one sequence for one step."""

    slot: int                 # the sequence's KV-cache slot
    token_ids: Sequence[int]  # tokens to run, at least one
    position: int             # position of token_ids[0] = tokens of this slot already cached
    logits: bool = True       # return logits for the last token (False for a non-final prefill chunk)


class _Span(NamedTuple):
    """A sequence attended on its own."""

    slot: int
    start: int          # first row in the packed tokens
    length: int         # new tokens
    context: int        # cached tokens after this step
    causal: bool        # starts at position 0: plain causal attention
    mask: Tensor | None  # [length, context] bool, for a chunk that continues a cached prefix


class _DecodeGroup(NamedTuple):
    """Single-token sequences attended together in one padded call.

    rows and slots are slices when they run consecutively (all-decode steps,
    slots handed out in order): indexing with a slice is a view, not a copy.
    """

    rows: Tensor | slice   # [B] rows in the packed tokens
    slots: Tensor | slice  # [B] their cache slots
    context: int           # longest context in the group
    mask: Tensor           # [B, 1, 1, context] bool, True where a row may attend


@dataclass(frozen=True)
class PackedBatch:
    """One step's tokens packed end to end, with the index tensors attention needs.

    Built once per step by `pack` and shared by every layer, so no layer
    recomputes masks or indices.
    """

    token_ids: Tensor    # [T] int64
    positions: Tensor    # [T] int64, each token's position in its sequence
    token_slots: Tensor  # [T] int64, each token's cache slot
    logit_rows: Tensor   # [L] int64, rows whose logits forward returns, in chunk order
    spans: tuple[_Span, ...]
    decode: _DecodeGroup | None
    max_slot: int
    max_context: int

    @classmethod
    def pack(cls, chunks: Sequence[SequenceChunk], device: torch.device | str = "cpu",
             batched_decode_max_context: float | None = None) -> PackedBatch:
        """Pack the chunks of one step; a slot may appear at most once.

        `batched_decode_max_context` is the longest context a decode row may
        have to join the padded decode call (default: measured per device).
        """
        device = torch.device(device)
        if batched_decode_max_context is None:
            batched_decode_max_context = (CPU_BATCHED_DECODE_MAX_CONTEXT if device.type == "cpu"
                                          else math.inf)
        _check_chunks(chunks)
        token_ids, positions, token_slots, logit_rows = [], [], [], []
        spans, decode_rows, decode_slots, decode_contexts = [], [], [], []
        for chunk in chunks:
            start, length = len(token_ids), len(chunk.token_ids)
            context = chunk.position + length
            token_ids += chunk.token_ids
            positions += range(chunk.position, context)
            token_slots += [chunk.slot] * length
            if chunk.logits:
                logit_rows.append(start + length - 1)
            if length == 1 and context <= batched_decode_max_context:
                decode_rows.append(start)
                decode_slots.append(chunk.slot)
                decode_contexts.append(context)
            else:
                spans.append(_span(chunk, start, device))
        as_tensor = partial(torch.tensor, dtype=torch.long, device=device)
        return cls(
            token_ids=as_tensor(token_ids), positions=as_tensor(positions),
            token_slots=as_tensor(token_slots), logit_rows=as_tensor(logit_rows),
            spans=tuple(spans),
            decode=_decode_group(decode_rows, decode_slots, decode_contexts, device),
            max_slot=max(chunk.slot for chunk in chunks),
            max_context=max(chunk.position + len(chunk.token_ids) for chunk in chunks))


def _check_chunks(chunks: Sequence[SequenceChunk]) -> None:
    if not chunks:
        raise ValueError("a packed batch needs at least one sequence chunk")
    slots = [chunk.slot for chunk in chunks]
    if len(set(slots)) != len(slots):
        raise ValueError(f"a slot may appear once per batch, got slots {slots}")
    for chunk in chunks:
        if not chunk.token_ids:
            raise ValueError(f"the chunk for slot {chunk.slot} has no tokens")
        if chunk.position < 0 or chunk.slot < 0:
            raise ValueError(f"slot and position must be >= 0, got {chunk.slot} and {chunk.position}")


def _span(chunk: SequenceChunk, start: int, device: torch.device) -> _Span:
    length = len(chunk.token_ids)
    context = chunk.position + length
    causal = chunk.position == 0 and length > 1
    mask = None
    if chunk.position > 0 and length > 1:  # new token i sees the cached prefix and new tokens <= i
        new_positions = torch.arange(chunk.position, context, device=device)
        mask = torch.arange(context, device=device)[None, :] <= new_positions[:, None]
    return _Span(chunk.slot, start, length, context, causal, mask)


def _decode_group(rows: list[int], slots: list[int], contexts: list[int],
                  device: torch.device) -> _DecodeGroup | None:
    if not rows:
        return None
    longest = max(contexts)
    lengths = torch.tensor(contexts, device=device)
    mask = torch.arange(longest, device=device)[None, :] < lengths[:, None]  # [B, longest]
    return _DecodeGroup(_as_index(rows, device), _as_index(slots, device), longest,
                        mask[:, None, None, :])


def _as_index(values: list[int], device: torch.device) -> Tensor | slice:
    """A slice for a consecutive ascending run, else an index tensor."""
    if values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return torch.tensor(values, device=device)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in float32 as the reference does: bfloat16 squares lose too much.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [T, heads, head_dim] by the angles in cos/sin [T, 1, head_dim // 2].

    Pairs are (i, i + head_dim/2), the Hugging Face layout; GGUF llama weights
    are un-permuted into it when loaded.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attend(q: Tensor, keys: Tensor, values: Tensor, batch: PackedBatch) -> Tensor:
    """Attention of the packed queries q [T, H, D] over one layer's cache -> [T, H * D].

    keys/values are [slots, KVH, max_seq_len, D] and already hold this step's
    tokens. The H query heads are viewed as [KVH, H / KVH] so each group meets
    its shared kv head without copying keys (grouped-query attention).
    """
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = num_heads // kv_heads
    out = q.new_empty(num_tokens, num_heads * head_dim)
    for span in batch.spans:
        rows = slice(span.start, span.start + span.length)
        k = keys[span.slot, :, None, :span.context]   # [KVH, 1, ctx, D]
        v = values[span.slot, :, None, :span.context]
        shape = (kv_heads, group, span.context, head_dim)
        # A stride-0 expand keeps 4-D inputs, which the CPU flash kernel takes (~3x faster).
        qg = q[rows].view(span.length, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        o = F.scaled_dot_product_attention(qg, k.expand(shape), v.expand(shape),
                                           attn_mask=span.mask, is_causal=span.causal)
        out[rows] = o.permute(2, 0, 1, 3).reshape(span.length, -1)   # [n, H * D]
    if batch.decode is not None:
        d = batch.decode
        # The group's G query heads per kv head play the role of query rows.
        qg = q[d.rows].view(-1, kv_heads, group, head_dim)  # [B, KVH, G, D]
        k = keys[d.slots, :, :d.context]                    # [B, KVH, ctx, D]
        v = values[d.slots, :, :d.context]
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=d.mask)
        out[d.rows] = o.flatten(1)
    return out


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions, reading and writing the cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = (
            config.num_heads, config.num_kv_heads, config.head_dim)
        q_size, kv_size = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv = nn.Linear(config.hidden_size, sum(self.split), bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: PackedBatch,
                keys: Tensor, values: Tensor) -> Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = apply_rope(q.view(num_tokens, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(num_tokens, self.kv_heads, self.head_dim), cos, sin)
        keys[batch.token_slots, :, batch.positions] = k          # [T, KVH, D] into the slots
        values[batch.token_slots, :, batch.positions] = v.view(num_tokens, self.kv_heads, -1)
        return self.o_proj(attend(q, keys, values, batch))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: PackedBatch,
                keys: Tensor, values: Tensor) -> Tensor:
        x = x + self.attention(self.attn_norm(x), cos, sin, batch, keys, values)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """The whole decoder: embeddings, layers, final norm and LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        # float32 whatever the weights' dtype: bfloat16 angles would be off by whole radians.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @classmethod
    def from_hf_weights(cls, config: ModelConfig, weights: Mapping[str, Tensor],
                        device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> Llama:
        """Build the model from Hugging Face names and layout (see `hf_weight_shapes`)."""
        with torch.device("meta"):
            model = cls(config)
        state = _fuse_hf_weights(config, weights)
        state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = rope_inv_freq(config).to(device)
        return model.requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @torch.inference_mode()
    def forward(self, batch: PackedBatch, cache: KVCache) -> Tensor:
        """Run one step: write the batch's keys/values into `cache`, return logits [L, vocab].

        Row i of the result belongs to the i-th chunk packed with logits=True.
        """
        self._check(batch, cache)
        x = self.embed_tokens(batch.token_ids)                           # [T, hidden]
        angles = batch.positions[:, None].float() * self.inv_freq[None]  # [T, D/2], float32
        cos = angles.cos().to(x.dtype)[:, None]                          # [T, 1, D/2]
        sin = angles.sin().to(x.dtype)[:, None]
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            x = layer(x, cos, sin, batch, keys, values)
        x = self.norm(x.index_select(0, batch.logit_rows))               # [L, hidden]
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head)                                         # [L, vocab]

    def _check(self, batch: PackedBatch, cache: KVCache) -> None:
        if cache.keys.dtype != self.dtype or cache.keys.device != self.device:
            raise ValueError(f"the KV cache is {cache.keys.dtype} on {cache.keys.device}, "
                             f"the model {self.dtype} on {self.device}")
        layers, _, kv_heads, _, head_dim = cache.keys.shape
        config = self.config
        if (layers, kv_heads, head_dim) != (config.num_layers, config.num_kv_heads, config.head_dim):
            raise ValueError(f"the KV cache shape {tuple(cache.keys.shape)} does not fit this model")
        if batch.max_slot >= cache.num_slots:
            raise ValueError(f"slot {batch.max_slot} is out of range: the cache has {cache.num_slots} slots")
        if batch.max_context > cache.max_seq_len:
            raise ValueError(f"a sequence would reach {batch.max_context} tokens; "
                             f"a cache slot holds {cache.max_seq_len}")


def _fuse_hf_weights(config: ModelConfig, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face names/layout -> this module's fused state dict."""
    state = {"embed_tokens.weight": weights["model.embed_tokens.weight"],
             "norm.weight": weights["model.norm.weight"]}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = weights["lm_head.weight"]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        state |= {
            ours + "attn_norm.weight": weights[hf + "input_layernorm.weight"],
            ours + "mlp_norm.weight": weights[hf + "post_attention_layernorm.weight"],
            ours + "attention.qkv.weight": torch.cat(
                [weights[attn + p + "_proj.weight"] for p in "qkv"]),
            ours + "attention.o_proj.weight": weights[attn + "o_proj.weight"],
            ours + "mlp.gate_up.weight": torch.cat(
                [weights[hf + "mlp.gate_proj.weight"], weights[hf + "mlp.up_proj.weight"]]),
            ours + "mlp.down.weight": weights[hf + "mlp.down_proj.weight"],
        }
        if config.qkv_bias:
            state[ours + "attention.qkv.bias"] = torch.cat(
                [weights[attn + p + "_proj.bias"] for p in "qkv"])
    return state
