"""An answer's objects as data: pixel boxes, and for a segmentation its mask as COCO run-length encoding. The demo's
API and `python -m paligemma batch` return the same entries: [{"label", "box": [x0, y0, x1, y1]}], with "mask" on a
segmentation's entry when the model ships a mask decoder."""

from __future__ import annotations

import numpy as np

from .mask_decoder import Segmentation, parse_segmentations
from .processor import Detection, parse_detections


def found_objects(text: str, size: tuple[int, int], mask_decoder) -> list[Detection]:
    """The answer's boxes in an image of `size` (width, height), each that has a mask (a segmentation answer, when the
    model ships a mask decoder) as its Segmentation."""
    detections = parse_detections(text, *size)
    if mask_decoder is None:
        return detections
    masks = {(s.label, s.box): s for s in parse_segmentations(text, *size, mask_decoder)}
    return [masks.get((d.label, d.box), d) for d in detections]


def box_entry(detection: Detection) -> dict:
    """A box entry: label and box, and for a segmentation its mask as COCO run-length encoding."""
    entry = {"label": detection.label, "box": [round(c, 1) for c in detection.box]}
    if isinstance(detection, Segmentation):
        entry["mask"] = coco_rle(detection.mask)
    return entry


def answer_boxes(text: str, size: tuple[int, int], mask_decoder) -> list[dict]:
    """The box entries of an answer about an image of `size` (width, height): found_objects as box_entry."""
    return [box_entry(d) for d in found_objects(text, size, mask_decoder)]


def coco_rle(mask) -> dict:
    """COCO's uncompressed run-length encoding of a bool [height, width] mask: {"size": [height, width], "counts":
    lengths of alternating runs of 0s and 1s, column by column, the first a run of 0s (possibly empty)}, which
    pycocotools (mask.frPyObjects) and most tools read; a few hundred numbers for a blob in a large image."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts}
