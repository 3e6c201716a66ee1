"""The embedded model's architecture, which the recipe (shapes/train.py) and the contrastive stage
(shapes/contrastive.py) share: its config and the sinusoids its hand initialization uses."""

import math

import torch

WIDTH = 192


def model_config(tokenizer) -> dict:
    vocab = tokenizer.get_vocab_size()
    return {
        "model_type": "paligemma",
        "image_token_index": tokenizer.token_to_id("<image>"),
        "projection_dim": WIDTH,
        "hidden_size": WIDTH,
        "vocab_size": vocab,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "text_config": {
            "model_type": "gemma", "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 48, "vocab_size": vocab,
            "max_position_embeddings": 256, "hidden_act": "gelu_pytorch_tanh",
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH,
            "num_hidden_layers": 4, "num_attention_heads": 4, "patch_size": 14, "image_size": 112,
            "vision_use_head": False, "projection_dim": WIDTH,
        },
    }


def sinusoids(positions: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """[len(positions), dim]: cos and sin of each position at dim / 2 periods spaced geometrically."""
    periods = torch.logspace(math.log10(min_period), math.log10(max_period), dim // 2)
    angles = 2 * math.pi * positions.float()[:, None] / periods[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1) * math.sqrt(2.0 / dim)
