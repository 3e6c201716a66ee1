"""Continuous batching: `Pipeline.generate` and `Pipeline.stream` called from many threads at once share one running
batch. A call's rows are prefilled alone (image and prompt, their own prefix-LM mask), join the batch at the next
decode step, and leave it when they end, freeing their row for the next.

The parts, as in nano-vllm's engine (`nanovllm/engine/`): a `Request` carries everything about one row of generation
(its inputs, sampling parameters and seeded generator, stop ids, budget, tokens, state and its own timings); the
`Scheduler` is bookkeeping only (which requests wait to join, which run, how many rows are taken); the `Batcher`'s
loop is schedule, run the model on the batch, sample, postprocess. The model runner is a `BatchEngine`
(paligemma/engines.py for torch, export/runtime for ONNX Runtime), which holds every row's cache.

Prefill does not stop the batch: it runs in a calling thread, one prefill at a time, while the loop goes on
decoding the running rows in its own thread; the prefilled rows join at the loop's next step. Where the engine can
prefill several requests in one call giving each row its solo bits (`prefill_many`: ONNX Runtime's fused graphs),
calls that arrive while a prefill runs queue, and the next prefill takes those queued, a few at most (`submit`; a
call that arrives alone is prefilled at once, never held for company); `submit_many` prefills a group the caller
chose (the batch command's groups of images). PaliGemma's prompt is one bidirectional block (image, prompt and
separator see each other), so it cannot be prefilled in causal chunks as vLLM splits a prompt: every chunk would need
keys of the chunks after it.

Exactness: a row's tokens do not depend on the other rows. Each row is prefilled alone (or with others, bit for bit
as alone), samples from its own logits row with its own generator, and attends over its own cache (its length,
positions, mask and window); the decode step's products by weights are the only computation rows share (see the
engines for what that means for each).

Axes: B rows in the batch, V vocabulary.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from .sampling import SamplingParams, sample

logger = logging.getLogger(__name__)

# Rows decoded together by default: on a CPU decoding is bound by reading the weights, and 8 rows read them once for
# 8 tokens (docs/serving.md has the measurements); a GPU has room for many more.
DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 64}
ROW_TOKENS_BEYOND_IMAGE = 512  # what the default assumes a row holds beyond its image tokens (prompt and budget)
CACHE_SHARE = 0.25  # at most this share of the memory available at load goes to the default batch's caches
END = None  # what a request's update queue holds after its last token
CANCEL_POLL_S = 0.05  # how often a request waiting for a row checks whether it was cancelled
# Calls gathered into one prefill at most: groups of 2-7 prefilled 1.1-1.5x faster than one by one, but 8 took twice
# as long on the embedded model and 7 gained 3% on the 3B-wide float32 (its products' activations outgrow the
# caches); docs/serving.md "Prefills gathered".
GATHERED_PREFILL_ROWS = 4


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on `device` now (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_max_batch(config, device: torch.device, dtype_bytes: int = 4, rows: int | None = None) -> int:
    """`rows` (default: DEFAULT_MAX_BATCH for the device), lowered so that that many rows of the image tokens plus
    ROW_TOKENS_BEYOND_IMAGE (each layer's keys and values) fit in CACHE_SHARE of the memory available now."""
    t = config.text
    row_bytes = (2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dtype_bytes
                 * (config.num_image_tokens + ROW_TOKENS_BEYOND_IMAGE))
    rows = rows or DEFAULT_MAX_BATCH["cuda" if device.type == "cuda" else "cpu"]
    available = available_memory(device)
    if available is not None:
        rows = min(rows, int(available * CACHE_SHARE // row_bytes))
    return max(1, rows)


def check_max_batch(max_batch) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch={max_batch!r}: use a whole number of at least 1 (rows decoded together)")
    return max_batch


class BatchEngine(Protocol):
    """Runs the model for rows that join and leave a batch. `prefill` may run in any thread while `decode` runs in
    the loop's; `join`, `decode` and `release` are called by the loop only."""

    max_batch: int

    def prefill(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> tuple[object, torch.Tensor]:
        """One row's processed prompt -> (its cache, not yet in the batch; the next-token logits [1, V])."""
        ...

    # Optional: prefill_many(inputs: list of one-row inputs, max_new_tokens: list) -> [(cache, logits [1, V])], the
    # rows prefilled together where that gives each its solo bits (export/runtime's OnnxBatchEngine), and
    # exact_groups: False where it cannot, and prefills each row alone.

    def join(self, prefilled: object) -> int:
        """Puts a prefilled cache into the batch; returns the row's id."""
        ...

    def decode(self, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One step for every row in the batch (`rows`, in any order; tokens [B]) -> logits [B, V] in that order."""
        ...

    def release(self, row: int) -> None:
        """The row leaves the batch; its cache is freed."""
        ...


@dataclass(eq=False)
class Request:
    """One row of generation and everything about it. Its tokens reach the caller through `updates` as
    (token, seconds since `start`), then END; a failure as the exception, then END."""

    inputs: dict[str, torch.Tensor]  # one row, processed (input_ids, attention_mask, token_type_ids, pixel_values)
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    start: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)  # sampled so far, the stop token included
    times: list[float] = field(default_factory=list)  # seconds from start to each token
    finish: str | None = None  # "stop", "length", "cancelled" or "error"
    cancel: threading.Event = field(default_factory=threading.Event)  # set from any thread: the row leaves
    caller_cancel: threading.Event | None = None  # the caller's own, watched as well
    row: int | None = None  # the engine's row, while in the batch
    prefilled: object | None = None  # the engine's cache, until the row joins
    updates: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set() or (self.caller_cancel is not None and self.caller_cancel.is_set())

    def append(self, token: int, now: float) -> None:
        self.tokens.append(token)
        self.times.append(now - self.start)
        self.updates.put((token, self.times[-1]))
        if token in self.stop_ids:
            self.finish = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish = "length"

    def end(self, finish: str, error: BaseException | None = None) -> None:
        self.finish = self.finish or finish
        if error is not None:
            self.updates.put(error)
        self.updates.put(END)

    def stream(self) -> Iterator[tuple[int, float]]:
        """(token, seconds since start) as they come; raises what failed the request."""
        while True:
            update = self.updates.get()
            if update is END:
                return
            if isinstance(update, BaseException):
                raise update
            yield update


class Scheduler:
    """Bookkeeping only: `max_batch` rows, each taken from when its request is admitted (before prefill) until it
    leaves the batch. `waiting` holds prefilled requests that join at the next step, `running` the batch."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.taken = 0  # rows of requests admitted: prefilling, waiting or running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def admit(self) -> bool:
        """Takes a row for a request about to be prefilled, if one is free."""
        if self.taken >= self.max_batch:
            return False
        self.taken += 1
        return True

    def free(self) -> int:
        return self.max_batch - self.taken

    def give_back(self) -> None:
        """A row taken by a request that never joined (it failed, or ended at its first token)."""
        self.taken -= 1

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Request], list[Request], list[Request]]:
        """(requests joining now, requests leaving now without a step: cancelled, the batch to step)."""
        joining = list(self.waiting)
        self.waiting.clear()
        self.running.extend(joining)
        leaving = [r for r in self.running if r.cancelled]
        for request in leaving:
            self.retire(request)
        return joining, leaving, list(self.running)

    def postprocess(self, batch: list[Request], tokens: list[int], now: float) -> list[Request]:
        """Appends each row's token; returns the requests that ended (on a stop id, their budget, or cancelled),
        no longer running."""
        for request, token in zip(batch, tokens):
            request.append(token, now)
        done = [r for r in batch if r.finished or r.cancelled]
        for request in done:
            self.retire(request)
        return done

    def retire(self, request: Request) -> None:
        self.running.remove(request)
        self.taken -= 1


class Batcher:
    """The engine loop over one BatchEngine. `submit` (a caller's thread) waits for a free row, in the order calls
    came, prefills the request (with the others queued meanwhile, where the engine prefills a group) and samples its
    first token there, and hands it to the loop, which a thread runs while there is work: schedule (rows join,
    cancelled rows leave), decode every row, sample each row's token, postprocess (rows that ended leave and free
    their cache)."""

    def __init__(self, engine: BatchEngine):
        self.engine = engine
        self.scheduler = Scheduler(engine.max_batch)
        self.changed = threading.Condition()
        self.turns: deque[int] = deque()  # requests waiting for a row, first come first served
        self.tickets = itertools.count()
        self.prefilling = threading.Lock()  # one prefill at a time: it takes every core the loop leaves
        self.thread: threading.Thread | None = None
        # submit's requests not yet admitted, in the order they came, and each one's prefill outcome once the group
        # that took it is done (None, or the exception that failed it), until its caller reads it.
        self.arrivals: deque[Request] = deque()
        self.outcomes: dict[Request, Exception | None] = {}
        self.gathering = False  # a submitting thread is admitting and prefilling a group of arrivals
        self.steps = 0  # decode steps run, and the most rows one of them ran (for tests and the benchmark)
        self.largest_batch = 0
        self.prefills = 0  # prefill calls of the engine (prefill or prefill_many: a group is one), for the tests

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    @property
    def groups_prefills(self) -> bool:
        """Whether the engine prefills several requests in one call, each row with its solo bits (its prefill_many,
        where its `exact_groups` is not False)."""
        return hasattr(self.engine, "prefill_many") and getattr(self.engine, "exact_groups", True)

    def widen(self, rows: int) -> bool:
        """Lets the batch hold `rows` rows from now on, where the engine can (its `widen`: a pool that grows as rows
        join; the batch command's default is wider than serving's). Only while the batch is empty; returns whether
        it did."""
        check_max_batch(rows)
        widen = getattr(self.engine, "widen", None)
        with self.changed:
            if widen is None or self.scheduler.taken or self.scheduler.has_work():
                return False
            widen(rows)
            self.scheduler.max_batch = rows
            return True

    def allow_prefills(self, prefills: int) -> None:
        """How many groups of submit_many may prefill at once from now on (default 1, as a prefill takes every core
        the loop leaves). An engine whose prefill runs on one thread leaves the other cores idle meanwhile: the batch
        command lets one prefill run per core there (paligemma.batch.concurrent_prefills). submit's calls are
        gathered into one prefill at a time."""
        if isinstance(prefills, bool) or not isinstance(prefills, int) or prefills < 1:
            raise ValueError(f"prefills={prefills!r}: use a whole number of at least 1")
        self.prefilling = threading.BoundedSemaphore(prefills)

    def submit(self, request: Request) -> None:
        """Admits and prefills `request` (waiting for a row first), and queues it to join; its tokens, the first
        included, arrive on request.updates. A failure here is raised, and the batch never sees the request."""
        (error,) = self.submit_gathered([request])
        if error is not None:
            raise error

    def submit_gathered(self, requests: list[Request]) -> list[Exception | None]:
        """submit for the rows of one call, prefilled together with the calls that arrive meanwhile, where the
        engine gives each row its solo bits so (`prefill_many`). The requests queue behind those that came first; the
        thread whose request heads the queue, when no group is being prefilled, takes the queued requests there are
        free rows for (at least its own, waiting for a row if none is free; GATHERED_PREFILL_ROWS at most) and
        prefills them in one call. A call that
        finds nothing running is prefilled at once; one that arrives while a prefill runs is taken by the next.
        Without `groups_prefills` each group is one request (one after another, as they came). Returns what
        submit_many returns."""
        mine = set(requests)
        with self.changed:
            self.arrivals.extend(requests)
            self.changed.notify_all()
            while not all(r in self.outcomes for r in requests):
                if not self.gathering and self.arrivals and self.arrivals[0] in mine:
                    self._gather(mine)
                else:
                    # Woken when a group is done or a row frees; polled for a cancel set meanwhile (an Event cannot
                    # wake a Condition): a cancelled request leaves the queue and ends there.
                    self.changed.wait(CANCEL_POLL_S)
                    self._drop_cancelled(mine)
            return [self.outcomes.pop(r) for r in requests]

    def _gather(self, mine: set[Request]) -> None:
        """(Under self.changed, by the thread of `mine`, whose request heads the queue.) Takes a group of queued
        requests, prefills it with the lock released (others queue meanwhile) and records each one's outcome."""
        self.gathering = True
        group = []
        try:
            group = self._take_arrivals()
            self.changed.release()
            try:
                errors = self._prefill_group(group)
            finally:
                self.changed.acquire()
            self.outcomes.update(zip(group, errors))
        except BaseException as error:  # interrupted here: the other calls of the group fail, they do not hang
            self.outcomes.update((r, RuntimeError(f"the prefill of this request's group was interrupted ({error!r})"))
                                 for r in group if r not in mine)
            raise
        finally:
            self.gathering = False
            self.changed.notify_all()

    def _drop_cancelled(self, requests: set[Request]) -> None:
        """The queued requests among `requests` that were cancelled leave the queue and end (under self.changed)."""
        cancelled = [r for r in self.arrivals if r in requests and r.cancelled]
        for request in cancelled:
            self.arrivals.remove(request)
            request.end("cancelled")
            self.outcomes[request] = None
        if cancelled:
            self.changed.notify_all()

    def _take_arrivals(self) -> list[Request]:
        """(Under self.changed, by the thread whose request heads the queue.) Waits for the turn (submit_many's
        groups take turns with the queue, first come first served) and a free row, then takes and admits the queued
        requests, in order, as many as rows are free and GATHERED_PREFILL_ROWS at most (one where the engine does not
        group prefills). Returns them; none
        when every queued request of this thread was cancelled meanwhile."""
        ticket = next(self.tickets)
        self.turns.append(ticket)
        head = self.arrivals[0]
        try:
            while not (self.turns[0] == ticket and self.scheduler.free() > 0):
                self.changed.wait(CANCEL_POLL_S)
                if head.cancelled:  # the head leaves; the next request's thread leads
                    self._drop_cancelled({head})
                    return []
            most = GATHERED_PREFILL_ROWS if self.groups_prefills else 1
            group = []
            while self.arrivals and len(group) < most and self.scheduler.admit():
                group.append(self.arrivals.popleft())
            return group
        finally:
            self.turns.remove(ticket)
            self.changed.notify_all()

    def submit_many(self, requests: list[Request]) -> list[Exception | None]:
        """submit for several requests, prefilled together where the engine can (its `prefill_many`: rows of a
        batch of images that each get their solo bits), once rows are free for all of them (or for max_batch of them
        at a time, in order). Returns, per
        request, None (its tokens arrive on its updates, as submit's) or the exception that failed its prefill (the
        batch never saw it; nothing arrives on its updates)."""
        errors: list[Exception | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        while pending:
            admitted = self._admit([requests[i] for i in pending])
            if not admitted:  # every one cancelled while waiting (ended)
                break
            chosen, pending = pending[:admitted], pending[admitted:]
            for i, error in zip(chosen, self._prefill_group([requests[i] for i in chosen])):
                errors[i] = error
        return errors

    def _prefill_group(self, group: list[Request]) -> list[Exception | None]:
        """Prefills admitted requests (in one call where the engine has prefill_many), samples each one's first token
        and queues those that go on to join the batch; per request, None or the exception that failed its prefill
        (its row given back)."""
        if not group:
            return []
        try:
            with self.prefilling:
                self.prefills += 1
                if len(group) == 1 or not hasattr(self.engine, "prefill_many"):
                    prefilled = [self.engine.prefill(r.inputs, r.params.max_new_tokens) for r in group]
                else:
                    prefilled = self.engine.prefill_many([r.inputs for r in group],
                                                         [r.params.max_new_tokens for r in group])
            now = time.perf_counter()
            for request, (_, logits) in zip(group, prefilled):
                request.append(int(sample(logits, request.params, request.generator)[0]), now)
        except Exception as error:  # noqa: BLE001 - handed back per request
            self._give_back(len(group))
            return [error] * len(group)
        except BaseException:
            self._give_back(len(group))
            raise
        joining = []
        for request, (row, _) in zip(group, prefilled):
            if request.finished:  # one token was all it needed
                self._give_back()
                request.end(request.finish)
            else:
                request.prefilled = row
                joining.append(request)
        if joining:
            with self.changed:
                for request in joining:
                    self.scheduler.add(request)
                if self.thread is None:
                    # Not a daemon: at exit Python waits for it (it ends when the batch is empty) instead of
                    # stopping it inside a model call, which aborts the process ("terminate called without an
                    # active exception").
                    self.thread = threading.Thread(target=self._loop, name="paligemma-batch")
                    self.thread.start()
                self.changed.notify_all()
        return [None] * len(group)

    def _admit(self, requests: list[Request]) -> int:
        """Waits for the turn of `requests` and rows for all of them (or the whole batch's), then takes them; returns
        how many (the first ones). A request cancelled meanwhile ends there; 0 once all of them have."""
        ticket = next(self.tickets)
        with self.changed:
            self.turns.append(ticket)
            try:
                # Woken when a row frees; polled for a cancel set meanwhile (an Event cannot wake a Condition).
                # A group waits for rows for all of it (all the batch's at most): taking rows as they free one by
                # one would prefill images one by one again.
                wanted = min(len(requests), self.scheduler.max_batch)
                while not self.changed.wait_for(lambda: self.turns[0] == ticket and self.scheduler.free() >= wanted
                                                and self.scheduler.admit(), timeout=CANCEL_POLL_S):
                    if all(r.cancelled for r in requests):
                        for request in requests:
                            request.end("cancelled")
                        return 0
                admitted = 1
                while admitted < len(requests) and self.scheduler.admit():
                    admitted += 1
                return admitted
            finally:
                self.turns.remove(ticket)
                self.changed.notify_all()

    def _give_back(self, rows: int = 1) -> None:
        with self.changed:
            for _ in range(rows):
                self.scheduler.give_back()
            self.changed.notify_all()

    def _loop(self) -> None:
        while True:
            with self.changed:
                if not self.scheduler.has_work():
                    self.thread = None  # the next submit starts another
                    return
                joining, leaving, batch = self.scheduler.schedule()
            for request in joining:
                try:
                    request.row, request.prefilled = self.engine.join(request.prefilled), None
                except Exception as error:  # noqa: BLE001 - this request ends with it; the others go on
                    logger.exception("a prefilled row could not join the batch")
                    self._end([request], "error", error)
                    batch.remove(request)
                    leaving = [r for r in leaving if r is not request]
            self._end(leaving, "cancelled")
            if not batch:
                continue
            try:
                tokens = self._step(batch)
            except Exception as error:  # noqa: BLE001 - the rows of the failed step end with it; the loop goes on
                logger.exception("a decode step failed; its %d row(s) end with the error", len(batch))
                self._end(batch, "error", error)
                continue
            with self.changed:
                done = self.scheduler.postprocess(batch, tokens, time.perf_counter())
            self._end(done, "cancelled", retired=True)

    def _step(self, batch: list[Request]) -> list[int]:
        logits = self.engine.decode([r.row for r in batch], torch.tensor([r.tokens[-1] for r in batch]))
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        if all(r.params.greedy for r in batch):  # each row's argmax, as alone: one call for the batch
            return logits.argmax(-1).tolist()
        # Each row samples from its own logits with its own parameters and generator, as it would alone.
        return [int(sample(logits[i : i + 1], r.params, r.generator)[0]) for i, r in enumerate(batch)]

    def _end(self, requests: list[Request], finish: str, error: BaseException | None = None,
             retired: bool = False) -> None:
        """Requests leave: out of the scheduler's batch (unless `retired` already), their rows released, their
        callers told."""
        if not requests:
            return
        with self.changed:
            for request in requests:
                if not retired and request in self.scheduler.running:
                    self.scheduler.retire(request)
            self.changed.notify_all()
        for request in requests:
            if request.row is not None:
                self.engine.release(request.row)
                request.row = None
            request.end(finish, error)
