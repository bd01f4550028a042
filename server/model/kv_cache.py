"""The KV cache: every layer's keys and values for a fixed set of sequence slots, allocated once.

A slot holds one sequence's keys and values contiguously, positions 0 to
`max_seq_len - 1`, so attention reads a sequence as a plain view with no
gather. The model runner owns the cache and the scheduler hands slots to
requests; the model's forward writes the new tokens of each step into their slots. Nothing is
allocated after construction: a step only writes into these two tensors.
Positions past a sequence's length are never read, so a freed slot needs no
clearing before reuse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ringlm.server.model.llama import ModelConfig


class KVCache:
    """Keys and values [layers, slots, kv_heads, max_seq_len, head_dim] for a fixed set of slots."""

    def __init__(self, config: ModelConfig, num_slots: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError(f"a KV cache needs at least one slot of at least one token, "
                             f"got {num_slots} slots of {max_seq_len}")
        shape = (config.num_layers, num_slots, config.num_kv_heads, max_seq_len, config.head_dim)
        # Zeroed rather than empty: the memory is committed now, not at some later step.
        self.keys: Tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.values: Tensor = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def within_budget(cls, config: ModelConfig, memory_bytes: int, max_seq_len: int,
                      dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> KVCache:
        """As many slots of `max_seq_len` tokens as fit in `memory_bytes`."""
        slot_bytes = cls.bytes_per_token(config, dtype) * max_seq_len
        num_slots = memory_bytes // slot_bytes
        if num_slots < 1:
            raise ValueError(f"a budget of {memory_bytes} bytes holds no slot of {max_seq_len} "
                             f"tokens ({slot_bytes} bytes each)")
        return cls(config, num_slots, max_seq_len, dtype, device)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """Cache bytes one token takes: keys and values of every layer."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element

    @property
    def num_slots(self) -> int:
        return self.keys.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def copy_prefix(self, source_slot: int, target_slot: int, length: int) -> None:
        """Copy the first `length` positions of one slot into another (a shared prompt prefix)."""
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"prefix length {length} is outside 0..{self.max_seq_len}")
        for tensor in (self.keys, self.values):
            tensor[:, target_slot, :, :length] = tensor[:, source_slot, :, :length]
