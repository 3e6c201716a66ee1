"""The mask decoder as one more ONNX graph: mask_decoder.onnx, codes -> mask logits, beside the model's graphs.

A checkpoint that ships `mask_decoder.safetensors` (paligemma.checkpoint.MASK_DECODER_NAME) gets it in its export:
input `codes` int64 [batch, 16] (a segmentation answer's `<segNNN>` numbers), output `mask_logits` float32
[batch, 64, 64] (> 0 inside the mask). It is small (1.2 M parameters in the published decoder), so it is always
float32 with its weights inline, whatever the export's dtype, and validated against torch at 1e-4 absolute, the
float32 logits' tolerance (export/validation/validate.py). The manifest lists the file (size, sha256: loading checks
it like every other) and describes the graph under "mask_decoder".
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import torch

from paligemma.checkpoint import MASK_DECODER_NAME, Checkpoint
from paligemma.errors import OnnxExportError
from paligemma.locations import NUM_MASK_CODES
from paligemma.mask_decoder import MASK_SIZE, MaskDecoder
from paligemma.weights import load_mask_decoder

from .integrity import sha256_of
from .manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)

GRAPH_FILE = "mask_decoder.onnx"
INPUT, OUTPUT = "codes", "mask_logits"
TOLERANCE = 1e-4  # max abs difference from torch on the logits


def describe() -> dict:
    return dict(file=GRAPH_FILE, inputs={INPUT: ["batch", NUM_MASK_CODES]},
                outputs={OUTPUT: ["batch", MASK_SIZE, MASK_SIZE]})


def export_mask_decoder(decoder: MaskDecoder, path: Path, opset: int, ir_version: int) -> None:
    """Trace `decoder` into `path` (weights inline), checked with onnx.checker."""
    codes = torch.arange(2 * NUM_MASK_CODES).view(2, NUM_MASK_CODES) % decoder.config.num_embeddings
    torch.onnx.export(decoder.float().eval(), (codes,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=opset, dynamo=False)
    graph = onnx.load(str(path))
    graph.ir_version = ir_version  # what onnxruntime reads (see export/writer/onnx_export.py)
    onnx.save(graph, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise OnnxExportError(f"{path} fails onnx.checker: {e}") from None


def validation_codes(num_embeddings: int) -> np.ndarray:
    """Three fixed rows: every code in turn, the first and last codes alternating, a seeded draw."""
    rng = np.random.default_rng(0)
    return np.stack([np.arange(NUM_MASK_CODES) * 8 % num_embeddings,
                     np.where(np.arange(NUM_MASK_CODES) % 2, num_embeddings - 1, 0),
                     rng.integers(0, num_embeddings, NUM_MASK_CODES)]).astype(np.int64)


def validate_mask_decoder(decoder: MaskDecoder, path: Path) -> float:
    """ONNX Runtime's logits against torch's on validation_codes; the max abs difference, or OnnxExportError."""
    codes = validation_codes(decoder.config.num_embeddings)
    difference = float(np.abs(OnnxMaskDecoder(path).mask_logits(codes) - decoder.mask_logits(codes)).max())
    if not difference <= TOLERANCE:
        raise OnnxExportError(f"{path}: ONNX Runtime's mask logits differ from torch's by {difference:.2e} "
                              f"(tolerance {TOLERANCE:.0e}); the export is wrong, report it")
    return difference


def write_mask_decoder(checkpoint: Checkpoint, output: Path, opset: int, ir_version: int, log=print) -> Path | None:
    """When the checkpoint ships a mask decoder: export it as `output`/GRAPH_FILE and validate it (both layouts call
    this: the three graphs' manifest and transformers.js' config.json each list the file). Returns the graph's path,
    or None when there is no decoder."""
    if checkpoint.mask_decoder is None:
        return None
    decoder = MaskDecoder.from_file(checkpoint.mask_decoder)
    path = Path(output) / GRAPH_FILE
    export_mask_decoder(decoder, path, opset, ir_version)
    difference = validate_mask_decoder(decoder, path)
    log(f"{GRAPH_FILE}: ONNX Runtime matches torch (max abs difference {difference:.1e})")
    return path


def add_mask_decoder(checkpoint: Checkpoint, output: Path, manifest: dict, opset: int, ir_version: int,
                     log=print) -> dict:
    """When the checkpoint ships a mask decoder: export it into `output`, validate it, and list it in the manifest
    (rewritten whole, by rename, so that a manifest on disk is always complete). Returns the manifest."""
    path = write_mask_decoder(checkpoint, output, opset, ir_version, log)
    if path is None:
        return manifest
    manifest = dict(manifest, mask_decoder=describe(),
                    files={**manifest["files"], GRAPH_FILE: dict(size=path.stat().st_size, sha256=sha256_of(path))})
    staging = Path(output) / f"{MANIFEST_NAME}.partial-{os.getpid()}"
    staging.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(staging, Path(output) / MANIFEST_NAME)
    return manifest


class OnnxMaskDecoder:
    """mask_decoder.onnx in ONNX Runtime (CPU: it is small), with MaskDecoder's `mask_logits`."""

    def __init__(self, path: str | os.PathLike):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a few milliseconds of work; the generation's threads are elsewhere
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def mask_logits(self, codes) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: np.asarray(codes, dtype=np.int64)})[0]


def load_onnx_mask_decoder(onnx_dir: str | os.PathLike, folder: str | os.PathLike | None = None):
    """The export's mask decoder when its manifest lists one (checked with the export's other files); else the
    checkpoint `folder`'s own (torch) when it ships one, as with an export made before the decoder was added (the
    weights fingerprint covers the model's weights only); else None."""
    manifest_path = Path(onnx_dir) / MANIFEST_NAME
    try:
        listed = GRAPH_FILE in json.loads(manifest_path.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        listed = False  # no readable manifest: the export's own loading reports that
    if listed:
        return OnnxMaskDecoder(Path(onnx_dir) / GRAPH_FILE)
    if folder is not None and (Path(folder) / MASK_DECODER_NAME).exists():
        logger.warning("%s has no %s but the checkpoint %s ships a mask decoder: masks are decoded with torch; "
                       "export again to carry it", onnx_dir, GRAPH_FILE, folder)
        return load_mask_decoder(folder)
    return None
