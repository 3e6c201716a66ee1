"""Preallocated key/value caches. KVCache (the eager engine's): layers write at the current length, attention reads
the filled slots, the caller advances it. StaticCache (the static engine's): every step attends over all its slots.

Axes: L layers, B batch, K key/value heads, S capacity, D head dim, T new tokens.
"""

from __future__ import annotations

import torch

from .config import TextConfig


class KVCache:
    def __init__(self, config: TextConfig, batch_size: int, capacity: int, device=None, dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # slots filled and agreed by every layer; moved only by advance()

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values [B, K, T, D] after the filled slots; return all of them [B, K, length + T, D]."""
        end = self.length + keys.shape[2]
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens; {end} were asked for")
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class StaticCache:
    """Keys and values for `capacity` slots at fixed addresses (a recorded CUDA graph replays on them), with the
    attention rule's inputs per slot: `real` (False for left padding) and `autoregressive` (the prompt's token
    types, then 1 for every token to generate). Reused from request to request; the prompt's keys go to slots
    [0, T), the i-th generated token's to slot T + i."""

    def __init__(self, config: TextConfig, batch_size: int, capacity: int, device=None, dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.real = torch.ones(batch_size, capacity, device=device, dtype=torch.bool)
        self.autoregressive = torch.ones(batch_size, capacity, device=device, dtype=torch.bool)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]


class PromptStore:
    """A StaticCache as the model's KeyValueStore during prefill: the prompt's keys/values [B, K, T, D] go to
    slots [0, T), and attention reads those."""

    length = 0  # no earlier tokens: the prompt is the whole sequence

    def __init__(self, cache: StaticCache):
        self.cache = cache

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = keys.shape[2]
        self.cache.keys[layer, :, :, :T] = keys
        self.cache.values[layer, :, :, :T] = values
        return self.cache.keys[layer, :, :, :T], self.cache.values[layer, :, :, :T]


class SlotStore:
    """A static cache's keys and values [L, B, K, S, D] as the model's KeyValueStore during a decode step: the new
    key/value goes to slot `index` [1], and attention reads every slot (the mask hides the ones not written yet),
    so that every shape is the same at every step."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor):
        self.keys, self.values, self.index = keys, values, index

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer].index_copy_(2, self.index, keys)
        self.values[layer].index_copy_(2, self.index, values)
        return self.keys[layer], self.values[layer]
