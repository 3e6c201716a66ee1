"""What a request sends, read and checked the same way by the page's handler (demo/app.py) and the JSON endpoint
(demo/api.py): its image (an upload, a data: URL or raw bytes, within MAX_UPLOAD_BYTES), its prompt, its decoding
values within LIMITS; each bad value is an InputError whose message says what was wrong and what to do. And
`release_memory`, called after each request, which hands the memory its image took back to the system."""

from __future__ import annotations

import base64
import binascii
import ctypes
import os
import random
import stat
from pathlib import Path

from gradio.utils import get_upload_folder as gradio_upload_folder
from PIL import Image

import paligemma
from paligemma.errors import shown
from paligemma.processor import load_image_and_size
from paligemma.sampling import MAX_NEW_TOKENS_LIMIT, real_number, whole_number

MAX_UPLOAD_BYTES = 10 * 2**20  # uploads, and images sent inline as data: URLs
UPLOAD_KEEP_S = 3600  # uploads and answers' images older than this are deleted (checked every 10 minutes)
MAX_PROMPT_CHARS = 1000
# name: (lowest, highest, whole number); the sliders use the same ranges, and the server checks them again.
# A segmentation of the embedded model's three shapes is about 70 tokens (four <loc>, sixteen <seg> and a label
# each): the default holds it whole. Greedy answers stop at <eos>, so a shorter answer costs nothing more.
DEFAULT_MAX_NEW_TOKENS = 96
# max_new_tokens is bounded by the model too (decoding_limits).
LIMITS = {
    "temperature": (0.0, 2.0, False),
    "top_p": (0.05, 1.0, False),
    "top_k": (0, 200, True),
    "max_new_tokens": (1, min(256, MAX_NEW_TOKENS_LIMIT), True),
    "seed": (0, 2**63 - 1, True),
}
DECODING = [("Greedy", "greedy"), ("Sample (temperature, top-k, top-p)", "sample")]


def read_request_image(value, input_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """The image a request sends, as upright RGB (decoded at reduced size for a model whose input side is
    `input_size`: paligemma.processor.load_image), and its upright size as sent; or InputError saying what is wrong.

    A request names its image, and names are never trusted: the image is read only from a file that Gradio itself
    received by upload (a path inside its upload folder, resolved, a regular file, within the upload limit) or from
    a `data:` URL within the same limit. Any other path, and any URL, is refused unopened, with one message whether
    or not it exists. The event runs without Gradio's preprocessing, which would open the file with Pillow first and
    fail on a corrupt file, an SVG or a decompression bomb without a message the user can read."""
    if value is None or value == "" or (isinstance(value, dict) and not value.get("path") and not value.get("url")):
        raise paligemma.InputError("no image: upload one, or pick an example below")
    if isinstance(value, dict):
        value = value.get("path") or value.get("url")
    if not isinstance(value, str):
        raise paligemma.InputError(f"the image must be an uploaded file, got {type(value).__name__}")
    if value.startswith("data:"):
        return read_image_and_size(data_url_bytes(value), input_size)
    if "://" in value or not os.path.isabs(value):
        raise paligemma.InputError(NOT_UPLOADED)
    return read_image_and_size(uploaded_file_bytes(value), input_size)


NOT_UPLOADED = ("the image is not a file uploaded to this server; upload it (the page, or gradio_client's "
                "handle_file): paths and URLs named in a request are never opened")


def uploaded_file_bytes(path: str) -> bytes:
    """The bytes of a file in Gradio's upload folder; InputError for anything else."""
    uploads = Path(gradio_upload_folder()).resolve()
    try:
        resolved = Path(os.path.realpath(path))
    except (ValueError, OSError):  # a NUL byte, a loop of links
        raise paligemma.InputError(NOT_UPLOADED) from None
    if resolved == uploads or not resolved.is_relative_to(uploads):
        raise paligemma.InputError(NOT_UPLOADED)
    try:
        # O_NONBLOCK: a FIFO or device never blocks the worker (it is refused below as not a regular file).
        descriptor = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise paligemma.InputError("the uploaded image is no longer on the server (uploads are kept for "
                                   f"{UPLOAD_KEEP_S // 60} minutes); upload it again") from None
    except OSError:
        raise paligemma.InputError(NOT_UPLOADED) from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):  # a folder, a FIFO, a device: checked before fdopen, which refuses a folder
        os.close(descriptor)
        raise paligemma.InputError(NOT_UPLOADED)
    with os.fdopen(descriptor, "rb") as file:
        if status.st_size > MAX_UPLOAD_BYTES:
            raise paligemma.InputError(too_large(status.st_size))
        return file.read(MAX_UPLOAD_BYTES + 1)


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 `data:` URL within the upload limit (checked before decoding)."""
    header, _, payload = url.partition(",")
    if len(payload) > 4 * (MAX_UPLOAD_BYTES // 3 + 1):
        raise paligemma.InputError(too_large(len(payload) * 3 // 4))
    if not header.endswith(";base64"):
        raise paligemma.InputError("the image data URL is not base64 (data:image/png;base64,...); "
                                   "upload the file instead")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise paligemma.InputError("the image data URL is not valid base64; upload the file instead") from None


def too_large(size: int) -> str:
    return (f"the image is {size / 2**20:.1f} MB, over this server's {MAX_UPLOAD_BYTES / 2**20:.0f} MB limit; "
            "send a smaller file")


def read_image(data, input_size: int | None = None) -> Image.Image:
    """An image from bytes (or a trusted local path: the shipped examples) as upright RGB, or InputError."""
    return read_image_and_size(data, input_size)[0]


def read_image_and_size(data, input_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """read_image, and the image's upright size as sent."""
    if is_svg(data):
        raise paligemma.InputError("SVG is a vector format the model cannot read; export it as PNG or JPEG first")
    return load_image_and_size(data, input_size)


def is_svg(value) -> bool:
    if isinstance(value, (bytes, bytearray)):
        return b"<svg" in bytes(value[:1024]).lower()
    path = Path(value)
    if path.suffix.lower() in (".svg", ".svgz"):
        return True
    try:
        with open(path, "rb") as file:
            return b"<svg" in file.read(1024).lower()
    except OSError:
        return False


def read_prompt(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise paligemma.InputError("the prompt is empty: type one, e.g. 'caption en', or pick a task")
    prompt = value.strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise paligemma.InputError(f"the prompt has {len(prompt)} characters; keep it under {MAX_PROMPT_CHARS}")
    return prompt


def decoding_limits(processor: paligemma.PaliGemmaProcessor, prompts) -> dict:
    """LIMITS, with max_new_tokens at most what the model's positions leave after the image and the longest of
    `prompts` (the task presets), so that every preset runs at the slider's end; a longer prompt typed in is refused
    with its own message."""
    low, high, whole = LIMITS["max_new_tokens"]
    longest = max(len(processor.prompt_ids(prompt)[0]) for prompt in prompts)
    room = processor.config.text.max_position_embeddings - longest
    return {**LIMITS, "max_new_tokens": (low, max(low, min(high, room)), whole)}


def read_number(name: str, value, limits: dict = LIMITS):
    low, high, whole = limits[name]
    kind = "a whole number" if whole else "a number"
    number = whole_number(value) if whole else None  # exact, however large
    if number is None:
        number = real_number(value)
        if number is None:
            raise paligemma.InputError(f"{name} must be {kind} from {low} to {high}, got {shown(value)}")
        if whole and not number.is_integer():
            raise paligemma.InputError(f"{name} must be a whole number, got {shown(value)}")
        number = int(number) if whole else number
    if not low <= number <= high:
        raise paligemma.InputError(f"{name}={shown(value)} is out of range: use {kind} from {low} to {high}")
    return number


def read_decoding(decoding, temperature, top_p, top_k, max_new_tokens, seed, limits: dict = LIMITS) -> dict:
    """The keyword arguments of Pipeline.stream, each value checked; a sampled run without a seed gets a random one
    so that it can be repeated (and checked against torch)."""
    if not isinstance(decoding, str) or decoding not in dict(DECODING).values():
        raise paligemma.InputError(f"decoding must be one of {', '.join(dict(DECODING).values())}, "
                                   f"got {shown(decoding)}")
    params = dict(
        do_sample=decoding == "sample",
        temperature=read_number("temperature", temperature, limits),
        top_p=read_number("top_p", top_p, limits),
        top_k=read_number("top_k", top_k, limits),
        max_new_tokens=read_number("max_new_tokens", max_new_tokens, limits),
        seed=None if seed is None or seed == "" else read_number("seed", seed, limits),
    )
    if params["do_sample"] and params["seed"] is None:
        params["seed"] = random.randrange(2**31)
    paligemma.SamplingParams(**params)  # the pipeline's own checks, so that they fail before any work is done
    return params


def release_memory() -> None:
    """Hand the memory a request freed back to the system. glibc keeps freed blocks of a few MB (an image's bands,
    its decoded frame once the mmap threshold has grown past it) in its heap, so the server's resident memory would
    stay at its peak after a burst of large images; malloc_trim returns them. Nothing elsewhere (another libc)."""
    if LIBC is not None:
        LIBC.malloc_trim(0)


def glibc():
    try:
        libc = ctypes.CDLL(None)  # the C library the process already runs on
        return libc if hasattr(libc, "malloc_trim") else None
    except (OSError, TypeError):  # no such handle (Windows)
        return None


LIBC = glibc()
