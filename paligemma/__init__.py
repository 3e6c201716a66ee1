"""PaliGemma 1 and 2 in PyTorch: load a checkpoint, generate, stream."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

# Each public name and the module it lives in, imported on first use (PEP 562): `import paligemma` and the command
# line start without torch until a model is needed, so the batch command's Ray driver, which only reads inputs and
# writes answers, starts in a fraction of a second.
PUBLIC = {
    "answer_boxes": "boxes", "Checkpoint": "checkpoint", "PaliGemmaConfig": "config",
    "chunked_sigmoid_loss": "contrastive", "sigmoid_loss": "contrastive",
    "ENGINES": "engines", "BatchedTorchEngine": "engines", "StaticEngines": "engines", "TorchEngine": "engines",
    "CheckpointError": "errors", "ConfigError": "errors", "InputError": "errors", "OnnxExportError": "errors",
    "GenerationResult": "generate", "Pipeline": "generate", "StreamUpdate": "generate",
    "MaskDecoder": "mask_decoder", "Segmentation": "mask_decoder", "parse_segmentations": "mask_decoder",
    "Detection": "processor", "PaliGemmaProcessor": "processor", "parse_detections": "processor",
    "SamplingParams": "sampling", "default_max_batch": "scheduler",
    "SiglipConfig": "siglip_config", "SiglipModel": "siglip_model", "load_siglip": "siglip_model",
    "SiglipTokenizer": "siglip_tokenizer",
}

if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from .boxes import answer_boxes
    from .checkpoint import Checkpoint
    from .config import PaliGemmaConfig
    from .contrastive import chunked_sigmoid_loss, sigmoid_loss
    from .engines import ENGINES, BatchedTorchEngine, StaticEngines, TorchEngine
    from .errors import CheckpointError, ConfigError, InputError, OnnxExportError
    from .generate import GenerationResult, Pipeline, StreamUpdate
    from .mask_decoder import MaskDecoder, Segmentation, parse_segmentations
    from .processor import Detection, PaliGemmaProcessor, parse_detections
    from .sampling import SamplingParams
    from .scheduler import default_max_batch
    from .siglip_config import SiglipConfig
    from .siglip_model import SiglipModel, load_siglip
    from .siglip_tokenizer import SiglipTokenizer

DEMO_CHECKPOINT = Path(__file__).parent / "demo_checkpoint"
BACKENDS = ("torch", "onnx")

__all__ = [
    "load", "Checkpoint", "Pipeline", "GenerationResult", "StreamUpdate", "PaliGemmaConfig", "PaliGemmaProcessor",
    "SamplingParams", "Detection", "parse_detections", "CheckpointError", "ConfigError", "InputError",
    "OnnxExportError", "DEMO_CHECKPOINT", "TorchEngine", "StaticEngines", "BatchedTorchEngine", "ENGINES",
    "MaskDecoder", "Segmentation", "parse_segmentations", "answer_boxes", "load_siglip", "SiglipModel", "SiglipConfig",
    "SiglipTokenizer", "sigmoid_loss", "chunked_sigmoid_loss", "default_max_batch",
]


def __getattr__(name: str):
    if name not in PUBLIC:
        if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)  # a submodule, as `paligemma.masks`
    value = getattr(importlib.import_module(f".{PUBLIC[name]}", __name__), name)
    globals()[name] = value  # once: later reads find it here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *PUBLIC})


def load(path_or_repo_id: str | os.PathLike | Checkpoint | None = None, *, device: str = "cpu", dtype=None,
         backend: str = "torch", onnx_dir: str | os.PathLike | None = None, engine: str | None = None,
         quantize: str | None = None, max_batch: int | None = None, threads: int | None = None) -> Pipeline:
    """A generation pipeline for a checkpoint folder, Hub repo id or Checkpoint; with none, the embedded demo model.

    backend "torch" runs PyTorch on `device` with `engine` "eager" or "static" (static cache; on CUDA compiled and
    replayed as CUDA graphs, here at load); None picks static on CUDA, eager elsewhere. "onnx" runs the exported
    graphs in `onnx_dir` with ONNX Runtime (exported and cached on first use when no directory is given);
    `quantize` ("int8" or "int4", as app.py's --quantize) picks that variant of the export.

    `max_batch`: calls made at the same time (from several threads) decode together as one continuous batch of up
    to this many rows (paligemma/scheduler.py); default: 8 on a CPU, 64 on a GPU, fewer when the rows' caches would
    take over a quarter of the memory available (paligemma.default_max_batch). The static engine on CUDA records a
    CUDA graph per batch size 1, 2, 4, ... max_batch at load. Where the engine cannot batch (the transformers.js
    layout; ONNX Runtime without its fused decode graph), each call runs alone, as before.

    `threads`: ONNX Runtime's intra-op threads per session (default: its thread plan for the machine and the model,
    export/threads.py); torch's threads are the process's own (torch.set_num_threads).
    """
    from .checkpoint import Checkpoint
    from .engines import ENGINES, make_batch_engine, make_engines
    from .generate import Pipeline
    from .scheduler import check_max_batch, default_max_batch
    from .weights import load_mask_decoder, load_model

    if backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
    if onnx_dir is not None and backend != "onnx":
        raise ValueError(f"onnx_dir is read by backend 'onnx' only, and backend is '{backend}'; "
                         "pass backend='onnx' (--backend onnx) or leave the export folder out")
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"engine '{engine}' is not one of {', '.join(ENGINES)}")
    if quantize is not None and backend != "onnx":
        raise ValueError(f"quantize={quantize!r} is served by backend 'onnx' only, and backend is '{backend}'; "
                         "pass backend='onnx' or leave quantize out")
    if threads is not None and backend != "onnx":
        raise ValueError(f"threads={threads!r} sets ONNX Runtime's threads (backend 'onnx'); for torch, call "
                         "torch.set_num_threads")
    if backend == "onnx" and engine is not None:
        raise ValueError("engine is for backend 'torch'; ONNX Runtime has one engine")
    if max_batch is not None:
        check_max_batch(max_batch)
    source = path_or_repo_id if path_or_repo_id is not None else DEMO_CHECKPOINT
    if backend == "onnx":
        # The one import of this package from another (tests/test_imports.py): made here, on use, so that the torch
        # package does not depend on the export package. It resolves `source` itself: an export folder is no
        # checkpoint.
        from export.runtime import load_onnx_pipeline

        return load_onnx_pipeline(source, onnx_dir=onnx_dir, device=device, quantize=quantize, max_batch=max_batch,
                                  threads=threads)
    checkpoint = Checkpoint.resolve(source)
    model = load_model(checkpoint, device=device, dtype=dtype)
    factory = make_engines(model, engine, warm_up=False)  # the batch's engine serves the calls: it warms up
    parameter = next(model.parameters())
    rows = max_batch or default_max_batch(model.config, parameter.device, parameter.element_size())
    return Pipeline(model, checkpoint.processor(), factory, mask_decoder=load_mask_decoder(checkpoint.folder),
                    batch_engine=make_batch_engine(model, factory, rows, required=engine == "static"))
