"""The three exported graphs as torch modules with flat tensor inputs and outputs, and their I/O contract.

Axes: B batch, T prompt tokens, P past (cached) tokens, N image tokens, C decoder width, K key/value heads,
D head dim, V vocabulary, L decoder layers.

    vision_encoder  pixel_values [B, 3, S, S]
                    -> image_embeddings [B, N, C]
    prefill         input_ids, attention_mask, token_type_ids [B, T],
                    image_embeddings [B, N, C]
                    -> logits [B, V], present.{i}.{key,value} [B, K, T, D]
    decode          input_ids [B, 1], attention_mask [B, P + 1], position_ids [B, 1],
                    past_key_values.{i}.{key,value} [B, K, P, D]
                    -> logits [B, V], present.{i}.{key,value} [B, K, P + 1, D]

Every layer keeps every key (sliding-window layers too): the window is applied by the mask, by index, exactly as
the torch KV cache does, so that padded batches give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paligemma.config import PaliGemmaConfig
from paligemma.masks import TokenLayout
from paligemma.model import PaliGemmaForConditionalGeneration


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float" is the export dtype (float32 or float16); the rest are fixed
    shape: tuple[str | int, ...]  # strings are dynamic axes


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def describe(self) -> dict:
        def rows(tensors):
            return [dict(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in tensors]

        return dict(file=self.file, inputs=rows(self.inputs), outputs=rows(self.outputs))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)} for t in self.inputs + self.outputs}


GRAPH_ORDER = ("vision_encoder", "prefill", "decode")


def cache_names(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def graph_specs(config: PaliGemmaConfig) -> dict[str, GraphSpec]:
    t, v = config.text, config.vision
    K, D, C, N, V = t.num_key_value_heads, t.head_dim, t.hidden_size, config.num_image_tokens, t.vocab_size

    def cache(prefix, length):
        return tuple(TensorSpec(n, "float", ("batch", K, length, D)) for n in cache_names(prefix, t.num_hidden_layers))

    vision = GraphSpec(
        "vision_encoder",
        (TensorSpec("pixel_values", "float", ("batch", v.num_channels, v.image_size, v.image_size)),),
        (TensorSpec("image_embeddings", "float", ("batch", N, C)),),
    )
    prefill = GraphSpec(
        "prefill",
        (
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("image_embeddings", "float", ("batch", N, C)),
            TensorSpec("attention_mask", "int64", ("batch", "sequence")),
            TensorSpec("token_type_ids", "int64", ("batch", "sequence")),
        ),
        (TensorSpec("logits", "float32", ("batch", V)),) + cache("present", "sequence"),
    )
    decode = GraphSpec(
        "decode",
        (
            TensorSpec("input_ids", "int64", ("batch", 1)),
            TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
            TensorSpec("position_ids", "int64", ("batch", 1)),
        )
        + cache("past_key_values", "past_sequence"),
        (TensorSpec("logits", "float32", ("batch", V)),) + cache("present", "total_sequence"),
    )
    return {g.name: g for g in (vision, prefill, decode)}


class ConcatCache:
    """A KeyValueStore for tracing: each layer's new keys are appended to the past ones given as graph inputs,
    and the results become the graph's `present` outputs."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]] | None, num_layers: int):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = [None] * num_layers  # type: ignore[list-item]
        self.length = 0 if past is None else past[0][0].shape[2]

    def update(self, layer, keys, values):
        if self.past is not None:
            keys = torch.cat([self.past[layer][0], keys], dim=2)
            values = torch.cat([self.past[layer][1], values], dim=2)
        self.present[layer] = (keys, values)
        return keys, values

    def outputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for pair in self.present for t in pair)


def next_token_logits(model: PaliGemmaForConditionalGeneration, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, C] -> logits [B, V], float32 whatever the export dtype (what sampling reads)."""
    return model.decoder.logits(hidden).float()


class VisionEncoderGraph(nn.Module):
    def __init__(self, model: PaliGemmaForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.embed_image(pixel_values)


class PrefillGraph(nn.Module):
    def __init__(self, model: PaliGemmaForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, input_ids, image_embeddings, attention_mask, token_type_ids):
        model = self.model
        cache = ConcatCache(None, model.config.text.num_hidden_layers)
        layout = TokenLayout.last(attention_mask, token_type_ids, input_ids.shape[1])
        hidden = model.run_decoder(input_ids, image_embeddings, layout, cache=cache)
        return (next_token_logits(model, hidden[:, -1]),) + cache.outputs()


class DecodeGraph(nn.Module):
    def __init__(self, model: PaliGemmaForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        model = self.model
        L = model.config.text.num_hidden_layers
        cache = ConcatCache([(past[2 * i], past[2 * i + 1]) for i in range(L)], L)
        # The new token is autoregressive, so the prompt's token types no longer matter: every past token is
        # taken as autoregressive too, and the rule gives the same causal (and windowed) row.
        layout = TokenLayout.last(attention_mask, torch.ones_like(attention_mask), 1)
        hidden = model.run_decoder(input_ids, None, layout, position_ids, cache)
        return (next_token_logits(model, hidden[:, -1]),) + cache.outputs()


def graph_modules(model: PaliGemmaForConditionalGeneration) -> dict[str, nn.Module]:
    return {"vision_encoder": VisionEncoderGraph(model), "prefill": PrefillGraph(model), "decode": DecodeGraph(model)}
