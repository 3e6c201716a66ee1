"""The engines that run the model for the generation loop: one request each, `prefill` then `decode_step`.

- eager (TorchEngine): a KVCache sliced to the filled length, so every decode step has new shapes and runs as ~20
  kernel launches per layer from Python. The default on the CPU.
- static (StaticEngine, made by StaticEngines): a StaticCache whose every slot each step attends over, masked by
  slot, with the new key/value written at a slot index held in a tensor: every shape is fixed, so on a GPU the step
  is compiled once (torch.compile) and recorded as a CUDA graph per cache, and each token replays the whole step at
  once (gpt-fast's recipe). The default on CUDA. On the CPU it runs uncompiled and gives the eager tokens.

Both run the model's own layers through `run_decoder`; prefill (image encoding and prompt) is eager in both: it runs
once per request with large matrices.

Axes: B batch, T prompt tokens, S cache slots, V vocabulary.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from .cache import KVCache, PromptStore, RowPool, RowStore, SlotStore, StaticCache
from .masks import TokenLayout, extend_for_generation
from .model import PaliGemmaForConditionalGeneration

logger = logging.getLogger(__name__)

ENGINES = ("eager", "static")
CAPACITY_MULTIPLE = 128  # static caches hold a multiple of this many slots, so that few shapes are compiled
ROOM = 512  # slots every static cache has beyond the image tokens (prompt, new tokens): one shape for most requests
WARM_UP_RUNS = 2  # runs of the compiled step before its CUDA graph is recorded (the first compiles)


class Engine(Protocol):
    """Runs the model for one batch: `prefill` the processed prompt, then `decode_step` one token per row.
    Each returns the next-token logits [B, V]."""

    def prefill(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor: ...

    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor: ...


class EngineFactory(Protocol):
    """What a Pipeline calls once per request for a fresh engine."""

    def __call__(self) -> Engine: ...


def parameter_of(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


class TorchEngine:
    """Eager torch with a preallocated KV cache sliced to the filled length; one instance per request."""

    def __init__(self, model: PaliGemmaForConditionalGeneration):
        self.model = model
        self.device, self.dtype = parameter_of(model).device, parameter_of(model).dtype

    @torch.inference_mode()
    def prefill(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        input_ids = inputs["input_ids"].to(self.device)
        B, T = input_ids.shape
        self.cache = KVCache(self.model.config.text, B, T + max_new_tokens, self.device, self.dtype)
        self.attention_mask, self.token_type_ids = extend_for_generation(
            inputs["attention_mask"].to(self.device), inputs["token_type_ids"].to(self.device), max_new_tokens)
        image_embeddings = self.model.embed_image(inputs["pixel_values"].to(self.device, self.dtype))
        logits = self.model(
            input_ids, attention_mask=self.attention_mask[:, :T], token_type_ids=self.token_type_ids[:, :T],
            image_embeddings=image_embeddings, cache=self.cache, last_only=True,
        )
        self.cache.advance(T)
        return logits[:, -1]

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        S = self.cache.length + 1
        logits = self.model(
            tokens.to(self.device)[:, None], attention_mask=self.attention_mask[:, :S],
            token_type_ids=self.token_type_ids[:, :S], cache=self.cache, last_only=True,
        )
        self.cache.advance(1)
        return logits[:, -1]


@dataclass
class PrefilledRow:
    """One request's prompt in a cache of its own, waiting to join a batch."""

    keys: torch.Tensor  # [L, K, T, D]
    values: torch.Tensor
    token_types: torch.Tensor  # [T]
    capacity: int  # slots the row will hold: prompt + budget


class DecodeRows(nn.Module):
    """One token for each row of a continuous batch: tokens [B, 1], each row's length [B] (the slot its token goes
    to), the rows' keys and values [L, B, K, S, D] and token types [B, S] -> next-token logits [B, V]. Positions,
    the prefix-LM mask and the window come from the one rule (paligemma/masks.py), row by row. With fixed S and B,
    what torch.compile compiles and a CUDA graph records."""

    def __init__(self, model: PaliGemmaForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, tokens, lengths, keys, values, autoregressive) -> torch.Tensor:
        query = lengths[:, None]  # each row's new token goes to the slot after its own
        real = torch.arange(keys.shape[3], device=keys.device) <= query
        layout = TokenLayout(real, autoregressive, query)
        hidden = self.model.run_decoder(tokens, None, layout, cache=RowStore(keys, values, lengths))
        return self.model.decoder.logits(hidden[:, -1])


def buckets(max_batch: int) -> list[int]:
    """The batch sizes a static batch runs at: 1, 2, 4, ... and max_batch; a step of n rows runs at the smallest
    that holds them (the rows past n are idle: length 0, their output dropped)."""
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(min(2 * sizes[-1], max_batch))
    return sizes


class RecordedRows:
    """DecodeRows over a fixed pool for `batch` rows, recorded once as a CUDA graph: each call copies the tokens and
    lengths into the graph's inputs and replays the step."""

    def __init__(self, step: Callable, pool: RowPool, batch: int):
        device = pool.keys.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        args = (self.tokens, self.lengths, pool.keys[:, :batch], pool.values[:, :batch], pool.autoregressive[:batch])
        side = torch.cuda.Stream(device)  # warm-up on a side stream, as recording requires
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_RUNS):
                step(*args)  # writes slot 0 of idle rows only (lengths 0): no row is in the pool yet, or it is idle
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = step(*args)

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens[:, None])
        self.lengths.copy_(lengths)
        self.graph.replay()
        return self.logits.clone()


class BatchedTorchEngine:
    """Torch for a continuous batch (paligemma/scheduler.py): each request is prefilled alone, as TorchEngine does,
    then its cache joins a RowPool, and every decode step runs all rows at once (DecodeRows), each at its own length.

    Eager (default): the step reads the first longest-row + 1 slots of the rows in use (new shapes every step).
    Static (`static=True`, the CUDA default): a fixed pool of max_batch rows of the image tokens + ROOM slots (more
    for a longer row: new buffers), every step over all its slots and a bucket of rows (`buckets`); on CUDA the
    step is compiled once and recorded as a CUDA graph per bucket (warm_up records them all), each step a replay."""

    def __init__(self, model: PaliGemmaForConditionalGeneration, max_batch: int, static: bool = False):
        self.model, self.max_batch, self.static = model, max_batch, static
        self.device, self.dtype = parameter_of(model).device, parameter_of(model).dtype
        self.cuda_graphs = static and self.device.type == "cuda"
        capacity = model.config.num_image_tokens + ROOM
        self.pool = RowPool(model.config.text, max_batch, self.device, self.dtype,
                            multiple=CAPACITY_MULTIPLE if static else 64, fixed=static, capacity=capacity)
        step = DecodeRows(model)
        self.step = torch.compile(step, fullgraph=True, dynamic=False) if self.cuda_graphs else step
        self.recorded: dict[int, RecordedRows] = {}
        self.recorded_for = None  # the pool's keys the graphs were recorded on
        self.warm_up_s = 0.0

    def warm_up(self) -> float:
        """Compiles the step and records a CUDA graph for every bucket; returns the seconds it took."""
        start = time.perf_counter()
        for size in buckets(self.max_batch):
            self._recorded(size)
        self.warm_up_s = time.perf_counter() - start
        logger.info("static batch: decode step compiled and recorded for %d bucket(s) up to %d rows in %.1f s",
                    len(self.recorded), self.max_batch, self.warm_up_s)
        return self.warm_up_s

    def _recorded(self, size: int) -> RecordedRows:
        if self.recorded_for is not self.pool.keys:  # new buffers (a longer row): the graphs read the old ones
            self.recorded, self.recorded_for = {}, self.pool.keys
        if size not in self.recorded:
            start = time.perf_counter()
            self.recorded[size] = RecordedRows(self.step, self.pool, size)
            logger.info("static batch: %d row(s) x %d slots recorded in %.1f s", size, self.pool.capacity,
                        time.perf_counter() - start)
        return self.recorded[size]

    @torch.inference_mode()
    def prefill(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> tuple[PrefilledRow, torch.Tensor]:
        engine = TorchEngine(self.model)
        logits = engine.prefill(inputs, 0)  # a cache of exactly the prompt
        T = engine.cache.length
        row = PrefilledRow(engine.cache.keys[:, 0], engine.cache.values[:, 0],
                           inputs["token_type_ids"][0].to(self.device), T + max_new_tokens)
        return row, logits

    def join(self, prefilled: PrefilledRow) -> int:
        return self.pool.join(prefilled.keys, prefilled.values, prefilled.token_types, prefilled.capacity)

    @torch.inference_mode()
    def decode(self, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        pool, n = self.pool, self.pool.rows
        if sorted(rows) != sorted(pool.ids):
            raise ValueError(f"a decode step runs every row in the batch ({n}), got {len(rows)}")
        places = torch.tensor(pool.places(rows), device=self.device)
        lengths = pool.lengths[:n]
        if int(lengths.max()) >= pool.capacity:
            raise ValueError(f"a row's cache holds {pool.capacity} tokens; ask for more max_new_tokens")
        B = next(size for size in buckets(self.max_batch) if size >= n) if self.static else n
        ordered = torch.zeros(B, dtype=torch.long, device=self.device).index_copy_(0, places, tokens.to(self.device))
        step_lengths = torch.zeros(B, dtype=torch.long, device=self.device)
        step_lengths[:n] = lengths  # idle rows of a bucket: length 0 (they write their slot 0 and are dropped)
        if self.cuda_graphs:
            logits = self._recorded(B)(ordered, step_lengths)
        else:
            S = pool.capacity if self.static else int(lengths.max()) + 1
            logits = self.step(ordered[:, None], step_lengths, pool.keys[:, :B, :, :S], pool.values[:, :B, :, :S],
                               pool.autoregressive[:B, :S])
        lengths += 1
        return logits.index_select(0, places)

    def release(self, row: int) -> None:
        self.pool.leave(row)


class DecodeStep(nn.Module):
    """One token per row over a static cache, every shape fixed: tokens [B, 1], the slot index [1] and the cache's
    tensors -> next-token logits [B, V]. What torch.compile compiles and a CUDA graph records."""

    def __init__(self, model: PaliGemmaForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, tokens, index, keys, values, real, autoregressive) -> torch.Tensor:
        layout = TokenLayout(real, autoregressive, index)
        hidden = self.model.run_decoder(tokens, None, layout, cache=SlotStore(keys, values, index))
        return self.model.decoder.logits(hidden[:, -1])


def direct_step(step: Callable, cache: StaticCache) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The decode step on `cache`, run as is (the CPU path)."""
    return lambda tokens, index: step(tokens, index, cache.keys, cache.values, cache.real, cache.autoregressive)


class RecordedStep:
    """The decode step on one cache, recorded once as a CUDA graph: each call copies the tokens and the slot index
    into the graph's fixed input tensors and replays every kernel of the step at once. Graphs made this way (not
    torch.compile's "reduce-overhead", which keeps them per thread) replay from any thread."""

    def __init__(self, step: Callable, cache: StaticCache):
        device = cache.keys.device
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        args = (self.tokens, self.index, cache.keys, cache.values, cache.real, cache.autoregressive)
        # Warm-up on a side stream, as recording requires; it writes slot 0, which the request's prefill overwrites.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_RUNS):
                step(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another request's work on other threads may go on while this one records.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = step(*args)

    def __call__(self, tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.index.copy_(index)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the graph's output


@dataclass
class PooledCache:
    cache: StaticCache
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    holder: Callable[[], object | None] = lambda: None  # a weak reference to the engine using it

    def fits(self, batch_size: int, needed: int) -> bool:
        """Free (its engine is gone), and of `batch_size` rows and at least `needed` slots."""
        return self.holder() is None and self.cache.batch_size == batch_size and self.cache.capacity >= needed


class StaticEngines:
    """The static engine's shared parts: the decode step (on CUDA compiled once, and recorded as a CUDA graph per
    cache) and a pool of caches. Calling it gives the engine of one request; an engine holds a cache of its own
    until it is dropped, so requests running at once never share one. A request takes the smallest free cache of its
    batch size that fits, or a new one of the image tokens + ROOM slots, or more for a longer request (rounded up to
    CAPACITY_MULTIPLE; on CUDA a shape not seen before compiles first, which is logged)."""

    def __init__(self, model: PaliGemmaForConditionalGeneration):
        self.model = model
        self.device, self.dtype = parameter_of(model).device, parameter_of(model).dtype
        self.cuda_graphs = self.device.type == "cuda"
        step = DecodeStep(model)
        self.step = torch.compile(step, fullgraph=True, dynamic=False) if self.cuda_graphs else step
        self.min_capacity = model.config.num_image_tokens + ROOM
        self.pool: list[PooledCache] = []
        self.lock = threading.Lock()
        self.warm_up_s = 0.0  # compiling and recording at load (warm_up), in seconds

    def __call__(self) -> "StaticEngine":
        return StaticEngine(self)

    def warm_up(self, batch_size: int = 1) -> float:
        """Compile the step and record its graph for a cache of `batch_size` rows, so that the first request does not
        wait; returns the seconds it took."""
        start = time.perf_counter()
        with self.lock:
            self.pool.append(self.new_cache(batch_size, self.min_capacity))
        self.warm_up_s = time.perf_counter() - start
        logger.info("static engine: compiled and recorded the decode step in %.1f s", self.warm_up_s)
        return self.warm_up_s

    def lease(self, engine: "StaticEngine", batch_size: int, needed: int) -> PooledCache:
        """A cache of `batch_size` rows and at least `needed` slots, held by `engine` until it is dropped."""
        with self.lock:
            fitting = [pooled for pooled in self.pool if pooled.fits(batch_size, needed)]
            if fitting:
                pooled = min(fitting, key=lambda p: p.cache.capacity)
            else:
                pooled = self.new_cache(batch_size, needed)
                self.pool.append(pooled)
            pooled.holder = weakref.ref(engine)
        return pooled

    @torch.no_grad()
    def new_cache(self, batch_size: int, needed: int) -> PooledCache:
        capacity = -(-max(needed, self.min_capacity) // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
        cache = StaticCache(self.model.config.text, batch_size, capacity, self.device, self.dtype)
        if not self.cuda_graphs:
            return PooledCache(cache, direct_step(self.step, cache))
        start = time.perf_counter()
        recorded = RecordedStep(self.step, cache)
        logger.info("static engine: decode step for %d row(s) x %d slots ready in %.1f s (compiled on first use of "
                    "a shape, then recorded as a CUDA graph)", batch_size, capacity, time.perf_counter() - start)
        return PooledCache(cache, recorded)


class StaticEngine:
    """One request on a static cache of its own: eager prefill into its slots [0, T), then fixed-shape decode steps
    (compiled and replayed as a CUDA graph on a GPU)."""

    def __init__(self, engines: StaticEngines):
        self.engines = engines
        self.model = engines.model
        self.device, self.dtype = engines.device, engines.dtype

    @torch.no_grad()
    def prefill(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        input_ids = inputs["input_ids"].to(self.device)
        attention_mask = inputs["attention_mask"].to(self.device)
        token_type_ids = inputs["token_type_ids"].to(self.device)
        B, T = input_ids.shape
        self.pooled = self.engines.lease(self, B, T + max_new_tokens)
        cache = self.pooled.cache
        real, autoregressive = extend_for_generation(attention_mask, token_type_ids, cache.capacity - T)
        cache.real.copy_(real.bool())
        cache.autoregressive.copy_(autoregressive.bool())
        image_embeddings = self.model.embed_image(inputs["pixel_values"].to(self.device, self.dtype))
        logits = self.model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            image_embeddings=image_embeddings, cache=PromptStore(cache), last_only=True)
        self.index = torch.tensor([T], device=self.device)  # the slot the next token's key/value goes to
        return logits[:, -1]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.pooled.step(tokens.to(self.device)[:, None], self.index)
        self.index = self.index + 1
        return logits


def default_engine(device: torch.device) -> str:
    return "static" if device.type == "cuda" else "eager"


def make_batch_engine(model: PaliGemmaForConditionalGeneration, factory: EngineFactory, max_batch: int,
                      required: bool = False) -> BatchedTorchEngine:
    """The continuous batch's engine for what make_engines chose: eager or static (on CUDA its step compiled and
    recorded per bucket here, at load; if that fails, the eager batch serves, with a warning, unless the static
    engine was asked for by name: `required`)."""
    if not isinstance(factory, StaticEngines):
        return BatchedTorchEngine(model, max_batch)
    engine = BatchedTorchEngine(model, max_batch, static=True)
    if engine.cuda_graphs:
        try:
            engine.warm_up()
        except Exception as e:  # torch.compile raises many types (a missing compiler, a backend failure, ...)
            reason = f"the static engine could not compile its decode step ({type(e).__name__}: {e})"
            if required:
                raise RuntimeError(f"{reason}; load with engine='eager'") from e
            logger.warning("%s; the eager batch serves instead", reason)
            return BatchedTorchEngine(model, max_batch)
    return engine


def make_engines(model: PaliGemmaForConditionalGeneration, engine: str | None = None,
                 warm_up: bool = True) -> EngineFactory:
    """The engine factory for `engine` ("eager" or "static"; None: static on CUDA, eager elsewhere). On CUDA the
    static engine compiles and records its decode step here, once (StaticEngines.warm_up_s says how long), unless
    `warm_up` is false (a continuous batch serves the calls; this engine serves only direct use, compiling on first
    use); if that fails where the static engine was only the default, the eager engine serves, with a warning."""
    chosen = engine or default_engine(parameter_of(model).device)
    if chosen not in ENGINES:
        raise ValueError(f"engine '{chosen}' is not one of {', '.join(ENGINES)}")
    if chosen == "eager":
        return functools.partial(TorchEngine, model)
    engines = StaticEngines(model)
    if engines.cuda_graphs and warm_up:
        try:
            engines.warm_up()
        except Exception as e:  # torch.compile raises many types (a missing compiler, a backend failure, ...)
            reason = f"the static engine could not compile its decode step ({type(e).__name__}: {e})"
            if engine == "static":
                raise RuntimeError(f"{reason}; load with engine='eager'") from e
            logger.warning("%s; the eager engine serves instead", reason)
            return functools.partial(TorchEngine, model)
    return engines
