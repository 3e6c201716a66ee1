"""Whole requests as the app makes them: one `generate` call per image (preprocessing, prefill, decoding until
<eos> or max_new_tokens, detokenizing), greedy, for transformers, this project's eager torch engine and its ONNX
Runtime loop (its graphs fused, as the library loads them, and as exported), in one process, the runtimes
taking turns within each round. Prints each runtime's median per request and its ratio to transformers.

    python -m bench.requests                                # the embedded model, "caption en" on 8 drawn scenes
    python -m bench.requests --model CHECKPOINT --onnx-dir EXPORT --rounds 4 --scenes 4

Each runtime uses the threads it would use in the app: torch its defaults (every core), ONNX Runtime the thread
plan (export/threads.py). Every runtime's tokens must equal transformers' for every scene (checked, and printed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import paligemma
from export.runtime import OnnxModel, load_onnx_pipeline
from paligemma.cli import ArgumentParser
from paligemma.generate import Pipeline
from shapes.scenes import render_scenes

from .reference import transformers_processor


def until_stop(ids: list[int], stop_ids) -> list[int]:
    for index, token in enumerate(ids):
        if token in stop_ids:
            return ids[:index]
    return ids


def transformers_request(folder: Path, stop_ids, max_new_tokens: int):
    import transformers
    from transformers import PaliGemmaForConditionalGeneration

    transformers.logging.set_verbosity_error()
    model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    vision = model.config.vision_config
    processor = transformers_processor(folder, vision.image_size, (vision.image_size // vision.patch_size) ** 2)

    def run(image, prompt):
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids))
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        processor.decode(ids, skip_special_tokens=True)
        return until_stop(ids, stop_ids)

    return run


def pipeline_request(pipe, max_new_tokens: int):
    def run(image, prompt):
        return until_stop(pipe.generate(image, prompt, max_new_tokens=max_new_tokens).token_ids, pipe.stop_ids)

    return run


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m bench.requests", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    parser.add_argument("--onnx-dir", default=None, help="its export (default: the export cache)")
    parser.add_argument("--prompt", default="caption en")
    parser.add_argument("--scenes", type=int, default=8, help="drawn scenes per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the app's default")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.scenes < 1:
        parser.error("--rounds and --scenes must be at least 1")
    folder = Path(args.model or paligemma.DEMO_CHECKPOINT)
    onnx_pipe = load_onnx_pipeline(folder, onnx_dir=args.onnx_dir)
    onnx = onnx_pipe.engine_factory
    exported = OnnxModel(onnx.onnx_dir, onnx.config, threads=onnx.thread_plan.intra_op_threads, fused=False)
    torch_pipe = paligemma.load(folder)
    n = args.max_new_tokens
    runtimes = {
        "transformers": transformers_request(folder, torch_pipe.stop_ids, n),
        "torch": pipeline_request(torch_pipe, n),
        "onnx": pipeline_request(onnx_pipe, n),
        "onnx (graphs as exported)": pipeline_request(Pipeline(None, onnx_pipe.processor, exported), n),
    }
    print(f"onnx: {onnx.thread_plan.describe()}, graphs {'fused' if onnx.fused_decode else 'as exported'}; "
          f"torch {torch.get_num_threads()} threads", flush=True)
    scenes = [s.image for s in render_scenes(0, args.scenes)]
    for run in runtimes.values():
        run(scenes[0], args.prompt)  # warm-up
    times = {name: [] for name in runtimes}
    tokens = {name: {} for name in runtimes}
    names = list(runtimes)
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]  # each goes first in turn
        for scene_index, image in enumerate(scenes):
            for name in order:
                start = time.perf_counter()
                tokens[name][scene_index] = runtimes[name](image, args.prompt)
                times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["transformers"])
    for name in names:
        median = statistics.median(times[name])
        same = sum(tokens[name][i] == tokens["transformers"][i] for i in range(len(scenes)))
        print(f"{name}: {median * 1000:.1f} ms per request (median of {len(times[name])}; "
              f"{min(times[name]) * 1000:.1f}-{max(times[name]) * 1000:.1f}), {reference / median:.2f}x transformers; "
              f"tokens equal to transformers' on {same}/{len(scenes)} scenes", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
