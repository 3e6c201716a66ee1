"""torch -> ONNX: the three graphs, weights stored once, metadata, checks.

Exporter: TorchScript (`torch.onnx.export(dynamo=False)`), which traces batch, sequence and past length as dynamic
axes. Every export streams (export/writer/streaming.py): the graphs are traced on a hollow model and each weight is
copied from the checkpoint into the data file on its own, so the export holds about one matrix of weights at a time,
whatever the model's size; int8 and int4 quantize each weight as it is written (export/quantize.py), with no
whole-graph pass. The exporter's constant folding is off: it would hold the weights twice more; weight transposes
are folded here, one tensor at a time, so ONNX Runtime has nothing left to copy at load.
The dynamo exporter (torch 2.13) took 20x longer on the tiny model, could not turn `dynamic_axes` into
`dynamic_shapes` for the decode graph's past inputs, and left a Transpose on every weight.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import onnx
import torch
from tqdm.auto import tqdm

from paligemma.checkpoint import Checkpoint
from paligemma.config import PaliGemmaConfig
from paligemma.errors import OnnxExportError

from ..graphs import GRAPH_ORDER, graph_modules, graph_specs
from ..quantize import QUANTIZATIONS, SCHEMES, stored_nbytes
from .checkpoint_stream import CheckpointStream
from .external_data import ExternalData
from .integrity import sha256_of
from .manifest import (
    EXPORTER_VERSION,
    MANIFEST_NAME,
    METADATA_PREFIX,
    SHARED_DATA_NAME,
    config_hash,
)
from .mask_decoder import add_mask_decoder
from .streaming import WeightsAsInputs, WeightWriter, hollow_model

DTYPES = {"float32": torch.float32, "float16": torch.float16}
DEFAULT_OPSET = 18
OPSETS = range(14, 23)  # each exported and validated here (torch 2.13's TorchScript exporter, onnxruntime 1.31)
# onnx 1.23 writes IR 14; onnxruntime 1.31 reads up to 13. 10 is what opset 18 needs and what older runtimes read.
IR_VERSION = 10
PROTOBUF_LIMIT = 2**31 - 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def example_inputs(config: PaliGemmaConfig, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, ...]]:
    """Inputs to trace each graph with: a padded batch of two, prompt and past of different lengths."""
    t = config.text
    B, N, T = 2, config.num_image_tokens, config.num_image_tokens + 6
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, min(t.vocab_size, 1000), (B, T), generator=generator)
    input_ids[:, :N] = config.image_token_index
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[0, :2] = 0
    input_ids[0, :2] = config.pad_token_id
    input_ids[0, 2 : 2 + N] = config.image_token_index
    input_ids[0, N : N + 2] = 5
    token_type_ids = torch.zeros(B, T, dtype=torch.long)
    size = config.image_size
    pixel_values = torch.rand(B, config.vision.num_channels, size, size, generator=generator,
                              dtype=torch.float32) * 2 - 1
    image_embeddings = torch.randn(B, N, t.hidden_size, generator=generator).to(dtype)
    P = T
    past = [torch.randn(B, t.num_key_value_heads, P, t.head_dim, generator=generator).to(dtype)
            for _ in range(2 * t.num_hidden_layers)]
    decode_mask = torch.cat([attention_mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
    return {
        "vision_encoder": (pixel_values.to(dtype),),
        "prefill": (input_ids, image_embeddings, attention_mask, token_type_ids),
        "decode": (torch.randint(3, 100, (B, 1), generator=generator), decode_mask, decode_mask.sum(-1, keepdim=True),
                   *past),
    }


def trace_to_onnx(module: torch.nn.Module, inputs, spec, path: Path, opset: int, weight_names=()) -> onnx.ModelProto:
    """The traced graph; `weight_names` name the trailing inputs of a WeightsAsInputs module."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer warnings about shape reads
        torch.onnx.export(
            module, inputs, str(path), dynamo=False, opset_version=opset, do_constant_folding=False,
            input_names=[i.name for i in spec.inputs] + list(weight_names),
            output_names=[o.name for o in spec.outputs], dynamic_axes=spec.dynamic_axes(),
        )
    return onnx.load(str(path))  # with any external data the exporter wrote beside it


def tie_lm_head(model: onnx.ModelProto, embed_name: str) -> None:
    """Store the tied embedding once: the output projection, exported as MatMul(hidden, Transpose(embedding)), becomes
    Gemm(hidden, embedding, transB=1), so no transposed copy of the 257216-row matrix is ever made.

    Measured on ONNX Runtime's CPU kernels without weight pre-packing, [B, 2048] x the 257216-row matrix: Gemm with
    transB on the [V, C] embedding takes as long as MatMul on a [C, V] copy for one row and half as long for 2 to 4
    rows (MatMul re-packs the whole matrix per call when more than one row comes)."""
    graph = model.graph
    transposes = {n.output[0]: n for n in graph.node if n.op_type == "Transpose" and n.input[0] == embed_name}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in transposes:
            graph.node.remove(transposes[node.input[1]])
            node.op_type = "Gemm"
            node.input[1] = embed_name
            node.attribute.append(onnx.helper.make_attribute("transB", 1))
            return
    raise OnnxExportError("the exported graph has no output projection on the embedding matrix; "
                          "the graph layout changed")


def set_metadata(model: onnx.ModelProto, graph: str, meta: dict[str, str]) -> None:
    model.ir_version = min(model.ir_version, IR_VERSION)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {METADATA_PREFIX + k: str(v) for k, v in {**meta, "graph": graph}.items()})
    model.producer_name = "paligemma-export"


def check_options(output, dtype: str, quantize: str | None, opset: int) -> None:
    """Refuses a bad option before anything is written or computed."""
    if dtype not in DTYPES:
        raise OnnxExportError(f"dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in SCHEMES:  # QUANTIZATIONS and the internal standard-op int8
        raise OnnxExportError(f"quantize '{quantize}' is not supported; use {' or '.join(QUANTIZATIONS)}, or leave it "
                              "out for float weights")
    if quantize and dtype != "float32":
        q4f16 = " (int4 blocks with float16 scales are transformers.js' q4f16: add --format transformers.js)"
        raise OnnxExportError(f"the three-graph layout's {quantize} quantization keeps float32 activations and scales; "
                              f"drop --dtype {dtype} or --quantize {quantize}"
                              + (q4f16 if quantize == "int4" and dtype == "float16" else ""))
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise OnnxExportError(f"opset {opset!r} is not supported; use {OPSETS.start} to {OPSETS.stop - 1} "
                              f"(default {DEFAULT_OPSET})")
    if Path(output).exists() and not Path(output).is_dir():
        raise OnnxExportError(f"--output {output} is a file; name a folder (it is created if missing)")


def export_model(
    source, output, *, dtype: str = "float32", quantize: str | None = None, opset: int = DEFAULT_OPSET,
    progress: bool = True, log=print,
) -> dict:
    """Export the checkpoint `source` (a Checkpoint, folder or Hub repo id) into `output`; returns the manifest.

    Writes vision_encoder.onnx, prefill.onnx and decode.onnx (weights of the last two in one shared
    decoder.onnx.data), the tokenizer, config.json and manifest.json, and checks every graph with onnx.checker.
    Comparing ONNX Runtime with torch is a step of its own: export.runtime.export_and_validate does both."""
    check_options(output, dtype, quantize, opset)
    output = Path(output)
    checkpoint = Checkpoint.resolve(source)
    with removed_on_failure(output):
        output.mkdir(parents=True, exist_ok=True)
        manifest = write_export(checkpoint, output, dtype, quantize, opset, progress, log)
        return add_mask_decoder(checkpoint, output, manifest, opset, IR_VERSION, log)


def export_files(output: Path) -> list[Path]:
    """What the three-graph export writes into `output`: its manifest, graphs and data files."""
    return [path for path in output.iterdir()
            if path.is_file() and (path.name == MANIFEST_NAME or path.name.endswith((".onnx", ".onnx.data")))]


@contextlib.contextmanager
def removed_on_failure(output: Path, written: Callable[[Path], list[Path]] = export_files):
    """Nothing half-written may look like an export: if the block fails, the files `written(output)` lists are
    removed (the folder itself if it did not exist before)."""
    created = not output.exists()
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        elif output.is_dir():
            for path in written(output):
                path.unlink()
        raise


def initializer_bytes(model: onnx.ModelProto) -> int:
    def size(tensor):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return int(next(e.value for e in tensor.external_data if e.key == "length"))
        return len(tensor.raw_data)  # numpy_helper.from_array writes raw_data

    return sum(size(t) for t in model.graph.initializer)


def write_export(checkpoint: Checkpoint, output: Path, dtype: str, quantize: str | None, opset: int, progress: bool,
                 log) -> dict:
    start = time.perf_counter()
    torch_dtype = DTYPES[dtype]
    source = CheckpointStream(checkpoint)
    model = hollow_model(checkpoint.config, torch_dtype)
    source.check_against(model)
    needed = export_nbytes(model, source, torch_dtype, quantize)
    check_free_space(output, needed)
    try:
        return write_graphs(model, source, checkpoint, output, dtype, quantize, opset, progress, log, start)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise OnnxExportError(f"no space left on the device holding {output} (ENOSPC) while writing the export "
                              f"({e.filename or e}); it needs about {needed / 1e9:.2f} GB free there: free some space "
                              "or choose another --output") from None


def export_nbytes(model, source: CheckpointStream, dtype: torch.dtype, quantize: str | None) -> int:
    """The data files' size: the weights in `dtype`, or as `quantize` stores the nn.Linear weights and the tied
    embedding (what export/quantize.py rewrites)."""
    linear = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    embedding = next(name for name in source.tensors if name.endswith("embed_tokens.weight"))
    return stored_nbytes(quantize, {n: t.shape for n, t in source.tensors.items()},
                         {n: source.nbytes(n, dtype) for n in source.tensors},
                         (linear | {embedding}) & set(source.tensors), embedding)


def check_free_space(output: Path, needed: int) -> None:
    """Refuse before writing when the device cannot hold the weights (the data files' size; an earlier export's files
    in `output`, replaced, count as free)."""
    replaced = sum(p.stat().st_size for p in output.iterdir()
                   if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".data")))
    free = shutil.disk_usage(output).free + replaced
    if free < needed:
        raise OnnxExportError(f"{output} has {free / 1e9:.2f} GB free, and the export needs about "
                              f"{needed / 1e9:.2f} GB for its weights: free some space or choose another --output")


def write_graphs(model, source: CheckpointStream, checkpoint: Checkpoint, output: Path, dtype: str,
                 quantize: str | None, opset: int, progress: bool, log, start: float) -> dict:
    torch_dtype = DTYPES[dtype]
    config, folder = model.config, checkpoint.folder
    meta = dict(config_hash=config_hash(config), weights_fingerprint=checkpoint.fingerprint,
                exporter_version=EXPORTER_VERSION, dtype=dtype, quantize=quantize or "none", opset=opset,
                torch_version=torch.__version__)
    specs, modules, inputs = graph_specs(config), graph_modules(model), example_inputs(config, torch_dtype)
    embed_name = next(n for n, p in modules["prefill"].named_parameters() if n.endswith("embed_tokens.weight"))
    (output / MANIFEST_NAME).unlink(missing_ok=True)  # first: the folder is no export until the new manifest is written
    for path in output.iterdir():  # an earlier export's files
        if path.is_file() and (path.suffix == ".onnx" or path.name.endswith(".data")):
            path.unlink()
    writer = WeightWriter(source, torch_dtype,
                          lambda items, what: tqdm(list(items), desc=f"{what} weights", disable=not progress), quantize)
    shared = ExternalData(output / SHARED_DATA_NAME)
    vision_data, vision_bytes = None, 0
    with shared, tempfile.TemporaryDirectory(dir=output, prefix=".export-") as tmp:
        steps = tqdm(GRAPH_ORDER, desc="exporting", disable=not progress)
        for name in steps:
            steps.set_postfix_str(name)
            workdir = Path(tmp) / name
            workdir.mkdir()
            module = WeightsAsInputs(modules[name])
            graph = trace_to_onnx(module, module.example_inputs(inputs[name]), specs[name],
                                  workdir / f"{name}.onnx", opset, module.names)
            if name != "vision_encoder":
                tie_lm_head(graph, embed_name)
            inline = name == "vision_encoder" and writer.nbytes(graph) + graph.ByteSize() <= PROTOBUF_LIMIT
            if name == "vision_encoder" and not inline:
                vision_data = f"{name}.onnx.data"
                with ExternalData(output / vision_data) as store:
                    writer.attach(graph, name, store)
            else:
                writer.attach(graph, name, None if inline else shared)
            set_metadata(graph, name, meta)
            if name == "vision_encoder":
                vision_bytes = initializer_bytes(graph)
            onnx.save(graph, str(output / f"{name}.onnx"))
            del graph
            shutil.rmtree(workdir)
    del model, modules
    for name in GRAPH_ORDER:
        try:
            onnx.checker.check_model(str(output / f"{name}.onnx"), full_check=True)
        except onnx.checker.ValidationError as e:
            raise OnnxExportError(f"{output / f'{name}.onnx'} fails onnx.checker: {e}") from None
    log(f"onnx.checker (full) passed for {', '.join(GRAPH_ORDER)}")
    for file in TOKENIZER_FILES:
        if (folder / file).exists():
            shutil.copy(folder / file, output / file)
    (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    files = [f"{n}.onnx" for n in GRAPH_ORDER] + [SHARED_DATA_NAME] + ([vision_data] if vision_data else [])
    manifest = dict(
        meta, source=str(folder), ir_version=IR_VERSION,
        weight_bytes=vision_bytes + sum(e["length"] for e in shared.table.values()),
        graphs={name: spec.describe() for name, spec in specs.items()},
        shared_data=dict(file=SHARED_DATA_NAME, tensors=shared.table),
        files={f: dict(size=(output / f).stat().st_size, sha256=sha256_of(output / f)) for f in files},
    )
    (output / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"exported {folder} to {output} ({dtype}{f', {quantize}' if quantize else ''}) "
        f"in {time.perf_counter() - start:.1f}s")
    return manifest
