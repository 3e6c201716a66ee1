"""Export options and entry points: the CLI, int8 and float16 exports, the export cache."""

import json

import numpy as np
import onnx
import pytest
from PIL import Image
from tiny import build_reference

import paligemma
from export.__main__ import main
from export.writer.integrity import CACHE_ENV
from export.writer.manifest import MANIFEST_NAME

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
    assert any(name.endswith("_int8") for name in manifest["shared_data"]["tensors"])
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


def test_export_cache_made_on_first_use_then_reused(checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    caplog.set_level("INFO", logger="export.runtime")
    first = paligemma.load(checkpoint, backend="onnx")
    assert "exporting" in caplog.text
    caplog.clear()
    (cached,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert (cached / MANIFEST_NAME).exists()
    stamp = (cached / "decode.onnx").stat().st_mtime_ns
    second = paligemma.load(checkpoint, backend="onnx")
    assert "exporting" not in caplog.text
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


def test_an_output_that_is_a_file_is_refused(checkpoint, tmp_path, capsys):
    target = tmp_path / "model.onnx"
    target.write_text("mine")
    assert main(["--model", str(checkpoint), "--output", str(target)]) == 1
    assert "is a file; name a folder" in capsys.readouterr().err and target.read_text() == "mine"


@pytest.mark.parametrize("opset", ["1", "13", "99"])
def test_an_unsupported_opset_is_refused_before_anything_is_written(checkpoint, tmp_path, capsys, opset):
    out = tmp_path / "onnx"
    assert main(["--model", str(checkpoint), "--output", str(out), "--opset", opset]) == 1
    assert f"opset {opset} is not supported; use 14 to 22" in capsys.readouterr().err
    assert not out.exists()


def test_an_export_that_fails_midway_leaves_nothing_that_looks_complete(checkpoint, tmp_path, monkeypatch):
    from export.runtime import pipeline

    def failing(*args, **kwargs):
        raise paligemma.OnnxExportError("validation failed (on purpose)")

    monkeypatch.setattr(pipeline, "validate_export", failing)
    new, existing = tmp_path / "new", tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("kept")
    for out in (new, existing):
        with pytest.raises(paligemma.OnnxExportError, match="on purpose"):
            pipeline.export_and_validate(checkpoint, out, progress=False, log=lambda *_: None)
    assert not new.exists()
    assert not [p.name for p in existing.iterdir() if p.name == MANIFEST_NAME or p.suffix in (".onnx", ".data")]
    assert (existing / "notes.txt").read_text() == "kept"
    with pytest.raises(paligemma.OnnxExportError, match="manifest.json is missing"):
        paligemma.load(checkpoint, backend="onnx", onnx_dir=existing)


def test_usage_mistakes_are_one_line(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "export", "--model", "m", "--output", "o", "--opset", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--help" in out.stderr


def int4_exports():
    """int4 comes with the tensor-by-tensor quantizer (export/quantize.py); until then its tests are skipped."""
    from export.writer.onnx_export import QUANTIZATIONS

    return pytest.mark.skipif("int4" not in QUANTIZATIONS, reason="the exporter does not make int4 exports yet")


@pytest.mark.parametrize("quantize", ["int8", pytest.param("int4", marks=int4_exports())])
def test_the_export_cache_keeps_one_export_per_variant(checkpoint, tmp_path, monkeypatch, caplog, quantize):
    from export.runtime import load_onnx_pipeline

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    caplog.set_level("INFO", logger="export.runtime")
    plain = load_onnx_pipeline(checkpoint)
    quantized = load_onnx_pipeline(checkpoint, quantize=quantize)
    folders = sorted(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    # hashes order the folders
    assert sorted(p.name.rsplit("-", 1)[1] for p in folders) == sorted(["float32", quantize])
    assert plain.engine_factory.onnx_dir != quantized.engine_factory.onnx_dir
    assert plain.engine_factory.manifest["quantize"] == "none"
    assert quantized.engine_factory.manifest["quantize"] == quantize
    caplog.clear()
    again = load_onnx_pipeline(checkpoint, quantize=quantize)
    assert "exporting" not in caplog.text and again.engine_factory.onnx_dir == quantized.engine_factory.onnx_dir


def test_load_serves_the_quantized_export_asked_for(checkpoint, tmp_path, monkeypatch):
    from export.runtime import load_onnx_pipeline

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    pipe = paligemma.load(checkpoint, backend="onnx", quantize="int8")
    assert pipe.engine_factory.manifest["quantize"] == "int8"
    assert pipe.engine_factory.onnx_dir == load_onnx_pipeline(checkpoint, quantize="int8").engine_factory.onnx_dir
    assert pipe.generate(IMAGE, "caption en", max_new_tokens=4).token_ids
    with pytest.raises(ValueError, match="backend 'onnx' only"):
        paligemma.load(checkpoint, quantize="int8")
    with pytest.raises(paligemma.OnnxExportError, match="quantize 'int3' is not supported; use int8 or int4"):
        paligemma.load(checkpoint, backend="onnx", quantize="int3")


def test_an_export_of_another_variant_is_refused_when_a_quantized_one_is_asked_for(checkpoint, tmp_path):
    from export.runtime import load_onnx_pipeline
    from paligemma.errors import OnnxExportError

    out = tmp_path / "onnx"
    assert main(["--model", str(checkpoint), "--output", str(out), "--no-validate"]) == 0
    with pytest.raises(OnnxExportError, match="is a float32 export, not the int8 one"):
        load_onnx_pipeline(checkpoint, onnx_dir=out, quantize="int8")
