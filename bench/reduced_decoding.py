"""How far decoding at reduced size moves what the model sees, on real images: the pixel values of
`load_image(file, input_size)` (JPEG's scaled decoding and Pillow's reduce, each side kept >= REDUCING_GAP x input
size) against those of the full image resized as transformers' processor does (bicubic to input_size x input_size).

    python -m bench.reduced_decoding [--sizes 112 224 448] [--gap 4] [--scenes]

The images: the photos and the screenshot that Gradio ships (gradio/media_assets/images), a scene of the embedded
model's task drawn at 3000 x 3000 (antialiased, light noise) as PNG, baseline and progressive JPEG, a photo
enlarged 4x as PNG and JPEG, the screenshot as PNG and JPEG. Distances are in levels of 255 (1 level is 2/255 in the
model's [-1, 1] pixel values). --scenes adds the worst case over scenes 1, 3 and 5 drawn at 1000, 1500, 2000, 2600
and 3100 pixels, as PNG and as JPEG.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
from pathlib import Path

from PIL import Image

from paligemma import processor
from paligemma.processor import load_image, preprocess_image


def gradio_images() -> Path:
    return Path(importlib.util.find_spec("gradio").submodule_search_locations[0]) / "media_assets" / "images"


def encoded(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **save)
    return buffer.getvalue()


def real_images() -> dict[str, bytes]:
    from shapes.scenes import Style, render_scene

    folder = gradio_images()
    files = {name: (folder / name).read_bytes()
             for name in ("screenshot.gif", "groot.jpeg", "cheetah.jpg", "tower.jpg", "lion.jpg")}
    scene = render_scene(0, 3, lambda rng, count: Style(canvas=3000, antialias=True, noise=2.0)).image
    files["scene 3000 PNG"] = encoded(scene, format="PNG")
    files["scene 3000 JPEG q90"] = encoded(scene, format="JPEG", quality=90)
    files["scene 3000 JPEG progressive"] = encoded(scene, format="JPEG", quality=90, progressive=True)
    photo = Image.open(folder / "groot.jpeg").convert("RGB")
    photo = photo.resize((photo.width * 4, photo.height * 4), Image.Resampling.BICUBIC)
    files["groot.jpeg x4 JPEG q90"] = encoded(photo, format="JPEG", quality=90)
    files["groot.jpeg x4 PNG"] = encoded(photo, format="PNG")
    screenshot = Image.open(folder / "screenshot.gif").convert("RGB")
    files["screenshot PNG"] = encoded(screenshot, format="PNG")
    files["screenshot JPEG q90"] = encoded(screenshot, format="JPEG", quality=90)
    return files


def distance(data: bytes, size: int) -> tuple[float, float]:
    """(largest, mean) absolute difference in levels of 255 between reduced and full decoding."""
    full = preprocess_image(load_image(data), size)
    reduced = preprocess_image(load_image(data, size), size)
    difference = (full - reduced).abs() * 127.5
    return difference.max().item(), difference.mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reduced_decoding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224, 448], help="model input sides")
    parser.add_argument("--gap", type=int, default=processor.REDUCING_GAP, help="REDUCING_GAP to measure")
    parser.add_argument("--scenes", action="store_true", help="also the worst case over 30 scenes of 1000-3100 px")
    args = parser.parse_args(argv)
    processor.REDUCING_GAP = args.gap
    files = real_images()
    print(f"REDUCING_GAP {args.gap}; largest / mean difference in levels of 255")
    print(f"{'image':30} {'size':>10} " + " ".join(f"{f'side {s}':>14}" for s in args.sizes))
    for name, data in files.items():
        width, height = Image.open(io.BytesIO(data)).size
        cells = [distance(data, size) for size in args.sizes]
        print(f"{name:30} {f'{width}x{height}':>10} " + " ".join(f"{m:6.1f} / {a:5.2f}" for m, a in cells))
    if args.scenes:
        from shapes.scenes import Style, render_scene

        for save in ({"format": "PNG"}, {"format": "JPEG", "quality": 90}):
            worst = {size: (0.0, 0.0) for size in args.sizes}
            for canvas in (1000, 1500, 2000, 2600, 3100):
                for index in (1, 3, 5):
                    style = Style(canvas=canvas, antialias=True, noise=2.0)
                    data = encoded(render_scene(0, index, lambda rng, count: style).image, **save)
                    for size in args.sizes:
                        largest, mean = distance(data, size)
                        worst[size] = (max(worst[size][0], largest), max(worst[size][1], mean))
            label = f"worst of 15 scenes, {save['format']}"
            print(f"{label:41} " + " ".join(f"{m:6.1f} / {a:5.2f}" for m, a in worst.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
