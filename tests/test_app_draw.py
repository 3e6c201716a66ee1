"""Boxes drawn by the demo: at the right place at any image size, one colour per label."""

import pytest
from PIL import Image

from demo.draw import MAX_SIDE, MIN_SIDE, PALETTE, draw_detections
from paligemma import Detection, parse_detections


@pytest.mark.parametrize("size", [(224, 224), (16, 9), (4000, 3000)])
def test_box_outline_lands_where_the_detection_says(size):
    width, height = size
    image = Image.new("RGB", size, "white")
    box = (0.25 * width, 0.5 * height, 0.75 * width, 0.9 * height)
    drawn = draw_detections(image, [Detection("circle", box)])
    assert MIN_SIDE <= max(drawn.size) <= MAX_SIDE
    scale = drawn.width / width
    x_mid, y_bottom = round((box[0] + box[2]) / 2 * scale), round(box[3] * scale)
    assert drawn.getpixel((x_mid, y_bottom - 1)) == PALETTE[0]  # the bottom edge
    assert drawn.getpixel((x_mid, round((box[1] + box[3]) / 2 * scale))) == (255, 255, 255)  # inside stays clear


def test_each_label_gets_its_own_colour_and_the_image_is_not_modified():
    image = Image.new("RGB", (400, 400), "white")
    text = "<loc0100><loc0100><loc0300><loc0300> circle ; <loc0500><loc0500><loc0700><loc0700> square ; " \
           "<loc0800><loc0100><loc0900><loc0300> circle"
    detections = parse_detections(text, 400, 400)
    drawn = draw_detections(image, detections)
    colours = {detection.label: drawn.getpixel((round(detection.box[0]) + 1, round(detection.box[3]) - 1))
               for detection in detections}
    assert colours == {"circle": PALETTE[0], "square": PALETTE[1]}
    assert image.getcolors() == [(400 * 400, (255, 255, 255))]


def test_no_detections_gives_the_plain_image():
    image = Image.new("RGB", (320, 200), (10, 20, 30))
    assert list(draw_detections(image, []).getdata()) == list(image.getdata())
