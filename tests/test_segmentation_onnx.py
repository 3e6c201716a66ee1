"""mask_decoder.onnx: the mask decoder as an ONNX graph, equal to torch, carried by the export of a checkpoint that
ships one and used by the ONNX Runtime pipeline."""

import json
import shutil

import numpy as np
import pytest
import torch

import paligemma
from export.writer.mask_decoder import GRAPH_FILE, OnnxMaskDecoder, export_mask_decoder, load_onnx_mask_decoder
from export.writer.onnx_export import DEFAULT_OPSET, IR_VERSION
from paligemma import MaskDecoder
from paligemma.checkpoint import MASK_DECODER_NAME
from paligemma.mask_decoder import MaskDecoderConfig


def random_decoder(config: MaskDecoderConfig, seed: int = 0) -> MaskDecoder:
    """PyTorch's default initialization (logits of order one at any width), a unit-normal codebook."""
    torch.manual_seed(seed)
    decoder = MaskDecoder(config)
    with torch.no_grad():
        decoder._vq_vae._embedding.normal_()
    return decoder.eval()


@pytest.mark.parametrize("config", [MaskDecoderConfig(embedding_dim=6, width=8), MaskDecoderConfig()],
                         ids=["tiny", "published size"])
def test_onnx_graph_matches_torch_at_any_batch(tmp_path, config):
    decoder = random_decoder(config)
    export_mask_decoder(decoder, tmp_path / GRAPH_FILE, DEFAULT_OPSET, IR_VERSION)
    onnx_decoder = OnnxMaskDecoder(tmp_path / GRAPH_FILE)
    rng = np.random.default_rng(1)
    for batch in (1, 5):
        codes = rng.integers(0, 128, (batch, 16))
        expected = decoder.mask_logits(codes)
        got = onnx_decoder.mask_logits(codes)
        assert got.shape == (batch, 64, 64)
        assert np.abs(got - expected).max() <= 1e-4
        assert np.abs(expected).max() > 1e-2  # the comparison is not between zeros


def test_export_carries_the_checkpoint_decoder_and_the_onnx_pipeline_uses_it(tmp_path):
    from export.runtime import load_onnx_pipeline
    from export.writer.onnx_export import export_model

    folder = tmp_path / "checkpoint"
    shutil.copytree(paligemma.DEMO_CHECKPOINT, folder)
    decoder = random_decoder(MaskDecoderConfig(embedding_dim=16, width=32))
    decoder.save(folder / MASK_DECODER_NAME)
    output = tmp_path / "onnx"
    manifest = export_model(folder, output, progress=False, log=lambda message: None)
    assert GRAPH_FILE in manifest["files"] and manifest["mask_decoder"]["file"] == GRAPH_FILE
    assert json.loads((output / "manifest.json").read_text()) == manifest
    pipe = load_onnx_pipeline(folder, onnx_dir=output)
    assert isinstance(pipe.mask_decoder, OnnxMaskDecoder)
    codes = np.arange(32).reshape(2, 16) * 3
    assert np.abs(pipe.mask_decoder.mask_logits(codes) - decoder.mask_logits(codes)).max() <= 1e-4
    text = "<loc0000><loc0000><loc1023><loc1023>" + "".join(f"<seg{c:03d}>" for c in codes[0]) + " circle"
    [torch_found] = paligemma.parse_segmentations(text, 96, 64, decoder)
    [onnx_found] = paligemma.parse_segmentations(text, 96, 64, pipe.mask_decoder)
    assert (onnx_found.mask != torch_found.mask).mean() < 0.01  # only logits within 1e-4 of 0 may flip


def test_an_export_without_a_decoder_has_none_or_the_checkpoint_one(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"decode.onnx": {}}}))
    assert load_onnx_mask_decoder(tmp_path) is None
    assert load_onnx_mask_decoder(tmp_path / "absent") is None
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    assert load_onnx_mask_decoder(tmp_path, folder) is None
    random_decoder(MaskDecoderConfig(embedding_dim=6, width=8)).save(folder / MASK_DECODER_NAME)
    assert isinstance(load_onnx_mask_decoder(tmp_path, folder), MaskDecoder)  # an export older than the decoder
