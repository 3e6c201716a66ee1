"""Resident memory and speed of the ONNX Runtime sessions on a model whose weights dominate: PaliGemma 3B widths
(SigLIP So400m, Gemma 2B, the 257216-row vocabulary) with 2 layers per tower and random weights, ~3 GB in float32.

    python -m export.memory_check [--workdir DIR] [--threads N]

Builds the checkpoint, exports it, checks ORT against torch on a prompt with 256 image tokens, then measures in fresh
processes the RSS added by creating all three sessions (and after one prefill and some decode steps) against the
weight bytes, for this runtime (decoder weights shared, no pre-packing) and for ONNX Runtime's defaults (each
session loads its own weights and pre-packs them). The bound is RSS added by loading <= 1.3x the weight bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BOUND = 1.3
DECODE_STEPS = 16
PROMPT_TEXT_TOKENS = 10


def benchmark_config() -> dict:
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16, patch_size=14,
                  image_size=224, vision_use_head=False)
    text = dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=257216)
    return dict(model_type="paligemma", text_config=text, vision_config=vision, projection_dim=2048,
                image_token_index=257152)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prompt_inputs(config, batch: int = 1):
    import torch

    generator = torch.Generator().manual_seed(0)
    N = config.num_image_tokens
    input_ids = torch.randint(3, 256000, (batch, N + PROMPT_TEXT_TOKENS), generator=generator)
    input_ids[:, :N] = config.image_token_index
    input_ids[:, N] = config.bos_token_id
    shape = input_ids.shape
    return dict(input_ids=input_ids, attention_mask=torch.ones(shape, dtype=torch.long),
                token_type_ids=torch.zeros(shape, dtype=torch.long),
                pixel_values=torch.rand(batch, 3, config.image_size, config.image_size, generator=generator) * 2 - 1)


def build(workdir: Path) -> tuple[Path, Path]:
    import torch

    from paligemma.config import PaliGemmaConfig
    from paligemma.model import PaliGemmaForConditionalGeneration
    from paligemma.weights import save_checkpoint

    from .writer.onnx_export import export_model

    checkpoint, onnx_dir = workdir / "checkpoint", workdir / "onnx"
    if not (onnx_dir / "manifest.json").exists():
        torch.manual_seed(0)
        model = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(benchmark_config())).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0.0, 0.02)
        save_checkpoint(model, checkpoint)
        del model
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        export_model(checkpoint, onnx_dir)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"export peak RSS {peak / 1e6:.1f} GB (process peak before the export {before / 1e6:.1f} GB)")
    return checkpoint, onnx_dir


def compare_with_torch(checkpoint: Path, onnx_dir: Path, threads: int | None) -> dict:
    """Max abs difference of prefill and decode logits, ORT vs torch, on 256 image tokens + a short prompt."""
    from paligemma.engines import TorchEngine
    from paligemma.weights import load_model

    from .runtime.pipeline import OnnxModel

    model = load_model(checkpoint)
    inputs = prompt_inputs(model.config)
    onnx_model = OnnxModel(onnx_dir, model.config, threads=threads)
    torch_engine, onnx_engine = TorchEngine(model), onnx_model()
    expected, got = torch_engine.prefill(inputs, 4), onnx_engine.prefill(inputs, 4)
    diffs = {"prefill": float((got - expected).abs().max())}
    decode = 0.0
    for _ in range(4):
        tokens = expected.argmax(-1)
        expected, got = torch_engine.decode_step(tokens), onnx_engine.decode_step(tokens)
        decode = max(decode, float((got - expected).abs().max()))
    diffs["decode"] = decode
    start = time.perf_counter()
    torch_engine = TorchEngine(model)
    logits = torch_engine.prefill(inputs, DECODE_STEPS)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        logits = torch_engine.decode_step(logits.argmax(-1))
    diffs["torch_prefill_s"] = prefill_s
    diffs["torch_decode_tokens_per_s"] = DECODE_STEPS / (time.perf_counter() - start)
    return diffs


def measure(onnx_dir: Path, mode: str, threads: int | None) -> dict:
    """Runs in a fresh process: RSS before and after creating the sessions, and after generating."""
    import numpy as np
    import onnxruntime as ort

    from paligemma.config import PaliGemmaConfig

    from .runtime.pipeline import OnnxEngine, OnnxModel, session_options

    config = PaliGemmaConfig.from_json_file(onnx_dir / "config.json")
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    inputs = prompt_inputs(config)
    before = rss_bytes()
    start = time.perf_counter()
    if mode in ("shared", "shared_prepacked"):
        model = OnnxModel(onnx_dir, config, threads=threads, prepack=mode == "shared_prepacked")
    else:  # ONNX Runtime's defaults: every session reads its own weights from the data file and pre-packs them
        model = OnnxModel.__new__(OnnxModel)
        model.manifest, model.config, model.float_type = manifest, config, np.float32
        model.device_type, model.device_id = "cpu", 0
        model.sessions = {}
        for name in ("vision_encoder", "prefill", "decode"):
            options = session_options(threads, None)
            model.sessions[name] = ort.InferenceSession(str(onnx_dir / f"{name}.onnx"), options,
                                                        providers=["CPUExecutionProvider"])
        model.output_names = {n: [o.name for o in s.get_outputs()] for n, s in model.sessions.items()}
        from .graphs import cache_names

        model.past_names = cache_names("past_key_values", config.text.num_hidden_layers)
    load_s = time.perf_counter() - start
    loaded = rss_bytes()
    engine = OnnxEngine(model)
    start = time.perf_counter()
    logits = engine.prefill(inputs, DECODE_STEPS)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        logits = engine.decode_step(logits.argmax(-1))
    decode_rate = DECODE_STEPS / (time.perf_counter() - start)
    after_run = rss_bytes()
    engine = OnnxEngine(model)
    logits = engine.prefill(prompt_inputs(config, batch=2), DECODE_STEPS)
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        logits = engine.decode_step(logits.argmax(-1))
    batch_rate = 2 * DECODE_STEPS / (time.perf_counter() - start)
    weights = manifest["weight_bytes"]
    return dict(decode_batch2_tokens_per_s=batch_rate,
                mode=mode, weight_bytes=weights, rss_before=before, rss_loaded=loaded, rss_after_run=after_run,
                load_ratio=(loaded - before) / weights, run_ratio=(after_run - before) / weights, load_s=load_s,
                prefill_s=prefill_s, decode_tokens_per_s=decode_rate)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.memory_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="keeps the checkpoint and export between runs (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="shared", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.mode, args.threads)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        checkpoint, onnx_dir = build(workdir)
        diffs = compare_with_torch(checkpoint, onnx_dir, args.threads)
        print(f"ORT vs torch max abs diff: prefill {diffs['prefill']:.3g}, decode {diffs['decode']:.3g}; torch eager: "
              f"prefill {diffs['torch_prefill_s']:.2f}s, decode {diffs['torch_decode_tokens_per_s']:.2f} tokens/s")
        results = {}
        for mode in ("shared", "shared_prepacked", "ort_defaults"):
            command = [sys.executable, "-m", "export.memory_check", "--measure", str(onnx_dir), "--mode", mode]
            if args.threads:
                command += ["--threads", str(args.threads)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[mode] = r = json.loads(out.strip().splitlines()[-1])
            print(f"{mode:>16}: weights {r['weight_bytes'] / 1e9:.2f} GB, RSS added by loading "
                  f"{(r['rss_loaded'] - r['rss_before']) / 1e9:.2f} GB ({r['load_ratio']:.2f}x), after a run "
                  f"{(r['rss_after_run'] - r['rss_before']) / 1e9:.2f} GB ({r['run_ratio']:.2f}x); "
                  f"load {r['load_s']:.1f}s, "
                  f"prefill {r['prefill_s']:.2f}s, decode {r['decode_tokens_per_s']:.2f} tokens/s "
                  f"({r['decode_batch2_tokens_per_s']:.2f} with a batch of two)")
        ok = results["shared"]["load_ratio"] <= BOUND
        print(f"bound {BOUND}x: {'met' if ok else 'NOT met'}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
