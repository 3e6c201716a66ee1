"""A lean JSON endpoint beside the page, on the same server and the same continuous batch: `POST /api/answer` takes a
multipart form (an image file and a prompt, optionally the page's decoding values) and answers one JSON object.

    curl -F image=@scene.png -F prompt="detect circle ; triangle" http://127.0.0.1:7860/api/answer
    -> {"text", "token_ids", "boxes", "seed", "timings": {"ttft_s", "total_s", "decode_tokens_per_s"}}

Why beside Gradio's queue rather than through it: a request there costs the server ~36 ms of Python under one
interpreter lock (its queue, event streams, outputs' postprocess, the upload), which bounds the app far below what
the batch decodes (docs/serving.md). Here a request is one form parsed, one call of the pipeline in a worker thread,
one JSON answer.

Each value is checked by the page's own functions (demo/inputs.py) with the page's limits; the request limits
(demo/limits.py) refuse an over-size body before it is read whole. A bad value is a 4xx with a one-line message
({"detail": ...}); more requests than the batch's rows and the page's queue bound (rows + MAX_QUEUE) get 503; a
server bug is a 500 with a generic message, its traceback in the log. A client that disconnects sets its request's
cancel event: its row leaves the batch at the next step (or it leaves the queue for a row).
"""

from __future__ import annotations

import logging
import math
import threading
import time

import anyio
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import paligemma
from paligemma.boxes import answer_boxes

from .backends import Backend
from .inputs import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_UPLOAD_BYTES,
    read_decoding,
    read_image_and_size,
    read_prompt,
    release_memory,
    too_large,
)

logger = logging.getLogger(__name__)

ANSWER_PATH = "/api/answer"
# The form's fields: the image file, then text fields; None: the page's default (decoding_limits for max_new_tokens;
# a sampled request without a seed gets a random one, returned in the answer).
TEXT_FIELDS = {"prompt": None, "decoding": "greedy", "temperature": 1.0, "top_p": 0.9, "top_k": 0,
               "max_new_tokens": None, "seed": None}
MAX_FIELD_BYTES = 16 * 2**10  # a text field (the prompt is limited to MAX_PROMPT_CHARS by read_prompt)
CLIENT_LEFT = 499  # the status nobody reads: the client disconnected before its answer (nginx's name for it)
FORM = "a multipart form: curl -F image=@photo.jpg -F prompt='caption en' URL"


class Refusal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class AnswerApi:
    """The endpoint for `backend`, with the page's decoding `limits`; at most `rows` + `max_queue` requests at once
    (answered or waiting for a row), each in a worker thread of its own, and at most `rows` images decoded at once
    (`decodes`: shared with the page, where given)."""

    def __init__(self, backend: Backend, limits: dict, *, rows: int, max_queue: int,
                 decodes: threading.Semaphore | None = None):
        self.backend = backend
        self.rows = rows
        self.decodes = decodes or threading.BoundedSemaphore(rows)
        self.limits = limits
        self.default_max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, limits["max_new_tokens"][1])
        self.capacity = rows + max_queue
        self.limiter = anyio.CapacityLimiter(self.capacity)  # its own: Gradio's threads are not taken from
        self.in_flight = 0  # requests past their checks, answered or waiting (changed on the event loop only)
        self.disconnects = 0  # requests whose client left before its answer

    def route(self) -> Route:
        return Route(ANSWER_PATH, self.answer, methods=["POST"])

    async def answer(self, request: Request) -> JSONResponse:
        try:
            try:
                async with request.form(max_files=1, max_fields=len(TEXT_FIELDS),
                                        max_part_size=MAX_FIELD_BYTES) as form:
                    data, fields = await self.read_form(form)
            except HTTPException as error:  # the form itself is malformed or over its limits (Starlette's message)
                raise Refusal(error.status_code, f"{error.detail} (send {FORM})") from None
            prompt = read_prompt(fields["prompt"])
            params = read_decoding(*(fields[name] for name in list(TEXT_FIELDS)[1:]), self.limits)
        except Refusal as refusal:
            return refuse(refusal.status, str(refusal))
        except ValueError as error:  # paligemma.InputError, and SamplingParams' own checks
            return refuse(400, str(error))
        except ClientDisconnect:
            return refuse(CLIENT_LEFT, "the client disconnected")
        if self.in_flight >= self.capacity:
            return refuse(503, f"the server is busy ({self.in_flight} requests answered or waiting); retry in a "
                               "moment", headers={"Retry-After": "1"})
        self.in_flight += 1
        cancel = threading.Event()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self.watch, request, cancel)
                status, body = await anyio.to_thread.run_sync(self.run, data, prompt, params, cancel,
                                                              limiter=self.limiter)
                group.cancel_scope.cancel()
        finally:
            self.in_flight -= 1
        return JSONResponse(body, status_code=status)

    async def read_form(self, form: FormData) -> tuple[bytes, dict]:
        """The image's bytes and the text fields (each default filled in), or Refusal saying what is wrong."""
        unknown = sorted(set(form.keys()) - {"image", *TEXT_FIELDS})
        if unknown:
            raise Refusal(400, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: the "
                               f"form takes image (a file), prompt, and optionally {', '.join(list(TEXT_FIELDS)[1:])}")
        repeated = [name for name in form.keys() if len(form.getlist(name)) > 1]
        if repeated:
            raise Refusal(400, f"the field {repeated[0]!r} is sent more than once; send it once")
        fields = {}
        for name, default in TEXT_FIELDS.items():
            value = form.get(name)
            if isinstance(value, UploadFile):
                raise Refusal(400, f"{name} must be a text field, not a file (send {FORM})")
            fields[name] = default if value is None else value if name in ("prompt", "decoding") else number(value)
        if fields["max_new_tokens"] is None:
            fields["max_new_tokens"] = self.default_max_new_tokens
        image = form.get("image")
        if image is None:
            raise Refusal(400, f"no image: send the image file as the field 'image' of {FORM}")
        if not isinstance(image, UploadFile):
            raise Refusal(400, f"the image must be a file, not text (send {FORM})")
        if image.size is not None and image.size > MAX_UPLOAD_BYTES:
            raise Refusal(413, too_large(image.size))
        return await image.read(), fields

    async def watch(self, request: Request, cancel: threading.Event) -> None:
        """Sets `cancel` when the client disconnects (the body has been read: what comes next is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel.set()
        self.disconnects += 1
        logger.info("a client of %s left before its answer; its request leaves the batch", ANSWER_PATH)

    def run(self, data: bytes, prompt: str, params: dict, cancel: threading.Event) -> tuple[int, dict]:
        """(In a worker thread.) The answer as (status, JSON body); never raises."""
        start = time.perf_counter()
        pipeline = self.backend.pipeline
        try:
            with self.decodes:
                picture, size = read_image_and_size(data, pipeline.config.image_size)
            update = None
            for update in pipeline.stream(picture, prompt, cancel=cancel, **params):
                pass
            if update is None or not update.finished:
                return CLIENT_LEFT, {"detail": "the client disconnected"}
            total_s = time.perf_counter() - start
            # The boxes in the pixels of the image as sent (read_image_and_size may decode it smaller).
            boxes = answer_boxes(update.text, size, pipeline.mask_decoder)
            return 200, {"text": update.text, "token_ids": update.token_ids, "boxes": boxes,
                         "seed": params["seed"] if params["do_sample"] else None,
                         "timings": {"ttft_s": round(update.ttft_s, 4), "total_s": round(total_s, 4),
                                     "decode_tokens_per_s": round(update.decode_tokens_per_s, 1)}}
        except paligemma.InputError as error:  # the image, or the prompt and budget against the model's positions
            return 400, {"detail": str(error)}
        except Exception:
            logger.exception("%s failed", ANSWER_PATH)
            return 500, {"detail": "generation failed on the server (details are in its log); try again, or another "
                                   "image or prompt"}
        finally:
            release_memory()


def number(text: str):
    """A form field's text as the finite number it spells (an int where it is a whole number), else the text as it
    is, which the checks refuse with their message."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return text


def refuse(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)
