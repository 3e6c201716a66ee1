"""Metrics of the shapes task on held-out scenes, and the command that prints them.

    python -m shapes.evaluate [--model PATH] [--num-scenes 500] [--seed 1] [--jpeg-quality 75] [--json]
                              [--backend torch|onnx [--onnx-dir DIR]]

Per scene the model is asked:
- `caption en`: exactly right or not (caption_accuracy);
- `answer en how many shapes are there?` (count_accuracy);
- `answer en how many {color} shapes are there?` for each of the 4 colors (color_count_accuracy, over all
  questions);
- detection, with prompts that together cover every shape in the scene: one kind -> `detect a`; two kinds ->
  `detect a ; b`; three kinds -> `detect a ; b` and `detect c` (kinds ordered by the scene's seed).
  A scene counts as detected when every shape is found with the right label at IoU >= 0.5 and no extra box is
  given (detection_all_found); mean_iou averages, over all shapes, the IoU of the box matched to each (0 when
  none).
Scenes come from the generator's stream `--seed` (training uses seed 0). `--jpeg-quality` saves each scene as
JPEG at that quality first.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time

from PIL import Image

from paligemma import locations as L
from shapes import scenes as S

TARGETS = {
    "caption_accuracy": 0.95,
    "count_accuracy": 0.95,
    "color_count_accuracy": 0.95,
    "detection_all_found": 0.90,
    "mean_iou": 0.75,
}


def detect_prompt_groups(scene, rng):
    kinds = list(dict.fromkeys(s.shape for s in scene.shapes))
    rng.shuffle(kinds)
    return [kinds] if len(kinds) <= 2 else [kinds[:2], kinds[2:]]


def requests(scene, seed_key):
    """(kind, prompt) pairs asked about one scene."""
    rng = random.Random(f"eval:{seed_key}")
    asked = [("caption", S.CAPTION_PROMPT), ("count", S.COUNT_PROMPT)]
    asked += [("color_count:" + c, S.color_count_prompt(c)) for c in S.COLORS]
    asked += [("detect", S.detect_prompt(group)) for group in detect_prompt_groups(scene, rng)]
    return asked


def parse_boxes(text, side=S.CANVAS):
    """[(box, label)] from `<locY1><locX1><locY2><locX2> label ; ...` (box in pixels, see scenes.box_from_bins).
    Parsed loosely: a box followed directly by another box, with no " ;" between them, still counts."""
    return [(S.box_from_bins(bins, side), label) for bins, label in L.parse_boxes(text, strict=False)]


def iou(a, b):
    h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = h * w
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score_detection(scene, predicted):
    """(all found and nothing extra, IoUs of the scene's shapes) for the boxes predicted over its prompts."""
    unused = list(predicted)
    ious = []
    for shape in scene.shapes:
        candidates = [(iou(shape.box, box), i) for i, (box, label) in enumerate(unused) if label == shape.shape]
        best, index = max(candidates, default=(0.0, None))
        if index is not None:
            unused.pop(index)
        ious.append(best)
    return all(v >= 0.5 for v in ious) and not unused, ious


def score(scene_list, answers):
    """Metrics from answers[i] = {prompt: generated text} for scene_list[i]."""
    caption = count = color_right = color_total = detected = 0
    all_ious = []
    for i, (scene, answer) in enumerate(zip(scene_list, answers)):
        caption += answer[S.CAPTION_PROMPT] == S.caption(scene)
        count += answer[S.COUNT_PROMPT] == S.count_answer(scene)
        for c in S.COLORS:
            color_right += answer[S.color_count_prompt(c)] == S.count_answer(scene, c)
            color_total += 1
        boxes = [b for kind, prompt in requests(scene, i) if kind == "detect" for b in parse_boxes(answer[prompt])]
        ok, ious = score_detection(scene, boxes)
        detected += ok
        all_ious += ious
    n = len(scene_list)
    return {
        "scenes": n,
        "caption_accuracy": caption / n,
        "count_accuracy": count / n,
        "color_count_accuracy": color_right / color_total,
        "detection_all_found": detected / n,
        "mean_iou": sum(all_ious) / len(all_ious),
    }


def as_jpeg(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def evaluate(generate, scene_list, batch_size=64, jpeg_quality=None):
    """generate(images, prompts) -> texts, called on batches; returns the metrics of `score`."""
    jobs = []
    for i, scene in enumerate(scene_list):
        image = as_jpeg(scene.image, jpeg_quality) if jpeg_quality else scene.image
        jobs += [(i, image, prompt) for _, prompt in requests(scene, i)]
    answers = [{} for _ in scene_list]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        texts = generate([image for _, image, _ in chunk], [prompt for _, _, prompt in chunk])
        for (i, _, prompt), text in zip(chunk, texts):
            answers[i][prompt] = text.strip()
    return score(scene_list, answers)


def max_new_tokens():
    return 4 + 6 * 3  # three boxes of four loc tokens, a label, " ; " -- plus the end of sequence


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo checkpoint)")
    parser.add_argument("--num-scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1, help="scene stream; training uses 0")
    parser.add_argument("--jpeg-quality", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                        help="onnx: the exported graphs through ONNX Runtime (exported and cached on first use)")
    parser.add_argument("--onnx-dir", default=None, help="with --backend onnx: an export folder to use instead")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--check-targets", action="store_true", help="exit 1 when a metric misses the task card's target")
    args = parser.parse_args(argv)

    import paligemma

    if args.onnx_dir and args.backend != "onnx":
        parser.error("--onnx-dir needs --backend onnx")
    pipe = paligemma.load(args.model, device=args.device, backend=args.backend, onnx_dir=args.onnx_dir)

    def generate(images, prompts):
        return [r.text for r in pipe.generate(images, prompts, max_new_tokens=max_new_tokens())]

    started = time.time()
    metrics = evaluate(generate, S.render_scenes(args.seed, args.num_scenes), args.batch_size, args.jpeg_quality)
    metrics.update(seed=args.seed, jpeg_quality=args.jpeg_quality, backend=args.backend,
                   seconds=round(time.time() - started, 1))
    missed = [k for k, target in TARGETS.items() if metrics[k] < target]
    if args.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            mark = "" if k not in TARGETS else ("  (target >= %.2f%s)" % (TARGETS[k], ", MISSED" if k in missed else ""))
            print(f"{k:>22}: {v if not isinstance(v, float) else round(v, 4)}{mark}")
    if args.check_targets and missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
