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


class BatchedTorchEngine:
    """The eager engine for a continuous batch (paligemma/scheduler.py): each request is prefilled alone, as
    TorchEngine does, then its cache joins a RowPool and every decode step runs all rows at once, each at its own
    length, with its own positions and prefix-LM mask (and Gemma 2's window) from the one rule, paligemma/masks.py.
    Attention reads the first max-length + 1 slots of every row, each row masked to its own."""

    def __init__(self, model: PaliGemmaForConditionalGeneration, max_batch: int):
        self.model, self.max_batch = model, max_batch
        self.device, self.dtype = parameter_of(model).device, parameter_of(model).dtype
        self.pool = RowPool(model.config.text, max_batch, self.device, self.dtype)

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
        ordered = torch.empty(n, dtype=torch.long, device=self.device).index_copy_(0, places, tokens.to(self.device))
        lengths = pool.lengths[:n]
        if int(lengths.max()) >= pool.capacity:
            raise ValueError(f"a row's cache holds {pool.capacity} tokens; ask for more max_new_tokens")
        S = int(lengths.max()) + 1
        query = lengths[:, None]  # each row's new token goes to the slot after its own
        layout = TokenLayout(torch.arange(S, device=self.device) <= query, pool.autoregressive[:n, :S], query)
        hidden = self.model.run_decoder(ordered[:, None], None, layout, cache=RowStore(pool, n, S))
        logits = self.model.decoder.logits(hidden[:, -1])
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


def make_batch_engine(model: PaliGemmaForConditionalGeneration, factory: EngineFactory,
                      max_batch: int) -> BatchedTorchEngine | None:
    """The continuous batch's engine for what make_engines chose: eager torch batches (BatchedTorchEngine); the
    static engine serves each call alone (None)."""
    return None if isinstance(factory, StaticEngines) else BatchedTorchEngine(model, max_batch)


def make_engines(model: PaliGemmaForConditionalGeneration, engine: str | None = None) -> EngineFactory:
    """The engine factory for `engine` ("eager" or "static"; None: static on CUDA, eager elsewhere). On CUDA the
    static engine compiles and records its decode step here, once (StaticEngines.warm_up_s says how long); if that
    fails where the static engine was only the default, the eager engine serves, with a warning."""
    chosen = engine or default_engine(parameter_of(model).device)
    if chosen not in ENGINES:
        raise ValueError(f"engine '{chosen}' is not one of {', '.join(ENGINES)}")
    if chosen == "eager":
        return functools.partial(TorchEngine, model)
    engines = StaticEngines(model)
    if engines.cuda_graphs:
        try:
            engines.warm_up()
        except Exception as e:  # torch.compile raises many types (a missing compiler, a backend failure, ...)
            reason = f"the static engine could not compile its decode step ({type(e).__name__}: {e})"
            if engine == "static":
                raise RuntimeError(f"{reason}; load with engine='eager'") from e
            logger.warning("%s; the eager engine serves instead", reason)
            return functools.partial(TorchEngine, model)
    return engines
