"""A dynamic KV cache that appends in place: the keys and values live in buffers with spare room.

transformers' DynamicCache appends by `torch.cat`, copying every layer's whole cache at every step (at DocVQA's
prompts about as costly as the attention). Here each layer writes the new tokens into a buffer with room for `GROW`
more and hands attention a view of the filled part: DynamicCache's tensors, so the same tokens, without the copy.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROW = 256  # tokens of spare room per reallocation


class AppendLayer(DynamicLayer):
    """DynamicLayer whose `keys` / `values` are views (batch, heads, length, head_dim) into larger buffers."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        buffers = getattr(self, "_buffers_of", None)
        # Reallocate when full, or when `keys` is no longer our view (crop, beam reordering, reset replaced it).
        if buffers is None or buffers[2] is not self.keys or end > buffers[0].shape[-2]:
            shape = (*key_states.shape[:-2], end + GROW, key_states.shape[-1])
            keys, values = key_states.new_empty(shape), value_states.new_empty(shape)
            if length:
                keys[..., :length, :] = self.keys
                values[..., :length, :] = self.values
        else:
            keys, values = buffers[0], buffers[1]
        keys[..., length:end, :] = key_states
        values[..., length:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        self._buffers_of = (keys, values, self.keys)
        return self.keys, self.values


def append_cache(config) -> DynamicCache:
    """A DynamicCache for `config` whose layers append in place (sliding-window layers whose window is longer than
    the model's maximum length never slide, so they become plain append layers too)."""
    cache = DynamicCache(config=config)
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    if window is None or window >= text.max_position_embeddings:
        cache.layers = [AppendLayer() for _ in cache.layers]
    return cache
