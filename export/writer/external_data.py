"""One external data file for several graphs, written in place, one tensor (or block of rows) at a time.

Each distinct tensor (by content) is written once, at a page-aligned offset (runtimes can map the file); a tensor
whose bytes turn out to be already there is cut off again, its name kept as an alias of the same bytes (so that
every parameter keeps its own name in the graphs). Graphs reference it by name, offset and length.
`table`: name -> offset, length, ONNX data type, shape (the manifest's `shared_data`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch

ALIGNMENT = 4096


def numpy_view(block: torch.Tensor) -> np.ndarray:
    """The block's bytes as numpy sees them (bfloat16, which numpy lacks, never reaches here: it is converted)."""
    return block.contiguous().numpy()


class ExternalData:
    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.table: dict[str, dict] = {}
        self.by_content: dict[bytes, str] = {}

    def write(self, name: str, blocks: Iterable[torch.Tensor | np.ndarray], shape: list[int]) -> str:
        """Writes the tensor given as blocks of rows; returns the name it is stored under (an earlier tensor's
        when the bytes are the same)."""
        end = self.file.tell()
        self.file.write(b"\0" * (-end % ALIGNMENT))
        offset = self.file.tell()
        digest = hashlib.blake2b(digest_size=32)
        data_type = None
        for block in blocks:
            array = numpy_view(block) if isinstance(block, torch.Tensor) else np.ascontiguousarray(block)
            data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            digest.update(array.data)
            self.file.write(array.data)
        length = self.file.tell() - offset
        key = digest.digest() + f"{data_type}{shape}".encode()
        if key in self.by_content:  # the same bytes are stored already: cut this copy off, keep the name
            self.file.seek(end)
            self.file.truncate()
            return self.alias(name, self.by_content[key], shape)
        while name in self.table:  # a different tensor under the same name
            name += "_"
        self.table[name] = dict(offset=offset, length=length, data_type=data_type, shape=list(shape))
        self.by_content[key] = name
        return name

    def write_transposed(self, name: str, row_blocks: Iterable[np.ndarray], shape: list[int]) -> str:
        """Writes the [K, N] transpose of an [N, K] matrix given as consecutive blocks of its rows: each block lands
        as a strip of columns through a memory map of the region (allocated first), unmapped after each strip, so
        neither the matrix nor its transpose is ever held (how MatMulInteger's B is stored). Not deduplicated:
        these are quantized matrices, each written once."""
        end = self.file.tell()
        self.file.write(b"\0" * (-end % ALIGNMENT))
        offset = self.file.tell()
        K, N = shape
        row, data_type = 0, None
        for block in row_blocks:
            if data_type is None:
                data_type = onnx.helper.np_dtype_to_tensor_dtype(block.dtype)
                length = K * N * block.dtype.itemsize
                self.file.flush()
                # allocated now: a full disk is an OSError here, not a SIGBUS when the map is written
                os.posix_fallocate(self.file.fileno(), offset, length)
            region = np.memmap(self.path, dtype=block.dtype, mode="r+", offset=offset, shape=(K, N))
            region[:, row : row + len(block)] = block.T
            region.flush()
            del region
            row += len(block)
        if row != N:
            raise ValueError(f"{name}: {row} rows written where its transpose has {N} columns")
        self.file.seek(offset + length)
        while name in self.table:
            name += "_"
        self.table[name] = dict(offset=offset, length=length, data_type=data_type, shape=list(shape))
        return name

    def alias(self, name: str, stored: str, shape: list[int]) -> str:
        """Another name for the stored tensor `stored`, read with another shape of the same size: two views of
        one set of bytes (an int4 embedding's scales, as MatMulNBits and GatherBlockQuantized each want them)."""
        entry = self.table[stored]
        if int(np.prod(shape)) != int(np.prod(entry["shape"])):
            raise ValueError(f"{name}: shape {shape} does not hold the {entry['shape']} of {stored}")
        while name in self.table:
            name += "_"
        self.table[name] = dict(entry, shape=list(shape))
        return name

    def initializer(self, name: str) -> onnx.TensorProto:
        """A graph initializer referencing the stored tensor `name`."""
        entry = self.table[name]
        tensor = onnx.TensorProto(name=name, data_type=entry["data_type"], dims=entry["shape"])
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", entry["offset"]), ("length", entry["length"])):
            tensor.external_data.add(key=key, value=str(value))
        return tensor

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "ExternalData":
        return self

    def __exit__(self, *_) -> None:
        self.close()
