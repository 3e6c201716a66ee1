"""The served app never opens a server path or URL that a request names: raw HTTP requests against a running
`python app.py`, as any client on the network could send them. An image reaches the model only as a file Gradio
received by upload, or as a data: URL within the upload limit."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
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
def app_process(tmp_path_factory):
    """`python app.py` on a free port, with its own Gradio upload folder and its log in a file; yields (process, url,
    upload folder, log path)."""
    uploads = tmp_path_factory.mktemp("gradio_uploads")
    log = uploads.parent / f"{uploads.name}.log"
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(uploads)}
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                                   env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url + "gradio_api/info", timeout=5).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"app.py did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    try:
        yield process, url, uploads, log
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def app_py(app_process):
    """(url, upload folder) of the running app.py."""
    _, url, uploads, _ = app_process
    return url, uploads


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
    status, body = post(url, "gradio_api/call/generate", {"data": request({"path": data_url})})
    assert status == 413 and b"10 MB" in body  # refused as it arrives (demo/limits.py)
    just_over = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(demo_app.MAX_UPLOAD_BYTES)).decode()
    assert_refused(raw_call(url, request({"path": just_over})), "over this server's 10 MB limit")  # by the handler
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



# Second round: no route around the queue; memory, disk and error text bounded per request.

def post(url: str, path: str, body, content_type: str = "application/json", timeout: float = 60) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mb(pid: int) -> float:
    return status_kb(pid, "VmRSS") / 1024


def uploaded_files(uploads: Path) -> set[Path]:
    return {path for path in uploads.rglob("*") if path.is_file()}


def generate_fn_index(url: str) -> int:
    config = json.loads(urllib.request.urlopen(url + "config", timeout=30).read())
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == "generate")


def test_the_run_and_api_routes_do_not_run_the_model_outside_the_queue(app_py, expected, server_image):
    url, _ = app_py
    image, _ = example("caption en")
    for route in ("gradio_api/run/generate", "gradio_api/api/generate", "gradio_api/run/generate/"):
        status, body = post(url, route, {"data": request(uploaded(url, image))})
        assert status == 404 and b"join the queue" in body, (route, status, body[:300])
        assert b"ONNX Runtime" not in body and b"generating" not in body  # the handler never ran
    assert_still_answers(url, expected)


def test_a_five_megabyte_session_hash_is_refused_and_holds_no_memory(app_process, expected):
    process, url, _, _ = app_process
    image, _ = example("caption en")
    data = request(uploaded(url, image))
    fn_index = generate_fn_index(url)
    before = rss_mb(process.pid)
    for i in range(20):
        session_hash = f"{i:04d}" + "x" * (5 * 2**20)
        status, body = post(url, "gradio_api/queue/join", {"data": data, "fn_index": fn_index,
                                                         "session_hash": session_hash})
        assert status in (413, 422) and len(body) < 300 and b"xxxx" not in body, (status, body[:300])
    status, _ = post(url, "gradio_api/queue/join", {"data": data, "fn_index": fn_index, "session_hash": "x" * 65})
    assert status == 422
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "gradio_api/queue/data?session_hash=" + "x" * 1000, timeout=30)
    assert refused.value.code == 422
    assert rss_mb(process.pid) - before < 30  # 20 x 5 MB were not kept
    assert_still_answers(url, expected)


def test_an_unknown_event_or_too_few_values_get_a_short_message(app_process, expected):
    process, url, _, log = app_process
    image, _ = example("caption en")
    data = request(uploaded(url, image))
    logged = log.stat().st_size
    status, body = post(url, "gradio_api/queue/join", {"data": data, "fn_index": 999, "session_hash": "abc"})
    assert status == 422 and b"fn_index" in body
    for route, body_json in (("gradio_api/queue/join", {"data": data[:2], "fn_index": generate_fn_index(url),
                                                         "session_hash": "abcd"}),
                             ("gradio_api/call/generate", {"data": data[:2]})):
        status, body = post(url, route, body_json)
        assert status == 422 and b"takes 9 values" in body and b"object at 0x" not in body, body[:300]
    assert "Traceback" not in log.read_text()[logged:]
    assert_still_answers(url, expected)


def test_a_megabyte_path_is_not_echoed_into_the_answer_or_the_log(app_process, expected):
    process, url, _, log = app_process
    logged = log.stat().st_size
    long = "/" + "a" * 1_000_000
    for image in ({"path": long}, {"path": long, "meta": {"_type": "gradio.FileData"}},
                  {"url": "http://example" + long}):
        status, body = post(url, "gradio_api/call/generate", {"data": request(image)})
        assert status == 413 and len(body) < 300, body[:300]
    assert log.stat().st_size - logged < 10_000
    assert_still_answers(url, expected)


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wait_for(condition, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


def test_an_aborted_upload_leaves_no_file(app_py, expected):
    url, uploads = app_py
    before = uploaded_files(uploads)
    body, content_type = multipart([("scene.png", os.urandom(9 * 2**20) + os.urandom(2**20))])
    host, port = urllib.parse.urlsplit(url).netloc.split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n".encode())
        connection.sendall(body[: 9 * 2**20])  # then the client goes away
        time.sleep(1)
    assert wait_for(lambda: uploaded_files(uploads) == before), uploaded_files(uploads) - before
    assert_still_answers(url, expected)


@pytest.mark.parametrize("parts", [
    [("..", os.urandom(2 * 2**20))] * 3,  # Gradio refuses the name after writing every part
    [("..", os.urandom(2 * 2**20))],
    [(f"scene_{i}.png", os.urandom(9 * 2**20)) for i in range(20)],  # 180 MB in one request
    [("a.png", b"\x89PNG"), ("b.png", b"\x89PNG")],  # more than one file, however small
], ids=["three parts named ..", "one part named ..", "20 files of 9 MB", "two small files"])
def test_a_refused_upload_leaves_no_file(app_py, expected, parts):
    url, uploads = app_py
    before = uploaded_files(uploads)
    folders = {p for p in uploads.iterdir() if p.is_dir()}
    body, content_type = multipart(parts)
    status, answer = post(url, "gradio_api/upload", body, content_type)
    assert status in (400, 413) and len(answer) < 300, (status, answer[:300])
    assert wait_for(lambda: uploaded_files(uploads) == before), uploaded_files(uploads) - before
    # no empty folder left either (the sweep after a failed upload runs in the event loop, a moment later)
    assert wait_for(lambda: {p for p in uploads.iterdir() if p.is_dir()} == folders), \
        {p for p in uploads.iterdir() if p.is_dir()} - folders
    assert_still_answers(url, expected)


def test_a_full_upload_folder_refuses_uploads_with_a_message(app_py, expected):
    url, uploads = app_py
    filler = uploads / "filler.bin"
    with open(filler, "wb") as file:
        file.truncate(4 * 2**30)  # sparse: takes no disk, counts at its size
    try:
        time.sleep(1.2)  # the folder's size is measured at most once a second
        body, content_type = multipart([("scene.png", b"\x89PNG\r\n")])
        status, answer = post(url, "gradio_api/upload", body, content_type)
        assert status == 507 and b"upload space is full" in answer
    finally:
        filler.unlink()
    time.sleep(1.2)
    assert_still_answers(url, expected)


def test_an_eps_file_is_refused_naming_the_formats_read(app_py, expected):
    url, _ = app_py
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
    events = raw_call(url, request({"path": raw_upload(url, "scene.eps", eps), "meta": {"_type": "gradio.FileData"}}))
    assert_refused(events, "PNG, JPEG, WEBP, GIF, BMP, TIFF")
    assert_still_answers(url, expected)


def test_a_folder_inside_the_upload_folder_gets_the_message_of_any_non_file(app_process, expected):
    _, url, uploads, log = app_process
    folder = uploads / "a_folder"
    folder.mkdir()
    logged = log.stat().st_size
    assert_refused(raw_call(url, request({"path": str(folder)})), NOT_UPLOADED)
    assert "IsADirectoryError" not in log.read_text()[logged:]
    assert_still_answers(url, expected)


def test_monitoring_is_off(app_py, expected):
    url, _ = app_py
    for route in ("monitoring/summary", "monitoring"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + route, timeout=30)
        assert refused.value.code == 403
    assert_still_answers(url, expected)


@pytest.fixture(scope="module")
def big_png(tmp_path_factory) -> Path:
    """A 7990 x 7990 16-bit gray PNG of 0.14 MB: just under the 64-megapixel limit, 128 MB once decoded."""
    path = tmp_path_factory.mktemp("big") / "big16.png"
    row = (np.arange(7990, dtype=np.uint32) * 65535 // 7989).astype(np.uint16)
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (7990, 7990)))).save(path, compress_level=9)
    return path


def test_the_big_sixteen_bit_png_costs_at_most_300_mb_and_memory_returns_after_a_burst(app_process, expected,
                                                                                       big_png):
    process, url, _, _ = app_process
    assert_still_answers(url, expected)  # warm
    idle = rss_mb(process.pid)
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # VmHWM from now on
    kind, data = last_event(raw_call(url, request(uploaded(url, big_png))))
    assert kind == "complete" and data[0], data
    peak = status_kb(process.pid, "VmHWM") / 1024 - idle
    assert peak <= 300, f"{peak:.0f} MB above the idle app"
    with ThreadPoolExecutor(4) as pool:  # a burst: the queue runs as many at once as it allows
        answers = list(pool.map(lambda _: last_event(raw_call(url, request(uploaded(url, big_png)), timeout=300)),
                                range(4)))
    assert all(kind == "complete" for kind, _ in answers)
    assert wait_for(lambda: rss_mb(process.pid) - idle <= 100, 5), f"{rss_mb(process.pid) - idle:.0f} MB above idle"
    assert_still_answers(url, expected)
