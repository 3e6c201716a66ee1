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

from .config import PaliGemmaConfig
from .errors import CheckpointError, ConfigError, shown
from .mask_decoder import MaskDecoder
from .model import PaliGemmaForConditionalGeneration

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MASK_DECODER_NAME = "mask_decoder.safetensors"  # a checkpoint that segments ships its mask decoder beside its weights
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
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


def resolve_checkpoint(path_or_repo_id: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a Hub repo id downloaded with huggingface_hub (safetensors and JSON only)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json and *.safetensors")
    name = str(path_or_repo_id)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name} is neither a checkpoint folder nor a Hub repo id "
                              "like 'google/paligemma-3b-mix-224'")
    return download_from_hub(name)


def download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "spiece.model"])
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id} is gated: accept its license on huggingface.co, then log in with `hf auth login` "
            "or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id} was not found on the Hub (or it is private and no token was given); check the name, "
            "or set HF_TOKEN"
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached (offline?); "
            "download it on a connected machine or pass a local checkpoint folder"
        ) from None
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise CheckpointError(f"could not download {repo_id} from the Hub ({type(e).__name__}: {e}); "
                              "pass a local checkpoint folder instead") from None
    return Path(folder)


def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.exists():
        files = [folder / name for name in shard_names(index)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing)}; "
                                  "download the complete checkpoint")
        return files
    single = folder / WEIGHTS_NAME
    if single.exists():
        return [single]
    shards = sorted(p for p in folder.glob("*.safetensors") if p.name != MASK_DECODER_NAME)
    if shards:
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}), which are never loaded because unpickling "
            "can run arbitrary code; convert them to safetensors (safetensors.torch.save_file) "
            "or use a safetensors checkpoint"
        )
    raise CheckpointError(f"{folder} holds no *.safetensors weights")


def load_mask_decoder(folder: str | os.PathLike) -> MaskDecoder | None:
    """The checkpoint's mask decoder (MASK_DECODER_NAME in its folder), or None when it ships none."""
    path = Path(folder) / MASK_DECODER_NAME
    return MaskDecoder.from_file(path) if path.exists() else None


def shard_names(index: Path) -> list[str]:
    """The shard files a safetensors index names: plain file names in the checkpoint's own folder, never a path
    that leads out of it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); "
                              "download it again") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map each tensor name to a shard file name")
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name or name in (".", "..") or "\\" in name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index} names the shard {shown(name)}; shards must be *.safetensors files in "
                                  "the checkpoint folder itself, named without a path")
    return names


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
    path_or_repo_id: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> PaliGemmaForConditionalGeneration:
    folder = resolve_checkpoint(path_or_repo_id)
    dtype = parse_dtype(dtype, device)
    try:
        config = PaliGemmaConfig.from_json_file(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = weight_files(folder)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    state, origin = read_state_dict(files, device, dtype)
    check_state_dict(model, state, origin, folder)
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded %s (%s, %s) from %d file(s)", folder, device, dtype, len(files))
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
