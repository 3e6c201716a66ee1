"""The in-browser page's segmentation code (demo/web/segmentation.js, run in Node by demo/web/segment.mjs on the
export's mask_decoder.onnx) against paligemma.parse_segmentations with the shipped decoder (torch): the same objects,
boxes and boolean masks, pixel for pixel, on hand-written answers with the shipped model's codes and seeded ones;
malformed runs and boxes outside the image skipped as Python skips them."""

import base64
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from npm import npm_packages

import paligemma
from export.transformers_js.writer import export_transformers_js

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "demo" / "web"
# The shipped model's codes for scene_07's circle and triangle (`segment circle ; triangle`, greedy).
CIRCLE = [104, 73, 49, 90, 118, 48, 48, 49, 100, 91, 61, 125, 90, 7, 94, 10]
TRIANGLE = [16, 63, 50, 29, 22, 21, 19, 22, 3, 106, 36, 115, 18, 76, 83, 124]
SEEDED = [int(c) for c in np.random.default_rng(0).integers(0, 128, 16)]


def quiet(*_):
    pass


def answer(bins, codes, label):
    return "".join(f"<loc{b:04d}>" for b in bins) + "".join(f"<seg{c:03d}>" for c in codes) + f" {label}"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    npm_packages()
    out = tmp_path_factory.mktemp("tjs")
    export_transformers_js(paligemma.DEMO_CHECKPOINT, out, progress=False, log=quiet)
    return out


@pytest.fixture(scope="module")
def decoder():
    return paligemma.load().mask_decoder


def node_segmentations(export: Path, text: str, width: int, height: int) -> list[dict]:
    done = subprocess.run(["node", str(WEB / "segment.mjs"), "--model", str(export), "--text", text,
                           "--width", str(width), "--height", str(height)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    objects = json.loads(done.stdout.strip().splitlines()[-1])["objects"]
    for o in objects:
        o["mask"] = np.frombuffer(base64.b64decode(o["mask"]), dtype=np.uint8).reshape(height, width).astype(bool)
    return objects


def assert_same(export, decoder, text, width, height):
    expected = paligemma.parse_segmentations(text, width, height, decoder)
    got = node_segmentations(export, text, width, height)
    assert [(o["label"], tuple(o["box"])) for o in got] == [(s.label, s.box) for s in expected]
    for o, s in zip(got, expected):
        np.testing.assert_array_equal(o["mask"], s.mask)
    return expected


@pytest.mark.parametrize("width, height", [(224, 224), (300, 170), (40, 30), (1000, 700)])
def test_masks_equal_python_on_the_shipped_models_codes(export, decoder, width, height):
    """Boxes shrinking the 64 x 64 logits (Pillow's widened triangle) and stretching them, on square and other
    images."""
    text = (answer((388, 320, 603, 539), CIRCLE, "circle") + " ; " + answer((406, 726, 617, 936), TRIANGLE, "triangle")
            + " ; " + answer((0, 0, 1023, 1023), SEEDED, "everything")
            + " ; " + answer((10, 500, 90, 1000), TRIANGLE, "flat"))
    found = assert_same(export, decoder, text, width, height)
    assert len(found) == 4 and all(s.mask.any() for s in found[:2])


@pytest.mark.parametrize("text", [
    answer((100, 200, 300, 400), CIRCLE[:15], "fifteen codes"),
    answer((100, 200, 300, 400), CIRCLE + [7], "seventeen codes"),
    answer((100, 200, 300, 400), CIRCLE[:15] + [128], "past the codebook"),
    "<loc0100><loc0200><loc0300><loc0400><seg001><seg12> broken token",
    answer((100, 200, 1100, 400), CIRCLE, "past the bottom"),
    answer((100, 200, 300, 4000), CIRCLE, "past the right side"),
    answer((300, 200, 100, 400), CIRCLE, "inverted"),
    answer((100, 400, 300, 400), CIRCLE, "empty"),
    answer((100, 200, 300, 400), [], "a plain detection"),
    answer((100, 200, 300, 400), CIRCLE, "runs into") + "<loc0001>",
])
def test_malformed_objects_are_skipped_and_the_good_one_kept(export, decoder, text):
    good = answer((0, 0, 511, 511), TRIANGLE, "triangle")
    found = assert_same(export, decoder, text + " ; " + good, 100, 80)
    assert [s.label for s in found] == ["triangle"]


def test_a_box_under_one_pixel_keeps_its_empty_mask(export, decoder):
    [found] = assert_same(export, decoder, answer((10, 10, 12, 12), CIRCLE, "dot"), 20, 20)
    assert not found.mask.any()


def test_text_without_masks_gives_nothing(export, decoder):
    assert assert_same(export, decoder, "a red circle", 10, 10) == []
