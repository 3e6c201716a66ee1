"""SigLIP (the whole contrastive model) configuration as frozen dataclasses, read from a Hugging Face config.json.

A SigLIP checkpoint (model_type "siglip") has a text and a vision config; a PaliGemma checkpoint (model_type
"paligemma") gives only its vision tower, so `text` is None there. Defaults are transformers' SiglipTextConfig ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import (
    MAX_CONFIG_BYTES,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    VisionConfig,
    _activation,
    _float,
    _int,
    _mapping,
)
from .errors import ConfigError

SIGLIP_MODEL_TYPES = ("siglip", "paligemma")
# transformers' SiglipVisionConfig defaults (google/siglip-base-patch16-224's sizes), which published SigLIP
# config.json files leave out; PaliGemma files always spell them.
SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              patch_size=16, image_size=224)


@dataclass(frozen=True)
class SiglipTextConfig:
    """SigLIP's text tower. Its layers are the vision tower's (same field names), run bidirectionally."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int = 64  # texts are padded to this length, as SigLIP was trained
    projection_size: int | None = None  # the head's output width; None means hidden_size
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    pad_token_id: int = 1
    eos_token_id: int = 1

    @property
    def embedding_size(self) -> int:
        return self.projection_size if self.projection_size is not None else self.hidden_size

    @classmethod
    def from_dict(cls, d: dict) -> "SiglipTextConfig":
        where = "text_config"
        vocab = _int(d, "vocab_size", where, 1, MAX_VOCAB, 32000)
        config = cls(
            hidden_size=_int(d, "hidden_size", where, 1, MAX_WIDTH, 768),
            intermediate_size=_int(d, "intermediate_size", where, 1, 4 * MAX_WIDTH, 3072),
            num_hidden_layers=_int(d, "num_hidden_layers", where, 1, MAX_LAYERS, 12),
            num_attention_heads=_int(d, "num_attention_heads", where, 1, MAX_HEADS, 12),
            vocab_size=vocab,
            max_position_embeddings=_int(d, "max_position_embeddings", where, 1, MAX_POSITIONS, 64),
            projection_size=_int(d, "projection_size", where, 1, MAX_WIDTH, None),
            layer_norm_eps=_float(d, "layer_norm_eps", where, 1e-6),
            hidden_act=_activation(d, where),
            pad_token_id=_int(d, "pad_token_id", where, 0, vocab - 1, min(1, vocab - 1)),
            # transformers' default eos (49407) lies outside small vocabularies; the tokenizer's own eos is used
            # when encoding, this one only where no tokenizer says otherwise.
            eos_token_id=_int(d, "eos_token_id", where, 0, MAX_VOCAB, 1),
        )
        if config.hidden_size % config.num_attention_heads:
            raise ConfigError(f"{where}: hidden_size {config.hidden_size} is not divisible by num_attention_heads "
                              f"{config.num_attention_heads}")
        return config


@dataclass(frozen=True)
class SiglipConfig:
    """The vision tower (with its pooling head where vision_use_head), and the text tower where there is one."""

    vision: VisionConfig
    text: SiglipTextConfig | None
    source: str = "siglip"  # "siglip" or "paligemma": which kind of checkpoint the towers come from

    @property
    def has_text_tower(self) -> bool:
        return self.text is not None

    @classmethod
    def from_dict(cls, d: dict) -> "SiglipConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got a {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SIGLIP_MODEL_TYPES:
            raise ConfigError(f"model_type '{model_type}' is not supported here: load_siglip reads SigLIP checkpoints "
                              "(model_type 'siglip') and the vision tower of PaliGemma ones (model_type 'paligemma')")
        vision_dict = _mapping(d, "vision_config", "config.json")
        if model_type == "paligemma":
            return cls(vision=VisionConfig.from_dict(vision_dict), text=None, source="paligemma")
        given = {key: value for key, value in vision_dict.items() if value is not None}
        vision = VisionConfig.from_dict({**SIGLIP_VISION_DEFAULTS, **given})
        if not vision.vision_use_head:
            raise ConfigError("vision_config.vision_use_head is false: a SigLIP model needs its vision pooling head to "
                              "compare images with texts")
        text = SiglipTextConfig.from_dict(_mapping(d, "text_config", "config.json"))
        if text.embedding_size != vision.hidden_size:
            raise ConfigError(f"text_config.projection_size {text.embedding_size} differs from "
                              "vision_config.hidden_size "
                              f"{vision.hidden_size}; image and text embeddings must have the same width")
        return cls(vision=vision, text=text)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "SiglipConfig":
        path = Path(path)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(f"{path} {what}: a checkpoint folder needs a config.json file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {path.stat().st_size:,} bytes; a config.json is a few kilobytes")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{path} is not valid JSON text ({type(e).__name__}); "
                              "re-download or fix the file") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """A config.json that transformers' SiglipModel and this loader both read (SigLIP configs only)."""
        if self.text is None:
            raise ConfigError("a config without a text tower is a PaliGemma one; save the PaliGemma checkpoint instead")
        v, t = self.vision, self.text
        vision = dict(model_type="siglip_vision_model", hidden_size=v.hidden_size,
                      intermediate_size=v.intermediate_size,
                      num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                      patch_size=v.patch_size, image_size=v.image_size, num_channels=v.num_channels,
                      layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act, vision_use_head=True)
        text = dict(model_type="siglip_text_model", hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                    num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                    vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings,
                    projection_size=t.embedding_size, layer_norm_eps=t.layer_norm_eps, hidden_act=t.hidden_act,
                    pad_token_id=t.pad_token_id, eos_token_id=t.eos_token_id)
        return dict(architectures=["SiglipModel"], model_type="siglip", text_config=text, vision_config=vision)
