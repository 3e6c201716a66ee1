"""`python -m export --format transformers.js`: the folder transformers.js (and the onnx-community PaliGemma repos)
load, written with the default export's streaming machinery.

    OUT/config.json                 the model's config + transformers.js_config.use_external_data_format
    OUT/preprocessor_config.json    SiglipImageProcessor as PaliGemma uses it (bicubic, 1/255, mean/std 0.5)
    OUT/tokenizer.json              the checkpoint's, without a post-processor (see `tokenizer_json`)
    OUT/tokenizer_config.json, generation_config.json
    OUT/onnx/vision_encoder{suffix}.onnx, embed_tokens{suffix}.onnx, decoder_model_merged{suffix}.onnx
    OUT/onnx/NAME{suffix}.onnx_data[_N]   their weights, in chunks under 2 GB (export/transformers_js/data.py)
    OUT/onnx/mask_decoder.onnx      when the checkpoint ships a mask decoder (export/writer/mask_decoder.py: float32 in
                                    every variant), listed in config.json as transformers.js_config.mask_decoder;
                                    transformers.js ignores both, this project's loop and the in-browser page use them

The graphs (export/transformers_js/graphs.py) are traced on the hollow model with the weights as inputs, and
each weight goes through WeightWriter.attach into the graph's chunked data, block by block from the checkpoint:
the same memory bound as the default export, quantized on the way with `quantize` (export/quantize.py). A float
weight larger than a chunk (the 3B float32 embedding) is stored as row blocks (export/transformers_js/split.py).
Suffixes are transformers.js' (`VARIANTS`): "" float32, "_fp16", "_quantized" int8, "_q4" int4, "_q4f16" int4
in a float16 graph.
Everything is written into a staging folder inside OUT and moved into place at the end, config.json last, so a
failed export leaves nothing that looks complete (and an earlier variant in OUT untouched).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from tqdm.auto import tqdm

from paligemma.checkpoint import Checkpoint
from paligemma.errors import OnnxExportError

from ..quantize import INT4_FLOAT16, MS_DOMAIN, SCHEMES, STANDARD_INT8, QuantizedMatMul, quantize_lookup
from ..writer.checkpoint_stream import CheckpointStream
from ..writer.manifest import EXPORTER_VERSION, config_hash
from ..writer.mask_decoder import describe as describe_mask_decoder
from ..writer.mask_decoder import write_mask_decoder
from ..writer.onnx_export import (
    DEFAULT_OPSET,
    DTYPES,
    IR_VERSION,
    check_free_space,
    check_options,
    removed_on_failure,
    set_metadata,
    tie_lm_head,
    trace_to_onnx,
)
from ..writer.streaming import (
    TRACED_PREFIX,
    WeightsAsInputs,
    WeightWriter,
    embedding_input,
    hollow_model,
    rename_inputs,
)
from .data import CHUNK_BYTES, ChunkedExternalData
from .graphs import GRAPH_ORDER, example_inputs, graph_modules, graph_specs
from .split import split_large_weights

FORMAT = "transformers.js"
CONFIG_KEY = "transformers.js_config"
MASK_DECODER_KEY = "mask_decoder"  # under CONFIG_KEY: the mask decoder's graph in onnx/ (export/writer/mask_decoder.py)


@dataclass(frozen=True)
class Variant:
    """One set of graph files in the folder: the weights' dtype and quantization, and transformers.js' name (its
    `dtype` option) and file suffix for them (utils/dtypes.js, DEFAULT_DTYPE_SUFFIX_MAPPING)."""

    dtype: str
    quantize: str | None
    name: str
    suffix: str
    scheme: str | None = None  # how export/quantize.py stores `quantize` here (SCHEMES)

    @property
    def label(self) -> str:
        return self.dtype if self.quantize is None else f"{self.dtype}, {self.quantize}"

    @property
    def reference_dtype(self) -> str:
        """The torch model validation compares with: a quantization's tolerance is measured against float32."""
        return "float32" if self.quantize else self.dtype

    @property
    def quantized_lookup(self) -> bool:
        """embed_tokens reads the embedding's blocks (GatherBlockQuantized): the MatMulNBits schemes."""
        return self.scheme is not None and not SCHEMES[self.scheme].standard_ops


# int8 in standard ops (MatMulInteger), as transformers.js' own _quantized files are: every runtime it uses runs them
# (onnxruntime-web's WebAssembly build is tested with it; com.microsoft MatMulNBits 8-bit there is not).
# q4f16: the float16 graph with int4 blocks whose scales are float16, as MatMulNBits and GatherBlockQuantized want
# them beside float16 activations; inputs and outputs stay float32, as in every variant here (docs/transformers-js.md).
VARIANTS = (Variant("float32", None, "fp32", ""), Variant("float16", None, "fp16", "_fp16"),
            Variant("float32", "int8", "q8", "_quantized", STANDARD_INT8),
            Variant("float32", "int4", "q4", "_q4", "int4"),
            Variant("float16", "int4", "q4f16", "_q4f16", INT4_FLOAT16))


def find_variant(dtype: str = "float32", quantize: str | None = None) -> Variant:
    for variant in VARIANTS:
        if (variant.dtype, variant.quantize) == (dtype, quantize):
            return variant
    raise OnnxExportError(f"--dtype {dtype}{f' --quantize {quantize}' if quantize else ''} has no transformers.js "
                          f"variant here; choose one of: {', '.join(v.label for v in VARIANTS)}")


def is_transformers_js_export(folder) -> bool:
    folder = Path(folder)
    return (folder / "config.json").exists() and any((folder / "onnx").glob("decoder_model_merged*.onnx"))


def graph_file(name: str, variant: Variant) -> str:
    return f"{name}{variant.suffix}.onnx"


def export_transformers_js(source, output, *, dtype: str = "float32", quantize: str | None = None,
                           opset: int = DEFAULT_OPSET, chunk_bytes: int = CHUNK_BYTES, progress: bool = True,
                           log=print) -> dict:
    """Export the checkpoint `source` (a Checkpoint, folder or Hub repo id) into `output` in transformers.js' layout;
    returns config.json's content."""
    variant = find_variant(dtype, quantize)  # this layout's own combinations: q4f16 is float16 with int4
    check_options(output, dtype, None, opset)
    start = time.perf_counter()
    output = Path(output)
    checkpoint = Checkpoint.resolve(source)
    with removed_on_failure(output):
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output, prefix=".staging-") as staging:
            staging = Path(staging)
            config = write_folder(checkpoint, staging, output, variant, opset, chunk_bytes, progress, log)
            publish(staging, output)
    log(f"exported {checkpoint.folder} to {output} (transformers.js layout, {variant.label}) in "
        f"{time.perf_counter() - start:.1f}s")
    return config


def stored_bytes(source: CheckpointStream, name: str, dtype: torch.dtype, scheme: str | None) -> int:
    """About what one checkpoint tensor takes in the data files: its matrices as `scheme` stores them."""
    shape = source.tensors[name].shape
    return source.nbytes(name, dtype) if scheme is None or len(shape) != 2 else SCHEMES[scheme].nbytes(*shape)


def write_folder(checkpoint: Checkpoint, staging: Path, output: Path, variant: Variant, opset: int, chunk_bytes: int,
                 progress: bool, log=print) -> dict:
    torch_dtype = DTYPES[variant.dtype]
    config = checkpoint.config
    source = CheckpointStream(checkpoint)
    model = hollow_model(config, torch_dtype)
    source.check_against(model)
    embedding = next(name for name in source.tensors if name.endswith("embed_tokens.weight"))
    # Every weight once, and the embedding a second time: embed_tokens and the decoder's tied projection each hold it.
    # (int4 stores both as 4-bit blocks; int8's lookup stays float.)
    check_free_space(staging, sum(stored_bytes(source, n, torch_dtype, variant.scheme) for n in source.tensors)
                     + stored_bytes(source, embedding, torch_dtype,
                                    variant.scheme if variant.quantized_lookup else None))
    meta = dict(config_hash=config_hash(config), weights_fingerprint=checkpoint.fingerprint,
                exporter_version=EXPORTER_VERSION, dtype=variant.dtype, quantize=variant.quantize or "none",
                format=FORMAT, opset=opset, torch_version=torch.__version__)
    specs, modules, inputs = graph_specs(config), graph_modules(model), example_inputs(config)
    writer = WeightWriter(source, torch_dtype,
                          lambda items, what: tqdm(list(items), desc=f"{what} weights", disable=not progress),
                          quantize=variant.scheme)
    (staging / "onnx").mkdir()
    chunks = {}
    for name in tqdm(GRAPH_ORDER, desc="exporting (transformers.js)", disable=not progress):
        file = graph_file(name, variant)
        workdir = staging / f".trace-{name}"
        workdir.mkdir()
        module = WeightsAsInputs(modules[name])
        graph = trace_to_onnx(module, module.example_inputs(inputs[name]), specs[name], workdir / file, opset,
                              module.names)
        if name == "decoder_model_merged":
            tie_lm_head(graph, next(w for w in module.names if w.endswith("embed_tokens.weight")))
        with ChunkedExternalData(staging / "onnx", file, chunk_bytes) as store:
            if variant.quantized_lookup and name == "embed_tokens":
                quantize_embed_tokens(graph, writer, store, variant.scheme)
            # What stays float and is larger than a chunk is split; attach quantizes the decoder's projection.
            quantized = variant.quantize and name == "decoder_model_merged"
            split_large_weights(graph, writer, store, chunk_bytes,
                                skip={embedding_input(writer.weight_inputs(graph))} if quantized else set())
            writer.attach(graph, name, store)
        chunks[file] = store.count
        set_metadata(graph, name, meta)
        onnx.save(graph, str(staging / "onnx" / file))
        del graph
        shutil.rmtree(workdir)
        try:
            onnx.checker.check_model(str(staging / "onnx" / file), full_check=True)
        except onnx.checker.ValidationError as e:
            raise OnnxExportError(f"{output / 'onnx' / file} fails onnx.checker: {e}") from None
    write_json(staging / "tokenizer.json", tokenizer_json(checkpoint.folder))
    write_json(staging / "tokenizer_config.json", tokenizer_config(config))
    write_json(staging / "preprocessor_config.json", preprocessor_config(config))
    write_json(staging / "generation_config.json", generation_config(config))
    content = model_config(config, chunks, output / "config.json")
    if write_mask_decoder(checkpoint, staging / "onnx", opset, IR_VERSION, log) is not None:
        content[CONFIG_KEY][MASK_DECODER_KEY] = describe_mask_decoder()
    write_json(staging / "config.json", content)
    return content


def quantize_embed_tokens(graph: onnx.ModelProto, writer: WeightWriter, store: ChunkedExternalData,
                          scheme: str) -> None:
    """int4 (and q4f16): the lookup reads the embedding's int4 blocks (GatherBlockQuantized), as the three-graph int4
    export's lookup does, so embed_tokens holds 4-bit rows, not float ones (at 3B float32, 0.33 GB where a float
    lookup took 2.1 GB). attach quantizes only MatMul and Gemm weights, and this graph has only the Gather."""
    g = graph.graph
    weight = embedding_input(writer.weight_inputs(graph))
    rows, width = writer.source.tensors[weight.removeprefix(TRACED_PREFIX)].shape
    name = weight + f"_{scheme}"
    target = quantize_lookup(g, weight, QuantizedMatMul(weight.removeprefix(TRACED_PREFIX), scheme, name,
                                                        name + "_scale", rows, width))
    if target.lookup_scale is None:
        raise OnnxExportError("embed_tokens has no token lookup on the embedding; the graph layout changed")
    stored, _, lookup_scale = writer.quantized_initializers(target, store)
    g.initializer.extend([stored, lookup_scale])  # the [N, blocks] scales alias these bytes; MatMulNBits is absent
    rename_inputs(g, {k: v for k, v in ((target.weight, stored.name), (target.lookup_scale, lookup_scale.name))
                      if k != v})
    if not any(o.domain == MS_DOMAIN for o in graph.opset_import):
        graph.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


def publish(staging: Path, output: Path) -> None:
    """Moves the staged files into `output`, config.json last: until it is replaced, the folder is the earlier one.
    An earlier export of the same variant loses its data chunks first (it may have had more)."""
    for graph in (staging / "onnx").glob("*.onnx"):
        for stale in (output / "onnx").glob(graph.name + "_data*"):
            stale.unlink()
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == "config.json")
    for path in files:
        target = output / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def model_config(config, chunks: dict[str, int], existing: Path) -> dict:
    """config.json: the model's own (explicit head_dim, num_key_value_heads, model_type in text_config), with
    transformers.js' external data chunk counts per graph file, merged with an earlier variant's in the folder."""
    content = config.to_dict()
    counts = {}
    if existing.exists():
        try:
            counts = json.loads(existing.read_text()).get(CONFIG_KEY, {}).get("use_external_data_format", {})
        except (json.JSONDecodeError, AttributeError):
            counts = {}
    counts = {**counts, **{file: count for file, count in chunks.items()}}
    content[CONFIG_KEY] = dict(use_external_data_format={f: c for f, c in sorted(counts.items()) if c})
    return content


def tokenizer_json(folder: Path) -> dict:
    """The checkpoint's tokenizer.json without its post-processor: PaliGemma's processor places `<bos>` itself (after
    the image tokens), and transformers.js' tokenizer call would add another one where Gemma's post-processor does."""
    path = folder / "tokenizer.json"
    if not path.exists():
        raise OnnxExportError(f"{folder} has no tokenizer.json, which transformers.js needs; copy it from the "
                              "checkpoint's repo")
    content = json.loads(path.read_text())
    content["post_processor"] = None
    return content


def tokenizer_config(config) -> dict:
    return dict(
        tokenizer_class="PreTrainedTokenizer", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", add_bos_token=False, add_eos_token=False, padding_side="left",
        model_max_length=config.text.max_position_embeddings,
    )


def preprocessor_config(config) -> dict:
    size = config.image_size
    return dict(
        image_processor_type="SiglipImageProcessor", processor_class="PaliGemmaProcessor",
        do_convert_rgb=True, do_resize=True, size=dict(height=size, width=size), resample=3,  # 3: bicubic
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        image_seq_length=config.num_image_tokens,
    )


def generation_config(config) -> dict:
    eos = list(config.eos_token_ids)
    return dict(bos_token_id=config.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0],
                pad_token_id=config.pad_token_id, do_sample=False)
