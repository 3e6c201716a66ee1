"""A VQ-VAE for the shapes' masks: the codes the embedded model will answer `segment {shape}` with.

Its decoder is paligemma.MaskDecoder (big_vision's architecture, narrower by default); its encoder, used only to
turn training masks into codes, mirrors big_vision's (`big_vision/pp/proj/paligemma/segmentation.py`,
`encode_to_codebook_indices`): four 4x4 stride-2 convolutions with ReLUs (64 -> 4 pixels), two residual blocks,
a 1x1 convolution to the code width, nearest codebook vector. Arrays carry the published names (`encoder.*`,
`_vq_vae._embedding`, `decoder.*`), so the whole model is one file in vae-oid.npz's layout and its decoder loads
with MaskDecoder.from_file. Training: MSE to the mask in [-1, 1] (the scale of the published decoder's output,
threshold 0), the VQ-VAE codebook and commitment losses with a straight-through estimator, and unused codes
restarted on encoder outputs.

A training mask is what the segmentation target will be: a shape drawn by shapes/scenes.py, cropped to its box
(jittered by a pixel or two, as a predicted box would be) and resized to 64 x 64 (bilinear, as big_vision's
refcoco_mask2str does).

    python -m shapes.vqvae --out runs/vqvae --steps 1500       # writes vqvae.safetensors, mask_decoder.safetensors
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from paligemma.checkpoint import MASK_DECODER_NAME
from paligemma.mask_decoder import MASK_SIZE, MaskDecoder, MaskDecoderConfig, ResBlock, paste_mask

from . import scenes as S

logger = logging.getLogger(__name__)
VQVAE_NAME = "vqvae.safetensors"  # the whole model, encoder too (training only)
COMMITMENT = 0.25  # weight of the encoder's pull towards its code (van den Oord et al. 2017)


class ShapesVQVAE(MaskDecoder):
    """MaskDecoder plus the training-only encoder: masks [N, 64, 64] in [0, 1] -> codes [N, 16] -> logits."""

    def __init__(self, config: MaskDecoderConfig):
        super().__init__(config)
        widths = (1, *reversed(config.upsampling_widths))  # 1 -> W/8 -> W/4 -> W/2 -> W
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.ReLU()]  # TF 'SAME' for stride 2, kernel 4
        layers += [ResBlock(config.width), ResBlock(config.width), nn.Conv2d(config.width, config.embedding_dim, 1)]
        self.encoder = nn.Sequential(*layers)

    def encode(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs [N, 16, D] and their nearest codes [N, 16]."""
        z = self.encoder((2 * masks - 1)[:, None])  # [N, D, 4, 4]
        z = z.flatten(2).transpose(1, 2)  # [N, 16, D], row by row as the decoder reads them
        codebook = self._vq_vae._embedding
        distances = (z ** 2).sum(-1, keepdim=True) - 2 * z @ codebook.T + (codebook ** 2).sum(-1)
        return z, distances.argmin(-1)

    def loss(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, codes = self.encode(masks)
        quantized = self._vq_vae._embedding[codes]
        straight = z + (quantized - z).detach()
        grid = straight.transpose(1, 2).reshape(-1, z.shape[-1], 4, 4)
        logits = self.decoder(grid)[:, 0]
        loss = (F.mse_loss(logits, 2 * masks - 1) + F.mse_loss(quantized, z.detach())
                + COMMITMENT * F.mse_loss(z, quantized.detach()))
        return loss, codes

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """The arrays of the mask decoder alone (what a checkpoint ships)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("encoder.")}


def shape_mask(shape: str, box, canvas: int = S.CANVAS) -> np.ndarray:
    """bool [canvas, canvas]: the pixels shapes/scenes.py paints for `shape` in `box` (y_min, x_min, y_max, x_max)."""
    image = Image.new("RGB", (canvas, canvas))
    S._draw(ImageDraw.Draw(image), shape, "red", box)  # the renderer's own geometry, on black
    return np.asarray(image)[..., 0] > 0


def box_mask(mask: np.ndarray, box) -> np.ndarray:
    """float [64, 64] in [0, 1]: `mask` inside the whole-pixel box (y_min, x_min, y_max, x_max), resized bilinearly."""
    y0, x0, y1, x1 = (int(c) for c in box)
    crop = Image.fromarray(mask[y0:y1, x0:x1].astype(np.float32))
    return np.array(crop.resize((MASK_SIZE, MASK_SIZE), Image.Resampling.BILINEAR))


def random_example(rng: random.Random, jitter: int = 2) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(full mask, 64 x 64 target, jittered box) of one shape as the task card draws it."""
    size = rng.randint(S.MIN_SIZE, S.MAX_SIZE)
    y0, x0 = rng.randint(jitter, S.CANVAS - size - jitter), rng.randint(jitter, S.CANVAS - size - jitter)
    mask = shape_mask(rng.choice(S.SHAPES), (y0, x0, y0 + size, x0 + size))
    box = tuple(c + rng.randint(-jitter, jitter) for c in (y0, x0, y0 + size, x0 + size))
    return mask, box_mask(mask, box), box


def batch(rng: random.Random, size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([random_example(rng)[1] for _ in range(size)]))


def scene_codes(scene: S.Scene, model: ShapesVQVAE) -> list[list[int]]:
    """The 16 codes of each shape's mask (the drawn pixels in its true box, 64 x 64), left to right."""
    return scenes_codes([scene], model)[0]


@torch.no_grad()
def scenes_codes(scene_list, model: ShapesVQVAE) -> list[list[list[int]]]:
    """scene_codes of each scene, encoded in one batch."""
    targets = torch.from_numpy(np.stack([box_mask(shape_mask(s.shape, s.box), s.box)
                                         for scene in scene_list for s in scene.shapes]))
    codes = iter(model.encode(targets)[1].tolist())
    return [[next(codes) for _ in scene.shapes] for scene in scene_list]


def segment_answer(scene: S.Scene, names, model: ShapesVQVAE) -> str:
    """The training target of `scenes.segment_prompt(names)` (scenes.segment_answer with the model's codes)."""
    return S.segment_answer(scene, names, scene_codes(scene, model))


def load_vqvae(path) -> ShapesVQVAE:
    """A whole VQ-VAE (encoder too) saved by `save_vqvae`, strictly; its widths read from its arrays."""
    state = load_file(str(path))
    codebook, first = state["_vq_vae._embedding"], state["decoder.0.weight"]
    model = ShapesVQVAE(MaskDecoderConfig(codebook.shape[0], codebook.shape[1], first.shape[0]))
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_vqvae(model: ShapesVQVAE, directory: Path) -> None:
    """VQVAE_NAME (the whole model) and MASK_DECODER_NAME (its decoder, what a checkpoint ships) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    whole = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for name, state in ((MASK_DECODER_NAME, model.decoder_state()), (VQVAE_NAME, whole)):  # VQVAE_NAME last: done
        partial = directory / (name + ".partial")
        save_file(state, str(partial))
        os.replace(partial, directory / name)  # never a half-written file under the real name


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@torch.no_grad()
def evaluate(model: ShapesVQVAE, count: int = 300, seed: int = 1) -> dict[str, float]:
    """Reconstruction IoU on held-out shapes: at 64 x 64, and in the image (the codes' mask pasted into the box as
    paligemma.parse_segmentations does, against the drawn pixels)."""
    rng = random.Random(f"vqvae-eval:{seed}")
    examples = [random_example(rng) for _ in range(count)]
    targets = torch.from_numpy(np.stack([t for _, t, _ in examples]))
    _, codes = model.encode(targets)
    logits = model.mask_logits(codes.numpy())
    small = [iou(logit > 0, t > 0.5) for logit, t in zip(logits, targets.numpy())]
    pixels = [iou(paste_mask(logit, (box[1], box[0], box[3], box[2]), S.CANVAS, S.CANVAS), mask)
              for logit, (mask, _, box) in zip(logits, examples)]
    return dict(iou_64=float(np.mean(small)), iou_pixels=float(np.mean(pixels)),
                pixels_at_050=float(np.mean([p >= 0.5 for p in pixels])), codes_used=len(set(codes.flatten().tolist())))


def restart_dead_codes(model: ShapesVQVAE, z: torch.Tensor, used: torch.Tensor) -> int:
    """Codes no mask chose since the last check take the places of random encoder outputs."""
    dead = (~used).nonzero().flatten()
    if len(dead):
        flat = z.detach().reshape(-1, z.shape[-1])
        with torch.no_grad():
            model._vq_vae._embedding[dead] = flat[torch.randint(len(flat), (len(dead),))]
    return len(dead)


@dataclass(frozen=True)
class VQVAEOptions:
    steps: int = 1500
    batch: int = 32
    lr: float = 2e-3
    width: int = 64  # decoder width W (the published decoder: 128)
    dim: int = 64  # code width D (the published decoder: 512)
    seed: int = 0
    progress: bool = True


def train(args: VQVAEOptions) -> ShapesVQVAE:
    torch.manual_seed(args.seed)
    rng = random.Random(f"vqvae:{args.seed}")
    model = ShapesVQVAE(MaskDecoderConfig(embedding_dim=args.dim, width=args.width))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    used = torch.zeros(model.config.num_embeddings, dtype=torch.bool)
    start = time.perf_counter()
    for step in (bar := tqdm(range(1, args.steps + 1), desc="vqvae", disable=not args.progress)):
        masks = batch(rng, args.batch)
        loss, codes = model.loss(masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        used[codes.flatten()] = True
        if step % 100 == 0 and step < 0.8 * args.steps:
            restart_dead_codes(model, model.encode(batch(rng, 64))[0], used)
            used[:] = False
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            logger.info("step %d loss %.4f", step, loss.item())
    logger.info("trained %d steps in %.0f s", args.steps, time.perf_counter() - start)
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=64, help="decoder width W (the published decoder: 128)")
    parser.add_argument("--dim", type=int, default=64, help="code width D (the published decoder: 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on the shared 2-core CPU, 2 threads ran a step 8x slower than 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train(VQVAEOptions(args.steps, args.batch, args.lr, args.width, args.dim, args.seed))
    save_vqvae(model, args.out)
    metrics = evaluate(model)
    print(f"{args.steps} steps in {time.perf_counter() - start:.0f} s; held-out reconstruction: mean IoU "
          f"{metrics['iou_64']:.3f} at 64 x 64, {metrics['iou_pixels']:.3f} in the image (IoU >= 0.5: "
          f"{metrics['pixels_at_050']:.1%}), {metrics['codes_used']} codes used")


if __name__ == "__main__":
    main()
