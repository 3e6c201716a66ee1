"""PaliGemma's location and segmentation tokens: the text of each, and boxes to and from location tokens.

A box is four location tokens in PaliGemma's order y_min, x_min, y_max, x_max, then its label:

    <loc0256><loc0512><loc0767><loc1023> dog ; <loc0000><loc0000><loc1023><loc0511> red circle

A coordinate c, as a fraction of the image's height or width, is the bin round(c * 1023) of 1024 (big_vision's
encoding); bin b decodes to b / 1023, so the two sides of the image are bins 0 and 1023 exactly.

A segmentation answer puts the 16 codes of a mask (`<seg000>`..`<seg127>`, a VQ-VAE codebook's indices: see
paligemma.mask_decoder) between a box and its label:

    <loc0256><loc0512><loc0767><loc1023><seg017><seg093>...(16 in all) dog ; ...

Box parsing reads such a box as any other (its codes skipped); `parse_masks` reads the codes too.
"""

from __future__ import annotations

import re

NUM_LOC_BINS = 1024
NUM_SEG_CODES = 128
LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(NUM_LOC_BINS))
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(NUM_SEG_CODES))

NUM_MASK_CODES = 16  # per mask, a 4 x 4 grid
LOC_TOKEN = re.compile(r"<loc(\d{4})>")
SEG_TOKEN = re.compile(r"<seg(\d{3})>")
# Four location tokens, any run of segmentation tokens, and a label. Strict: the label runs to ";" or the end of the
# text (a box whose label runs into another token is skipped). Loose: the label is whatever text comes before the
# next ";" or token.
STRICT_BOX = re.compile(r"((?:<loc\d{4}>){4})\s*((?:<seg\d{3}>)*)\s*([^;<]*?)\s*(?:;|$)")
LOOSE_BOX = re.compile(r"((?:<loc\d{4}>){4})\s*((?:<seg\d{3}>)*)\s*([^;<]*)")


def to_bin(coordinate: float) -> int:
    """The location bin of a coordinate in [0, 1] (clamped to it): round(coordinate * 1023)."""
    return min(NUM_LOC_BINS - 1, max(0, round(coordinate * (NUM_LOC_BINS - 1))))


def from_bin(index: int) -> float:
    """The coordinate in [0, 1] of a location bin: index / 1023."""
    return index / (NUM_LOC_BINS - 1)


def box_tokens(box, height: float = 1.0, width: float = 1.0) -> str:
    """The four location tokens of a box (y_min, x_min, y_max, x_max) in pixels of a `height` x `width` image
    (normalized coordinates with the defaults)."""
    y_min, x_min, y_max, x_max = box
    sides = (y_min / height, x_min / width, y_max / height, x_max / width)
    return "".join(LOC_TOKENS[to_bin(c)] for c in sides)


def parse_boxes(text: str, strict: bool = True) -> list[tuple[tuple[int, int, int, int], str]]:
    """((y_min, x_min, y_max, x_max) bins, label) of each box in `text`, labels stripped of spaces.

    strict (paligemma.parse_detections): a label ends at ";" or the end of the text; loose (how the shapes
    evaluation scores answers): at ";" or the next token, so a box directly followed by another box still counts.
    """
    pattern = STRICT_BOX if strict else LOOSE_BOX
    return [(tuple(int(b) for b in LOC_TOKEN.findall(locs)), label.strip()) for locs, _, label in pattern.findall(text)]


def parse_masks(text: str) -> list[tuple[tuple[int, int, int, int], tuple[int, ...], str]]:
    """((y_min, x_min, y_max, x_max) bins, 16 codes, label) of each well-formed mask in `text` (labels as in strict
    box parsing). Well-formed, as big_vision's segmentation evaluator checks: bins in 0..1023 with y_max > y_min and
    x_max > x_min, exactly 16 codes each in 0..127. Other boxes are not masks (box parsing still reads them)."""
    masks = []
    for locs, segs, label in STRICT_BOX.findall(text):
        bins = tuple(int(b) for b in LOC_TOKEN.findall(locs))
        codes = tuple(int(c) for c in SEG_TOKEN.findall(segs))
        if (len(codes) == NUM_MASK_CODES and all(c < NUM_SEG_CODES for c in codes)
                and all(b < NUM_LOC_BINS for b in bins) and bins[2] > bins[0] and bins[3] > bins[1]):
            masks.append((bins, codes, label.strip()))
    return masks


def loc_range_of(tokenizer) -> tuple[int, int] | None:
    """(id of <loc0000>, 1024) when a tokenizers.Tokenizer holds the 1024 location tokens at consecutive ids,
    else None."""
    first = tokenizer.token_to_id(LOC_TOKENS[0])
    if first is None or any(tokenizer.token_to_id(token) != first + i for i, token in enumerate(LOC_TOKENS)):
        return None
    return first, NUM_LOC_BINS

