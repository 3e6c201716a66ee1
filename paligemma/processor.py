"""Inputs for PaliGemma: image preprocessing, the prompt format, tokenization, decoding and detection parsing.

Prompt format (one `<bos>`, after the image tokens):
    <image> x N, <bos>, prefix, "\\n"  [, suffix, <eos>  when training]
The prefix part (image + prompt + "\\n") is attended bidirectionally (token type 0); the suffix causally (1).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from tokenizers import Tokenizer

from .config import PaliGemmaConfig
from .errors import CheckpointError, InputError, shown
from .locations import from_bin, parse_boxes

IMAGE_TOKEN = "<image>"
# The image formats a file may be in, checked from its content: those that browsers and cameras write, each decoded by
# a widely used library (libpng, libjpeg-turbo, libwebp, giflib-compatible code in Pillow, libtiff). Pillow opens many
# more; some of them hand the file to an outside program (EPS runs Ghostscript), others are rarely exercised code.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Memory for decoding one image (decode_cost: the frame as Pillow stores it at its decoded size, which for JPEG is
# already reduced, and what the decoder holds beside it). With the band buffers and the small reduced copy of
# rgb_reduced, a file within this costs at most ~250 MB while it is read (docs/security.md has the measurements).
DECODE_BUDGET = 192 * 2**20
# Pixels in one image, whatever its format: the time to decode (about 0.5 s for 64 megapixels of PNG on one core).
MAX_IMAGE_PIXELS = 64_000_000
# A file is decoded at reduced size while each side stays at least this many times the model's input side (Pillow's
# `reducing_gap`). 4, not Pillow's suggested 2, from a measurement on photos, a screenshot and scenes of 1000 to 3100
# pixels (bench/reduced_decoding.py, docs/security.md): at 4 a value the model sees moves by at most 9 levels of 255
# (JPEG's scaled decoding; 3 for PNG) and 0.25 of a level on average; at 2, 10 levels and 0.5.
REDUCING_GAP = 4
BAND_PIXELS = 2**19  # converted to RGB a band of about this many pixels at a time (a few MB each)
WEBP_BYTES_PER_PIXEL = 16  # libwebp's buffers and Pillow's frame, measured (bench/image_load.py)
NEXT_SCAN_OR_END = re.compile(rb"\xff[\xd9\xda]")  # a JPEG's EOI or SOS marker
SOURCE_BOX = "paligemma_source_box"  # a reduced image's info: see upright_rgb
ORIENTATIONS = {  # EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def load_image(image, input_size: int | None = None) -> Image.Image:
    """A PIL image from a PIL image, a path, bytes or an HxW[xC] uint8 array, upright (EXIF applied) and RGB.

    A file (a path or bytes) is opened only in IMAGE_FORMATS, and its size is checked against MAX_IMAGE_PIXELS and
    DECODE_BUDGET before any pixel is decoded. Given the model's `input_size`, it is decoded at reduced size (JPEG's
    own scaled decoding, then Pillow's `reduce`) while each side stays at least REDUCING_GAP x input_size: what the
    model sees is then within a tested distance of resizing the full image, at a fraction of the memory and time.
    A PIL image or an array is used at its size (it is decoded already)."""
    return load_image_and_size(image, input_size)[0]


def load_image_and_size(image, input_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """load_image, and the upright size of the image as stored, before any reduction: the size its boxes and masks
    are measured in (paligemma.parse_detections)."""
    if isinstance(image, Image.Image):
        check_size(image)
        return upright_rgb(image, (1, 1), image.size)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise InputError(f"an image array must be uint8, HxW (gray) or HxWxC with C = 1, 3 or 4 channels last; "
                             f"got {image.dtype} with shape {image.shape}")
        opened = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        check_size(opened)
        return upright_rgb(opened, (1, 1), opened.size)
    if not isinstance(image, (bytes, bytearray, str, os.PathLike)):
        raise InputError(f"cannot read an image from a {type(image).__name__}; pass a PIL image, a path or bytes")
    source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else Path(image)
    if isinstance(source, Path):
        check_file(source)
    try:
        # Reads the header only: format, size and mode are known before any pixel is decoded.
        opened = Image.open(source, formats=IMAGE_FORMATS)
        check_size(opened)
        stored_size = opened.size
        drafted = None
        if input_size is not None:
            side = REDUCING_GAP * input_size
            drafted = opened.draft(None, (side, side))  # JPEG: decoded at 1/2, 1/4 or 1/8 size, each side >= side
        check_budget(opened, stored_size)
        opened.load()
        factors = (1, 1) if input_size is None else tuple(max(1, n // (REDUCING_GAP * input_size))
                                                          for n in opened.size)
        return upright_rgb(opened, factors, stored_size, drafted[1] if drafted else None)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError("the image is too large to decode safely (a decompression bomb?); "
                         "use a smaller image") from None
    except UnidentifiedImageError:
        raise InputError(f"the file is not an image in a format this reads ({', '.join(IMAGE_FORMATS)}); "
                         "convert it to one of them") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"the image is corrupt or truncated ({shown(str(e), 200)}); re-save or re-upload it") from None


def check_size(image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"the image is {width}x{height}, over the {MAX_IMAGE_PIXELS:,}-pixel limit; "
                         "downscale it first")
    if width < 1 or height < 1:
        raise InputError(f"the image is {width}x{height}; it needs at least one pixel")


def decode_cost(image: Image.Image, stored_size: tuple[int, int]) -> int:
    """The bytes decoding `image` (opened, not loaded; a JPEG drafted to its decoded size) takes, from its header:
    the frame as Pillow stores it (1 byte a pixel for modes 1, L and P, 2 for 16-bit gray, 4 for every other mode:
    RGB too), and what the decoder holds beside it, measured by bench/image_load.py: libwebp's own buffers (16 bytes
    a pixel in all), and a JPEG of several scans (progressive, or components in scans of their own) keeps every
    coefficient of the stored size, 2 bytes each, whatever size it is decoded at."""
    width, height = image.size
    if image.format == "WEBP":
        return width * height * WEBP_BYTES_PER_PIXEL
    per_pixel = 1 if image.mode in ("1", "L", "P") else 2 if image.mode.startswith("I;16") else 4
    cost = width * height * per_pixel
    if image.format in ("JPEG", "MPO") and several_scans(image):
        samples = [h * v for _, h, v, _ in image.layer]
        horizontal, vertical = max(h for _, h, _, _ in image.layer), max(v for _, _, v, _ in image.layer)
        cost += 2 * stored_size[0] * stored_size[1] * sum(samples) // (horizontal * vertical)
    return cost


def several_scans(image) -> bool:
    """Whether a JPEG has another scan after its first: the next marker after the first scan's data is SOS, not EOI
    (inside a scan's data, 0xFF is always followed by 0x00 or a restart marker, so neither can occur there)."""
    image.fp.seek(image.tile[0].offset)
    tail = b""
    while chunk := image.fp.read(2**20):
        found = NEXT_SCAN_OR_END.search(tail + chunk)
        if found:
            return found.group() == b"\xff\xda"
        tail = chunk[-1:]
    return False


def check_budget(image: Image.Image, stored_size: tuple[int, int]) -> None:
    needed = decode_cost(image, stored_size)
    if needed > DECODE_BUDGET:
        raise InputError(f"the image is {stored_size[0]}x{stored_size[1]} {image.format} in mode {image.mode}: "
                         f"decoding it takes {needed / 2**20:.0f} MB, over this reader's "
                         f"{DECODE_BUDGET / 2**20:.0f} MB; downscale it first")


def check_file(path: Path) -> None:
    try:
        if path.is_file():
            return
        what = "is a folder, not an image file" if path.is_dir() else "does not exist"
    except (OSError, ValueError):  # a name too long, a NUL byte
        what = "cannot be read"
    raise InputError(f"image file {shown(str(path))} {what}")


def upright_rgb(image: Image.Image, factors: tuple[int, int], stored_size: tuple[int, int],
                box: tuple[float, float, float, float] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """`image` reduced by `factors` (width, height), upright and RGB, and `stored_size` (its size before any
    reduction) made upright. `box`: the region of `image`'s pixels that the stored image covers (a JPEG decoded at
    reduced size covers a fraction of its last row and column); by default `image`'s own SOURCE_BOX, or all of it.

    The result carries no metadata but its SOURCE_BOX where that is not all of it: reducing rounds up, so the last row
    and column of a reduced image stand for less than a whole block, and preprocess_image resizes that box alone, as
    Pillow's own reduce-then-resize does."""
    transpose = ORIENTATIONS.get(image.getexif().get(ExifTags.Base.Orientation))
    left, top, right, bottom = box or image.info.get(SOURCE_BOX) or (0, 0, *image.size)
    rgb = rgb_reduced(image, factors)
    box = (left / factors[0], top / factors[1], right / factors[0], bottom / factors[1])
    width, height = stored_size
    if transpose is not None:
        box = transposed_box(box, rgb.size, transpose)
        rgb = rgb.transpose(transpose)
        if transpose in SWAPPING:
            width, height = height, width
    rgb.info = {} if box == (0, 0, *rgb.size) else {SOURCE_BOX: box}
    return rgb, (width, height)


SWAPPING = (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
            Image.Transpose.ROTATE_270)


def transposed_box(box, size, transpose):
    """The box (left, top, right, bottom) in an image of `size`, where it lies once the image is transposed."""
    width, height = size
    corners = {  # where a point (x, y) goes
        Image.Transpose.FLIP_LEFT_RIGHT: lambda x, y: (width - x, y),
        Image.Transpose.FLIP_TOP_BOTTOM: lambda x, y: (x, height - y),
        Image.Transpose.ROTATE_180: lambda x, y: (width - x, height - y),
        Image.Transpose.ROTATE_90: lambda x, y: (y, width - x),  # counter-clockwise
        Image.Transpose.ROTATE_270: lambda x, y: (height - y, x),
        Image.Transpose.TRANSPOSE: lambda x, y: (y, x),
        Image.Transpose.TRANSVERSE: lambda x, y: (height - y, width - x),
    }[transpose]
    (x0, y0), (x1, y1) = corners(*box[:2]), corners(*box[2:])
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def rgb_reduced(image: Image.Image, factors: tuple[int, int]) -> Image.Image:
    """`to_rgb(image).reduce(factors)`, converted a band of rows at a time: no full-size copy is made beside `image`
    (every step of to_rgb works on each pixel alone, and the bands start at multiples of the height factor, so the
    result is the same)."""
    width, height = image.size
    white = white_level(image)
    fx, fy = factors
    rows = fy * max(1, BAND_PIXELS // (width * fy))
    if rows >= height and factors == (1, 1):
        return to_rgb(image, white)
    reduced = Image.new("RGB", (-(-width // fx), -(-height // fy)))
    for top in range(0, height, rows):
        band = to_rgb(image.crop((0, top, width, min(height, top + rows))), white)
        reduced.paste(band if factors == (1, 1) else band.reduce(factors), (0, top // fy))
    return reduced


def white_level(image: Image.Image) -> float | None:
    """The value that becomes 255 when 16- or 32-bit gray is made 8-bit: 65535 for 16-bit; for 32-bit, 255 unless a
    value is above it (then 65535). None for other modes."""
    if image.mode.startswith("I;16"):
        return 65535.0
    if image.mode == "I":
        return 65535.0 if image.getextrema()[1] > 255 else 255.0
    return None


def to_rgb(image: Image.Image, white: float | None = None) -> Image.Image:
    """RGB as transformers makes it: transparency composited onto white. 16- and 32-bit gray is scaled to 8 bits
    by `white` (white_level of the whole image; a plain convert would clip everything above 255 to white), through a
    table of the 65536 values, so no floating-point copy of the image is made."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        table = np.clip(np.round(np.arange(65536, dtype=np.float64) * (255.0 / (white or white_level(image)))),
                        0, 255).astype(np.uint8)
        values = np.asarray(image)
        if image.mode == "I":
            values = np.clip(values, 0, 65535)
        image = Image.fromarray(table[values], "L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> [3, size, size] float32 in [-1, 1]: bicubic resize (aspect ratio not kept; of the image's
    SOURCE_BOX where load_image reduced it), /255, (x - 0.5) / 0.5."""
    resized = np.asarray(image.resize((size, size), resample=Image.Resampling.BICUBIC,
                                      box=image.info.get(SOURCE_BOX)), dtype=np.float32)
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
        pixel_values = torch.stack([preprocess_image(load_image(image, self.image_size), self.image_size)
                                    for image in images])
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
