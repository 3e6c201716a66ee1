"""Answers for a whole dataset: `python -m paligemma batch --input SOURCE --out answers.jsonl`; its inputs and its
answers file are paligemma/batch_io.py.

The run (`Answerer`): `readers` threads open and preprocess images ahead of the model (the library's own loading:
formats allow-listed, memory bounded per image); a thread per prefill that may run at once puts them into the
pipeline's continuous batch (paligemma/scheduler.py), so the batch stays full; each answer is finished (text, boxes)
as its request ends; a failure (an unreadable file, one too large, not an image, a prompt too long) becomes that
input's answer line and the run goes on.

`--ray` runs the same job on a Ray cluster (paligemma/ray_batch.py).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from .batch_io import CPU_ROWS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_READERS, Item
from .boxes import answer_boxes
from .errors import InputError
from .generate import decode_rate
from .processor import load_image_and_size
from .sampling import SamplingParams
from .scheduler import END, Request, default_max_batch

logger = logging.getLogger(__name__)

# Images prefilled together at most, where the engine gives each row its solo bits so (the fused ONNX Runtime
# prefill): the vision tower and the prompt of 16 images in one call, in the CPU_ROWS of the command's batch (each
# prefilling thread's group joins while the other's rows decode; batch_io.py has the figures).
DEFAULT_PREFILL_GROUP = 16
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
