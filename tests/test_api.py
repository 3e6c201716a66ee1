"""The JSON endpoint beside the page, POST /api/answer (demo/api.py), on the app's own server (the `server` fixture):
answers as the pipeline gives them alone, boxes as paligemma.boxes makes them, concurrency through the one batch,
each bad input answered with its status and a one-line message, the busy bound, and a client who leaves."""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
from app_server import EXAMPLES, example, last_event, raw_call, request
from PIL import Image

import paligemma
from demo import api as demo_api
from demo.app import EXAMPLES_DIR
from demo.inputs import DEFAULT_MAX_NEW_TOKENS, MAX_UPLOAD_BYTES, read_image
from paligemma.boxes import answer_boxes

pytestmark = pytest.mark.skipif(not (paligemma.DEMO_CHECKPOINT / "config.json").exists(),
                                reason="the embedded demo checkpoint is not in the tree yet")


@pytest.fixture(scope="module")
def url(server):
    return server[1] + "api/answer"


@pytest.fixture(scope="module")
def api(server):
    return server[0].answer_api


def post(url, file: bytes | None, timeout: float = 120, **fields) -> httpx.Response:
    """A POST of `file` as the form's image (None: no file) and `fields` as its text fields."""
    files = None if file is None else {"image": ("scene.png", file, "image/png")}
    return httpx.post(url, files=files, data={k: str(v) for k, v in fields.items()}, timeout=timeout)


def scene(entry) -> bytes:
    return (EXAMPLES_DIR / entry["file"]).read_bytes()


@contextmanager
def prefills_held(batcher):
    """Holds the batcher's own prefill lock, so that no request gets past its prefill, until the `let_go()` this
    yields is called (or the block ends)."""
    batcher.prefilling.acquire()
    held = [True]

    def let_go():
        if held.pop() if held else False:
            batcher.prefilling.release()

    try:
        yield let_go
    finally:
        let_go()


def wait_for(condition, timeout: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("prompt_start", ["caption en", "detect", "segment", "answer en"])
def test_answers_are_the_pipelines_and_boxes_are_paligemmas(url, backend, prompt_start):
    path, entry = example(prompt_start)
    response = post(url, path.read_bytes(), prompt=entry["prompt"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert set(answer) == {"text", "token_ids", "boxes", "seed", "timings"}
    solo = backend.pipeline.generate(read_image(str(path)), entry["prompt"], max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    assert answer["token_ids"] == solo.token_ids and answer["text"] == solo.text
    with Image.open(path) as sent:
        expected = answer_boxes(solo.text, sent.size, backend.pipeline.mask_decoder)
    assert answer["boxes"] == expected
    if prompt_start in ("detect", "segment"):
        assert [b["label"] for b in answer["boxes"]] == [s["shape"] for s in entry["shapes"]
                                                         if s["shape"] in ("circle", "triangle")]
        assert all(("mask" in b) == (prompt_start == "segment") for b in answer["boxes"])
    timings = answer["timings"]
    assert 0 < timings["ttft_s"] <= timings["total_s"]
    assert (timings["decode_tokens_per_s"] > 0) == (len(solo.token_ids) > 1)  # a rate needs two tokens
    assert answer["seed"] is None  # greedy


def test_a_seeded_sampled_answer_is_the_pipelines_and_names_its_seed(url, backend):
    path, _ = example("caption en")
    settings = dict(decoding="sample", temperature=1.5, top_p=0.95, top_k=20, seed=7, max_new_tokens=16)
    answer = post(url, path.read_bytes(), prompt="caption en", **settings).json()
    solo = backend.pipeline.generate(read_image(str(path)), "caption en", do_sample=True, temperature=1.5, top_p=0.95,
                                     top_k=20, seed=7, max_new_tokens=16)
    assert answer["token_ids"] == solo.token_ids and answer["seed"] == 7
    unseeded = post(url, path.read_bytes(), prompt="caption en", decoding="sample", max_new_tokens=4).json()
    assert isinstance(unseeded["seed"], int)  # chosen by the server, so that the answer can be asked for again


def test_sixteen_concurrent_clients_get_their_solo_answers(url, backend):
    prompts = ["caption en", "detect circle ; triangle", "answer en how many shapes are there?",
               "segment circle ; triangle"]
    jobs = [(EXAMPLES[i % len(EXAMPLES)], prompts[i % len(prompts)], 6 + 5 * i) for i in range(16)]
    solo = [backend.pipeline.generate(read_image(str(EXAMPLES_DIR / entry["file"])), prompt,
                                      max_new_tokens=budget).token_ids for entry, prompt, budget in jobs]

    def run(job):
        entry, prompt, budget = job
        return post(url, scene(entry), prompt=prompt, max_new_tokens=budget)

    backend.pipeline.batcher.largest_batch = 0
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(run, jobs))
    assert [r.status_code for r in responses] == [200] * 16
    assert [r.json()["token_ids"] for r in responses] == solo
    assert backend.pipeline.batcher.largest_batch > 1  # they decoded together


# ---- bad input: a 4xx and a one-line message, never a traceback; the server keeps answering -----------------------

SCENE = (EXAMPLES_DIR / EXAMPLES[0]["file"]).read_bytes()
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
BAD = {  # name: (image bytes or None, form fields, status, message)
    "not an image": (b"not an image at all\n" * 10, {"prompt": "caption en"}, 400, "not an image"),
    "svg": (SVG, {"prompt": "caption en"}, 400, "SVG"),
    "truncated": (SCENE[: len(SCENE) // 3], {"prompt": "caption en"}, 400, "corrupt or truncated"),
    "no image field": (None, {"prompt": "caption en"}, 400, "no image: send the image file as the field 'image'"),
    "image as text": (None, {"prompt": "caption en", "image": "scene.png"}, 400, "the image must be a file"),
    "no prompt": (SCENE, {}, 400, "the prompt is empty"),
    "empty prompt": (SCENE, {"prompt": "  "}, 400, "the prompt is empty"),
    "long prompt": (SCENE, {"prompt": "a" * 1001}, 400, "keep it under 1000"),
    "reserved token": (SCENE, {"prompt": "caption <image> en"}, 400, "reserved token"),
    "over the positions": (SCENE, {"prompt": "caption en " + "circle " * 130}, 400,
                           "exceeds the model's 256 positions"),
    "max_new_tokens 0": (SCENE, {"prompt": "caption en", "max_new_tokens": "0"}, 400,
                         "max_new_tokens=0 is out of range"),
    "max_new_tokens text": (SCENE, {"prompt": "caption en", "max_new_tokens": "many"}, 400,
                            "max_new_tokens must be a whole number"),
    "max_new_tokens 10.5": (SCENE, {"prompt": "caption en", "max_new_tokens": "10.5"}, 400,
                            "max_new_tokens must be a whole number"),
    "max_new_tokens 1e400": (SCENE, {"prompt": "caption en", "max_new_tokens": "1e400"}, 400, "got '1e400'"),
    "temperature": (SCENE, {"prompt": "caption en", "temperature": "hot"}, 400, "temperature must be a number"),
    "top_p": (SCENE, {"prompt": "caption en", "top_p": "1.5"}, 400, "top_p=1.5 is out of range"),
    "decoding": (SCENE, {"prompt": "caption en", "decoding": "beam"}, 400, "decoding must be one of greedy, sample"),
    "seed": (SCENE, {"prompt": "caption en", "seed": "-1"}, 400, "seed=-1 is out of range"),
    "unknown field": (SCENE, {"prompt": "caption en", "max_tokens": "8"}, 400, "unknown field 'max_tokens'"),
}


def assert_refused(response: httpx.Response, status: int, message: str):
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert re.search(re.escape(message), detail, re.IGNORECASE), detail
    assert "\n" not in detail and "Traceback" not in response.text and 'File "' not in response.text


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_its_status_and_a_message(url, name):
    image, fields, status, message = BAD[name]
    assert_refused(post(url, image, **fields), status, message)


def test_a_second_file_or_a_repeated_field_is_refused(url):
    files = [("image", ("a.png", SCENE, "image/png")), ("image", ("b.png", SCENE, "image/png"))]
    assert_refused(httpx.post(url, files=files, data={"prompt": "caption en"}), 400, "maximum number of files is 1")
    response = httpx.post(url, files={"image": ("a.png", SCENE)}, data={"prompt": ["caption en", "detect circle"]})
    assert_refused(response, 400, "the field 'prompt' is sent more than once")


def test_an_upload_over_the_limit_is_refused_by_the_request_limits(url):
    # Over the body's limit: refused by the middleware from its declared length, before the body is read.
    assert_refused(post(url, b"\0" * (MAX_UPLOAD_BYTES + 2**20), prompt="caption en"), 413,
                   "over this server's limit")
    # Within the body's slack but over the file's limit: refused by the endpoint with the image's size.
    assert_refused(post(url, b"\0" * (MAX_UPLOAD_BYTES + 1000), prompt="caption en"), 413, "over this server's 10 MB")


def test_a_body_over_the_limit_without_a_length_is_cut_off(url):
    def chunks():  # streamed: no Content-Length, so the limits count what arrives
        head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        yield head
        for _ in range(12):
            yield b"\0" * 2**20

    response = httpx.post(url, content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"},
                          timeout=120)
    assert_refused(response, 413, "over this server's limit")


def test_a_server_error_is_a_generic_500_and_the_server_keeps_answering(url, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the server")

    monkeypatch.setattr(demo_api, "answer_boxes", broken)
    response = post(url, SCENE, prompt="caption en", max_new_tokens=4)
    assert_refused(response, 500, "generation failed on the server (details are in its log)")
    assert "a bug" not in response.text
    monkeypatch.undo()
    assert post(url, SCENE, prompt="caption en", max_new_tokens=4).status_code == 200


# ---- the bound and a client who leaves, seen through the batch's own state ----------------------------------------


def test_more_requests_than_rows_and_queue_get_busy_then_all_are_answered(url, api, backend):
    """With the prefill held (the batcher's own lock: no request can get past its prefill), rows + MAX_QUEUE requests
    are taken in and wait; one more is answered 503 at once. Once the prefill is let go, every waiting one is
    answered."""
    batcher = backend.pipeline.batcher
    with prefills_held(batcher) as let_go, ThreadPoolExecutor(api.capacity) as pool:
        futures = [pool.submit(post, url, SCENE, prompt="caption en", max_new_tokens=1) for _ in range(api.capacity)]
        wait_for(lambda: api.in_flight == api.capacity, what="every request taken in")
        busy = post(url, SCENE, prompt="caption en", max_new_tokens=1, timeout=10)
        assert_refused(busy, 503, "the server is busy")
        assert busy.headers["retry-after"] == "1"
        let_go()
        responses = [f.result(timeout=120) for f in futures]
    assert [r.status_code for r in responses] == [200] * api.capacity
    wait_for(lambda: api.in_flight == 0 and batcher.scheduler.taken == 0, what="every row given back")


def raw_request(url: str, **fields) -> tuple[socket.socket, bytes]:
    """A connected socket and the bytes of a POST of SCENE with `fields`, for a client that leaves mid-request."""
    built = httpx.Request("POST", url, files={"image": ("scene.png", SCENE, "image/png")},
                          data={k: str(v) for k, v in fields.items()})
    body = built.read()
    parts = urlsplit(url)
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}",
            f"Content-Type: {built.headers['content-type']}", f"Content-Length: {len(body)}", "", ""]
    return socket.create_connection((parts.hostname, parts.port)), "\r\n".join(head).encode() + body


def test_a_client_who_leaves_frees_its_row_and_changes_no_other_answer(url, api, backend):
    """A leaves while its request is taken in (its row admitted, its prefill held by the batcher's lock); B waits
    behind it. Once the prefill is let go, A's row leaves at the batch's next step without being decoded (the steps
    run are B's, not A's ~40-token segmentation), and B's answer is its answer alone."""
    batcher = backend.pipeline.batcher
    a_path, a_entry = example("segment circle ; triangle")
    b_path, b_entry = example("caption en")
    a_solo = backend.pipeline.generate(read_image(str(a_path)), a_entry["prompt"],
                                       max_new_tokens=DEFAULT_MAX_NEW_TOKENS).token_ids
    b_solo = backend.pipeline.generate(read_image(str(b_path)), b_entry["prompt"],
                                       max_new_tokens=DEFAULT_MAX_NEW_TOKENS).token_ids
    assert len(a_solo) > len(b_solo) + 10  # so that A's steps, had it run, would show
    left_before = api.disconnects
    b_result = {}
    with prefills_held(batcher) as let_go:
        connection, data = raw_request(url, prompt=a_entry["prompt"])
        with connection:
            connection.sendall(data)
            wait_for(lambda: api.in_flight == 1 and batcher.scheduler.taken == 1, what="A admitted")
            b = threading.Thread(target=lambda: b_result.update(r=post(url, b_path.read_bytes(),
                                                                       prompt=b_entry["prompt"])))
            b.start()
            wait_for(lambda: api.in_flight == 2, what="B taken in")
        wait_for(lambda: api.disconnects == left_before + 1, what="A's disconnect seen")
        steps = batcher.steps
        let_go()
        b.join(120)
    assert b_result["r"].status_code == 200 and b_result["r"].json()["token_ids"] == b_solo
    wait_for(lambda: api.in_flight == 0 and batcher.scheduler.taken == 0, what="A's row given back")
    assert batcher.scheduler.running == [] and not batcher.scheduler.waiting
    assert batcher.steps - steps <= len(b_solo)  # B's steps only: A's row never decoded



def test_the_load_benchmark_drives_the_endpoint(server, backend):
    """bench/load.py's `api` target: its record of one request holds the answer and times in order."""
    from bench.load import api_send_factory

    path, entry = example("caption en")
    send = api_send_factory(server[1], [path.read_bytes()])
    record = send(dict(scene=0, prompt="caption en", max_new_tokens=8))
    solo = backend.pipeline.generate(read_image(str(path)), "caption en", max_new_tokens=8)
    assert record["answer"] == solo.text and record["tokens"] == len(solo.token_ids)
    assert record["start_s"] < record["first_s"] < record["end_s"]


def test_images_wait_for_a_decode_slot_shared_by_the_page_and_the_endpoint(server, url, api, backend):
    """An image may take up to DECODE_BUDGET to decode, and the endpoint takes in more requests than the page runs:
    at most `rows` images are decoded at once, the page's and the endpoint's together. With every slot held, neither
    a page request nor an endpoint request gets to the batch; let go, both are answered."""
    rows = api.rows
    assert all(api.decodes.acquire(blocking=False) for _ in range(rows))
    held = rows
    try:
        assert not api.decodes.acquire(blocking=False)  # rows slots, every one now held
        page_image = {"url": "data:image/png;base64," + base64.b64encode(SCENE).decode(),
                      "meta": {"_type": "gradio.FileData"}}
        done = {}
        calls = [threading.Thread(target=lambda: done.update(api=post(url, SCENE, prompt="caption en",
                                                                          max_new_tokens=4))),
                 threading.Thread(target=lambda: done.update(page=raw_call(server[1], request(page_image))))]
        for call in calls:
            call.start()
        wait_for(lambda: api.in_flight == 1, what="the endpoint's request taken in")
        time.sleep(1.0)  # time enough for either to be answered, were it not waiting
        assert done == {} and backend.pipeline.batcher.scheduler.taken == 0
        for _ in range(rows):
            api.decodes.release()
            held -= 1
        for call in calls:
            call.join(120)
    finally:
        for _ in range(held):
            api.decodes.release()
    assert done["api"].status_code == 200
    assert last_event(done["page"])[0] == "complete"
