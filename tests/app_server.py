"""The demo app served in-process on a free port, for the gradio_client and browser tests."""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from demo import create_app, launch
from demo.app import EXAMPLES_DIR

EXAMPLES = json.loads((EXAMPLES_DIR / "examples.json").read_text())


def example(prompt_start: str) -> tuple[Path, dict]:
    """The first shipped example whose prompt starts with `prompt_start`: its image path and manifest entry."""
    entry = next(e for e in EXAMPLES if e["prompt"].startswith(prompt_start))
    return EXAMPLES_DIR / entry["file"], entry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(backend, **create_kwargs):
    """Yields (app, url) while the app for `backend` is served on 127.0.0.1."""
    app = create_app(backend, **create_kwargs)
    port = free_port()
    launch(app, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def request(image, prompt="caption en", max_new_tokens=8) -> list:
    """The generate endpoint's nine inputs as a raw API call sends them: `image` (a FileData dict), `prompt`, and
    greedy decoding of `max_new_tokens`."""
    return [image, prompt, "greedy", 1.0, 0.9, 0, max_new_tokens, 0, False]


def raw_call(url: str, data: list, timeout: float = 120) -> str:
    """POST to the generate endpoint without gradio_client (as any HTTP client can) and return the event stream."""
    request = urllib.request.Request(url + "gradio_api/call/generate", json.dumps({"data": data}).encode(),
                                     {"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(request, timeout=timeout).read())["event_id"]
    return urllib.request.urlopen(f"{url}gradio_api/call/generate/{event}", timeout=timeout).read().decode()


def raw_upload(url: str, name: str, data: bytes, timeout: float = 60) -> str:
    """POST a file to Gradio's upload route as a browser does (multipart form); returns the server's path for it."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    (path,) = json.loads(urllib.request.urlopen(request, timeout=timeout).read())
    return path


def last_event(events: str) -> tuple[str, object]:
    """The kind ("complete" or "error") and data of an event stream's last event."""
    kind = [line[len("event: "):] for line in events.splitlines() if line.startswith("event: ")][-1]
    data = [line[len("data: "):] for line in events.splitlines() if line.startswith("data: ")][-1]
    return kind, json.loads(data)


def rle_decode(rle) -> np.ndarray:
    """COCO's uncompressed RLE read back as its format says: alternating 0 and 1 runs, column-major."""
    height, width = rle["size"]
    flat = np.zeros(height * width, dtype=bool)
    position, value = 0, False
    for count in rle["counts"]:
        flat[position:position + count] = value
        position, value = position + count, not value
    assert position == height * width
    return flat.reshape((width, height)).T
