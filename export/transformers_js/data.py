"""External data as transformers.js loads it: `NAME.onnx_data`, then `NAME.onnx_data_1`, `NAME.onnx_data_2`, ...

Node's readFile and a browser's fetch refuse single files over 2 GiB, so a graph's weights are cut into chunks of at
most `chunk_bytes`, whole tensors only (a tensor never spans two files: ONNX Runtime reads each from one location).
Each chunk is an ExternalData file (export/writer/external_data.py: page-aligned, equal tensors stored once per
chunk), so WeightWriter.attach writes into it exactly as into the default export's data file.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch

from paligemma.errors import OnnxExportError

from ..writer.external_data import ALIGNMENT, ExternalData

CHUNK_BYTES = 2_000_000_000  # under 2 GiB (2_147_483_647), Node's and the browsers' limit for one file


def chunk_name(graph_file: str, index: int) -> str:
    return f"{graph_file}_data" + ("" if index == 0 else f"_{index}")


def peek(blocks: Iterable) -> tuple:
    """The first block, and all the blocks again."""
    blocks = iter(blocks)
    first = next(blocks)
    return first, itertools.chain([first], blocks)


class ChunkedExternalData:
    """The data files of one graph file `graph_file` (e.g. decoder_model_merged_fp16.onnx) in `folder`."""

    def __init__(self, folder: Path, graph_file: str, chunk_bytes: int = CHUNK_BYTES):
        self.folder = Path(folder)
        self.graph_file = graph_file
        self.chunk_bytes = chunk_bytes
        self.chunks: list[ExternalData] = []
        self.holder: dict[str, ExternalData] = {}  # stored name -> its chunk

    @property
    def count(self) -> int:
        return len(self.chunks)

    @property
    def files(self) -> list[str]:
        return [chunk.path.name for chunk in self.chunks]

    def write(self, name: str, blocks: Iterable[torch.Tensor | np.ndarray], shape: list[int]) -> str:
        first, blocks = peek(blocks)
        stored = self.chunk_for(name, shape, first).write(name, blocks, shape)
        self.holder[stored] = self.chunks[-1]
        return stored

    def write_transposed(self, name: str, row_blocks: Iterable[np.ndarray], shape: list[int]) -> str:
        """ExternalData.write_transposed (int8 weights, as MatMulInteger's B) into the chunk that holds it."""
        first, row_blocks = peek(row_blocks)
        stored = self.chunk_for(name, shape, first).write_transposed(name, row_blocks, shape)
        self.holder[stored] = self.chunks[-1]
        return stored

    def alias(self, name: str, stored: str, shape: list[int]) -> str:
        """Another name (and shape) for the bytes of `stored`, in its chunk."""
        chunk = self.holder[stored]
        alias = chunk.alias(name, stored, shape)
        self.holder[alias] = chunk
        return alias

    def chunk_for(self, name: str, shape: list[int], first: torch.Tensor | np.ndarray) -> ExternalData:
        """The last chunk if the tensor fits after what it holds, else a new one (made the last)."""
        itemsize = first.element_size() if isinstance(first, torch.Tensor) else first.itemsize
        nbytes = math.prod(shape) * itemsize
        if nbytes > self.chunk_bytes:
            raise OnnxExportError(
                f"{name} takes {nbytes:,} bytes, more than one external data file may hold for transformers.js "
                f"({self.chunk_bytes:,} bytes), and it is not a lookup or output projection that is stored in "
                "row blocks; export it smaller: --dtype float16 or a quantization")
        chunk = self.chunks[-1] if self.chunks else None
        used = chunk.file.tell() if chunk is not None else 0
        if chunk is None or (used > 0 and used + ALIGNMENT + nbytes > self.chunk_bytes):
            chunk = ExternalData(self.folder / chunk_name(self.graph_file, len(self.chunks)))
            self.chunks.append(chunk)
        return chunk

    def initializer(self, name: str) -> onnx.TensorProto:
        return self.holder[name].initializer(name)

    def close(self) -> None:
        for chunk in self.chunks:
            chunk.close()

    def __enter__(self) -> "ChunkedExternalData":
        return self

    def __exit__(self, *_) -> None:
        self.close()
