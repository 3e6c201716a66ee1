"""The fastest torch path for GPUs: a static KV cache and a compiled decode step replayed as a CUDA graph.

The eager engine (paligemma.generate.TorchEngine) slices its cache to the filled length, so every decode step has
new shapes and runs as ~20 kernel launches per layer from Python. Here the step always attends over the cache's
whole capacity, masked by slot, and writes the new key/value at a slot index held in a tensor: every shape is
fixed, so `torch.compile(mode="reduce-overhead")` captures the step once and replays it as one CUDA graph
(gpt-fast's recipe). The model's own layers run unchanged; only the key/value store and the mask differ.
Prefill (image encoding and prompt) stays eager: it runs once per request with large matrices.

Axes: L layers, B batch, K key/value heads, S capacity (slots), D head dim, T prompt tokens, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

import paligemma
from paligemma.generate import Pipeline
from paligemma.masks import additive, last_slots, token_positions
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.processor import PaliGemmaProcessor
from paligemma.weights import load_model


class StaticCache(nn.Module):
    """Keys and values for `capacity` slots as buffers (fixed addresses, as CUDA graphs need), and which slots
    hold real tokens (False for left padding)."""

    def __init__(self, model: PaliGemmaForConditionalGeneration, batch_size: int, capacity: int):
        super().__init__()
        t = model.config.text
        parameter = next(model.parameters())
        shape = (t.num_hidden_layers, batch_size, t.num_key_value_heads, capacity, t.head_dim)
        self.register_buffer("keys", torch.zeros(shape, device=parameter.device, dtype=parameter.dtype))
        self.register_buffer("values", torch.zeros(shape, device=parameter.device, dtype=parameter.dtype))
        self.register_buffer("real", torch.ones(batch_size, capacity, device=parameter.device, dtype=torch.bool))
        self.register_buffer("slots", torch.arange(capacity, device=parameter.device))
        for buffer in self.buffers():
            # Written in place by the compiled step: a fixed address lets CUDA graphs keep them instead of copying
            # (or skipping the graph over a mutated input).
            torch._dynamo.mark_static_address(buffer)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]


class PrefillStore:
    """The model's KeyValueStore during prefill: the prompt's keys/values go to slots [0, T)."""

    length = 0

    def __init__(self, cache: StaticCache):
        self.cache = cache

    def update(self, layer, keys, values):
        T = keys.shape[2]
        self.cache.keys[layer, :, :, :T] = keys
        self.cache.values[layer, :, :, :T] = values
        return self.cache.keys[layer, :, :, :T], self.cache.values[layer, :, :, :T]


class DecodeStore:
    """The model's KeyValueStore during a decode step: the new key/value goes to slot `index` [1]; attention reads
    every slot [B, K, S, D], the mask hiding the ones not written yet."""

    def __init__(self, cache: StaticCache, index: torch.Tensor):
        self.cache = cache
        self.index = index

    def update(self, layer, keys, values):
        self.cache.keys[layer].index_copy_(2, self.index, keys)
        self.cache.values[layer].index_copy_(2, self.index, values)
        return self.cache.keys[layer], self.cache.values[layer]


class DecodeStep(nn.Module):
    """One token per row through the decoder with fixed shapes: tokens, positions [B, 1] and the slot index [1]
    -> next-token logits [B, V]."""

    def __init__(self, model: PaliGemmaForConditionalGeneration, cache: StaticCache):
        super().__init__()
        self.model = model
        self.cache = cache
        self.windows = sorted(model.windows, key=lambda w: -1 if w is None else w)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        x = self.model.embed(tokens)
        # A generated token attends to every real slot up to its own (it is in the causal suffix); a sliding
        # window, counted in slots as the eager model does, also drops slots at or before index - window.
        written = self.cache.real & (self.cache.slots <= index)
        masks = {}
        for window in self.windows:
            allowed = written if window is None else written & (self.cache.slots > index - window)
            masks[window] = additive(allowed, x.dtype)[:, None, None, None, :]  # [B, 1, 1, T=1, S]
        hidden = self.model.decoder(x, positions, masks, DecodeStore(self.cache, index))
        return self.model.decoder.logits(hidden[:, -1])


class CompiledDecoder:
    """Owns the static cache and the compiled step, reused by every request of the same batch size that fits the
    capacity (a larger one builds, and compiles, new ones). Calling it gives an engine for one request, as
    Pipeline's engine_factory expects."""

    def __init__(self, model: PaliGemmaForConditionalGeneration, capacity_multiple: int = 128, compile: bool = True):
        self.model = model
        self.capacity_multiple = capacity_multiple
        self.compile = compile
        self.cache: StaticCache | None = None
        self.step = None

    def prepare(self, batch_size: int, needed: int) -> StaticCache:
        if self.cache is None or self.cache.batch_size != batch_size or self.cache.capacity < needed:
            capacity = -(-needed // self.capacity_multiple) * self.capacity_multiple
            self.cache = StaticCache(self.model, batch_size, capacity)
            step = DecodeStep(self.model, self.cache)
            if self.compile:
                # reduce-overhead: CUDA graphs on a GPU (on CPU it compiles without them).
                step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
            self.step = step
        return self.cache

    def __call__(self) -> "StaticEngine":
        return StaticEngine(self)


class StaticEngine:
    """One request: eager prefill into the static cache, then compiled decode steps."""

    def __init__(self, owner: CompiledDecoder):
        self.owner = owner
        self.model = owner.model
        parameter = next(self.model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    @torch.no_grad()
    def prefill(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        input_ids = inputs["input_ids"].to(self.device)
        attention_mask = inputs["attention_mask"].to(self.device)
        B, T = input_ids.shape
        cache = self.owner.prepare(B, T + max_new_tokens)
        cache.real.fill_(True)
        cache.real[:, :T] = attention_mask.bool()
        image_embeddings = self.model.embed_image(inputs["pixel_values"].to(self.device, self.dtype))
        logits = self.model(input_ids, attention_mask=attention_mask, token_type_ids=inputs["token_type_ids"].to(self.device),
                            image_embeddings=image_embeddings, cache=PrefillStore(cache), last_only=True)
        self.index = torch.tensor([T], device=self.device)  # the slot the next token's key/value goes to
        self.position = token_positions(attention_mask, last_slots(T, 1, self.device))
        self.capacity = cache.capacity
        return logits[:, -1]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.position = self.position + 1
        if self.owner.compile and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer read
        logits = self.owner.step(tokens.to(self.device)[:, None], self.position, self.index).clone()
        self.index = self.index + 1
        return logits


def compiled_pipeline(path, device: str = "cuda", dtype=torch.bfloat16, compile: bool = True) -> Pipeline:
    """A Pipeline over `path` (a checkpoint folder; None for the demo model) whose decode steps are compiled."""
    folder = paligemma.resolve_checkpoint(path if path is not None else paligemma.DEMO_CHECKPOINT)
    model = load_model(folder, device=device, dtype=dtype)
    processor = PaliGemmaProcessor.from_pretrained(folder, model.config)
    return Pipeline(model, processor, CompiledDecoder(model, compile=compile))
