"""The recipe of the embedded demo model: a small PaliGemma trained from scratch on scenes drawn on the fly.

    python -m shapes.train --out runs/shapes          # rerun the same command to resume
    python -m shapes.train --out runs/shapes --export paligemma/demo_checkpoint   # copy the run's model
    python -m shapes.train --out runs/tuned --init-from CHECKPOINT ...            # fine-tune (no stage 1)

Stages, each resumable in a folder of its own:
0. OUT/contrastive (`--contrastive-steps`, 0 for none; from scratch only): the vision tower and a small text tower
   on scene / caption pairs with the sigmoid loss (shapes/contrastive.py); stage 1 starts from its tower.
1. OUT/vision: the vision tower alone on the auxiliary patch targets below (cheap: no decoder).
   OUT/vqvae (`--segment`, the default): the VQ-VAE of the masks (shapes/vqvae.py), trained once before stage 2;
   its codes answer `segment {shape}` and its decoder is written beside every checkpoint (mask_decoder.safetensors).
2. OUT: the whole model on the tasks, the patch targets kept as an auxiliary loss.
3. OUT/polish (`--polish-steps`, 0 for none): a short second schedule that polishes detection.
4. OUT/settle (`--settle-steps`, 0 for none, the default): a last short schedule at a low learning rate and narrow
   soft targets. The last stage's last checkpoint is the run's model.
With `--init-from` a checkpoint of this recipe is fine-tuned from stage 2 on; one whose vocabulary predates the
words appended since (shapes/tokenizer.py's APPENDED_WORDS: "segment") gets their embedding rows added at the end,
every other id and weight unchanged. Training scenes (not the held-out ones) are drawn with `--augment`'s styles
(scenes.training_style: shifted shades, other light backgrounds, canvas scale, soft edges, noise), half of them
through JPEG; the last detection and the segmentation name an absent kind, answered empty, in `--absent-share`.

What makes it learn in CPU minutes where a naive recipe stalls:
- 112 px images in 14 px patches (64 image tokens), narrow towers (width 192, 4 + 4 layers, ~4 M parameters).
- Hand initialization: 2D sinusoidal patch positions in the vision tower, and the 1,024 location embeddings
  (tied with the output layer) as sinusoids of the bin index, so neighbouring bins start close.
- Gaussian soft targets over neighbouring location bins, narrowing over stage 2 (wide: neighbouring bins learn
  together; narrow at the end: a peaked first location token, which greedy decoding needs to prefer a box to <eos>).
- Each image is embedded once and asked six questions (a caption, both counts, `--detections` = 3 detections;
  a seventh, a segmentation, with `--segment`),
  packed into one decoder sequence that shares the 64 image tokens (shapes/packing.py: cheaper per question);
  the last `--steps - --packed-steps` steps unpack them into one sequence per question, the exact attention of
  inference, since packed steps cannot teach image features that depend on the prompt, which listing two of
  three kinds in a detection needs. `--unpack-detections` gives each detection a sequence of its own from the
  start instead (it learns more slowly, so it is not the default).
- Stage 3 trains unpacked, with three-shape scenes weighted up and, per box, the loss on its first location token
  (which shape comes next) and on the token after its label (another box or stop) weighted 4x
  (`decision_weights`): those two are where the remaining detection failures start.
- Auxiliary per-patch targets on the projected image embeddings, used in training only and not part of the
  checkpoint: each patch predicts the color and kind of the shape under it, that shape's rank from the left
  (overall, among its kind, among each pair of kinds), the scene's counts, and its box as location tokens
  scored against the tied location embeddings. They teach the vision tower what the decoder needs to read.
The result is a plain PaliGemma checkpoint. docs/embedded-model.md measures the recipe,
docs/embedded-model-experiments.md the variants tried.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from paligemma import train as T
from paligemma.checkpoint import MASK_DECODER_NAME
from paligemma.config import PaliGemmaConfig
from paligemma.generate import Pipeline
from paligemma.locations import SEG_TOKENS, loc_range_of
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.processor import PaliGemmaProcessor
from paligemma.weights import load_model
from shapes import evaluate as E
from shapes import scenes as S
from shapes.architecture import model_config, sinusoids
from shapes.contrastive import tower_weights
from shapes.packing import packed_batch, packed_hidden
from shapes.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, build_shapes_tokenizer


def initialize(model: PaliGemmaForConditionalGeneration, tokenizer, seed: int):
    torch.manual_seed(seed)
    T.init_weights(model)
    vision = model.config.vision
    grid = vision.image_size // vision.patch_size
    # Patch positions: half the channels a sinusoid of the row, half of the column, about as large as the patches.
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    half = vision.hidden_size // 2
    table = torch.cat([sinusoids(rows.flatten(), half, 3, 4 * grid), sinusoids(cols.flatten(), half, 3, 4 * grid)], -1)
    embeddings = model.vision_tower.vision_model.embeddings.position_embedding.weight
    with torch.no_grad():
        embeddings.copy_(table * 4.0)
        # Location tokens: sinusoids of the bin index with periods from 16 to 4096 bins, so that bins a few apart
        # have nearly the same embedding (and, tied to the output layer, nearly the same logit).
        first, count = loc_range_of(tokenizer)
        tokens = model.language_model.model.embed_tokens.weight
        loc = sinusoids(torch.arange(count), tokens.shape[1], 16, 4096)
        tokens[first : first + count] = loc * (0.02 * math.sqrt(tokens.shape[1]))


# ---- training examples ----------------------------------------------------------------------------


ABSENT_SHARE = 0.15  # of images whose last detection (and, segmenting, whose segmentation) names an absent kind


def loc_sigma_at(step: int, total: int, start: float, final: float) -> float:
    """The soft targets' width at `step`: cosine from `start` to `final` bins over the run. Wide targets teach
    neighbouring bins to agree early; narrow ones at the end give a peaked first location token, which greedy
    decoding needs to prefer a box over <eos> (wide targets spread it over many bins)."""
    progress = min(1.0, step / max(1, total))
    return final + (start - final) * 0.5 * (1 + math.cos(math.pi * progress))


def questions(scene, rng, detections: int = 3, codes=None, absent_share: float = ABSENT_SHARE):
    """The (prefix, suffix) pairs asked about one training image: a caption, both counts, `detections` detections,
    and with `codes` (each shape's 16 mask codes, shapes.vqvae.scene_codes) one segmentation. Detection gets the
    most practice: it is the last task learnt (listing every match left to right, and stopping after the last one).
    With probability `absent_share` the last detection, and the segmentation, each name a kind the scene does not
    hold (answered empty); too many empty answers teach <eos> a prior that outbids the first location token under
    greedy decoding (docs/embedded-model.md, "How the shipped checkpoint was made")."""
    if detections < 1:
        raise ValueError(f"detections={detections}: ask at least one detection per image")
    present = list(dict.fromkeys(s.shape for s in scene.shapes))
    absent = S.absent_kinds(scene)
    asked = set()

    def some_present_kinds(asked):
        """One or two kinds present, not asked yet; failing that (one kind present), a prompt mixing a present
        kind with an absent one, which also teaches to skip shapes of kinds not asked for."""
        for _ in range(4):
            rng.shuffle(present)
            kinds = tuple(present[: rng.choice([1, 2])])
            if kinds not in asked:
                break
        else:
            fresh = [k for k in S.detect_prompts() if set(k) & set(present) and tuple(k) not in asked]
            kinds = tuple(rng.choice(fresh)) if fresh else kinds
        asked.add(kinds)
        return list(kinds)

    def kinds_to_ask(asked):
        return [rng.choice(absent)] if absent and rng.random() < absent_share else some_present_kinds(asked)

    # Half the colour questions name a colour present, so that "0" is not the answer most of the time.
    colors = list(dict.fromkeys(s.color for s in scene.shapes)) if rng.random() < 0.5 else list(S.COLORS)
    color = rng.choice(colors)
    asked_kinds = [some_present_kinds(asked) for _ in range(detections - 1)] + [kinds_to_ask(asked)]
    pairs = [
        (S.CAPTION_PROMPT, S.caption(scene)),
        (S.COUNT_PROMPT, S.count_answer(scene)),
        (S.color_count_prompt(color), S.count_answer(scene, color)),
        *[(S.detect_prompt(kinds), S.detect_answer(scene, kinds)) for kinds in asked_kinds],
    ]
    if codes is not None:
        kinds = kinds_to_ask(set())
        pairs.append((S.segment_prompt(kinds), S.segment_answer(scene, kinds, codes)))
    return pairs


PAIRS = [("circle", "square"), ("circle", "triangle"), ("square", "triangle")]
KINDS = [(c, s) for c in S.COLORS for s in S.SHAPES]
# Auxiliary classification heads: name -> number of classes (-100 where a head does not apply).
AUX_HEADS = {"kind": 1 + len(KINDS), "rank": 3, "rank_in_kind": 3, **{f"rank_in_{a}_{b}": 3 for a, b in PAIRS},
             "count": 3, **{f"count_{c}": 4 for c in S.COLORS}, **{f"count_{s}": 4 for s in S.SHAPES}}
HEAD_ROW = {name: i for i, name in enumerate(AUX_HEADS)}  # a head's row in patch_targets' classes


def patch_targets(scene, grid: int):
    """Per patch (row-major) class targets for AUX_HEADS [heads, grid * grid] and loc bins of the shape's box [4, N].
    A patch takes the targets of the shape whose box holds its center (of the last one, should two boxes hold it);
    the counts are the scene's, in every patch."""
    cell = S.CANVAS / grid
    head = HEAD_ROW
    classes = torch.full((len(AUX_HEADS), grid * grid), T.IGNORE, dtype=torch.long)
    bins = torch.full((4, grid * grid), T.IGNORE, dtype=torch.long)
    shapes = scene.shapes
    classes[head["count"]] = len(shapes) - 1
    for c in S.COLORS:
        classes[head[f"count_{c}"]] = sum(s.color == c for s in shapes)
    for k in S.SHAPES:
        classes[head[f"count_{k}"]] = sum(s.shape == k for s in shapes)
    classes[head["kind"]] = 0
    centers = (torch.arange(grid, dtype=torch.float64) + 0.5) * cell
    y, x = centers.repeat_interleave(grid), centers.repeat(grid)  # patch p's center: row p // grid, column p % grid
    for rank, s in enumerate(shapes):
        inside = (s.box[0] <= y) & (y < s.box[2]) & (s.box[1] <= x) & (x < s.box[3])
        classes[head["kind"], inside] = 1 + KINDS.index((s.color, s.shape))
        classes[head["rank"], inside] = rank
        classes[head["rank_in_kind"], inside] = [o for o in shapes if o.shape == s.shape].index(s)
        for a, b in PAIRS:
            if s.shape in (a, b):
                classes[head[f"rank_in_{a}_{b}"], inside] = [o for o in shapes if o.shape in (a, b)].index(s)
        bins[:, inside] = torch.tensor([S.to_bin(c) for c in s.box])[:, None]
    return classes, bins


class AuxiliaryHeads(nn.Module):
    """Linear probes on the projected image embeddings; trained along with the model, never saved in it."""

    def __init__(self, width: int):
        super().__init__()
        self.classes = nn.Linear(width, sum(AUX_HEADS.values()))
        self.box = nn.Linear(width, 4 * width)

    def loss(self, image_embeddings, classes, bins, loc_embeddings, loc_sigma):
        B, N, C = image_embeddings.shape
        logits = self.classes(image_embeddings).split(list(AUX_HEADS.values()), dim=-1)
        losses = [F.cross_entropy(logit.reshape(B * N, -1).float(), classes[:, i].reshape(-1), ignore_index=T.IGNORE)
                  for i, logit in enumerate(logits) if (classes[:, i] != T.IGNORE).any()]
        box_queries = self.box(image_embeddings).view(B, N, 4, C)
        keep = bins.permute(0, 2, 1) != T.IGNORE  # [B, N, 4]
        box_loss = torch.zeros((), device=image_embeddings.device)
        if keep.any():
            scores = box_queries[keep] @ loc_embeddings.T  # [M, 1024]
            soft = T.soft_bin_targets(bins.permute(0, 2, 1)[keep], loc_embeddings.shape[0], loc_sigma)
            box_loss = -(soft * F.log_softmax(scores.float(), -1)).sum(-1).mean()
        return sum(losses) / len(losses), box_loss


def scene_index(seed: int, slot: int, shape_weights) -> int:
    """The index in the stream `seed` of the scene for training slot `slot`: the slot itself when
    `shape_weights` (relative frequencies of scenes of 1, 2 and 3 shapes) is uniform, as the generator draws;
    otherwise a shape count drawn by the weights, then the first scene holding it in the slot's own stretch
    of the stream (64 indexes above 20,000,000, clear of the plain slots and of stage 1's scenes)."""
    if len(set(shape_weights)) == 1:
        return slot
    want = random.Random(f"shape count:{seed}:{slot}").choices([1, 2, 3], weights=shape_weights)[0]
    base = 20_000_000 + slot * 64
    return next((i for i in range(base, base + 64) if S.shape_count(seed, i) == want), base)


def is_detection(prefix: str) -> bool:
    return prefix.startswith("detect ")


@dataclass(frozen=True)
class Drawing:
    """How stage 2 and 3 draw their training scenes and what they ask of them (held-out scenes stay the card's)."""

    detections: int = 3  # detection questions per image
    shape_weights: tuple = (1, 1, 1)  # relative frequencies of scenes of 1, 2 and 3 shapes (scene_index)
    augment: bool = True  # scenes.training_style: shifted shades, other backgrounds, canvas scale, soft edges, noise
    jpeg_fraction: float = 0.5  # of images saved as JPEG at a quality in JPEG_QUALITIES first
    absent_share: float = ABSENT_SHARE  # see questions
    unpack_detections: bool = False


JPEG_QUALITIES = (60, 95)


def synthetic_batches(processor, grid: int, seed: int, loc_sigma, packed_steps: int, packed_images: int,
                      unpacked_images: int, drawing: Drawing = Drawing(), vqvae=None):
    """batches(step): scenes of the stream `seed` (see Drawing), each with its questions (a segmentation too
    with the `vqvae` whose codes answer it): `packed_images` of them packed into one sequence per image before
    `packed_steps` (with `drawing.unpack_detections`, only the caption and counts: each detection gets a sequence
    of its own), `unpacked_images` in one sequence per question after; `loc_sigma(step)` is the soft targets'
    width."""
    from shapes.vqvae import scenes_codes

    alone = is_detection if drawing.unpack_detections else None
    style = S.training_style if drawing.augment else None

    def batches(step: int) -> dict:
        count = packed_images if step < packed_steps else unpacked_images
        first = min(step, packed_steps) * packed_images + max(0, step - packed_steps) * unpacked_images
        chosen = [S.render_scene(seed, scene_index(seed, first + j, drawing.shape_weights), style)
                  for j in range(count)]
        images, asked = [], []
        codes = scenes_codes(chosen, vqvae) if vqvae is not None else [None] * len(chosen)
        for j, (scene, scene_codes) in enumerate(zip(chosen, codes)):
            rng = random.Random(f"questions:{seed}:{step}:{j}")
            image = scene.image
            if rng.random() < drawing.jpeg_fraction:  # robustness to JPEG artefacts
                image = E.as_jpeg(image, rng.randint(*JPEG_QUALITIES))
            images.append(image)
            asked.append(questions(scene, rng, drawing.detections, scene_codes, drawing.absent_share))
        if step < packed_steps:
            batch = packed_batch(processor, images, asked, alone)
        else:
            rows = [(image, prefix, suffix) for image, pairs in zip(images, asked) for prefix, suffix in pairs]
            batch = T.training_batch(processor, *map(list, zip(*rows)))
            batch["pixel_values"] = batch["pixel_values"][:: len(rows) // len(chosen)]  # one per scene
        targets = [patch_targets(s, grid) for s in chosen]
        batch["aux_classes"] = torch.stack([c for c, _ in targets])
        batch["aux_bins"] = torch.stack([b for _, b in targets])
        batch["loc_sigma"] = loc_sigma(step)
        return batch

    return batches


def decision_weights(labels: torch.Tensor, loc_range, weight: float) -> torch.Tensor:
    """[B, T] label weights: `weight` on the tokens where a detection or segmentation answer decides what comes
    next, 1 elsewhere. The decisions are each object's first location token (y_min: which shape is listed next,
    where the last failures start) and the token after each object's label (" ;" or <eos>: another, or stop).
    The seg tokens of a segmentation answer follow its location tokens directly."""
    first, count = loc_range
    is_loc = (labels >= first) & (labels < first + count)
    is_object = is_loc | ((labels >= first + count) & (labels < first + count + len(SEG_TOKENS)))
    before = F.pad(is_object, (1, 0))[:, :-1]  # the previous label is a location or seg token
    two_before = F.pad(is_object, (2, 0))[:, :-2]
    decides = (is_loc & ~before) | (two_before & ~before & ~is_object & (labels != T.IGNORE))
    return 1.0 + (weight - 1.0) * decides.float()


def recipe_loss(heads: AuxiliaryHeads, loc_range, aux_weight: float, decision_weight: float = 1.0):
    first, count = loc_range

    def loss_fn(model, batch):
        loc_sigma = batch["loc_sigma"]
        image_embeddings = model.embed_image(batch["pixel_values"])
        if "segments" in batch:
            hidden = packed_hidden(model, batch, image_embeddings)
        else:
            per_image = batch["input_ids"].shape[0] // image_embeddings.shape[0]
            hidden = model.hidden_states(
                batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                image_embeddings=image_embeddings.repeat_interleave(per_image, dim=0),
            )
        weights = decision_weights(batch["labels"], loc_range, decision_weight) if decision_weight != 1 else None
        lm = T.labelled_loss(model, hidden, batch["labels"], loc_range, loc_sigma, weights)
        loc_embeddings = model.language_model.model.embed_tokens.weight[first : first + count]
        aux_classes, aux_box = heads.loss(image_embeddings, batch["aux_classes"], batch["aux_bins"], loc_embeddings,
                                          loc_sigma)
        total = lm + aux_weight * (aux_classes + aux_box)
        return total, {"lm": lm.item(), "aux": aux_classes.item(), "aux_box": aux_box.item(), "sigma": loc_sigma}

    return loss_fn


# ---- the run --------------------------------------------------------------------------------------


class RunLog:
    """Prints each line and appends it, with the time, to the run's log.txt."""

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def __call__(self, line: str):
        print(line, flush=True)
        self.file.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        self.file.flush()


@dataclass(frozen=True)
class Run:
    """What the stages of one run share: the command's options, the recipe's model config and processor, the
    auxiliary heads (trained alongside the model in every stage, saved beside its checkpoints) and the log."""

    args: argparse.Namespace
    config: PaliGemmaConfig
    processor: PaliGemmaProcessor
    heads: AuxiliaryHeads
    log: RunLog
    vqvae: object = None  # shapes.vqvae.ShapesVQVAE whose codes answer `segment`, once stage 0 has trained it

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    @property
    def grid(self) -> int:
        return self.config.vision.image_size // self.config.vision.patch_size

    @property
    def loc_range(self) -> tuple[int, int]:
        return loc_range_of(self.processor.tokenizer)

    def options(self, steps: int, lr: float, warmup: int, eval_every: int = 0) -> T.TrainOptions:
        args = self.args
        return T.TrainOptions(steps=steps, lr=lr, warmup=warmup, clip_norm=1.0, eval_every=eval_every,
                              save_every=args.save_every, seed=args.seed, progress=not args.no_progress,
                              workers=args.workers)

    def train(self, model, batches, loss_fn, options: T.TrainOptions, out_dir: Path, resume: Path | None,
              evaluate=None):
        """T.train with the run's checkpoints (model, tokenizer.json and, segmenting, the mask decoder), heads and
        log."""
        T.train(model, batches, loss_fn, options, out_dir=out_dir,
                save=partial(save_recipe_checkpoint, model, self.processor.tokenizer, self.vqvae), evaluate=evaluate,
                resume=resume, extra_modules={"aux": self.heads}, log=self.log)


def save_recipe_checkpoint(model, tokenizer, vqvae, directory: Path):
    """A checkpoint folder: config.json, model.safetensors, tokenizer.json and, with a `vqvae`, its decoder as
    MASK_DECODER_NAME, so that every checkpoint of a segmenting run loads as a pipeline that draws masks."""
    T.save_with_tokenizer(model, tokenizer, directory)
    if vqvae is not None:
        save_file(vqvae.decoder_state(), str(Path(directory) / MASK_DECODER_NAME))


def start_run(args) -> Run:
    """Makes the run folder, with the recipe's tokenizer.json and the log it appends to; returns what its stages
    share."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_shapes_tokenizer() if args.segment else build_shapes_tokenizer(appended=())
    tokenizer.save(str(out / "tokenizer.json"))
    config = PaliGemmaConfig.from_dict(model_config(tokenizer))
    heads = AuxiliaryHeads(config.text.hidden_size).to(args.device)
    return Run(args, config, PaliGemmaProcessor(tokenizer, config), heads, RunLog(out / "log.txt"))


def stage_state(directory: Path):
    """The step a stage's `last` checkpoint reached, or None when it has none."""
    state = directory / "last" / T.STATE_JSON
    return json.loads(state.read_text())["step"] if state.exists() else None


def resume_point(directory: Path) -> Path | None:
    """A stage's `last` checkpoint, to resume it from, when it has one."""
    return directory / "last" if stage_state(directory) is not None else None


def final_checkpoint(out: Path) -> Path:
    """The run's model: the last checkpoint of its latest stage (4, 3 or 2) that has one."""
    for stage in (out / "settle" / "last", out / "polish" / "last"):
        if (stage / "model.safetensors").exists():
            return stage
    return out / "last"


def export_model(source: Path, target: Path):
    """Copies a checkpoint of the run (its mask decoder too, when it has one) to `target`."""
    target.mkdir(parents=True, exist_ok=True)
    names = ["config.json", "model.safetensors", "tokenizer.json"]
    if (source / MASK_DECODER_NAME).exists():
        names.append(MASK_DECODER_NAME)
    elif (target / MASK_DECODER_NAME).exists():  # a decoder left by an earlier export belongs to another model
        (target / MASK_DECODER_NAME).unlink()
    for name in names:
        shutil.copy(source / name, target / name)
    print(f"copied {source} to {target}")


# ---- stage 1: the vision tower alone ----------------------------------------------------------------


def vision_batches(grid: int, image_size: int, images_per_step: int, seed: int):
    """Stage 1 batches: images and their per-patch targets only (the decoder is not run)."""
    from paligemma.processor import preprocess_image

    def batches(step: int) -> dict:
        chosen = [S.render_scene(seed, 10_000_000 + step * images_per_step + j) for j in range(images_per_step)]
        targets = [patch_targets(s, grid) for s in chosen]
        return {
            "pixel_values": torch.stack([preprocess_image(s.image, image_size) for s in chosen]),
            "aux_classes": torch.stack([c for c, _ in targets]),
            "aux_bins": torch.stack([b for _, b in targets]),
        }

    return batches


def vision_loss(heads: AuxiliaryHeads, loc_range, loc_sigma: float):
    first, count = loc_range

    def loss_fn(model, batch):
        image_embeddings = model.embed_image(batch["pixel_values"])
        loc_embeddings = model.language_model.model.embed_tokens.weight[first : first + count]
        classes, box = heads.loss(image_embeddings, batch["aux_classes"], batch["aux_bins"], loc_embeddings, loc_sigma)
        return classes + box, {"aux": classes.item(), "aux_box": box.item()}

    return loss_fn


def needs_stage_1(out: Path, args) -> bool:
    """Stage 1 runs unless a checkpoint is fine-tuned (--init-from), stage 2 has begun or stage 1 is complete."""
    return not args.init_from and stage_state(out) is None and (stage_state(out / "vision") or 0) < args.vision_steps


def train_contrastive_stage(run: Run) -> Path:
    """Stage 0 (--contrastive-steps), in OUT/contrastive: the vision tower and a small text tower on scene / caption
    pairs with the sigmoid loss (shapes/contrastive.py), resumed if interrupted; returns the checkpoint whose vision
    tower stage 1 starts from."""
    from shapes.contrastive import ContrastiveOptions, train_contrastive

    args, directory = run.args, run.out / "contrastive"
    if (stage_state(directory) or 0) < args.contrastive_steps:
        options = ContrastiveOptions(steps=args.contrastive_steps, batch_size=args.contrastive_batch,
                                     lr=args.contrastive_lr, same_count=args.contrastive_same_count,
                                     eval_every=args.eval_every, eval_scenes=500, seed=args.seed,
                                     device=args.device, workers=args.workers, progress=not args.no_progress)
        train_contrastive(directory, options, run.log)
    return directory / "last"


def train_vqvae_stage(run: Run):
    """In OUT/vqvae, before stage 2: the VQ-VAE whose codes answer `segment` and whose decoder ships beside the
    checkpoints (shapes/vqvae.py); trained once, then read back on every rerun."""
    from shapes.vqvae import VQVAE_NAME, VQVAEOptions, evaluate, load_vqvae, save_vqvae, train

    args, directory = run.args, run.out / "vqvae"
    if not (directory / VQVAE_NAME).exists():
        run.log(f"VQ-VAE of the masks (the segmentation codes): {args.vqvae_steps} steps")
        started = time.perf_counter()
        model = train(VQVAEOptions(steps=args.vqvae_steps, seed=args.seed, progress=not args.no_progress))
        save_vqvae(model, directory)
        run.log(f"VQ-VAE trained in {time.perf_counter() - started:.0f} s; held-out reconstruction: "
                f"{json.dumps(evaluate(model))}")
    return load_vqvae(directory / VQVAE_NAME)


def train_vision(run: Run):
    """Stage 1, in OUT/vision: the vision tower (and projector) on the patch targets, from a fresh model or resumed;
    with --contrastive-steps, the contrastive stage runs first and hands its tower over."""
    args, vision_dir = run.args, run.out / "vision"
    resume = resume_point(vision_dir)
    if resume is None:
        vision_init = train_contrastive_stage(run) if args.contrastive_steps else args.vision_init
        model = PaliGemmaForConditionalGeneration(run.config)
        initialize(model, run.processor.tokenizer, args.seed)
        if vision_init:  # a tower pre-trained with the sigmoid loss (shapes/contrastive.py), its head dropped
            run.log(f"stage 1 starts from the vision tower of {vision_init}")
            model.vision_tower.vision_model.load_state_dict(tower_weights(vision_init))
        model.to(args.device)
    else:
        model = load_model(resume, device=args.device, dtype=torch.float32)
    run.log(f"stage 1 (vision tower, patch targets): {sum(p.numel() for p in model.parameters())} parameters")
    run.train(model, vision_batches(run.grid, run.config.image_size, args.vision_images, args.seed),
              vision_loss(run.heads, run.loc_range, args.loc_sigma),
              run.options(args.vision_steps, args.vision_lr, args.warmup), vision_dir, resume)


# ---- stages 2 and 3: the whole model on the task -----------------------------------------------------


POLISH_WARMUP = 50
POLISH_LOC_SIGMA = 1.0  # stage 3 starts from narrower soft targets than stage 2 (its boxes are placed already)
SETTLE_WARMUP = 20


@dataclass(frozen=True)
class Stage:
    """The settings of a stage that trains the whole model on the task's questions."""

    title: str  # how the log names it
    out_dir: Path  # its checkpoints, step-NNNNNN and last
    starts_from: Path  # the weights it starts from when it is not resumed
    steps: int
    lr: float
    warmup: int
    loc_sigma: float  # the soft targets' width at its start, narrowing to --final-loc-sigma
    packed_steps: int  # its first steps pack each image's questions into one sequence
    shape_weights: tuple[float, float, float]
    aux_weight: float  # of the patch targets' loss
    decision_weight: float  # of each box's decisions (decision_weights)


def task_stage(args) -> Stage:
    """Stage 2, in OUT: the whole model on the tasks, packed then unpacked, the patch targets an auxiliary loss;
    from stage 1's weights and heads (or --init-from's weights and fresh heads), with a fresh optimizer."""
    out = Path(args.out)
    return Stage("stage 2 (whole model, task + patch targets)", out, Path(args.init_from or out / "vision" / "last"),
                 steps=args.steps, lr=args.lr, warmup=args.warmup, loc_sigma=args.loc_sigma,
                 packed_steps=args.packed_steps, shape_weights=args.shape_weights, aux_weight=args.aux_weight,
                 decision_weight=args.decision_weight)


def polish_stage(args) -> Stage:
    """Stage 3, in OUT/polish: a short second schedule from stage 2's weights with a fresh optimizer, unpacked,
    without the auxiliary loss, with three-shape scenes and each box's decisions weighted up."""
    out = Path(args.out)
    return Stage(f"stage 3 (polish: unpacked, decisions weighted {args.polish_decision_weight})", out / "polish",
                 out / "last", steps=args.polish_steps, lr=args.polish_lr, warmup=POLISH_WARMUP,
                 loc_sigma=POLISH_LOC_SIGMA, packed_steps=0, shape_weights=args.polish_shape_weights, aux_weight=0.0,
                 decision_weight=args.polish_decision_weight)


def settle_stage(args) -> Stage:
    """Stage 4, in OUT/settle: a last short schedule from stage 3's weights (stage 2's without it) with a fresh
    optimizer at a low learning rate, unpacked, the soft targets as narrow as stage 2 ends them, three-shape scenes
    weighted as in stage 3 and every token alike. It fixed the off-by-one colour counts of three-shape scenes that
    stage 3 left (docs/embedded-model.md, "How the shipped checkpoint was made")."""
    out = Path(args.out)
    return Stage("stage 4 (settle: unpacked, low learning rate)", out / "settle",
                 out / ("polish" if args.polish_steps else "") / "last", steps=args.settle_steps, lr=args.settle_lr,
                 warmup=SETTLE_WARMUP, loc_sigma=args.final_loc_sigma, packed_steps=0,
                 shape_weights=args.polish_shape_weights, aux_weight=0.0, decision_weight=1.0)


@dataclass(frozen=True)
class HeldOutScenes:
    """train's `evaluate`: the task's metrics on held-out scenes, answered greedily as at inference."""

    pipe: Pipeline
    scenes: list

    def __call__(self, step: int) -> dict:
        return E.evaluate(self.answers, self.scenes, 96, mask_decoder=self.pipe.mask_decoder)

    def answers(self, images, prompts) -> list[str]:
        return [r.text for r in self.pipe.generate(images, prompts, max_new_tokens=E.max_new_tokens(prompts))]


EMBEDDING = "language_model.model.embed_tokens.weight"  # tied with the output layer


def load_recipe_model(path: Path, run: Run) -> PaliGemmaForConditionalGeneration:
    """The checkpoint at `path`, which must be of this recipe; one whose vocabulary lacks the words appended since
    (tokenizer.APPENDED_WORDS), every other id the same, gets their rows appended (extend_vocabulary)."""
    model = load_model(path, device=run.args.device, dtype=torch.float32)
    text, vision = model.config.text, model.config.vision
    if vision == run.config.vision and text != run.config.text and text.vocab_size < run.config.text.vocab_size \
            and dataclasses.replace(text, vocab_size=run.config.text.vocab_size) == run.config.text:
        check_vocabulary(path, text.vocab_size, run.processor.tokenizer)
        return extend_vocabulary(model, path, run)
    if (text, vision) != (run.config.text, run.config.vision):
        raise SystemExit(f"{path} is not a model of this recipe (its text or vision config differs from "
                         "shapes.train's); fine-tune other checkpoints with `python -m paligemma train`")
    check_vocabulary(path, text.vocab_size, run.processor.tokenizer)
    return model


def check_vocabulary(path: Path, size: int, tokenizer):
    """SystemExit unless the checkpoint's tokenizer (path/tokenizer.json, `size` tokens) gives every token the id
    the recipe's `tokenizer` gives it: only words appended at the end can be added to a trained model."""
    from tokenizers import Tokenizer

    source = Path(path) / "tokenizer.json"
    if not source.exists():
        raise SystemExit(f"{path} has no tokenizer.json: its vocabulary ({size} tokens) cannot be checked "
                         f"against the recipe's ({tokenizer.get_vocab_size()})")
    old_vocab, new_vocab = Tokenizer.from_file(str(source)).get_vocab(), tokenizer.get_vocab()
    moved = sorted(t for t, i in old_vocab.items() if new_vocab.get(t) != i)
    if moved or len(old_vocab) != size:
        raise SystemExit(f"{path}: its vocabulary is not the start of the recipe's (tokens with other ids: "
                         f"{', '.join(moved[:5]) or 'none'}; {len(old_vocab)} tokens for {size} rows); only "
                         "words appended at the end can be added to a trained model")


def extend_vocabulary(model, path: Path, run: Run) -> PaliGemmaForConditionalGeneration:
    """`model` with the run's larger vocabulary (check_vocabulary has found every old id in place, so the new tokens
    are the last ones): their embedding rows start at the mean of the word rows, scaled to the words' mean norm (an
    unremarkable word), and nothing else changes."""
    old_size, tokenizer = model.config.text.vocab_size, run.processor.tokenizer
    new_vocab = tokenizer.get_vocab()
    state = model.state_dict()
    rows = state[EMBEDDING]
    words = rows[len(SPECIAL_TOKENS) : tokenizer.token_to_id(IMAGE_TOKEN)]
    mean = words.mean(0)
    new_row = mean / mean.norm() * words.norm(dim=1).mean()
    added = run.config.text.vocab_size - old_size
    state[EMBEDDING] = torch.cat([rows, new_row.expand(added, -1)])
    extended = PaliGemmaForConditionalGeneration(run.config)
    extended.load_state_dict(state, strict=True)
    appended = [t for t, i in sorted(new_vocab.items(), key=lambda item: item[1]) if i >= old_size]
    run.log(f"extended the vocabulary of {path} from {old_size} to {run.config.text.vocab_size} tokens: appended "
            f"{', '.join(appended)} (embedding rows: the words' mean row); every other weight as loaded")
    return extended.to(run.args.device)


def train_task(run: Run, model, stage: Stage, resume: Path | None, evaluate: HeldOutScenes):
    """Runs `stage` on `model`, resumed from `resume` if given."""
    args = run.args
    run.log(f"{stage.title} from {resume or stage.starts_from}")
    loc_sigma = partial(loc_sigma_at, total=stage.steps, start=stage.loc_sigma, final=args.final_loc_sigma)
    drawing = Drawing(detections=args.detections, shape_weights=stage.shape_weights, augment=args.augment,
                      jpeg_fraction=args.jpeg_fraction, absent_share=args.absent_share,
                      unpack_detections=args.unpack_detections)
    batches = synthetic_batches(run.processor, run.grid, args.seed, loc_sigma, stage.packed_steps,
                                args.images_per_step, args.unpacked_images_per_step, drawing, run.vqvae)
    run.train(model, batches, recipe_loss(run.heads, run.loc_range, stage.aux_weight, stage.decision_weight),
              run.options(stage.steps, stage.lr, stage.warmup, args.eval_every), stage.out_dir, resume, evaluate)


# ---- command ---------------------------------------------------------------------------------------


def parse_shape_weights(text: str) -> tuple[float, ...]:
    """argparse type of --shape-weights: three non-negative numbers, not all zero."""
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 3 or min(weights) < 0 or sum(weights) == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give three non-negative weights, not all zero, e.g. 1,2,3")
    return weights


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder (rerun the same command to resume it)")
    parser.add_argument("--segment", action=argparse.BooleanOptionalAction, default=True,
                        help="teach `segment {shape}`: a VQ-VAE of the masks first (stage 0, OUT/vqvae; its decoder "
                        "ships beside every checkpoint), the word appended to the vocabulary, and one segmentation "
                        "question per image")
    parser.add_argument("--vqvae-steps", type=int, default=1500, help="stage 0: the VQ-VAE's steps (32 masks each)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="draw the training scenes (only) with shifted shades, other light backgrounds, a canvas "
                        "scale, soft edges and noise (scenes.training_style)")
    parser.add_argument("--jpeg-fraction", type=float, default=0.5,
                        help="of training images saved as JPEG first, at a quality from %d to %d" % JPEG_QUALITIES)
    parser.add_argument("--absent-share", type=float, default=ABSENT_SHARE,
                        help="of images whose last detection (and segmentation) names a kind the scene lacks")
    parser.add_argument("--contrastive-steps", type=int, default=0,
                        help="stage 0 (from scratch only): the vision tower and a text tower on scene / caption pairs "
                        "with the sigmoid loss (shapes/contrastive.py, OUT/contrastive) before stage 1 (0: none, "
                        "the default: measured worse for the later stages than stage 1 alone, docs/siglip.md)")
    parser.add_argument("--contrastive-batch", type=int, default=32)
    parser.add_argument("--contrastive-lr", type=float, default=2e-3)
    parser.add_argument("--contrastive-same-count", action=argparse.BooleanOptionalAction, default=False,
                        help="contrastive batches of scenes with as many shapes (every negative a hard one)")
    parser.add_argument("--vision-steps", type=int, default=800, help="stage 1: the vision tower on the patch targets")
    parser.add_argument("--vision-images", type=int, default=32, help="images per stage 1 step")
    parser.add_argument("--vision-lr", type=float, default=2e-3)
    parser.add_argument("--vision-init", help="a SigLIP checkpoint from shapes.contrastive: stage 1 starts from its "
                        "vision tower instead of a random one")
    parser.add_argument("--steps", type=int, default=5400, help="stage 2: the whole model on the task")
    parser.add_argument("--detections", type=int, default=3, help="detection questions per image (stage 2)")
    parser.add_argument("--shape-weights", type=parse_shape_weights, default=(1, 1, 1),
                        help="stage 2: relative frequencies of scenes of 1, 2 and 3 shapes, e.g. 1,2,3 (default: "
                        "uniform, as the generator draws them)")
    parser.add_argument("--packed-steps", type=int, default=4500,
                        help="stage 2 steps on packed sequences (an image and its questions in one sequence); the "
                        "rest use one sequence per question, as at inference")
    parser.add_argument("--unpack-detections", action="store_true",
                        help="packed steps pack only the caption and counts; each detection gets a sequence of its "
                        "own where the image tokens see the prompt, as at inference")
    parser.add_argument("--images-per-step", type=int, default=12,
                        help="stage 2, packed; each image is asked 3 + --detections questions")
    parser.add_argument("--unpacked-images-per-step", type=int, default=8, help="stage 2 after --packed-steps")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--loc-sigma", type=float, default=2.0, help="soft targets over neighbouring bins (in bins)")
    parser.add_argument("--final-loc-sigma", type=float, default=0.5,
                        help="stage 2 narrows the soft targets from --loc-sigma to this (cosine)")
    parser.add_argument("--aux-weight", type=float, default=0.5)
    parser.add_argument("--decision-weight", type=float, default=1.0,
                        help="loss weight of each box's first location token and of the token after its label "
                        "(see decision_weights)")
    parser.add_argument("--polish-steps", type=int, default=650,
                        help="stage 3: a second, short schedule from stage 2's weights, one sequence per question, "
                        "with the soft targets narrowed from 1 bin, no auxiliary loss and fresh AdamW (0: none)")
    parser.add_argument("--polish-lr", type=float, default=5e-4)
    parser.add_argument("--polish-shape-weights", type=parse_shape_weights, default=(1, 2, 3),
                        help="stage 3's --shape-weights: three-shape scenes, the hard ones, weighted up")
    parser.add_argument("--polish-decision-weight", type=float, default=4.0, help="stage 3's --decision-weight")
    parser.add_argument("--settle-steps", type=int, default=0,
                        help="stage 4: a last short schedule, one sequence per question, at --settle-lr with the soft "
                        "targets at --final-loc-sigma, stage 3's shape weights and fresh AdamW (0: none)")
    parser.add_argument("--settle-lr", type=float, default=2e-4)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-scenes", type=int, default=48)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int,
                        help="processes that draw the next steps' scenes while a step trains (default: on a GPU "
                             "cores - 1, at most 8; on a CPU 0, which draws them between steps)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--init-from", help="fine-tune: start stage 2 from this checkpoint (no stage 1; fresh "
                        "auxiliary heads and optimizer; stage 3 follows unless --polish-steps 0)")
    parser.add_argument("--export", help="instead of training, copy the run's model (OUT/polish/last, or OUT/last "
                        "without stage 3) to this folder")
    args = parser.parse_args(argv)
    for name in ("decision_weight", "polish_decision_weight"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: give a positive weight (1 weighs every "
                         "token alike)")
    for name, stage in (("polish_steps", 3), ("settle_steps", 4)):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: give 0 (no stage {stage}) or more")
    if args.detections < 1:
        parser.error(f"--detections {args.detections}: ask at least one detection per image")
    for name in ("jpeg_fraction", "absent_share"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: give a share from 0 to 1")
    if args.segment and args.vqvae_steps < 1:
        parser.error(f"--vqvae-steps {args.vqvae_steps}: give 1 or more (or --no-segment)")
    if args.contrastive_steps < 0:
        parser.error(f"--contrastive-steps {args.contrastive_steps}: give 0 (no contrastive stage) or more")
    if args.contrastive_steps and (args.init_from or args.vision_init):
        parser.error("--contrastive-steps trains the vision tower stage 1 starts from: it cannot be combined with "
                     f"--{'init-from' if args.init_from else 'vision-init'}, which give the weights to start from")
    if args.workers is None:
        args.workers = T.default_workers(args.device)
    if args.workers < 0:
        parser.error(f"--workers {args.workers}: give 0 (draw scenes between steps) or more processes")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.export:
        export_model(final_checkpoint(Path(args.out)), Path(args.export))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    run = start_run(args)
    run.log(f"run: {json.dumps(vars(args))}")
    if needs_stage_1(run.out, args):
        train_vision(run)
    stages = [task_stage(args)] + [stage for stage in (polish_stage(args), settle_stage(args)) if stage.steps]
    # Once a later stage has a checkpoint, the ones before it are done: the run resumes the latest.
    resumes = [resume_point(stage.out_dir) for stage in stages]
    current = max((i for i, resume in enumerate(resumes) if resume is not None), default=0)
    model = load_recipe_model(resumes[current] or stages[0].starts_from, run)
    if args.segment:  # once the model to train is known to fit the recipe
        run = dataclasses.replace(run, vqvae=train_vqvae_stage(run))
    if resumes[0] is None and not args.init_from:  # stage 2 starts from stage 1's heads too
        T.load_extra_modules(run.out / "vision" / "last", {"aux": run.heads})
    evaluate = HeldOutScenes(Pipeline(model, run.processor, mask_decoder=run.vqvae),
                             S.render_scenes(args.seed + 1000, args.eval_scenes))
    for i in range(current, len(stages)):
        train_task(run, model, stages[i], resumes[i] if i == current else None, evaluate)
    run.log(f"model: {final_checkpoint(run.out)}")


if __name__ == "__main__":
    main()
