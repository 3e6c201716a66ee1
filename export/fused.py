"""A decode graph that does only a token's work, for ONNX Runtime on CPU: built at session start from the config
and the exported decode graph's own weights (no file is written, so the export's manifest and its hashes stay as
they are; the weights are the same shared, hash-checked tensors, referenced by name).

Per layer it runs about 12 kernels where the traced graph runs ~86: every shape is a constant of the config
(heads K and H, head dim D, widths; only the batch and the cache length are dynamic), Gemma's RMSNorm
x * (1 + w) is SimplifiedLayerNormalization with 1 + w folded into a small stored copy of w, residual adds are
fused into SkipSimplifiedLayerNormalization, GELU (tanh) is FastGelu, and rotary embedding, attention, Gemma 2's
attention softcap and sliding window are one com.microsoft GroupQueryAttention over a preallocated cache that is
its own past and present (written in place: no Concat).

GroupQueryAttention is causal over each row's first seqlens_k + 1 cache slots: it knows no padding. This
project's batches are left-padded (paligemma/processor.py), so the engine moves each row's real keys to the
front of its buffer once, after prefill (`compact_rows`); a row's keys then sit in slots 0..n-1 and the new one at
slot n. For the decode token this is exact: it attends to every real earlier token (the prefix-LM rule gives the
new token a causal row, paligemma/masks.py), and the sliding window counts slots back from the query, which the
shift moves together (a padded slot inside the window was masked anyway). Positions are passed as position_ids,
PaliGemma's count of real tokens from 1, so rotary is as in torch. Prefill keeps the exported graph with its
exact prefix-LM mask.

Axes: B batch, M cache capacity (slots), C width, H query heads, K key/value heads, D head dim, F MLP width.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from paligemma.config import PaliGemmaConfig

from .graphs import cache_names

MS = "com.microsoft"
GELU_TANH = {"gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"}
PREFIX = "model.language_model.model."
# Rows of the rotary tables: positions the fused graph can rotate (PaliGemma counts from 1).
MIN_ROTARY_POSITIONS = 4096


def unsupported(config: PaliGemmaConfig, dtype: str) -> str | None:
    """Why the fused decode graph cannot serve this export, or None when it can."""
    t = config.text
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


class _Builder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def op(self, op_type: str, inputs: list[str], hint: str, outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        names = [self.name(f"{hint}_out{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(hint), domain=domain, **attrs))
        return names

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name


def fused_decode_model(decode: onnx.ModelProto, config: PaliGemmaConfig) -> onnx.ModelProto:
    """The fused decode graph. `decode` is the exported decode graph (loaded without its external data): its
    large initializers are referenced by name, with their external-data records, for the session to bind to the
    shared buffers; the RMSNorm weights are small and read from it, 1 + w folded in.

    Inputs: input_ids [B, 1] int64, position_ids [B, 1] int64, seqlens_k [B] int32 (each row's slot for the new
    token: its real tokens so far), total_sequence_length [] int32 (max seqlens_k + 1), past_key_values.{i}.{key,value}
    [B, K, M, D]. Outputs: logits [B, V] float32, present.{i}.{key,value}: the same buffers, written in place."""
    t = config.text
    C, H, K, D, L = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.num_hidden_layers
    weights = {init.name: init for init in decode.graph.initializer}
    b = _Builder()

    def big(name: str) -> str:
        if name not in weights:
            raise KeyError(f"the decode graph has no initializer {name}")
        b.initializers.append(weights[name])
        return name

    def norm_weight(module: str) -> str:
        w = numpy_helper.to_array(weights[f"{PREFIX}{module}.weight"]).astype(np.float32)
        return b.constant(f"{PREFIX}{module}.weight_plus_one", (1.0 + w).astype(np.float32))

    eps = float(t.rms_norm_eps)

    def rms(x: str, module: str) -> str:
        return b.op("SimplifiedLayerNormalization", [x, norm_weight(module)], "norm", axis=-1, epsilon=eps,
                    stash_type=1)[0]

    def skip_rms(x: str, residual: str, module: str) -> tuple[str, str]:
        """(rms(x + residual), x + residual)."""
        normed, _, _, total = b.op("SkipSimplifiedLayerNormalization", [x, residual, norm_weight(module)],
                                   "skipnorm", outputs=4, domain=MS, epsilon=eps)
        return normed, total

    cos, sin = rotary_tables(config)
    cos_name, sin_name = b.constant("rotary_cos", cos), b.constant("rotary_sin", sin)
    embed = big(f"{PREFIX}embed_tokens.weight")
    scale = b.constant("embedding_scale", np.array(math.sqrt(C), dtype=np.float32))
    (gathered,) = b.op("Gather", [embed, "input_ids"], "embed")
    (x,) = b.op("Mul", [gathered, scale], "embed_scale")  # [B, 1, C]
    pending = None  # the last layer's output not yet added to x (its add is fused into the next norm)
    past, present = cache_names("past_key_values", L), cache_names("present", L)
    for i in range(L):
        layer = f"layers.{i}"
        if pending is None:
            h = rms(x, f"{layer}.input_layernorm")
        else:
            h, x = skip_rms(pending, x, f"{layer}.input_layernorm")
        q, k, v = (b.op("MatMul", [h, big(f"{PREFIX}{layer}.self_attn.{p}_proj.weight_transposed")], f"{p}_proj")[0]
                   for p in "qkv")
        window = t.layer_window(i)
        attrs = dict(num_heads=H, kv_num_heads=K, scale=float(t.attention_scale), do_rotary=1, rotary_interleaved=0,
                     # ONNX Runtime's window size is the torch rule's w (keys at slots > query - w), as
                     # measured against torch (tests/test_fused.py): not w - 1.
                     local_window_size=-1 if window is None else window)
        if t.attn_logit_softcapping is not None:
            attrs["softcap"] = float(t.attn_logit_softcapping)
        b.nodes.append(helper.make_node(
            "GroupQueryAttention",
            [q, k, v, past[2 * i], past[2 * i + 1], "seqlens_k", "total_sequence_length", cos_name, sin_name,
             "position_ids"],
            [f"attention_{i}", present[2 * i], present[2 * i + 1]], name=f"attention_{i}", domain=MS, **attrs))
        (attn,) = b.op("MatMul", [f"attention_{i}", big(f"{PREFIX}{layer}.self_attn.o_proj.weight_transposed")],
                       "o_proj")
        if t.is_gemma2:
            attn = rms(attn, f"{layer}.post_attention_layernorm")
            h, x = skip_rms(attn, x, f"{layer}.pre_feedforward_layernorm")
        else:
            h, x = skip_rms(attn, x, f"{layer}.post_attention_layernorm")
        (gate,) = b.op("MatMul", [h, big(f"{PREFIX}{layer}.mlp.gate_proj.weight_transposed")], "gate_proj")
        (up,) = b.op("MatMul", [h, big(f"{PREFIX}{layer}.mlp.up_proj.weight_transposed")], "up_proj")
        if t.hidden_activation in GELU_TANH:
            (act,) = b.op("FastGelu", [gate], "gelu", domain=MS)
        else:
            (act,) = b.op("Gelu", [gate], "gelu", domain=MS)
        (prod,) = b.op("Mul", [act, up], "glu")
        (pending,) = b.op("MatMul", [prod, big(f"{PREFIX}{layer}.mlp.down_proj.weight_transposed")], "down_proj")
        if t.is_gemma2:
            pending = rms(pending, f"{layer}.post_feedforward_layernorm")
    hidden, _ = skip_rms(pending, x, "norm")
    flat_shape = b.constant("flat_shape", np.array([-1, C], dtype=np.int64))
    (flat,) = b.op("Reshape", [hidden, flat_shape], "flatten")
    # The output projection is tied to the embedding matrix: Gemm reads it transposed, with no copy.
    cap = t.final_logit_softcapping
    logits_name = "logits" if cap is None else "raw_logits"
    b.nodes.append(helper.make_node("Gemm", [flat, embed], [logits_name], name="lm_head", transB=1))
    if cap is not None:
        cap_name = b.constant("final_softcap", np.array(cap, dtype=np.float32))
        (scaled,) = b.op("Div", [logits_name, cap_name], "softcap_div")
        (bounded,) = b.op("Tanh", [scaled], "softcap_tanh")
        b.nodes.append(helper.make_node("Mul", [bounded, cap_name], ["logits"], name="softcap_mul"))

    V = t.vocab_size
    cache = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", K, "capacity", D])  # noqa: E731
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 1]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", 1]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ] + [cache(n) for n in past]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", V])] + [cache(n) for n in present]
    graph = helper.make_graph(b.nodes, "fused_decode", inputs, outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)],
                              producer_name="paligemma-export-fused")
    model.ir_version = decode.ir_version
    for prop in decode.metadata_props:
        model.metadata_props.append(prop)
    return model


def fused_session(onnx_dir: Path, config: PaliGemmaConfig, options: ort.SessionOptions,
                  providers: list) -> ort.InferenceSession:
    """A session of the fused decode graph of the export in `onnx_dir`, whose decode.onnx the caller has checked
    against the manifest. `options` must supply the decoder weights (add_initializer, as the runtime does)."""
    decode = onnx.load(Path(onnx_dir) / "decode.onnx", load_external_data=False)
    graph = fused_decode_model(decode, config)
    # The graph is built in memory: its (overridden) external-data records resolve against the export.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(onnx_dir))
    return ort.InferenceSession(graph.SerializeToString(), options, providers=providers)
