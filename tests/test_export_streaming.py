"""The streaming export: memory bounded by the weights (validation included), bfloat16 sources, and what a
truncated shard or a full disk leave behind (nothing that looks like an export)."""

import errno
import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny import build_reference

import paligemma
from bench.workloads import Workload
from export.runtime import export_and_validate
from export.writer import onnx_export
from export.writer.manifest import MANIFEST_NAME
from paligemma.errors import CheckpointError, OnnxExportError

BOUND = 1.4  # peak RSS above a process that only imports the libraries, in float32 weight bytes
# Weights dominate: a 128k x 1024 embedding (537 MB in float32) on one small layer per tower. Smaller models
# drown in fixed costs (the torch, tracer and ONNX Runtime set-up, ~150 MB) that do not grow with the weights.
WEIGHT_HEAVY = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, patch_size=14, image_size=28),
    text=dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
              vocab_size=131072),
    image_token_index=131000,
)
IMAGE = Image.new("RGB", (24, 24), (200, 30, 90))


def quiet(*_):
    pass


def to_bfloat16(folder):
    path = folder / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


def peak_rss_kb(command: list[str]) -> int:
    """ru_maxrss of `command` and every process it waits for (the largest of them), measured from a fresh parent."""
    probe = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " \
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def weight_heavy(tmp_path_factory):
    workload = Workload("weight-heavy", "a big embedding on small towers", WEIGHT_HEAVY, vision_layers=1, text_layers=1)
    return workload.prepare(tmp_path_factory.mktemp("heavy"), log=quiet)


@pytest.mark.parametrize("source_dtype", ["float32", "bfloat16"])
def test_export_with_validation_stays_within_the_weights_bound(weight_heavy, tmp_path, source_dtype):
    folder = weight_heavy
    if source_dtype == "bfloat16":
        folder = tmp_path / "bf16"
        folder.mkdir()
        for file in weight_heavy.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        to_bfloat16(folder)
    out = tmp_path / "onnx"
    baseline = peak_rss_kb([sys.executable, "-c",
                            "import export.writer.onnx_export, export.runtime, export.validation.torch_reference"])
    peak = peak_rss_kb([sys.executable, "-m", "export", "--model", str(folder), "--output", str(out)])
    weight_bytes = json.loads((out / MANIFEST_NAME).read_text())["weight_bytes"]
    assert weight_bytes > 500e6
    added = (peak - baseline) * 1024
    assert added <= BOUND * weight_bytes, f"{added / 1e6:.0f} MB above the baseline for {weight_bytes / 1e6:.0f} MB"


@pytest.fixture(scope="module")
def bfloat16_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg2_bf16")
    build_reference(folder, "pg2")
    to_bfloat16(folder)
    return folder


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_bfloat16_checkpoint_exports_and_validates(bfloat16_checkpoint, tmp_path, dtype):
    out = tmp_path / dtype
    manifest = export_and_validate(bfloat16_checkpoint, out, dtype=dtype, progress=False, log=quiet)
    assert manifest["dtype"] == dtype
    if dtype == "float32":  # bfloat16 values are exact in float32: the same tokens as torch
        expected = paligemma.load(bfloat16_checkpoint).generate(IMAGE, "caption en", max_new_tokens=8).token_ids
        got = paligemma.load(bfloat16_checkpoint, backend="onnx", onnx_dir=out)
        assert got.generate(IMAGE, "caption en", max_new_tokens=8).token_ids == expected


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "pg1"
    build_reference(folder, "pg1")
    return folder


def test_a_truncated_shard_is_refused_before_anything_is_written(checkpoint, tmp_path):
    shard = checkpoint / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "onnx"
    with pytest.raises(CheckpointError, match=rf"{shard} is truncated: \d+ bytes where its header needs \d+"):
        onnx_export.export_model(checkpoint, out, progress=False, log=quiet)
    assert not out.exists()


def test_the_command_names_a_truncated_shard_and_writes_nothing(checkpoint, tmp_path, capsys):
    from export.__main__ import main

    shard = checkpoint / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "onnx"
    assert main(["--model", str(checkpoint), "--output", str(out)]) == 1
    assert f"{shard} is truncated" in capsys.readouterr().err
    assert not out.exists()


def test_a_shard_truncated_mid_export_is_named_and_the_partial_export_removed(checkpoint, tmp_path, monkeypatch):
    shard = checkpoint / "model.safetensors"
    trace = onnx_export.trace_to_onnx

    def truncate_before_the_decoder(module, inputs, spec, *args, **kwargs):
        if spec.name == "prefill":  # the vision weights are written; the decoder's are still to read
            with open(shard, "r+b") as f:
                f.truncate(shard.stat().st_size // 2)
        return trace(module, inputs, spec, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "trace_to_onnx", truncate_before_the_decoder)
    out = tmp_path / "onnx"
    with pytest.raises(CheckpointError, match=rf"{shard} ended inside tensor .*truncated"):
        export_and_validate(checkpoint, out, progress=False, log=quiet)
    assert not out.exists()


class FullDisk:
    """A file whose device fills after `room` bytes."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data):
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, "No space left on device", self.file.name)
        self.room -= size
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_is_reported_and_leaves_no_export(checkpoint, tmp_path, monkeypatch):
    from export.writer import external_data

    monkeypatch.setattr(external_data, "open", lambda path, mode: FullDisk(open(path, mode), 100_000), raising=False)
    new, existing = tmp_path / "new", tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("kept")
    for out in (new, existing):
        with pytest.raises(OnnxExportError, match=r"no space left on the device holding .* \(ENOSPC\).* GB free"):
            onnx_export.export_model(checkpoint, out, progress=False, log=quiet)
    assert not new.exists()
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


def test_too_little_free_space_is_refused_before_anything_is_written(checkpoint, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(onnx_export.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    out = tmp_path / "onnx"
    with pytest.raises(OnnxExportError, match=r"has 0\.00 GB free, and the export needs about .* GB for its weights"):
        onnx_export.export_model(checkpoint, out, progress=False, log=quiet)
    assert not out.exists()
