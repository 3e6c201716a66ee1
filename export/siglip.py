"""SigLIP's two encoders as ONNX, so that other runtimes can do zero-shot classification and retrieval:

    python -m export.siglip --model PATH_OR_HUB_ID --output DIR [--opset 18] [--no-validate]

    file                         in -> out
    `siglip_image_encoder.onnx`  `pixel_values` float32 [batch, 3, S, S] in [-1, 1]
                                 -> `image_embeddings` float32 [batch, C], L2-normalized
    `siglip_text_encoder.onnx`   `input_ids` int64 [batch, L], L = max_position_embeddings
                                 -> `text_embeddings` float32 [batch, C], L2-normalized
    `siglip.json`                the I/O above, `logit_scale` (t = exp(t')) and `logit_bias` (b)

logits_per_image = t * image_embeddings @ text_embeddings.T + b; probability = sigmoid(logit). Texts are tokenized as
paligemma/siglip_tokenizer.py does (tokenizer.json or spiece.model, copied beside the graphs) and padded to L.
Each graph is compared with torch by ONNX Runtime (CPU) before the command returns: max abs difference <= 1e-4 (fp32).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from paligemma.checkpoint import resolve_checkpoint
from paligemma.cli import ArgumentParser
from paligemma.errors import CheckpointError, OnnxExportError
from paligemma.siglip_model import SiglipModel, load_siglip
from paligemma.siglip_tokenizer import SENTENCEPIECE_MODEL, TOKENIZER_JSON, SiglipTokenizer

from .graphs import GraphSpec, TensorSpec
from .writer.onnx_export import DEFAULT_OPSET, OPSETS, removed_on_failure, set_metadata, trace_to_onnx

logger = logging.getLogger(__name__)

DESCRIPTION_NAME = "siglip.json"
TOLERANCE = 1e-4  # fp32 max abs difference, ONNX Runtime vs torch, on unit-length embeddings
EXTERNAL_DATA_BYTES = 1 << 30  # past this a graph's weights go to NAME.onnx.data (protobuf stops at 2 GB)
VALIDATION_TEXTS = ["a photo of a cat", "two red circles and a blue square", "", "a " * 200]


class ImageEncoderGraph(nn.Module):
    def __init__(self, model: SiglipModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.image_embeddings(pixel_values)


class TextEncoderGraph(nn.Module):
    def __init__(self, model: SiglipModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_embeddings(input_ids)


def graph_specs(model: SiglipModel) -> dict[str, GraphSpec]:
    vision, text = model.config.vision, model.config.text
    size, width = vision.image_size, vision.hidden_size
    return {
        "siglip_image_encoder": GraphSpec(
            "siglip_image_encoder",
            (TensorSpec("pixel_values", "float32", ("batch", vision.num_channels, size, size)),),
            (TensorSpec("image_embeddings", "float32", ("batch", width)),)),
        "siglip_text_encoder": GraphSpec(
            "siglip_text_encoder", (TensorSpec("input_ids", "int64", ("batch", text.max_position_embeddings)),),
            (TensorSpec("text_embeddings", "float32", ("batch", text.embedding_size)),)),
    }


def example_inputs(model: SiglipModel, tokenizer: SiglipTokenizer) -> dict[str, torch.Tensor]:
    vision = model.config.vision
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, vision.num_channels, vision.image_size, vision.image_size, generator=generator) * 2 - 1
    return {"siglip_image_encoder": pixels, "siglip_text_encoder": tokenizer(VALIDATION_TEXTS)}


def save_graph(graph: onnx.ModelProto, path: Path) -> None:
    large = sum(len(t.raw_data) for t in graph.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(graph, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")
    onnx.checker.check_model(str(path))


def validate(output: Path, modules: dict[str, nn.Module], inputs: dict[str, torch.Tensor],
             specs: dict[str, GraphSpec]) -> dict[str, float]:
    """Max abs difference of each graph's output, ONNX Runtime (CPU) against torch, on the example inputs."""
    import onnxruntime

    diffs = {}
    for name, module in modules.items():
        session = onnxruntime.InferenceSession(str(output / specs[name].file), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = module(inputs[name]).numpy()
        got = session.run(None, {specs[name].inputs[0].name: inputs[name].numpy()})[0]
        diffs[name] = float(np.abs(got - expected).max())
        if got.shape != expected.shape or not diffs[name] <= TOLERANCE:
            raise OnnxExportError(f"{output / specs[name].file} differs from torch: "
                                  f"max abs difference {diffs[name]:.3g} "
                                  f"(allowed {TOLERANCE}), shapes {got.shape} vs {expected.shape}; report this "
                                  "with the checkpoint's config.json")
    return diffs


def export_siglip(source, output, *, opset: int = DEFAULT_OPSET, validate_graphs: bool = True) -> dict:
    """Export a SigLIP checkpoint's image and text encoders into `output`; returns what siglip.json records."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise OnnxExportError(f"opset {opset!r} is not supported; use {OPSETS.start} to {OPSETS.stop - 1}")
    folder = resolve_checkpoint(source)
    model = load_siglip(folder, dtype=torch.float32)
    config = model.require_text_tower()
    tokenizer = SiglipTokenizer.from_pretrained(folder, config)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OnnxExportError(f"{output} is a file; give a folder to write the graphs into")
    specs = graph_specs(model)
    modules = {"siglip_image_encoder": ImageEncoderGraph(model), "siglip_text_encoder": TextEncoderGraph(model)}
    inputs = example_inputs(model, tokenizer)
    meta = dict(source=str(folder), logit_scale=float(model.logit_scale.exp()), logit_bias=float(model.logit_bias))
    with removed_on_failure(output):
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output) as work:
            for name, module in modules.items():
                logger.info("tracing %s", name)
                graph = trace_to_onnx(module, (inputs[name],), specs[name], Path(work) / specs[name].file, opset)
                set_metadata(graph, name, meta)
                save_graph(graph, output / specs[name].file)
        diffs = validate(output, modules, inputs, specs) if validate_graphs else {}
        tokenizer_file = TOKENIZER_JSON if (folder / TOKENIZER_JSON).is_file() else SENTENCEPIECE_MODEL
        for name in ("config.json", tokenizer_file):
            shutil.copyfile(folder / name, output / name)
        description = dict(
            **meta, opset=opset, text_length=config.max_position_embeddings, pad_token_id=config.pad_token_id,
            tokenizer=tokenizer_file, graphs={name: spec.describe() for name, spec in specs.items()},
            max_abs_diff_vs_torch=diffs,
        )
        (output / DESCRIPTION_NAME).write_text(json.dumps(description, indent=2) + "\n")  # last: marks it complete
    return description


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m export.siglip",
                            description="Export SigLIP's image and text encoders to ONNX (two graphs).")
    parser.add_argument("--model", required=True, help="SigLIP checkpoint folder or Hub repo id")
    parser.add_argument("--output", required=True, help="folder to write the graphs into")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--no-validate", action="store_true", help="skip the comparison with torch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            description = export_siglip(args.model, args.output, opset=args.opset, validate_graphs=not args.no_validate)
    except (OnnxExportError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, diff in description["max_abs_diff_vs_torch"].items():
        print(f"{name}: max abs difference vs torch {diff:.2e}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
