"""The native engine's KV cache: one preallocated buffer per layer, written one column per decoding step."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer


class BufferedLayer(DynamicLayer):
    """A KV-cache layer that writes each step into one buffer sized for prompt + completion.

    transformers' DynamicLayer grows by ``torch.cat`` and so copies the whole cache at every step: O(T^2) memory
    traffic over a sequence, as much as the attention itself reads. Here a step writes only its own column.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity  # positions the buffer holds
        self.length = 0  # positions filled

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.key_buffer = key_states.new_empty(b, h, self.capacity, d)  # (B, H, capacity, D)
        self.value_buffer = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV buffer of {self.capacity} positions overflowed")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]  # (B, H, T, D) views
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep (or repeat) batch rows ``beam_idx``, copying only the filled part of the buffer."""
        if not self.is_initialized:
            return
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(len(beam_idx), *old.shape[1:])
            new[:, :, : self.length] = old[:, :, : self.length].index_select(0, beam_idx.to(old.device))
            setattr(self, name, new)
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)


def new_cache(model: PreTrainedModel, capacity: int) -> Cache:
    """Buffered layers when every layer is plain full attention (Llama); else transformers' DynamicCache, which
    knows sliding-window and other layer kinds."""
    dynamic = DynamicCache(config=model.config)
    if dynamic.layers and all(type(layer) is DynamicLayer for layer in dynamic.layers):
        return Cache(layers=[BufferedLayer(capacity) for _ in dynamic.layers])
    return dynamic
