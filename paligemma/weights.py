"""Loading and saving checkpoints: safetensors only, every published key layout, strict checks.

Three layouts occur in the wild and map to this package's module paths (the Hub's own layout):
- the Hub's: `vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`
  (sometimes `language_model.lm_head.weight`);
- transformers 4.52-4.57: `model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`,
  `model.language_model.*`, `lm_head.weight`;
- transformers 5.x: `vision_tower.*` (no inner `vision_model.`), `multi_modal_projector.*`, `language_model.model.*`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import MASK_DECODER_NAME, WEIGHTS_NAME, Checkpoint
from .config import PaliGemmaConfig
from .errors import CheckpointError
from .mask_decoder import MaskDecoder
from .model import PaliGemmaForConditionalGeneration

logger = logging.getLogger(__name__)

# Buffers some exporters saved that are derived, not learned.
DERIVED_BUFFERS = ("vision_tower.vision_model.embeddings.position_ids",)
TIED_HEADS = ("lm_head.weight", "language_model.lm_head.weight")
HEAD_MARK = "\0head:"  # a separate head, read apart from the model's own names
# Longest prefix first: each key is rewritten by the first prefix it starts with.
PREFIX_RENAMES = (
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
)


def canonical_key(key: str) -> str:
    for old, new in PREFIX_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def load_mask_decoder(folder: str | os.PathLike) -> MaskDecoder | None:
    """The checkpoint's mask decoder (MASK_DECODER_NAME in its folder), or None when it ships none."""
    path = Path(folder) / MASK_DECODER_NAME
    return MaskDecoder.from_file(path) if path.exists() else None


def read_tensors(files: list[Path], device: str | torch.device, dtype: torch.dtype,
                 rename: Callable[[str], str | None]) -> tuple[dict, dict]:
    """The tensors of `files` under `rename(key)` (None: not read), floating ones in `dtype`, and the file each came
    from; a name met twice, or a file safetensors cannot read, is a CheckpointError naming it."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    name = rename(key)
                    if name is None:
                        continue
                    if name in state:
                        raise CheckpointError(f"{file}: tensor {key} appears twice (also in {origin[name].name})")
                    tensor = f.get_tensor(key)
                    state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
                    origin[name] = file
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); "
                                  "it may be truncated: download it again") from None
    return state, origin


def read_state_dict(files: list[Path], device: str | torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """Tensors under canonical names, and the file each came from."""
    def rename(key: str) -> str | None:
        if key in DERIVED_BUFFERS or canonical_key(key) in DERIVED_BUFFERS:
            return None
        return HEAD_MARK + key if key in TIED_HEADS else canonical_key(key)  # heads: checked against the embedding

    state, origin = read_tensors(files, device, dtype, rename)
    heads = {name.removeprefix(HEAD_MARK): state.pop(name) for name in list(state) if name.startswith(HEAD_MARK)}
    origin.update({key: origin.pop(HEAD_MARK + key) for key in heads})
    embed = state.get("language_model.model.embed_tokens.weight")
    for key, head in heads.items():
        # PaliGemma ties the output projection to the embedding; a separate head must be that same matrix.
        if embed is None or head.shape != embed.shape or not torch.equal(head, embed):
            raise CheckpointError(
                f"{origin[key]}: {key} differs from the token embedding, but PaliGemma ties them; "
                "this checkpoint is not a PaliGemma one"
            )
    return state, origin


def check_state_dict(model: torch.nn.Module, state: dict, origin: dict, folder: Path) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []

    def listing(keys):
        shown = ", ".join(keys[:8])
        return shown + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    if missing:
        problems.append(f"missing tensors: {listing(missing)}")
    if unexpected:
        files = sorted({origin[k].name for k in unexpected})
        problems.append(f"unexpected tensors in {', '.join(files)}: {listing(unexpected)}")
    wrong = [
        f"{k} in {origin[k].name} has shape {tuple(state[k].shape)}, expected {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    if wrong:
        problems.append("mis-shaped tensors: " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(f"{folder}: the weights do not match config.json: " + " | ".join(problems))


def default_dtype(device: str | torch.device) -> torch.dtype:
    # Half precision is for GPUs; on CPU float32 is both faster and exact.
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(dtype: str | torch.dtype | None, device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype '{dtype}' is not supported; use one of float32, bfloat16, float16")
    return names[dtype]


def load_model(
    source: str | os.PathLike | Checkpoint, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> PaliGemmaForConditionalGeneration:
    """The model of a checkpoint (a Checkpoint, a folder or a Hub repo id), its weights checked strictly."""
    dtype = parse_dtype(dtype, device)
    checkpoint = Checkpoint.resolve(source)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(checkpoint.config)
    state, origin = read_state_dict(list(checkpoint.weight_files), device, dtype)
    check_state_dict(model, state, origin, checkpoint.folder)
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded %s (%s, %s) from %d file(s)", checkpoint.folder, device, dtype, len(checkpoint.weight_files))
    return model.eval()


def save_checkpoint(model: PaliGemmaForConditionalGeneration, directory: str | os.PathLike) -> Path:
    """Write config.json and model.safetensors in the Hub layout, which transformers 4.x and 5.x both read."""
    return save_state(model.config, model.state_dict(), directory, next(model.parameters()).dtype)


def save_state(config: PaliGemmaConfig, state: dict[str, torch.Tensor], directory: str | os.PathLike,
               dtype: torch.dtype) -> Path:
    """save_checkpoint's files for a state dict in this package's names whose weights are in `dtype`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()
    config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory
