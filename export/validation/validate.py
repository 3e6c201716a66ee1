"""ONNX Runtime against torch, graph by graph, on random and real inputs.

Tolerances on the max abs difference, scaled by max(1, largest reference value) for float16 and the quantized
variants, and for those also on the relative rms difference, ||ONNX - torch|| / ||torch|| over each graph's outputs:
- float32: 1e-4 absolute on the logits (prefill and decode, run end to end: ONNX Runtime's own image embeddings feed
  its prefill). The image embeddings are not logits and their scale is the model's (tens for the demo model), so
  the vision graph is held to 1e-4 relative to its largest value: float32 rounding, ~1e-7 per operation.
- float16: 2e-2 relative. float16 keeps 11 significant bits (~5e-4 per rounding) and rounding compounds over the
  layers; ONNX Runtime and torch round at different points.
- int8: 0.12 relative max, 0.12 relative rms. MatMulNBits, 8-bit blocks of 32 weights (256 levels), activations
  quantized to int8 per block of 32 inside the kernel. Measured (max, rms; worst graph): tiny PaliGemma 1 (random
  weights, std 0.2) 0.079, 0.062; tiny PaliGemma 2 0.074, 0.041; embedded demo model 0.020, 0.0125; weight-heavy
  model 0.0057, 0.018; the full 3B shape (random weights) 0.041, 0.082. The limits are about 1.5x the worst of each.
- int8_standard (the internal MatMulInteger chain, export/quantize.py): 0.15 relative max, 0.15 relative rms.
  Weights round to 255 levels per output channel, activations to 256 per tensor per call. Measured: tiny
  PaliGemma 1 0.10, 0.071; tiny PaliGemma 2 0.106, 0.074; embedded demo model 0.032, 0.021; weight-heavy model
  0.011, 0.035; 3B-wide random model 0.036, 0.078; the full 3B shape 0.104, 0.216: above this limit, which is why
  `--quantize int8` is MatMulNBits.
- int4: 1.0 relative max, 0.8 relative rms. Blocks of 32 weights (128 in products at least 1024 wide) round to 16
  levels. Measured: tiny PaliGemma 1
  0.77, 0.55; tiny PaliGemma 2 0.36, 0.32; embedded demo model 0.10, 0.076; 3B-wide random model 0.17, 0.25 at
  blocks of 32, 0.168, 0.346 at 128 (its products are all at least 1024 wide; 0.147, 0.29 with 32 on the same
  request set, docs/quantization.md). On the
  random tiny models 4-bit rounding moves the logits by half their spread, so this limit catches a broken layout
  (an unrelated output is ~1.4 relative rms), not a loss of quality: what a quantization costs is measured on the
  task (500 scenes, docs/quantization.md).
- int4_float16 (transformers.js' `_q4f16`: int4's blocks with float16 scales, in a float16 graph), against float32
  torch: int4's limits. Measured (max, rms; worst graph): tiny PaliGemma 1 0.92, 0.61; tiny PaliGemma 2 0.33, 0.34;
  embedded demo model 0.13, 0.114, where int4 measured 0.89, 0.61; 0.34, 0.33; 0.13, 0.112 on the same requests:
  float16's rounding is small beside 16 levels.

float16 exports are validated with one ONNX Runtime session in memory at a time (OnnxModel one_session): on CPU each
float16 session holds a float32 copy of its weights, and the three at once do not fit beside each other at 3B.

The torch side is recorded first (export/validation/torch_reference.py, in its own process) and ONNX Runtime then
replays the same requests and the same tokens: the torch model and ONNX Runtime's copy of the weights are never in
memory at once.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from paligemma.config import PaliGemmaConfig
from paligemma.errors import OnnxExportError
from paligemma.processor import PaliGemmaProcessor

TOLERANCES = {("float32", "none"): (1e-4, False), ("float16", "none"): (2e-2, True), ("float32", "int8"): (0.12, True),
              ("float32", "int4"): (1.0, True), ("float32", "int8_standard"): (0.15, True),
              ("float16", "int4_float16"): (1.0, True)}
# ||ONNX - torch|| / ||torch|| over each graph's outputs
RMS_TOLERANCES = {"int8": 0.12, "int4": 0.8, "int8_standard": 0.15, "int4_float16": 0.8}
DECODE_STEPS = 8


def validation_images() -> list[Image.Image]:
    """Two deterministic "real" images: a colour gradient and a checkerboard with a disc."""
    y, x = np.mgrid[0:96, 0:128]
    gradient = np.stack([x * 2, y * 2, (x + y)], -1).astype(np.uint8)
    board = (((x // 16 + y // 16) % 2) * 200).astype(np.uint8)
    board = np.stack([board, board, np.where((x - 64) ** 2 + (y - 48) ** 2 < 400, 255, board)], -1).astype(np.uint8)
    return [Image.fromarray(gradient), Image.fromarray(board)]


def validation_requests(processor: PaliGemmaProcessor, config: PaliGemmaConfig) -> list[dict[str, torch.Tensor]]:
    """A padded batch of two real images and prompts, and the same layout with random pixels and prompt tokens."""
    generator = torch.Generator().manual_seed(0)
    real = dict(processor(validation_images(), ["caption en", "answer en what is in the image and where is it"]))
    random = dict(real)
    random["pixel_values"] = torch.rand(2, *real["pixel_values"].shape[1:], generator=generator) * 2 - 1
    text = random["attention_mask"].bool() & (random["input_ids"] != config.image_token_index)
    vocab = min(config.text.vocab_size, config.image_token_index)
    random["input_ids"] = torch.where(text, torch.randint(3, vocab, real["input_ids"].shape, generator=generator),
                                      real["input_ids"])
    return [real, random]


def max_diff(got, expected) -> float:
    return float((torch.as_tensor(np.asarray(got)).float() - expected.float()).abs().max())


def validate_export(reference: dict, onnx_model, log=print) -> dict[str, float]:
    """Max abs difference per graph (vision_encoder, prefill, decode) between the torch `reference`
    (export.validation.torch_reference.record) and ONNX Runtime running the export `onnx_model` has loaded (an
    export.runtime.pipeline.OnnxModel: passed in, as the runtime sits above this module), fed torch's tokens; raises
    OnnxExportError above tolerance."""
    manifest = onnx_model.manifest
    tolerance, relative = TOLERANCES[manifest["dtype"], manifest["quantize"]]
    rms_tolerance = RMS_TOLERANCES.get(manifest["quantize"])
    diffs: dict[str, float] = {"vision_encoder": 0.0, "prefill": 0.0, "decode": 0.0}
    scales: dict[str, float] = {name: 1.0 for name in diffs}
    squares = {name: [0.0, 0.0] for name in diffs}  # sums of squared differences and of squared references

    def record(name, got, expected):
        got = torch.as_tensor(np.asarray(got)).float()
        diffs[name] = max(diffs[name], max_diff(got, expected))
        scales[name] = max(scales[name], float(expected.float().abs().max()))
        squares[name][0] += float(((got - expected.float()) ** 2).sum())
        squares[name][1] += float((expected.float() ** 2).sum())

    pairs = list(zip(reference["requests"], reference["runs"]))
    if getattr(onnx_model, "one_session", False):  # export.runtime.pipeline.OnnxModel(one_session=True)
        # One batch (the requests share one layout, as torch recorded them), so that each graph runs in one stretch
        # and a model holding one session at a time opens each once. Only then: int8's activation scale is per call,
        # over the batch, so batching would change its figures.
        (requests, runs) = zip(*pairs)
        pairs = [({name: torch.cat([r[name] for r in requests]) for name in requests[0]},
                  {name: [torch.cat(steps) for steps in zip(*(r[name] for r in runs))]
                   if isinstance(runs[0][name], list) else torch.cat([r[name] for r in runs]) for name in runs[0]})]
    for inputs, run in pairs:
        pixels = inputs["pixel_values"].numpy().astype(onnx_model.float_type)
        (got,) = onnx_model.run("vision_encoder", {"pixel_values": pixels})
        record("vision_encoder", got.numpy(), run["image_embeddings"])
        engine = onnx_model()
        record("prefill", engine.prefill(inputs, DECODE_STEPS), run["prefill"])
        for tokens, expected in zip(run["tokens"], run["decode"]):
            record("decode", engine.decode_step(tokens), expected)
    failed = []
    for name, diff in diffs.items():
        scaled = relative or name == "vision_encoder"
        limit = tolerance * (scales[name] if scaled else 1.0)
        rms = (squares[name][0] / max(squares[name][1], 1e-30)) ** 0.5
        log(f"validation {name}: max abs diff {diff:.3g} (tolerance {limit:.3g}, max |torch| {scales[name]:.3g}), "
            f"relative rms diff {rms:.3g}" + (f" (tolerance {rms_tolerance:.3g})" if rms_tolerance else ""))
        if not diff <= limit:
            failed.append(f"{name} {diff:.3g} > {limit:.3g}")
        if rms_tolerance and not rms <= rms_tolerance:
            failed.append(f"{name} relative rms {rms:.3g} > {rms_tolerance:.3g}")
    if failed:
        raise OnnxExportError(f"{onnx_model.onnx_dir}: ONNX Runtime differs from torch above tolerance: "
                              f"{', '.join(failed)}")
    return diffs
