"""PaliGemma configuration as frozen dataclasses, read from a Hugging Face config.json.

Fields that a config.json leaves out take the defaults transformers gives them, so a published checkpoint
(whose config lists only what differs from those defaults) builds the same model here as there. Derived
values (head_dim, number of image tokens, which layers slide) are read or computed, never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
SUPPORTED_ACTIVATIONS = GELU_TANH_NAMES + ("gelu",)
TEXT_MODEL_TYPES = ("gemma", "gemma2")


def _require(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where} is missing the required field '{key}'; add it to config.json")
    return d[key]


def _activation(d: dict, where: str, default: str = "gelu_pytorch_tanh") -> str:
    # Gemma 2 names it hidden_activation, Gemma and SigLIP hidden_act; files in the wild carry either.
    name = d.get("hidden_activation") or d.get("hidden_act") or default
    if name not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"{where}: unsupported activation '{name}' (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    return name


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = False  # the pooling head exists in some files but PaliGemma never uses it

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        where = "vision_config"
        return cls(
            hidden_size=_require(d, "hidden_size", where),
            intermediate_size=_require(d, "intermediate_size", where),
            num_hidden_layers=_require(d, "num_hidden_layers", where),
            num_attention_heads=_require(d, "num_attention_heads", where),
            patch_size=d.get("patch_size", 16),
            image_size=d.get("image_size", 224),
            num_channels=d.get("num_channels", 3),
            layer_norm_eps=d.get("layer_norm_eps", 1e-6),
            hidden_act=_activation(d, where),
            vision_use_head=bool(d.get("vision_use_head", True)),
        )


@dataclass(frozen=True)
class TextConfig:
    """Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    # Gemma 2 only; None where the decoder does not have it.
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] = ()

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def attention_scale(self) -> float:
        # Gemma 2 scales queries by query_pre_attn_scalar, not head_dim (they differ in the 9B/27B models).
        scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return scalar**-0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of a layer, or None for full attention."""
        return self.sliding_window if self.layer_types and self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        where = "text_config"
        model_type = d.get("model_type", "gemma")
        if model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(
                f"text_config.model_type '{model_type}' is not supported (supported: {', '.join(TEXT_MODEL_TYPES)})"
            )
        gemma2 = model_type == "gemma2"
        heads = _require(d, "num_attention_heads", where)
        layers = _require(d, "num_hidden_layers", where)
        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{where}: rope_type '{rope['rope_type']}' is not supported (only 'default')")
        layer_types: tuple[str, ...] = ()
        if gemma2:
            # Gemma 2 alternates sliding-window and full attention, starting with a sliding layer.
            default_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
            layer_types = tuple(d.get("layer_types") or default_types)
            if len(layer_types) != layers:
                raise ConfigError(f"{where}: layer_types has {len(layer_types)} entries for {layers} layers")
        return cls(
            model_type=model_type,
            hidden_size=_require(d, "hidden_size", where),
            intermediate_size=_require(d, "intermediate_size", where),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads", heads),
            head_dim=d.get("head_dim") or 256,
            vocab_size=_require(d, "vocab_size", where),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            hidden_activation=_activation(d, where),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256) if gemma2 else None,
            sliding_window=d.get("sliding_window", 4096) if gemma2 else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0) if gemma2 else None,
            final_logit_softcapping=d.get("final_logit_softcapping", 30.0) if gemma2 else None,
            layer_types=layer_types,
        )


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig
    text: TextConfig
    projection_dim: int
    image_token_index: int = 257152
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    torch_dtype: str | None = None
    raw: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def is_paligemma2(self) -> bool:
        return self.text.is_gemma2

    @classmethod
    def from_dict(cls, d: dict) -> "PaliGemmaConfig":
        if d.get("model_type") != "paligemma":
            raise ConfigError(
                f"model_type '{d.get('model_type')}' is not supported: this loads PaliGemma checkpoints "
                "(model_type 'paligemma', PaliGemma 1 and 2)"
            )
        text_dict = _require(d, "text_config", "config.json")
        vision_dict = _require(d, "vision_config", "config.json")
        # PaliGemma 2 configs carry a stale top-level hidden_size (2048): widths come from text_config only.
        text = TextConfig.from_dict(text_dict)
        vision = VisionConfig.from_dict(vision_dict)
        projection_dim = d.get("projection_dim", vision_dict.get("projection_dim", text.hidden_size))
        if projection_dim != text.hidden_size:
            raise ConfigError(
                f"projection_dim {projection_dim} differs from text_config.hidden_size {text.hidden_size}; "
                "the projector must map image features to the decoder width"
            )
        eos = text_dict.get("eos_token_id", d.get("eos_token_id", 1))
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        image_token = d.get("image_token_index", d.get("image_token_id", 257152))
        if not 0 <= image_token < text.vocab_size:
            raise ConfigError(f"image_token_index {image_token} is outside the vocabulary of {text.vocab_size}")
        return cls(
            vision=vision,
            text=text,
            projection_dim=projection_dim,
            image_token_index=image_token,
            pad_token_id=d.get("pad_token_id", text_dict.get("pad_token_id", 0)) or 0,
            bos_token_id=d.get("bos_token_id", text_dict.get("bos_token_id", 2)),
            eos_token_ids=eos_ids,
            torch_dtype=d.get("torch_dtype") or d.get("dtype") or text_dict.get("torch_dtype") or text_dict.get("dtype"),
            raw=d,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "PaliGemmaConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: a checkpoint folder needs a config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download or fix the file") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """A config.json in the layout transformers 5 writes, readable by transformers and by this loader."""
        t, v = self.text, self.vision
        text = dict(
            model_type=t.model_type, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, vocab_size=t.vocab_size,
            rms_norm_eps=t.rms_norm_eps, rope_parameters=dict(rope_theta=t.rope_theta, rope_type="default"),
            max_position_embeddings=t.max_position_embeddings, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            tie_word_embeddings=True,
        )
        text["hidden_activation" if t.is_gemma2 else "hidden_act"] = t.hidden_activation
        if t.is_gemma2:
            text.update(
                query_pre_attn_scalar=t.query_pre_attn_scalar, sliding_window=t.sliding_window,
                attn_logit_softcapping=t.attn_logit_softcapping, final_logit_softcapping=t.final_logit_softcapping,
                layer_types=list(t.layer_types),
            )
        vision = dict(
            model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
            patch_size=v.patch_size, image_size=v.image_size, num_channels=v.num_channels,
            layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act, vision_use_head=v.vision_use_head,
            projection_dim=self.projection_dim,
        )
        return dict(
            architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
            image_token_index=self.image_token_index, projection_dim=self.projection_dim,
            hidden_size=self.projection_dim, vocab_size=t.vocab_size, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id, eos_token_id=text["eos_token_id"], tie_word_embeddings=True,
            text_config=text, vision_config=vision,
        )
