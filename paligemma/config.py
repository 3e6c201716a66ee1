"""PaliGemma configuration as frozen dataclasses, read from a Hugging Face config.json.

Fields that a config.json leaves out take the defaults transformers gives them, so a published checkpoint
(whose config lists only what differs from those defaults) builds the same model here as there. Derived
values (head_dim, number of image tokens, which layers slide) are read or computed, never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, shown

GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
SUPPORTED_ACTIVATIONS = GELU_TANH_NAMES + ("gelu",)
TEXT_MODEL_TYPES = ("gemma", "gemma2")


# Upper bounds on sizes, each several times what the largest published PaliGemma uses (PaliGemma 2 28B at 896 px:
# 46 decoder layers of width 4608, 27 vision layers, 4096 image tokens). Past them a config is taken for a mistake
# rather than building modules for minutes.
MAX_LAYERS = 512
MAX_WIDTH = 65_536
MAX_HEADS = 1024
MAX_VOCAB = 4_000_000
MAX_IMAGE_SIZE = 8192
MAX_IMAGE_TOKENS = 65_536
MAX_POSITIONS = 1 << 24
MAX_CONFIG_BYTES = 1 << 20
REQUIRED = object()


def _require(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where} is missing the required field '{key}'; add it to config.json")
    return d[key]


def _field(d: dict, key: str, where: str, default):
    """d[key], or `default` where the file leaves it out or null; a required field (no default) must be there."""
    if d.get(key) is None:
        return _require(d, key, where) if default is REQUIRED else default
    return d[key]


def _mapping(d: dict, key: str, where: str, default=REQUIRED) -> dict:
    value = _field(d, key, where, default)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{key} must be a JSON object, got {shown(value)}")
    return value


def _int(d: dict, key: str, where: str, low: int, high: int, default=REQUIRED) -> int | None:
    """A whole-number field within [low, high] (a float with no fraction, as some exporters write, is accepted)."""
    value = _field(d, key, where, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key} must be a whole number, got {shown(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{where}.{key}={shown(value)} is out of range: allowed {low} to {high:,}")
    return value


def _float(d: dict, key: str, where: str, default=REQUIRED, positive: bool = True) -> float:
    value = _field(d, key, where, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key} must be a finite number, got {shown(value)}")
    if positive and value <= 0:
        raise ConfigError(f"{where}.{key}={value!r} must be positive")
    return float(value)


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
        config = cls(
            hidden_size=_int(d, "hidden_size", where, 1, MAX_WIDTH),
            intermediate_size=_int(d, "intermediate_size", where, 1, MAX_WIDTH),
            num_hidden_layers=_int(d, "num_hidden_layers", where, 1, MAX_LAYERS),
            num_attention_heads=_int(d, "num_attention_heads", where, 1, MAX_HEADS),
            patch_size=_int(d, "patch_size", where, 1, MAX_IMAGE_SIZE, 16),
            image_size=_int(d, "image_size", where, 1, MAX_IMAGE_SIZE, 224),
            num_channels=_int(d, "num_channels", where, 1, 4, 3),
            layer_norm_eps=_float(d, "layer_norm_eps", where, 1e-6),
            hidden_act=_activation(d, where),
            vision_use_head=bool(d.get("vision_use_head", True)),
        )
        if config.hidden_size % config.num_attention_heads:
            raise ConfigError(f"{where}: hidden_size {config.hidden_size} is not divisible by num_attention_heads "
                              f"{config.num_attention_heads}")
        if config.patch_size > config.image_size or not 1 <= config.num_patches <= MAX_IMAGE_TOKENS:
            raise ConfigError(f"{where}: image_size {config.image_size} with patch_size {config.patch_size} gives "
                              f"{config.num_patches} image tokens; allowed 1 to {MAX_IMAGE_TOKENS:,}")
        return config


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
        heads = _int(d, "num_attention_heads", where, 1, MAX_HEADS)
        layers = _int(d, "num_hidden_layers", where, 1, MAX_LAYERS)
        kv_heads = _int(d, "num_key_value_heads", where, 1, heads, heads)
        if heads % kv_heads:
            raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
        rope = _mapping(d, "rope_parameters", where, {})
        rope_theta = _float(rope, "rope_theta", f"{where}.rope_parameters", d.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{where}: rope_type '{rope['rope_type']}' is not supported (only 'default')")
        layer_types: tuple[str, ...] = ()
        if gemma2:
            # Gemma 2 alternates sliding-window and full attention, starting with a sliding layer.
            default_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
            layer_types = d.get("layer_types") or default_types
            kinds = ("sliding_attention", "full_attention")
            if not isinstance(layer_types, list) or any(kind not in kinds for kind in layer_types):
                raise ConfigError(f"{where}.layer_types must be a list of {' or '.join(kinds)}, "
                                  f"got {shown(layer_types)}")
            layer_types = tuple(layer_types)
            if len(layer_types) != layers:
                raise ConfigError(f"{where}: layer_types has {len(layer_types)} entries for {layers} layers")
        return cls(
            model_type=model_type,
            hidden_size=_int(d, "hidden_size", where, 1, MAX_WIDTH),
            intermediate_size=_int(d, "intermediate_size", where, 1, 4 * MAX_WIDTH),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=_int(d, "head_dim", where, 1, MAX_WIDTH, None) or 256,
            vocab_size=_int(d, "vocab_size", where, 1, MAX_VOCAB),
            rms_norm_eps=_float(d, "rms_norm_eps", where, 1e-6),
            rope_theta=rope_theta,
            hidden_activation=_activation(d, where),
            max_position_embeddings=_int(d, "max_position_embeddings", where, 1, MAX_POSITIONS, 8192),
            query_pre_attn_scalar=_int(d, "query_pre_attn_scalar", where, 1, MAX_WIDTH, 256) if gemma2 else None,
            sliding_window=_int(d, "sliding_window", where, 1, MAX_POSITIONS, 4096) if gemma2 else None,
            attn_logit_softcapping=_float(d, "attn_logit_softcapping", where, 50.0) if gemma2 else None,
            final_logit_softcapping=_float(d, "final_logit_softcapping", where, 30.0) if gemma2 else None,
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
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got a {type(d).__name__}")
        if d.get("model_type") != "paligemma":
            raise ConfigError(
                f"model_type '{d.get('model_type')}' is not supported: this loads PaliGemma checkpoints "
                "(model_type 'paligemma', PaliGemma 1 and 2)"
            )
        text_dict = _mapping(d, "text_config", "config.json")
        vision_dict = _mapping(d, "vision_config", "config.json")
        # PaliGemma 2 configs carry a stale top-level hidden_size (2048): widths come from text_config only.
        text = TextConfig.from_dict(text_dict)
        vision = VisionConfig.from_dict(vision_dict)
        projection_dim = d.get("projection_dim", vision_dict.get("projection_dim", text.hidden_size))
        if projection_dim != text.hidden_size:
            raise ConfigError(
                f"projection_dim {projection_dim} differs from text_config.hidden_size {text.hidden_size}; "
                "the projector must map image features to the decoder width"
            )
        def token(name, value):
            return _int({name: value}, name, "config.json", 0, text.vocab_size - 1)

        eos = text_dict.get("eos_token_id", d.get("eos_token_id", 1))
        eos_ids = tuple(token("eos_token_id", e) for e in (eos if isinstance(eos, list) else [eos]))
        if not eos_ids:
            raise ConfigError("config.json: eos_token_id is an empty list; give the end-of-sequence token id")
        image_token = token("image_token_index", d.get("image_token_index", d.get("image_token_id", 257152)))
        return cls(
            vision=vision,
            text=text,
            projection_dim=projection_dim,
            image_token_index=image_token,
            pad_token_id=token("pad_token_id", d.get("pad_token_id", text_dict.get("pad_token_id", 0)) or 0),
            bos_token_id=token("bos_token_id", d.get("bos_token_id", text_dict.get("bos_token_id", 2))),
            eos_token_ids=eos_ids,
            torch_dtype=(d.get("torch_dtype") or d.get("dtype")
                         or text_dict.get("torch_dtype") or text_dict.get("dtype")),
            raw=d,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "PaliGemmaConfig":
        path = Path(path)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(f"{path} {what}: a checkpoint folder needs a config.json file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {path.stat().st_size:,} bytes; a config.json is a few kilobytes: "
                              "is it the right file?")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text; re-download or fix the file") from None
        except (json.JSONDecodeError, RecursionError) as e:
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
