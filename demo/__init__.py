"""The Gradio demo: `create_app()` builds the page around a backend chosen by `load_backend()`."""

from .app import create_app, launch
from .backends import Backend, load_backend

__all__ = ["create_app", "launch", "Backend", "load_backend"]
