"""A stale, incomplete or corrupt export is an error that names the file, never a silent wrong answer."""

import json
import shutil

import pytest
from PIL import Image

import paligemma
from export.manifest import SHARED_DATA_NAME, OnnxExportError, check_export, file_sha256
from paligemma.config import PaliGemmaConfig
from export.onnx_export import export_model
from tiny import build_reference


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg1")
    build_reference(folder, "pg1")
    onnx_dir = tmp_path_factory.mktemp("pg1_onnx")
    export_model(folder, onnx_dir, progress=False, log=lambda *_: None)
    return folder, onnx_dir


@pytest.fixture
def copy(export, tmp_path):
    """A fresh copy of the export to damage."""
    folder, onnx_dir = export
    target = tmp_path / "onnx"
    shutil.copytree(onnx_dir, target)
    return folder, target


def test_intact_export_loads(copy):
    folder, onnx_dir = copy
    pipe = paligemma.load(folder, backend="onnx", onnx_dir=onnx_dir)
    assert pipe.generate(Image.new("RGB", (20, 20), (10, 200, 30)), "caption en", max_new_tokens=2).token_ids


def test_stale_config_hash(copy, tmp_path):
    folder, onnx_dir = copy
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    config = json.loads((changed / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(OnnxExportError, match=r"is stale: its config hash .* does not match the model's config hash"):
        paligemma.load(changed, backend="onnx", onnx_dir=onnx_dir)


def test_other_weights_with_the_same_config(copy, tmp_path):
    folder, onnx_dir = copy
    other = tmp_path / "other"
    build_reference(other, "pg1", seed=1)
    with pytest.raises(OnnxExportError, match="exported from other weights"):
        paligemma.load(other, backend="onnx", onnx_dir=onnx_dir)


def test_graph_from_another_export(copy, tmp_path):
    folder, onnx_dir = copy
    other = tmp_path / "other"
    build_reference(other, "pg2")
    export_model(other, tmp_path / "other_onnx", progress=False, log=lambda *_: None)
    shutil.copy(tmp_path / "other_onnx" / "decode.onnx", onnx_dir / "decode.onnx")
    with pytest.raises(OnnxExportError, match=r"decode\.onnx is corrupt"):
        paligemma.load(folder, backend="onnx", onnx_dir=onnx_dir)


def test_missing_external_data(copy):
    folder, onnx_dir = copy
    (onnx_dir / SHARED_DATA_NAME).unlink()
    with pytest.raises(OnnxExportError, match=rf"{SHARED_DATA_NAME} is missing: the external data file"):
        paligemma.load(folder, backend="onnx", onnx_dir=onnx_dir)


def test_truncated_external_data(copy):
    folder, onnx_dir = copy
    data = onnx_dir / SHARED_DATA_NAME
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(OnnxExportError, match=rf"{SHARED_DATA_NAME} is corrupt: 1000 bytes"):
        paligemma.load(folder, backend="onnx", onnx_dir=onnx_dir)


@pytest.mark.parametrize("graph", ["vision_encoder.onnx", "decode.onnx"])
def test_truncated_graph(copy, graph):
    folder, onnx_dir = copy
    path = onnx_dir / graph
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OnnxExportError, match=rf"{graph.replace('.', '[.]')} is corrupt: \d+ bytes .*truncated"):
        paligemma.load(folder, backend="onnx", onnx_dir=onnx_dir)


def test_truncated_graph_without_manifest_check(copy):
    """Even past the manifest (sizes rewritten), ONNX Runtime's parse error comes back naming the file."""
    folder, onnx_dir = copy
    path = onnx_dir / "prefill.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    manifest["files"]["prefill.onnx"] = dict(size=path.stat().st_size, sha256=file_sha256(path))
    (onnx_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OnnxExportError, match=r"prefill\.onnx could not be loaded by ONNX Runtime"):
        paligemma.load(folder, backend="onnx", onnx_dir=onnx_dir)


def test_missing_manifest(copy):
    folder, onnx_dir = copy
    (onnx_dir / "manifest.json").unlink()
    with pytest.raises(OnnxExportError, match=r"manifest\.json is missing"):
        paligemma.load(folder, backend="onnx", onnx_dir=onnx_dir)


def test_flipped_byte_in_external_data_found_by_full_verification(copy):
    """Sizes are checked at every load; a same-size corruption of the weights needs the full hash (verify_data)."""
    folder, onnx_dir = copy
    data = onnx_dir / SHARED_DATA_NAME
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    config = PaliGemmaConfig.from_json_file(folder / "config.json")
    with pytest.raises(OnnxExportError, match=rf"{SHARED_DATA_NAME} is corrupt: its sha256 differs"):
        check_export(onnx_dir, config, verify_data=True)
