"""A question the embedded model was never trained on, taught with LoRA: how many shapes of one kind a scene holds.

    answer en how many {circle|square|triangle} shapes are there?   ->   0, 1, 2 or 3

Every word is in the shapes tokenizer already (the model counts all shapes and shapes of a colour, and names kinds
in captions and detections), so the adapters add no embedding row. Before fine-tuning the model answers it with the
count of all shapes, right for about one question in four.

    python -m shapes.kind_count data --out runs/kind_count [--examples 500] [--replay 0.6] [--replay-weights ...]
    python -m paligemma train --model paligemma/demo_checkpoint --data runs/kind_count/train.jsonl --lora 8 ...
    python -m shapes.kind_count score --model runs/kind_count/lora/last [--num-scenes 200] [--json]

`data` writes train.jsonl (scenes of the training stream, seed 0: one question about one kind each, the kinds in
turn; a share `--replay` of them are instead old tasks of the same scenes, each task shapes.evaluate asks
(REPLAY_WEIGHTS: counts twice and colour counts four times as often; `--replay-weights` changes them), segmentation
included, answered as the model answers them before fine-tuning: without them the adapters teach it to answer every
prompt with a number) and held_out.jsonl (the held-out stream, seed 1, as shapes.evaluate draws it: every kind of
each of `--held-out` scenes), with their PNGs.
`score` asks every kind of `--num-scenes` held-out scenes: `exact` is the share of questions answered exactly,
`scenes_all_right` the share of scenes with all three right. docs/fine-tuning.md has the recipe and its figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from shapes import evaluate as E
from shapes import scenes as S

TARGET = 0.90
REPLAY_WEIGHTS = {"caption": 1.0, "count": 2.0, "color_count": 4.0, "detect": 1.0, "absent": 0.5, "segment": 1.0,
                  "absent_segment": 0.5}


def question(kind: str) -> str:
    return f"answer en how many {kind} shapes are there?"


def answer(scene, kind: str) -> str:
    return str(sum(1 for s in scene.shapes if s.shape == kind))


def parse_replay_weights(text: str) -> dict[str, float]:
    """"caption=3,segment=3" -> REPLAY_WEIGHTS with those tasks' weights replaced."""
    weights = dict(REPLAY_WEIGHTS)
    for item in filter(None, (t.strip() for t in text.split(","))):
        task, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if task not in REPLAY_WEIGHTS or weight < 0:
            raise ValueError(f"--replay-weights {item}: give TASK=WEIGHT (a weight of 0 or more) with TASK one of "
                             f"{', '.join(REPLAY_WEIGHTS)}")
        weights[task] = weight
    return weights


def write_data(out: Path, examples: int, held_out: int, replay: float, seed: int = 0, replay_from: str | None = None,
               replay_weights: dict[str, float] | None = None, balance: bool = False):
    """train.jsonl and held_out.jsonl with their images. A share `replay` of the examples repeat old tasks (every
    prompt shapes.evaluate asks, segmentation included) answered as the model `replay_from` (default: the embedded
    model) answers them now: what the adapters must not change, marked "distill" (`train --distill W` keeps the
    model's distributions there near the base's). A task is drawn with its weight in `replay_weights` (default
    REPLAY_WEIGHTS). The new question asks about the kinds in turn, or with `balance` about the kind whose count
    in this scene has been the answer least often so far (ties in turn): scenes hold 2 or 3 of a kind about one
    time in eight, which in turn leaves those answers rare."""
    replay_weights = replay_weights or REPLAY_WEIGHTS
    answered = {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    rng = random.Random(f"kind_count:{seed}")
    records, replayed = [], []
    for i in range(examples):
        scene = S.render_scene(seed, i)
        name = f"images/train-{i:04d}.png"
        scene.image.save(out / name)
        if rng.random() < replay:
            # A task first (the colour counts are one task), then one of its prompts: the counts and colour counts,
            # which the new question resembles most, more often than the others (REPLAY_WEIGHTS).
            asked = E.requests(scene, f"replay:{seed}:{i}", segment=True)
            tasks = sorted({kind.split(":")[0] for kind, _ in asked})
            task = rng.choices(tasks, [replay_weights[t] for t in tasks])[0]
            prompt = rng.choice([prompt for kind, prompt in asked if kind.split(":")[0] == task])
            replayed.append((len(records), scene.image, prompt))
            records.append({"image": name, "prefix": prompt, "suffix": None, "distill": True})
        else:
            turn = [S.SHAPES[(i + k) % len(S.SHAPES)] for k in range(len(S.SHAPES))]
            kind = min(turn, key=lambda k: answered.get(answer(scene, k), 0)) if balance else turn[0]
            answered[answer(scene, kind)] = answered.get(answer(scene, kind), 0) + 1
            records.append({"image": name, "prefix": question(kind), "suffix": answer(scene, kind)})
    if replayed:
        import paligemma

        pipe = paligemma.load(replay_from)
        for start in range(0, len(replayed), 32):
            chunk = replayed[start : start + 32]
            prompts = [prompt for _, _, prompt in chunk]
            results = pipe.generate([image for _, image, _ in chunk], prompts,
                                    max_new_tokens=E.max_new_tokens(prompts))
            for (index, _, _), result in zip(chunk, results):
                records[index]["suffix"] = result.text.strip()
    (out / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    lines = []
    for i in range(held_out):
        scene = S.render_scene(1, i)
        name = f"images/held-out-{i:04d}.png"
        scene.image.save(out / name)
        lines += [json.dumps({"image": name, "prefix": question(k), "suffix": answer(scene, k)}) for k in S.SHAPES]
    (out / "held_out.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'train.jsonl'} ({examples} examples, {len(replayed)} of them old tasks) and "
          f"{out / 'held_out.jsonl'} ({held_out} scenes x {len(S.SHAPES)} kinds)")


def score(model: str | None, num_scenes: int, batch_size: int = 64) -> dict:
    import paligemma

    pipe = paligemma.load(model)
    scenes = S.render_scenes(1, num_scenes)
    jobs = [(i, kind) for i in range(num_scenes) for kind in S.SHAPES]
    right = {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        results = pipe.generate([scenes[i].image for i, _ in chunk], [question(k) for _, k in chunk], max_new_tokens=4)
        for (i, kind), result in zip(chunk, results):
            right[i, kind] = result.text.strip() == answer(scenes[i], kind)
    per_scene = [all(right[i, k] for k in S.SHAPES) for i in range(num_scenes)]
    return {"scenes": num_scenes, "questions": len(jobs), "exact": sum(right.values()) / len(jobs),
            "scenes_all_right": sum(per_scene) / num_scenes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write train.jsonl and held_out.jsonl")
    data.add_argument("--out", required=True)
    data.add_argument("--examples", type=int, default=500)
    data.add_argument("--held-out", type=int, default=200)
    data.add_argument("--replay", type=float, default=0.0,
                      help="share of the examples that are old tasks, answered as --replay-from answers them")
    data.add_argument("--replay-from", default=None, help="checkpoint (default: the embedded model)")
    data.add_argument("--replay-weights", default="",
                      help="how often each old task is replayed, e.g. caption=3,segment=3 (default: "
                           + ",".join(f"{t}={w:g}" for t, w in REPLAY_WEIGHTS.items()) + ")")
    data.add_argument("--balance", action="store_true",
                      help="ask the new question about the kind whose count has been the answer least often so far "
                           "(default: the kinds in turn)")
    data.add_argument("--seed", type=int, default=0, help="the scene stream of the examples (training's is 0)")
    scored = commands.add_parser("score", help="exact match on held-out scenes, every kind asked")
    scored.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    scored.add_argument("--num-scenes", type=int, default=200)
    scored.add_argument("--json", action="store_true")
    scored.add_argument("--check-target", action="store_true", help=f"exit 1 below {TARGET:.0%} exact")
    args = parser.parse_args(argv)
    if args.command == "data":
        try:
            weights = parse_replay_weights(args.replay_weights)
        except ValueError as e:
            sys.exit(f"error: {e}")
        write_data(Path(args.out), args.examples, args.held_out, args.replay, args.seed, args.replay_from, weights,
                   args.balance)
        return
    metrics = score(args.model, args.num_scenes)
    print(json.dumps(metrics) if args.json else "\n".join(f"{k:>17}: {v}" for k, v in metrics.items()))
    if args.check_target and metrics["exact"] < TARGET:
        sys.exit(1)


if __name__ == "__main__":
    main()
