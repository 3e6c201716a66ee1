"""What one HTTP request may make the demo server hold, checked before Gradio reads it: an ASGI middleware on the
FastAPI app that Gradio builds (demo.launch adds it).

- A JSON body is at most one inline image (a base64 `data:` URL within the upload limit) and a little more; in it a
  `session_hash` is at most 64 characters, every other string at most MAX_FIELD_CHARS but one `data:` URL, an
  `fn_index` names one of the app's events, and `data` holds a value for each of the event's inputs. Gradio would
  otherwise keep a megabyte session hash for as long as the server runs, answer an unknown event with a traceback,
  and quote every value sent (and its components' addresses) in the error for too few.
- A form posted to the JSON endpoint (demo/api.py; `form_paths`) is one image within the upload limit and a little
  more: a larger body is refused before it is read whole.
- A query string's `session_hash`, and a heartbeat's, is at most 64 characters.
- An upload is one file (the app reads one image) within the upload limit, into an upload folder of bounded size:
  refused with a message when the folder is full. What a refused or aborted upload wrote is removed: Gradio writes
  each part to a temporary file in the upload folder as it arrives and leaves it there when the request fails; those
  files (named tmp*, at the top of the folder, where nothing else is written) are deleted once no upload is in
  flight.

Hand-written because Gradio has no setting for any of these (its upload route takes up to 1,000 files and only a per
file size limit); the middleware reads the request as an ASGI app receives it and changes nothing it lets through.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import parse_qsl

import anyio
from gradio.utils import get_upload_folder
from python_multipart.multipart import parse_options_header

logger = logging.getLogger(__name__)

MAX_SESSION_HASH = 64  # Gradio's page sends 11 characters, gradio_client a 36-character UUID
MAX_FIELD_CHARS = 4096  # any string but one data: URL (the prompt is limited to 1000 characters by the app itself)
SLACK_BYTES = 64 * 2**10  # a body's JSON or multipart framing around its image
UPLOAD_FOLDER_BYTES = 2 * 2**30  # all uploads kept (for an hour) together; more are refused until old ones go
DRAIN_BYTES = 256 * 2**20  # read past a refusal before closing the connection
FOLDER_SIZE_TTL_S = 1.0  # the upload folder's size is measured again at most this often
HEARTBEAT = re.compile(r"/heartbeat/([^/]*)$")
CONTENT_FOLDER = re.compile(r"[0-9a-f]{64}")  # Gradio keeps each upload in a folder named by its SHA-256


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RequestLimits:
    """ASGI middleware: see the module docstring. `blocks` is the Gradio app (its events and their inputs);
    `max_upload_bytes` the size of one file (and of an inline image once decoded); `form_paths` the routes whose body
    is a multipart form holding one such file."""

    def __init__(self, app, *, blocks, max_upload_bytes: int, upload_folder_bytes: int = UPLOAD_FOLDER_BYTES,
                 form_paths: tuple[str, ...] = ()):
        self.app = app
        self.blocks = blocks
        self.max_upload_bytes = max_upload_bytes
        self.max_json_bytes = 4 * (max_upload_bytes // 3 + 1) + len("data:image/png;base64,") + SLACK_BYTES
        self.max_form_bytes = max_upload_bytes + SLACK_BYTES
        self.form_paths = form_paths
        self.upload_folder_bytes = upload_folder_bytes
        self.uploads_in_flight = 0
        self.sweep_pending = False
        self.folder_size = (0.0, 0)  # (measured at, bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            check_session_hashes(scope)
            if scope["method"] == "POST" and scope["path"].endswith("/gradio_api/upload"):
                return await self.upload(scope, receive, send)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                form = scope["path"] in self.form_paths
                limit = self.max_form_bytes if form else self.max_json_bytes
                body = await read_body(receive, limit, headers(scope), self.max_upload_bytes)
                if not form:
                    self.check_json(scope["path"], body)
                return await self.app(scope, replay(body, receive), send)
        except Refused as refusal:
            return await respond(send, refusal.status, str(refusal))
        return await self.app(scope, receive, send)

    def check_json(self, path: str, body: bytes) -> None:
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return  # not JSON: Gradio's own parsing refuses it
        if not isinstance(value, dict):
            return
        long_strings = 0
        pending = [value]
        while pending:  # not recursive: a deeply nested body is walked like any other
            item = pending.pop()
            if isinstance(item, dict):
                pending.extend(item.keys())
                pending.extend(item.values())
            elif isinstance(item, list):
                pending.extend(item)
            elif isinstance(item, str) and len(item) > MAX_FIELD_CHARS:
                long_strings += 1
                if not item.startswith("data:") or long_strings > 1:
                    raise Refused(413, f"a value of {len(item):,} characters: values are limited to "
                                       f"{MAX_FIELD_CHARS:,} characters, but for one image sent inline as a data: URL")
        session_hash = value.get("session_hash")
        if session_hash is not None and (not isinstance(session_hash, str) or len(session_hash) > MAX_SESSION_HASH):
            raise Refused(422, f"session_hash must be text of at most {MAX_SESSION_HASH} characters")
        fn = self.event(path, value)
        data = value.get("data")
        if fn is not None and isinstance(data, list) and len(data) < len(fn.inputs):
            raise Refused(422, f"the event {fn.api_name or fn.name} takes {len(fn.inputs)} values in data, got "
                               f"{len(data)}")

    def event(self, path: str, body: dict):
        """The event a body runs: by its fn_index (which must be one of the app's), or by the API name in a
        /call/NAME path; None for other routes."""
        fns = self.blocks.fns
        if "fn_index" in body and body["fn_index"] is not None:
            index = body["fn_index"]
            if isinstance(index, bool) or not isinstance(index, int) or index not in fns:
                raise Refused(422, f"fn_index must be one of the app's events: 0 to {max(fns)}")
            return fns[index]
        named = re.search(r"/gradio_api/call/([^/]+)/?$", path)
        if named:
            return next((fn for fn in fns.values() if fn.api_name == named.group(1)), None)
        return None

    async def upload(self, scope, receive, send):
        """Gradio's upload route, for one file within the limits, into a folder with room for it."""
        limit = self.max_upload_bytes + SLACK_BYTES
        length = headers(scope).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await drain(receive)
            raise Refused(413, too_large(self.max_upload_bytes))
        if await self.uploads_size() + (self.uploads_in_flight + 1) * limit > self.upload_folder_bytes:
            await drain(receive)
            raise Refused(507, "the server's upload space is full; try again in a few minutes")
        _, options = parse_options_header(headers(scope).get(b"content-type", b""))
        delimiter = b"--" + options.get(b"boundary", b"") + b"\r\n"
        refusal: Refused | None = None
        received = parts = 0
        tail = b""
        started = failed = False
        more = True

        async def counted():
            nonlocal received, parts, tail, refusal, more
            message = await receive()
            more = message["type"] == "http.request" and message.get("more_body", False)
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                window = tail + chunk
                parts += window.count(delimiter)
                tail = window[-(len(delimiter) - 1):] if len(delimiter) > 1 else b""
                if received > limit:
                    refusal = Refused(413, too_large(self.max_upload_bytes))
                elif parts > 1:
                    refusal = Refused(400, "one file per upload: this server reads one image a request")
                if refusal is not None:
                    return {"type": "http.disconnect"}  # Gradio stops reading and writes no more
            return message

        async def watched(message):
            nonlocal started, failed
            if message["type"] == "http.response.start":
                started = True
                failed = message["status"] != 200
            await send(message)

        self.uploads_in_flight += 1
        try:
            await self.app(scope, counted, watched)
        except Exception as error:  # the client went away mid-upload, or we cut it off above
            failed = True
            if refusal is None and type(error).__name__ != "ClientDisconnect":
                raise
        finally:
            self.uploads_in_flight -= 1
            if failed or refusal is not None:
                self.sweep_pending = True
            if self.sweep_pending and self.uploads_in_flight == 0:
                self.sweep_pending = False
                remove_partial_uploads()  # not in a thread: no upload may start while it runs
        if refusal is not None and not started:
            await drain(receive, more)
            await respond(send, refusal.status, str(refusal))

    async def uploads_size(self) -> int:
        measured_at, size = self.folder_size
        if time.monotonic() - measured_at > FOLDER_SIZE_TTL_S:
            size = await anyio.to_thread.run_sync(folder_bytes, Path(get_upload_folder()))
            self.folder_size = (time.monotonic(), size)
        return size


def too_large(limit: int) -> str:
    return f"an upload is one file of at most {limit / 2**20:.0f} MB"


def headers(scope) -> dict[bytes, bytes]:
    return {key.lower(): value for key, value in scope.get("headers", [])}


def check_session_hashes(scope) -> None:
    query = scope.get("query_string", b"").decode("latin-1")
    values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "session_hash"]
    heartbeat = HEARTBEAT.search(scope["path"])
    if heartbeat:
        values.append(heartbeat.group(1))
    if any(len(v) > MAX_SESSION_HASH for v in values):
        raise Refused(422, f"session_hash must be at most {MAX_SESSION_HASH} characters")


async def read_body(receive, limit: int, request_headers: dict, max_upload_bytes: int) -> bytes:
    too_big = Refused(413, f"the request is over this server's limit: at most one image of "
                           f"{max_upload_bytes / 2**20:.0f} MB, inline or uploaded")
    length = request_headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        await drain(receive)
        raise too_big
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise Refused(400, "the request ended before its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            await drain(receive)
            raise too_big
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def drain(receive, more: bool = True) -> None:
    """Read and drop what is left of a refused request's body (up to DRAIN_BYTES), so that the client, still
    sending, reads the refusal rather than a broken connection."""
    drained = 0
    while more and drained < DRAIN_BYTES:
        message = await receive()
        drained += len(message.get("body", b""))
        more = message["type"] == "http.request" and message.get("more_body", False)


def replay(body: bytes, receive):
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes
    return again


async def respond(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def folder_bytes(folder: Path) -> int:
    """The apparent size of every file under `folder` (what its files would take, sparse ones at full size)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # deleted meanwhile
                pass
    return total


def remove_partial_uploads() -> None:
    """Delete the temporary files that failed uploads left at the top of the upload folder (call it only while no
    upload is in flight: an upload's own temporary file is one of them until the upload is done)."""
    folder = Path(get_upload_folder())
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.name.startswith("tmp") and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                logger.info("removed %s, left by a failed upload", entry.name)
            elif CONTENT_FOLDER.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                os.rmdir(entry.path)  # only when empty: made for an upload whose file name Gradio then refused
        except OSError:
            pass
