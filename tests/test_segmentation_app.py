"""Masks in the demo: drawn translucent in their box's colour, and returned by the API as COCO run-length encoding
beside today's label and box."""

import numpy as np
import pytest
import torch
from app_server import rle_decode
from PIL import Image

from demo.draw import MASK_OPACITY, PALETTE, draw_detections
from paligemma import Detection, MaskDecoder, Segmentation
from paligemma.boxes import box_entry, coco_rle, found_objects
from paligemma.mask_decoder import MaskDecoderConfig


@pytest.mark.parametrize("mask", [
    np.zeros((3, 4), bool), np.ones((3, 4), bool), np.eye(5, 7, dtype=bool),
    np.random.default_rng(0).random((31, 17)) > 0.5,
])
def test_rle_round_trips(mask):
    rle = coco_rle(mask)
    assert rle["size"] == list(mask.shape) and all(isinstance(c, int) for c in rle["counts"])
    np.testing.assert_array_equal(rle_decode(rle), mask)


def test_rle_is_column_major_and_starts_with_zeros():
    mask = np.array([[1, 0], [1, 1]], dtype=bool)  # columns: (1, 1), (0, 1)
    assert coco_rle(mask) == {"size": [2, 2], "counts": [0, 2, 1, 1]}


def test_mask_pixels_are_tinted_in_the_box_colour_and_others_are_not():
    image = Image.new("RGB", (400, 300), "white")
    mask = np.zeros((300, 400), dtype=bool)
    mask[100:200, 150:250] = True
    drawn = draw_detections(image, [Segmentation("circle", (100.0, 50.0, 300.0, 250.0), mask)])
    assert drawn.size == image.size
    tint = tuple(round(255 * (1 - MASK_OPACITY) + c * MASK_OPACITY) for c in PALETTE[0])
    inside = np.asarray(drawn)[110:190, 160:240].reshape(-1, 3)
    assert all(abs(int(a) - b) <= 1 for a, b in zip(inside[0], tint)) and (inside == inside[0]).all()
    assert drawn.getpixel((120, 150)) == (255, 255, 255)  # in the box, outside the mask
    assert drawn.getpixel((20, 20)) == (255, 255, 255)
    assert drawn.getpixel((200, 249)) == PALETTE[0]  # the outline stays on top


def test_plain_detections_draw_as_before():
    image = Image.new("RGB", (320, 320), "white")
    drawn = draw_detections(image, [Detection("circle", (100.0, 100.0, 200.0, 200.0))])
    assert drawn.getpixel((150, 150)) == (255, 255, 255)


def positive_decoder() -> MaskDecoder:
    decoder = MaskDecoder(MaskDecoderConfig(embedding_dim=4, width=8))
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.zero_()
        decoder.decoder[12].bias.fill_(1.0)
    return decoder.eval()


SEGMENT_ANSWER = ("<loc0000><loc0000><loc0511><loc0511>" + "<seg001>" * 16 + " circle ; "
                  "<loc0512><loc0512><loc1023><loc1023> square")


def test_api_entries_keep_label_and_box_and_add_the_mask():
    picture = Image.new("RGB", (64, 32))
    circle, square = (box_entry(d) for d in found_objects(SEGMENT_ANSWER, picture.size, positive_decoder()))
    assert square == {"label": "square", "box": [32.0, 16.0, 64.0, 32.0]}  # no mask: a plain box, as today
    assert circle["label"] == "circle" and circle["box"] == [0.0, 0.0, 32.0, 16.0]
    expected = np.zeros((32, 64), bool)
    expected[:15, :31] = True  # int(511 / 1023 * 32) = 15, int(511 / 1023 * 64) = 31
    np.testing.assert_array_equal(rle_decode(circle["mask"]), expected)


def test_without_a_mask_decoder_the_entries_are_todays():
    picture = Image.new("RGB", (64, 32))
    entries = [box_entry(d) for d in found_objects(SEGMENT_ANSWER, picture.size, None)]
    assert entries == [{"label": "circle", "box": [0.0, 0.0, 32.0, 16.0]},
                       {"label": "square", "box": [32.0, 16.0, 64.0, 32.0]}]
