"""Where a shapes model goes wrong, teacher-forced on the evaluation's own questions:

    python -m shapes.diagnose --model runs/shapes/last --num-scenes 500 --seed 1

Per task (detection split by the scene's number of shapes), the share of answers whose every word, separator
and <eos> is the argmax given the true answer so far (location tokens left out: what is listed, not where),
run two ways: as at inference, and with the image tokens blind to the prompt (shapes/packing.py, as in packed
training). Where every token is scored (the caption and counts), as-at-inference exactness is exactly the
greedy answer being right. Then, over the detections of scenes with two or three shapes, the share of each box
coordinate (y_min, x_min, y_max, x_max) whose argmax lies within --near bins of the truth.
"""

from __future__ import annotations

import argparse
import collections

import torch

from paligemma import train as T
from paligemma.locations import loc_range_of
from shapes import evaluate as E
from shapes import scenes as S
from shapes.packing import packed_batch, packed_hidden


def questions(scene_list):
    """(task, image, prompt, true answer) for every question the evaluation asks of scene_list."""
    rows = []
    for i, scene in enumerate(scene_list):
        for kind, prompt in E.requests(scene, i):
            if kind == "caption":
                answer = S.caption(scene)
            elif kind == "count":
                answer = S.count_answer(scene)
            elif kind.startswith("color_count:"):
                kind, answer = "color count", S.count_answer(scene, kind.split(":")[1])
            else:
                kind = "detect, an absent kind" if kind == "absent" else f"detect, {len(scene.shapes)} shapes"
                answer = S.detect_answer(scene, prompt[len("detect ") :].split(" ; "))
            rows.append((kind, scene.image, prompt, answer))
    return rows


@torch.no_grad()
def teacher_forced(model, processor, rows, near: int = 25, batch_size: int = 64):
    """{task: (exact as at inference, exact blind, count)} and, per box coordinate, the share within `near` bins
    (as at inference, detections of scenes with more than one shape)."""
    first, count = loc_range_of(processor.tokenizer)
    exact = collections.defaultdict(lambda: [0, 0, 0])
    close, boxes = torch.zeros(4), torch.zeros(4)

    def predictions(hidden, labels):
        return model.decoder.logits(hidden[:, :-1]).argmax(-1), labels[:, 1:]

    for start in range(0, len(rows), batch_size):
        kinds, images, prompts, answers = map(list, zip(*rows[start : start + batch_size]))
        plain = T.training_batch(processor, images, prompts, answers)
        image_embeddings = model.embed_image(plain["pixel_values"])  # one row per question either way
        hidden = model.hidden_states(plain["input_ids"], attention_mask=plain["attention_mask"],
                                     token_type_ids=plain["token_type_ids"], image_embeddings=image_embeddings)
        blind = packed_batch(processor, images, [[(p, a)] for p, a in zip(prompts, answers)])
        blind_hidden = packed_hidden(model, blind, image_embeddings)
        for way, (predicted, labels) in enumerate([predictions(hidden, plain["labels"]),
                                                   predictions(blind_hidden, blind["labels"])]):
            is_loc = (labels >= first) & (labels < first + count)
            scored = (labels != T.IGNORE) & ~is_loc
            right = ((predicted == labels) | ~scored).all(-1)
            for kind, ok in zip(kinds, right.tolist()):
                exact[kind][way] += ok
            if way == 0:
                for kind, p, label, loc in zip(kinds, predicted, labels, is_loc):
                    if kind.startswith("detect") and not kind.startswith("detect, 1 "):
                        within = ((p[loc] - label[loc]).abs() <= near).float()
                        for coordinate in range(4):
                            close[coordinate] += within[coordinate::4].sum()
                            boxes[coordinate] += within[coordinate::4].numel()
        for kind in kinds:
            exact[kind][2] += 1
    return dict(exact), (close / boxes.clamp(min=1)).tolist()


def main(argv=None):
    import paligemma

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the embedded demo model)")
    parser.add_argument("--num-scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--near", type=int, default=25, help="location bins counted as close")
    args = parser.parse_args(argv)
    pipe = paligemma.load(args.model, dtype=torch.float32)
    rows = questions(S.render_scenes(args.seed, args.num_scenes))
    exact, coordinates = teacher_forced(pipe.model.eval(), pipe.processor, rows, args.near)
    print(f"{'task':22s} {'n':>5s}  as at inference  image blind to the prompt")
    for kind in sorted(exact):
        inference, blind, n = exact[kind]
        print(f"{kind:22s} {n:5d}  {inference / n:15.3f}  {blind / n:25.3f}")
    names = ("y_min", "x_min", "y_max", "x_max")
    print(f"box coordinates within {args.near} bins (2-3 shape scenes): "
          + ", ".join(f"{name} {share:.3f}" for name, share in zip(names, coordinates)))


if __name__ == "__main__":
    main()
