"""Graphs traced without the weights, then given them straight from the checkpoint, one tensor at a time.

The graphs are traced on a hollow model: its parameters have the right shapes and dtype but uninitialized storage
that is never written, so those pages never become resident (reading them maps the kernel's zero page); the tracer
records operations, not values. The parameters are passed to the graph as inputs (`WeightsAsInputs`), not held as
parameters: the exporter's shape inference converts every parameter it sees into an ONNX tensor, which on the
3B-wide benchmark model made the whole decoder's weights (3 GB) resident again. Each weight input, named
`model.<parameter>`, then becomes an initializer whose bytes are copied from the safetensors file into the
export's data file in blocks of rows, converted to the export dtype on the way (bfloat16 checkpoints included).
Weight transposes (how nn.Linear exports) are folded here, one matrix at a time, and the tied output projection is
a Gemm(transB=1) on the embedding itself, so the largest matrix is streamed and never held whole. With `quantize`,
each MatMul/Gemm on a weight is rewritten to its quantized form and the weight quantized block by block as it is
written (export/quantize.py).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from paligemma.config import PaliGemmaConfig
from paligemma.model import PaliGemmaForConditionalGeneration

from ..quantize import QuantizedMatMul, quantize_matmuls, quantized_rows
from .checkpoint_stream import CheckpointStream
from .external_data import ExternalData, numpy_view

EXTERNAL_MIN_BYTES = 1024  # smaller tensors (norms of tiny models, scalars) stay inside the graph
TRACED_PREFIX = "model."  # the graph modules hold the model as `self.model`


def hollow_model(config: PaliGemmaConfig, dtype: torch.dtype) -> PaliGemmaForConditionalGeneration:
    """The model with reserved, never-written parameter storage: enough to trace, nothing resident."""
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config).to(dtype)
    return model.to_empty(device="cpu").eval()


class WeightsAsInputs(nn.Module):
    """A graph module whose parameters come in as trailing inputs, in `names` order. The module is held outside
    nn.Module's registry, so the exporter sees no parameters at all; during the call each input takes its
    parameter's slot (torch.func.functional_call does the same but refuses to run under the tracer)."""

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        object.__setattr__(self, "graph_module", graph_module)
        self.names = [name for name, _ in graph_module.named_parameters()]

    def forward(self, *inputs):
        count = len(inputs) - len(self.names)
        slots = []
        for name, tensor in zip(self.names, inputs[count:]):
            owner, _, leaf = name.rpartition(".")
            owner = self.graph_module.get_submodule(owner)
            slots.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = tensor
        try:
            return self.graph_module(*inputs[:count])
        finally:
            for owner, leaf, parameter in slots:
                owner._parameters[leaf] = parameter

    def example_inputs(self, graph_inputs: tuple) -> tuple:
        parameters = dict(self.graph_module.named_parameters())
        return (*graph_inputs, *(parameters[name] for name in self.names))


def embedding_input(weights: list[str]) -> str | None:
    """The token embedding's input name, which the tied output projection (a Gemm) reads too."""
    return next((w for w in weights if w.endswith("embed_tokens.weight")), None)


def rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def fold_input_transposes(graph: onnx.GraphProto, weights: set[str]) -> dict[str, tuple[str, list[int]]]:
    """Removes each Transpose of a weight input and points its consumers at `<weight>_transposed`; returns
    that name -> (weight, perm), the tensors to write transposed."""
    folded = {}
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights]:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        name = node.input[0] + "_transposed"
        folded[name] = (node.input[0], perm)
        graph.node.remove(node)
        rename_inputs(graph, {node.output[0]: name})
    return folded


class WeightWriter:
    """Gives traced graphs their weights from `source`: tensors of at least EXTERNAL_MIN_BYTES go to `store` (an
    ExternalData file, each written once however many graphs use it), smaller ones, or all of them when `store`
    is None, inside the graph."""

    def __init__(self, source: CheckpointStream, dtype: torch.dtype, progress: Callable = lambda items, what: items,
                 quantize: str | None = None):
        self.source = source
        self.dtype = dtype
        self.progress = progress
        self.quantize = quantize
        self.stored: dict[tuple[ExternalData, str], str] = {}  # (file, graph tensor) -> name in the file

    def nbytes(self, graph: onnx.ModelProto) -> int:
        return sum(self.source.nbytes(n.removeprefix(TRACED_PREFIX), self.dtype) for n in self.weight_inputs(graph))

    def weight_inputs(self, graph: onnx.ModelProto) -> list[str]:
        return [i.name for i in graph.graph.input
                if i.name.startswith(TRACED_PREFIX) and i.name.removeprefix(TRACED_PREFIX) in self.source.tensors]

    def attach(self, graph: onnx.ModelProto, what: str, store: ExternalData | None) -> None:
        g = graph.graph
        weights = self.weight_inputs(graph)
        folded = fold_input_transposes(g, set(weights))
        quantized = []
        if self.quantize:
            shapes = {w: self.source.tensors[w.removeprefix(TRACED_PREFIX)].shape for w in weights}
            quantized = quantize_matmuls(graph, folded, embedding_input(weights), shapes, self.quantize, TRACED_PREFIX)
        used = {name for node in g.node for name in node.input}
        tensors = {w: (w, None) for w in weights if w in used} | {k: v for k, v in folded.items() if k in used}
        renames, added = {}, set()
        for name, (weight, perm) in self.progress(tensors.items(), what):
            parameter = weight.removeprefix(TRACED_PREFIX)
            initializer = self.initializer(name, parameter, perm, store)
            renames[name] = initializer.name
            if initializer.name not in added:  # one initializer per stored name, however many inputs use it
                added.add(initializer.name)
                g.initializer.append(initializer)
        for target in (self.progress(quantized, f"{what} {self.quantize}") if quantized else ()):
            names = (target.weight, target.scale) + ((target.lookup_scale,) if target.lookup_scale else ())
            for name, initializer in zip(names, self.quantized_initializers(target, store)):
                renames[name] = initializer.name
                g.initializer.append(initializer)
        rename_inputs(g, {k: v for k, v in renames.items() if k != v})
        for item in [i for i in g.input if i.name in weights]:
            g.input.remove(item)

    def initializer(self, name: str, parameter: str, perm: list[int] | None, store: ExternalData | None):
        shape = list(self.source.tensors[parameter].shape)
        if perm is not None:
            shape = [shape[p] for p in perm]
        small = self.source.nbytes(parameter, self.dtype) < EXTERNAL_MIN_BYTES
        if store is None or small:
            return numpy_helper.from_array(numpy_view(self.tensor(parameter, perm)), name)
        key = (store, name)
        if key not in self.stored:
            blocks = self.source.blocks(parameter, self.dtype) if perm is None else [self.tensor(parameter, perm)]
            self.stored[key] = store.write(name, blocks, shape)
        return store.initializer(self.stored[key])

    def quantized_initializers(self, target: QuantizedMatMul, store: ExternalData | None) -> list[onnx.TensorProto]:
        """The quantized weight and its scales (and, for a quantized lookup, the same scales as [N, blocks, 1]: an
        alias of the same bytes), computed block by block of checkpoint rows while the weight is written (the scales,
        1/32 of a block-quantized weight's elements, are kept until it is done); each is written once per file
        however many graphs use it."""
        key = (store, target.weight)
        if store is None or key not in self.stored:
            scales = []

            def weight_blocks():
                for rows in self.source.blocks(target.parameter, torch.float32):
                    q, scale = quantized_rows(target.scheme, rows.numpy())
                    scales.append(scale)
                    yield q

            if store is None:
                weight = np.concatenate(list(weight_blocks()))
                weight = weight.T.copy() if target.transposed else weight
                scale = np.concatenate(scales)
                inline = [numpy_helper.from_array(weight, target.weight), numpy_helper.from_array(scale, target.scale)]
                if target.lookup_scale:
                    inline.append(numpy_helper.from_array(scale[..., None], target.lookup_scale))
                return inline
            write = store.write_transposed if target.transposed else store.write
            self.stored[key] = write(target.weight, weight_blocks(), target.weight_shape)
            self.stored[store, target.scale] = store.write(target.scale, [np.concatenate(scales)], target.scale_shape)
        names = [self.stored[key], self.stored[store, target.scale]]
        if target.lookup_scale:
            if (store, target.lookup_scale) not in self.stored:
                self.stored[store, target.lookup_scale] = store.alias(target.lookup_scale, names[1],
                                                                      target.scale_shape + [1])
            names.append(self.stored[store, target.lookup_scale])
        return [store.initializer(name) for name in names]

    def tensor(self, parameter: str, perm: list[int] | None) -> torch.Tensor:
        tensor = self.source.read(parameter, self.dtype)
        return tensor if perm is None else tensor.permute(perm).contiguous()
