"""Answers for a whole dataset: `python -m paligemma batch --input SOURCE --out answers.jsonl`.

The inputs (`read_items`): a folder (its image files, recursively, by extension; each id the path relative to the
folder), a glob (each id the path relative to the pattern's fixed part), or a JSONL of {"id", "image", "prompt"}
records (a record's prompt overrides the command's).

The run (`Answerer`): `readers` threads open and preprocess images ahead of the model (the library's own loading:
formats allow-listed, memory bounded per image); a thread per prefill that may run at once puts them into the
pipeline's continuous batch (paligemma/scheduler.py), so the batch stays full; each answer is finished (text, boxes)
as its request ends; a failure (an unreadable file, one too large, not an image, a prompt too long) becomes that
input's answer line and the run goes on.

The answers (`AnswerFile`): one JSON line per input, each written whole in one append; synced to disk every few
seconds and at the end. A rerun with the same file skips the ids it holds, after cutting off a partial last line (a
run killed mid-write), so an interrupted and resumed run ends with the lines of an uninterrupted one (timings aside;
in the order they finished).

`--ray` runs the same job on a Ray cluster (paligemma/ray_batch.py).
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .boxes import answer_boxes
from .errors import InputError, shown
from .generate import decode_rate
from .processor import load_image_and_size
from .sampling import SamplingParams
from .scheduler import END, Request, default_max_batch

logger = logging.getLogger(__name__)

# A folder's files that are read as images, by extension (case ignored): the formats load_image opens.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
DEFAULT_PROMPT = "caption en"
# As the demo app's: a segmentation of the embedded model's three shapes is about 70 tokens. Greedy answers stop at
# <eos>, so a shorter answer costs nothing more.
DEFAULT_MAX_NEW_TOKENS = 96
DEFAULT_READERS = 2
# Images prefilled together at most, where the engine gives each row its solo bits so (the fused ONNX Runtime
# prefill): the vision tower and the prompt of 16 images in one call. And the rows of the command's batch on a CPU
# (where memory allows; serving keeps paligemma's 8): each prefilling thread's group joins while the other's rows
# decode. Measured on the embedded model, 2 cores, 2,000 scenes: 208-245 images/s with groups of 8 or 16 in as many
# rows, 304 with 8 in 16 rows, 331 with 16 in 32, 353-371 with 32 in 64 (docs/datasets.md).
DEFAULT_PREFILL_GROUP = 16
CPU_ROWS = 32
# The answers are synced to disk at most this often (and at the end): a killed process loses nothing written (the
# kernel holds it), a machine that loses power at most this much.
SYNC_INTERVAL_S = 2.0
LINE_KEYS = ("id", "image", "prompt", "text", "token_ids", "boxes", "timings", "error")


@dataclass(frozen=True)
class Item:
    """One input: its id (a string, or an integer from a JSONL), the image as the input names it (written in the
    answer), the path it is read from, and its prompt."""

    id: str | int
    image: str
    path: str
    prompt: str


# ---- inputs ----------------------------------------------------------------------------------------------------------

def read_items(source: str | os.PathLike, prompt: str = DEFAULT_PROMPT) -> list[Item]:
    """The inputs of SOURCE: a folder, a glob, a JSONL file (or one image file). Raises InputError for a source that
    does not exist, holds no images, or a JSONL that is not one record per line with ids of their own."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"--prompt {shown(prompt)} is empty; give a task prompt such as {DEFAULT_PROMPT!r}")
    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        return folder_items(path, prompt)
    if path.is_file():
        if path.suffix.lower() in JSONL_EXTENSIONS:
            return jsonl_items(path, prompt)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return [Item(path.name, text, str(path.resolve()), prompt)]
        raise InputError(f"--input {path_text(text)} is a file that is neither a JSONL of records (.jsonl) nor an "
                         f"image ({', '.join(IMAGE_EXTENSIONS)}); give a folder, a glob, a .jsonl file or an image")
    if glob.has_magic(text):
        return glob_items(text, prompt)
    raise InputError(f"--input {path_text(text)} does not exist; give a folder of images, a glob (quoted, e.g. "
                     f"'photos/**/*.jpg') or a .jsonl file of records")


def path_text(path) -> str:
    """A path as a message quotes it: whole (up to 300 characters), so that the user can find it."""
    return shown(os.fspath(path), 300)


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def folder_items(folder: Path, prompt: str) -> list[Item]:
    """Every image file under `folder` (by extension; hidden files and folders skipped), sorted by id."""
    items = []
    for directory, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if is_image_name(name):
                path = Path(directory) / name
                items.append(Item(path.relative_to(folder).as_posix(), str(path), str(path.resolve()), prompt))
    if not items:
        raise InputError(f"--input folder {path_text(folder)} holds no image files ({', '.join(IMAGE_EXTENSIONS)}, "
                         "in it or its subfolders); check the path")
    return sorted(items, key=lambda item: item.id)


def glob_items(pattern: str, prompt: str) -> list[Item]:
    """The files the glob matches (`**` reaches into subfolders), each id relative to the pattern's part before its
    first wildcard, sorted by id."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    items = []
    for match in glob.glob(pattern, recursive=True):
        path = Path(match)
        if path.is_file():
            items.append(Item(path.relative_to(base).as_posix(), match, str(path.resolve()), prompt))
    if not items:
        raise InputError(f"--input glob {path_text(pattern)} matches no file; check the pattern (quote it, so that the "
                         "shell does not expand it)")
    return sorted(items, key=lambda item: item.id)


def jsonl_items(path: Path, prompt: str) -> list[Item]:
    """One Item per line of {"image": path (relative to the JSONL's folder), "id": string or integer (default: the
    image as written), "prompt": text (default: `prompt`)}; blank lines skipped."""
    items, lines_of = [], {}
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                item = jsonl_record(line, number, path, prompt)
                if item.id in lines_of:
                    raise InputError(f"{path}: line {number} has the id {shown(item.id)} of line {lines_of[item.id]}; "
                                     "give each record an id of its own")
                lines_of[item.id] = number
                items.append(item)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if not items:
        raise InputError(f"{path} holds no records; write one JSON object per line, e.g. "
                         '{"id": "a", "image": "a.jpg", "prompt": "caption en"}')
    return items


def jsonl_record(line: str, number: int, path: Path, prompt: str) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {number} is not JSON ({e.msg} at column {e.colno}); write one JSON object per "
                         "line") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object; write "
                         '{"id": ..., "image": ..., "prompt": ...}')
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise InputError(f"{path}: line {number} has no \"image\" (a path, relative to the JSONL's folder); got "
                         f"{shown(image)}")
    key = record.get("id", image)
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise InputError(f"{path}: line {number}'s \"id\" is {shown(key)}; use a string or an integer")
    text = record.get("prompt", prompt)
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{path}: line {number}'s \"prompt\" is {shown(text)}; use a task prompt, or leave the key "
                         "out for --prompt")
    return Item(key, image, str((path.parent / image).resolve()), text)


# ---- the answers file --------------------------------------------------------------------------------------------

class AnswerFile:
    """The JSONL of answers: the ids it already holds (`answered`), and lines appended whole. A partial last line (a
    run killed while writing it) is cut off when the file is opened. One run at a time (an exclusive lock)."""

    def __init__(self, path: str | os.PathLike, sync_interval_s: float = SYNC_INTERVAL_S):
        self.path = Path(path)
        self.sync_interval_s = sync_interval_s
        folder = self.path.parent
        if not folder.is_dir():
            raise InputError(f"--out {path_text(self.path)}: the folder {path_text(folder)} does not exist; create "
                             "it first (mkdir -p)")
        if self.path.is_dir():
            raise InputError(f"--out {path_text(self.path)} is a folder; give a file name, e.g. answers.jsonl")
        created = not self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"--out {path_text(self.path)} is being written by another run; wait for it, or "
                                 "give another file") from None
            self.answered, self.cut_bytes = self._read()
            if created:
                sync_folder(folder)  # the new file's name survives a power cut too
        except BaseException:
            os.close(self.fd)
            raise
        self.last_sync = time.monotonic()
        self.written = 0

    def _read(self) -> tuple[set, int]:
        with open(self.fd, "rb", closefd=False) as file:
            data = file.read()
        end = data.rfind(b"\n") + 1
        cut = len(data) - end
        if cut:
            logger.warning("%s: cut off a partial last line (%d bytes) left by an interrupted run", self.path, cut)
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        answered = set()
        for number, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                answered.add(record["id"])
            except (ValueError, KeyError, TypeError):
                raise InputError(f"--out {path_text(self.path)}: line {number} is not an answer line of this command "
                                 "(a JSON object with an \"id\"); give another --out, or remove that line") from None
        return answered, cut

    def write(self, line: str) -> None:
        """Appends one answer line (JSON text without its newline) in one write, and syncs when it is time."""
        data = (line + "\n").encode("utf-8")
        while data:  # a regular file takes it whole; a short write (a full disk) is finished or raises
            data = data[os.write(self.fd, data):]
        self.written += 1
        if time.monotonic() - self.last_sync >= self.sync_interval_s:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.fd)
        self.last_sync = time.monotonic()

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.sync()
        finally:
            os.close(self.fd)  # releases the lock
            self.fd = -1

    def __enter__(self) -> "AnswerFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def answer_line(record: dict) -> str:
    """One answer as its JSON line (keys in LINE_KEYS' order; no newline inside)."""
    return json.dumps({key: record[key] for key in LINE_KEYS}, ensure_ascii=False, allow_nan=False)


def pending_items(items: list[Item], answers: AnswerFile) -> list[Item]:
    """The items whose ids the answers file does not hold yet."""
    pending = [item for item in items if item.id not in answers.answered]
    stray = len(answers.answered) - (len(items) - len(pending))
    if stray:
        logger.info("%s holds %d answer(s) for ids not in this input; they are kept", answers.path, stray)
    return pending


def load_pipeline(load: dict, threads: int | None):
    """paligemma.load with the batch's thread settings. On ONNX Runtime torch only moves small tensors between the
    steps: on one thread, since waking a second one costs more than such a copy (torch.stack of one image's pixels,
    measured on two busy cores: 4-11 ms with two threads, 0.002 ms with one)."""
    import torch

    import paligemma

    if load["backend"] == "onnx":
        torch.set_num_threads(1)
        pipe = paligemma.load(**load, threads=threads)
    else:
        if threads is not None:
            torch.set_num_threads(threads)
        pipe = paligemma.load(**load)
    if load.get("max_batch") is None and load.get("device", "cpu") == "cpu" and pipe.batcher is not None:
        # The command's rows on a CPU (CPU_ROWS, where memory allows), where the engine's pool can take them.
        pipe.batcher.widen(max(pipe.max_batch, default_max_batch(pipe.config, torch.device("cpu"), rows=CPU_ROWS)))
    return pipe


# ---- the run -------------------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """An item read and preprocessed by a reader: the model's inputs and the image's size (its boxes' pixels)."""

    item: Item
    inputs: dict
    size: tuple[int, int]
    read_s: float
    image: object = None  # the loaded image, kept only for a pipeline that runs each call alone


@dataclass
class Summary:
    answered: int = 0
    failed: int = 0
    skipped: int = 0  # already in the answers file
    seconds: float = 0.0  # from the start of answering (the model loaded; on Ray, the cluster reached) to the end
    first_s: float | None = None  # from the start to the first answer (on Ray: the actors' start-up included)
    errors: dict = field(default_factory=dict)  # error message -> count

    @property
    def images_per_s(self) -> float:
        return (self.answered + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def add(self, record: dict) -> None:
        if record["error"] is None:
            self.answered += 1
        else:
            self.failed += 1
            self.errors[record["error"]] = self.errors.get(record["error"], 0) + 1

    def describe(self) -> str:
        done = f"answered {self.answered}, failed {self.failed}"
        if self.skipped:
            done += f", skipped {self.skipped} already answered"
        first = f"; the first after {self.first_s:.1f} s" if self.first_s is not None else ""
        return (f"{done}; {self.images_per_s:.1f} images/s ({self.answered + self.failed} in {self.seconds:.1f} s"
                f"{first})")


def concurrent_prefills(pipe, cores: int) -> int:
    """Requests that may prefill at once on `cores`: one per core where each prefill runs on one thread (ONNX
    Runtime's plan for a small model: its operators are too small to split), else one (it takes every core).

    Measured on the embedded model, 2 cores, 600 scenes, three rounds alternated: 147-153 images/s with two prefills
    at once against 112-129 with one, the batch fuller (about half the decode steps) and less CPU time per image:
    a prefill (about 5.4 ms of the vision tower and the prompt) is most of an answer's work, and one at a time left
    the second core to the decode loop alone."""
    plan = getattr(pipe.engine_factory, "thread_plan", None)  # ONNX Runtime's; torch's engines take every core
    if plan is None or plan.intra_op_threads != 1:
        return 1
    return max(1, cores)


_END = object()  # after the last prepared item, one per model thread


class Answerer:
    """Answers items through one pipeline: `readers` threads read and preprocess images ahead of the model, and a
    thread per prefill that may run at once hands each to the pipeline's continuous batch (waiting for a free row,
    prefilling it there) and goes on to the next; the thread that iterates the answers finishes each one as its
    request ends (its text and boxes). Thread-safe: several `answer` calls may share it (and the batch)."""

    def __init__(self, pipe, *, readers: int = DEFAULT_READERS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 cores: int | None = None, prefill_group: int | None = None):
        if isinstance(readers, bool) or not isinstance(readers, int) or readers < 1:
            raise ValueError(f"readers={readers!r}: use a whole number of at least 1 (threads reading images)")
        if prefill_group is not None and (isinstance(prefill_group, bool) or not isinstance(prefill_group, int)
                                          or prefill_group < 1):
            raise ValueError(f"prefill_group={prefill_group!r}: use a whole number of at least 1 (images prefilled "
                             "together)")
        self.pipe = pipe
        self.readers = readers
        self.params = SamplingParams(max_new_tokens)  # greedy: an answer is the same in any batch, on any run
        self.stop_ids = pipe.stop_ids
        if pipe.batcher is not None:
            prefills = concurrent_prefills(pipe, cores or len(os.sched_getaffinity(0)))
            pipe.batcher.allow_prefills(prefills)
            # As many submitting threads as prefills run at once: a thread is busy only until its request is in the
            # batch. (A thread per row, each waiting for its answer, kept the batch as full with four times the
            # threads woken at every change of it; on two shared cores the two were within the noise.)
            self.model_threads = prefills
        else:  # each call runs alone: as many at once as its thread plan runs well
            plan = getattr(pipe.engine_factory, "thread_plan", None)
            self.model_threads = getattr(plan, "concurrent_requests", 1)
        # Images prefilled together, at most (of those read and waiting): where the engine gives each row its solo
        # bits so (prefill_many), one call runs the vision tower and the prompt for several.
        if prefill_group is None:
            prefill_group = DEFAULT_PREFILL_GROUP if pipe.batcher is not None and pipe.batcher.groups_prefills else 1
        # Every prefilling thread's group fits in the batch at once.
        self.prefill_group = max(1, min(prefill_group, pipe.max_batch // self.model_threads))
        # Prepared items waiting for the model, at most.
        self.lookahead = (self.prefill_group + 1) * self.model_threads + readers

    def answer(self, items: Iterable[Item]) -> Iterator[dict]:
        """One record per item (the keys of LINE_KEYS), in the order they finish. Closing the iterator early stops
        the run: requests in the batch leave it at its next step."""
        items = list(items)
        if not items:
            return
        stop = threading.Event()
        todo, todo_lock = iter(items), threading.Lock()
        ready: queue.Queue = queue.Queue(self.lookahead)
        done: queue.SimpleQueue = queue.SimpleQueue()
        readers = [threading.Thread(target=self._read, args=(todo, todo_lock, ready, done, stop), daemon=True,
                                    name=f"paligemma-reader-{i}") for i in range(self.readers)]
        models = [threading.Thread(target=self._generate, args=(ready, done, stop), daemon=True,
                                   name=f"paligemma-answer-{i}") for i in range(self.model_threads)]

        def close_after_readers():
            for thread in readers:
                thread.join()
            for _ in models:
                put(ready, _END, stop)

        closer = threading.Thread(target=close_after_readers, daemon=True, name="paligemma-readers-done")
        for thread in (*readers, *models, closer):
            thread.start()
        try:
            for _ in items:
                record = done.get()
                if isinstance(record, BaseException):  # a bug in this module, not an input's failure
                    raise record
                yield self.finish(record) if isinstance(record, InBatch) else record
        finally:
            stop.set()
            for thread in (*readers, closer, *models):
                thread.join()

    def _read(self, todo, todo_lock, ready: queue.Queue, done: queue.SimpleQueue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                with todo_lock:
                    item = next(todo, None)
                if item is None:
                    return
                prepared = self.prepare(item)
                if isinstance(prepared, dict):  # it failed: its answer is ready
                    done.put(prepared)
                else:
                    put(ready, prepared, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            done.put(e)

    def prepare(self, item: Item) -> Prepared | dict:
        """The item's image read and preprocessed with its prompt, or its failure's record."""
        start = time.perf_counter()
        try:
            image, size = load_image_and_size(item.path, self.pipe.config.image_size)
            inputs = self.pipe.processor([image], [item.prompt])
            self.pipe._check_length(inputs, self.params)
        except (InputError, ValueError) as e:
            return record_of(item, error=str(e), timings={"read_s": seconds(time.perf_counter() - start)})
        return Prepared(item, inputs, size, time.perf_counter() - start,
                        image if self.pipe.batcher is None else None)

    def _generate(self, ready: queue.Queue, done: queue.SimpleQueue, stop: threading.Event) -> None:
        ended = False
        while not ended:
            # A group, filled as the readers go (what is read is waiting for this thread, or soon will be; the end
            # marker closes the last one).
            group = [ready.get()]
            while group[-1] is not _END and len(group) < self.prefill_group:
                try:
                    group.append(ready.get())
                except queue.Empty:
                    break
            if group[-1] is _END:
                group.pop()
                ended = True
            if stop.is_set() or not group:
                continue  # drained until the end marker: the readers may be waiting for room
            try:
                if self.pipe.batcher is None:
                    for prepared in group:
                        done.put(self.generate_alone(prepared))
                else:
                    self.submit(group, done, stop)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                done.put(e)

    def submit(self, group: list[Prepared], done: queue.SimpleQueue, stop: threading.Event) -> None:
        """Puts the items' requests into the continuous batch (waiting for rows, prefilling them together in this
        thread); when a request ends, its InBatch reaches `done` (from the batch's thread), or at once its failure's
        record."""
        batch = [InBatch(prepared, done) for prepared in group]
        for in_batch in batch:
            in_batch.request = Request(in_batch.prepared.inputs, self.params, self.stop_ids, None,
                                       start=in_batch.start, caller_cancel=stop, updates=in_batch)
        errors = self.pipe.batcher.submit_many([in_batch.request for in_batch in batch])
        for in_batch, error in zip(batch, errors):
            if isinstance(error, (InputError, ValueError, RuntimeError)):
                done.put(self.failure(in_batch.prepared, error, in_batch.start))
            elif error is not None:
                raise error

    def finish(self, in_batch: "InBatch") -> dict:
        """The answer record of a request that ended in the batch: its text and boxes."""
        prepared, request = in_batch.prepared, in_batch.request
        try:
            if in_batch.error is not None:
                raise in_batch.error
            ids = self.pipe._finish(request.tokens, self.stop_ids)
            return self.record(prepared, ids, request.times[0] if request.times else 0.0,
                               decode_rate(request.times, len(ids)), in_batch.start)
        except (InputError, ValueError, RuntimeError) as e:
            return self.failure(prepared, e, in_batch.start)

    def generate_alone(self, prepared: Prepared) -> dict:
        """The answer record of one prepared item, by a pipeline that runs each call alone (no batch engine)."""
        start = time.perf_counter()
        try:
            result = self.pipe.generate(prepared.image, prepared.item.prompt,
                                        max_new_tokens=self.params.max_new_tokens)
            return self.record(prepared, result.token_ids, result.ttft_s, result.decode_tokens_per_s, start)
        except (InputError, ValueError, RuntimeError) as e:
            return self.failure(prepared, e, start)

    def record(self, prepared: Prepared, ids: list[int], ttft: float, rate: float, start: float) -> dict:
        text = self.pipe.processor.decode(ids)
        boxes = answer_boxes(text, prepared.size, self.pipe.mask_decoder)
        timings = {"read_s": seconds(prepared.read_s), "ttft_s": seconds(ttft),
                   "total_s": seconds(time.perf_counter() - start), "decode_tokens_per_s": round(rate, 1)}
        return record_of(prepared.item, text=text, token_ids=ids, boxes=boxes, timings=timings)

    @staticmethod
    def failure(prepared: Prepared, error: BaseException, start: float) -> dict:
        logger.debug("%s failed", prepared.item.id, exc_info=error)
        timings = {"read_s": seconds(prepared.read_s), "total_s": seconds(time.perf_counter() - start)}
        return record_of(prepared.item, error=str(error) or type(error).__name__, timings=timings)


class InBatch:
    """An item's request in the batch, and the request's update queue (Request.updates): it keeps only the request's
    end (the tokens are in the request: request.tokens, .times) and then hands itself to `done`, so that no thread
    waits for each answer."""

    def __init__(self, prepared: Prepared, done: queue.SimpleQueue):
        self.prepared, self.done = prepared, done
        self.start = time.perf_counter()
        self.request: Request | None = None
        self.error: BaseException | None = None

    def put(self, update) -> None:
        if update is END:
            self.done.put(self)
        elif isinstance(update, BaseException):
            self.error = update


def put(target: queue.Queue, value, stop: threading.Event) -> None:
    """Puts `value` when there is room, giving up once `stop` is set (unless it is the end marker, which is always
    delivered: the model threads drain the queue once stopped)."""
    while True:
        try:
            target.put(value, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set() and value is not _END:
                return


def seconds(value: float) -> float:
    return round(value, 4)


def record_of(item: Item, *, text=None, token_ids=None, boxes=None, timings=None, error=None) -> dict:
    return dict(id=item.id, image=item.image, prompt=item.prompt, text=text, token_ids=token_ids, boxes=boxes,
                timings=timings or {}, error=error)


def item_json(item: Item) -> str:
    return json.dumps(asdict(item), ensure_ascii=False)


def item_from_json(text: str) -> Item:
    return Item(**json.loads(text))
