"""The in-browser demo (demo/web, built by `python -m demo.web.build`) in Debian's chromium, driven by Playwright:
transformers.js on onnxruntime-web's WebAssembly backend must give torch's greedy tokens for a caption and a
detection, fed the pixel values the page itself computed (read back from the page: transformers.js' resize is not
Pillow's), draw the boxes and a segmentation's masks (equal to the Python app's), and answer a bad upload with a
message."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from npm import npm_packages
from PIL import Image

import paligemma

playwright = pytest.importorskip("playwright.sync_api")

from demo import app as demo_app  # noqa: E402
from demo.web.build import build, server  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox"]
TIMEOUT_MS = 90_000
MAX_NEW_TOKENS = demo_app.DEFAULT_MAX_NEW_TOKENS  # app.js's, checked in test_app.py


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    npm_packages()
    return build(tmp_path_factory.mktemp("site"), validate=False, log=quiet)  # the tests compare tokens themselves


@pytest.fixture(scope="module")
def url(site):
    httpd = server(site)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url: str):
    """The page at `url`, once it has shown its first answer or an error."""
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_function("window.paligemma && (window.paligemma.firstAnswerMs !== null"
                           " || !document.getElementById('error').hidden)")
    return page


@pytest.fixture(scope="module")
def page(browser, url):
    page = open_page(browser, url)
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
    yield page
    page.close()


@pytest.fixture(scope="module")
def torch_pipe():
    return paligemma.load()


def greedy_tokens(pipe, pixel_values: list[float], prompt: str) -> list[int]:
    """`pipe`'s (torch's, unless another pipeline is given) greedy tokens for `prompt` and these exact pixel
    values, up to and with the stop token."""
    size = pipe.config.image_size
    inputs = pipe.processor([Image.new("RGB", (size, size))], [prompt])
    inputs["pixel_values"] = torch.tensor(pixel_values, dtype=torch.float32).reshape(1, 3, size, size)
    engine = pipe.engine_factory()
    tokens = [int(engine.prefill(inputs, MAX_NEW_TOKENS).argmax(-1))]
    while tokens[-1] not in pipe.stop_ids and len(tokens) < MAX_NEW_TOKENS:
        tokens.append(int(engine.decode_step(torch.tensor(tokens[-1:])).argmax(-1)))
    return tokens


def last_run(page) -> dict:
    return page.evaluate("""() => {
        const s = window.paligemma;
        return {...s.runs.at(-1), pixel_values: Array.from(s.lastInputs.pixel_values.data),
                input_ids: Array.from(s.lastInputs.input_ids.data, Number)};
    }""")


def run_preset(page, prompt: str) -> dict:
    count = page.evaluate("window.paligemma.runs.length")
    page.locator(f'#presets button[data-prompt="{prompt}"]').click()
    page.wait_for_function(f"window.paligemma.runs.length > {count}")
    return last_run(page)


def test_the_first_answer_is_a_caption_equal_to_torch(page, torch_pipe):
    run = last_run(page)
    assert run["prompt"] == "caption en"
    assert run["input_ids"] == torch_pipe.processor([Image.new("RGB", (8, 8))], ["caption en"])["input_ids"][0].tolist()
    assert run["tokens"] == greedy_tokens(torch_pipe, run["pixel_values"], "caption en")
    assert page.locator("#output").text_content() == run["text"] != ""
    assert "tokens/s" in page.locator("#stats").text_content()


def test_a_detection_equals_torch_and_its_boxes_are_drawn(page, torch_pipe):
    page.locator("#example").select_option("scene_07.png")
    page.wait_for_function("(window.paligemma.imageSource || '').endsWith('scene_07.png') && !window.paligemma.busy")
    run = run_preset(page, "detect circle ; triangle")
    assert run["tokens"] == greedy_tokens(torch_pipe, run["pixel_values"], "detect circle ; triangle")
    assert "<loc" in run["text"]
    drawn = page.evaluate("""() => {
        const c = document.getElementById('canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] === 0xe6 && d[i + 1] === 0x00 && d[i + 2] === 0x7e) n++;
        return n;
    }""")
    assert drawn > 100  # the boxes' outlines in the box colour


MASK_OPACITY = 0.45  # demo/draw.py's, which app.js applies
BOX_COLOUR = (0xE6, 0x00, 0x7E)
SEGMENT = "segment circle ; triangle"


def canvas_pixels(page, plain: bool = False) -> np.ndarray:
    """uint8 [height, width, 3] of the page's canvas, or (plain) of the shown image alone drawn as app.js draws it."""
    flat = page.evaluate("""(plain) => {
        let c = document.getElementById('canvas');
        if (plain) {
            const image = window.paligemma.image, shown = c;
            c = new OffscreenCanvas(shown.width, shown.height);
            const scale = Math.min(c.width / image.width, c.height / image.height);
            c.getContext('2d').drawImage(image.toCanvas(), 0, 0, image.width * scale, image.height * scale);
        }
        return {width: c.width, height: c.height,
                data: Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)};
    }""", plain)
    return np.array(flat["data"], dtype=np.uint8).reshape(flat["height"], flat["width"], 4)[..., :3]


def eroded(mask: np.ndarray, pixels: int = 2) -> np.ndarray:
    """True where every pixel within `pixels` (a square) is True: well inside, away from the edge's nearest-scaled
    pixels."""
    padded = np.pad(mask, pixels, constant_values=False)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out


def test_the_segment_preset_draws_masks_equal_to_the_python_apps(page, torch_pipe):
    """Tokens equal torch's on the page's pixels; the masks the page exposes equal parse_segmentations' on its answer
    and overlap the Python app's (its own Pillow resize, demo.app.found_objects) at IoU >= 0.99; on the canvas,
    pixels well inside a mask are the box colour at MASK_OPACITY over the image and pixels in the box outside the
    shape are the image's own."""
    from demo.app import found_objects

    page.locator("#example").select_option("scene_11.png")
    page.wait_for_function("(window.paligemma.imageSource || '').endsWith('scene_11.png') && !window.paligemma.busy")
    run = run_preset(page, SEGMENT)
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
    assert run["tokens"] == greedy_tokens(torch_pipe, run["pixel_values"], SEGMENT)
    got = page.evaluate("""() => window.paligemma.runs.at(-1).masks.map(
        ({label, box, mask}) => ({label, box, mask: Array.from(mask)}))""")
    picture = Image.open(Path(paligemma.__file__).parents[1] / "demo" / "examples" / "scene_11.png").convert("RGB")
    width, height = picture.size
    expected = paligemma.parse_segmentations(run["text"], width, height, torch_pipe.mask_decoder)
    assert len(got) == len(expected) == 2
    masks = [np.array(o["mask"], dtype=bool).reshape(height, width) for o in got]
    for o, mask, s in zip(got, masks, expected):
        assert (o["label"], tuple(o["box"])) == (s.label, s.box)
        np.testing.assert_array_equal(mask, s.mask)
    python_text = torch_pipe.generate(picture, SEGMENT, max_new_tokens=MAX_NEW_TOKENS).text
    python_masks = [d.mask for d in found_objects(python_text, picture.size, torch_pipe.mask_decoder)]
    assert len(python_masks) == 2
    for mask, theirs in zip(masks, python_masks):
        assert (mask & theirs).sum() / (mask | theirs).sum() >= 0.99

    before, after = canvas_pixels(page, plain=True), canvas_pixels(page)
    scale = min(after.shape[1] / width, after.shape[0] / height)
    ys, xs = np.mgrid[0:after.shape[0], 0:after.shape[1]]
    source = (np.minimum(ys // scale, height - 1).astype(int), np.minimum(xs // scale, width - 1).astype(int))
    tinted = before * (1 - MASK_OPACITY) + np.array(BOX_COLOUR) * MASK_OPACITY
    union = np.logical_or.reduce(masks)
    for (x0, y0, x1, y1), mask in zip((o["box"] for o in got), masks):
        # in the box, away from its outline (2 px) and below its label (14 px text at the top-left corner)
        box = ((xs > x0 * scale + 3) & (xs < x1 * scale - 3) & (ys > y0 * scale + 20) & (ys < y1 * scale - 3))
        inside = box & eroded(mask)[source]
        outside = box & eroded(~union)[source]
        assert inside.sum() > 200 and outside.sum() > 200
        assert np.abs(after[inside] - tinted[inside]).max() <= 2
        np.testing.assert_array_equal(after[outside], before[outside])


@pytest.fixture
def altered_site(site, tmp_path):
    """Serves a copy of the built page whose model folder `alter(model_folder)` has changed; yields its URL."""
    servers = []

    def serve(alter):
        copy = shutil.copytree(site, tmp_path / f"site{len(servers)}")
        alter(copy / "model")
        httpd = server(copy)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/"

    yield serve
    for httpd in servers:
        httpd.shutdown()


def segment_scene_11(browser, url: str) -> tuple[dict, object]:
    page = open_page(browser, url)
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
    page.locator("#example").select_option("scene_11.png")
    page.wait_for_function("(window.paligemma.imageSource || '').endsWith('scene_11.png') && !window.paligemma.busy")
    return run_preset(page, SEGMENT), page


def test_a_mask_decoder_that_fails_leaves_the_boxes_drawn_and_says_so(browser, altered_site):
    def truncate(model):
        graph = model / "onnx" / "mask_decoder.onnx"
        graph.write_bytes(graph.read_bytes()[:1000])

    run, page = segment_scene_11(browser, altered_site(truncate))
    assert run["text"].count("<loc") == 8 and run["masks"] == []
    assert (canvas_pixels(page) == BOX_COLOUR).all(-1).sum() > 100  # the two boxes' outlines, untinted
    assert "The masks could not be decoded" in page.locator("#error").text_content()
    page.close()


def test_a_model_without_a_mask_decoder_answers_segment_with_boxes_alone(browser, altered_site):
    def drop_decoder(model):
        config = json.loads((model / "config.json").read_text())
        del config["transformers.js_config"]["mask_decoder"]
        (model / "config.json").write_text(json.dumps(config))
        (model / "onnx" / "mask_decoder.onnx").unlink()

    run, page = segment_scene_11(browser, altered_site(drop_decoder))
    assert run["text"].count("<loc") == 8 and run["masks"] == []
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
    page.close()


def test_a_bad_upload_gets_a_message(page, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("this is text, not a picture")
    page.locator("#upload").set_input_files(str(bad))
    page.locator("#error").wait_for(state="visible")
    assert "could not be read as an image" in page.locator("#error").text_content()


def test_the_int8_variant_gives_this_projects_int8_tokens_on_the_same_files(browser, url, site):
    """?dtype=q8: the page's int8 files; onnxruntime-web (MatMulInteger in WebAssembly) must give what this
    project's ONNX Runtime loop gives on the same files and pixel values (int8 answers may differ from torch's by a
    few location bins: docs/web.md)."""
    from export.runtime import load_onnx_pipeline

    page = open_page(browser, url + "?dtype=q8")
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
    pipe = load_onnx_pipeline(site / "model", quantize="int8")
    run = last_run(page)
    assert run["tokens"] == greedy_tokens(pipe, run["pixel_values"], "caption en")
    page.close()


def test_a_variant_the_page_lacks_gets_a_message(browser, url):
    page = open_page(browser, url + "?dtype=q2")
    assert "?dtype=q2 is not a variant this page holds; use fp32 or q8" in page.locator("#error").text_content()
    page.close()


@pytest.mark.parametrize("query, message", [
    ("?threads=two", "?threads=two is not a number of threads; use a whole number from 1"),
    ("?optimization=fast", "?optimization=fast is not a graph optimization level; use all, extended, basic, disabled"),
])
def test_a_bad_measuring_option_gets_a_message(browser, url, query, message):
    page = open_page(browser, url + query)
    assert message in page.locator("#error").text_content()
    page.close()


def test_the_page_records_how_it_ran(page):
    """What demo.web.measure_page reports: one thread by default, cross-origin isolated (the server's COOP/COEP,
    which onnxruntime-web's threads need), and WebAssembly's unoptimized graphs."""
    state = page.evaluate("(({threads, crossOriginIsolated, sessionOptions, device}) => "
                          "({threads, crossOriginIsolated, sessionOptions, device}))(window.paligemma)")
    assert state["crossOriginIsolated"] is True and state["threads"] >= 1
    if state["device"] == "wasm":
        assert state["sessionOptions"] == {"graphOptimizationLevel": "disabled"}
