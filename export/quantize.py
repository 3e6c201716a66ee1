"""Weight quantization as the data file is written: each MatMul or Gemm whose B is a weight is rewritten to its
quantized form, and its weight is quantized one block of checkpoint rows at a time (export/writer/streaming.py
writes it).

Axes: N output channels (a checkpoint matrix's rows: nn.Linear [N, K], the tied embedding [V, C]), K input width.

- int8 and int4: com.microsoft MatMulNBits (bits 8 or 4, blocks of `block_size` along K, accuracy_level 4: ONNX
  Runtime quantizes the activations to int8 per block inside the kernel). B is [N, blocks, block * bits / 8] uint8
  (4 bits: two values a byte, the even index in the low nibble), scales float32 [N, blocks]. Symmetric, with no
  zero-point tensor: a value is (q - 2^(bits-1)) * scale (MatMulNBits' default zero point: 128, 8), and the scale
  maps the block's largest-magnitude value onto -2^(bits-1) exactly (what ONNX Runtime's own symmetric quantizer
  does), so the levels are used on the side that needs them. [N, K] is the checkpoint's own layout: nothing is
  transposed. A K that is not a multiple of the block is padded with zeros inside the last block (MatMulNBits' K
  attribute keeps the true width; padded values quantize to the zero point and meet no input).
  int8 blocks are INT8_BLOCK_SIZE wide, int4 ones INT4_BLOCK_SIZE, or INT4_WIDE_BLOCK_SIZE in products at least
  WIDE_PRODUCT wide (their comments say why): MatMulNBits takes blocks of 16 to 256 only (no per-channel scale: ONNX
  Runtime refuses a block of K), and the measured choice is in docs/quantization.md.
- "int8_standard" (internal; not a `--quantize` value): per-output-channel symmetric weights (scale = max |w| / 127,
  255 levels around zero) and activations quantized per tensor per call, in standard ONNX ops, as onnxruntime's
  quantize_dynamic emits them, for runtimes without com.microsoft ops (onnxruntime-web's `_quantized` files):
      DynamicQuantizeLinear(A) -> MatMulInteger(A_q, W_q [K, N], A_zero, 128) -> Cast(float) -> Mul(A_scale * W_scale)
  The weights are uint8 around the fixed zero point 128: with int8 weights, x86 CPUs without VNNI (AVX2) run uint8 x
  int8 through an instruction that saturates pairs of products at 16 bits (the tiny model's image embeddings were
  25x further from torch); uint8 x uint8 takes a kernel that does not. MatMulInteger wants [K, N], so each weight is
  written transposed, strip by strip (ExternalData.write_transposed). On this AVX2 CPU it decodes no faster than
  float32, and per-tensor activations move the full 3B's logits by a fifth: why `--quantize int8` is MatMulNBits.
- "int4_float16" (internal; transformers.js' `_q4f16` variant, export/transformers_js/writer.py): int4's blocks with
  float16 scales, for a float16 graph: MatMulNBits and GatherBlockQuantized take the scales in the activations' type.
  The scale is rounded to float16 before the weights are quantized with it, so the stored levels and scale agree.
The token lookup: with MatMulNBits it reads the output projection's own blocks (com.microsoft GatherBlockQuantized,
which takes MatMulNBits' layout and its default zero points for 4 and 8 bits), so the tied embedding is stored once,
quantized (at 3B, int4: 0.27 GB where a float lookup kept 2.1 GB beside it). With int8_standard it stays a float
Gather: MatMulInteger's B is the transposed [C, V] matrix, which no gather op reads. Every other weight matrix of the
three graphs is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

QUANTIZATIONS = ("int8", "int4")  # what `--quantize` takes
STANDARD_INT8 = "int8_standard"  # MatMulInteger in standard ops, for runtimes without com.microsoft (see above)
INT4_FLOAT16 = "int4_float16"  # int4 with float16 scales, for float16 graphs (see above)
INT8_BLOCK_SIZE = 32  # the most accurate of 32-256 for decode speed within noise (docs/quantization.md)
INT4_BLOCK_SIZE = 32  # closer to torch than 64 on the embedded model, as fast (docs/quantization.md)
# int4 in products at least WIDE_PRODUCT wide (every product of the released PaliGemmas): blocks of 128. A scale per
# 128 values instead of 32 takes the pre-packed weights and the scales ONNX Runtime keeps beside them to 1.12x the
# stored bytes instead of 1.4x (the serving memory bound), and the 266-row products of a prefill run 1.4x faster
# (AVX-512 VNNI); measured in docs/quantization.md. In narrower products (the embedded model's, the tests' tiny
# models') a block of 128 would be a whole row: they keep 32.
INT4_WIDE_BLOCK_SIZE = 128
WIDE_PRODUCT = 1024
# 4: ONNX Runtime quantizes the activations to int8 per block inside the kernel; for int4 1.8x the decode speed of 0
# (float activations) for the same distance to torch; for int8, 0 and 1 dequantize the weight on every call
# (70-100x slower; docs/quantization.md)
NBITS_ACCURACY_LEVEL = 4
MS_DOMAIN = "com.microsoft"
STANDARD_ZERO_POINT = 128
ZERO_POINT_NAME = "int8_weight_zero_point"


@dataclass(frozen=True)
class Scheme:
    """How a quantization stores a weight matrix: `bits` a value in blocks of `block_size` along K for MatMulNBits,
    or (block_size 0) one scale per output channel for the standard-op MatMulInteger chain."""

    bits: int
    block_size: int = 0
    scale_dtype: str = "float32"
    wide_block_size: int | None = None  # the block in products at least WIDE_PRODUCT wide, where it differs

    @property
    def standard_ops(self) -> bool:
        return self.block_size == 0

    @property
    def zero_point(self) -> int:
        return 1 << (self.bits - 1)  # MatMulNBits' and GatherBlockQuantized's default; the standard chain's 128

    def block(self, width: int) -> int:
        """The block along K of a product `width` wide."""
        return self.wide_block_size if self.wide_block_size and width >= WIDE_PRODUCT else self.block_size

    def blocks(self, width: int) -> int:
        return -(-width // self.block(width))

    def nbytes(self, rows: int, width: int) -> int:
        """Bytes of the stored weight and its scales."""
        scale = np.dtype(self.scale_dtype).itemsize
        if self.standard_ops:
            return rows * width + scale * rows
        blocks = self.blocks(width)
        return rows * blocks * (self.block(width) * self.bits // 8 + scale)


SCHEMES = {"int8": Scheme(8, INT8_BLOCK_SIZE), "int4": Scheme(4, INT4_BLOCK_SIZE, wide_block_size=INT4_WIDE_BLOCK_SIZE),
           STANDARD_INT8: Scheme(8), INT4_FLOAT16: Scheme(4, INT4_BLOCK_SIZE, "float16", INT4_WIDE_BLOCK_SIZE)}
PREPACKED = tuple(name for name, scheme in SCHEMES.items() if not scheme.standard_ops)  # MatMulNBits: see runtime.py


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
    lookup_scale: str | None = None  # embedding read by GatherBlockQuantized: its scales as [N, blocks, 1]

    @property
    def transposed(self) -> bool:
        return SCHEMES[self.scheme].standard_ops  # MatMulInteger's B is [K, N]

    @property
    def weight_shape(self) -> list[int]:
        scheme = SCHEMES[self.scheme]
        if scheme.standard_ops:
            return [self.width, self.rows]
        return [self.rows, scheme.blocks(self.width), scheme.block(self.width) * scheme.bits // 8]

    @property
    def scale_shape(self) -> list[int]:
        scheme = SCHEMES[self.scheme]
        return [self.rows] if scheme.standard_ops else [self.rows, scheme.blocks(self.width)]


def channel_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows [n, K] float -> uint8 [n, K] around STANDARD_ZERO_POINT, scale float32 [n] (symmetric, a scale a row)."""
    rows = rows.astype(np.float32, copy=False)
    scale = np.abs(rows).max(axis=1) / 127
    scale[scale == 0] = 1  # an all-zero row: any scale gives zeros
    q = np.rint(rows / scale[:, None]).clip(-127, 127) + STANDARD_ZERO_POINT
    return q.astype(np.uint8), scale.astype(np.float32)


def block_rows(rows: np.ndarray, bits: int, block_size: int,
               scale_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """rows [n, K] float -> uint8 [n, blocks, block_size * bits / 8] (4 bits: packed two a byte), scales
    `scale_dtype` [n, blocks]."""
    rows = rows.astype(np.float32, copy=False)
    n, width = rows.shape
    blocks = -(-width // block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :width] = rows
    padded = padded.reshape(n, blocks, block_size)
    zero = 1 << (bits - 1)
    # the signed value of largest magnitude in each block maps onto -zero
    extreme = np.take_along_axis(padded, np.abs(padded).argmax(axis=2)[..., None], axis=2)[..., 0]
    scale = (extreme / -zero).astype(scale_dtype).astype(np.float32)  # the stored scale is the one quantized with
    scale[scale == 0] = 1  # an all-zero block, or one whose scale float16 rounds to zero: its values become 0
    q = (np.rint(padded / scale[..., None]).clip(-zero, zero - 1) + zero).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale.astype(scale_dtype)


def quantized_rows(scheme: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = SCHEMES[scheme]
    return channel_rows(rows) if s.standard_ops else block_rows(rows, s.bits, s.block(rows.shape[1]), s.scale_dtype)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, width: int, bits: int) -> np.ndarray:
    """The float [n, K] that MatMulNBits multiplies by (for the tests and for measurements)."""
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:2], -1)
    values = (q.astype(np.float32) - (1 << (bits - 1))) * scale[..., None]
    return values.reshape(q.shape[0], -1)[:, :width]


def quantize_matmuls(graph: onnx.ModelProto, transposed: dict[str, tuple[str, list[int] | None]], embedding: str | None,
                     shapes: dict[str, tuple[int, ...]], scheme: str, prefix: str) -> list[QuantizedMatMul]:
    """Rewrites every MatMul whose B is a transposed weight input (`transposed`: name -> (weight input, perm), as
    streaming.fold_input_transposes returns) and the Gemm(transB=1) on `embedding` into `scheme`'s quantized form
    (a SCHEMES name: "int8", "int4", or STANDARD_INT8); returns what to write. `shapes`: weight input -> the
    checkpoint matrix's shape [N, K]."""
    g = graph.graph
    standard = SCHEMES[scheme].standard_ops
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
        new = standard_nodes(node, target, activations) if standard else nbits_nodes(node, target)
        for offset, item in enumerate(new):
            g.node.insert(at + offset, item)
        targets.append(target)
    if not standard and embedding:
        targets = [quantize_lookup(g, embedding, t) if t.parameter == embedding.removeprefix(prefix) else t
                   for t in targets]
    if standard and targets:
        g.initializer.append(helper.make_tensor(ZERO_POINT_NAME, onnx.TensorProto.UINT8, [], [STANDARD_ZERO_POINT]))
    if not standard and targets and not any(o.domain == MS_DOMAIN for o in graph.opset_import):
        graph.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return targets


def quantize_lookup(g: onnx.GraphProto, embedding: str, target: QuantizedMatMul) -> QuantizedMatMul:
    """Points the token lookup (Gather of `input_ids` [B, T] rows of the embedding) at the blocks of the tied output
    projection: GatherBlockQuantized gives [B, T, blocks, block], reshaped to [B, T, blocks * block] and cut to the
    width when the last block is padded. A lookup of another shape keeps the float Gather."""
    lookups = [n for n in g.node if n.op_type == "Gather" and n.input[0] == embedding
               and n.input[1] in {i.name for i in g.input if len(i.type.tensor_type.shape.dim) == 2}]
    if not lookups:
        return target
    scheme = SCHEMES[target.scheme]
    target = QuantizedMatMul(target.parameter, target.scheme, target.weight, target.scale, target.rows, target.width,
                             lookup_scale=target.scale + "_lookup")
    padded = scheme.blocks(target.width) * scheme.block(target.width) != target.width
    for node in lookups:
        y, at = node.output[0], list(g.node).index(node)
        g.node.remove(node)
        new = [
            helper.make_node("GatherBlockQuantized", [target.weight, node.input[1], target.lookup_scale],
                             [f"{y}_blocks"],
                             name=f"{node.name}_{target.scheme}", domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                             block_size=scheme.block(target.width), bits=scheme.bits),
            helper.make_node("Reshape", [f"{y}_blocks", f"{y}_shape"], [f"{y}_padded" if padded else y],
                             name=f"{node.name}_rows"),
        ]
        g.initializer.append(helper.make_tensor(f"{y}_shape", onnx.TensorProto.INT64, [3], [0, 0, -1]))
        if padded:
            for name, value in (("starts", 0), ("ends", target.width), ("axes", -1)):
                g.initializer.append(helper.make_tensor(f"{y}_{name}", onnx.TensorProto.INT64, [1], [value]))
            new.append(helper.make_node("Slice", [f"{y}_padded", f"{y}_starts", f"{y}_ends", f"{y}_axes"], [y],
                                        name=f"{node.name}_width"))
        for offset, item in enumerate(new):
            g.node.insert(at + offset, item)
    return target


def standard_nodes(node: onnx.NodeProto, target: QuantizedMatMul, activations: dict) -> list[onnx.NodeProto]:
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


def nbits_nodes(node: onnx.NodeProto, target: QuantizedMatMul) -> list[onnx.NodeProto]:
    scheme = SCHEMES[target.scheme]
    return [helper.make_node("MatMulNBits", [node.input[0], target.weight, target.scale], [node.output[0]],
                             name=f"{node.name}_{target.scheme}", domain=MS_DOMAIN, K=target.width, N=target.rows,
                             bits=scheme.bits, block_size=scheme.block(target.width),
                             accuracy_level=NBITS_ACCURACY_LEVEL)]


def stored_nbytes(scheme: str | None, shapes: dict[str, tuple[int, ...]], float_nbytes: dict[str, int],
                  quantized: set[str], embedding: str) -> int:
    """The data files' size for checkpoint tensors `shapes` (float sizes `float_nbytes`) when the matrices in
    `quantized` (the nn.Linear weights and the tied `embedding`) are stored as `scheme`; the standard scheme keeps
    the embedding in float beside its quantized projection (its lookup is a float Gather)."""
    if scheme is None:
        return sum(float_nbytes.values())
    s = SCHEMES[scheme]
    total = sum(s.nbytes(*shapes[name]) if name in quantized else size for name, size in float_nbytes.items())
    return total + (float_nbytes[embedding] if s.standard_ops else 0)
