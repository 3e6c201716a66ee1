"""export/siglip.py: two ONNX graphs whose ONNX Runtime outputs match transformers' SiglipModel."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from tiny_siglip import build_siglip_reference

import paligemma
from export.siglip import export_siglip

TEXTS = ["a red circle", "a blue square", "two green triangles", "a photo of a cat", "a dog"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip_export_source")
    reference = build_siglip_reference(folder, seed=2)
    output = tmp_path_factory.mktemp("siglip_onnx")
    out = subprocess.run([sys.executable, "-m", "export.siglip", "--model", str(folder), "--output", str(output)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return folder, reference, output, out.stdout


def session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_command_validates_both_graphs(exported):
    _, _, output, stdout = exported
    description = json.loads((output / "siglip.json").read_text())
    assert set(description["max_abs_diff_vs_torch"]) == {"siglip_image_encoder", "siglip_text_encoder"}
    assert all(diff <= 1e-4 for diff in description["max_abs_diff_vs_torch"].values())
    assert "siglip_text_encoder: max abs difference" in stdout
    assert {"config.json", "tokenizer.json"} <= {p.name for p in output.iterdir()}


@pytest.mark.parametrize("images", [1, 4])
def test_onnx_runtime_gives_transformers_logits(exported, images):
    folder, reference, output, _ = exported
    description = json.loads((output / "siglip.json").read_text())
    config = paligemma.load_siglip(folder).config
    input_ids = paligemma.SiglipTokenizer.from_pretrained(output, config.text)(TEXTS)
    pixel_values = torch.rand(images, 3, 28, 28, generator=torch.Generator().manual_seed(images)) * 2 - 1
    image_embeddings = session(output / "siglip_image_encoder.onnx").run(
        None, {"pixel_values": pixel_values.numpy()})[0]
    text_embeddings = session(output / "siglip_text_encoder.onnx").run(None, {"input_ids": input_ids.numpy()})[0]
    logits = description["logit_scale"] * image_embeddings @ text_embeddings.T + description["logit_bias"]
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values)
    assert np.abs(image_embeddings - expected.image_embeds.numpy()).max() <= 1e-4
    assert np.abs(text_embeddings - expected.text_embeds.numpy()).max() <= 1e-4
    assert logits.shape == (images, len(TEXTS))
    assert np.abs(logits - expected.logits_per_image.numpy()).max() <= 1e-4


def test_a_paligemma_checkpoint_is_refused_and_nothing_is_left(tmp_path):
    output = tmp_path / "out"
    with pytest.raises(paligemma.CheckpointError, match="no text tower"):
        export_siglip(paligemma.DEMO_CHECKPOINT, output)
    assert not output.exists()


def test_a_bad_opset_is_refused(exported, tmp_path):
    folder, _, _, _ = exported
    with pytest.raises(paligemma.OnnxExportError, match="opset 7 is not supported"):
        export_siglip(folder, tmp_path / "out", opset=7)
