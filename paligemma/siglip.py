"""SigLIP's towers, sharing one pre-norm transformer layer.

Vision: patches -> learned positions -> encoder -> post-norm [-> attention-pooling head].
Text: tokens -> learned positions -> encoder (bidirectional) -> final norm -> Linear head on the last token.
PaliGemma uses the vision tower's per-patch features, without the head; the whole SigLIP model is siglip_model.py.

Axes: B batch, N patches (or T tokens), C width, H heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import GELU_TANH_NAMES, VisionConfig
from .siglip_config import SiglipTextConfig

# The layers read only the fields both configs share (widths, heads, layers, activation, LayerNorm eps).
TowerConfig = VisionConfig | SiglipTextConfig


def gelu(x: torch.Tensor, name: str) -> torch.Tensor:
    # PaliGemma's towers use the tanh approximation of GELU; plain "gelu" is the exact one.
    return F.gelu(x, approximate="tanh" if name in GELU_TANH_NAMES else "none")


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, N, C], row-major over the grid
        return patches + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, config: TowerConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.num_heads, -1).transpose(1, 2)  # [B, N, C] -> [B, H, N, D]

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class SiglipMLP(nn.Module):
    def __init__(self, config: TowerConfig):
        super().__init__()
        self.activation = config.hidden_act
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(x), self.activation))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: TowerConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: TowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.checkpointing = False  # training: recompute each layer in the backward pass instead of keeping its inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            recompute = self.checkpointing and torch.is_grad_enabled()
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        return x


class SiglipPoolingHead(nn.Module):
    """SigLIP's attention-pooling head (vision_use_head): a learned probe attends over the patches, then a residual
    MLP; its output is the image embedding. PaliGemma reads the per-patch features and never runs it."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [B, N, C] -> pooled [B, C]."""
        probe = self.probe.expand(patches.shape[0], -1, -1)
        pooled = self.attention(probe, patches, patches, need_weights=False)[0]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.vision_use_head:
            self.head = SiglipPoolingHead(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] in [-1, 1] -> patch features [B, N, C]."""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class SiglipVisionModel(nn.Module):
    """Wrapper that gives the checkpoint's `vision_tower.vision_model.*` key names."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)


class SiglipTextEmbeddings(nn.Module):
    def __init__(self, config: SiglipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class SiglipTextTransformer(nn.Module):
    """Attribute names are the checkpoint's `text_model.*` keys."""

    def __init__(self, config: SiglipTextConfig):
        super().__init__()
        self.embeddings = SiglipTextEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.embedding_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T], padded to the model's length -> text features [B, C]."""
        states = self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
        # SigLIP pools the last position, which is padding for short texts: it was trained so (no attention mask).
        return self.head(states[:, -1])
