"""Seconds per step of each stage of shapes.train, to budget the recipe: a benchmark command, not a test.

    OMP_WAIT_POLICY=PASSIVE nice -n 19 python -m shapes.step_times --threads 1 [--steps 8] [--json]

Each stage's step is timed as the recipe runs it (its batch drawn, forward, backward, AdamW), with wall and CPU
time per step after one warm-up step; `stage 2 packed, before segmentation` is the step the recipe ran before
segmentation and the training styles (no segmentation question, the card's drawing, a quarter of images as JPEG),
whose time on a quiet machine is known (0.61 s on this 2-core CPU; docs/embedded-model.md), so the ratios carry the
measurement over to a quiet machine even when this one is shared. The models start untrained: a step's cost does
not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from paligemma import train as T
from paligemma.config import PaliGemmaConfig
from paligemma.mask_decoder import MaskDecoderConfig
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.processor import PaliGemmaProcessor
from shapes import contrastive as C
from shapes import train as R
from shapes import vqvae as V
from shapes.tokenizer import build_shapes_tokenizer


def timed(step, steps: int) -> dict:
    """Wall and CPU seconds per call of `step(i)` over `steps` calls, after one warm-up call."""
    step(0)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(1, steps + 1):
        step(i)
    return {"wall_s": round((time.perf_counter() - wall) / steps, 3),
            "cpu_s": round((time.process_time() - cpu) / steps, 3)}


def optimizer_step(model, loss_fn, batches, extra=()):
    params = [p for p in model.parameters()] + [p for m in extra for p in m.parameters()]
    optimizer = T.adamw(params, 1e-4, 0.0)

    def step(i):
        T.train_step(model, loss_fn, batches(i), optimizer, params, 1e-4, 1.0)

    return step


def stage_steps(steps: int) -> dict:
    tokenizer = build_shapes_tokenizer()
    config = PaliGemmaConfig.from_dict(R.model_config(tokenizer))
    processor = PaliGemmaProcessor(tokenizer, config)
    model = PaliGemmaForConditionalGeneration(config)
    R.initialize(model, tokenizer, 0)
    heads = R.AuxiliaryHeads(config.text.hidden_size)
    grid = config.vision.image_size // config.vision.patch_size
    loc_range = R.loc_range_of(tokenizer)
    vqvae = V.ShapesVQVAE(MaskDecoderConfig()).eval()  # the recipe's widths
    results = {}

    vq_rng = random.Random(0)
    vq_model = V.ShapesVQVAE(MaskDecoderConfig())
    vq_optimizer = torch.optim.AdamW(vq_model.parameters(), lr=1e-3)

    def vq_step(i):
        loss, _ = vq_model.loss(V.batch(vq_rng, 32))
        vq_optimizer.zero_grad()
        loss.backward()
        vq_optimizer.step()

    results["vqvae (32 masks)"] = timed(vq_step, 4 * steps)

    siglip = C.SiglipModel(C.contrastive_config(tokenizer))
    C.initialize(siglip, 0)
    results["contrastive (32 scenes, same shape count)"] = timed(optimizer_step(
        siglip, C.contrastive_loss,
        C.scene_batches(tokenizer, config.vision.image_size, 32, 0, same_count=True)), steps)

    results["stage 1 (32 images)"] = timed(optimizer_step(
        model, R.vision_loss(heads, loc_range, 2.0), R.vision_batches(grid, config.image_size, 32, 0), [heads]), steps)

    loss = R.recipe_loss(heads, loc_range, 0.5)
    sigma = lambda step: 1.0  # noqa: E731
    before = R.Drawing(augment=False, jpeg_fraction=0.25)
    cases = {
        "stage 2 packed (12 images x 7 questions)": (10**6, R.Drawing(), vqvae),
        "stage 2 packed, before segmentation (12 x 6)": (10**6, before, None),
        "stage 2/3 unpacked (8 images x 7 rows)": (0, R.Drawing(), vqvae),
        "stage 2/3 unpacked, before segmentation (8 x 6)": (0, before, None),
    }
    for name, (packed_steps, drawing, decoder) in cases.items():
        batches = R.synthetic_batches(processor, grid, 0, sigma, packed_steps, 12, 8, drawing, decoder)
        results[name] = timed(optimizer_step(model, loss, batches, [heads]), steps)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per stage (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = stage_steps(args.steps)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    if args.json:
        print(json.dumps({"threads": args.threads, "load_average": float(load), "steps": results}))
        return
    print(f"threads {args.threads}, load average {load} at the end")
    for name, t in results.items():
        print(f"{name:>46}: {t['wall_s']:.3f} s wall, {t['cpu_s']:.3f} s CPU per step")


if __name__ == "__main__":
    main()
