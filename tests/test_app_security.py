"""The served app never opens a server path or URL that a request names: raw HTTP requests against a running
`python app.py`, as any client on the network could send them. An image reaches the model only as a file Gradio
received by upload, or as a data: URL within the upload limit."""

from __future__ import annotations

import base64
import http.server
import io
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from app_server import EXAMPLES, example, free_port, last_event, raw_call, raw_upload, request
from PIL import Image

import paligemma
from demo import app as demo_app
from export.threads import available_cores

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (paligemma.DEMO_CHECKPOINT / "config.json").exists(),
                                reason="the embedded demo checkpoint is not in the tree yet")
NOT_UPLOADED = "not a file uploaded to this server"


@pytest.fixture(scope="module")
def app_py(tmp_path_factory):
    """`python app.py` on a free port, with its own Gradio upload folder; yields (url, upload folder)."""
    uploads = tmp_path_factory.mktemp("gradio_uploads")
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(uploads)}
    process = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url + "gradio_api/info", timeout=5).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"app.py did not start: {process.stdout.read().decode()[-2000:]}")
            time.sleep(0.5)
    try:
        yield url, uploads
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def server_image(tmp_path_factory) -> Path:
    """An image on the server's disk, outside the upload folder: what an attacker would try to read."""
    path = tmp_path_factory.mktemp("private") / "secret.png"
    Image.open(demo_app.EXAMPLES_DIR / EXAMPLES[0]["file"]).save(path)
    return path


@pytest.fixture(scope="module")
def expected(app_py):
    """The answer for the first example, uploaded as the page uploads it (the control every refusal is set against)."""
    url, _ = app_py
    image, _ = example("caption en")
    kind, data = last_event(raw_call(url, request(uploaded(url, image))))
    assert kind == "complete", data
    return data[0]


def uploaded(url: str, image: Path) -> dict:
    return {"path": raw_upload(url, image.name, image.read_bytes()), "meta": {"_type": "gradio.FileData"}}


def assert_refused(events: str, message: str):
    kind, data = last_event(events)
    assert kind == "error", data
    assert message in data["error"] and "Traceback" not in events
    assert "/gradio_api/file=" not in events  # no file of the server was served back


def assert_still_answers(url: str, expected: str):
    image, _ = example("caption en")
    kind, data = last_event(raw_call(url, request(uploaded(url, image))))
    assert (kind, data[0]) == ("complete", expected)


def test_an_uploaded_image_is_answered(app_py, expected):
    assert expected  # the fixture sent it as raw HTTP: upload, then the call naming the upload


@pytest.mark.parametrize("shape", ["path", "url", "path with meta"])
def test_a_server_path_named_in_the_request_is_not_read(app_py, server_image, shape):
    url, _ = app_py
    image = {"path": {"path": str(server_image)}, "url": {"url": str(server_image)},
             "path with meta": {"path": str(server_image), "meta": {"_type": "gradio.FileData"}}}[shape]
    events = raw_call(url, request(image))
    if shape == "path with meta":  # Gradio's own check refuses it before the handler runs
        assert "event: error" in events and "/gradio_api/file=" not in events
    else:
        assert_refused(events, NOT_UPLOADED)


def test_a_path_that_climbs_out_of_the_upload_folder_is_not_read(app_py, server_image):
    url, uploads = app_py
    climbing = str(uploads) + "/../" * len(uploads.parts) + str(server_image).lstrip("/")
    assert Path(os.path.realpath(climbing)) == server_image.resolve()
    assert_refused(raw_call(url, request({"path": climbing})), NOT_UPLOADED)


def test_a_link_inside_the_upload_folder_to_a_server_file_is_not_followed(app_py, server_image):
    url, uploads = app_py
    link = uploads / "link.png"
    link.symlink_to(server_image)
    assert_refused(raw_call(url, request({"path": str(link)})), NOT_UPLOADED)


def test_whether_a_path_exists_is_not_told(app_py, server_image, tmp_path):
    url, _ = app_py
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    answers = {last_event(raw_call(url, request({"path": str(p)})))[1]["error"]
               for p in (server_image, text, tmp_path / "nothing.png", tmp_path)}
    assert len(answers) == 1 and NOT_UPLOADED in answers.pop()


def test_a_remote_url_is_never_fetched(app_py):
    hits = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    listener = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    try:
        url, _ = app_py
        address = f"http://127.0.0.1:{listener.server_port}/image.png"
        for image in ({"url": address}, {"path": address}, {"url": address, "meta": {"_type": "gradio.FileData"}}):
            events = raw_call(url, request(image))
            assert "event: error" in events and "Traceback" not in events
    finally:
        listener.shutdown()
    assert hits == []


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_data_url_within_the_upload_limit_is_answered(app_py, expected):
    url, _ = app_py
    image, _ = example("caption en")
    kind, data = last_event(raw_call(url, request({"path": png_data_url(Image.open(image))})))
    assert (kind, data[0]) == ("complete", expected)


def test_a_data_url_over_the_upload_limit_is_refused_before_decoding(app_py, expected):
    url, _ = app_py
    noise = Image.frombytes("RGB", (2400, 2400), os.urandom(2400 * 2400 * 3))  # ~17 MB as PNG
    data_url = png_data_url(noise)
    assert len(data_url) * 3 // 4 > demo_app.MAX_UPLOAD_BYTES
    assert_refused(raw_call(url, request({"path": data_url})), "over this server's 10 MB limit")
    assert_still_answers(url, expected)


def test_fifos_sent_as_many_times_as_requests_run_at_once_leave_no_worker_stuck(app_py, expected, tmp_path):
    url, uploads = app_py
    fifo = uploads / "stuck.png"  # inside the upload folder: the strongest case, a FIFO no reader may block on
    os.mkfifo(fifo)
    paths = [str(fifo), "/proc/self/fd/0", str(tmp_path)]
    count = 2 * available_cores()  # the embedded model runs one request per core at once (export/threads.py)
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda i: raw_call(url, request({"path": paths[i % len(paths)]}), timeout=300),
                                range(count)))
    for events in answers:
        assert_refused(events, NOT_UPLOADED)
    assert_still_answers(url, expected)


def test_uploads_are_deleted_once_old(tmp_path):
    """The app's cache cleanup removes uploads (rejected ones too), so a public Space cannot be filled."""
    from app_server import serve

    from demo.backends import load_backend

    backend = load_backend(None, "onnx", warm_up=False)
    with serve(backend, delete_cache=(1, 1)) as (_, url):
        path = Path(raw_upload(url, "notes.txt", b"not an image\n" * 1000))
        assert path.is_file()
        assert "event: error" in raw_call(url, request({"path": str(path)}))
        deadline = time.monotonic() + 60
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not path.exists()


def test_the_page_explains_an_expired_upload(app_py, tmp_path):
    url, uploads = app_py
    gone = uploads / "expired" / "scene.png"
    assert_refused(raw_call(url, request({"path": str(gone)})), "no longer on the server")

