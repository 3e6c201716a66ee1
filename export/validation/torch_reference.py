"""The torch side of the export's validation, recorded in a process of its own (in the exporting process for
checkpoints under IN_PROCESS_BYTES).

    python -m export.validation.torch_reference CHECKPOINT DTYPE OUT [--streamed]

The torch model and ONNX Runtime's copy of the weights would need twice the weights' memory side by side; here the
child records what torch gives on the validation requests (image embeddings, prefill logits, the greedy tokens and
the logits of each decode step) into OUT (safetensors), and exits, returning its memory before the parent exports
and ONNX Runtime loads the export. The child reads the weights tensor by tensor (export/writer/checkpoint_stream.py),
and either holds them once (the whole model) or, `--streamed`, one layer at a time (layer_streamed): each layer's
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

from paligemma.checkpoint import Checkpoint
from paligemma.engines import TorchEngine
from paligemma.errors import CheckpointError, OnnxExportError
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.processor import PaliGemmaProcessor

from ..writer.checkpoint_stream import CheckpointStream
from .validate import DECODE_STEPS, validation_requests

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# Checkpoints smaller than this are recorded in the exporting process: a child costs ~3 s of imports, more than a
# second copy of such weights costs in memory.
IN_PROCESS_BYTES = 256 * 2**20


def load_streamed(checkpoint: Checkpoint, dtype: torch.dtype) -> PaliGemmaForConditionalGeneration:
    """The model with its weights read one tensor at a time (load_model's strict checks, no mapped file)."""
    source = CheckpointStream(checkpoint)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(checkpoint.config)
    source.check_against(model)
    model.load_state_dict({name: source.read(name, dtype) for name in source.tensors}, strict=True, assign=True)
    return model.eval()


def streamed_units(model: PaliGemmaForConditionalGeneration) -> dict[str, nn.Module]:
    """The modules whose weights are read on entry and dropped on exit, by name: every vision and decoder layer
    (the weights that grow with depth). The rest stays resident: the token embedding (2.1 GB at 3B: read once
    rather than twice per step, for the lookup and the tied output projection) and a few MB of patch and position
    embeddings, norms and projector."""
    return {**{f"vision_tower.vision_model.encoder.layers.{i}": layer
               for i, layer in enumerate(model.vision_tower.vision_model.encoder.layers)},
            **{f"language_model.model.layers.{i}": layer for i, layer in enumerate(model.decoder.layers)}}


def hollow(module: nn.Module) -> None:
    """Back to the meta device: the module's weights are released."""
    module.to_empty(device="meta")


def layer_streamed(checkpoint: Checkpoint, dtype: torch.dtype) -> PaliGemmaForConditionalGeneration:
    """The model whose layers read their weights when its forward reaches them and drop them when it leaves, the
    model's own code running unchanged (forward hooks do the reading): what it computes is what load_streamed's model
    computes, holding one layer at a time besides what stays resident (streamed_units)."""
    source = CheckpointStream(checkpoint)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(checkpoint.config)
    source.check_against(model)
    model.requires_grad_(False)
    units = streamed_units(model)
    resident = {name: tensor for name, tensor in source.tensors.items()
                if not any(name.startswith(unit + ".") for unit in units)}
    # Every name and shape is checked (check_against); what is left unloaded must be exactly the streamed units'.
    left = model.load_state_dict({name: source.read(name, dtype) for name in resident}, strict=False, assign=True)
    streamed = [name for name in left.missing_keys if not any(name.startswith(unit + ".") for unit in units)]
    if left.unexpected_keys or streamed:
        raise CheckpointError(f"{checkpoint.folder}: tensors that do not fit the model's resident part: "
                              f"{', '.join(left.unexpected_keys + streamed)}")

    def load(prefix: str):
        def hook(module: nn.Module, args):
            module.load_state_dict({name: source.read(f"{prefix}.{name}", dtype)
                                    for name, _ in module.named_parameters()},
                                   strict=True, assign=True)
        return hook

    for prefix, unit in units.items():
        unit.register_forward_pre_hook(load(prefix))
        unit.register_forward_hook(lambda module, args, output: hollow(module))
    return model.eval()


def record(model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor) -> dict:
    """Torch's image embeddings, prefill logits, greedy tokens and decode logits on the validation requests, one
    run per request. The requests share one layout (validation_requests) and run as one batch, so that each step
    passes over the weights once for all of them (the layer-streamed model reads every layer once per step)."""
    requests = validation_requests(processor, model.config)
    batch = {name: torch.cat([inputs[name] for inputs in requests]) for name in requests[0]}
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        engine = TorchEngine(model)
        logits = engine.prefill(batch, DECODE_STEPS)
        ran = dict(image_embeddings=model.embed_image(batch["pixel_values"].to(dtype)), prefill=logits,
                   tokens=[], decode=[])
        for _ in range(DECODE_STEPS):
            ran["tokens"].append(logits.argmax(-1))
            logits = engine.decode_step(ran["tokens"][-1])
            ran["decode"].append(logits)
    runs, first = [], 0
    for inputs in requests:
        rows = slice(first, first + len(inputs["input_ids"]))
        first = rows.stop
        runs.append({name: [step[rows] for step in value] if isinstance(value, list) else value[rows]
                     for name, value in ran.items()})
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


def torch_reference(checkpoint: Checkpoint, dtype: str, streamed: bool = False,
                    in_process: bool | None = None) -> dict:
    """record() for the checkpoint, on the whole model or layer by layer (`streamed`); OnnxExportError with the
    reason if it fails. In a child process of its own, which reads the checkpoint's folder itself and returns the
    torch model's memory when it exits, unless `in_process` (default: for checkpoints under IN_PROCESS_BYTES, where
    starting a process costs more than the model's memory is worth)."""
    if in_process is None:
        in_process = sum(f.stat().st_size for f in checkpoint.weight_files) < IN_PROCESS_BYTES
    if in_process:
        try:
            return recorded(checkpoint, dtype, streamed)
        except CheckpointError as e:
            raise OnnxExportError(f"the torch reference for validating the export of {checkpoint.folder} failed: "
                                  f"{e}") from e
    with tempfile.TemporaryDirectory(prefix="paligemma-reference-") as tmp:
        out = Path(tmp) / "reference.safetensors"
        env = dict(os.environ,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", "export.validation.torch_reference", str(checkpoint.folder), dtype, str(out)]
        done = subprocess.run(command + (["--streamed"] if streamed else []), capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise OnnxExportError(f"the torch reference for validating the export of {checkpoint.folder} failed: "
                                  f"{last[0]}")
        return load_record(out)


def recorded(checkpoint: Checkpoint, dtype: str, streamed: bool = False) -> dict:
    """record() on the checkpoint's model, loaded whole or layer by layer (`streamed`), in this process."""
    model = (layer_streamed if streamed else load_streamed)(checkpoint, getattr(torch, dtype))
    return record(model, checkpoint.processor())  # a streamed model reads its shards here too


def main(argv: list[str]) -> int:
    streamed = "--streamed" in argv
    folder, dtype, out = [arg for arg in argv if arg != "--streamed"]
    try:
        record_ = recorded(Checkpoint.read(Path(folder)), dtype, streamed)
    except CheckpointError as e:  # the parent reports the last line of stderr
        print(e, file=sys.stderr)
        return 1
    save_record(record_, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
