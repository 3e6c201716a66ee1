"""The torch side of the export's validation, recorded in a process of its own.

    python -m export.torch_reference CHECKPOINT DTYPE OUT

The torch model and ONNX Runtime's copy of the weights would need twice the weights' memory side by side; here the
child loads the model, records what torch gives on the validation requests (image embeddings, prefill logits, the
greedy tokens and the logits of each decode step) into OUT (safetensors), and exits, returning its memory before the parent
exports and ONNX Runtime loads the export. The child reads the weights tensor by tensor (export/checkpoint_stream.py) so
that it holds them once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from paligemma.engines import TorchEngine
from paligemma.errors import CheckpointError, OnnxExportError
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.processor import PaliGemmaProcessor

from .checkpoint_stream import CheckpointStream
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


def torch_reference(checkpoint: Path, dtype: str) -> dict:
    """record() for the checkpoint, run in a child process; OnnxExportError with the child's error if it fails."""
    with tempfile.TemporaryDirectory(prefix="paligemma-reference-") as tmp:
        out = Path(tmp) / "reference.safetensors"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
        done = subprocess.run([sys.executable, "-m", "export.torch_reference", str(checkpoint), dtype, str(out)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise OnnxExportError(f"the torch reference for validating the export of {checkpoint} failed: {last[0]}")
        return load_record(out)


def main(argv: list[str]) -> int:
    checkpoint, dtype, out = argv
    try:
        model = load_streamed(Path(checkpoint), getattr(torch, dtype))
    except CheckpointError as e:  # the parent reports the last line of stderr
        print(e, file=sys.stderr)
        return 1
    processor = PaliGemmaProcessor.from_pretrained(Path(checkpoint), model.config)
    save_record(record(model, processor), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
