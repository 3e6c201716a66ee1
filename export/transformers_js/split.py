"""A float weight larger than one external data chunk (the 3B float32 embedding: 257216 x 2048 x 4 B = 2.1 GB,
over the 2 GB a file may hold for transformers.js) stored as row blocks that each fit a chunk, with its consumers
rewritten to give exactly the unsplit graph's values:

- the token lookup Gather(W, ids): each block i (rows s_i .. s_i + r_i) is gathered with the ids moved into its
  range, Gather(W_i, Clip(ids - s_i, 0, r_i - 1)), and Where(ids >= s_i, block i's rows, the earlier blocks' rows)
  keeps, for every id, the rows of the block holding it: each output row is a copy of the same stored row (for ids
  in [0, V); the unsplit Gather's wrap-around of negative ids is not kept);
- the tied output projection Gemm(hidden, W, transB=1): one Gemm on each block, Concat along the vocabulary: each
  logit is the same dot product of the same row (tests/test_transformers_js.py checks the logits are equal).

Each block is written straight from the checkpoint's rows (CheckpointStream.blocks on the block's byte range), so
no copy of the whole matrix is made. Called before WeightWriter.attach, which then finds the weight unused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..writer.streaming import TRACED_PREFIX, WeightWriter
from .data import ChunkedExternalData


def row_blocks(rows: int, row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(first row, row count) of equal blocks of at most `chunk_bytes` each."""
    count = -(-rows * row_bytes // chunk_bytes)
    per_block = -(-rows // count)
    while per_block * row_bytes > chunk_bytes:
        count += 1
        per_block = -(-rows // count)
    return [(first, min(per_block, rows - first)) for first in range(0, rows, per_block)]


def split_large_weights(graph: onnx.ModelProto, writer: WeightWriter, store: ChunkedExternalData, chunk_bytes: int,
                        skip: set[str] = frozenset()) -> None:
    """Splits every weight input (but `skip`) whose float bytes exceed `chunk_bytes` and whose consumers are all
    lookups (Gather on axis 0) or projections (Gemm(A, W, transB=1)); any other is left to the chunk's refusal."""
    g = graph.graph
    for weight in writer.weight_inputs(graph):
        parameter = weight.removeprefix(TRACED_PREFIX)
        stored = writer.source.tensors[parameter]
        if weight in skip or len(stored.shape) != 2 or writer.source.nbytes(parameter, writer.dtype) <= chunk_bytes:
            continue
        consumers = [n for n in g.node if weight in n.input]
        if not consumers or not all(is_lookup(n, weight) or is_projection(n, weight) for n in consumers):
            continue
        rows, width = stored.shape
        blocks = row_blocks(rows, width * writer.dtype.itemsize, chunk_bytes)
        names = []
        for first, count in blocks:
            part = dataclasses.replace(stored, shape=(count, width), start=stored.start + first * stored.row_bytes,
                                       end=stored.start + (first + count) * stored.row_bytes)
            names.append(store.write(f"{weight}_rows_{first}", writer.source.blocks(parameter, writer.dtype, part),
                                     [count, width]))
            g.initializer.append(store.initializer(names[-1]))
        for node in consumers:
            at = list(g.node).index(node)
            g.node.remove(node)
            new = (lookup_nodes if node.op_type == "Gather" else projection_nodes)(node, names, blocks, g)
            for offset, item in enumerate(new):
                g.node.insert(at + offset, item)


def is_lookup(node: onnx.NodeProto, weight: str) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return node.op_type == "Gather" and node.input[0] == weight and axis == 0


def is_projection(node: onnx.NodeProto, weight: str) -> bool:
    """Gemm(A, W, transB=1) and nothing else: what tie_lm_head makes of the tied output projection."""
    attributes = {a.name: a.i for a in node.attribute}
    return node.op_type == "Gemm" and list(node.input)[1:] == [weight] and attributes == {"transB": 1}


def constant(g: onnx.GraphProto, name: str, value) -> str:
    if not any(i.name == name for i in g.initializer):
        g.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    return name


def lookup_nodes(node: onnx.NodeProto, names: list[str], blocks: list[tuple[int, int]], g: onnx.GraphProto):
    ids, y = node.input[1], node.output[0]
    zero, last_axis = constant(g, f"{y}_split_zero", 0), constant(g, f"{y}_split_last_axis", [-1])
    new, previous = [], None
    for index, (name, (first, count)) in enumerate(zip(names, blocks)):
        tag = f"{y}_block{index}"
        start, last = constant(g, f"{tag}_first", first), constant(g, f"{tag}_last_row", count - 1)
        new += [helper.make_node("Sub", [ids, start], [f"{tag}_shifted"], name=f"{tag}_shift"),
                helper.make_node("Clip", [f"{tag}_shifted", zero, last], [f"{tag}_local"], name=f"{tag}_clip"),
                helper.make_node("Gather", [name, f"{tag}_local"], [f"{tag}_rows"], name=f"{tag}_gather", axis=0)]
        if previous is None:
            previous = f"{tag}_rows"
            continue
        out = y if index == len(blocks) - 1 else f"{tag}_so_far"
        new += [helper.make_node("GreaterOrEqual", [ids, start], [f"{tag}_holds"], name=f"{tag}_holds"),
                helper.make_node("Unsqueeze", [f"{tag}_holds", last_axis], [f"{tag}_holds_row"],
                                 name=f"{tag}_unsqueeze"),
                helper.make_node("Where", [f"{tag}_holds_row", f"{tag}_rows", previous], [out], name=f"{tag}_where")]
        previous = out
    return new


def projection_nodes(node: onnx.NodeProto, names: list[str], blocks: list[tuple[int, int]], g: onnx.GraphProto):
    hidden, y = node.input[0], node.output[0]
    parts = [f"{y}_block{index}" for index in range(len(names))]
    new = [helper.make_node("Gemm", [hidden, name], [part], name=f"{part}_gemm", transB=1)
           for name, part in zip(names, parts)]
    return new + [helper.make_node("Concat", parts, [y], name=f"{y}_concat", axis=-1)]
