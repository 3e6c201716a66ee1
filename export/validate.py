"""ONNX Runtime against torch, graph by graph, on random and real inputs.

Tolerances on the max abs difference, scaled by max(1, largest reference value) for float16 and int8:
- float32: 1e-4 absolute on the logits (prefill and decode, run end to end: ONNX Runtime's own image embeddings feed
  its prefill). The image embeddings are not logits and their scale is the model's (tens for the demo model), so
  the vision graph is held to 1e-4 relative to its largest value: float32 rounding, ~1e-7 per operation.
- float16: 2e-2 relative. float16 keeps 11 significant bits (~5e-4 per rounding) and rounding compounds over the
  layers; ONNX Runtime and torch round at different points.
- int8: 0.25 relative. Dynamic quantization rounds every weight and activation to 256 levels; logits move by
  several percent. What matters there is task accuracy, checked separately (at most 2 points lost).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from paligemma.engines import TorchEngine
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.processor import PaliGemmaProcessor

from paligemma.errors import OnnxExportError

TOLERANCES = {("float32", "none"): (1e-4, False), ("float16", "none"): (2e-2, True), ("float32", "int8"): (0.25, True)}
DECODE_STEPS = 8


def validation_images() -> list[Image.Image]:
    """Two deterministic "real" images: a colour gradient and a checkerboard with a disc."""
    y, x = np.mgrid[0:96, 0:128]
    gradient = np.stack([x * 2, y * 2, (x + y)], -1).astype(np.uint8)
    board = (((x // 16 + y // 16) % 2) * 200).astype(np.uint8)
    board = np.stack([board, board, np.where((x - 64) ** 2 + (y - 48) ** 2 < 400, 255, board)], -1).astype(np.uint8)
    return [Image.fromarray(gradient), Image.fromarray(board)]


def max_diff(got, expected) -> float:
    return float((torch.as_tensor(np.asarray(got)).float() - expected.float()).abs().max())


def validate_export(model: PaliGemmaForConditionalGeneration, onnx_model, log=print) -> dict[str, float]:
    """Max abs difference per graph (vision_encoder, prefill, decode) between torch and ONNX Runtime running the
    export `onnx_model` has loaded (an export.runtime.OnnxModel: passed in, as the runtime sits above this module);
    raises OnnxExportError above tolerance."""
    onnx_dir = onnx_model.onnx_dir
    manifest = onnx_model.manifest
    tolerance, relative = TOLERANCES[manifest["dtype"], manifest["quantize"]]
    processor = PaliGemmaProcessor.from_pretrained(onnx_dir, model.config)
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    diffs: dict[str, float] = {"vision_encoder": 0.0, "prefill": 0.0, "decode": 0.0}
    scales: dict[str, float] = {name: 1.0 for name in diffs}

    def record(name, got, expected):
        diffs[name] = max(diffs[name], max_diff(got, expected))
        scales[name] = max(scales[name], float(expected.float().abs().max()))

    real = processor(validation_images(), ["caption en", "answer en what is in the image and where is it"])
    random_pixels = torch.rand(2, *real["pixel_values"].shape[1:], generator=generator) * 2 - 1
    with torch.inference_mode():
        for pixels in (real["pixel_values"], random_pixels):
            (got,) = onnx_model.run("vision_encoder", {"pixel_values": pixels.numpy().astype(onnx_model.float_type)})
            record("vision_encoder", got.numpy(), model.embed_image(pixels.to(dtype)))
        random = dict(real)
        text = random["attention_mask"].bool() & (random["input_ids"] != model.config.image_token_index)
        vocab = min(model.config.text.vocab_size, model.config.image_token_index)
        random["input_ids"] = torch.where(text, torch.randint(3, vocab, real["input_ids"].shape, generator=generator),
                                          real["input_ids"])
        random["pixel_values"] = random_pixels
        for inputs in (real, random):
            torch_engine, onnx_engine = TorchEngine(model), onnx_model()
            expected, got = torch_engine.prefill(inputs, DECODE_STEPS), onnx_engine.prefill(inputs, DECODE_STEPS)
            record("prefill", got, expected)
            for _ in range(DECODE_STEPS):
                tokens = expected.argmax(-1)
                expected, got = torch_engine.decode_step(tokens), onnx_engine.decode_step(tokens)
                record("decode", got, expected)
    failed = []
    for name, diff in diffs.items():
        scaled = relative or name == "vision_encoder"
        limit = tolerance * (scales[name] if scaled else 1.0)
        log(f"validation {name}: max abs diff {diff:.3g} (tolerance {limit:.3g}, max |torch| {scales[name]:.3g})")
        if not diff <= limit:
            failed.append(f"{name} {diff:.3g} > {limit:.3g}")
    if failed:
        raise OnnxExportError(f"{onnx_dir}: ONNX Runtime differs from torch above tolerance: {', '.join(failed)}")
    return diffs
