"""transformers.js' PaliGemma layout: its three graphs as torch modules over this project's model, and their I/O.

Axes: B batch, T new tokens, P past (cached) tokens, S = P + T, N image tokens, C decoder width, K key/value heads,
D head dim, V vocabulary, L decoder layers.

    vision_encoder        pixel_values [B, 3, S, S]                      -> image_features [B, N, C]
    embed_tokens          input_ids [B, T]                               -> inputs_embeds [B, T, C]
    decoder_model_merged  inputs_embeds [B, T, C], attention_mask [B, S],
                          position_ids [B, T],
                          past_key_values.{i}.{key,value} [B, K, P, D]  -> logits [B, T, V],
                                                                            present.{i}.{key,value} [B, K, S, D]

transformers.js copies the image features into the embedding rows where `input_ids` hold `<image>`, so both come
out on the decoder's scale (text rows already multiplied by sqrt(C), as `model.embed` does). It never passes
token_type_ids: the prefix-LM rule is decided inside the decoder graph from the past length (see
`MergedDecoderGraph`). Inputs and outputs are float32 whatever the weights' dtype (transformers.js' `_fp16` files
keep float32 I/O). K and D are static numbers: transformers.js builds the first call's empty past from them.
"""

from __future__ import annotations

import torch
from torch import nn

from paligemma.config import PaliGemmaConfig
from paligemma.masks import TokenLayout, last_slots
from paligemma.model import PaliGemmaForConditionalGeneration

from ..graphs import ConcatCache, GraphSpec, TensorSpec, cache_names

GRAPH_ORDER = ("vision_encoder", "embed_tokens", "decoder_model_merged")


def graph_specs(config: PaliGemmaConfig) -> dict[str, GraphSpec]:
    t, v = config.text, config.vision
    K, D, C, N, V = t.num_key_value_heads, t.head_dim, t.hidden_size, config.num_image_tokens, t.vocab_size

    def cache(prefix, length):
        return tuple(TensorSpec(n, "float32", ("batch_size", K, length, D))
                     for n in cache_names(prefix, t.num_hidden_layers))

    vision = GraphSpec(
        "vision_encoder",
        (TensorSpec("pixel_values", "float32", ("batch_size", v.num_channels, v.image_size, v.image_size)),),
        (TensorSpec("image_features", "float32", ("batch_size", N, C)),),
    )
    embed = GraphSpec(
        "embed_tokens",
        (TensorSpec("input_ids", "int64", ("batch_size", "sequence_length")),),
        (TensorSpec("inputs_embeds", "float32", ("batch_size", "sequence_length", C)),),
    )
    decoder = GraphSpec(
        "decoder_model_merged",
        (
            TensorSpec("inputs_embeds", "float32", ("batch_size", "sequence_length", C)),
            TensorSpec("attention_mask", "int64", ("batch_size", "total_sequence_length")),
            TensorSpec("position_ids", "int64", ("batch_size", "sequence_length")),
        )
        + cache("past_key_values", "past_sequence_length"),
        (TensorSpec("logits", "float32", ("batch_size", "sequence_length", V)),)
        + cache("present", "total_sequence_length"),
    )
    return {g.name: g for g in (vision, embed, decoder)}


def weight_dtype(model: PaliGemmaForConditionalGeneration) -> torch.dtype:
    return model.decoder.embed_tokens.weight.dtype


class VisionEncoderGraph(nn.Module):
    def __init__(self, model: PaliGemmaForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.embed_image(pixel_values.to(weight_dtype(self.model))).float()


class EmbedTokensGraph(nn.Module):
    def __init__(self, model: PaliGemmaForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model.decoder.embed(input_ids).float()


def merged_layout(attention_mask: torch.Tensor, num_new: int) -> TokenLayout:
    """The prefix-LM rule for a caller that sends no token types: the first call (no past) is the prompt, image and
    prefix, one bidirectional block; every later token is autoregressive (causal, and windowed on sliding layers).

    Over S = P + T slots, `autoregressive` is all 0 when P = 0 and all 1 otherwise. All 1 gives each later query the
    same row as the prompt's types would (their block ends where the query's begins), as the decode graph does."""
    query_slots = last_slots(attention_mask.shape[1], num_new, attention_mask.device)
    later = (query_slots[:1] > 0).to(attention_mask.dtype)  # [1]: the first new slot is P
    return TokenLayout(attention_mask, later.expand_as(attention_mask), query_slots)


class MergedDecoderGraph(nn.Module):
    def __init__(self, model: PaliGemmaForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        model = self.model
        dtype = weight_dtype(model)
        L = model.config.text.num_hidden_layers
        cache = ConcatCache([(past[2 * i].to(dtype), past[2 * i + 1].to(dtype)) for i in range(L)], L)
        B, T, C = inputs_embeds.shape
        layout = merged_layout(attention_mask, T)
        x = inputs_embeds.to(dtype)
        hidden = model.decode_embeddings(x, layout, position_ids, cache)
        # Two-dimensional, so that the tied output projection exports as one Gemm on the embedding (no copy of it).
        logits = model.decoder.logits(hidden.reshape(B * T, C)).float().reshape(B, T, -1)
        return (logits,) + tuple(t.float() for t in cache.outputs())


def graph_modules(model: PaliGemmaForConditionalGeneration) -> dict[str, nn.Module]:
    return {"vision_encoder": VisionEncoderGraph(model), "embed_tokens": EmbedTokensGraph(model),
            "decoder_model_merged": MergedDecoderGraph(model)}


def example_inputs(config: PaliGemmaConfig) -> dict[str, tuple[torch.Tensor, ...]]:
    """Inputs to trace with: a padded batch of two, with a past (its length and the new tokens' differ)."""
    t = config.text
    B, P, T = 2, 5, 3
    generator = torch.Generator().manual_seed(0)
    attention_mask = torch.ones(B, P + T, dtype=torch.long)
    attention_mask[0, :2] = 0
    past = [torch.randn(B, t.num_key_value_heads, P, t.head_dim, generator=generator)
            for _ in range(2 * t.num_hidden_layers)]
    size = config.image_size
    return {
        "vision_encoder": (torch.rand(B, config.vision.num_channels, size, size, generator=generator) * 2 - 1,),
        "embed_tokens": (torch.randint(3, min(t.vocab_size, 1000), (B, T), generator=generator),),
        "decoder_model_merged": (torch.randn(B, T, t.hidden_size, generator=generator), attention_mask,
                                 attention_mask.cumsum(-1)[:, P:], *past),
    }
