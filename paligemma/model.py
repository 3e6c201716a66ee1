"""PaliGemma: SigLIP image features, projected to the decoder width, placed where the `<image>` tokens are,
then a Gemma decoder with prefix-LM attention (the rule in masks.py).

Axes: B batch, T new tokens, S keys (cached + new), N image tokens, C decoder width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PaliGemmaConfig
from .gemma import GemmaForCausalLM, KeyValueStore
from .masks import TokenLayout, additive
from .siglip import SiglipVisionModel


class PaliGemmaMultiModalProjector(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision.hidden_size, config.projection_dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


class PaliGemmaForConditionalGeneration(nn.Module):
    """Module paths are the published checkpoints' key names (`vision_tower.vision_model.*`,
    `multi_modal_projector.linear.*`, `language_model.model.*`); the lm_head is the tied embedding."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision)
        self.multi_modal_projector = PaliGemmaMultiModalProjector(config)
        self.language_model = GemmaForCausalLM(config.text)

    @property
    def decoder(self):
        return self.language_model.model

    @property
    def windows(self) -> set[int | None]:
        return {layer.window for layer in self.decoder.layers}

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> image embeddings [B, N, C], ready to stand in for the `<image>` tokens."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: torch.Tensor, image_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, C], with the i-th `<image>` token of a row replaced by its i-th image embedding."""
        text = self.decoder.embed(input_ids)
        if image_embeddings is None:
            return text
        is_image = input_ids == self.config.image_token_index
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            counts = is_image.sum(-1)
            if (counts != image_embeddings.shape[1]).any():
                raise ValueError(
                    f"each row must hold exactly {image_embeddings.shape[1]} <image> tokens, found {counts.tolist()}; "
                    "build inputs with the processor"
                )
        index = (is_image.long().cumsum(-1) - 1).clamp(min=0)  # which image embedding each token would take
        image = image_embeddings.to(text.dtype).gather(1, index[..., None].expand(-1, -1, text.shape[-1]))
        return torch.where(is_image[..., None], image, text)

    def forward(self, input_ids: torch.Tensor, *inputs, last_only: bool = False, **named_inputs) -> torch.Tensor:
        """Logits [B, T, V] for input_ids [B, T], from `hidden_states` with the same inputs. `last_only` returns the
        last position's logits only ([B, 1, V]), all that generation needs."""
        hidden = self.hidden_states(input_ids, *inputs, **named_inputs)
        return self.decoder.logits(hidden[:, -1:] if last_only else hidden)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        image_embeddings: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KeyValueStore | None = None,
    ) -> torch.Tensor:
        """The decoder's final normed hidden states [B, T, C] for input_ids [B, T] (what `forward` turns into logits;
        training projects only the positions that have labels).

        attention_mask and token_type_ids cover the cached tokens and the new ones ([B, S]); token_type_ids 0
        marks the prefix (full attention), 1 the suffix (causal); None means all prefix. Without a cache S = T."""
        B, T = input_ids.shape
        if pixel_values is not None:
            if image_embeddings is not None:
                raise ValueError("pass pixel_values or image_embeddings, not both")
            image_embeddings = self.embed_image(pixel_values)
        S = (cache.length if cache is not None else 0) + T
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, S, dtype=torch.long, device=input_ids.device)
        layout = TokenLayout.last(attention_mask, token_type_ids, T)
        return self.run_decoder(input_ids, image_embeddings, layout, positions, cache)

    def run_decoder(
        self,
        input_ids: torch.Tensor,
        image_embeddings: torch.Tensor | None,
        layout: TokenLayout,
        positions: torch.Tensor | None = None,
        cache: KeyValueStore | None = None,
    ) -> torch.Tensor:
        """Embed -> masks -> decoder, the one place they are put together (every path runs through here: this
        model's forward, the exported graphs, the static-cache engine, packed training rows). input_ids [B, T];
        `layout` describes the S keys for the rule in masks.py; positions [B, T] default to the layout's."""
        return self.decode_embeddings(self.embed(input_ids, image_embeddings), layout, positions, cache)

    def decode_embeddings(self, x: torch.Tensor, layout: TokenLayout, positions: torch.Tensor | None = None,
                          cache: KeyValueStore | None = None) -> torch.Tensor:
        """Masks -> decoder for embeddings x [B, T, C] already on the decoder's scale (run_decoder's second half;
        the transformers.js layout, whose embeddings come from a graph of their own, starts here)."""
        masks = {window: additive(layout.allowed(window), x.dtype) for window in self.windows}
        if positions is None:
            positions = layout.positions()
        return self.decoder(x, positions, masks, cache)
