"""Memory and CPU time to read one image for the model, for the largest files each accepted format allows.

    python -m bench.image_load [--input-size 112] [--folder /tmp/paligemma-image-load] [--only NAME ...]

Each case is a file just within paligemma.processor's limits (MAX_IMAGE_PIXELS, DECODE_BUDGET), made once into
`folder`; each is read by `paligemma.processor.load_image(bytes, input_size)` and preprocessed in a fresh Python, which
prints its peak resident memory above what it held before reading (VmHWM minus VmRSS after the imports) and its
CPU time. The files are stepped gradients: small on disk (most well under the 10 MB upload limit), as large as allowed
once decoded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Sides at the limits: 7990 x 7990 is 63.8 megapixels (MAX_IMAGE_PIXELS); the others fill DECODE_BUDGET (192 MiB) at
# the bytes a pixel that paligemma.processor.decode_cost counts for them.
SIDE = 7990
SIDES = {"rgb": 7090, "progressive-444": 5750, "webp": 3540}


def gradient(side: int, channels: int) -> np.ndarray:
    ramp = np.floor(np.linspace(0, 63.99, side, dtype=np.float32)) * 4  # steps: long runs that RLE and LZW keep small
    planes = [ramp[None, :] + 0 * ramp[:, None], ramp[:, None] + 0 * ramp[None, :], (ramp[None, :] + ramp[:, None]) / 2,
              255 - ramp[None, :] + 0 * ramp[:, None]]
    return np.stack(planes[:channels], -1).astype(np.uint8)


def cases() -> dict:
    """name -> (a function making the PIL image, save keyword arguments)"""
    def gray16():
        row = (np.arange(SIDE, dtype=np.uint32) * 65535 // (SIDE - 1)).astype(np.uint16)
        return Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (SIDE, SIDE))))

    def palette():
        image = Image.fromarray(gradient(SIDE, 1)[..., 0], "L").convert("P")
        image.info["transparency"] = 0
        return image

    def colour(side=SIDES["rgb"], channels=3):
        return lambda: Image.fromarray(gradient(side, channels))

    def floats():
        return Image.fromarray(gradient(SIDES["rgb"], 1)[..., 0].astype(np.float32) / 255)

    return {
        "png-16bit-gray": (gray16, dict(format="PNG", compress_level=9)),
        "png-palette-transparent": (palette, dict(format="PNG", compress_level=9, transparency=0)),
        "png-rgba": (colour(channels=4), dict(format="PNG", compress_level=9)),
        "jpeg-baseline": (colour(SIDE), dict(format="JPEG", quality=90)),
        "jpeg-progressive": (colour(SIDE), dict(format="JPEG", quality=90, progressive=True)),
        "jpeg-progressive-444": (colour(SIDES["progressive-444"]),
                                 dict(format="JPEG", quality=90, progressive=True, subsampling=0)),
        "webp-lossy": (colour(SIDES["webp"]), dict(format="WEBP", quality=80)),
        "webp-lossless-rgba": (colour(SIDES["webp"], 4), dict(format="WEBP", lossless=True)),
        "gif": (palette, dict(format="GIF")),
        "bmp-rle": (lambda: palette().convert("L").convert("P"), dict(format="BMP", compression="bmp_rle")),
        "tiff-float32": (floats, dict(format="TIFF", compression="tiff_adobe_deflate")),
        "tiff-rgb-lzw": (colour(), dict(format="TIFF", compression="tiff_lzw")),
    }


READ = """
import json, sys, time
from paligemma.processor import load_image, preprocess_image
data = open(sys.argv[1], "rb").read()
before = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
start = time.process_time()
size = int(sys.argv[2])
pixels = preprocess_image(load_image(data, size), size)
cpu = time.process_time() - start
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"peak_above_mb": (peak - before) / 1e6, "cpu_s": cpu}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.image_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-size", type=int, default=112, help="the model's input side (the embedded model's)")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/paligemma-image-load"))
    parser.add_argument("--only", nargs="*", help="case names")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    print(f"{'case':26} {'file MB':>8} {'size':>10} {'mode':>5} {'peak MB':>8} {'CPU s':>6}")
    for name, (make, save) in cases().items():
        if args.only and name not in args.only:
            continue
        path = args.folder / f"{name}.{save['format'].lower()}"
        if not path.exists():
            make().save(path, **save)
        with Image.open(path) as image:
            size, mode = f"{image.width}x{image.height}", image.mode
        result = subprocess.run([sys.executable, "-c", READ, str(path), str(args.input_size)], cwd=root,
                                capture_output=True, text=True)
        if result.returncode:
            print(f"{name:26} failed: {result.stderr.strip().splitlines()[-1]}")
            continue
        figures = json.loads(result.stdout)
        print(f"{name:26} {path.stat().st_size / 1e6:8.2f} {size:>10} {mode:>5} {figures['peak_above_mb']:8.0f} "
              f"{figures['cpu_s']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
