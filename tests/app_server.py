"""The demo app served in-process on a free port, for the gradio_client and browser tests."""

from __future__ import annotations

import json
import socket
from contextlib import contextmanager
from pathlib import Path

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
