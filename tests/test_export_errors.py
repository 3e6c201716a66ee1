"""A stale, incomplete or corrupt export is an error that names the file, never a silent wrong answer."""

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image
from tiny import build_reference

import paligemma
from export.writer.integrity import file_sha256
from export.writer.manifest import SHARED_DATA_NAME, OnnxExportError, check_export
from export.writer.onnx_export import export_model
from paligemma.checkpoint import MASK_DECODER_NAME
from paligemma.config import PaliGemmaConfig
from paligemma.mask_decoder import MaskDecoder, MaskDecoderConfig


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


def test_a_mask_decoder_added_beside_the_weights_makes_the_export_stale(copy, tmp_path):
    folder, onnx_dir = copy
    segmenting = tmp_path / "segmenting"
    shutil.copytree(folder, segmenting)
    MaskDecoder(MaskDecoderConfig(num_embeddings=128, embedding_dim=6, width=8)).save(segmenting / MASK_DECODER_NAME)
    with pytest.raises(OnnxExportError, match="exported from other weights"):
        paligemma.load(segmenting, backend="onnx", onnx_dir=onnx_dir)


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


def test_flipped_byte_in_external_data(copy):
    folder, onnx_dir = copy
    data = onnx_dir / SHARED_DATA_NAME
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    config = PaliGemmaConfig.from_json_file(folder / "config.json")
    with pytest.raises(OnnxExportError, match=rf"{SHARED_DATA_NAME} is corrupt: its sha256 differs"):
        check_export(onnx_dir, config)


def answer(folder, onnx_dir):
    return paligemma.load(folder, backend="onnx", onnx_dir=onnx_dir).generate(
        Image.new("RGB", (20, 20), (10, 200, 30)), "caption en", max_new_tokens=2)


def zero_fill(data):
    data.write_bytes(bytes(data.stat().st_size))


def overwrite_200_kb(data):
    raw = bytearray(data.read_bytes())
    start = min(4096, max(0, len(raw) - 200_000))
    raw[start : start + 200_000] = bytes(min(200_000, len(raw) - start))
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [zero_fill, overwrite_200_kb])
def test_same_size_damage_to_the_weights_is_refused_at_load(copy, damage):
    folder, onnx_dir = copy
    answer(folder, onnx_dir)  # hashed once, so that the intact file's digest is remembered
    damage(onnx_dir / SHARED_DATA_NAME)
    with pytest.raises(OnnxExportError, match=rf"{SHARED_DATA_NAME} is corrupt: its sha256 differs"):
        answer(folder, onnx_dir)


def test_another_exports_data_file_of_the_same_size_is_refused(copy, tmp_path):
    """Same config, other weights: the data files have one size; the graphs are the same too, apart from metadata."""
    folder, onnx_dir = copy
    other = tmp_path / "other"
    build_reference(other, "pg1", seed=1)
    export_model(other, tmp_path / "other_onnx", progress=False, log=lambda *_: None)
    swapped = tmp_path / "other_onnx" / SHARED_DATA_NAME
    assert swapped.stat().st_size == (onnx_dir / SHARED_DATA_NAME).stat().st_size
    shutil.copy2(swapped, onnx_dir / SHARED_DATA_NAME)  # copy2 keeps the other file's modification time
    with pytest.raises(OnnxExportError, match=rf"{SHARED_DATA_NAME} is corrupt: its sha256 differs"):
        answer(folder, onnx_dir)


def test_a_verified_file_is_hashed_once_per_identity(copy, monkeypatch):
    from export.writer import integrity

    folder, onnx_dir = copy
    hashed = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path, *a: hashed.append(path.name) or real(path, *a))
    answer(folder, onnx_dir)
    assert SHARED_DATA_NAME in hashed
    hashed.clear()
    answer(folder, onnx_dir)
    assert hashed == []  # nothing changed: every digest remembered
    data = onnx_dir / SHARED_DATA_NAME
    data.write_bytes(data.read_bytes())  # same bytes, rewritten: a new identity, hashed again
    answer(folder, onnx_dir)
    assert hashed == [SHARED_DATA_NAME]


def test_digests_survive_the_process_in_the_export_cache(copy, monkeypatch, tmp_path):
    from export.writer import integrity

    folder, onnx_dir = copy
    monkeypatch.setenv(integrity.CACHE_ENV, str(tmp_path / "cache"))
    answer(folder, onnx_dir)
    assert (tmp_path / "cache" / integrity.DIGESTS_NAME).is_file()
    monkeypatch.setattr(integrity, "_memo", {})  # as a new process starts
    monkeypatch.setattr(integrity, "file_sha256", lambda *a: pytest.fail("hashed again"))
    answer(folder, onnx_dir)


def edit_manifest(onnx_dir, change):
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    change(manifest)
    (onnx_dir / "manifest.json").write_text(json.dumps(manifest))


def first_tensor(manifest):
    return next(iter(manifest["shared_data"]["tensors"].values()))


@pytest.mark.parametrize("change,message", [
    (lambda m: m.pop("files"), "it lists no files"),
    (lambda m: m["files"].update({"../config.json": {"size": 1, "sha256": "0"}}), "is not a plain name"),
    (lambda m: m["files"]["decode.onnx"].pop("sha256"), "lacks a size or a sha256"),
    (lambda m: first_tensor(m).update(offset=10**12), "lies past the end of decoder.onnx.data"),
    (lambda m: first_tensor(m).update(length=-1), "lacks an offset, length or data type"),
    (lambda m: first_tensor(m).update(data_type=999), "unknown data type 999"),
    (lambda m: first_tensor(m).update(shape=[1, 2]), "a shape that does not fill"),
    (lambda m: m.update(shared_data=[]), "shared_data does not name"),
    (lambda m: m.update(dtype="float64"), "records dtype 'float64'"),
])
def test_a_damaged_manifest_is_refused_naming_what_is_wrong(copy, change, message):
    folder, onnx_dir = copy
    edit_manifest(onnx_dir, change)
    with pytest.raises(OnnxExportError, match=message):
        answer(folder, onnx_dir)


def test_a_manifest_that_is_not_an_object_is_refused(copy):
    folder, onnx_dir = copy
    (onnx_dir / "manifest.json").write_text("[]")
    with pytest.raises(OnnxExportError, match="manifest.json is corrupt: it is not a JSON object"):
        answer(folder, onnx_dir)


def test_the_cli_refuses_a_damaged_export_with_exit_1(copy):
    folder, onnx_dir = copy
    zero_fill(onnx_dir / SHARED_DATA_NAME)
    out = subprocess.run([sys.executable, "-m", "paligemma", "generate", "--model", str(folder), "--backend", "onnx",
                          "--onnx-dir", str(onnx_dir), "--image", str(onnx_dir / "nothing.png"),
                          "--prompt", "caption en"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and f"{SHARED_DATA_NAME} is corrupt" in out.stderr and out.stdout == ""


def test_the_first_load_after_an_export_hashes_nothing(export, tmp_path, monkeypatch):
    """The exporter's own hashing, for the manifest, is remembered for the files it wrote."""
    from export.writer import integrity

    folder, _ = export
    onnx_dir = tmp_path / "fresh"
    export_model(folder, onnx_dir, progress=False, log=lambda *_: None)
    monkeypatch.setattr(integrity, "file_sha256", lambda *a: pytest.fail("hashed again"))
    assert answer(folder, onnx_dir).token_ids
