"""Prefill and decode graphs that do only the model's work, for ONNX Runtime on CPU: built at session start from
the config and the exported graphs' own weights (no file is written, so the export's manifest and its hashes stay
as they are; the weights are the same shared, hash-checked tensors, referenced by name).

Each product by a weight is the exported graph's own node for it, copied onto the fused graph's activation with
its initializers and attributes: MatMul on a float weight transposed, Gemm on the tied embedding, or an int8 / int4
export's MatMulNBits on its blocks (and the token lookup, Gather or GatherBlockQuantized with its reshapes), so a
quantized export is served with its own quantized weights and kernels, and this module knows no quantization
scheme (export/quantize.py is their one home).

Every shape is a constant of the config (heads K and H, head dim D, widths; only the batch and the lengths are
dynamic), Gemma's RMSNorm x * (1 + w) is SimplifiedLayerNormalization with 1 + w folded into a small stored copy
of w, residual adds are fused into SkipSimplifiedLayerNormalization, GELU (tanh) is FastGelu. Decode: rotary
embedding, attention, Gemma 2's attention softcap and sliding window are one com.microsoft GroupQueryAttention
over a preallocated cache that is its own past and present (written in place: no Concat); 53 kernels per token on
the embedded model where the traced graph runs 338. Prefill: RotaryEmbedding, then attention in standard ops over
additive masks given as inputs, made by the library's one rule (paligemma/masks.py), so the prefix-LM mask and
padding are exact; 127 kernels where the traced graph runs 350. Its last layer computes keys and values for
every token (the cache) but queries, attention, o_proj and the MLP for the last token only, the one row the logits
read (attention is row by row, so that row is as computed in full): a quarter of the embedded model's prefill
MLP, half the 2-layer wide model's.

GroupQueryAttention is causal over each row's first seqlens_k + 1 cache slots: it knows no padding. This
project's batches are left-padded (paligemma/processor.py), so the engine moves each row's real keys to the
front of its buffer once, after prefill (OnnxEngine._bind_fused); a row's keys then sit in slots 0..n-1 and the
new one at slot n. For the decode token this is exact: it attends to every real earlier token (the prefix-LM rule
gives the new token a causal row), and the sliding window counts slots back from the query, which the shift moves
together (a padded slot inside the window was masked anyway). Positions are passed as position_ids, PaliGemma's
count of real tokens from 1, so rotary is as in torch.

Axes: B batch, T prompt tokens, M cache capacity (slots), C width, H query heads, K key/value heads, G = H / K,
D head dim.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from paligemma.config import PaliGemmaConfig
from paligemma.errors import OnnxExportError

from ..graphs import cache_names
from ..quantize import SCHEMES

MS = "com.microsoft"
GELU_TANH = {"gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"}
PREFIX = "model.language_model.model."
EMBEDDING = "embed_tokens"
# What may follow a token lookup before its rows are [B, T, C]: a quantized lookup gathers blocks, then reshapes
# (and cuts a padded last block).
LOOKUP_LAYOUT = {"Reshape", "Slice"}
AS_EXPORTED = "load the export with OnnxModel(..., fused=False) to run its graphs as exported"
# Rows of the rotary tables: positions the fused graph can rotate (PaliGemma counts from 1).
MIN_ROTARY_POSITIONS = 4096
LOOKUP_SUFFIX = ".lookup"  # the token lookup's own name for the embedding table (see _Gemma.token_lookup)
BRANCH = "prefill"  # the fused graph's bool input: True runs the prefill branch, False one decode step
SLICE_BYTES = 64 * 2**20  # a larger MatMulNBits weight is multiplied in slices of output channels (_Gemma.sliced)
PAGE = 4096


def unsupported(config: PaliGemmaConfig, dtype: str, quantize: str | None = None,
                device_type: str = "cpu") -> str | None:
    """Why the fused graphs cannot serve this export on this provider ("cpu" or "cuda"), or None when they can."""
    t = config.text
    if device_type != "cpu":
        # Not run on a GPU here: the exported graphs (standard ops) serve the CUDA provider.
        return "the CUDA provider: GroupQueryAttention there is float16 / bfloat16 only"
    if quantize not in (None, "none"):  # the manifest records "none" for float exports
        if quantize not in SCHEMES:
            return f"quantization {quantize!r}, which this runtime does not know"
        if SCHEMES[quantize].standard_ops:
            # Its products are chains (DynamicQuantizeLinear, MatMulInteger, Cast, two Muls), the activation's
            # quantization shared between products: not the one node a weight's product is copied as (below).
            return f"the {quantize} export's products are MatMulInteger chains, not one node a weight"
    if dtype != "float32":
        return f"dtype {dtype}: the fused graph is float32 (ONNX Runtime has no fast float16 path on CPU)"
    if t.hidden_activation not in GELU_TANH | {"gelu"}:
        return f"activation {t.hidden_activation!r}"
    if t.head_dim % 16:
        # GroupQueryAttention's rotary kernel on CPU refuses other sizes (every released PaliGemma has 256).
        return f"head_dim {t.head_dim} is not a multiple of 16"
    if t.num_attention_heads % t.num_key_value_heads:
        return "query heads not a multiple of key/value heads"
    return None


def slice_rows(*tensors: onnx.TensorProto) -> int:
    """Output channels per slice of a product whose stored tensors (blocks, scales) are `tensors`: about
    SLICE_BYTES of the largest, a whole number of pages of each (every slice starts page-aligned in the file)."""
    row_bytes = [int({e.key: e.value for e in t.external_data}["length"]) // t.dims[0] for t in tensors]
    align = math.lcm(*(PAGE // math.gcd(b, PAGE) for b in row_bytes))
    return max(align, SLICE_BYTES // max(row_bytes) // align * align)


def left_padded(real: np.ndarray) -> bool:
    """Whether every row of an attention_mask [B, T] is padding, then at least one real token (the layout whose
    row compaction is exact; see the module's docstring)."""
    T, counts = real.shape[1], real.sum(1)
    return bool(np.all(counts > 0) and np.array_equal(real, np.arange(T) >= (T - counts)[:, None]))


def rotary_positions(config: PaliGemmaConfig) -> int:
    return max(MIN_ROTARY_POSITIONS, config.text.max_position_embeddings + 1)


def rotary_tables(config: PaliGemmaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions, D / 2] in float32, computed as paligemma.gemma.rope_tables does (float32 angles)."""
    import torch

    t = config.text
    inv_freq = 1.0 / (t.rope_theta ** (torch.arange(0, t.head_dim, 2, dtype=torch.float32) / t.head_dim))
    angles = torch.arange(rotary_positions(config), dtype=torch.float32)[:, None] * inv_freq
    return angles.cos().numpy(), angles.sin().numpy()


class _Gemma:
    """Writes a Gemma decoder as ONNX nodes: the parts the prefill and decode graphs share. `source` is an exported
    graph of the decoder (loaded without its external data): its large initializers are referenced by name, with
    their external-data records, for the session to bind to the shared buffers; the RMSNorm weights are small and
    read from it, 1 + w folded in."""

    def __init__(self, source: onnx.ModelProto, config: PaliGemmaConfig, packed: bool = False):
        self.config, self.text, self.packed = config, config.text, packed
        self.weights = {init.name: init for init in source.graph.initializer}
        self.readers: dict[str, list[onnx.NodeProto]] = {}  # a tensor of the source graph -> the nodes reading it
        for node in source.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.ir_version, self.metadata = source.ir_version, list(source.metadata_props)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0
        cos, sin = rotary_tables(config)
        self.cos, self.sin = self.constant("rotary_cos", cos), self.constant("rotary_sin", sin)

    def op(self, op_type: str, inputs: list[str], hint: str, outputs: int | list[str] = 1, domain: str = "",
           **attrs) -> list[str]:
        self.count += 1
        names = outputs if isinstance(outputs, list) else [f"{hint}_{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{hint}_{self.count}", domain=domain, **attrs))
        return names

    def constant(self, name: str, value) -> str:
        if name not in {i.name for i in self.initializers}:
            self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def big(self, name: str) -> str:
        if name not in self.weights:
            raise KeyError(f"the exported graph has no initializer {name}")
        if name not in {i.name for i in self.initializers}:
            self.initializers.append(self.weights[name])
        return name

    def alias(self, name: str, suffix: str) -> str:
        """A second initializer named `name + suffix` with `name`'s bytes (the same external-data record)."""
        alias = name + suffix
        if alias not in {i.name for i in self.initializers}:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(self.weights[name])
            tensor.name = alias
            self.initializers.append(tensor)
        return alias

    def branches(self, hint: str, prefill, decode, shapes: list[list], outputs: list[str] | None = None) -> list[str]:
        """An If on the graph's `prefill` input: `prefill()` and `decode()` write each branch's nodes (they may read
        any tensor of the graph so far) and return its outputs, in the order of `shapes` (float tensors' dims).
        Returns the If's outputs (named `outputs`, or generated)."""
        graphs = []
        for name, build in (("prefill", prefill), ("decode", decode)):
            outer, self.nodes = self.nodes, []
            try:
                results = build()
                branch_nodes = self.nodes
            finally:
                self.nodes = outer
            values = [helper.make_tensor_value_info(r, TensorProto.FLOAT, dims) for r, dims in zip(results, shapes)]
            graphs.append(helper.make_graph(branch_nodes, f"{hint}_{self.count}_{name}", [], values))
        return self.op("If", [BRANCH], hint, outputs=outputs or len(shapes), then_branch=graphs[0],
                       else_branch=graphs[1])

    def weight_readers(self, module: str) -> list[onnx.NodeProto]:
        """The source graph's nodes that read the weight of `module`, in whatever form the export stored it: the
        initializers named after the parameter (the float matrix, its transpose, or quantized blocks and scales)."""
        parameter = f"{PREFIX}{module}.weight"
        found = {}
        for name in self.weights:
            if name == parameter or name.startswith(parameter + "_"):
                found.update((id(node), node) for node in self.readers.get(name, []))
        return list(found.values())

    def copy(self, node: onnx.NodeProto, inputs: dict[str, str], hint: str, output: str | None = None) -> str:
        """`node` of the source graph (one output) written on this graph's tensors: its non-initializer inputs
        renamed by `inputs`, its initializers referenced by name (the shared weights), its op and attributes as
        they are. Returns its output."""
        names = []
        for name in node.input:
            if name in inputs:
                names.append(inputs[name])
            elif name in self.weights:
                names.append(self.big(name))
            elif name == "":  # an optional input left out
                names.append(name)
            else:
                raise OnnxExportError(f"the exported graph's {node.op_type} node {node.name} reads {name}, which the "
                                      f"fused graph does not have; {AS_EXPORTED}")
        if len(node.output) != 1:
            raise OnnxExportError(f"the exported graph's {node.op_type} node {node.name} has {len(node.output)} "
                                  f"outputs; the fused graph copies one-output nodes only; {AS_EXPORTED}")
        (out,) = self.op(node.op_type, names, hint, outputs=[output] if output else 1, domain=node.domain)
        self.nodes[-1].attribute.extend(node.attribute)
        return out

    def linear(self, x: str, module: str, output: str | None = None) -> str:
        """x times `module`'s weight as the export multiplies by it: the exported graph's one node that reads the
        weight (MatMul on the float weight transposed, Gemm on the tied embedding, MatMulNBits on int8 or int4
        blocks), copied onto x with the same initializers and attributes."""
        products = [n for n in self.weight_readers(module) if "input_ids" not in n.input]  # not the token lookup
        if len(products) != 1:
            raise OnnxExportError(f"the exported graph multiplies by {PREFIX}{module}.weight in {len(products)} nodes, "
                                  f"not one; {AS_EXPORTED}")
        (node,) = products
        (activation,) = [name for name in node.input if name and name not in self.weights]
        hint = module.rsplit(".", 1)[-1]
        stored = self.output_rows(node)
        if stored:
            rows = slice_rows(*stored)
            if rows < stored[0].dims[0]:
                return self.sliced(node, x, stored, rows, hint, output)
        return self.copy(node, {activation: x}, hint, output)

    def output_rows(self, node: onnx.NodeProto) -> list[onnx.TensorProto]:
        """The stored tensors of a product whose first axis is its output channels, where it is multiplied in
        slices of them (`sliced`): a MatMulNBits' blocks and scales; in a pre-packed session, a float Gemm's weight
        read transposed (the tied output projection: ONNX Runtime packs it too). Empty for the others: a float
        MatMul's weight is [in, out] (a slice of its outputs is not a row range), and unpacked weights are read in
        place, never held twice."""
        if node.op_type == "MatMulNBits":
            stored = [self.weights[name] for name in node.input[1:3]]
        elif node.op_type == "Gemm" and self.packed and len(node.input) == 2:
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attributes != {"transB": 1}:
                return []
            stored = [self.weights[node.input[1]]]
        else:
            return []
        return stored if all(t.data_location == onnx.TensorProto.EXTERNAL for t in stored) else []

    def sliced(self, node: onnx.NodeProto, x: str, stored: list[onnx.TensorProto], rows: int, hint: str,
               output: str | None) -> str:
        """A product as several, each on `rows` output channels (aliases of row ranges of its `stored` tensors: the
        same bytes), their outputs concatenated. ONNX Runtime packs each weight while it holds the stored one, so a
        weight the size of the 3B's output projection would briefly be held twice; in slices, a slice is."""
        total, parts = stored[0].dims[0], []
        attributes = {a.name: a for a in node.attribute}
        for start in range(0, total, rows):
            count = min(rows, total - start)
            names = [self.alias_rows(t, start, count) for t in stored]
            parts.append(self.op(node.op_type, [x, *names], hint, domain=node.domain)[0])
            self.nodes[-1].attribute.extend(helper.make_attribute(name, count) if name == "N" else a
                                            for name, a in attributes.items())
        return self.op("Concat", parts, hint, outputs=[output] if output else 1, axis=-1)[0]

    def alias_rows(self, tensor: onnx.TensorProto, start: int, count: int) -> str:
        """An initializer for rows start..start + count of an external `tensor` (its first axis), over its bytes."""
        name = f"{tensor.name}.rows_{start}"
        if name not in {i.name for i in self.initializers}:
            record = {e.key: e.value for e in tensor.external_data}
            row_bytes = int(record["length"]) // tensor.dims[0]
            alias = onnx.TensorProto()
            alias.CopyFrom(tensor)
            alias.name = name
            alias.dims[0] = count
            del alias.external_data[:]
            record.update(offset=str(int(record.get("offset", 0)) + start * row_bytes), length=str(count * row_bytes))
            for key, value in record.items():
                alias.external_data.add(key=key, value=value)
            self.initializers.append(alias)
        return name

    def _norm_weight(self, module: str) -> str:
        w = numpy_helper.to_array(self.weights[f"{PREFIX}{module}.weight"]).astype(np.float32)
        return self.constant(f"{PREFIX}{module}.weight_plus_one", (1.0 + w).astype(np.float32))

    def rms(self, x: str, module: str) -> str:
        return self.op("SimplifiedLayerNormalization", [x, self._norm_weight(module)], "norm", axis=-1,
                       epsilon=float(self.text.rms_norm_eps), stash_type=1)[0]

    def skip_rms(self, x: str, residual: str, module: str) -> tuple[str, str]:
        """(rms(x + residual), x + residual)."""
        normed, _, _, total = self.op("SkipSimplifiedLayerNormalization", [x, residual, self._norm_weight(module)],
                                      "skipnorm", outputs=4, domain=MS, epsilon=float(self.text.rms_norm_eps))
        return normed, total

    def token_lookup(self, input_ids: str) -> str:
        """The embedding rows of input_ids [B, T] -> [B, T, C], as the export looks them up: its node reading the
        embedding and input_ids (Gather, or GatherBlockQuantized on the output projection's blocks), and the
        reshapes after it, copied."""
        lookups = [n for n in self.weight_readers(EMBEDDING) if "input_ids" in n.input]
        if len(lookups) != 1:
            raise OnnxExportError(f"the exported graph looks tokens up in {len(lookups)} nodes, not one; {AS_EXPORTED}")
        node = lookups[0]
        inputs = {"input_ids": input_ids}
        if self.packed or node.op_type == "GatherBlockQuantized":
            # A pre-packed output projection (a quantized one always is) has its stored matrix or blocks released
            # once packed; the lookup reads them under a name of its own (the same bytes), which ONNX Runtime maps
            # apart, so that the table is not held whole beside the packed copy: only the pages of the rows looked
            # up come in. (Unpacked, a float export's lookup reads the matrix its output projection reads in place
            # every step: no second name.)
            inputs[node.input[0]] = self.alias(node.input[0], LOOKUP_SUFFIX)
        rows = self.copy(node, inputs, "embed")
        while len(self.readers.get(node.output[0], [])) == 1:
            (after,) = self.readers[node.output[0]]
            if after.op_type not in LOOKUP_LAYOUT or not all(n in self.weights for n in after.input[1:]):
                break
            rows, node = self.copy(after, {node.output[0]: rows}, "embed"), after
        return rows

    def text_embedding(self, input_ids: str) -> str:
        gathered = self.token_lookup(input_ids)
        # Gemma scales text embeddings by sqrt(width), rounded to float32 as the model does.
        return self.op("Mul", [gathered,
                               self.constant("embedding_scale", np.float32(math.sqrt(self.text.hidden_size)))],
                       "embed_scale")[0]

    def last_token(self, x: str, axis: int = 1) -> str:
        """x's last position along `axis`, the axis kept (length 1)."""
        return self.op("Slice", [x, self.constant("minus_one", np.array([-1], dtype=np.int64)),
                                 self.constant("int64_max", np.array([2**63 - 1], dtype=np.int64)),
                                 self.constant(f"axis_{axis}_list", np.array([axis], dtype=np.int64))], "last")[0]

    def layers(self, x: str, attention, last_token_only: bool = False) -> tuple[str, str]:
        """Every decoder layer over x [B, T, C]; attention(i, h) -> attention output [B, T, H * D] before o_proj.
        Returns (the last layer's output, the residual stream), not yet added: the final norm fuses the add.
        With last_token_only, the last layer's attention returns the last token's row only ([B, 1, H * D]), and
        the rest of that layer runs on that row: the logits read nothing else."""
        t = self.text
        pending = None  # a layer's output not yet added to x (its add is fused into the next norm)
        for i in range(t.num_hidden_layers):
            layer = f"layers.{i}"
            if pending is None:
                h = self.rms(x, f"{layer}.input_layernorm")
            else:
                h, x = self.skip_rms(pending, x, f"{layer}.input_layernorm")
            attn = self.linear(attention(i, h), f"{layer}.self_attn.o_proj")
            if last_token_only and i == t.num_hidden_layers - 1:
                x = self.last_token(x)
            if t.is_gemma2:
                attn = self.rms(attn, f"{layer}.post_attention_layernorm")
                h, x = self.skip_rms(attn, x, f"{layer}.pre_feedforward_layernorm")
            else:
                h, x = self.skip_rms(attn, x, f"{layer}.post_attention_layernorm")
            gate, up = self.linear(h, f"{layer}.mlp.gate_proj"), self.linear(h, f"{layer}.mlp.up_proj")
            (act,) = self.op("FastGelu" if t.hidden_activation in GELU_TANH else "Gelu", [gate], "gelu", domain=MS)
            pending = self.linear(self.op("Mul", [act, up], "glu")[0], f"{layer}.mlp.down_proj")
            if t.is_gemma2:
                pending = self.rms(pending, f"{layer}.post_feedforward_layernorm")
        return pending, x

    def logits(self, hidden: str) -> None:
        """hidden [B, C] -> the output `logits` [B, V]. The output projection is tied to the embedding matrix,
        multiplied by as the export does (a float Gemm reads it transposed, with no copy)."""
        cap = self.text.final_logit_softcapping
        raw = self.linear(hidden, EMBEDDING, output="logits" if cap is None else None)
        if cap is not None:
            cap_name = self.constant("final_softcap", np.float32(cap))
            (bounded,) = self.op("Tanh", [self.op("Div", [raw, cap_name], "softcap")[0]], "softcap")
            self.op("Mul", [bounded, cap_name], "softcap", outputs=["logits"])

    def model(self, name: str, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)],
                                  producer_name="paligemma-export-fused")
        model.ir_version = self.ir_version
        model.metadata_props.extend(self.metadata)
        return model


def bias_name(window: int | None) -> str:
    return "attention_bias" if window is None else f"window_{window}_bias"


def fused_model(source: onnx.ModelProto, config: PaliGemmaConfig, packed: bool = False) -> onnx.ModelProto:
    """The fused graph, from the exported prefill (`source`, loaded without its external data): one graph that runs
    a prefill or one decode step, as its bool input `prefill` says. Every product by a weight is one node of the
    main graph, whichever the step, so one session holds each weight once (ONNX Runtime pre-packs a weight once per
    node that reads it; a weight read in both branches of an If was packed twice while the session was made). What
    differs sits in small If nodes on `prefill`: merging the image rows into the prompt's embeddings, and each
    layer's attention.

    - prefill: com.microsoft RotaryEmbedding for queries and keys, then attention in standard ops over additive
      masks given as inputs, one per distinct window, made per request by the library's one rule
      (paligemma/masks.py), so that the prefix-LM mask and padding are exact (GroupQueryAttention is causal only);
      `present` is the prompt's keys and values, [B, K, T, D];
    - decode: one com.microsoft GroupQueryAttention (rotary, attention, softcap, window) over a preallocated cache
      that is both its past and its present (bound to the same buffers: written in place).

    The last layer computes keys and values for every token (the cache) but queries, attention, o_proj and the MLP
    for the last token only, the one row the logits read (attention is row by row, so that row is as computed in
    full); in a decode step that row is the only one.

    Inputs: prefill [] bool; input_ids [B, T] int64 and position_ids [B, T] int64 (T = 1 in decode); prefill's:
    image_embeddings [B, N, C], attention_bias and window_{w}_bias [B, 1, 1, T, T] float32 (0 or the float32
    minimum); decode's: seqlens_k [B] int32 (each row's slot for the new token: its real tokens so far),
    total_sequence_length [] int32 (max seqlens_k + 1), past_key_values.{i}.{key,value} [B, K, M, D]. A call feeds
    the other step's inputs empty (`branch_inputs`). Outputs: logits [B, V] float32 (the last token's),
    present.{i}.{key,value}."""
    t = config.text
    C, H, K, D, L = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.num_hidden_layers
    G = H // K
    g = _Gemma(source, config, packed)
    past, present = cache_names("past_key_values", L), cache_names("present", L)
    q_shape = g.constant("q_shape", np.array([0, 0, K, G, D], dtype=np.int64))  # 0: the dimension as it is
    kv_shape = g.constant("kv_shape", np.array([0, 0, K, D], dtype=np.int64))
    out_shape = g.constant("out_shape", np.array([0, 0, H * D], dtype=np.int64))
    axis_2 = g.constant("axis_2", np.array([2], dtype=np.int64))
    last_axis = g.constant("last_axis", np.array([-1], dtype=np.int64))
    scale = g.constant("attention_scale", np.float32(t.attention_scale))

    def image_merge(text: str) -> list[str]:
        # The i-th <image> token of a row takes the row's i-th image embedding (as model.embed does).
        (is_image,) = g.op("Equal", ["input_ids", g.constant("image_token", np.int64(config.image_token_index))],
                           "image")
        (count,) = g.op("CumSum", [g.op("Cast", [is_image], "image", to=TensorProto.INT64)[0],
                                   g.constant("axis_1", np.int64(1))], "image")
        (index,) = g.op("Max", [g.op("Sub", [count, g.constant("one", np.int64(1))], "image")[0],
                                g.constant("zero", np.int64(0))], "image")
        (image,) = g.op("GatherND", ["image_embeddings", g.op("Unsqueeze", [index, last_axis], "image")[0]], "image",
                        batch_dims=1)
        return g.op("Where", [g.op("Unsqueeze", [is_image, last_axis], "image")[0], image, text], "merge")

    def grouped(x: str) -> str:
        """[B, K, G, T, X] -> [B, K, 1, G * T, X]: a key head's query heads as one matrix."""
        return g.op("Reshape", [x, g.constant("grouped_shape", np.array([0, 0, 1, -1, 0], dtype=np.int64))], "group")[0]

    def ungrouped(x: str) -> str:
        """[B, K, 1, G * T, X] -> [B, K, G, T, X]."""
        return g.op("Reshape", [x, g.constant("ungrouped_shape", np.array([0, 0, G, -1, 0], dtype=np.int64))],
                    "group")[0]

    def prefill_attention(i: int, q: str, k: str, v: str) -> list[str]:
        """Attention over the prompt; the last layer's q is the last token's only (so are its mask row and
        position)."""
        last_layer = i == L - 1
        q_positions = g.last_token("position_ids") if last_layer else "position_ids"
        (q,) = g.op("RotaryEmbedding", [q, q_positions, g.cos, g.sin], "rope", domain=MS, num_heads=H, interleaved=0)
        (k,) = g.op("RotaryEmbedding", [k, "position_ids", g.cos, g.sin], "rope", domain=MS, num_heads=K, interleaved=0)
        # Grouped-query attention without copying keys, as the torch model: [B, K, G, T, D] against [B, K, 1, T, D].
        (q,) = g.op("Transpose", [g.op("Reshape", [q, q_shape], "q")[0]], "q", perm=[0, 2, 3, 1, 4])
        (k,) = g.op("Reshape", [k, kv_shape], "k")  # [B, T, K, D]
        (keys_out,) = g.op("Transpose", [k], "k", perm=[0, 2, 1, 3])
        (values_out,) = g.op("Transpose", [g.op("Reshape", [v, kv_shape], "v")[0]], "v", perm=[0, 2, 1, 3])
        (keys,) = g.op("Unsqueeze", [g.op("Transpose", [k], "k", perm=[0, 2, 3, 1])[0], axis_2], "k")  # [B,K,1,D,T]
        # Each (row, key head)'s G query heads multiply as one matrix [G * T, D] (`grouped`), as they do in a batch
        # of one, where ONNX Runtime folds them so: with several rows it would multiply each head alone, and the last
        # layer's single query would then take MLAS' one-row kernel (other bits). So a row's prefill gives the same
        # bits in a batch of images as alone (OnnxBatchEngine.prefill_many).
        (scores,) = g.op("Mul", [ungrouped(g.op("MatMul", [grouped(q), keys], "scores")[0]), scale], "scores")
        if t.attn_logit_softcapping is not None:
            cap = g.constant("attention_softcap", np.float32(t.attn_logit_softcapping))
            (bounded,) = g.op("Tanh", [g.op("Div", [scores, cap], "softcap")[0]], "softcap")
            (scores,) = g.op("Mul", [bounded, cap], "softcap")
        bias = bias_name(t.layer_window(i))
        bias = g.last_token(bias, axis=3) if last_layer else bias  # the last query's row of the mask
        (probs,) = g.op("Softmax", [g.op("Add", [scores, bias], "mask")[0]], "softmax", axis=-1)
        values = g.op("Unsqueeze", [values_out, axis_2], "v")[0]
        out = ungrouped(g.op("MatMul", [grouped(probs), values], "attend")[0])  # [B, K, G, T, D]
        (out,) = g.op("Reshape", [g.op("Transpose", [out], "out", perm=[0, 3, 1, 2, 4])[0], out_shape], "out")
        return [out, keys_out, values_out]

    def decode_attention(i: int, q: str, k: str, v: str) -> list[str]:
        window = t.layer_window(i)
        attrs = dict(num_heads=H, kv_num_heads=K, scale=float(t.attention_scale), do_rotary=1, rotary_interleaved=0,
                     # ONNX Runtime's window size is the torch rule's w (keys at slots > query - w), as
                     # measured against torch (tests/test_fused.py): not w - 1.
                     local_window_size=-1 if window is None else window)
        if t.attn_logit_softcapping is not None:
            attrs["softcap"] = float(t.attn_logit_softcapping)
        return g.op("GroupQueryAttention", [q, k, v, past[2 * i], past[2 * i + 1], "seqlens_k",
                                            "total_sequence_length", g.cos, g.sin, "position_ids"],
                    "attention", outputs=3, domain=MS, **attrs)

    def attention(i: int, h: str) -> str:
        q = g.linear(g.last_token(h) if i == L - 1 else h, f"layers.{i}.self_attn.q_proj")
        k, v = (g.linear(h, f"layers.{i}.self_attn.{p}_proj") for p in "kv")
        cache = ["batch", K, f"length_{i}", D]
        out, _, _ = g.branches("attention", lambda: prefill_attention(i, q, k, v), lambda: decode_attention(i, q, k, v),
                               shapes=[["batch", "rows", H * D], cache, cache],
                               outputs=[f"attention_{i}", present[2 * i], present[2 * i + 1]])
        return out

    text = g.text_embedding("input_ids")
    (x,) = g.branches("embed", lambda: image_merge(text), lambda: g.op("Identity", [text], "embed"),
                      shapes=[["batch", "sequence", C]])
    pending, x = g.layers(x, attention, last_token_only=True)  # [B, 1, C]
    last = g.constant("last", np.int64(-1))
    hidden, _ = g.skip_rms(g.op("Gather", [pending, last], "last", axis=1)[0],
                           g.op("Gather", [x, last], "last", axis=1)[0], "norm")
    g.logits(hidden)
    cache = lambda name, length: helper.make_tensor_value_info(name, TensorProto.FLOAT,  # noqa: E731
                                                               ["batch", K, length, D])
    windows = sorted({t.layer_window(i) for i in range(L)}, key=lambda w: -1 if w is None else w)
    square = ["batch", 1, 1, "mask_rows", "mask_columns"]
    inputs = [
        helper.make_tensor_value_info(BRANCH, TensorProto.BOOL, []),
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, ["batch", "image_tokens", C]),
        *[helper.make_tensor_value_info(bias_name(w), TensorProto.FLOAT, square) for w in windows],
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        *[cache(name, "capacity") for name in past],
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", t.vocab_size])] + [
        cache(name, "present_length") for name in present]
    return g.model("fused", inputs, outputs)


def branch_inputs(config: PaliGemmaConfig, prefill: bool) -> dict[str, np.ndarray]:
    """The flag and the other branch's inputs, empty (the branch that runs reads none of them)."""
    t = config.text
    if prefill:
        empty_cache = np.zeros((1, t.num_key_value_heads, 0, t.head_dim), dtype=np.float32)
        return {BRANCH: np.array(True), "seqlens_k": np.zeros(1, dtype=np.int32),
                "total_sequence_length": np.array(0, dtype=np.int32),
                **{name: empty_cache for name in cache_names("past_key_values", t.num_hidden_layers)}}
    windows = {t.layer_window(i) for i in range(t.num_hidden_layers)}
    return {BRANCH: np.array(False), "image_embeddings": np.zeros((1, 0, t.hidden_size), dtype=np.float32),
            **{bias_name(w): np.zeros((1, 1, 1, 0, 0), dtype=np.float32) for w in windows}}


def _prefill_source(onnx_dir: Path) -> onnx.ModelProto:
    """The exported prefill graph (the fused graph copies its product nodes) without its external data, but for the
    RMSNorm weights, which the fused graph reads (1 + w folded in)."""
    source = onnx.load(Path(onnx_dir) / "prefill.onnx", load_external_data=False)
    for tensor in source.graph.initializer:
        if tensor.name.endswith("norm.weight") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(tensor, str(onnx_dir))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return source


def fused_session(onnx_dir: Path, config: PaliGemmaConfig, options: ort.SessionOptions, providers: list,
                  prepack: bool) -> ort.InferenceSession:
    """A session of the fused graph (`fused_model`) of the export in `onnx_dir`, whose prefill.onnx the caller has
    checked against the manifest. The session reads the weights from the export's data file itself (ONNX Runtime
    maps the file). `prepack`: ONNX Runtime lays out each weight once and releases the stored one (the graph then
    reads the lookup's table under a name of its own and the output projection in slices); otherwise every weight
    is read in place from the mapped file."""
    graph = fused_model(_prefill_source(onnx_dir), config, packed=prepack)
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    # The graph is built in memory: its external-data records resolve against the export.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(onnx_dir))
    return ort.InferenceSession(graph.SerializeToString(), options, providers=providers)
