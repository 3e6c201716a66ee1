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


class RowPool:
    """The caches of a continuous batch (paligemma/scheduler.py): keys and values [L, R, K, M, D] whose first n rows
    are the rows in use, each with its own length (`lengths` [R]: its filled slots, and the slot of its next token)
    and token types (`autoregressive` [R, M]: the prompt's, then 1). A row joins with its prompt's keys and values
    in slots [0, T); each decode step writes one more slot per row; a leaving row's place is taken by the last row,
    so the rows in use are always the first n (one contiguous view for the decode step). R and M grow when a joining
    row needs them (M to a multiple of `multiple`) and the buffers are freed when the last row leaves: the pool
    holds the rows in use, each as long as the longest prompt plus budget among them, never the model's positions.
    Rows are named by ids that stay theirs while the places move.

    `fixed` (the static engine's: recorded CUDA graphs read the buffers at fixed addresses): all `max_rows` rows of
    at least `capacity` slots from the start, kept when the batch empties; only a longer row makes new buffers."""

    def __init__(self, config: TextConfig, max_rows: int, device=None, dtype=torch.float32, multiple: int = 64,
                 fixed: bool = False, capacity: int = 0):
        self.layers, self.kv_heads = config.num_hidden_layers, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.max_rows, self.multiple, self.fixed = max_rows, multiple, fixed
        self.device, self.dtype = device, dtype
        self.ids: list[int] = []  # the row id at each place
        self.next_id = 0
        self._allocate(max_rows if fixed else 0, -(-capacity // multiple) * multiple if fixed else 0)

    def _allocate(self, rows: int, capacity: int) -> None:
        shape = (self.layers, rows, self.kv_heads, capacity, self.head_dim)
        self.keys = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.values = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.autoregressive = torch.ones(rows, capacity, device=self.device, dtype=torch.bool)
        self.lengths = torch.zeros(rows, device=self.device, dtype=torch.long)

    @property
    def rows(self) -> int:
        """Rows in use (the first `rows` places)."""
        return len(self.ids)

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def places(self, ids: list[int]) -> list[int]:
        return [self.ids.index(i) for i in ids]

    def grow(self, rows: int, capacity: int) -> None:
        """Room for `rows` rows of `capacity` slots, the rows in use kept."""
        have_rows, have_capacity = self.keys.shape[1], self.capacity
        if rows <= have_rows and capacity <= have_capacity:
            return
        if rows > self.max_rows:
            raise ValueError(f"the batch holds at most {self.max_rows} rows")
        new_rows = min(self.max_rows, max(rows, 2 * have_rows))  # doubling: few copies while a batch fills
        if self.fixed:  # a longer row: twice the capacity, so that it happens rarely
            capacity = max(capacity, 2 * have_capacity)
        new_capacity = max(have_capacity, -(-capacity // self.multiple) * self.multiple)
        old = (self.keys, self.values, self.autoregressive, self.lengths)
        self._allocate(new_rows, new_capacity)
        n = self.rows
        self.keys[:, :n, :, :have_capacity] = old[0][:, :n]
        self.values[:, :n, :, :have_capacity] = old[1][:, :n]
        self.autoregressive[:n, :have_capacity] = old[2][:n]
        self.lengths[:n] = old[3][:n]

    def join(self, keys: torch.Tensor, values: torch.Tensor, token_types: torch.Tensor, capacity: int) -> int:
        """A row with its prompt's keys and values [L, K, T, D] and token types [T] (0 prefix, 1 suffix), that will
        hold `capacity` slots; returns its id."""
        T = keys.shape[2]
        place = self.rows
        self.grow(place + 1, capacity)
        self.keys[:, place, :, :T] = keys
        self.values[:, place, :, :T] = values
        self.autoregressive[place] = True
        self.autoregressive[place, :T] = token_types.bool()
        self.lengths[place] = T
        row, self.next_id = self.next_id, self.next_id + 1
        self.ids.append(row)
        return row

    def leave(self, row: int) -> None:
        place, last = self.ids.index(row), self.rows - 1
        if place != last:  # the last row moves into the freed place
            self.keys[:, place] = self.keys[:, last]
            self.values[:, place] = self.values[:, last]
            self.autoregressive[place] = self.autoregressive[last]
            self.lengths[place] = self.lengths[last]
            self.ids[place] = self.ids[last]
        self.ids.pop()
        if not self.ids and not self.fixed:
            self._allocate(0, 0)


class RowStore:
    """Rows of a RowPool as the model's KeyValueStore in a decode step: keys and values [L, B, K, S, D] (views of the
    pool: its first B rows and S slots), row b's new key/value written at slot lengths[b]; attention reads all S
    slots of every row (the mask hides each row's slots past its own)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        self.keys, self.values, self.lengths = keys, values, lengths
        self.rows = torch.arange(keys.shape[1], device=keys.device)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer, self.rows, :, self.lengths] = keys[:, :, 0]  # keys [B, K, 1, D]
        self.values[layer, self.rows, :, self.lengths] = values[:, :, 0]
        return self.keys[layer], self.values[layer]
