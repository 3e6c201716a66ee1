"""The pipeline the demo serves: ONNX Runtime when it runs (the export is made and cached on first use), torch
otherwise (on a GPU its static engine, compiled while loading), warmed up before the first visitor; and the check of
a served answer against eager torch."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image
from safetensors import safe_open

import paligemma
from paligemma.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

TORCH_CONCURRENT_REQUESTS = 2
TORCH_CHECK_AUTO_BYTES = 1 << 30  # float32 weights of the torch copy the check may load unasked-for by the operator


def float32_weight_bytes(checkpoint: Checkpoint) -> int:
    """The checkpoint's weights in float32, from the safetensors headers (no tensor is read)."""
    total = 0
    for file in checkpoint.weight_files:
        with safe_open(str(file), framework="pt") as f:
            total += sum(4 * math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


@dataclass
class Backend:
    """A loaded pipeline and what the page says about it."""

    pipeline: paligemma.Pipeline
    name: str  # "onnx" or "torch"
    runtime: str  # what runs the model, e.g. "ONNX Runtime 1.31.1 (CPUExecutionProvider)"
    model: str  # what was loaded, as the user named it
    checkpoint: Checkpoint
    device: str  # torch's, for eager runs and the check against torch
    fallback: str | None = None  # why ONNX Runtime is not serving although it was asked for
    warm_up_s: float = 0.0
    _reference: paligemma.Pipeline | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def torch_check_fits(self) -> bool:
        """Whether the check against eager torch is cheap enough to offer to every visitor: the served pipeline is
        eager torch already, or the float32 copy it loads stays under TORCH_CHECK_AUTO_BYTES."""
        return self.name == "torch" or float32_weight_bytes(self.checkpoint) <= TORCH_CHECK_AUTO_BYTES

    @property
    def batching(self) -> bool:
        """Whether calls share one continuous batch (paligemma/scheduler.py)."""
        return self.pipeline.batcher is not None

    @property
    def concurrent_requests(self) -> int:
        """How many requests the app runs at once: the rows of the continuous batch where the engine batches;
        otherwise ONNX Runtime's thread plan says (export/threads.py), and torch runs two, sharing torch's threads."""
        if self.batching:
            return self.pipeline.max_batch
        plan = getattr(self.pipeline.engine_factory, "thread_plan", None)
        return plan.concurrent_requests if plan is not None else TORCH_CONCURRENT_REQUESTS

    @property
    def is_demo_model(self) -> bool:
        return self.checkpoint.folder.resolve() == paligemma.DEMO_CHECKPOINT.resolve()

    def reference(self) -> paligemma.Pipeline:
        """Eager torch on the same checkpoint: when torch serves, its own model under the eager engine; otherwise
        loaded on first use."""
        if self.name == "torch":
            return paligemma.Pipeline(self.pipeline.model, self.pipeline.processor)
        with self._lock:
            if self._reference is None:
                self._reference = paligemma.load(self.checkpoint, device=self.device, dtype=torch.float32,
                                                 engine="eager")
        return self._reference


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_backend(model: str | os.PathLike | None = None, backend: str = "onnx", *,
                 onnx_dir: str | os.PathLike | None = None,
                 device: str | None = None, warm_up: bool = True, threads: int | None = None,
                 requests: int | None = None, quantize: str | None = None, max_batch: int | None = None) -> Backend:
    """Load `model` (a folder or Hub repo id; None is the embedded demo model) for `backend`.

    "onnx" exports the model on first use (or reads `onnx_dir`) and runs it with ONNX Runtime; if that fails for any
    reason, eager torch serves instead and `Backend.fallback` says why, except that an `onnx_dir` the operator named
    and that is refused (stale, damaged) raises paligemma.OnnxExportError. `device` None picks the GPU when there is
    one (ONNX Runtime's CUDA provider, or torch's CUDA device). Checkpoint problems raise paligemma.CheckpointError.
    `quantize` ("int8" or "int4", ONNX only) serves that quantized export, made into the cache on first use; it is
    asked for to fit the memory, so a failure raises rather than falling back to a float32 torch model.
    `max_batch` sets the rows of the continuous batch (paligemma.load's; default paligemma.default_max_batch).
    """
    if backend not in paligemma.BACKENDS:
        raise ValueError(f"backend '{backend}' is not one of {', '.join(paligemma.BACKENDS)}")
    if onnx_dir is not None and backend != "onnx":
        raise ValueError(f"an export folder is served by backend 'onnx' only, and backend is '{backend}'; "
                         "drop the export folder or use backend 'onnx'")
    if quantize is not None and backend != "onnx":
        raise ValueError(f"a quantized model ({quantize}) is served by backend 'onnx' only, and backend is '{backend}'")
    torch_device = device or default_device()
    checkpoint = Checkpoint.resolve(model if model is not None else paligemma.DEMO_CHECKPOINT)
    label = "embedded demo model" if model is None else str(model)
    fallback = None
    if backend == "onnx":
        try:
            from export.runtime import load_onnx_pipeline  # here: a broken onnxruntime install falls back too

            pipeline = load_onnx_pipeline(checkpoint, onnx_dir=onnx_dir, device=device or "auto", threads=threads,
                                          requests=requests, quantize=quantize, max_batch=max_batch)
            seconds = warm(pipeline) if warm_up else 0.0
            return Backend(pipeline, "onnx", describe_onnx(pipeline), label, checkpoint, torch_device,
                           warm_up_s=seconds)
        except paligemma.CheckpointError:
            raise  # the checkpoint itself: torch would refuse it the same way
        except Exception as e:  # noqa: BLE001 - any other failure of the ONNX path falls back to torch, said on the page
            if (onnx_dir is not None and isinstance(e, paligemma.OnnxExportError)) or quantize is not None:
                raise
            fallback = f"ONNX Runtime could not run this model ({type(e).__name__}: {e}); eager PyTorch serves instead."
            logger.warning("%s", fallback, exc_info=True)
    pipeline = paligemma.load(checkpoint, device=torch_device, max_batch=max_batch)
    # The static engine (CUDA) compiled and recorded its decode step at load: part of the warm-up shown.
    compiled = pipeline.batcher.engine if pipeline.batcher is not None else pipeline.engine_factory
    seconds = getattr(compiled, "warm_up_s", 0.0) + (warm(pipeline) if warm_up else 0.0)
    return Backend(pipeline, "torch", describe_torch(pipeline), label, checkpoint, torch_device, fallback, seconds)


def warm(pipeline: paligemma.Pipeline) -> float:
    """Run a two-token generation so the first visitor does not pay for lazy initialization; returns its seconds."""
    side = pipeline.config.image_size
    start = time.perf_counter()
    pipeline.generate(Image.new("RGB", (side, side), "white"), "caption en", max_new_tokens=2)
    return time.perf_counter() - start


def describe_torch(pipeline: paligemma.Pipeline) -> str:
    parameter = next(pipeline.model.parameters())
    dtype = str(parameter.dtype).removeprefix("torch.")
    engines = pipeline.batcher.engine if pipeline.batcher is not None else pipeline.engine_factory
    if not (isinstance(engines, paligemma.StaticEngines) or getattr(engines, "static", False)):
        return f"PyTorch {torch.__version__} eager ({parameter.device.type}, {dtype})"
    compiled = f", CUDA graphs, compiled in {engines.warm_up_s:.0f} s" if engines.cuda_graphs else ""
    return f"PyTorch {torch.__version__} static cache{compiled} ({parameter.device.type}, {dtype})"


def describe_onnx(pipeline) -> str:
    """e.g. "ONNX Runtime 1.23.2 int4 (CPUExecutionProvider)": the version, the export's variant, the providers."""
    import onnxruntime

    from export.variants import exported_variant

    model = pipeline.engine_factory  # export.runtime.pipeline.OnnxModel
    described = f"ONNX Runtime {onnxruntime.__version__}"
    manifest = getattr(model, "manifest", None)
    if manifest is not None:
        described += f" {exported_variant(manifest)}"
    providers = getattr(model, "providers", None)
    return f"{described} ({', '.join(providers)})" if providers else described


@dataclass(frozen=True)
class TorchCheck:
    served_ids: list[int]
    torch_ids: list[int]
    max_logit_diff: float  # over the positions that predicted each served token

    @property
    def tokens_agree(self) -> bool:
        return self.served_ids == self.torch_ids

    @property
    def first_difference(self) -> int | None:
        for i, (a, b) in enumerate(zip(self.served_ids, self.torch_ids)):
            if a != b:
                return i
        return None if self.tokens_agree else min(len(self.served_ids), len(self.torch_ids))


def check_against_torch(backend: Backend, image: Image.Image, prompt: str, served_ids: list[int],
                        **decoding) -> TorchCheck:
    """Generate again with eager torch (same decoding values and seed) and compare tokens; and compare the served
    engine's logits, fed the served tokens one step at a time, with one full eager forward pass (no cache) over the
    prompt and those tokens."""
    reference = backend.reference()
    torch_ids = reference.generate(image, prompt, **decoding).token_ids
    inputs = backend.pipeline.processor([image], [prompt])
    served = stepwise_logits(backend.pipeline, inputs, served_ids)
    eager = full_forward_logits(reference.model, inputs, served_ids)
    return TorchCheck(list(served_ids), torch_ids, float((served - eager).abs().max()))


def stepwise_logits(pipeline: paligemma.Pipeline, inputs: dict, ids: list[int]) -> torch.Tensor:
    """Logits [max(len(ids), 1), V] the pipeline's engine gives before each token of `ids`: prefill, then decode
    steps."""
    engine = pipeline.engine_factory()
    logits = [engine.prefill(inputs, max(len(ids), 1))]
    for token in ids[:-1]:
        logits.append(engine.decode_step(torch.tensor([token])))
    return torch.cat([torch.as_tensor(step).float().cpu() for step in logits])


@torch.inference_mode()
def full_forward_logits(model, inputs: dict, ids: list[int]) -> torch.Tensor:
    """The same positions as `stepwise_logits` from one forward pass over the prompt and ids[:-1], without a cache."""
    parameter = next(model.parameters())
    fed = torch.tensor([ids[:-1]], dtype=torch.long)
    T = inputs["input_ids"].shape[1]
    logits = model(
        torch.cat([inputs["input_ids"], fed], 1).to(parameter.device),
        pixel_values=inputs["pixel_values"].to(parameter.device, parameter.dtype),
        attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(fed)], 1).to(parameter.device),
        token_type_ids=torch.cat([inputs["token_type_ids"], torch.ones_like(fed)], 1).to(parameter.device),
    )
    return logits[0, T - 1 :].float().cpu()
