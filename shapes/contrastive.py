"""Contrastive pre-training of the embedded model's vision tower, as SigLIP itself was trained: the vision tower
(the embedded PaliGemma's, plus SigLIP's attention-pooling head) and a small text tower learn to match each scene
with its caption under the sigmoid loss (paligemma.contrastive), then the tower (without the head) is handed to the
PaliGemma stages: `python -m shapes.train --vision-init OUT/last` starts stage 1 from it instead of a random tower.

    python -m shapes.contrastive --out runs/contrastive [--steps 300 --batch-size 32 --lr 1e-3] [--device cuda]
    python -m shapes.contrastive --out runs/lit --vision-from paligemma/demo_checkpoint --lock-vision   # LiT
    python -m shapes.contrastive --evaluate runs/contrastive/last          # retrieval top-1 only

Retrieval (the issue's protocol): each of 500 held-out scenes (seed 1) ranks 20 captions, its own and those of 19
other held-out scenes with the same number of shapes whose captions differ from its own (a seeded draw; 19
different captions where they exist, but one-shape scenes have only 11 others, so theirs repeat some), and scores
a hit when its own scores highest. Training scenes come from seed 0 (indices from 20,000,000 on, apart from the other
stages' draws).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from paligemma import train as T
from paligemma.contrastive import sigmoid_loss
from paligemma.processor import preprocess_image
from paligemma.siglip_config import SiglipConfig
from paligemma.siglip_model import SiglipModel, load_siglip, save_siglip
from shapes import scenes as S
from shapes.architecture import WIDTH, model_config, sinusoids
from shapes.tokenizer import build_shapes_tokenizer

logger = logging.getLogger(__name__)

TEXT_LENGTH = 16  # the longest caption ("a yellow triangle, a green square and a blue circle") is 13 tokens + </s>
EOS_ID, PAD_ID = 1, 0  # the shapes tokenizer's <eos> and <pad>
SCENE_OFFSET = 20_000_000
RETRIEVAL_CANDIDATES = 20


def contrastive_config(tokenizer: Tokenizer, text_layers: int = 2) -> SiglipConfig:
    """The embedded model's vision tower with a pooling head, and a text tower of `text_layers` (default: half its
    depth)."""
    vision = dict(model_config(tokenizer)["vision_config"], vision_use_head=True)
    text = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=text_layers, num_attention_heads=4,
                vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=TEXT_LENGTH, pad_token_id=PAD_ID,
                eos_token_id=EOS_ID)
    return SiglipConfig.from_dict(dict(model_type="siglip", vision_config=vision, text_config=text))


def initialize(model: SiglipModel, seed: int) -> None:
    """normal(0, 0.02) matrices, zero biases, unit LayerNorm scales, the recipe's sinusoidal patch positions; the
    logit scale and bias keep the paper's t' = log 10, b = -10."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("logit_scale", "logit_bias"):
                continue
            if p.dim() >= 2 or name.endswith("probe"):
                torch.nn.init.normal_(p, std=0.02)
            elif "norm" in name and name.endswith("weight"):
                torch.nn.init.ones_(p)
            else:
                torch.nn.init.zeros_(p)
        vision = model.config.vision
        grid = vision.image_size // vision.patch_size
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        half = vision.hidden_size // 2
        table = torch.cat([sinusoids(rows.flatten(), half, 3, 4 * grid),
                           sinusoids(cols.flatten(), half, 3, 4 * grid)], -1)
        model.vision_model.embeddings.position_embedding.weight.copy_(table * 4.0)


def caption_ids(tokenizer: Tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> [len, TEXT_LENGTH]: the tokens, <eos>, then <pad>, as SigLIP's texts are laid out."""
    rows = []
    for text in captions:
        ids = tokenizer.encode(text, add_special_tokens=False).ids[: TEXT_LENGTH - 1] + [EOS_ID]
        rows.append(ids + [PAD_ID] * (TEXT_LENGTH - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def batch_indices(seed: int, step: int, batch_size: int, same_count: bool) -> list[int]:
    """The scene indices of a step's batch: the next `batch_size` of the stream, or with `same_count` the first
    `batch_size` of the step's own stretch of the stream (64 per scene) holding the step's number of shapes (1, 2, 3
    in turn), so that every negative is one the retrieval protocol asks about: a caption of as many shapes."""
    if not same_count:
        return [SCENE_OFFSET + step * batch_size + j for j in range(batch_size)]
    want, base = step % 3 + 1, SCENE_OFFSET + step * batch_size * 64
    return [i for i in range(base, base + batch_size * 64) if S.shape_count(seed, i) == want][:batch_size]


def scene_batches(tokenizer: Tokenizer, image_size: int, batch_size: int, seed: int, same_count: bool = False):
    def batches(step: int) -> dict:
        chosen = [S.render_scene(seed, i) for i in batch_indices(seed, step, batch_size, same_count)]
        return {"pixel_values": torch.stack([preprocess_image(s.image, image_size) for s in chosen]),
                "input_ids": caption_ids(tokenizer, [S.caption(s) for s in chosen])}

    return batches


def contrastive_loss(model: SiglipModel, batch: dict):
    # Scenes can share a caption (one-shape scenes have 12): such a pair counts as a negative, as in web data.
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    return sigmoid_loss(logits), {"t": round(model.logit_scale.exp().item(), 2), "b": round(model.logit_bias.item(), 2)}


def retrieval_candidates(captions: list[str], counts: list[int], seed: int) -> list[list[int]]:
    """For each scene, the indices of the 20 scenes whose captions it ranks: itself first, then 19 others with as
    many shapes and a caption different from its own; their captions differ from each other too where the pool
    has 19 such captions, else they are drawn with replacement (one-shape scenes have 11 other captions)."""
    rng = random.Random(f"retrieval:{seed}")
    rows = []
    for i, (own, count) in enumerate(zip(captions, counts)):
        by_caption = {}
        for j, (text, n) in enumerate(zip(captions, counts)):
            if n == count and text != own:
                by_caption.setdefault(text, []).append(j)
        if not by_caption:
            raise ValueError(f"scene {i} has no other scene with {count} shapes and another caption; use more scenes")
        others = list(by_caption)
        texts = rng.sample(others, RETRIEVAL_CANDIDATES - 1) if len(others) >= RETRIEVAL_CANDIDATES - 1 else \
            rng.choices(others, k=RETRIEVAL_CANDIDATES - 1)
        rows.append([i] + [rng.choice(by_caption[text]) for text in texts])
    return rows


@torch.no_grad()
def retrieval_top1(model: SiglipModel, tokenizer: Tokenizer, num_scenes: int = 500, seed: int = 1,
                   batch_size: int = 50) -> dict:
    """Share of held-out scenes whose own caption scores highest among the 20 candidates (and per shape count)."""
    was_training = model.training
    model.eval()
    scenes = S.render_scenes(seed, num_scenes)
    captions = [S.caption(s) for s in scenes]
    counts = [len(s.shapes) for s in scenes]
    device = next(model.parameters()).device
    size = model.config.vision.image_size
    images = torch.cat([model.image_embeddings(torch.stack([preprocess_image(s.image, size) for s in
                                                            scenes[k : k + batch_size]]).to(device))
                        for k in range(0, num_scenes, batch_size)])
    texts = model.text_embeddings(caption_ids(tokenizer, captions).to(device))
    logits = model.logits(images, texts)  # [scene, caption of scene]
    hits = {1: [], 2: [], 3: []}
    for i, row in enumerate(retrieval_candidates(captions, counts, seed)):
        scores = logits[i, row]
        hits[counts[i]].append(bool(scores[0] > scores[1:].max()))
    model.train(was_training)
    every = [h for per_count in hits.values() for h in per_count]
    return {"retrieval_top1": round(sum(every) / len(every), 4),
            **{f"top1_{n}_shapes": round(sum(h) / max(1, len(h)), 4) for n, h in hits.items()}}


def tower_weights(checkpoint) -> dict:
    """The vision tower of `checkpoint` (a PaliGemma's, or a SigLIP's) without SigLIP's pooling head: what one tower
    hands another (shapes.train --vision-init, --vision-from)."""
    return {k: v for k, v in load_siglip(checkpoint, dtype=torch.float32).vision_model.state_dict().items()
            if not k.startswith("head.")}


def start_vision_from(model: SiglipModel, checkpoint: str) -> None:
    """Copies the vision tower of `checkpoint` into `model`, its pooling head left as initialized; the towers must
    have the same shape."""
    tower = tower_weights(checkpoint)
    own = model.vision_model.state_dict()
    body = {k for k in own if not k.startswith("head.")}
    if tower.keys() != body or any(tower[k].shape != own[k].shape for k in body):
        different = sorted(k for k in body | tower.keys() if k not in tower or k not in body
                           or tower[k].shape != own[k].shape)
        raise ValueError(f"{checkpoint}: its vision tower is not the embedded model's (differs in {different[:5]})")
    model.vision_model.load_state_dict({**own, **tower})  # strict: the head as it is, every other tensor the tower's


def lock_vision_tower(model: SiglipModel) -> None:
    """Freezes the vision tower but its pooling head, as LiT (Zhai et al., 2022) locks a pre-trained image tower:
    the text tower learns to read the image features the tower already has."""
    for name, p in model.vision_model.named_parameters():
        p.requires_grad_(name.startswith("head."))


def text_tower_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with <eos> appended to every text, caption_ids' layout: the checkpoint's tokenizer.json, so that
    paligemma.SiglipTokenizer (`python -m paligemma classify`) gives the ids the text tower was trained on."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    eos = copy.id_to_token(EOS_ID)
    copy.post_processor = TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, EOS_ID)])
    return copy


def save_run_checkpoint(model: SiglipModel, tokenizer: Tokenizer, directory: Path) -> None:
    save_siglip(model, directory)
    text_tower_tokenizer(tokenizer).save(str(Path(directory) / "tokenizer.json"))


@dataclass(frozen=True)
class ContrastiveOptions:
    """The contrastive stage's settings (the command's options; shapes.train --contrastive-steps runs it too)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 1e-4
    text_layers: int = 2
    same_count: bool = False  # every batch of scenes with as many shapes (see batch_indices)
    vision_from: str | None = None  # a checkpoint whose vision tower (not its head) the run starts from
    lock_vision: bool = False  # train the text tower and the pooling head alone (LiT: see lock_vision_tower)
    eval_every: int = 200
    eval_scenes: int = 500
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    progress: bool = True


def train_contrastive(out: Path, options: ContrastiveOptions, log) -> SiglipModel:
    """Trains (or resumes, from OUT/last) the two towers in `out`; returns the trained model."""
    tokenizer = build_shapes_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    resume = out / "last" if (out / "last" / T.STATE_JSON).exists() else None
    if resume is None:
        model = SiglipModel(contrastive_config(tokenizer, options.text_layers))
        initialize(model, options.seed)
        if options.vision_from:
            start_vision_from(model, options.vision_from)
            log(f"the vision tower starts from {options.vision_from}'s (its pooling head fresh)")
    else:
        model = load_siglip(resume, dtype=torch.float32)
    if options.lock_vision:
        lock_vision_tower(model)
    model.to(options.device)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"contrastive stage: {trained} parameters trained{' (vision tower locked)' if options.lock_vision else ''}, "
        f"batch {options.batch_size}{' (same shape count)' if options.same_count else ''}, {options.steps} steps, "
        f"lr {options.lr}, text tower {model.config.text.num_hidden_layers} layers")
    train_options = T.TrainOptions(steps=options.steps, lr=options.lr, warmup=options.warmup,
                                   weight_decay=options.weight_decay, eval_every=options.eval_every,
                                   seed=options.seed, workers=options.workers, progress=options.progress)
    start = time.perf_counter()
    batches = scene_batches(tokenizer, model.config.vision.image_size, options.batch_size, options.seed,
                            options.same_count)
    T.train(model, batches, contrastive_loss, train_options, out_dir=out,
            save=partial(save_run_checkpoint, model, tokenizer),
            evaluate=lambda step: retrieval_top1(model, tokenizer, options.eval_scenes), resume=resume, log=log)
    log(f"contrastive stage trained in {time.perf_counter() - start:.0f} s; held-out retrieval: "
        f"{json.dumps(retrieval_top1(model, tokenizer, options.eval_scenes))}")
    return model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="run folder (checkpoints OUT/last, log OUT/log.txt); rerun to resume")
    parser.add_argument("--evaluate", help="a checkpoint to measure retrieval on, instead of training")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--text-layers", type=int, default=2, help="layers of the text tower")
    parser.add_argument("--same-count", action="store_true",
                        help="batches of scenes with as many shapes, so that every negative is a hard one")
    parser.add_argument("--vision-from", help="a checkpoint (PaliGemma or SigLIP) whose vision tower the run starts "
                        "from, e.g. paligemma/demo_checkpoint; the pooling head starts fresh")
    parser.add_argument("--lock-vision", action="store_true", help="train the text tower and the pooling head alone "
                        "(LiT); give --vision-from too")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=0, help="processes drawing the next batches meanwhile")
    args = parser.parse_args(argv)
    if not args.out and not args.evaluate:
        parser.error("give --out to train, or --evaluate CHECKPOINT")
    if args.lock_vision and not args.vision_from:
        parser.error("--lock-vision keeps a trained vision tower as it is: give --vision-from CHECKPOINT too")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate:
        model = load_siglip(args.evaluate, device=args.device, dtype=torch.float32)
        print(json.dumps(retrieval_top1(model, build_shapes_tokenizer(), args.eval_scenes)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "log.txt"

    def log(line: str) -> None:
        logger.info(line)
        with log_file.open("a") as f:
            f.write(line + "\n")

    options = ContrastiveOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                                 weight_decay=args.weight_decay, text_layers=args.text_layers,
                                 same_count=args.same_count, vision_from=args.vision_from,
                                 lock_vision=args.lock_vision, eval_every=args.eval_every, eval_scenes=args.eval_scenes,
                                 seed=args.seed, device=args.device, workers=args.workers)
    train_contrastive(out, options, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
