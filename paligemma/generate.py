"""Generation as named steps: embed the image once, prefill the prompt into a KV cache, decode one token
at a time. The loop (sampling, stopping, streaming, timing) is shared by every engine: eager and static-cache torch
(engines.py), ONNX Runtime in export/. A pipeline with a batch engine serves calls made at the same time from many
threads as one continuous batch (scheduler.py); one without runs each call alone, as its own batch.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from .engines import EngineFactory, TorchEngine
from .errors import InputError
from .model import PaliGemmaForConditionalGeneration
from .processor import PaliGemmaProcessor
from .sampling import SamplingParams, sample_rows
from .scheduler import BatchEngine, Batcher, Request


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only, up to and without the end-of-sequence token
    ttft_s: float = 0.0  # from the request to the first token, preprocessing and image encoding included
    decode_tokens_per_s: float = 0.0
    finished: bool = True  # False while streaming


@dataclass
class StreamUpdate:
    delta: str  # text new since the last update
    text: str  # all text so far
    token_ids: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    finished: bool = False


class Pipeline:
    """What `paligemma.load()` returns: the model, its processor and generation. `engine_factory` makes the engine of
    each request (default: eager torch on `model`). `batch_engine` (paligemma/scheduler.py), when given, serves
    generate and stream instead: calls from many threads join one running batch of up to its max_batch rows.
    `mask_decoder` turns a segmentation answer's codes into masks (paligemma.parse_segmentations): the checkpoint's,
    or None when it ships none.

    A list call (`generate([images], [prompts])`) is one row per image and prompt; row i samples with seed + i, so
    it gives what `generate(images[i], prompts[i], seed=seed + i)` gives."""

    def __init__(self, model: PaliGemmaForConditionalGeneration | None, processor: PaliGemmaProcessor,
                 engine_factory: EngineFactory | None = None, mask_decoder=None,
                 batch_engine: BatchEngine | None = None):
        self.model = model
        self.processor = processor
        self.mask_decoder = mask_decoder
        self.engine_factory: EngineFactory = engine_factory or functools.partial(TorchEngine, model)
        self.batcher = Batcher(batch_engine) if batch_engine is not None else None
        self.read_ahead: bool | None = None  # queue each decode step before reading the last tokens (None: on a GPU)

    @property
    def max_batch(self) -> int:
        """Rows decoded together at most: the batch engine's max_batch, or 1 when each call runs alone."""
        return self.batcher.max_batch if self.batcher is not None else 1

    @property
    def stop_ids(self) -> frozenset[int]:
        """The model's end-of-sequence ids: where generation stops unless a call passes its own `stop_ids`."""
        return frozenset(self.config.eos_token_ids)

    @property
    def config(self):
        return self.processor.config

    def _run(self, images, prompts, params: SamplingParams,
             stop_ids: frozenset[int]) -> Iterator[tuple[torch.Tensor, float]]:
        """Yields the next token of every row [B] (on the CPU) and the request's start time, until every row has
        ended (on one of `stop_ids`) or the budget is spent."""
        start = time.perf_counter()
        inputs = self.processor(images, prompts)
        self._check_length(inputs, params)
        engine = self.engine_factory()
        logits = engine.prefill(inputs, params.max_new_tokens)
        device = logits.device
        # On a GPU, the next step is queued before the host reads this step's tokens, so the GPU never waits for
        # the host's bookkeeping; a row's end is then seen one step late, which costs at most one unused step.
        ahead = device.type == "cuda" if self.read_ahead is None else self.read_ahead
        generators = [params.generator(device, row) for row in range(logits.shape[0])]
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
        tokens = sample_rows(logits, params, generators)
        for step in range(params.max_new_tokens):
            tokens = tokens.masked_fill(done, self.processor.pad_id)
            done = done | torch.isin(tokens, stop)
            last = step == params.max_new_tokens - 1
            if ahead:
                on_host, ended = HostCopy(tokens), HostCopy(done)
                if not last:
                    tokens = sample_rows(engine.decode_step(tokens), params, generators)
                on_host, ended = on_host.wait(), ended.wait()
            else:
                on_host, ended = tokens.cpu(), done.cpu()
            yield on_host, start
            if last or bool(ended.all()):
                return
            if not ahead:
                tokens = sample_rows(engine.decode_step(tokens), params, generators)

    def _check_length(self, inputs: dict[str, torch.Tensor], params: SamplingParams) -> None:
        prompt_length = inputs["input_ids"].shape[1]
        limit = self.config.text.max_position_embeddings
        if prompt_length + params.max_new_tokens > limit:
            raise InputError(
                f"the prompt ({prompt_length} tokens with the image) plus max_new_tokens={params.max_new_tokens} "
                f"exceeds the model's {limit} positions; shorten the prompt or lower max_new_tokens"
            )

    def _requests(self, images, prompts, params: SamplingParams, stop_ids: frozenset[int],
                  cancel: threading.Event | None = None) -> list[Request]:
        """One Request per row, each processed alone (no padding) and checked against the model's positions before
        any of them is prefilled: a bad image or prompt fails the call without touching the batch."""
        start = time.perf_counter()
        requests = []
        for row, (image, prompt) in enumerate(zip(images, prompts)):
            inputs = self.processor([image], [prompt])
            self._check_length(inputs, params)
            requests.append(Request(inputs, params, stop_ids, params.generator("cpu", row), start=start,
                                    caller_cancel=cancel))
        return requests


    @staticmethod
    def _finish(ids: list[int], stop_ids: frozenset[int]) -> list[int]:
        for i, token in enumerate(ids):
            if token in stop_ids:
                return ids[:i]
        return ids

    def generate(self, image, prompt, *, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop_ids: Iterable[int] | None = None):
        """One (image, prompt) -> GenerationResult; lists of images and prompts -> a list, generated as one batch.
        A row ends at a token of `stop_ids` (default: the model's end-of-sequence ids; empty: never, so that exactly
        max_new_tokens are generated)."""
        params = SamplingParams(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
        stop = self.stop_ids if stop_ids is None else frozenset(stop_ids)
        batched = isinstance(prompt, (list, tuple))
        if batched and not isinstance(image, (list, tuple)):
            raise InputError(f"{len(prompt)} prompts came with one image ({type(image).__name__}); pass a list of "
                             "images, one per prompt")
        images, prompts = (list(image), list(prompt)) if batched else ([image], [prompt])
        if not prompts:
            return []
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
        if self.batcher is not None:
            requests = self._requests(images, prompts, params, stop)
            try:
                # The rows are prefilled together (with other calls' queued meanwhile) where the engine can, and each
                # joins the batch as soon as it is prefilled.
                error = next((e for e in self.batcher.submit_gathered(requests) if e is not None), None)
                if error is not None:
                    raise error
                for request in requests:
                    for _ in request.stream():
                        pass
            finally:  # a row that failed ends the call: the others leave at the next step
                for request in requests:
                    request.cancel.set()
            results = []
            for request in requests:
                ids = self._finish(request.tokens, stop)
                results.append(GenerationResult(self.processor.decode(ids), ids, request.times[0],
                                                decode_rate(request.times, len(ids))))
            return results if batched else results[0]
        columns, times = [], []
        for tokens, start in self._run(images, prompts, params, stop):
            columns.append(tokens.tolist())
            times.append(time.perf_counter() - start)
        results = []
        for row in range(len(prompts)):
            ids = self._finish([column[row] for column in columns], stop)
            results.append(GenerationResult(self.processor.decode(ids), ids, times[0], decode_rate(times, len(ids))))
        return results if batched else results[0]

    def stream(self, image, prompt: str, *, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop_ids: Iterable[int] | None = None,
               cancel: threading.Event | None = None) -> Iterator[StreamUpdate]:
        """Yields a StreamUpdate per generated token (`.delta` the new text, `.text` all so far); the last has
        finished=True. `stop_ids` as for generate. Setting `cancel` (from any thread), or closing the generator,
        ends the call: in a batch its row leaves at the next step, or it leaves the queue for a row."""
        params = SamplingParams(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
        stop = self.stop_ids if stop_ids is None else frozenset(stop_ids)
        decoder = self.processor.stream_decoder()
        ids: list[int] = []
        text, times = "", []
        for token, seconds in self._tokens(image, prompt, params, stop, cancel):
            times.append(seconds)
            if token in stop:
                break
            ids.append(token)
            delta = decoder.step(token)
            text += delta
            yield StreamUpdate(delta, text, list(ids), times[0], decode_rate(times, len(ids)))
        if cancel is not None and cancel.is_set():
            return
        final = self.processor.decode(ids)  # flushes a piece held back at the very end
        rest = final[len(text):] if final.startswith(text) else ""
        yield StreamUpdate(rest, text + rest, ids, times[0] if times else 0.0, decode_rate(times, len(ids)),
                           finished=True)


    def _tokens(self, image, prompt: str, params: SamplingParams, stop: frozenset[int],
                cancel: threading.Event | None) -> Iterator[tuple[int, float]]:
        """(token, seconds since the call) of one row, through the batch when there is one."""
        if self.batcher is None:
            for tokens, start in self._run([image], [prompt], params, stop):
                yield int(tokens[0]), time.perf_counter() - start
                if cancel is not None and cancel.is_set():
                    return
            return
        (request,) = self._requests([image], [prompt], params, stop, cancel)
        try:
            self.batcher.submit(request)
            yield from request.stream()
        finally:  # closed early (the caller left) or failed: the row leaves at the next step
            request.cancel.set()


class HostCopy:
    """A device tensor's copy into host memory, started now (on a GPU, without waiting for the device); `wait()`
    returns it once it has landed, without waiting for work queued after the copy."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            self.tensor, self.event = tensor.cpu(), None
            return
        self.tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.tensor.copy_(tensor, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor


def decode_rate(times: list[float], num_tokens: int) -> float:
    """Tokens per second after the first one."""
    steps = min(num_tokens, len(times)) - 1
    if steps <= 0:
        return 0.0
    return steps / max(times[steps] - times[0], 1e-9)
