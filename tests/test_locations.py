"""paligemma.locations: coordinates to bins and back, boxes to tokens, tokens parsed out of answers."""

import pytest
from tokenizers import Tokenizer, models

from paligemma import locations as L
from paligemma import parse_detections
from shapes.tokenizer import build_shapes_tokenizer


def test_token_text():
    assert (L.NUM_LOC_BINS, len(L.LOC_TOKENS), L.NUM_SEG_CODES, len(L.SEG_TOKENS)) == (1024, 1024, 128, 128)
    assert L.LOC_TOKENS[:2] + L.LOC_TOKENS[-1:] == ("<loc0000>", "<loc0001>", "<loc1023>")
    assert L.SEG_TOKENS[:2] + L.SEG_TOKENS[-1:] == ("<seg000>", "<seg001>", "<seg127>")


@pytest.mark.parametrize("coordinate, expected", [
    (0.0, 0), (1.0, 1023), (0.5, 512), (0.25, 256), (0.75, 767), (1 / 1023, 1), (0.4995, 511),
    (-0.1, 0), (1.2, 1023),  # clamped to the image
])
def test_coordinate_to_bin_is_round_coordinate_times_1023(coordinate, expected):
    assert L.to_bin(coordinate) == expected


@pytest.mark.parametrize("index, expected", [(0, 0.0), (1023, 1.0), (512, 512 / 1023), (1, 1 / 1023)])
def test_bin_to_coordinate_is_bin_over_1023(index, expected):
    assert L.from_bin(index) == expected


def test_every_bin_survives_a_round_trip():
    assert [L.to_bin(L.from_bin(b)) for b in range(1024)] == list(range(1024))


def test_box_tokens_in_paligemmas_order():
    assert L.box_tokens((0.0, 0.25, 0.5, 1.0)) == "<loc0000><loc0256><loc0512><loc1023>"
    # Pixels: y on the height, x on the width (y_min, x_min, y_max, x_max).
    assert L.box_tokens((50, 100, 100, 200), height=100, width=200) == "<loc0512><loc0512><loc1023><loc1023>"


PARSED = [
    ("<loc0000><loc0000><loc1023><loc0511> red circle ; <loc0256><loc0512><loc0767><loc1023> dog",
     [((0, 0, 1023, 511), "red circle"), ((256, 512, 767, 1023), "dog")],
     [((0, 0, 1023, 511), "red circle"), ((256, 512, 767, 1023), "dog")]),
    ("no boxes here", [], []),
    ("<loc0001><loc0002><loc0003> too few", [], []),
    ("<loc0001><loc0002><loc0003><loc0004>", [((1, 2, 3, 4), "")], [((1, 2, 3, 4), "")]),
    # A box run into the next: strict skips it, loose keeps it with the text before the next token.
    ("<loc0001><loc0002><loc0003><loc0004> cat<loc0005><loc0006><loc0007><loc0008> dog",
     [((5, 6, 7, 8), "dog")], [((1, 2, 3, 4), "cat"), ((5, 6, 7, 8), "dog")]),
    # Five location tokens: strict takes the last four (the label follows them), loose the first four.
    ("<loc0001><loc0002><loc0003><loc0004><loc0005> cat",
     [((2, 3, 4, 5), "cat")], [((1, 2, 3, 4), "")]),
]


@pytest.mark.parametrize("text, strict, loose", PARSED)
def test_parse_boxes(text, strict, loose):
    assert L.parse_boxes(text) == strict
    assert L.parse_boxes(text, strict=False) == loose


def test_parse_detections_reads_the_strict_boxes_in_pixels():
    text = "<loc0000><loc0256><loc0512><loc1023> dog"
    [dog] = parse_detections(text, width=200, height=100)
    assert dog.label == "dog" and dog.box == (256 / 1023 * 200, 0.0, 200.0, 512 / 1023 * 100)


def test_loc_range_of_finds_consecutive_location_tokens():
    tokenizer = build_shapes_tokenizer()
    first = tokenizer.token_to_id("<loc0000>")
    assert L.loc_range_of(tokenizer) == (first, 1024) and tokenizer.token_to_id("<loc1023>") == first + 1023
    assert L.loc_range_of(Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))) is None
    gapped = {"<unk>": 0, **{token: 1 + i + (i >= 500) for i, token in enumerate(L.LOC_TOKENS)}}
    assert L.loc_range_of(Tokenizer(models.WordLevel(gapped, unk_token="<unk>"))) is None
