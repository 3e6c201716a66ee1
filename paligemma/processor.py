"""Inputs for PaliGemma: image preprocessing, the prompt format, tokenization, decoding and detection parsing.

Prompt format (one `<bos>`, after the image tokens):
    <image> x N, <bos>, prefix, "\\n"  [, suffix, <eos>  when training]
The prefix part (image + prompt + "\\n") is attended bidirectionally (token type 0); the suffix causally (1).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import Tokenizer

from .config import PaliGemmaConfig
from .errors import CheckpointError, InputError, shown
from .locations import from_bin, parse_boxes

IMAGE_TOKEN = "<image>"
MAX_IMAGE_PIXELS = 64_000_000  # past this a decoded image takes gigabytes: refuse rather than thrash


def load_image(image) -> Image.Image:
    """A PIL image from a PIL image, a path, bytes or an HxW[xC] uint8 array, upright (EXIF applied) and RGB."""
    if isinstance(image, Image.Image):
        opened = image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise InputError(f"an image array must be uint8, HxW (gray) or HxWxC with C = 1, 3 or 4 channels last; "
                             f"got {image.dtype} with shape {image.shape}")
        opened = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    elif isinstance(image, (bytes, bytearray, str, os.PathLike)):
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else Path(image)
        if isinstance(source, Path) and not source.is_file():
            what = "is a folder, not an image file" if source.is_dir() else "does not exist"
            raise InputError(f"image file {source} {what}")
        try:
            opened = Image.open(source)  # reads the header only: the size is known before any pixel is decoded
            check_size(opened)
            opened.load()
        except Image.DecompressionBombError:
            raise InputError("the image is too large to decode safely (a decompression bomb?); "
                             "use a smaller image") from None
        except UnidentifiedImageError:
            raise InputError("the file is not an image Pillow can read "
                             "(PNG, JPEG, WebP, GIF, BMP, TIFF, ...)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"the image is corrupt or truncated ({e}); re-save or re-upload it") from None
    else:
        raise InputError(f"cannot read an image from a {type(image).__name__}; pass a PIL image, a path or bytes")
    check_size(opened)
    return to_rgb(ImageOps.exif_transpose(opened))


def check_size(image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"the image is {width}x{height}, over the {MAX_IMAGE_PIXELS:,}-pixel limit; "
                         "downscale it first")
    if width < 1 or height < 1:
        raise InputError(f"the image is {width}x{height}; it needs at least one pixel")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers makes it: transparency composited onto white. 16- and 32-bit gray is scaled to 8 bits
    (a plain convert would clip everything above 255 to white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> [3, size, size] float32 in [-1, 1]: bicubic resize (aspect ratio not kept), /255,
    (x - 0.5) / 0.5."""
    resized = np.asarray(image.resize((size, size), resample=Image.Resampling.BICUBIC), dtype=np.float32)
    normalized = (resized * np.float32(1 / 255) - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(normalized.transpose(2, 0, 1).copy())


@dataclass(frozen=True)
class Detection:
    label: str
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in pixels of the original image


def parse_detections(text: str, width: int, height: int) -> list[Detection]:
    """`<locY1><locX1><locY2><locX2> label ; ...` -> pixel boxes (bins decoded as in paligemma.locations; a label
    ends at ";" or the end of the text)."""
    detections = []
    for bins, label in parse_boxes(text, strict=True):
        y1, x1, y2, x2 = (from_bin(b) for b in bins)
        detections.append(Detection(label, (x1 * width, y1 * height, x2 * width, y2 * height)))
    return detections


class PaliGemmaProcessor:
    def __init__(self, tokenizer: Tokenizer, config: PaliGemmaConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.image_size = config.image_size
        self.num_image_tokens = config.num_image_tokens
        self.image_token_id = config.image_token_index
        self.bos_id = config.bos_token_id
        self.eos_id = config.eos_token_ids[0]
        self.pad_id = config.pad_token_id
        self.newline = tokenizer.encode("\n", add_special_tokens=False).ids
        # Tokens that steer the format: typed into a prompt they would shift or end it.
        self.control_ids = {self.image_token_id, self.bos_id, self.pad_id, *config.eos_token_ids}
        self.hidden_ids = {self.pad_id, self.bos_id, self.image_token_id, *config.eos_token_ids}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, config: PaliGemmaConfig | None = None) -> "PaliGemmaProcessor":
        folder = Path(folder)
        config = config or PaliGemmaConfig.from_json_file(folder / "config.json")
        path = folder / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"{folder} has no tokenizer.json; copy it from the checkpoint's repo")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a valid tokenizer.json ({e})") from None
        if tokenizer.id_to_token(config.image_token_index) != IMAGE_TOKEN:
            raise CheckpointError(
                f"{path}: token {config.image_token_index} (config image_token_index) is "
                f"{tokenizer.id_to_token(config.image_token_index)!r}, not {IMAGE_TOKEN}"
            )
        return cls(tokenizer, config)

    def encode_text(self, text: str, what: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"the {what} holds {shown(e.object[e.start : e.end])}, which is not a character (a lone "
                             "surrogate); remove it or send the text as UTF-8") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        typed = sorted({self.tokenizer.id_to_token(i) for i in ids if i in self.control_ids})
        if typed:
            raise InputError(f"the {what} contains the reserved token(s) {', '.join(typed)}; remove them")
        return ids

    def prompt_ids(self, prompt: str, suffix: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids and token types (0 prefix, 1 suffix) of one example."""
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be text, got {type(prompt).__name__}")
        if suffix is not None and not isinstance(suffix, str):
            raise InputError(f"the suffix must be text, got {type(suffix).__name__}")
        prefix = ([self.image_token_id] * self.num_image_tokens + [self.bos_id]
                  + self.encode_text(prompt + "\n", "prompt"))
        rest = [] if suffix is None else self.encode_text(suffix, "suffix") + [self.eos_id]
        ids = prefix + rest
        limit = self.config.text.max_position_embeddings
        if len(ids) > limit:
            raise InputError(f"the prompt takes {len(ids)} tokens with the image, over the model's limit of {limit}; "
                             "shorten it")
        return ids, [0] * len(prefix) + [1] * len(rest)

    def __call__(self, images, prompts, suffixes=None) -> dict[str, torch.Tensor]:
        """One or several (image, prompt[, suffix]) -> left-padded input_ids, attention_mask, token_type_ids
        [B, T] and pixel_values [B, 3, S, S]."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not isinstance(prompts, (list, tuple)):
            raise InputError(f"prompts must be text or a list of texts, got {type(prompts).__name__}")
        if suffixes is not None and isinstance(suffixes, str):
            suffixes = [suffixes]
        if len(images) != len(prompts) or (suffixes is not None and len(suffixes) != len(prompts)):
            raise InputError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
        rows = [self.prompt_ids(p, None if suffixes is None else suffixes[i]) for i, p in enumerate(prompts)]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, types) in enumerate(rows):
            input_ids[i, length - len(ids) :] = torch.tensor(ids)
            attention_mask[i, length - len(ids) :] = 1
            token_type_ids[i, length - len(ids) :] = torch.tensor(types)
        pixel_values = torch.stack([preprocess_image(load_image(image), self.image_size) for image in images])
        return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    pixel_values=pixel_values)

    def decode(self, token_ids) -> str:
        """Generated ids -> text, keeping `<locNNNN>` / `<segNNN>` and dropping `<eos>`, `<pad>` and `<bos>`."""
        ids = [int(i) for i in token_ids if int(i) not in self.hidden_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def stream_decoder(self) -> "TextStream":
        return TextStream(self)


class TextStream:
    """Turns generated ids into text pieces as they come. Each step decodes only the few ids since the last
    emitted piece (with one piece of context, so spaces and merges come out as in a full decode), and holds a
    piece back while it ends in an incomplete multi-byte character."""

    def __init__(self, processor: PaliGemmaProcessor):
        self.processor = processor
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context piece
        self.read_offset = 0  # end of what has been emitted

    def step(self, token_id: int) -> str:
        if token_id in self.processor.hidden_ids:
            return ""
        self.ids.append(int(token_id))
        decode = self.processor.decode
        emitted = decode(self.ids[self.prefix_offset : self.read_offset])
        text = decode(self.ids[self.prefix_offset :])
        if len(text) <= len(emitted) or text.endswith("\ufffd") or not text.startswith(emitted):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted) :]
