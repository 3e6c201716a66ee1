"""A checkpoint folder, resolved once: where it is (a local folder, or a Hub repo id downloaded), its config, its
weight files and their fingerprint, as one frozen object.

Whatever loads or exports a model takes a `Checkpoint`; the functions a user calls with a folder or a Hub repo id
resolve it where they are entered (`Checkpoint.resolve`, which hands a Checkpoint back as it is) and pass the object
down, so that a load reaches the Hub and reads config.json once. Safetensors and JSON only: a folder that holds only
pickles is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable

from .config import PaliGemmaConfig
from .errors import CheckpointError, ConfigError, shown
from .processor import PaliGemmaProcessor

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MASK_DECODER_NAME = "mask_decoder.safetensors"  # a checkpoint that segments ships its mask decoder beside its weights
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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


def weights_fingerprint(files: Iterable[Path], samples: int = 16, chunk: int = 1 << 16) -> str:
    """A fast fingerprint of weight files: names, sizes, safetensors headers and `samples` evenly spaced chunks of
    every file. Two checkpoints with one config (pt and mix, or a fine-tune) fingerprint differently."""
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_length, 1 << 24)))
            for i in range(samples):
                f.seek(size * i // samples)
                digest.update(f.read(chunk))
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A PaliGemma checkpoint folder: config.json read and checked, the weight files listed (none read yet), the mask
    decoder when the folder ships one."""

    folder: Path
    config: PaliGemmaConfig
    weight_files: tuple[Path, ...]
    mask_decoder: Path | None  # MASK_DECODER_NAME in the folder, when it segments

    @classmethod
    def resolve(cls, source: str | os.PathLike | Checkpoint) -> Checkpoint:
        """A folder or a Hub repo id (downloaded with huggingface_hub) as a Checkpoint; a Checkpoint as it is."""
        if isinstance(source, Checkpoint):
            return source
        return cls.read(resolve_checkpoint(source))

    @classmethod
    def read(cls, folder: Path) -> Checkpoint:
        """The local checkpoint `folder`; CheckpointError when its config.json or its weight files are not usable."""
        try:
            config = PaliGemmaConfig.from_json_file(folder / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        decoder = folder / MASK_DECODER_NAME
        return cls(folder, config, tuple(weight_files(folder)), decoder if decoder.is_file() else None)

    @cached_property
    def fingerprint(self) -> str:
        """weights_fingerprint of the weight files and the mask decoder (an export carries it): what an export records
        of its source, computed on first use."""
        return weights_fingerprint(self.weight_files + ((self.mask_decoder,) if self.mask_decoder else ()))

    def processor(self) -> PaliGemmaProcessor:
        """The checkpoint's tokenizer (tokenizer.json) and image preprocessing for its config; a new one per call."""
        return PaliGemmaProcessor.from_pretrained(self.folder, self.config)
