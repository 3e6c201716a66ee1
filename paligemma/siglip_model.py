"""The whole SigLIP model: the vision tower with its pooling head, the text tower, and the learned logit scale and
bias; loading SigLIP checkpoints (Hugging Face layout) and the vision tower of PaliGemma ones.

    image_embeddings(pixel_values) [I, C], text_embeddings(input_ids) [T, C]: L2-normalized
    forward(input_ids, pixel_values) -> logits_per_image [I, T] = exp(t') * <x, y> + b
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .checkpoint import WEIGHTS_NAME, resolve_checkpoint, weight_files
from .contrastive import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE
from .errors import CheckpointError, ConfigError, InputError
from .siglip import SiglipTextTransformer, SiglipVisionTransformer
from .siglip_config import SiglipConfig
from .weights import DERIVED_BUFFERS, canonical_key, check_state_dict, parse_dtype, read_tensors

logger = logging.getLogger(__name__)

# Buffers older exporters saved that are derived (arange), not learned.
SIGLIP_DERIVED_BUFFERS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")
PALIGEMMA_TOWER = "vision_tower.vision_model."  # the tower's prefix in a PaliGemma checkpoint (canonical layout)


class NoTextTowerError(CheckpointError):
    """A checkpoint with only a vision tower (any PaliGemma one) asked to embed text."""


class SiglipModel(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionTransformer(config.vision)
        if config.has_text_tower:
            self.text_model = SiglipTextTransformer(config.text)
            # The paper's initialisation (t' = log 10, b = -10); a loaded checkpoint replaces both.
            self.logit_scale = nn.Parameter(torch.tensor([INIT_LOGIT_SCALE]))
            self.logit_bias = nn.Parameter(torch.tensor([INIT_LOGIT_BIAS]))

    @property
    def has_text_tower(self) -> bool:
        return self.config.has_text_tower

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] in [-1, 1] -> the tower's per-patch features [B, N, C] (what PaliGemma reads)."""
        size = self.config.vision.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.vision.num_channels, size, size):
            raise InputError(f"pixel_values must be [batch, {self.config.vision.num_channels}, {size}, {size}], got "
                             f"{tuple(pixel_values.shape)}")
        return self.vision_model(pixel_values)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> L2-normalized image embeddings [B, C]: the pooling head's output; a tower without a head
        (PaliGemma's) gives the mean of its patch features instead (big_vision's "gap" pooling)."""
        features = self.patch_features(pixel_values)
        head = getattr(self.vision_model, "head", None)
        pooled = head(features) if head is not None else features.mean(dim=1)
        return F.normalize(pooled, dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (T <= max_position_embeddings; SigLIP was trained on texts padded to it) ->
        L2-normalized text embeddings [B, C]."""
        text = self.require_text_tower()
        if input_ids.ndim != 2 or not 1 <= input_ids.shape[1] <= text.max_position_embeddings:
            raise InputError(f"input_ids must be [batch, tokens] with at most {text.max_position_embeddings} tokens, "
                             f"got {tuple(input_ids.shape)}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= text.vocab_size):
            raise InputError(f"input_ids must lie in [0, {text.vocab_size}), got {int(input_ids.min())} to "
                             f"{int(input_ids.max())}")
        return F.normalize(self.text_model(input_ids), dim=-1)

    def logits(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Normalized [I, C] and [T, C] -> logits_per_image [I, T], the scale and bias applied."""
        self.require_text_tower()
        return image_embeddings @ text_embeddings.T * self.logit_scale.exp() + self.logit_bias

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.logits(self.image_embeddings(pixel_values), self.text_embeddings(input_ids))

    def require_text_tower(self):
        if not self.has_text_tower:
            raise NoTextTowerError(
                "this checkpoint has no text tower: it is a PaliGemma checkpoint, whose SigLIP vision tower was "
                "kept without SigLIP's text half; comparing images with texts needs a SigLIP checkpoint "
                "(model_type 'siglip', e.g. google/siglip-base-patch16-224)")
        return self.config.text


def read_tower_tensors(files: list[Path], config: SiglipConfig, device, dtype) -> tuple[dict, dict]:
    """The tensors the SigLIP model holds, under its names, and the file each came from. From a PaliGemma
    checkpoint only the vision tower's tensors are read (the decoder and projector are PaliGemma's own)."""
    def rename(key: str) -> str | None:
        if config.source == "paligemma":
            name = canonical_key(key)
            if name in DERIVED_BUFFERS or not name.startswith(PALIGEMMA_TOWER):
                return None
            return "vision_model." + name[len(PALIGEMMA_TOWER):]
        return None if key in SIGLIP_DERIVED_BUFFERS else key

    return read_tensors(files, device, dtype, rename)


def load_siglip(path_or_repo_id: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None) -> SiglipModel:
    """A SigLIP model from a SigLIP checkpoint folder (config.json, *.safetensors), or the vision tower alone from a
    PaliGemma one. Every tensor must be there, with its shape; a SigLIP file without its text tower is named."""
    folder = resolve_checkpoint(path_or_repo_id)
    dtype = parse_dtype(dtype, device)
    try:
        config = SiglipConfig.from_json_file(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = weight_files(folder)
    state, origin = read_tower_tensors(files, config, device, dtype)
    if config.source == "paligemma" and not state:
        raise CheckpointError(f"{folder}: no vision tower tensors ({PALIGEMMA_TOWER}*) in this PaliGemma checkpoint")
    if config.has_text_tower and not any(name.startswith("text_model.") for name in state):
        raise CheckpointError(
            f"{folder}: the text tower is missing: config.json declares a text_config but the weights hold no "
            "text_model.* tensors (a vision-only export?); download the complete SigLIP checkpoint")
    with torch.device("meta"):
        model = SiglipModel(config)
    check_state_dict(model, state, origin, folder)
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded SigLIP %s from %s (%s, %s, %s)", "with its text tower" if config.has_text_tower else
                "vision tower", folder, config.source, device, dtype)
    return model.eval()


def save_siglip(model: SiglipModel, directory: str | os.PathLike) -> Path:
    """config.json and model.safetensors in the Hugging Face SigLIP layout (transformers' SiglipModel reads them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory
