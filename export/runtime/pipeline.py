"""The ONNX Runtime generation loop behind the pipeline interface: `OnnxModel` holds the sessions (loaded once: on
CPU the vision encoder and one fused session for prefill and decode, which holds each decoder weight once; elsewhere
the three exported graphs, the decoder weights shared between prefill and decode), `OnnxEngine` runs one request,
`OnnxBatchEngine` the rows of a continuous batch (paligemma/scheduler.py) on the fused session's decode step, and the
shared `paligemma.generate.Pipeline` does sampling, stopping, streaming and timing exactly as for torch.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

from paligemma.cache import RowPool
from paligemma.checkpoint import Checkpoint, resolve_checkpoint
from paligemma.config import PaliGemmaConfig
from paligemma.engines import PrefilledRow
from paligemma.errors import CheckpointError, ConfigError, InputError, OnnxExportError
from paligemma.generate import Pipeline
from paligemma.masks import TokenLayout, additive, extend_for_generation, token_positions
from paligemma.processor import PaliGemmaProcessor
from paligemma.scheduler import check_max_batch, default_max_batch

from ..graphs import GRAPH_ORDER, cache_names
from ..quantize import PREPACKED
from ..threads import SMALL_MODEL_BYTES, ThreadPlan, plan_threads
from ..validation.torch_reference import torch_reference
from ..validation.validate import validate_export
from ..variants import exported_variant, variant_name
from ..writer.integrity import cache_root
from ..writer.manifest import (
    EXPORTER_VERSION,
    MANIFEST_NAME,
    METADATA_PREFIX,
    check_export,
    config_hash,
)
from ..writer.mask_decoder import load_onnx_mask_decoder
from .fused import bias_name, branch_inputs, fused_session, left_padded, rotary_positions, unsupported

logger = logging.getLogger(__name__)

FLOAT_TYPES = {"float32": np.float32, "float16": np.float16}


def gpu_present() -> bool:
    return torch.cuda.is_available() or Path("/dev/nvidiactl").exists()


def choose_providers(device: str) -> list:
    """CUDA (then CPU for what CUDA lacks) when asked for and a GPU is there; CPU otherwise."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if not (device == "auto" or device.startswith("cuda")):
        raise ValueError(f"device '{device}' is not supported by the onnx backend; use cpu, cuda, cuda:N or auto")
    if "CUDAExecutionProvider" in ort.get_available_providers() and gpu_present():
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device != "auto":
        warnings.warn(f"device '{device}' asked for, but onnxruntime has no usable CUDA provider here; running on CPU")
    return ["CPUExecutionProvider"]


def session_options(plan: ThreadPlan, shared: tuple[list, list] | None, prepack: bool = False,
                    spinning: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # All graph optimizations: they fuse LayerNorm, GELU and attention patterns in place and copy no weights
    # (measured: export/memory_check.py).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One request runs one graph at a time; the plan's threads go to the operators inside it (export/threads.py).
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = plan.intra_op_threads
    options.inter_op_num_threads = 1
    # Spinning is ONNX Runtime's default; off, as measured (export/threads.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # errors only: ONNX Runtime's warnings about unused initializers are noise here
    if shared is not None:
        # The decoder weights live in one buffer that both sessions read. Pre-packing would give each session
        # its own re-laid-out copy of every MatMul weight (3x the weights in all). Without it a single row (batch 1
        # decode) runs as fast; several rows re-pack weights per call: batched CPU decode is slower (memory_check).
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in zip(*shared):  # used in place, not copied (add_external_initializers copies)
            options.add_initializer(name, value)
    return options


def ort_owned(array: np.ndarray) -> ort.OrtValue:
    """A copy of `array` in memory ONNX Runtime allocates: .numpy() of an OrtValue made over a numpy array's memory
    does not keep that array alive (its result read freed memory once the OrtValue was gone)."""
    value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype)
    value.update_inplace(np.ascontiguousarray(array))
    return value


def one_session_options(plan: ThreadPlan, spinning: bool = False) -> ort.SessionOptions:
    """A session that is the only one in memory (OnnxModel one_session): ONNX Runtime's CPU provider has no float16
    kernels, so a float16 graph's session casts its weights once into a float32 copy of its own, and a buffer shared
    with other sessions would only add the float16 bytes. Pre-packing and the memory arena off: both hold a second
    copy of weights or casts while the session is created (measured on the weight-heavy model's float16 prefill: peak
    2.07x the float32 weights with them, 1.41x without; docs/export.md)."""
    options = session_options(plan, None, spinning=spinning)
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    return options


class OnnxModel:
    """The sessions of one export. Calling it gives a fresh OnnxEngine (what Pipeline's engine_factory needs)."""

    def __init__(self, onnx_dir, config: PaliGemmaConfig, device: str = "cpu", fingerprint: str | None = None,
                 threads: int | None = None, requests: int | None = None, prepack: bool = False,
                 spinning: bool = False, fused: bool | None = None, one_session: bool = False,
                 batch_prepack: bool = False):
        """`one_session` (CPU only, for validating float16 exports): no shared buffers; each graph's session is
        opened when first run and the one open before it released, so that at most one is in memory.
        `batch_prepack`: the fused session is pre-packed whatever the model's size, for a continuous batch
        (OnnxBatchEngine): several rows decode ~2.7x faster so, and each row's logits are bit-identical to those it
        gets alone (docs/serving.md)."""
        self.onnx_dir = Path(onnx_dir)
        self.config = config
        self.manifest = check_export(self.onnx_dir, config, fingerprint)
        if self.manifest.get("dtype") not in FLOAT_TYPES:
            raise OnnxExportError(f"{self.onnx_dir / MANIFEST_NAME} records dtype {self.manifest.get('dtype')!r}; this "
                                  f"runtime reads {' and '.join(FLOAT_TYPES)} exports; export again")
        self.float_type = FLOAT_TYPES[self.manifest["dtype"]]
        decoder_bytes = sum(entry["length"] for entry in self.manifest["shared_data"]["tensors"].values())
        self.thread_plan = plan_threads(decoder_bytes, threads=threads, requests=requests)
        providers = choose_providers(device)
        # MatMulNBits without its pre-packed form dequantizes its whole weight to float on every call (measured:
        # +525 MB a call for a 131072 x 1024 weight, int4 decoding 5x slower than float32, an int8 GEMV 100x slower);
        # pre-packed it reads the blocks, at the cost of a packed copy per session (int4: an eighth of the float
        # weight, int8 a quarter).
        prepack = prepack or self.manifest.get("quantize") in PREPACKED
        # Pre-packed, MLAS lays out each MatMul weight once instead of on every call: the embedded model's fused
        # prefill and decode ran faster so (docs/runtime.md "Fused graphs, measured"). The fused session reads the
        # weights from the file itself and releases each one it packs, so the packed copy replaces the stored one
        # (a float32 weight's packed copy is as large as the weight: a large float32 decoder is not pre-packed, its
        # weights are read in place from the mapped file).
        fused_prepack = prepack or batch_prepack or decoder_bytes < SMALL_MODEL_BYTES
        # As this model's sessions are made (bench/kernels.py makes profiled copies of them).
        self.prepack, self.fused_prepack, self.spinning = prepack, fused_prepack, spinning
        self.sessions = {}
        self.output_names = {}  # filled as each graph first runs
        self.one_session = one_session
        self._providers = providers
        self._shared = None  # the decoder weights the exported prefill and decode share, read when they open
        self._opening = threading.Lock()
        if one_session:
            if providers != ["CPUExecutionProvider"]:
                raise ValueError("one_session is for validating on CPU: ask for device='cpu'")
            self.providers = providers
        else:
            self.sessions["vision_encoder"] = self._session("vision_encoder", self._exported_options("vision_encoder"),
                                                            providers)
            self.providers = self.sessions["vision_encoder"].get_providers()
        self.device_type = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        if providers[0] != "CPUExecutionProvider" and self.device_type == "cpu":
            warnings.warn("the CUDA provider failed to start (CUDA 13 / cuDNN 9 libraries missing?); running on CPU")
        self.device_id = providers[0][1]["device_id"] if self.device_type == "cuda" else 0
        self.past_names = cache_names("past_key_values", config.text.num_hidden_layers)
        self.present_names = cache_names("present", config.text.num_hidden_layers)
        self.windows = {config.text.layer_window(i) for i in range(config.text.num_hidden_layers)}
        fused = False if one_session else fused
        self.fused = self._fused_session(fused, providers, fused_prepack, spinning)
        # The flag and the other branch's (empty) inputs that each call of the fused graph adds.
        self.branch_inputs = {prefill: branch_inputs(config, prefill) for prefill in (True, False)}
        # Decode steps run a multiple of this many rows (spare rows added). MLAS multiplies by a MatMulNBits weight two
        # rows at a time, and a row alone (the last of an odd number) takes another kernel, whose bits differ at
        # int4's blocks of 128 (bench/batch_decode.py --kernels): in pairs a row gets the same bits whatever the
        # batch, alone or not (docs/serving.md).
        self.row_multiple = 2 if self.fused is not None and self.manifest.get("quantize") in PREPACKED else 1
        # Where the fused graph serves, the exported prefill and decode only serve what it cannot (a prompt past
        # the rotary tables, a batch not padded on the left): opened on first use, as they hold a copy of the weights
        # of their own (a quantized export's pre-packed, which would double its memory).
        if not one_session and self.fused is None:
            for name in GRAPH_ORDER:
                self._exported_session(name)
        logger.info("ONNX Runtime sessions for %s on %s (%s)", self.onnx_dir, self.providers,
                    "prefill and decode fused" if self.fused else "graphs as exported")

    def _fused_session(self, fused: bool | None, providers, prepack: bool, spinning: bool):
        """The fused prefill-and-decode session (export/runtime/fused.py), built here from the checked graphs: None
        when `fused` is False, or when it is None (auto) and the export or the provider cannot use it."""
        if fused is False:
            return None
        reason = unsupported(self.config, self.manifest["dtype"], self.manifest.get("quantize"), self.device_type)
        if reason is not None:
            if fused:
                raise OnnxExportError(f"fused graphs asked for, but they cannot serve this export: {reason}")
            logger.info("graphs as exported (the fused ones cannot serve: %s)", reason)
            return None
        return fused_session(self.onnx_dir, self.config, session_options(self.thread_plan, None, spinning=spinning),
                             providers, prepack)

    def _load_shared(self):
        info = self.manifest["shared_data"]
        path = self.onnx_dir / info["file"]
        buffer = np.fromfile(path, dtype=np.uint8)  # read once; both decoder sessions use it in place
        names, arrays = [], []
        for name, entry in info["tensors"].items():
            dtype = onnx.helper.tensor_dtype_to_np_dtype(entry["data_type"])
            start = entry["offset"]
            arrays.append(buffer[start : start + entry["length"]].view(dtype).reshape(entry["shape"]))
            names.append(name)
        return (buffer, arrays), (names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])

    def _exported_options(self, name: str) -> ort.SessionOptions:
        """The options of the export's graph `name`: a method, not a lambda kept on the model, which would hold the
        model in a reference cycle and its weights past its last use until a garbage collection (export_and_validate
        opens the next model right after releasing one)."""
        if self.one_session:
            return one_session_options(self.thread_plan, self.spinning)
        if name == "vision_encoder":
            return session_options(self.thread_plan, None, self.prepack, self.spinning)
        if self._shared is None:  # read once; both exported decoder sessions use it in place (keep it alive)
            self._shared = self._load_shared()
        return session_options(self.thread_plan, self._shared[1], self.prepack, self.spinning)

    def _exported_session(self, name: str) -> ort.InferenceSession:
        """The session of the export's graph `name`, opened on first use."""
        if name not in self.sessions:
            with self._opening:  # two requests may reach a graph first at once
                if name not in self.sessions:
                    self.sessions[name] = self._session(name, self._exported_options(name), self._providers)
                    if self.fused is not None:
                        logger.info("the exported %s graph opened (a request the fused graphs do not serve)", name)
        return self.sessions[name]

    def _session(self, name: str, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
        path = self.onnx_dir / f"{name}.onnx"
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises several pybind types (InvalidProtobuf, Fail, NoSuchFile)
            raise OnnxExportError(f"{path} could not be loaded by ONNX Runtime ({type(e).__name__}: {e}); "
                                  "export again with `python -m export`") from None
        metadata = session.get_modelmeta().custom_metadata_map
        recorded = metadata.get(METADATA_PREFIX + "config_hash")
        if recorded != self.manifest["config_hash"]:
            raise OnnxExportError(f"{path} records config hash {str(recorded)[:12]}, not this export's "
                                  f"{self.manifest['config_hash'][:12]}: it comes from another export; export again")
        return session

    def run(self, name: str, feeds: dict) -> list[ort.OrtValue]:
        """Runs a graph (one of the export's, or "fused") with IO binding: OrtValue inputs (a cache, image
        embeddings) are passed without a copy, and outputs stay where the provider made them (on the GPU for CUDA)
        except the logits, which sampling reads."""
        if self.one_session:
            return self._run_alone(name, feeds)
        session = self.fused if name == "fused" else self._exported_session(name)
        binding = session.io_binding()
        for key, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(key, value)
            else:
                binding.bind_cpu_input(key, value)
        if name not in self.output_names:
            self.output_names[name] = [o.name for o in session.get_outputs()]
        for output in self.output_names[name]:
            if output == "logits":
                binding.bind_output(output, "cpu")
            else:
                binding.bind_output(output, self.device_type, self.device_id)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _run_alone(self, name: str, feeds: dict) -> list[ort.OrtValue]:
        """run() for one_session: a plain run, no IO binding. An output taken from an IO binding keeps its session
        alive (measured, onnxruntime 1.31: the session's memory stayed after it was released), so the prefill
        session would outlive the release while the decode steps use its cache."""
        if name not in self.sessions:
            self._open_alone(name)
        # Contiguous: run() reads a strided array (the engine's slice of positions) as if it were not.
        feeds = {key: np.ascontiguousarray(value.numpy() if isinstance(value, ort.OrtValue) else value)
                 for key, value in feeds.items()}
        return [ort_owned(value) for value in self.sessions[name].run(None, feeds)]

    def _open_alone(self, name: str) -> None:
        """Releases the open session, then opens `name`'s (one_session): the outputs already returned stay valid."""
        self.sessions.clear()
        gc.collect()
        self.sessions[name] = self._session(name, self._exported_options(name), self.providers)
        self.output_names[name] = [o.name for o in self.sessions[name].get_outputs()]
        logger.info("ONNX Runtime session for %s opened alone", name)

    def __call__(self) -> "OnnxEngine":
        return OnnxEngine(self)

    def batch_engine(self, max_batch: int) -> "OnnxBatchEngine | None":
        """The engine of a continuous batch of up to `max_batch` rows, or None where the fused decode graph does not
        serve (each request then runs alone on its own OnnxEngine)."""
        return OnnxBatchEngine(self, max_batch) if self.fused is not None else None


class OnnxEngine:
    """One request: prefill the prompt, then one decode step per token. The decode graph's attention_mask and
    position_ids come from the torch engines' own rule (paligemma.masks).

    With the fused decode graph (export/runtime/fused.py), the cache lives in buffers of a fixed capacity (prompt +
    max_new_tokens slots) allocated at the first decode step, each row's real keys moved to its front; the graph writes
    each new key and value in place. Every input and output is bound once, to arrays updated in place: a step writes
    the tokens, advances positions and lengths by one and runs. The logits are written into one bound buffer and
    returned as a copy of it (callers may keep them). Each engine owns its buffers, so
    concurrent requests on one model share none. Without it (or for a batch whose padding is not on the left),
    the cache is the previous step's `present` outputs fed back as OrtValues, never copied through numpy."""

    def __init__(self, model: OnnxModel):
        self.model = model
        self.fused = False
        self._decoding = None  # prefill's inputs, until the first decode step prepares decoding from them

    def prefill(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        m = self.model
        input_ids = inputs["input_ids"].numpy().astype(np.int64)
        pixel_values = inputs["pixel_values"].numpy().astype(m.float_type)
        (image_embeddings,) = m.run("vision_encoder", {"pixel_values": pixel_values})
        real = inputs["attention_mask"].numpy().astype(np.int64)
        T = input_ids.shape[1]
        if m.fused is not None and T <= rotary_positions(m.config):
            # The prefix-LM mask and positions from the one rule (paligemma/masks.py), as the torch model makes them.
            layout = TokenLayout.last(inputs["attention_mask"].long(), inputs["token_type_ids"].long(), T)
            biases = {bias_name(w): additive(layout.allowed(w), torch.float32).numpy() for w in m.windows}
            logits, *self.past = m.run("fused", {
                "input_ids": input_ids, "image_embeddings": image_embeddings,
                "position_ids": layout.positions().numpy(), **biases, **m.branch_inputs[True],
            })
        else:
            logits, *self.past = m.run("prefill", {
                "input_ids": input_ids, "image_embeddings": image_embeddings,
                "attention_mask": real,
                "token_type_ids": inputs["token_type_ids"].numpy().astype(np.int64),
            })
        self.length = input_ids.shape[1]
        self.capacity = self.length + max_new_tokens
        # What only decoding needs is made at the first decode step, after the first token is out (a request of
        # one token never makes it).
        self._decoding = (inputs["attention_mask"], inputs["token_type_ids"], real, max_new_tokens)
        return torch.from_numpy(logits.numpy())

    def _prepare_decoding(self) -> None:
        attention_mask, token_type_ids, real, max_new_tokens = self._decoding
        self._decoding = None
        # The mask and positions for the whole run, written once.
        self.attention_mask, _ = extend_for_generation(attention_mask.long(), token_type_ids, max_new_tokens)
        self.positions = token_positions(self.attention_mask, torch.arange(self.attention_mask.shape[1])).numpy()
        if self.model.fused is not None and left_padded(real):
            self._bind_fused(real)

    def _bind_fused(self, real: np.ndarray) -> None:
        m, (B, T) = self.model, real.shape
        K, D = m.config.text.num_key_value_heads, m.config.text.head_dim
        if self.capacity > rotary_positions(m.config):
            return  # positions past the fused graph's rotary tables: the exported graph serves this request
        counts = real.sum(1)
        self.rows, spare = B, B % m.row_multiple and m.row_multiple - B % m.row_multiple  # a spare row: see OnnxModel
        self.buffers = []
        for present in self.past:  # each row's real keys to the front of its buffer, once
            rows = present.numpy()
            buffer = np.zeros((B + spare, K, self.capacity, D), dtype=np.float32)
            for b, n in enumerate(counts):
                buffer[b, :, :n] = rows[b, :, T - n :]
            self.buffers.append(buffer)
        self.past = None
        self.input_ids = np.zeros((B + spare, 1), dtype=np.int64)
        # A spare row is a token at position 1 over an empty cache; its logits are dropped.
        self.position_ids = np.ascontiguousarray(np.pad(self.positions[:, T : T + 1], ((0, spare), (0, 0)),
                                                        constant_values=1))
        self.seqlens_k = np.pad(counts, (0, spare)).astype(np.int32)  # the slot each row's next token goes to
        self.total_length = np.array(counts.max() + 1, dtype=np.int32)
        self.logits = np.zeros((B + spare, m.config.text.vocab_size), dtype=np.float32)
        binding = m.fused.io_binding()
        for name, value in m.branch_inputs[False].items():  # the flag, and the prefill branch's inputs (empty)
            binding.bind_cpu_input(name, value)
        values = {"input_ids": self.input_ids, "position_ids": self.position_ids, "seqlens_k": self.seqlens_k,
                  "total_sequence_length": self.total_length}
        # OrtValues over numpy arrays use the arrays' memory: writing the arrays changes the bound inputs.
        self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in [*values.values(), self.logits, *self.buffers]]
        for name, value in zip(values, self._values):
            binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output("logits", self._values[len(values)])
        for past, present, value in zip(m.past_names, m.present_names, self._values[len(values) + 1 :]):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # the same buffer: written in place
        self.binding = binding
        self.fused = True

    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.length >= self.capacity:
            raise InputError(f"this request's cache holds {self.capacity} tokens (its prompt and max_new_tokens, "
                             "allocated at prefill); to generate more, ask for more max_new_tokens")
        if self._decoding is not None:
            self._prepare_decoding()
        self.length += 1
        if self.fused:
            return self._fused_step(tokens)
        m = self.model
        attention_mask = self.attention_mask[:, : self.length]
        feeds = {
            "input_ids": tokens.numpy().astype(np.int64).reshape(-1, 1),
            "attention_mask": attention_mask.contiguous().numpy(),
            "position_ids": self.positions[:, self.length - 1 : self.length],
            **dict(zip(m.past_names, self.past)),
        }
        logits, *self.past = m.run("decode", feeds)
        return torch.from_numpy(logits.numpy())

    def _fused_step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.input_ids[: self.rows, 0] = tokens.numpy()
        self.model.fused.run_with_iobinding(self.binding)
        # Every row's next token is real: one slot and one position further.
        self.seqlens_k += 1
        self.position_ids += 1
        self.total_length += 1
        # A copy: callers may keep every step's logits (the app's torch check does); the graph writes the next
        # step's into the same bound buffer.
        return torch.from_numpy(self.logits[: self.rows].copy())


class OnnxBatchEngine:
    """Rows of many requests on the fused session (its prefill, then its decode step): each request is prefilled
    alone (its own prefix-LM mask, no padding), its cache joins a pool of rows (paligemma.cache.RowPool: one buffer
    per layer, [rows, K, M, D], M the longest prompt plus budget among them), and each step runs every row at once,
    GroupQueryAttention reading each row's own length (`seqlens_k`) and position. The pool's buffers are the graph's
    past and present, written in place. A row's logits do not depend on the other rows where the session is
    pre-packed (MLAS multiplies every row by the packed weights alike, whatever the number of rows; unpacked, a
    single row takes another kernel, and several rows pack the weights on every call): OnnxModel's
    `batch_prepack`, on for a batch."""

    def __init__(self, model: OnnxModel, max_batch: int):
        self.model, self.max_batch = model, max_batch
        # Room for the spare rows that round a step up to the model's row multiple.
        self.pool = RowPool(model.config.text, -(-max_batch // model.row_multiple) * model.row_multiple)
        self._steps: dict[int, DecodeBinding] = {}  # the decode step's binding by rows, for the pool's buffers
        self._buffers = None

    def widen(self, max_batch: int) -> None:
        """Room for `max_batch` rows (the pool allocates as rows join); while no row is in the batch."""
        if self.pool.rows:
            raise RuntimeError("the batch can be widened only while it is empty")
        self.max_batch = max_batch
        self.pool.max_rows = -(-max_batch // self.model.row_multiple) * self.model.row_multiple

    def prefill(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> tuple[PrefilledRow, torch.Tensor]:
        return self._prefill_rows(inputs, [max_new_tokens])[0]

    @property
    def exact_groups(self) -> bool:
        """Whether rows prefilled together get the bits each gets alone: on a float export (its products multiply
        row by row alike). Not on a quantized one: MatMulNBits gives the last row of an odd number of rows other bits
        than a row in a pair (OnnxModel.row_multiple), and the fused prefill's last layer and logits run one row per
        prompt (a prefill alone: one row, the odd one; several: pairs), as do an odd prompt's last tokens."""
        return self.model.row_multiple == 1

    def prefill_many(self, inputs: list[dict[str, torch.Tensor]],
                     max_new_tokens: list[int]) -> list[tuple[PrefilledRow, torch.Tensor]]:
        """prefill of several requests (each one row, processed alone), in their order: where `exact_groups`, the
        rows of one prompt length without padding (the processor pads none of a request of one row) run as one
        batch, through the vision tower and the fused prefill at once, which gives each row the bits it gets alone
        (the fused graph multiplies row by row alike: export/runtime/fused.py; checked by tests/test_batch.py and
        bench/batch.py); the others alone."""
        results: list = [None] * len(inputs)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(inputs):
            T = row["input_ids"].shape[1]
            if self.exact_groups and row["input_ids"].shape[0] == 1 and T <= rotary_positions(self.model.config) \
                    and bool(row["attention_mask"].all()):
                groups.setdefault(T, []).append(i)
            else:
                results[i] = self.prefill(row, max_new_tokens[i])
        for rows in groups.values():
            stacked = {key: torch.cat([inputs[i][key] for i in rows]) for key in inputs[rows[0]]}
            for i, result in zip(rows, self._prefill_rows(stacked, [max_new_tokens[i] for i in rows])):
                results[i] = result
        return results

    def _prefill_rows(self, inputs: dict[str, torch.Tensor],
                      max_new_tokens: list[int]) -> list[tuple[PrefilledRow, torch.Tensor]]:
        """Each row of a prefill: its cache (copied out of the batch's) and its logits [1, V]."""
        engine = OnnxEngine(self.model)
        logits = engine.prefill(inputs, max(max_new_tokens))
        past = [value.numpy() for value in engine.past]  # [B, K, T, D] each
        rows = []
        for b, budget in enumerate(max_new_tokens):
            keys = torch.from_numpy(np.stack([value[b] for value in past[0::2]]))  # [L, K, T, D], a copy
            values = torch.from_numpy(np.stack([value[b] for value in past[1::2]]))
            rows.append((PrefilledRow(keys, values, inputs["token_type_ids"][b], keys.shape[2] + budget),
                         logits[b : b + 1]))
        return rows

    def join(self, prefilled: PrefilledRow) -> int:
        return self.pool.join(prefilled.keys, prefilled.values, prefilled.token_types, prefilled.capacity)

    def decode(self, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        m, pool, n = self.model, self.pool, self.pool.rows
        if len(rows) != n or set(rows) != set(pool.ids):
            raise ValueError(f"a decode step runs every row in the batch ({n}), got {len(rows)}")
        places = pool.places(rows)
        # Spare rows (a token at position 1 over an empty cache, their logits dropped) round the step up to the
        # model's row multiple, in places of the pool that no row holds.
        spare = n % m.row_multiple and m.row_multiple - n % m.row_multiple
        pool.grow(n + spare, pool.capacity)
        step = self._step(n + spare)
        step.input_ids[places, 0] = tokens.numpy()
        # Each row's next slot: its tokens so far, all real (no padding).
        step.seqlens_k[:n] = pool.lengths[:n].numpy()
        longest = int(step.seqlens_k.max())
        if longest >= pool.capacity:  # the graph would write past the buffer
            raise InputError(f"a row's cache holds {pool.capacity} tokens; ask for more max_new_tokens")
        step.position_ids[:, 0] = step.seqlens_k + 1  # PaliGemma counts from 1
        step.total_length[...] = longest + 1
        m.fused.run_with_iobinding(step.binding)
        pool.lengths[:n] += 1
        return torch.from_numpy(step.logits[places])  # a copy: the next step writes the bound buffer

    def _step(self, rows: int) -> "DecodeBinding":
        """The decode step's binding for `rows` rows (spare ones included) of the pool's buffers, made once and kept
        while the buffers stay (the step's inputs are arrays written in place; the graph reads and writes each row's
        cache in the pool)."""
        pool = self.pool
        buffers = (pool.keys.data_ptr(), pool.values.data_ptr(), pool.keys.shape)
        if self._buffers != buffers:
            self._steps.clear()
            self._buffers = buffers
        if rows not in self._steps:
            self._steps[rows] = DecodeBinding(self.model, pool, rows)
        return self._steps[rows]

    def release(self, row: int) -> None:
        self.pool.leave(row)


class DecodeBinding:
    """The fused session's decode step bound for `rows` rows of a RowPool: its inputs are arrays of this object,
    written in place before each run (the spare rows keep token 0, length 0, position 1), its logits a buffer of
    its own, and each layer's past and present the pool's buffer (its first `rows` rows), read and written in
    place."""

    def __init__(self, model: OnnxModel, pool: RowPool, rows: int):
        self.input_ids = np.zeros((rows, 1), dtype=np.int64)
        self.position_ids = np.ones((rows, 1), dtype=np.int64)
        self.seqlens_k = np.zeros(rows, dtype=np.int32)
        self.total_length = np.zeros((), dtype=np.int32)
        self.logits = np.empty((rows, model.config.text.vocab_size), dtype=np.float32)
        binding = model.fused.io_binding()
        for name, value in model.branch_inputs[False].items():  # the flag, and the prefill branch's inputs (empty)
            binding.bind_cpu_input(name, value)
        # OrtValues over numpy arrays use the arrays' memory: writing the arrays changes the bound inputs. They are
        # kept with the binding, as are the arrays.
        arrays = {"input_ids": self.input_ids, "position_ids": self.position_ids, "seqlens_k": self.seqlens_k,
                  "total_sequence_length": self.total_length}
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        for name, value in self.values.items():
            binding.bind_ortvalue_input(name, value)
        self.values["logits"] = ort.OrtValue.ortvalue_from_numpy(self.logits)
        binding.bind_ortvalue_output("logits", self.values["logits"])
        for i, (past, present) in enumerate(zip(model.past_names, model.present_names)):
            buffer = (pool.keys if i % 2 == 0 else pool.values)[i // 2, :rows].numpy()
            self.values[past] = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(past, self.values[past])
            binding.bind_ortvalue_output(present, self.values[past])
        self.binding = binding


def export_and_validate(source, output, *, log=print, **options) -> dict:
    """export_model(source, output, **options), then validate_export through this runtime's sessions: what
    `python -m export` and the export cache run. `source`: a Checkpoint, a checkpoint folder or a Hub repo id.
    Returns the manifest."""
    from ..writer.onnx_export import DEFAULT_OPSET, check_options, export_model, removed_on_failure

    dtype = options.get("dtype", "float32")
    check_options(output, dtype, options.get("quantize"), options.get("opset", DEFAULT_OPSET))
    checkpoint = Checkpoint.resolve(source)
    with removed_on_failure(Path(output)):
        # One step at a time, the torch reference first (while this process holds nothing large), so that the
        # torch model, the export's working memory and ONNX Runtime's weights are never in memory together. The
        # reference streams the layers (docs/export.md "Streaming export"): its peak stays below ONNX Runtime's
        # even when a 4-bit export holds an eighth of the float32 weights.
        reference = torch_reference(checkpoint, dtype, streamed=True)
        manifest = export_model(checkpoint, output, log=log, **options)
        config = checkpoint.config  # what the export's config.json was written from
        # The graphs as written are what other runtimes read; the fused ones (export/runtime/fused.py), built from them
        # at load, are what this runtime serves where they apply: both are held to torch, one after the other.
        # float16 on CPU: each session casts its weights to a float32 copy of its own, so one session at a time.
        model = OnnxModel(output, config, fused=False, one_session=manifest["dtype"] == "float16")
        validate_export(reference, model, log=log)
        del model
        if unsupported(config, manifest["dtype"], manifest["quantize"]) is None:
            log("the fused prefill and decode graphs this runtime builds from them:")
            validate_export(reference, OnnxModel(output, config, fused=True), log=log)
    return manifest


def cache_entry(config: PaliGemmaConfig, fingerprint: str, dtype: str = "float32", quantize: str | None = None,
                salt: str = "") -> str:
    """The folder name of an export in a cache: it changes with the config, the weights, the dtype, the quantization
    and the exporter's version (and `salt`: the benchmark adds its exporter's source), and ends in the variant's
    name so that a listing says which is which."""
    parts = (config_hash(config), fingerprint, dtype, quantize or "none", EXPORTER_VERSION, salt)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24] + "-" + variant_name(dtype, quantize)


def cached_export(checkpoint: Checkpoint, dtype: str = "float32", quantize: str | None = None, *,
                  root: Path | None = None, salt: str = "", make: Callable[[Path], None] | None = None) -> Path:
    """The export of this checkpoint as `dtype` / `quantize` in the export cache (`root`, default cache_root()),
    made on first use, into a staging folder renamed into place once complete, by `make(staging)`: by default
    export_and_validate with progress bars (the benchmark passes its own, which skips validation)."""
    entry = cache_entry(checkpoint.config, checkpoint.fingerprint, dtype, quantize, salt)
    target = Path(root or cache_root()) / entry
    if (target / MANIFEST_NAME).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{entry}.partial-{os.getpid()}")
    logger.info("exporting %s to ONNX as %s (first use; cached in %s)", checkpoint.folder,
                variant_name(dtype, quantize), target)
    try:
        if make is None:
            export_and_validate(checkpoint, staging, dtype=dtype, quantize=quantize, progress=True)
        else:
            make(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished the same export first
            if not (target / MANIFEST_NAME).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_onnx_pipeline(source, onnx_dir=None, device: str = "cpu", threads: int | None = None,
                       requests: int | None = None, prepack: bool = False, spinning: bool = False,
                       quantize: str | None = None, max_batch: int | None = None) -> Pipeline:
    """A Pipeline generating with ONNX Runtime: from the export in `onnx_dir` (checked against the checkpoint's
    config hash and weights), or from the export cache, exporting on first use. `source` is a Checkpoint, a
    checkpoint folder or Hub repo id, or an export directory itself. `threads` (intra-op, per request) and `requests`
    (how many run at once) override the plan chosen for the machine and the model (export/threads.py;
    `pipeline.engine_factory.thread_plan`); `spinning` turns ONNX Runtime's busy-waiting threads back on (its
    default, slower here: bench/threads.py). `prepack` pre-packs every session (MLAS lays out each weight once); the
    fused session, which releases each stored weight it packs, is pre-packed anyway for a batch (`max_batch` > 1),
    a decoder below 256 MB, or a quantized export, and the exported graphs' sessions hold their own packed copy
    each. `quantize` ("int8" or "int4") picks the quantized export
    from the cache (made on first use); an export folder given as `source` or `onnx_dir` must be that variant.
    `max_batch`: rows of the continuous batch on the fused decode graph (paligemma.load's; default
    paligemma.default_max_batch); transformers.js' layout and the graphs as exported run each call alone."""
    if max_batch is not None:
        check_max_batch(max_batch)
    checkpoint = source if isinstance(source, Checkpoint) else None
    folder = checkpoint.folder if checkpoint is not None else resolve_checkpoint(source)
    # transformers.js' layout (python -m export --format transformers.js) has an engine of its own.
    from ..transformers_js.runtime import load_transformers_js_pipeline
    from ..transformers_js.writer import is_transformers_js_export

    for candidate in (onnx_dir, folder):
        if candidate is not None and is_transformers_js_export(candidate):
            return load_transformers_js_pipeline(candidate, quantize=quantize, providers=choose_providers(device),
                                                 options=lambda plan: session_options(plan, None, prepack, spinning),
                                                 threads=threads, requests=requests)
    if onnx_dir is None and (folder / MANIFEST_NAME).exists():  # an export folder: its own config and tokenizer
        try:
            config = PaliGemmaConfig.from_json_file(folder / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        onnx_dir, fingerprint, processor = folder, None, PaliGemmaProcessor.from_pretrained(folder, config)
    else:
        checkpoint = checkpoint or Checkpoint.read(folder)
        config, fingerprint, processor = checkpoint.config, checkpoint.fingerprint, checkpoint.processor()
        if onnx_dir is None:
            onnx_dir = cached_export(checkpoint, quantize=quantize)
    # The fused decode graph, where it serves, batches on the CPU: max_batch is decided before its session is made.
    rows = max_batch or default_max_batch(config, torch.device("cpu"), 4)
    model = OnnxModel(onnx_dir, config, device=device, fingerprint=fingerprint, threads=threads, requests=requests,
                      prepack=prepack, spinning=spinning, batch_prepack=rows > 1)
    if quantize is not None and exported_variant(model.manifest) != quantize:
        raise OnnxExportError(f"{onnx_dir} is a {exported_variant(model.manifest)} export, "
                              f"not the {quantize} one asked "
                              f"for; export it with `python -m export --quantize {quantize}`, or load the checkpoint "
                              "folder without onnx_dir (the cache makes it)")
    return Pipeline(None, processor, model, mask_decoder=load_onnx_mask_decoder(onnx_dir, folder),
                    batch_engine=model.batch_engine(rows))
