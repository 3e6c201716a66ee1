"""Write the example scenes the page offers into demo/examples/, with a manifest of each scene's prompt, expected
answer and shapes (the tests read it). Run `python -m demo.make_examples` after changing the task's scenes."""

import json
from pathlib import Path

from shapes import scenes as S
from shapes.evaluate import is_segmentation

STREAM = "demo"  # a scene stream of its own: training uses 0, evaluation 1 and 1000
EXAMPLES = [  # (scene index, prompt)
    (0, S.CAPTION_PROMPT),
    (7, S.detect_prompt(("circle", "triangle"))),
    (1, S.COUNT_PROMPT),
    (5, S.color_count_prompt("blue")),
    (11, S.detect_prompt(("triangle",))),
    (16, S.segment_prompt(("circle", "triangle"))),
]


def expected_answer(scene, prompt):
    """The task's answer; None for a segmentation, whose codes come from the training VQ-VAE's encoder (not
    shipped): its masks are checked against the drawn shapes instead."""
    return None if is_segmentation(prompt) else dict(S.task_pairs(scene))[prompt]


def main(folder: Path = Path(__file__).parent / "examples"):
    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    for index, prompt in EXAMPLES:
        scene = S.render_scene(STREAM, index)
        name = f"scene_{index:02d}.png"
        scene.image.save(folder / name, optimize=True)
        manifest.append({
            "file": name, "prompt": prompt, "answer": expected_answer(scene, prompt), "caption": S.caption(scene),
            "shapes": [{"shape": s.shape, "color": s.color, "box_yxyx": list(s.box)} for s in scene.shapes],
        })
    (folder / "examples.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(manifest)} examples to {folder}")


if __name__ == "__main__":
    main()
