"""Weight quantization as the data file is written: each MatMul or Gemm whose B is a weight is rewritten to its
quantized form, and its weight is quantized one block of checkpoint rows at a time (export/streaming.py writes it).

Axes: N output channels (a checkpoint matrix's rows: nn.Linear [N, K], the tied embedding [V, C]), K input width.

- int8: per-output-channel symmetric weights (scale = max |w| / 127 per row, 255 levels around zero) and activations
  quantized per call, in standard ONNX ops, as onnxruntime's quantize_dynamic emits them:
      DynamicQuantizeLinear(A) -> MatMulInteger(A_q, W_q [K, N], A_zero, 128) -> Cast(float) -> Mul(A_scale * W_scale)
  ONNX Runtime fuses the chain into DynamicQuantizeMatMul / MatMulIntegerToFloat (its optimized model shows it);
  other runtimes (onnxruntime-web) run the plain ops. The weights are stored as uint8 with the fixed zero point 128
  (still symmetric): with int8 weights, x86 CPUs without VNNI (AVX2, this machine) run uint8 x int8 through an
  instruction that saturates pairs of products at 16 bits, and full-range per-channel weights saturate often (the
  tiny model's image embeddings were 25x further from torch); uint8 x uint8 takes a kernel that does not. MatMulInteger wants [K, N], so each weight is written transposed, strip by
  strip (ExternalData.write_transposed), the tied 257216-row embedding too.
- int4: com.microsoft MatMulNBits (bits 4, blocks of INT4_BLOCK_SIZE along K), B packed [N, blocks, block / 2]
  uint8, two values a byte, the even index in the low nibble; scales float32 [N, blocks]. Symmetric, with no
  zero-point tensor: a value is (q - 8) * scale, and the scale maps the block's largest-magnitude value onto -8
  exactly (what ONNX Runtime's own symmetric quantizer does), so the 16 levels are used on the side that needs them.
  Asymmetric blocks (a zero point per block, ONNX Runtime's quantizer default) were not measured: they add a
  tensor and a subtraction per block, for weights that are centred on zero.
  A K that is not a multiple of the block is padded with zeros inside the last block (MatMulNBits' K attribute
  keeps the true width; padded values quantize to 0 and meet no input). [N, K] is the checkpoint's own layout, so
  no int4 weight is ever transposed.
The token lookup: with int4 it reads the output projection's own int4 blocks (com.microsoft GatherBlockQuantized,
which takes MatMulNBits' layout and its default zero point 8), so the tied embedding is stored once, in 4 bits (at
3B: 0.27 GB where a float lookup kept 2.1 GB beside it). With int8 it stays a float Gather: MatMulInteger's B is the
transposed [C, V] matrix, which no gather op reads. Every other weight matrix of the three graphs is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

QUANTIZATIONS = ("int8", "int4")
INT4_BLOCK_SIZE = 32  # closer to torch than 64 on the embedded model, as fast (export/README.md)
# 4: ONNX Runtime quantizes the activations to int8 per block inside the kernel; 1.8x the decode speed of 0 (float
# activations) on the embedded model, for the same distance to torch (export/README.md)
INT4_ACCURACY_LEVEL = 4
MS_DOMAIN = "com.microsoft"
INT8_ZERO_POINT = 128
ZERO_POINT_NAME = "int8_weight_zero_point"


@dataclass(frozen=True)
class QuantizedMatMul:
    """One weight matrix as `scheme` stores it: `weight` and `scale` are the initializer names, `rows` and `width`
    the checkpoint matrix's shape [N, K]."""

    parameter: str
    scheme: str
    weight: str
    scale: str
    rows: int
    width: int
    lookup_scale: str | None = None  # int4 embedding read by GatherBlockQuantized: its scales as [N, blocks, 1]

    @property
    def weight_shape(self) -> list[int]:
        if self.scheme == "int8":
            return [self.width, self.rows]  # [K, N]: MatMulInteger's B
        blocks = -(-self.width // INT4_BLOCK_SIZE)
        return [self.rows, blocks, INT4_BLOCK_SIZE // 2]

    @property
    def scale_shape(self) -> list[int]:
        return [self.rows] if self.scheme == "int8" else [self.rows, -(-self.width // INT4_BLOCK_SIZE)]


def int8_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows [n, K] float -> uint8 [n, K] around INT8_ZERO_POINT, scale float32 [n] (symmetric, one scale a row)."""
    rows = rows.astype(np.float32, copy=False)
    scale = np.abs(rows).max(axis=1) / 127
    scale[scale == 0] = 1  # an all-zero row: any scale gives zeros
    q = np.rint(rows / scale[:, None]).clip(-127, 127) + INT8_ZERO_POINT
    return q.astype(np.uint8), scale.astype(np.float32)


def int4_rows(rows: np.ndarray, block_size: int = INT4_BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """rows [n, K] float -> packed uint8 [n, blocks, block_size / 2], scales float32 [n, blocks]."""
    rows = rows.astype(np.float32, copy=False)
    n, width = rows.shape
    blocks = -(-width // block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :width] = rows
    padded = padded.reshape(n, blocks, block_size)
    # the signed value of largest magnitude in each block maps onto -8
    extreme = np.take_along_axis(padded, np.abs(padded).argmax(axis=2)[..., None], axis=2)[..., 0]
    scale = extreme / -8
    scale[scale == 0] = 1
    q = (np.rint(padded / scale[..., None]).clip(-8, 7) + 8).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scale.astype(np.float32)


def quantized_rows(scheme: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return int8_rows(rows) if scheme == "int8" else int4_rows(rows, INT4_BLOCK_SIZE)


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, width: int) -> np.ndarray:
    """The float [n, K] that MatMulNBits multiplies by (for the tests and for measurements)."""
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1).astype(np.float32)
    return ((q - 8) * scale[..., None]).reshape(packed.shape[0], -1)[:, :width]


def quantize_matmuls(graph: onnx.ModelProto, transposed: dict[str, tuple[str, list[int] | None]], embedding: str | None,
                     shapes: dict[str, tuple[int, ...]], scheme: str, prefix: str) -> list[QuantizedMatMul]:
    """Rewrites every MatMul whose B is a transposed weight input (`transposed`: name -> (weight input, perm), as
    streaming.fold_input_transposes returns) and the Gemm(transB=1) on `embedding` into `scheme`'s quantized form;
    returns what to write. `shapes`: weight input -> the checkpoint matrix's shape [N, K]."""
    g = graph.graph
    targets, activations = [], {}
    for node in list(g.node):
        if node.op_type == "MatMul" and node.input[1] in transposed:
            weight, perm = transposed[node.input[1]]
            if perm not in (None, [1, 0]) or len(shapes[weight]) != 2:
                continue
        elif node.op_type == "Gemm" and node.input[1] == embedding and len(node.input) == 2:
            weight = embedding
        else:
            continue
        rows, width = shapes[weight]
        name = weight + f"_{scheme}"
        target = QuantizedMatMul(weight.removeprefix(prefix), scheme, name, name + "_scale", rows, width)
        at = list(g.node).index(node)
        g.node.remove(node)
        new = (int8_nodes if scheme == "int8" else int4_nodes)(node, target, activations)
        for offset, item in enumerate(new):
            g.node.insert(at + offset, item)
        targets.append(target)
    if scheme == "int4":
        targets = [quantize_lookup(g, embedding, t) if t.parameter == embedding.removeprefix(prefix) else t
                   for t in targets] if embedding else targets
    if scheme == "int8" and targets:
        g.initializer.append(helper.make_tensor(ZERO_POINT_NAME, onnx.TensorProto.UINT8, [], [INT8_ZERO_POINT]))
    if scheme == "int4" and targets and not any(o.domain == MS_DOMAIN for o in graph.opset_import):
        graph.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return targets


def quantize_lookup(g: onnx.GraphProto, embedding: str, target: QuantizedMatMul) -> QuantizedMatMul:
    """Points the token lookup (Gather of `input_ids` [B, T] rows of the embedding) at the int4 blocks of the tied
    output projection: GatherBlockQuantized gives [B, T, blocks, block], reshaped to [B, T, blocks * block] and cut
    to the width when the last block is padded. A lookup of another shape keeps the float Gather."""
    lookups = [n for n in g.node if n.op_type == "Gather" and n.input[0] == embedding
               and n.input[1] in {i.name for i in g.input if len(i.type.tensor_type.shape.dim) == 2}]
    if not lookups:
        return target
    target = QuantizedMatMul(target.parameter, target.scheme, target.weight, target.scale, target.rows, target.width,
                             lookup_scale=target.scale + "_lookup")
    blocks = -(-target.width // INT4_BLOCK_SIZE)
    for node in lookups:
        y, at = node.output[0], list(g.node).index(node)
        g.node.remove(node)
        new = [
            helper.make_node("GatherBlockQuantized", [target.weight, node.input[1], target.lookup_scale], [f"{y}_blocks"],
                             name=f"{node.name}_int4", domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                             block_size=INT4_BLOCK_SIZE, bits=4),
            helper.make_node("Reshape", [f"{y}_blocks", f"{y}_shape"], [y if blocks * INT4_BLOCK_SIZE == target.width
                                                                        else f"{y}_padded"], name=f"{node.name}_rows"),
        ]
        g.initializer.append(helper.make_tensor(f"{y}_shape", onnx.TensorProto.INT64, [3], [0, 0, -1]))
        if blocks * INT4_BLOCK_SIZE != target.width:
            for name, value in (("starts", 0), ("ends", target.width), ("axes", -1)):
                g.initializer.append(helper.make_tensor(f"{y}_{name}", onnx.TensorProto.INT64, [1], [value]))
            new.append(helper.make_node("Slice", [f"{y}_padded", f"{y}_starts", f"{y}_ends", f"{y}_axes"], [y],
                                        name=f"{node.name}_width"))
        for offset, item in enumerate(new):
            g.node.insert(at + offset, item)
    return target


def int8_nodes(node: onnx.NodeProto, target: QuantizedMatMul, activations: dict) -> list[onnx.NodeProto]:
    a, y = node.input[0], node.output[0]
    new = []
    if a not in activations:  # q, k and v (gate and up) read one activation: quantize it once
        activations[a] = (f"{a}_quantized", f"{a}_scale", f"{a}_zero_point")
        new.append(helper.make_node("DynamicQuantizeLinear", [a], list(activations[a]), name=f"{a}_DynamicQuantize"))
    quantized, scale, zero = activations[a]
    new += [
        helper.make_node("MatMulInteger", [quantized, target.weight, zero, ZERO_POINT_NAME], [f"{y}_int32"],
                         name=f"{node.name}_int8"),
        helper.make_node("Cast", [f"{y}_int32"], [f"{y}_float"], to=onnx.TensorProto.FLOAT, name=f"{node.name}_cast"),
        helper.make_node("Mul", [scale, target.scale], [f"{y}_scale"], name=f"{node.name}_scale"),
        helper.make_node("Mul", [f"{y}_float", f"{y}_scale"], [y], name=f"{node.name}_rescale"),
    ]
    return new


def int4_nodes(node: onnx.NodeProto, target: QuantizedMatMul, activations: dict) -> list[onnx.NodeProto]:
    attributes = dict(K=target.width, N=target.rows, bits=4, block_size=INT4_BLOCK_SIZE)
    if INT4_ACCURACY_LEVEL:
        attributes["accuracy_level"] = INT4_ACCURACY_LEVEL
    return [helper.make_node("MatMulNBits", [node.input[0], target.weight, target.scale], [node.output[0]],
                             name=f"{node.name}_int4", domain=MS_DOMAIN, **attributes)]
