"""The demo in a real browser: Debian's chromium driven by Playwright loads the page, uploads an image, runs a
caption, waits for the streamed answer and checks it, then a detection with boxes; screenshots go to artifacts/."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from app_server import example

import paligemma
from demo.inputs import read_image

playwright = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (paligemma.DEMO_CHECKPOINT / "config.json").exists(),
                                reason="the embedded demo checkpoint is not in the tree yet")
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", ROOT / "artifacts"))
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def url(server):
    return server[1]


def direct_answer(backend, image: Path, prompt: str) -> str:
    """What the page must show: the pipeline's own answer (test_app.py checks answers against the scenes)."""
    return backend.pipeline.generate(read_image(str(image)), prompt).text


@pytest.fixture(scope="module")
def page(url):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        yield page
        browser.close()


def upload(page, image: Path):
    page.locator("#image input[type=file]").set_input_files(str(image))
    page.locator(f'#image img[src*="{image.name}"]').first.wait_for()  # uploaded: the preview shows the new file


def run(page, image: Path, prompt: str):
    upload(page, image)
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#run").click()


def run_filled_prompt(page, prompt: str, expected: str):
    """Once the page has filled `prompt` in (a preset, an example), Run, and wait for the finished `expected` answer."""
    page.wait_for_function("expected => document.querySelector('#prompt textarea').value === expected", arg=prompt)
    page.locator("#run").click()
    page.wait_for_function(
        "expected => document.querySelector('#answer textarea').value === expected", arg=expected, polling=20,
    )
    wait_until_finished(page)


def wait_until_finished(page):
    """The last update of a run (after the answer is complete) writes the total time into the timings line."""
    page.locator("#timings", has_text=re.compile(r"tokens? in [0-9.]+ s")).wait_for()


def answer_text(page) -> str:
    return page.locator("#answer textarea").input_value()


def test_page_shows_the_backend(page):
    banner = page.locator("#backend").inner_text()
    assert "ONNX Runtime" in banner and "embedded demo model" in banner


def test_run_without_an_image_shows_a_message(page):
    page.locator("#run").click()
    page.get_by_text("no image: upload one, or pick an example below").first.wait_for()
    assert "Traceback" not in page.content()
    page.locator(".toast-close").first.click()  # so that the screenshots below show the page, not the toast
    page.locator(".toast-body").first.wait_for(state="detached")


def test_caption_streams_into_the_page(page, backend):
    image, _ = example("caption en")
    expected = direct_answer(backend, image, "caption en")
    run(page, image, "caption en")
    page.wait_for_function(
        "expected => { const t = document.querySelector('#answer textarea'); return t && t.value === expected; }",
        arg=expected, polling=20,
    )
    assert answer_text(page) == expected
    wait_until_finished(page)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_caption.png"), full_page=True)


def test_detect_preset_draws_boxes(page, backend):
    image, entry = example("detect circle ; triangle")
    expected = direct_answer(backend, image, entry["prompt"])
    upload(page, image)
    page.get_by_label("Detect").check()  # the task preset fills the prompt
    run_filled_prompt(page, entry["prompt"], expected)
    page.locator("#annotated img").first.wait_for()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_detect.png"), full_page=True)


def test_an_example_clicked_runs_from_the_upload_folder(page, backend):
    """Examples reach the handler as Gradio's cached copies, the only files besides uploads it reads."""
    image, entry = example("answer en")
    expected = direct_answer(backend, image, entry["prompt"])
    page.locator("#examples").get_by_text(entry["prompt"], exact=True).first.click()
    run_filled_prompt(page, entry["prompt"], expected)


def test_segment_preset_draws_the_masks(page, backend):
    """The image the page shows after a segmentation has each drawn shape's inside tinted (its mask, filled
    translucent) and the scene outside the boxes and labels untouched."""
    import io
    from urllib.parse import urljoin

    import numpy as np
    from PIL import Image

    from shapes.vqvae import shape_mask

    image, entry = example("segment circle ; triangle")
    expected = direct_answer(backend, image, entry["prompt"])
    upload(page, image)
    page.get_by_label("Segment").check()
    run_filled_prompt(page, entry["prompt"], expected)
    shown = page.locator("#annotated img").first
    shown.wait_for()
    drawn = Image.open(io.BytesIO(page.request.get(urljoin(page.url, shown.get_attribute("src"))).body()))
    scene = Image.open(image).convert("RGB")
    scale = drawn.width / scene.width  # drawn larger with nearest-neighbour pixels (demo/draw.py)
    plain = np.asarray(scene.resize(drawn.size, Image.Resampling.NEAREST)).astype(int)
    changed = np.abs(np.asarray(drawn.convert("RGB")).astype(int) - plain).max(-1) > 8
    untouched = np.ones(changed.shape, bool)
    for shape in entry["shapes"]:
        y0, x0, y1, x1 = (round(c * scale) for c in shape["box_yxyx"])
        untouched[max(0, y0 - 40) : y1 + 8, max(0, x0 - 8) : x1 + 8] = False  # the box, its outline and label
        if shape["shape"] in ("circle", "triangle"):
            inside = shape_mask(shape["shape"], [c + d for c, d in zip(shape["box_yxyx"], (4, 4, -4, -4))])
            inside = np.asarray(Image.fromarray(inside).resize(drawn.size, Image.Resampling.NEAREST))
            assert changed[inside].mean() > 0.9, (shape, changed[inside].mean())
    assert changed[untouched].mean() < 0.01
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_segment.png"), full_page=True)
