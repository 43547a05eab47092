"""A slot-based KV cache: one slot (a full max_model_len row) per running sequence.

    cache: [num_layers, 2 (k, v), max_num_seqs, num_kv_heads, max_model_len, head_dim]

A sequence owns slot s from admission to finish; head h of its token at position p lives at
cache[l, :, s, h, p]. Slots are handed out lowest-first, so the running set stays packed at the low
end and decode attention reads the slot range [lo, hi) as a view whose [position, head_dim]
matrices are contiguous: the batched matmuls take it as is, without copying K or V. The tensor is
allocated with numpy's calloc-backed `zeros`, whose pages the OS maps lazily on first write: untouched
slots and positions cost no memory (`torch.zeros` would write, and so commit, every page). The cache
is float32, or bfloat16 (EngineConfig.kv_cache_dtype: K and V rounded as they are written).
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from matryoshka_lora.engine.weights import ModelSpec
from matryoshka_lora.errors import ConfigError


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose memory is committed page by page as it is written (numpy's calloc)."""
    if dtype == torch.bfloat16:  # numpy has no bfloat16: its bits as uint16 zeros (0x0000 is +0.0)
        return torch.from_numpy(np.zeros(shape, dtype=np.uint16)).view(torch.bfloat16)
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}.get(dtype)
    if np_dtype is None:
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(np.zeros(shape, dtype=np_dtype))


class KVCache:
    def __init__(self, spec: ModelSpec, max_num_seqs: int, max_model_len: int, dtype: torch.dtype = torch.float32):
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.cache = lazy_zeros(
            (spec.num_layers, 2, max_num_seqs, spec.num_kv_heads, max_model_len, spec.head_dim), dtype
        )
        self.num_kv_heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        # Flat row views for writes: row = (slot * num_kv_heads + head) * max_model_len + position.
        self._flat = [
            (self.cache[i, 0].view(-1, spec.head_dim), self.cache[i, 1].view(-1, spec.head_dim))
            for i in range(spec.num_layers)
        ]
        self._head_rows = torch.arange(spec.num_kv_heads) * max_model_len
        self._free = list(range(max_num_seqs))
        heapq.heapify(self._free)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def num_used_slots(self) -> int:
        return self.max_num_seqs - len(self._free)

    def usage(self) -> float:
        """Fraction of slots held by sequences (each slot reserves max_model_len positions)."""
        return self.num_used_slots / self.max_num_seqs

    def allocate(self) -> int:
        """Take the lowest free slot."""
        if not self._free:
            raise ConfigError("KV cache slot", "none free", f"at most {self.max_num_seqs} running sequences")
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.max_num_seqs or slot in self._free:
            raise ConfigError("KV cache slot to free", slot, "a slot currently allocated")
        heapq.heappush(self._free, slot)

    def write_rows(self, slots: list[int], positions: list[int]) -> torch.Tensor:
        """The flat cache rows of tokens (slots[t], positions[t]), all heads: [T * num_kv_heads], made once per step."""
        base = torch.tensor(slots, dtype=torch.long) * (self.num_kv_heads * self.max_model_len)
        base += torch.tensor(positions, dtype=torch.long)
        return (base.unsqueeze(1) + self._head_rows).reshape(-1)

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, kv_heads, head_dim] into their rows from `write_rows`."""
        k_flat, v_flat = self._flat[layer]
        k_flat.index_copy_(0, rows, k.reshape(-1, self.head_dim).to(k_flat.dtype))
        v_flat.index_copy_(0, rows, v.reshape(-1, self.head_dim).to(v_flat.dtype))

    def seq_view(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one sequence's first `length` positions: [kv_heads, length, head_dim] views."""
        return self.cache[layer, 0, slot, :, :length], self.cache[layer, 1, slot, :, :length]

    def range_view(self, layer: int, lo: int, hi: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of slots [lo, hi), positions [0, length): [hi - lo, kv_heads, length, head_dim] views, no copy."""
        return self.cache[layer, 0, lo:hi, :, :length], self.cache[layer, 1, lo:hi, :, :length]
