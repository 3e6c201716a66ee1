"""Detected boxes drawn on a copy of the image, one colour per label; a segmentation's mask filled translucent in
its box's colour."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from paligemma import Detection

PALETTE = [(230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180), (0, 160, 160), (240, 50, 230)]
MIN_SIDE, MAX_SIDE = 320, 1024  # the drawn copy's longer side, so labels stay legible on tiny and huge images
MASK_OPACITY = 0.45  # of a mask's fill: the image stays readable beneath it


def draw_detections(image: Image.Image, detections: list[Detection]) -> Image.Image:
    """A copy of `image` scaled so its longer side is within [MIN_SIDE, MAX_SIDE], each box outlined and labelled,
    each mask (a detection with a `mask`: paligemma.Segmentation) filled first, so that outlines and labels stay on
    top."""
    longest = max(image.size)
    scale = min(max(1.0, MIN_SIDE / longest), MAX_SIDE / longest)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = image.convert("RGB").resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(size) / 160))
    font = ImageFont.load_default(size=max(12, round(max(size) / 24)))
    colours: dict[str, tuple[int, int, int]] = {}
    for detection in detections:
        colour = colours.setdefault(detection.label, PALETTE[len(colours) % len(PALETTE)])
        mask = getattr(detection, "mask", None)
        if mask is not None:
            alpha = np.asarray(mask, dtype=np.uint8) * round(255 * MASK_OPACITY)
            coverage = Image.fromarray(alpha).resize(size, Image.Resampling.NEAREST)
            canvas.paste(Image.new("RGB", size, colour), mask=coverage)
    for detection in detections:
        colour = colours[detection.label]
        x0, y0, x1, y1 = (c * scale for c in detection.box)
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        if detection.label:
            left, top, right, bottom = draw.textbbox((0, 0), detection.label, font=font)
            height = bottom - top + 2 * line
            y = y0 - height if y0 - height >= 0 else y0  # above the box, or inside it at the top edge
            draw.rectangle([x0, y, x0 + right - left + 2 * line, y + height], fill=colour)
            draw.text((x0 + line - left, y + line - top), detection.label, fill="white", font=font)
    return canvas
