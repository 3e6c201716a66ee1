"""The demo page: an image and a prompt in, the answer streaming out, detected boxes drawn on the image, timings and
the runtime shown, and an optional check against eager torch. `create_app()` builds it; `launch()` serves it.

API (gradio_client): `generate` takes (image, prompt, decoding, temperature, top_p, top_k, max_new_tokens, seed,
check_torch), every input after the prompt with a default, and returns (answer, annotated image, boxes,
timings, torch check). Boxes: [{"label", "box": [x0, y0, x1, y1] pixels}], with "mask" (COCO RLE: paligemma.boxes) on a
segmentation's entry when the model ships a mask decoder. The server validates every value itself; a bad one is
answered with a message, never a traceback. The same server answers plain HTTP clients at POST /api/answer (a form
in, JSON out: demo/api.py), with less of the server's work per request.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
from PIL import Image
from starlette.middleware import Middleware

import paligemma
from paligemma.boxes import box_entry, found_objects
from paligemma.errors import shown

from .api import ANSWER_PATH, AnswerApi
from .backends import Backend, TorchCheck, check_against_torch, load_backend
from .draw import draw_detections
from .inputs import (
    DECODING,
    DEFAULT_MAX_NEW_TOKENS,
    LIMITS,
    MAX_PROMPT_CHARS,
    MAX_UPLOAD_BYTES,
    UPLOAD_KEEP_S,
    decoding_limits,
    read_decoding,
    read_prompt,
    read_request_image,
    release_memory,
)
from .limits import UPLOAD_FOLDER_BYTES, RequestLimits
from .run_ahead import run_ahead

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).parent / "examples"
MAX_QUEUE = 32  # at most this many wait; more are turned away with "queue full"
# The page gets at most one streamed update per this many seconds (the newest text; the last always at once): a
# reader sees no difference, and each update is a message Gradio builds and sends (docs/serving.md).
UPDATE_INTERVAL_S = 0.05
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
    rows = concurrency_limit or backend.concurrent_requests
    # Images decoded at once, the page's and the JSON endpoint's together: each may take up to DECODE_BUDGET
    # (paligemma/processor.py), and the endpoint holds more requests at once than the page's handlers.
    decodes = threading.BoundedSemaphore(rows)

    def generate(image, prompt, decoding="greedy", temperature=1.0, top_p=0.9, top_k=0,
                 max_new_tokens=DEFAULT_MAX_NEW_TOKENS, seed=0, check_torch=False):
        drawn = None
        try:
            with decodes:
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
        examples = example_rows()
        if examples:
            gr.Examples(examples, inputs=[image, prompt], label="Examples: scenes of the embedded model's task",
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
    app.queue(default_concurrency_limit=rows, max_size=max_queue, api_open=False)
    # The JSON endpoint beside the page (demo/api.py), served by launch: the same bound of requests at once.
    app.answer_api = AnswerApi(backend, limits, rows=rows, max_queue=max_queue, decodes=decodes)
    return app


CHECK_OFF = ("off on this server (it loads a second, float32 copy of the model); the operator can enable it "
             "with `python app.py --torch-check on`")


def launch(app: gr.Blocks, *, host: str | None = None, port: int | None = None, share: bool = False,
           monitoring: bool = False, upload_space: int = UPLOAD_FOLDER_BYTES, **kwargs):
    """Serve `app`, and its JSON endpoint POST /api/answer (demo/api.py) beside it, with the demo's request limits
    (demo/limits.py: one upload of MAX_UPLOAD_BYTES at a time into a folder of at most `upload_space` bytes, bounded
    JSON bodies and forms). host and port default to Gradio's own
    (GRADIO_SERVER_NAME and GRADIO_SERVER_PORT, which Hugging Face Spaces sets). `monitoring` serves Gradio's
    /monitoring routes (each event's name, count and latencies: off unless the operator asks). show_error: a payload
    Gradio itself refuses (a file path the client did not upload, a malformed file object) is answered with Gradio's
    one-line reason rather than a bare "Error"; the handler's own errors are messages already."""
    limits = Middleware(RequestLimits, blocks=app, max_upload_bytes=MAX_UPLOAD_BYTES, upload_folder_bytes=upload_space,
                        form_paths=(ANSWER_PATH,))
    # Routes given to the FastAPI app that Gradio builds come before Gradio's own, behind the same middleware.
    server = {"middleware": [limits], "routes": [app.answer_api.route()]}
    return app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD_BYTES, show_error=True,
                      enable_monitoring=monitoring, app_kwargs=server, **kwargs)
