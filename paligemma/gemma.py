"""Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2) decoders.

Axes: B batch, T new tokens, S keys (cached + new), H query heads, K key/value heads, G = H / K queries
per key/value head, D head dim, C width.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import TextConfig
from .siglip import gelu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32; Gemma stores the scale as an offset from 1, hence (1 + w).
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, D] for integer positions [B, T] (half-split layout, as Gemma's checkpoints expect)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KeyValueStore(Protocol):
    """Where a layer puts its new keys and values and reads back all keys and values to attend over."""

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class GemmaAttention(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
        C, H, K, D = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, K * D, bias=False)
        self.v_proj = nn.Linear(C, K * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: KeyValueStore | None = None,
    ) -> torch.Tensor:
        """x [B, T, C]; mask additive [B, 1, 1, T, S]; cache holds the S - T earlier keys and values."""
        B, T, _ = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, D).transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = apply_rope(self.k_proj(x).view(B, T, K, D).transpose(1, 2), cos, sin)  # [B, K, T, D]
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, K, S, D]
        # Grouped-query attention without copying keys: the G queries sharing a key/value head sit together.
        q = q.view(B, K, H // K, T, D)
        scores = (q @ k.unsqueeze(2).transpose(-1, -2)) * self.scale  # [B, K, G, T, S]
        if self.softcap is not None:
            # Gemma 2 bounds attention logits smoothly to (-softcap, softcap).
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = torch.softmax((scores + mask).float(), dim=-1).to(v.dtype)
        out = probs @ v.unsqueeze(2)  # [B, K, G, T, D]
        return self.o_proj(out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D))


class GemmaMLP(nn.Module):
    """GeGLU: down(gelu(gate(x)) * up(x))."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.activation = config.hidden_activation
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.gate_proj(x), self.activation) * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.is_gemma2 = config.is_gemma2
        self.window = config.layer_window(layer)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = GemmaAttention(config, layer)
        # Gemma 1 names its pre-MLP norm post_attention_layernorm; Gemma 2 has a true post-attention norm
        # and adds pre/post feed-forward norms.
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        if self.is_gemma2:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = GemmaMLP(config)

    def forward(self, x, cos, sin, mask, cache=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if not self.is_gemma2:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    """Token embedding, decoder layers, final norm. Key names follow `language_model.model.*`."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.checkpointing = False  # training: recompute each layer in the backward pass instead of keeping its inside

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Gemma scales text embeddings by sqrt(width), rounded to the weights' dtype as the reference does.
        scale = torch.tensor(math.sqrt(self.config.hidden_size), dtype=self.embed_tokens.weight.dtype)
        return self.embed_tokens(input_ids) * scale

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        masks: dict[int | None, torch.Tensor],
        cache: KeyValueStore | None = None,
    ) -> torch.Tensor:
        """x [B, T, C] embeddings; positions [B, T]; masks by window (None = full) -> normed hidden [B, T, C]."""
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.checkpointing and cache is None and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, masks[layer.window], use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[layer.window], cache)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The output projection is tied to the embedding matrix (F.linear reads it as is, with no transposed copy).
        logits = F.linear(hidden, self.embed_tokens.weight)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


class GemmaForCausalLM(nn.Module):
    """Wrapper that gives the checkpoint's `language_model.model.*` key names."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.model = GemmaModel(config)
