"""How far transformers.js' own image resize is from Pillow's (this project's processor), and what it does to answers.

    python -m demo.web.measure_resize [--model OUT]

For each example scene: the pixel values transformers.js' processor makes (Node, demo/web/generate.mjs) against the
project's (Pillow bicubic), in normalized units ([-1, 1]), and the greedy answers each side gives on its own pixels.
OUT is an export in transformers.js' layout (default: the built page's model, demo/web/site/model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import paligemma

WEB = Path(__file__).resolve().parent
EXAMPLES = WEB.parent / "examples"


def transformers_js_run(model: Path, image: Path, prompt: str, pixels_out: Path) -> dict:
    done = subprocess.run(["node", str(WEB / "generate.mjs"), "--model", str(model), "--image", str(image),
                           "--prompt", prompt, "--pixels-out", str(pixels_out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"generate.mjs failed: {done.stderr[-1000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.web.measure_resize")
    parser.add_argument("--model", type=Path, default=WEB / "site" / "model")
    args = parser.parse_args(argv)
    pipe = paligemma.load()
    examples = json.loads((EXAMPLES / "examples.json").read_text())
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for example in examples:
            path, prompt = EXAMPLES / example["file"], example["prompt"]
            pillow = pipe.processor([Image.open(path)], [prompt])["pixel_values"][0].numpy()
            ours = pipe.generate(Image.open(path), prompt, max_new_tokens=32).text
            theirs = transformers_js_run(args.model, path, prompt, Path(tmp) / "pixels.bin")
            pixels = np.fromfile(Path(tmp) / "pixels.bin", dtype="<f4").reshape(pillow.shape)
            diff = np.abs(pixels - pillow)
            worst = max(worst, float(diff.max()))
            print(f"{example['file']}: max |diff| {diff.max():.3f}, mean {diff.mean():.4f}, "
                  f"pixels off by > 0.1: {(diff > 0.1).mean():.1%}")
            print(f"  {prompt!r}: Pillow -> {ours!r}\n"
                  f"  {' ' * len(repr(prompt))}  transformers.js -> {theirs['text']!r}")
    print(f"largest difference over the examples: {worst:.3f} (normalized units, range [-1, 1])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
