"""Export options and entry points: the CLI, int8 and float16 exports, the export cache."""

import json

import numpy as np
import onnx
import pytest
from PIL import Image

import paligemma
from export.__main__ import main
from export.manifest import MANIFEST_NAME
from export.runtime import CACHE_ENV
from tiny import build_reference

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg2")
    build_reference(folder, "pg2")
    return folder


def test_cli_int8_export_validates_and_generates(checkpoint, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["--model", str(checkpoint), "--output", str(out), "--quantize", "int8"]) == 0
    printed = capsys.readouterr().out
    for graph in ("vision_encoder", "prefill", "decode"):
        assert f"validation {graph}: max abs diff" in printed
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["quantize"] == "int8"
    assert any(name.endswith("_quantized") for name in manifest["shared_data"]["tensors"])
    result = paligemma.load(checkpoint, backend="onnx", onnx_dir=out).generate(IMAGE, "caption en", max_new_tokens=8)
    assert len(result.token_ids) > 0


def test_float16_export_validates(checkpoint, tmp_path, capsys):
    out = tmp_path / "fp16"
    assert main(["--model", str(checkpoint), "--output", str(out), "--dtype", "float16"]) == 0
    assert "validation decode: max abs diff" in capsys.readouterr().out
    pipe = paligemma.load(checkpoint, backend="onnx", onnx_dir=out)
    assert pipe.engine_factory.float_type == np.float16
    assert pipe.generate(IMAGE, "caption en", max_new_tokens=4).token_ids


def test_cli_reports_a_bad_checkpoint(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 1
    assert "error:" in capsys.readouterr().err


def test_export_cache_made_on_first_use_then_reused(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    first = paligemma.load(checkpoint, backend="onnx")
    assert "exporting" in capsys.readouterr().out
    (cached,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert (cached / MANIFEST_NAME).exists()
    stamp = (cached / "decode.onnx").stat().st_mtime_ns
    second = paligemma.load(checkpoint, backend="onnx")
    assert "exporting" not in capsys.readouterr().out
    assert (cached / "decode.onnx").stat().st_mtime_ns == stamp
    assert first.generate(IMAGE, "caption en", max_new_tokens=6).token_ids == \
        second.generate(IMAGE, "caption en", max_new_tokens=6).token_ids


def test_export_folder_alone_is_loadable(checkpoint, tmp_path):
    """The export carries config, tokenizer and manifest: another machine needs nothing else."""
    out = tmp_path / "onnx"
    assert main(["--model", str(checkpoint), "--output", str(out), "--no-validate", "--opset", "17"]) == 0
    graph = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [17]
    expected = paligemma.load(checkpoint).generate(IMAGE, "caption en", max_new_tokens=6).token_ids
    assert paligemma.load(out, backend="onnx").generate(IMAGE, "caption en", max_new_tokens=6).token_ids == expected
