"""A safetensors checkpoint read one tensor (or one block of rows) at a time, converted to the export's dtype.

The file is read with plain reads, not memory-mapped: mapped pages that have been touched count in the process's
resident memory until the file is unmapped, so a mapped 12 GB checkpoint costs 12 GB however little is kept.
Reads leave the bytes in the page cache, which the kernel reclaims as needed. Every name, shape and the size each
header promises are checked before anything is read, and a short read (a shard truncated while the export runs)
is an error naming the shard.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from paligemma.checkpoint import Checkpoint
from paligemma.errors import CheckpointError
from paligemma.weights import DERIVED_BUFFERS, TIED_HEADS, canonical_key, check_state_dict

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
BLOCK_BYTES = 16 << 20  # rows are read and converted in blocks of about this size
REDOWNLOAD = "download it again"


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int

    @property
    def row_bytes(self) -> int:
        return (self.end - self.start) // max(1, self.shape[0] if self.shape else 1)


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file declares, checked against the file's size."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= size - 8:
                raise ValueError(f"a header of {length} bytes in a {size}-byte file")
            header = json.loads(f.read(length))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); it may be truncated: "
                              f"{REDOWNLOAD}") from None
    base = 8 + length
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {key} has the unsupported dtype {entry.get('dtype')}")
        begin, end = entry["data_offsets"]
        tensors[key] = StoredTensor(file, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                    base + begin, base + end)
    end = max((t.end for t in tensors.values()), default=base)
    if end > size:
        raise CheckpointError(f"{file} is truncated: {size} bytes where its header needs {end}; {REDOWNLOAD}")
    return tensors


class CheckpointStream:
    """The checkpoint's tensors under the model's parameter names (the canonical layout), read on demand."""

    def __init__(self, checkpoint: Checkpoint):
        self.folder = checkpoint.folder
        self.tensors: dict[str, StoredTensor] = {}
        self.heads: dict[str, StoredTensor] = {}
        for file in checkpoint.weight_files:
            for key, tensor in read_header(file).items():
                if key in DERIVED_BUFFERS or canonical_key(key) in DERIVED_BUFFERS:
                    continue
                if key in TIED_HEADS:
                    self.heads[key] = tensor
                    continue
                name = canonical_key(key)
                if name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {key} appears twice "
                                          f"(also in {self.tensors[name].file.name})")
                self.tensors[name] = tensor

    def check_against(self, model: torch.nn.Module) -> None:
        """The strict check load_model makes (names and shapes), on the headers alone; and the tied head, if a
        checkpoint stores one, must be the embedding."""
        state = {name: torch.empty(t.shape, device="meta") for name, t in self.tensors.items()}
        check_state_dict(model, state, {name: t.file for name, t in self.tensors.items()}, self.folder)
        embed_name = "language_model.model.embed_tokens.weight"
        for key, head in self.heads.items():
            embed = self.tensors[embed_name]
            same = head.shape == embed.shape and all(
                torch.equal(a, b) for a, b in zip(self.blocks(key, None, head), self.blocks(embed_name, None)))
            if not same:
                raise CheckpointError(f"{head.file}: {key} differs from the token embedding, but PaliGemma ties them; "
                                      "this checkpoint is not a PaliGemma one")

    def nbytes(self, name: str, dtype: torch.dtype) -> int:
        tensor = self.tensors[name]
        itemsize = dtype.itemsize if tensor.dtype.is_floating_point else tensor.dtype.itemsize
        return math.prod(tensor.shape) * itemsize

    def blocks(self, name: str, dtype: torch.dtype | None,
               tensor: StoredTensor | None = None) -> Iterator[torch.Tensor]:
        """The tensor as consecutive blocks of rows, each converted to `dtype` (floating-point tensors only; None
        keeps the stored type). The blocks share one buffer: each is valid until the next is read."""
        tensor = tensor or self.tensors[name]
        rows = tensor.shape[0] if tensor.shape else 1
        per_block = min(rows, max(1, BLOCK_BYTES // max(1, tensor.row_bytes)))
        raw = torch.empty(per_block * tensor.row_bytes, dtype=torch.uint8)
        convert = dtype is not None and tensor.dtype.is_floating_point and tensor.dtype != dtype
        converted = torch.empty((per_block, *tensor.shape[1:]), dtype=dtype) if convert else None
        with open(tensor.file, "rb") as f:
            f.seek(tensor.start)
            for first in range(0, rows, per_block):
                count = min(per_block, rows - first)
                chunk = raw[: count * tensor.row_bytes]
                if f.readinto(chunk.numpy()) != chunk.numel():
                    raise CheckpointError(f"{tensor.file} ended inside tensor {name}: the shard was truncated or "
                                          f"replaced while it was read; {REDOWNLOAD}")
                block = chunk.view(tensor.dtype).reshape((count, *tensor.shape[1:]) if tensor.shape else ())
                yield converted[:count].copy_(block) if convert else block

    def read(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """The whole tensor, filled block by block."""
        stored = self.tensors[name]
        whole = None
        row = 0
        for block in self.blocks(name, dtype):
            if whole is None:
                whole = torch.empty(stored.shape, dtype=block.dtype)
            block = block.reshape(-1, *stored.shape[1:])
            whole.view(-1, *stored.shape[1:])[row : row + len(block)] = block
            row += len(block)
        return whole
