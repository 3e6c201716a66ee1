"""The Gradio demo driven through its API with gradio_client: the embedded model served by ONNX Runtime, answers
of shipped examples, every kind of bad input answered with a message, concurrency, the torch check, app.py."""

from __future__ import annotations

import base64
import copy
import dataclasses
import re
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from app_server import EXAMPLES, example, free_port, last_event, raw_call, raw_upload, request, rle_decode, serve
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import paligemma
from demo import app as demo_app
from demo.backends import load_backend
from demo.inputs import read_image
from shapes import scenes as S

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (paligemma.DEMO_CHECKPOINT / "config.json").exists(),
                                reason="the embedded demo checkpoint is not in the tree yet")
SHORT = dict(max_new_tokens=8)  # enough to show that a request ran, for the tests that only need that


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


@pytest.fixture(scope="module")
def direct(backend):
    """Each shipped example's answer from the pipeline called directly: what the app must return for it, whatever
    the model's accuracy (the tests against the scenes' truth are the caption and detect tests)."""
    return {entry["file"]: backend.pipeline.generate(read_example(entry), entry["prompt"]).text for entry in EXAMPLES}


def read_example(entry) -> Image.Image:
    return read_image(str(demo_app.EXAMPLES_DIR / entry["file"]))


def generate(client, image, prompt="caption en", **kwargs):
    return client.predict(None if image is None else handle_file(str(image)), prompt, api_name="/generate", **kwargs)


def iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_serves_the_embedded_model_through_onnx_runtime(backend):
    assert backend.name == "onnx" and backend.fallback is None
    assert backend.is_demo_model
    assert "CPUExecutionProvider" in backend.runtime or "CUDAExecutionProvider" in backend.runtime


def test_api_endpoint_generate_takes_image_and_prompt_first_with_defaults_for_the_rest(client):
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names[:2] == ["image", "prompt"]
    assert all(p["parameter_has_default"] for p in endpoint["parameters"][2:])
    assert endpoint["returns"][0]["label"] == "Answer"


def test_queue_and_upload_limits(server, backend):
    app, _ = server
    assert app._queue.max_size == demo_app.MAX_QUEUE
    assert app._queue.default_concurrency_limit == backend.concurrent_requests
    assert app.max_file_size == 10 * 1024 * 1024
    assert app.delete_cache == (600, 3600)  # uploads and answers' images go after an hour (test_app_security.py)


def test_caption_of_a_shipped_example(client, backend):
    image, entry = example("caption en")
    answer, annotated, boxes, timings, check = generate(client, image)
    assert answer == entry["caption"]
    assert boxes == [] and Path(annotated).is_file()
    assert backend.runtime in timings and "time to first token" in timings and "tokens/s" in timings
    assert check == ""


def test_detect_returns_boxes_that_match_the_scene(client):
    image, entry = example("detect circle ; triangle")
    answer, annotated, boxes, _, _ = generate(client, image, entry["prompt"])
    expected = [s for s in entry["shapes"] if s["shape"] in ("circle", "triangle")]
    assert [b["label"] for b in boxes] == [s["shape"] for s in expected]
    for box, shape in zip(boxes, expected):
        y0, x0, y1, x1 = shape["box_yxyx"]
        assert iou(box["box"], (x0, y0, x1, y1)) > 0.7
    drawn = Image.open(annotated)
    assert drawn.size[0] >= 320  # the 224 px scene drawn larger so the labels stay legible


def test_segment_returns_masks_that_match_the_drawn_shapes(client):
    from shapes.evaluate import mask_iou
    from shapes.vqvae import shape_mask

    image, entry = example("segment circle ; triangle")
    answer, annotated, boxes, _, _ = generate(client, image, entry["prompt"])
    expected = [s for s in entry["shapes"] if s["shape"] in ("circle", "triangle")]
    assert [b["label"] for b in boxes] == [s["shape"] for s in expected], answer
    for entry_box, shape in zip(boxes, expected):
        mask = rle_decode(entry_box["mask"])
        assert mask.shape == Image.open(image).size[::-1]  # [height, width] of the image sent
        assert mask_iou(mask, shape_mask(shape["shape"], shape["box_yxyx"])) > 0.8, shape
    assert Image.open(annotated).size[0] >= 320


def test_the_default_answer_length_holds_a_segmentation_of_three_shapes(backend):
    """The embedded model's scenes hold up to three shapes: segmenting all of them must fit the app's and the page's
    default max_new_tokens with its <eos>, or the last mask is cut off."""
    tokenizer = backend.pipeline.processor.tokenizer  # the app's own
    scene = next(s for s in (S.render_scene(1, i) for i in range(100)) if len(s.shapes) == 3)
    answer = S.segment_answer(scene, S.SHAPES, [[0] * 16] * 3)
    needed = len(tokenizer.encode(answer, add_special_tokens=False).ids) + 1
    page = int(re.search(r"const MAX_NEW_TOKENS = (\d+);", (ROOT / "demo/web/app.js").read_text())[1])
    assert needed <= demo_app.DEFAULT_MAX_NEW_TOKENS and page == demo_app.DEFAULT_MAX_NEW_TOKENS, (needed, page)


def test_the_segment_preset_is_offered_only_with_a_mask_decoder(backend):
    assert demo_app.task_presets(backend)["Segment"] == "segment circle ; triangle"
    pipeline = copy.copy(backend.pipeline)
    pipeline.mask_decoder = None
    without = dataclasses.replace(backend, pipeline=pipeline)
    assert "Segment" not in demo_app.task_presets(without) and "Detect" in demo_app.task_presets(without)


def test_answer_streams_token_by_token(client, direct):
    image, entry = example("caption en")
    job = client.submit(handle_file(str(image)), "caption en", api_name="/generate")
    final = job.result()[0]
    answers = [output[0] for output in job.outputs()]
    assert final == direct[entry["file"]]
    partial = [a for a in answers if a and a != final]
    # The page shows generation's newest update (demo/run_ahead.py), so how many partial answers arrive depends on
    # the model's speed against the page's: the fused ONNX decode (~550 tokens/s) can finish a 12-token caption
    # before the first message is sent (seen under load). What holds whatever the speed: every update the page gets
    # is a growing prefix of the answer, and the last is the whole answer. That tokens are handed on one by one as
    # they come is tests/test_run_ahead.py's, with a stream it paces itself.
    assert answers[-1] == final and len(set(partial)) == len(partial)
    assert all(final.startswith(a) for a in partial) and partial == sorted(partial, key=len)


def test_check_against_torch_agrees(client):
    image, entry = example("detect circle ; triangle")
    *_, check = generate(client, image, entry["prompt"], check_torch=True)
    assert check.startswith("✅"), check
    assert float(re.search(r"difference \*\*([0-9.e+-]+)\*\*", check).group(1)) < 1e-4


def test_seeded_sampling_repeats_and_matches_torch(client):
    image, _ = example("caption en")
    settings = dict(decoding="sample", temperature=1.5, top_p=0.95, top_k=20, seed=7, max_new_tokens=16)
    first = generate(client, image, check_torch=True, **settings)
    second = generate(client, image, **settings)
    assert first[0] == second[0]
    assert "seed 7" in first[3] and first[4].startswith("✅"), first[4]


def test_sixteen_concurrent_clients_get_their_solo_answers(server, backend):
    """Sixteen visitors at once, over raw HTTP with the images inline (no uploads: the test stays fast): the
    requests share the continuous batch, joining and leaving it as they come and end (the budgets differ), and each
    answer is what the pipeline gives the same request alone."""
    assert backend.batching
    url = server[1]
    prompts = ["caption en", "detect circle ; triangle", "answer en how many shapes are there?",
               "segment circle ; triangle"]
    jobs = [(EXAMPLES[i % len(EXAMPLES)], prompts[i % len(prompts)], 6 + 5 * i) for i in range(16)]
    solo = [backend.pipeline.generate(read_example(entry), prompt, max_new_tokens=budget).text
            for entry, prompt, budget in jobs]
    images = {entry["file"]: data_url(demo_app.EXAMPLES_DIR / entry["file"]) for entry, _, _ in jobs}

    def run(job):
        entry, prompt, budget = job
        return last_event(raw_call(url, request({"path": images[entry["file"]]}, prompt, budget)))

    backend.pipeline.batcher.largest_batch = 0
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(run, jobs))
    assert answers == [("complete", answers[i][1]) for i in range(16)]
    assert [data[0] for _, data in answers] == solo
    assert backend.pipeline.batcher.largest_batch > 1  # they decoded together


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_an_answers_image_is_never_rewritten_by_a_later_equal_answer(server):
    """Two visitors asking the same thing get the same drawn image: the file handed out to the first must not be
    written again while the second is answered, or a download still reading it gets a truncated image."""
    url = server[1]
    image, entry = example("detect circle ; triangle")
    inputs = request({"path": raw_upload(url, image.name, image.read_bytes()), "meta": {"_type": "gradio.FileData"}},
                     entry["prompt"], max_new_tokens=64)
    kind, first = last_event(raw_call(url, inputs))
    assert kind == "complete", first
    served = Path(first[1]["path"])
    assert Image.open(served).size[0] >= 320
    drawn = served.read_bytes()
    reading = b"the bytes a download of the first answer is reading"
    served.write_bytes(reading)
    try:
        kind, second = last_event(raw_call(url, inputs))
        assert kind == "complete" and second[0] == first[0]
        assert served.read_bytes() == reading
    finally:  # the cache outlives this server: later answers are served from this file
        served.write_bytes(drawn)


# ---- bad input: each answered with a message, never a traceback, and the app keeps answering ----------------------


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but that holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bad_files(folder: Path) -> dict[str, Path]:
    scene = (demo_app.EXAMPLES_DIR / EXAMPLES[0]["file"]).read_bytes()
    contents = {
        "corrupt.png": scene[: len(scene) // 3],
        "notes.txt": b"not an image at all\n" * 10,
        "bomb.png": png_declaring(30_000, 30_000),
        "vector.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                      b'<rect width="10" height="10"/></svg>',
        "svg_named.png": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>',
        "empty.png": b"",
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    huge = folder / "huge.png"  # 72 M pixels: under Pillow's bomb threshold, over the pipeline's limit
    Image.new("1", (9000, 8000)).save(huge)
    paths["huge.png"] = huge
    return paths


BAD_IMAGES = {
    "corrupt.png": "corrupt or truncated",
    "notes.txt": "not an image",
    "bomb.png": "too large to decode safely",
    "vector.svg": "SVG",
    "svg_named.png": "SVG",
    "empty.png": "not an image",
    "huge.png": "pixel limit",
}


def assert_refused(call, message: str):
    with pytest.raises(AppError) as error:
        call()
    text = str(error.value)
    assert re.search(message, text, re.IGNORECASE), text
    assert "Traceback" not in text and 'File "' not in text


@pytest.fixture(scope="module")
def bad_image_paths(tmp_path_factory):
    return bad_files(tmp_path_factory.mktemp("bad_images"))


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_gets_a_message(client, bad_image_paths, name):
    assert_refused(lambda: generate(client, bad_image_paths[name], **SHORT), BAD_IMAGES[name])


def test_no_image_gets_a_message(client):
    assert_refused(lambda: generate(client, None), "no image")


BAD_PROMPTS = {
    "": "prompt is empty",
    "   \n ": "prompt is empty",
    "a" * (demo_app.MAX_PROMPT_CHARS + 1): "keep it under",
    "caption en " + "circle " * 130: "exceeds the model's .* positions",
    "caption <image> en": "reserved token",
    "<bos>caption en": "reserved token",
    "caption en<eos>": "reserved token",
    "caption <pad>": "reserved token",
}


@pytest.mark.parametrize("prompt", list(BAD_PROMPTS), ids=range(len(BAD_PROMPTS)))
def test_bad_prompt_gets_a_message(client, prompt):
    image, _ = example("caption en")
    assert_refused(lambda: generate(client, image, prompt), BAD_PROMPTS[prompt])


BAD_DECODING = [
    ("temperature", -0.5), ("temperature", 2.5), ("temperature", "hot"), ("temperature", None),
    ("top_p", 0), ("top_p", 1.5), ("top_k", -1), ("top_k", 1.5), ("top_k", 1000), ("max_new_tokens", 0),
    ("max_new_tokens", 257), ("max_new_tokens", 10.5), ("max_new_tokens", "many"), ("seed", -1), ("seed", "x"),
    ("seed", 2**64), ("decoding", "beam"), ("decoding", None), ("check_torch", "yes"),
]


@pytest.mark.parametrize("name,value", BAD_DECODING)
def test_out_of_range_decoding_value_sent_through_the_api_gets_a_message(client, name, value):
    image, _ = example("caption en")
    assert_refused(lambda: generate(client, image, **{name: value}), name)


# Every mode a file can carry (YCbCr and HSV exist only in memory: JPEG stores YCbCr but opens as RGB), each in a
# format that keeps it.
MODES = {"1": "png", "L": "png", "LA": "png", "P": "png", "RGB": "png", "RGBA": "png", "I;16": "png",
         "I": "tiff", "F": "tiff", "CMYK": "tiff", "LAB": "tiff"}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_pillow_mode_is_answered(client, tmp_path, mode):
    scene = Image.open(demo_app.EXAMPLES_DIR / EXAMPLES[0]["file"]).convert("RGBA")
    image = scene.convert("I").point(lambda v: v * 256).convert("I;16") if mode == "I;16" else scene.convert(mode)
    path = tmp_path / f"scene.{MODES[mode]}"
    image.save(path)
    assert Image.open(path).mode == mode
    answer, annotated, *_ = generate(client, path, **SHORT)
    assert answer and Path(annotated).is_file()


@pytest.mark.parametrize("size", [(1, 1), (3, 500), (4000, 3000)])
def test_tiny_and_large_images_are_answered(client, tmp_path, size):
    path = tmp_path / "image.png"
    Image.open(demo_app.EXAMPLES_DIR / EXAMPLES[0]["file"]).resize(size).save(path)
    answer, annotated, *_ = generate(client, path, **SHORT)
    assert answer and max(Image.open(annotated).size) <= 1024


def test_upload_over_the_size_limit_is_refused_and_the_app_keeps_answering(client, direct, tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(b"\0" * (11 * 1024 * 1024))
    with pytest.raises(Exception, match=r"(?i)size|large|413"):
        generate(client, path)
    image, entry = example("caption en")
    assert generate(client, image)[0] == direct[entry["file"]]


def test_app_keeps_answering_after_bad_input(client, direct, bad_image_paths):
    for path in bad_image_paths.values():
        with pytest.raises(AppError):
            generate(client, path, **SHORT)
    image, entry = example("caption en")
    assert generate(client, image)[0] == direct[entry["file"]]


@pytest.mark.parametrize("image,message", [
    ({"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "not uploaded"),
    ("/etc/passwd", "validation error"),
    ({"url": "data:image/png;base64,!!!", "meta": {"_type": "gradio.FileData"}}, "not valid base64"),
])
def test_raw_payloads_that_are_not_uploads_get_a_message(server, image, message):
    events = raw_call(server[1], [image, "caption en", "greedy", 1.0, 0.9, 0, 8, 0, False])
    assert "event: error" in events and message in events and "Traceback" not in events


# ---- backends and the entry point ---------------------------------------------------------------------------------


def test_falls_back_to_torch_when_onnx_runtime_cannot_run_and_says_so(monkeypatch):
    from export import runtime

    def failing_onnx(*args, **kwargs):
        raise RuntimeError("no usable execution provider")

    monkeypatch.setattr(runtime, "load_onnx_pipeline", failing_onnx)
    backend = load_backend(None, "onnx", warm_up=False)
    assert backend.name == "torch" and "no usable execution provider" in backend.fallback
    app = demo_app.create_app(backend)
    banner = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "backend")
    assert "Fallback to PyTorch" in banner.value and "no usable execution provider" in banner.value


def test_torch_backend_gives_the_same_answers(direct):
    backend = load_backend(None, "torch", warm_up=False)
    assert backend.name == "torch" and backend.runtime.startswith("PyTorch")
    for entry in EXAMPLES:
        assert backend.pipeline.generate(read_example(entry), entry["prompt"]).text == direct[entry["file"]]


def test_app_py_serves_the_demo(direct):
    port = free_port()
    process = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"app.py did not start: {process.stdout.read().decode()[-2000:]}")
                time.sleep(0.5)
        image, entry = example("caption en")
        assert generate(client, image)[0] == direct[entry["file"]]
    finally:
        process.terminate()
        process.wait(30)


def test_app_py_reports_a_bad_model_without_a_traceback():
    result = subprocess.run([sys.executable, "app.py", "--model", "/no/such/checkpoint"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "/no/such/checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_a_huge_seed_and_a_lone_surrogate_sent_as_raw_json_get_messages(server):
    url = server[1]
    image, _ = example("caption en")
    for prompt, decoding, seed, message in (("caption en", "sample", 10**4000,
                                             "seed=<an integer of 4001 digits> is out of range"),
                                            ("caption \ud800 en", "greedy", 0, "lone surrogate")):
        upload = {"path": raw_upload(url, image.name, image.read_bytes()), "meta": {"_type": "gradio.FileData"}}
        events = raw_call(url, [upload, prompt, decoding, 1.0, 0.9, 0, 8, seed, False])  # \ud800 is sent escaped
        kind, data = last_event(events)
        assert kind == "error" and message in data["error"] and data["title"] != "Server error", data


def test_a_tiny_temperature_is_sampled_not_a_server_error(client, direct):
    image, entry = example("caption en")
    answer = generate(client, image, decoding="sample", temperature=1e-40, seed=0)[0]
    assert answer == direct[entry["file"]]  # the limit of sampling as the temperature goes to 0 is greedy


def test_the_max_new_tokens_slider_ends_where_the_model_has_room(server, backend):
    app, _ = server
    slider = next(b for b in app.blocks.values() if getattr(b, "label", None) == "Max new tokens")
    assert slider.maximum < 256  # the embedded model has 256 positions, 64 of them taken by the image
    image, _ = example("caption en")
    picture = read_image(str(image))
    for prompt in demo_app.PRESETS_DEMO.values():  # every preset runs at the slider's end
        result = backend.pipeline.generate(picture, prompt, max_new_tokens=int(slider.maximum))
        assert result.token_ids
    with pytest.raises(paligemma.InputError, match="exceeds the model's 256 positions"):
        backend.pipeline.generate(picture, demo_app.PRESETS_DEMO["Count"], max_new_tokens=int(slider.maximum) + 1)


def test_one_token_reads_one_token_without_a_rate(backend):
    update = paligemma.StreamUpdate("2", "2", [123], ttft_s=0.05, decode_tokens_per_s=0.0, finished=True)
    line = demo_app.format_timings(backend, update, {"do_sample": False}, 0.2)
    assert "1 token in 0.20 s" in line and "tokens/s" not in line


def test_the_torch_check_is_off_when_the_operator_turns_it_off(backend):
    with serve(backend, torch_check=False) as (app, url):
        box = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "check_torch")
        assert not box.interactive and "--torch-check on" in box.label
        image, _ = example("caption en")
        assert_refused(lambda: generate(Client(url, verbose=False), image, check_torch=True, **SHORT),
                       "off on this server")


def test_the_torch_check_is_offered_by_default_only_for_small_models(backend, monkeypatch):
    from demo import backends

    assert backend.torch_check_fits()  # the embedded model: a few MB
    monkeypatch.setattr(backends, "TORCH_CHECK_AUTO_BYTES", 1000)
    assert not backend.torch_check_fits()
    app = demo_app.create_app(backend)
    box = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "check_torch")
    assert not box.interactive


def app_py_refusal(argv, capsys, env=None, monkeypatch=None) -> str:
    """What `python app.py ARGV` prints on stderr when it refuses to start (exit 2), run in this process: the same
    main() (test_app_py_reports_a_bad_model_without_a_traceback runs the real process)."""
    import app

    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        app.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_app_py_refuses_an_export_folder_with_the_torch_backend(tmp_path, capsys):
    stderr = app_py_refusal(["--backend", "torch", "--onnx-dir", str(tmp_path)], capsys)
    assert "--onnx-dir is served by --backend onnx only" in stderr
    assert stderr.strip().count("\n") == 0


def test_app_py_refuses_a_damaged_export_it_was_told_to_serve(backend, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "onnx"
    shutil.copytree(backend.pipeline.engine_factory.onnx_dir, damaged)
    data = damaged / "decoder.onnx.data"
    data.write_bytes(bytes(data.stat().st_size))
    stderr = app_py_refusal(["--onnx-dir", str(damaged)], capsys)
    assert "decoder.onnx.data is corrupt" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("config", ['[1, 2]', '{"model_type": "paligemma", "text_config": "gemma"}'])
def test_app_py_reports_a_bad_config_in_one_line(tmp_path, config, capsys):
    (tmp_path / "config.json").write_text(config)
    stderr = app_py_refusal(["--model", str(tmp_path)], capsys)
    assert "config.json" in stderr
    assert "Traceback" not in stderr and stderr.strip().count("\n") == 0, stderr


@pytest.mark.parametrize("args,message", [(["--threads", "0"], "--threads must be at least 1"),
                                          (["--backend", "torch", "--threads", "2"], "set OMP_NUM_THREADS")])
def test_app_py_refuses_bad_thread_settings_in_one_line(args, message, capsys):
    stderr = app_py_refusal(args, capsys)
    assert message in stderr and stderr.strip().count("\n") == 0


def test_the_banner_shows_the_continuous_batch(backend):
    app = demo_app.create_app(backend)
    banner = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "backend")
    assert f"continuous batching, up to {backend.pipeline.max_batch} rows" in banner.value


def int4_exports():
    """int4 comes with the tensor-by-tensor quantizer (export/quantize.py); until then its tests are skipped."""
    from export.writer.onnx_export import QUANTIZATIONS

    return pytest.mark.skipif("int4" not in QUANTIZATIONS, reason="the exporter does not make int4 exports yet")


@pytest.mark.parametrize("quantize", ["int8", pytest.param("int4", marks=int4_exports())])
def test_the_embedded_model_served_quantized_answers_and_says_so(quantize, tmp_path, monkeypatch):
    from export.writer.integrity import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    backend = load_backend(None, "onnx", quantize=quantize)
    assert backend.name == "onnx" and backend.fallback is None
    assert backend.pipeline.engine_factory.manifest["quantize"] == quantize
    assert f" {quantize} (" in backend.runtime and quantize in demo_app.banner(backend)
    image, entry = example("caption en")
    assert backend.pipeline.generate(read_image(str(image)), entry["prompt"], **SHORT).text.strip()


@pytest.mark.parametrize("args,env,message", [
    (["--quantize", "int3"], {}, "--quantize 'int3' is not one of int8, int4"),
    ([], {"PALIGEMMA_QUANTIZE": "fp4"}, "--quantize 'fp4' is not one of int8, int4"),
    (["--backend", "torch", "--quantize", "int8"], {}, "served by --backend onnx only"),
])
def test_app_py_refuses_a_bad_quantization_in_one_line(args, env, message, capsys, monkeypatch):
    stderr = app_py_refusal(args, capsys, env, monkeypatch)
    assert message in stderr, stderr
    assert stderr.strip().count("\n") == 0, stderr


def test_load_backend_refuses_a_quantized_torch_backend():
    with pytest.raises(ValueError, match="backend 'onnx' only"):
        load_backend(None, "torch", quantize="int8")
