"""The demo page: an image and a prompt in, the answer streaming out, detected boxes drawn on the image, timings and
the runtime shown, and an optional check against eager torch. `create_app()` builds it; `launch()` serves it.

API (gradio_client): `generate` takes (image, prompt, decoding, temperature, top_p, top_k, max_new_tokens, seed,
check_torch), every input after the prompt with a default, and returns (answer, annotated image, boxes,
timings, torch check). Boxes: [{"label", "box": [x0, y0, x1, y1] pixels}], with "mask" (COCO RLE: paligemma.boxes) on a
segmentation's entry when the model ships a mask decoder. The server validates every value itself; a bad one is
answered with a message, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import json
import logging
import os
import random
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder as gradio_upload_folder
from PIL import Image
from starlette.middleware import Middleware

import paligemma
from paligemma.boxes import box_entry, found_objects
from paligemma.errors import shown
from paligemma.processor import load_image_and_size
from paligemma.sampling import MAX_NEW_TOKENS_LIMIT, real_number, whole_number

from .backends import Backend, TorchCheck, check_against_torch, load_backend
from .draw import draw_detections
from .limits import UPLOAD_FOLDER_BYTES, RequestLimits
from .run_ahead import run_ahead

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).parent / "examples"
MAX_UPLOAD_BYTES = 10 * 2**20  # uploads, and images sent inline as data: URLs
UPLOAD_KEEP_S = 3600  # uploads and answers' images older than this are deleted (checked every 10 minutes)
MAX_PROMPT_CHARS = 1000
MAX_QUEUE = 32  # at most this many wait; more are turned away with "queue full"
# The page gets at most one streamed update per this many seconds (the newest text; the last always at once): a
# reader sees no difference, and each update is a message Gradio builds and sends (docs/serving.md).
UPDATE_INTERVAL_S = 0.05
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
PRESETS_DEMO = {
    "Caption": "caption en",
    "Count": "answer en how many shapes are there?",
    "Detect": "detect circle ; triangle",
    "Segment": "segment circle ; triangle",
}
PRESETS = {
    "Caption": "caption en",
    "Answer": "answer en what is in the image?",
    "Detect": "detect person ; car",
    "Segment": "segment person ; car",
}


def task_presets(backend: Backend) -> dict:
    """The task buttons for `backend`'s model; Segment only where the model ships a mask decoder to draw with."""
    presets = PRESETS_DEMO if backend.is_demo_model else PRESETS
    if backend.pipeline.mask_decoder is None:
        presets = {name: prompt for name, prompt in presets.items() if name != "Segment"}
    return presets


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


def staged_png(image: Image.Image, staging: Path) -> Path:
    """`image` written as a PNG of its own for one answer, for Gradio to copy into its cache.

    Why not hand Gradio the PIL image: it writes each image to a path named by the image's hash, truncating and
    rewriting the file in place, so two requests with the same answer rewrite the file one of them is being served
    (the client received a truncated image). A file path it copies under a temporary name and renames instead."""
    path = Path(tempfile.mkdtemp(dir=staging)) / "detections.png"
    image.save(path, format="PNG")
    return path


def format_timings(backend: Backend, update, params: dict, total_s: float | None = None) -> str:
    """The runtime and speed line; `total_s` is given once generation has finished."""
    tokens = len(update.token_ids)
    count = f"{tokens} token{'' if tokens == 1 else 's'} " + ("so far" if total_s is None else f"in {total_s:.2f} s")
    parts = [f"**{backend.runtime}**", f"time to first token **{update.ttft_s * 1000:.0f} ms**"]
    if tokens > 1:  # a rate needs two tokens
        parts.append(f"decode **{update.decode_tokens_per_s:.1f} tokens/s**")
    parts.append(count)
    if params["do_sample"]:
        parts.append(f"seed {params['seed']}")
    return " · ".join(parts)


def format_check(check: TorchCheck, processor) -> str:
    difference = f"largest logit difference **{check.max_logit_diff:.2e}**"
    if check.tokens_agree:
        return f"✅ Eager torch gives the same {len(check.served_ids)} tokens; {difference}."
    at = check.first_difference
    served = processor.decode(check.served_ids[at : at + 1]) or "(end)"
    eager = processor.decode(check.torch_ids[at : at + 1]) or "(end)"
    return f"❌ Eager torch differs from token {at + 1} on ({served!r} here, {eager!r} in torch); {difference}."


def banner(backend: Backend) -> str:
    text = f"**Model:** {backend.model} · **Runtime:** {backend.runtime}"
    plan = getattr(backend.pipeline.engine_factory, "thread_plan", None)  # ONNX Runtime's (export/threads.py)
    if backend.batching:
        text += f" · continuous batching, up to {backend.pipeline.max_batch} rows"
        if plan is not None:
            text += f" ({plan.intra_op_threads} thread{'s' if plan.intra_op_threads > 1 else ''} per session)"
    elif plan is not None:
        text += f" · {plan.describe()}"
    if backend.warm_up_s:
        text += f" · warmed up in {backend.warm_up_s * 1000:.0f} ms"
    if backend.fallback:
        text += f"\n\n⚠️ **Fallback to PyTorch:** {backend.fallback}"
    return text


def example_rows() -> list[list[str]]:
    """[image path, prompt] for each shipped example, with the prompt its manifest names."""
    manifest = EXAMPLES_DIR / "examples.json"
    if not manifest.exists():
        return []
    return [[str(EXAMPLES_DIR / entry["file"]), entry["prompt"]] for entry in json.loads(manifest.read_text())]


def create_app(backend: Backend | None = None, *, concurrency_limit: int | None = None,
               max_queue: int = MAX_QUEUE, torch_check: bool | None = None,
               delete_cache: tuple[int, int] = (600, UPLOAD_KEEP_S)) -> gr.Blocks:
    """The demo page around `backend` (by default the embedded model on ONNX Runtime, falling back to torch).

    `concurrency_limit` requests generate at once (default: the rows of the backend's continuous batch, its
    max_batch; where the engine cannot batch, as many as its thread plan runs well); the rest wait in the queue.
    `torch_check` lets requests ask for the check against eager torch, which loads a float32 copy of the model beside
    the served one: None allows it only where that copy is small (Backend.torch_check_fits). Uploads and answers'
    images are deleted `delete_cache` = (every, older than) seconds."""
    backend = backend or load_backend()
    presets = task_presets(backend)
    limits = decoding_limits(backend.pipeline.processor, presets.values())
    allow_check = backend.torch_check_fits() if torch_check is None else torch_check
    staging = tempfile.TemporaryDirectory(prefix="paligemma-answers-")  # removed with the app (its finalizer)

    def generate(image, prompt, decoding="greedy", temperature=1.0, top_p=0.9, top_k=0,
                 max_new_tokens=DEFAULT_MAX_NEW_TOKENS, seed=0, check_torch=False):
        drawn = None
        try:
            picture, size = read_request_image(image, backend.pipeline.config.image_size)
            prompt = read_prompt(prompt)
            params = read_decoding(decoding, temperature, top_p, top_k, max_new_tokens, seed, limits)
            if not isinstance(check_torch, bool):
                raise paligemma.InputError(f"check_torch must be true or false, got {shown(check_torch)}")
            if check_torch and not allow_check:
                raise paligemma.InputError(CHECK_OFF)
            yield "", None, None, f"**{backend.runtime}** · generating…", ""
            start = time.perf_counter()
            # A visitor who leaves closes this generator: run_ahead sets `left`, and the request's row leaves the
            # batch at its next step (or the request leaves the queue for a row).
            left = threading.Event()
            stream = backend.pipeline.stream(picture, prompt, cancel=left, **params)
            for update in run_ahead(stream, stop=left, min_interval=UPDATE_INTERVAL_S):
                # The outputs not streamed are sent again as they are (unchanged: an empty diff). gr.skip() would
                # make Gradio build a new component and its config for each of them at every update (measured:
                # the largest part of the app's own work per request under load; docs/serving.md).
                yield update.text, None, None, format_timings(backend, update, params), ""
            speed = format_timings(backend, update, params, time.perf_counter() - start)
            # Boxes and masks in the pixels of the image as sent; drawn on the picture, which may be smaller.
            found = [box_entry(d) for d in found_objects(update.text, size, backend.pipeline.mask_decoder)]
            detections = found_objects(update.text, picture.size, backend.pipeline.mask_decoder)
            verdict = ""
            if check_torch:
                verdict = format_check(check_against_torch(backend, picture, prompt, update.token_ids, **params),
                                       backend.pipeline.processor)
            drawn = staged_png(draw_detections(picture, detections), Path(staging.name))
            yield update.text, str(drawn), found, speed, verdict
        except gr.Error:
            raise
        except (paligemma.InputError, paligemma.CheckpointError, ValueError) as e:
            raise gr.Error(str(e), title="Cannot run this request", print_exception=False) from None
        except Exception:
            logger.exception("generation failed")
            raise gr.Error("generation failed on the server (details are in its log); try again, or another image "
                           "or prompt", title="Server error", print_exception=False) from None
        finally:  # after the last answer was sent: Gradio has its own copy by then
            if drawn is not None:
                shutil.rmtree(drawn.parent, ignore_errors=True)
            release_memory()

    with gr.Blocks(title="PaliGemma · ONNX Runtime demo", analytics_enabled=False, delete_cache=delete_cache) as app:
        gr.Markdown("# PaliGemma in the browser\nAn image and a prompt in; the answer streams out, with detected "
                    "objects drawn on the image.")
        gr.Markdown(banner(backend), elem_id="backend")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image",
                                    height=320, elem_id="image")
                task = gr.Radio(list(presets), value="Caption", label="Task")
                prompt = gr.Textbox(presets["Caption"], label="Prompt", max_length=MAX_PROMPT_CHARS, elem_id="prompt")
                with gr.Accordion("Decoding", open=False):
                    decoding = gr.Radio(DECODING, value="greedy", label="Decoding")
                    temperature = gr.Slider(*LIMITS["temperature"][:2], value=1.0, step=0.05, label="Temperature")
                    top_p = gr.Slider(*LIMITS["top_p"][:2], value=0.9, step=0.05, label="Top-p")
                    top_k = gr.Slider(*LIMITS["top_k"][:2], value=0, step=1, label="Top-k (0: off)")
                    max_new_tokens = gr.Slider(*limits["max_new_tokens"][:2],
                                               value=min(DEFAULT_MAX_NEW_TOKENS, limits["max_new_tokens"][1]),
                                               step=1, label="Max new tokens")
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed (sampling)")
                check_torch = gr.Checkbox(False, label="Check against eager torch (tokens and logits)" if allow_check
                                          else f"Check against eager torch: {CHECK_OFF}", interactive=allow_check,
                                          elem_id="check_torch")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=1):
                answer = gr.Textbox(label="Answer", lines=3, interactive=False, buttons=["copy"], elem_id="answer")
                annotated = gr.Image(type="filepath", format="png", label="Detections", interactive=False, height=320,
                                     elem_id="annotated")
                timings = gr.Markdown(label="Timings", elem_id="timings")
                check = gr.Markdown(label="Torch check", elem_id="check")
                with gr.Accordion("Boxes (pixels: x0, y0, x1, y1)", open=False):
                    boxes = gr.JSON(label="Boxes")
        rows = example_rows()
        if rows:
            gr.Examples(rows, inputs=[image, prompt], label="Examples: scenes of the embedded model's task",
                        cache_examples=False, elem_id="examples")

        def preset_of(text):
            return next((name for name, preset in presets.items() if preset == (text or "").strip()), None)

        # A preset fills the prompt (input: on the user's clicks only); any prompt selects its preset, or none.
        task.input(lambda name: presets[name], task, prompt, api_visibility="private")
        prompt.change(preset_of, prompt, task, api_visibility="private")
        inputs = [image, prompt, decoding, temperature, top_p, top_k, max_new_tokens, seed, check_torch]
        outputs = [answer, annotated, boxes, timings, check]
        # preprocess=False: the handler receives the values as sent and checks each itself (see read_image).
        run.click(generate, inputs, outputs, api_name="generate", preprocess=False)
        prompt.submit(generate, inputs, outputs, api_visibility="private", preprocess=False)
    # api_open=False: Gradio's /run/NAME and /api/NAME routes would run an event at once, outside the queue (its
    # concurrency limit and max_size); with it they refuse, and every call joins the queue.
    app.queue(default_concurrency_limit=concurrency_limit or backend.concurrent_requests, max_size=max_queue,
              api_open=False)
    return app


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


CHECK_OFF = ("off on this server (it loads a second, float32 copy of the model); the operator can enable it "
             "with `python app.py --torch-check on`")


def launch(app: gr.Blocks, *, host: str | None = None, port: int | None = None, share: bool = False,
           monitoring: bool = False, upload_space: int = UPLOAD_FOLDER_BYTES, **kwargs):
    """Serve `app` with the demo's request limits (demo/limits.py: one upload of MAX_UPLOAD_BYTES at a time into a
    folder of at most `upload_space` bytes, bounded JSON bodies). host and port default to Gradio's own
    (GRADIO_SERVER_NAME and GRADIO_SERVER_PORT, which Hugging Face Spaces sets). `monitoring` serves Gradio's
    /monitoring routes (each event's name, count and latencies: off unless the operator asks). show_error: a payload
    Gradio itself refuses (a file path the client did not upload, a malformed file object) is answered with Gradio's
    one-line reason rather than a bare "Error"; the handler's own errors are messages already."""
    limits = Middleware(RequestLimits, blocks=app, max_upload_bytes=MAX_UPLOAD_BYTES, upload_folder_bytes=upload_space)
    return app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD_BYTES, show_error=True,
                      enable_monitoring=monitoring, app_kwargs={"middleware": [limits]}, **kwargs)
