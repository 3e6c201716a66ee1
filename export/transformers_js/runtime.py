"""This project's ONNX Runtime loop over transformers.js' layout (export/transformers_js/writer.py): the same Pipeline
(sampling, stopping, streaming, padded batches) as the three-graph runtime, with an engine of its own.

Per request: vision_encoder once, embed_tokens for the prompt with the image features copied into the `<image>`
rows (as transformers.js does), decoder_model_merged on the whole prompt with an empty past, then one call per
token. Unlike transformers.js 4.3.2's loop, every step gets the row's true attention mask and positions (the rule
in paligemma.masks), so left-padded batches give each row its single-request answer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from paligemma.checkpoint import Checkpoint
from paligemma.config import PaliGemmaConfig
from paligemma.errors import CheckpointError, ConfigError, OnnxExportError
from paligemma.generate import Pipeline
from paligemma.masks import extend_for_generation, token_positions
from paligemma.processor import PaliGemmaProcessor

from ..graphs import cache_names
from ..threads import ThreadPlan, plan_threads
from ..writer.manifest import METADATA_PREFIX, config_hash
from ..writer.mask_decoder import OnnxMaskDecoder
from ..writer.onnx_export import removed_on_failure
from .graphs import GRAPH_ORDER
from .writer import (
    CONFIG_KEY,
    MASK_DECODER_KEY,
    VARIANTS,
    Variant,
    export_transformers_js,
    find_variant,
    graph_file,
)

logger = logging.getLogger(__name__)


def variant_present(folder: Path, variant: Variant) -> bool:
    return all((folder / "onnx" / graph_file(name, variant)).exists() for name in GRAPH_ORDER)


def default_options(plan: ThreadPlan) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = plan.intra_op_threads
    options.log_severity_level = 3  # errors only
    return options


class TransformersJsModel:
    """The three sessions of one variant (`dtype` and `quantize`; unless given, the first of VARIANTS the folder
    holds). Calling it gives a fresh engine. `manifest`, `float_type`, `onnx_dir` and `run` are what
    export.validation.validate.validate_export reads."""

    def __init__(self, folder, config: PaliGemmaConfig, dtype: str | None = None, quantize: str | None = None,
                 providers=("CPUExecutionProvider",), options: Callable[[ThreadPlan], ort.SessionOptions] | None = None,
                 threads: int | None = None, requests: int | None = None):
        """`providers` and `options` (plan -> SessionOptions) come from export.runtime when it loads this layout
        (its provider choice and session settings; this module sits below it); the defaults run on the CPU."""
        self.onnx_dir = Path(folder)
        self.config = config
        if dtype is None and quantize is None:
            variant = next((v for v in VARIANTS if variant_present(self.onnx_dir, v)), VARIANTS[0])
        else:
            variant = find_variant(dtype or "float32", quantize)
        if not variant_present(self.onnx_dir, variant):
            missing = [graph_file(n, variant) for n in GRAPH_ORDER
                       if not (self.onnx_dir / "onnx" / graph_file(n, variant)).exists()]
            raise OnnxExportError(f"{self.onnx_dir / 'onnx'} lacks {', '.join(missing)}: export the {variant.label} "
                                  "variant with `python -m export --format transformers.js`")
        self.variant = variant
        # quantize: the scheme the files store, whose tolerance the validation applies (export/validation/validate.py)
        self.manifest = dict(dtype=variant.dtype, quantize=variant.scheme or "none", format="transformers.js")
        self.float_type = np.float32  # transformers.js' files keep float32 inputs and outputs
        data = sum(p.stat().st_size for p in (self.onnx_dir / "onnx").glob(graph_file("decoder_model_merged", variant)
                                                                              + "_data*"))
        self.thread_plan = plan_threads(data, threads=threads, requests=requests)
        options = options or default_options
        expected = config_hash(config)
        self.sessions = {}
        for name in GRAPH_ORDER:
            path = self.onnx_dir / "onnx" / graph_file(name, variant)
            try:
                session = ort.InferenceSession(str(path), options(self.thread_plan), providers=list(providers))
            except Exception as e:  # onnxruntime raises several pybind types (InvalidProtobuf, Fail, NoSuchFile)
                raise OnnxExportError(f"{path} could not be loaded by ONNX Runtime ({type(e).__name__}: {e}); "
                                      "export again with `python -m export --format transformers.js`") from None
            recorded = session.get_modelmeta().custom_metadata_map.get(METADATA_PREFIX + "config_hash")
            if recorded != expected:
                raise OnnxExportError(f"{path} records config hash {str(recorded)[:12]}, not {expected[:12]} of "
                                      f"{self.onnx_dir / 'config.json'}: it comes from another export; export again")
            self.sessions[name] = session
        self.providers = self.sessions["decoder_model_merged"].get_providers()
        self.output_names = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}
        self.past_names = cache_names("past_key_values", config.text.num_hidden_layers)
        logger.info("ONNX Runtime sessions for the transformers.js export %s (%s) on %s", self.onnx_dir,
                    variant.label, self.providers)

    def run(self, name: str, feeds: dict) -> list[ort.OrtValue]:
        """OrtValue inputs (the cache) pass without a copy; outputs stay OrtValues on the CPU."""
        binding = self.sessions[name].io_binding()
        for key, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(key, value)
            else:
                binding.bind_cpu_input(key, np.ascontiguousarray(value))
        for output in self.output_names[name]:
            binding.bind_output(output, "cpu")
        self.sessions[name].run_with_iobinding(binding)
        return binding.get_outputs()

    def __call__(self) -> "TransformersJsEngine":
        return TransformersJsEngine(self)


class TransformersJsEngine:
    def __init__(self, model: TransformersJsModel):
        self.model = model

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        (embeds,) = self.model.run("embed_tokens", {"input_ids": input_ids})
        return embeds.numpy()

    def prefill(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        m = self.model
        input_ids = inputs["input_ids"].numpy().astype(np.int64)
        (features,) = m.run("vision_encoder", {"pixel_values": inputs["pixel_values"].numpy().astype(np.float32)})
        embeds = self.embed(input_ids)
        is_image = input_ids == m.config.image_token_index
        embeds[is_image] = features.numpy().reshape(-1, embeds.shape[-1])  # row by row, in order
        self.attention_mask, _ = extend_for_generation(inputs["attention_mask"].long(), inputs["token_type_ids"],
                                                       max_new_tokens)
        self.positions = token_positions(self.attention_mask, torch.arange(self.attention_mask.shape[1])).numpy()
        self.length = 0
        t = m.config.text
        empty = np.zeros((input_ids.shape[0], t.num_key_value_heads, 0, t.head_dim), dtype=np.float32)
        self.past = [empty] * len(m.past_names)
        return self._step(embeds)

    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._step(self.embed(tokens.numpy().astype(np.int64).reshape(-1, 1)))

    def _step(self, embeds: np.ndarray) -> torch.Tensor:
        start, self.length = self.length, self.length + embeds.shape[1]
        logits, *self.past = self.model.run("decoder_model_merged", {
            "inputs_embeds": embeds,
            "attention_mask": self.attention_mask[:, : self.length].contiguous().numpy(),
            "position_ids": self.positions[:, start : self.length],
            **dict(zip(self.model.past_names, self.past)),
        })
        return torch.from_numpy(logits.numpy()[:, -1])


def load_transformers_js_pipeline(folder, dtype: str | None = None, quantize: str | None = None,
                                  **model_options) -> Pipeline:
    """A Pipeline generating with ONNX Runtime from a folder in transformers.js' layout (its own config.json and
    tokenizer.json make the processor); `model_options` go to TransformersJsModel."""
    folder = Path(folder)
    try:
        config = PaliGemmaConfig.from_json_file(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = TransformersJsModel(folder, config, dtype=dtype, quantize=quantize, **model_options)
    return Pipeline(None, PaliGemmaProcessor.from_pretrained(folder, config), model,
                    mask_decoder=layout_mask_decoder(folder))


def layout_mask_decoder(folder: Path) -> OnnxMaskDecoder | None:
    """The mask decoder config.json lists (transformers.js_config.mask_decoder), or None when it lists none."""
    entry = json.loads((folder / "config.json").read_text(encoding="utf-8")).get(CONFIG_KEY, {}).get(MASK_DECODER_KEY)
    if entry is None:
        return None
    path = folder / "onnx" / entry["file"]
    if not path.is_file():
        raise OnnxExportError(f"{folder / 'config.json'} lists the mask decoder {path}, which is missing: export "
                              "again with `python -m export --format transformers.js`")
    return OnnxMaskDecoder(path)


def variant_removed_on_failure(output: Path, variant: Variant):
    """If the block fails, the folder goes if it was new; otherwise this variant's graphs and data go (an exported
    variant that failed validation must not look usable), other variants stay."""
    def variant_files(folder: Path) -> list[Path]:
        return [path for name in GRAPH_ORDER for path in (folder / "onnx").glob(graph_file(name, variant) + "*")]

    return removed_on_failure(output, variant_files)


def export_transformers_js_checked(source, output, *, dtype: str = "float32", quantize: str | None = None,
                                   validate: bool = True, log=print, **options) -> dict:
    """export_transformers_js, then (unless `validate` is false) the default export's validation against torch,
    run through this engine: the torch side recorded first in a child process, as for the three graphs."""
    from ..validation.torch_reference import torch_reference
    from ..validation.validate import validate_export

    checkpoint = Checkpoint.resolve(source)
    if not validate:
        return export_transformers_js(checkpoint, output, dtype=dtype, quantize=quantize, log=log, **options)
    with variant_removed_on_failure(Path(output), find_variant(dtype, quantize)):
        reference = torch_reference(checkpoint, find_variant(dtype, quantize).reference_dtype)
        content = export_transformers_js(checkpoint, output, dtype=dtype, quantize=quantize, log=log, **options)
        model = TransformersJsModel(output, checkpoint.config, dtype=dtype, quantize=quantize)
        validate_export(reference, model, log=log)
    return content

