"""PaliGemma's mask decoder: 16 `<segNNN>` codes -> a 64 x 64 mask, big_vision's VQ-VAE decoder in PyTorch.

A segmentation answer's 16 codes index a codebook of 128 vectors; laid out as a 4 x 4 grid (row by row) they are
decoded by convolutions into 64 x 64 logits, in [-1, 1] for the published decoder; a pixel is in the mask where its
logit is > 0. Read from big_vision (github:google-research/big_vision):
`big_vision/evaluators/proj/paligemma/transfers/segmentation.py` (`_get_params`, `ResBlock`, `Decoder`,
`reconstruct_masks`) and `big_vision/pp/proj/paligemma/segmentation.py` (the encoder, the same `vae-oid.npz`).

Layers (NCHW, W the width, 128 in the published decoder; D the code width) and their array names, which are the
PyTorch names `vae-oid.npz` holds and big_vision converts to Flax (PyTorch layouts: conv [out, in, kh, kw],
transposed conv [in, out, kh, kw]):

    _vq_vae._embedding        [128, D]      the codebook
    decoder.0                 1x1 conv D -> W, ReLU (decoder.1)
    decoder.2.net, decoder.3.net            residual blocks: x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))
                              .0, .2 3x3 convs (padding 1), .4 a 1x1 conv, all W -> W
    decoder.4, .6, .8, .10    4x4 transposed convs, stride 2, W -> W -> W/2 -> W/4 -> W/8, each followed by a ReLU
                              (4 -> 8 -> 16 -> 32 -> 64 pixels)
    decoder.12                1x1 conv W/8 -> 1: the mask logits

Flax's `ConvTranspose(kernel 4, strides 2, padding=2, transpose_kernel=True)` pads the stride-dilated input by 2 on
each side, which is PyTorch's `ConvTranspose2d(kernel_size=4, stride=2, padding=1)` (4 - 1 - 2 = 1): both double
the side exactly. The published file also holds the encoder (`encoder.{0,2,4,6,10}`, `encoder.{8,9}.net.{0,2,4}`),
which only turns masks into codes (training); loading accepts and ignores exactly those names.

`parse_segmentations` turns an answer's masks into image-sized boolean masks as big_vision's segmentation
evaluator does: the box in whole pixels (int of y_min * height, ...), the 64 x 64 logits resized into it with
Pillow's bilinear filter, a pixel in the mask where the resized logit is > 0.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from PIL import Image
from torch import nn

from .errors import CheckpointError
from .locations import from_bin, parse_masks
from .processor import Detection

GRID = 4  # the 16 codes of a mask, row by row
MASK_SIZE = 64
# The encoder arrays a full VQ-VAE file carries beside the decoder (big_vision's encode_to_codebook_indices).
ENCODER_KEY = re.compile(r"encoder\.(?:(?:0|2|4|6|10)|(?:8|9)\.net\.(?:0|2|4))\.(?:weight|bias)")
CODEBOOK_KEY = "_vq_vae._embedding"


@dataclass(frozen=True)
class MaskDecoderConfig:
    num_embeddings: int = 128  # the codebook: <seg000>..<seg127>
    embedding_dim: int = 512  # D
    width: int = 128  # W: channels after the first conv; the transposed convs halve it three times

    def __post_init__(self):
        if self.width % 8 or self.width < 8:
            raise ValueError(f"width must be a multiple of 8 (it is halved three times), got {self.width}")

    @property
    def upsampling_widths(self) -> tuple[int, ...]:
        """Output channels of the four transposed convolutions."""
        return self.width, self.width // 2, self.width // 4, self.width // 8


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Codebook(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self._embedding = nn.Parameter(torch.zeros(num_embeddings, embedding_dim))


def decoder_layers(config: MaskDecoderConfig) -> nn.Sequential:
    """big_vision's Decoder as an nn.Sequential, so that its indices are the published array names."""
    layers: list[nn.Module] = [nn.Conv2d(config.embedding_dim, config.width, 1), nn.ReLU(),
                               ResBlock(config.width), ResBlock(config.width)]
    channels = config.width
    for out in config.upsampling_widths:
        layers += [nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1), nn.ReLU()]
        channels = out
    layers.append(nn.Conv2d(channels, 1, 1))
    return nn.Sequential(*layers)


class MaskDecoder(nn.Module):
    """Codes [N, 16] (ints in 0..127) -> mask logits [N, 64, 64]."""

    def __init__(self, config: MaskDecoderConfig = MaskDecoderConfig()):
        super().__init__()
        self.config = config
        self._vq_vae = Codebook(config.num_embeddings, config.embedding_dim)
        self.decoder = decoder_layers(config)

    def quantized(self, codes: torch.Tensor) -> torch.Tensor:
        """The codebook vectors of `codes` [N, 16] as the decoder's input grid [N, D, 4, 4]."""
        vectors = self._vq_vae._embedding[codes]  # [N, 16, D], codes row by row
        return vectors.view(-1, GRID, GRID, vectors.shape[-1]).permute(0, 3, 1, 2)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantized(codes))[:, 0]

    @torch.no_grad()
    def mask_logits(self, codes) -> np.ndarray:
        """float32 logits [N, 64, 64] for codes [N, 16] (any integer array): the one call parsing makes, which the
        ONNX decoder (export/writer/mask_decoder.py) answers too."""
        parameter = self._vq_vae._embedding
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=parameter.device)
        return self(codes).float().cpu().numpy()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "MaskDecoder":
        """A decoder from `vae-oid.npz` as published (numpy arrays only, never pickles) or a safetensors file with
        the same keys. Strict: every decoder array present with its shape, nothing else but the encoder's arrays;
        CheckpointError naming what is wrong otherwise. The widths are read from the codebook and the first conv."""
        path = Path(path)
        arrays = read_arrays(path)
        codebook, first = arrays.get(CODEBOOK_KEY), arrays.get("decoder.0.weight")
        if codebook is None or first is None or codebook.ndim != 2 or first.ndim != 4:
            missing = [k for k, a in ((CODEBOOK_KEY, codebook), ("decoder.0.weight", first)) if a is None]
            raise CheckpointError(f"{path} is not a mask decoder: " + (
                f"missing arrays: {', '.join(missing)}" if missing else
                f"{CODEBOOK_KEY} must be [codes, dim] and decoder.0.weight [width, dim, 1, 1]"))
        try:
            config = MaskDecoderConfig(codebook.shape[0], codebook.shape[1], first.shape[0])
        except ValueError as e:
            raise CheckpointError(f"{path}: decoder.0.weight {tuple(first.shape)}: {e}") from None
        decoder = cls(config)
        expected = {name: tuple(t.shape) for name, t in decoder.state_dict().items()}
        decoder_arrays = {k: v for k, v in arrays.items() if not ENCODER_KEY.fullmatch(k)}
        problems = []
        missing = sorted(set(expected) - set(decoder_arrays))
        unexpected = sorted(set(decoder_arrays) - set(expected))
        if missing:
            problems.append(f"missing arrays: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected arrays: {', '.join(unexpected)}")
        wrong = [f"{k} has shape {tuple(decoder_arrays[k].shape)}, expected {expected[k]}"
                 for k in sorted(set(expected) & set(decoder_arrays)) if tuple(decoder_arrays[k].shape) != expected[k]]
        if wrong:
            problems.append("mis-shaped arrays: " + "; ".join(wrong))
        if problems:
            raise CheckpointError(f"{path} does not match the mask decoder's architecture "
                                  f"(codebook {config.num_embeddings} x {config.embedding_dim}, width {config.width}): "
                                  + " | ".join(problems))
        decoder.load_state_dict({k: torch.from_numpy(np.array(decoder_arrays[k], dtype=np.float32)) for k in expected})
        return decoder.eval()

    def save(self, path: str | os.PathLike) -> None:
        """Write the decoder's arrays (the published names) as safetensors."""
        safetensors.torch.save_file({k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()},
                                    str(path))


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The named arrays of an .npz (allow_pickle=False: object arrays are refused) or a .safetensors file."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: pass the mask decoder file (vae-oid.npz or "
                              "mask_decoder.safetensors)")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        if path.suffix == ".safetensors":
            return safetensors.numpy.load_file(str(path))
    except ValueError as e:  # pickled object arrays, a corrupt archive or header
        raise CheckpointError(f"{path} is not a readable array file ({e}); only plain numeric arrays are "
                              "loaded") from None
    except Exception as e:  # zipfile and safetensors raise their own types for truncated files
        raise CheckpointError(f"{path} is not a readable array file ({type(e).__name__}: {e}); "
                              "download it again") from None
    raise CheckpointError(f"{path}: a mask decoder is read from .npz or .safetensors, "
                          f"not {path.suffix or 'a file without suffix'}")


@dataclass(frozen=True, eq=False)
class Segmentation(Detection):
    """A detection with its mask: bool [height, width] of the original image, True inside the object."""
    mask: np.ndarray


def parse_segmentations(text: str, width: int, height: int, decoder) -> list[Segmentation]:
    """Each well-formed mask of a `segment ...` answer (paligemma.locations.parse_masks): label, box in pixels
    (x_min, y_min, x_max, y_max, as parse_detections gives it) and its mask pasted into the box. `decoder` is a
    MaskDecoder, or anything with its `mask_logits(codes [N, 16]) -> [N, 64, 64]` (the ONNX one)."""
    found = parse_masks(text)
    if not found:
        return []
    logits = decoder.mask_logits(np.array([codes for _, codes, _ in found], dtype=np.int64))
    segmentations = []
    for (bins, _, label), mask_logits in zip(found, logits):
        y1, x1, y2, x2 = (from_bin(b) for b in bins)
        box = (x1 * width, y1 * height, x2 * width, y2 * height)
        segmentations.append(Segmentation(label, box, paste_mask(mask_logits, box, width, height)))
    return segmentations


def paste_mask(logits: np.ndarray, box, width: int, height: int) -> np.ndarray:
    """bool [height, width]: the logits [64, 64] resized into the box's whole pixels (bilinear), > 0."""
    x0, y0, x1, y1 = (int(c) for c in box)
    mask = np.zeros((height, width), dtype=bool)
    if x1 > x0 and y1 > y0:
        resized = Image.fromarray(np.asarray(logits, dtype=np.float32)).resize((x1 - x0, y1 - y0),
                                                                               Image.Resampling.BILINEAR)
        mask[y0:y1, x0:x1] = np.asarray(resized) > 0
    return mask
