"""The torch side of the export's validation, recorded in a process of its own.

    python -m export.torch_reference CHECKPOINT DTYPE OUT [--streamed]

The torch model and ONNX Runtime's copy of the weights would need twice the weights' memory side by side; here the
child records what torch gives on the validation requests (image embeddings, prefill logits, the greedy tokens and
the logits of each decode step) into OUT (safetensors), and exits, returning its memory before the parent exports
and ONNX Runtime loads the export. The child reads the weights tensor by tensor (export/checkpoint_stream.py), and
either holds them once (the whole model) or, `--streamed`, one layer at a time (layer_streamed): each layer's
tensors are read when the model's own forward reaches it and dropped when it leaves, every decode step passing over
all the layers again (the reads come from the page cache), so that a 4-bit export of a model whose float32 weights
exceed the machine's memory can still be checked against float32 torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from torch import nn

from paligemma.engines import TorchEngine
from paligemma.gemma import GemmaModel
from paligemma.errors import CheckpointError, OnnxExportError
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.processor import PaliGemmaProcessor

from .checkpoint_stream import CheckpointStream, StoredTensor
from .validate import DECODE_STEPS, validation_requests

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def load_streamed(folder: Path, dtype: torch.dtype) -> PaliGemmaForConditionalGeneration:
    """The model with its weights read one tensor at a time (load_model's strict checks, no mapped file)."""
    from .onnx_export import read_config

    source = CheckpointStream(folder)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(read_config(folder))
    source.check_against(model)
    model.load_state_dict({name: source.read(name, dtype) for name in source.tensors}, strict=True, assign=True)
    return model.eval()


EMBEDDING = "language_model.model.embed_tokens.weight"


def streamed_units(model: PaliGemmaForConditionalGeneration) -> dict[str, nn.Module]:
    """The modules whose weights are read on entry and dropped on exit, by name: every vision and decoder layer
    (the weights that grow with depth). The rest stays resident (the patch and position embeddings, norms,
    projector: a few MB even at 3B), the token embedding apart (layer_streamed)."""
    return {**{f"vision_tower.vision_model.encoder.layers.{i}": layer
               for i, layer in enumerate(model.vision_tower.vision_model.encoder.layers)},
            **{f"language_model.model.layers.{i}": layer for i, layer in enumerate(model.decoder.layers)}}


def read_rows(stored: StoredTensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `rows` of a stored matrix, converted to `dtype`, read one by one (the embedding lookup's few hundred)."""
    out = torch.empty((len(rows), *stored.shape[1:]), dtype=stored.dtype)
    raw = out.view(torch.uint8).view(len(rows), -1)
    with open(stored.file, "rb") as f:
        for i, row in enumerate(rows.tolist()):
            f.seek(stored.start + row * stored.row_bytes)
            if f.readinto(raw[i].numpy()) != stored.row_bytes:
                raise CheckpointError(f"{stored.file} ended inside {EMBEDDING}: the shard was truncated; download it again")
    return out.to(dtype)


def hollow(module: nn.Module) -> None:
    """Back to the meta device: the module's weights are released."""
    module.to_empty(device="meta")


def layer_streamed(folder: Path, dtype: torch.dtype) -> PaliGemmaForConditionalGeneration:
    """The model whose layers read their weights when its forward reaches them and drop them when it leaves, the
    model's own code running unchanged (forward hooks do the reading): what it computes is what load_streamed's model
    computes, holding one layer at a time. The token embedding (the largest matrix, 2.1 GB at 3B) is never held
    whole: the lookup reads the rows of the tokens it is given, and the tied output projection runs over the
    matrix in blocks of rows (CheckpointStream.blocks), each block through the model's own `logits`."""
    from .onnx_export import read_config

    source = CheckpointStream(folder)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(read_config(folder))
    source.check_against(model)
    model.requires_grad_(False)
    units = streamed_units(model)
    embedding = model.decoder.embed_tokens
    resident = {name: tensor for name, tensor in source.tensors.items()
                if name != EMBEDDING and not any(name.startswith(unit + ".") for unit in units)}
    # Not strict: the units and the embedding stay on the meta device (check_against has checked every name and shape).
    model.load_state_dict({name: source.read(name, dtype) for name in resident}, strict=False, assign=True)

    def load(prefix: str):
        def hook(module: nn.Module, args):
            module.load_state_dict({name: source.read(f"{prefix}.{name}", dtype) for name, _ in module.named_parameters()},
                                   strict=True, assign=True)
        return hook

    for prefix, unit in units.items():
        unit.register_forward_pre_hook(load(prefix))
        unit.register_forward_hook(lambda module, args, output: hollow(module))

    def look_up(module: nn.Embedding, args):
        (input_ids,) = args
        rows, index = input_ids.unique(return_inverse=True)  # the lookup over the rows read, renumbered
        module.weight = nn.Parameter(read_rows(source.tensors[EMBEDDING], rows, dtype), requires_grad=False)
        return (index,)

    embedding.register_forward_pre_hook(look_up)
    embedding.register_forward_hook(lambda module, args, output: hollow(module))
    decoder = model.decoder

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        pieces = []
        for block in source.blocks(EMBEDDING, dtype):
            embedding.weight = nn.Parameter(block, requires_grad=False)
            pieces.append(GemmaModel.logits(decoder, hidden))
        hollow(embedding)
        return torch.cat(pieces, dim=-1)

    decoder.logits = logits  # this instance's output projection, by blocks (the class's rule, applied per block)
    return model.eval()


def record(model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor) -> dict:
    requests = validation_requests(processor, model.config)
    dtype = next(model.parameters()).dtype
    runs = []
    with torch.inference_mode():
        for inputs in requests:
            engine = TorchEngine(model)
            logits = engine.prefill(inputs, DECODE_STEPS)
            run = dict(image_embeddings=model.embed_image(inputs["pixel_values"].to(dtype)), prefill=logits,
                       tokens=[], decode=[])
            for _ in range(DECODE_STEPS):
                run["tokens"].append(logits.argmax(-1))
                logits = engine.decode_step(run["tokens"][-1])
                run["decode"].append(logits)
            runs.append(run)
    return dict(requests=requests, runs=runs)


def save_record(recorded: dict, path: Path) -> None:
    """record()'s tensors as one safetensors file (no pickle), under "{request}.{field}[.{step}]" names."""
    tensors = {}
    for i, (inputs, run) in enumerate(zip(recorded["requests"], recorded["runs"])):
        tensors.update({f"{i}.request.{name}": value for name, value in inputs.items()})
        tensors.update({f"{i}.{name}": run[name] for name in ("image_embeddings", "prefill")})
        for name in ("tokens", "decode"):
            tensors.update({f"{i}.{name}.{step}": value for step, value in enumerate(run[name])})
    save_file({name: value.clone() for name, value in tensors.items()}, str(path))  # clones: no shared storage


def load_record(path: Path) -> dict:
    """What save_record wrote, as record() returned it."""
    tensors = load_file(str(path))
    requests, runs = [], []
    for i in range(len({name.split(".")[0] for name in tensors})):
        requests.append({name.split(".", 2)[2]: value for name, value in tensors.items()
                         if name.startswith(f"{i}.request.")})
        runs.append(dict(image_embeddings=tensors[f"{i}.image_embeddings"], prefill=tensors[f"{i}.prefill"],
                         **{name: [tensors[f"{i}.{name}.{step}"] for step in range(DECODE_STEPS)]
                            for name in ("tokens", "decode")}))
    return dict(requests=requests, runs=runs)


def torch_reference(checkpoint: Path, dtype: str, streamed: bool = False) -> dict:
    """record() for the checkpoint, run in a child process, on the whole model or layer by layer (`streamed`);
    OnnxExportError with the child's error if it fails."""
    with tempfile.TemporaryDirectory(prefix="paligemma-reference-") as tmp:
        out = Path(tmp) / "reference.safetensors"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
        if streamed:
            # A fixed threshold: glibc's adaptive one rises past the per-layer tensors once the first is freed, after
            # which each layer's weights come from a heap that fragments and keeps growing (measured: 2.3x the peak).
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
        command = [sys.executable, "-m", "export.torch_reference", str(checkpoint), dtype, str(out)]
        done = subprocess.run(command + (["--streamed"] if streamed else []), capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise OnnxExportError(f"the torch reference for validating the export of {checkpoint} failed: {last[0]}")
        return load_record(out)


def main(argv: list[str]) -> int:
    streamed = "--streamed" in argv
    checkpoint, dtype, out = [arg for arg in argv if arg != "--streamed"]
    try:
        model = (layer_streamed if streamed else load_streamed)(Path(checkpoint), getattr(torch, dtype))
        processor = PaliGemmaProcessor.from_pretrained(Path(checkpoint), model.config)
        recorded = record(model, processor)  # a streamed model reads its shards here too
    except CheckpointError as e:  # the parent reports the last line of stderr
        print(e, file=sys.stderr)
        return 1
    save_record(recorded, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
