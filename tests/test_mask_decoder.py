"""paligemma.MaskDecoder: big_vision's VQ-VAE mask decoder, checked against convolutions written out in numpy, and
its strict loading of vae-oid.npz-style and safetensors files."""

import numpy as np
import pytest
import torch

from paligemma import CheckpointError, MaskDecoder
from paligemma.mask_decoder import MaskDecoderConfig

TINY = MaskDecoderConfig(num_embeddings=128, embedding_dim=6, width=8)


def random_arrays(config: MaskDecoderConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {k: tuple(v.shape) for k, v in MaskDecoder(config).state_dict().items()}
    return {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, shape in shapes.items()}


def conv(x, weight, bias, padding):
    """Cross-correlation of x [C, H, W] with weight [O, C, k, k], stride 1, zero padding: written out."""
    out_channels, _, k, _ = weight.shape
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding)))
    height, width = x.shape[1] - k + 1, x.shape[2] - k + 1
    out = np.zeros((out_channels, height, width))
    for i in range(height):
        for j in range(width):
            out[:, i, j] = np.tensordot(weight, x[:, i:i + k, j:j + k], axes=([1, 2, 3], [0, 1, 2]))
    return out + bias[:, None, None]


def transposed_conv(x, weight, bias, stride=2, padding=1):
    """The transposed convolution by its definition: each input pixel scatters weight [C, O, k, k] times its value
    at stride-spaced positions; the first and last `padding` rows and columns of the result are cut."""
    channels, height, width = x.shape
    _, out_channels, k, _ = weight.shape
    full = np.zeros((out_channels, (height - 1) * stride + k, (width - 1) * stride + k))
    for i in range(height):
        for j in range(width):
            full[:, i * stride:i * stride + k, j * stride:j * stride + k] += np.tensordot(x[:, i, j], weight, axes=1)
    return full[:, padding:full.shape[1] - padding, padding:full.shape[2] - padding] + bias[:, None, None]


def reference_decode(arrays, codes) -> np.ndarray:
    """big_vision's decoder (evaluators/proj/paligemma/transfers/segmentation.py) step by step, for one mask."""
    def relu(a):
        return np.maximum(a, 0)

    def layer(name, a, padding=0):
        return conv(a, arrays[name + ".weight"], arrays[name + ".bias"], padding)

    grid = arrays["_vq_vae._embedding"][codes].reshape(4, 4, -1).transpose(2, 0, 1)  # codes row by row
    x = relu(layer("decoder.0", grid))
    for block in ("decoder.2.net", "decoder.3.net"):
        x = x + layer(f"{block}.4", relu(layer(f"{block}.2", relu(layer(f"{block}.0", x, 1)), 1)))
    for name in ("decoder.4", "decoder.6", "decoder.8", "decoder.10"):
        x = relu(transposed_conv(x, arrays[name + ".weight"], arrays[name + ".bias"]))
    return layer("decoder.12", x)[0]


@pytest.fixture
def tiny_file(tmp_path):
    arrays = random_arrays(TINY)
    path = tmp_path / "vae.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_decoder_matches_the_convolutions_written_out(tiny_file):
    path, arrays = tiny_file
    decoder = MaskDecoder.from_file(path)
    codes = np.array([[0, 5, 127, 3, 9, 9, 64, 1, 2, 100, 7, 8, 50, 51, 52, 0], list(range(16))])
    logits = decoder.mask_logits(codes)
    assert logits.shape == (2, 64, 64) and logits.dtype == np.float32
    np.testing.assert_allclose(logits[0], reference_decode(arrays, codes[0]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1], reference_decode(arrays, codes[1]), atol=1e-4, rtol=0)
    assert not np.allclose(logits[0], logits[1])  # the codes matter


def test_reference_architecture_shapes():
    shapes = {k: tuple(v.shape) for k, v in MaskDecoder().state_dict().items()}
    assert shapes["_vq_vae._embedding"] == (128, 512)
    assert shapes["decoder.0.weight"] == (128, 512, 1, 1)
    assert shapes["decoder.2.net.0.weight"] == shapes["decoder.3.net.2.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.3.net.4.weight"] == (128, 128, 1, 1)
    assert [shapes[f"decoder.{i}.weight"] for i in (4, 6, 8, 10)] == [
        (128, 128, 4, 4), (128, 64, 4, 4), (64, 32, 4, 4), (32, 16, 4, 4)]
    assert shapes["decoder.12.weight"] == (1, 16, 1, 1)
    assert len(shapes) == 25


def test_safetensors_with_the_same_keys_loads_the_same(tiny_file, tmp_path):
    path, _ = tiny_file
    decoder = MaskDecoder.from_file(path)
    decoder.save(tmp_path / "mask_decoder.safetensors")
    again = MaskDecoder.from_file(tmp_path / "mask_decoder.safetensors")
    codes = np.arange(16)[None] * 7
    np.testing.assert_array_equal(again.mask_logits(codes), decoder.mask_logits(codes))


def test_the_encoder_arrays_of_a_full_vae_file_are_accepted(tmp_path):
    arrays = random_arrays(TINY)
    encoder = {f"encoder.{n}.{p}": np.zeros(2, np.float32)
               for n in (0, 2, 4, 6, 10, "8.net.0", "9.net.4") for p in ("weight", "bias")}
    np.savez(tmp_path / "vae.npz", **arrays, **encoder)
    assert MaskDecoder.from_file(tmp_path / "vae.npz").config == TINY


@pytest.mark.parametrize("change, named", [
    (lambda a: a.pop("decoder.6.bias"), "missing arrays: decoder.6.bias"),
    (lambda a: a.update({"decoder.14.weight": np.zeros(1, np.float32)}), "unexpected arrays: decoder.14.weight"),
    (lambda a: a.update({"encoder.7.weight": np.zeros(1, np.float32)}), "unexpected arrays: encoder.7.weight"),
    (lambda a: a.update({"decoder.8.weight": np.zeros((64, 32, 3, 3), np.float32)}),
     "decoder.8.weight has shape (64, 32, 3, 3), expected (4, 2, 4, 4)"),
    (lambda a: a.pop("_vq_vae._embedding"), "missing arrays: _vq_vae._embedding"),
])
def test_a_file_that_does_not_fit_is_refused_naming_the_array(tmp_path, change, named):
    arrays = random_arrays(TINY)
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace(")", r"\)")):
        MaskDecoder.from_file(tmp_path / "bad.npz")


def test_pickled_arrays_are_never_loaded(tmp_path):
    arrays = random_arrays(TINY)
    arrays["decoder.0.bias"] = np.array([object()] * 8, dtype=object)
    np.savez(tmp_path / "pickled.npz", **arrays)
    with pytest.raises(CheckpointError, match="not a readable array file"):
        MaskDecoder.from_file(tmp_path / "pickled.npz")


def test_other_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        MaskDecoder.from_file(tmp_path / "absent.npz")
    (tmp_path / "vae.pt").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="not .pt"):
        MaskDecoder.from_file(tmp_path / "vae.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="not a readable array file"):
        MaskDecoder.from_file(tmp_path / "cut.safetensors")


def test_forward_is_differentiable_for_training():
    decoder = MaskDecoder(TINY)
    logits = decoder(torch.zeros(1, 16, dtype=torch.long))
    logits.sum().backward()
    assert decoder.decoder[12].weight.grad is not None
