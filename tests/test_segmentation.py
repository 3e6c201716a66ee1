"""paligemma.parse_segmentations on hand-written answers, detection parsing of segmentation answers, and the
pipeline's mask decoder."""

import shutil

import numpy as np
import pytest
import torch

import paligemma
from paligemma import MaskDecoder, parse_detections, parse_segmentations
from paligemma.checkpoint import MASK_DECODER_NAME
from paligemma.mask_decoder import MaskDecoderConfig

TINY = MaskDecoderConfig(num_embeddings=128, embedding_dim=6, width=8)


def answer(box_bins, codes, label):
    return "".join(f"<loc{b:04d}>" for b in box_bins) + "".join(f"<seg{c:03d}>" for c in codes) + f" {label}"


def constant_decoder(logit: float) -> MaskDecoder:
    """Every code decodes to the same 64 x 64 logits: all `logit`."""
    decoder = MaskDecoder(TINY)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.zero_()
        decoder.decoder[12].bias.fill_(logit)
    return decoder.eval()


def random_decoder(seed=0) -> MaskDecoder:
    torch.manual_seed(seed)
    decoder = MaskDecoder(TINY)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.normal_(0, 0.5)
    return decoder.eval()


CODES = [3, 17, 127, 0, 5, 5, 64, 9, 1, 2, 3, 4, 100, 101, 102, 103]


def test_one_object_fills_its_box_in_whole_pixels():
    width, height = 200, 100
    text = answer((256, 512, 767, 1023), CODES, "circle")
    [found] = parse_segmentations(text, width, height, constant_decoder(1.0))
    assert found.label == "circle"
    assert found.box == pytest.approx((512 / 1023 * 200, 256 / 1023 * 100, 200.0, 767 / 1023 * 100))
    assert found.box == parse_detections(text, width, height)[0].box
    expected = np.zeros((height, width), dtype=bool)
    expected[25:74, 100:200] = True  # int() of 25.02, 74.97 and 100.1, 200
    assert found.mask.dtype == bool and found.mask.shape == (height, width)
    np.testing.assert_array_equal(found.mask, expected)


def test_a_negative_mask_is_empty():
    [found] = parse_segmentations(answer((0, 0, 1023, 1023), CODES, "square"), 50, 40, constant_decoder(-1.0))
    assert not found.mask.any()


def test_two_objects_get_their_own_masks():
    """On a 1023 x 1023 image bin b is pixel b; 64-pixel boxes take the 64 x 64 logits unresized."""
    decoder = random_decoder()
    other = CODES[::-1]
    text = answer((100, 200, 164, 264), CODES, "circle") + " ; " + answer((500, 600, 564, 664), other, "red square")
    first, second = parse_segmentations(text, 1023, 1023, decoder)
    assert (first.label, second.label) == ("circle", "red square")
    logits = decoder.mask_logits(np.array([CODES, other]))
    for found, (y, x), expected in zip((first, second), ((100, 200), (500, 600)), logits > 0):
        np.testing.assert_array_equal(found.mask[y:y + 64, x:x + 64], expected)
        outside = found.mask.copy()
        outside[y:y + 64, x:x + 64] = False
        assert not outside.any()
    assert 0 < first.mask.sum() < 64 * 64 and not np.array_equal(logits[0] > 0, logits[1] > 0)


@pytest.mark.parametrize("codes", [
    "".join(f"<seg{c:03d}>" for c in CODES[:15]),  # one code short
    "".join(f"<seg{c:03d}>" for c in CODES + [7]),  # one too many
    "".join(f"<seg{c:03d}>" for c in CODES[:15]) + "<seg128>",  # past the codebook
    "",  # a plain detection
])
def test_a_malformed_seg_run_is_no_mask_but_still_a_box(codes):
    text = "<loc0100><loc0200><loc0300><loc0400>" + codes + " circle"
    assert parse_segmentations(text, 100, 100, constant_decoder(1.0)) == []
    [box] = parse_detections(text, 100, 100)
    assert box.label == "circle"


def test_a_broken_token_in_the_run_drops_that_box_only():
    broken = "<loc0100><loc0200><loc0300><loc0400><seg001><seg12> circle"
    good = answer((0, 0, 511, 511), CODES, "triangle")
    [found] = parse_segmentations(broken + " ; " + good, 64, 64, constant_decoder(1.0))
    assert found.label == "triangle"
    assert [d.label for d in parse_detections(broken + " ; " + good, 64, 64)] == ["triangle"]


@pytest.mark.parametrize("bins", [(100, 200, 1100, 400), (100, 200, 300, 4000),  # past the image's side
                                  (300, 200, 100, 400), (100, 400, 300, 400)])  # inverted, empty
def test_a_box_outside_the_image_or_inverted_is_no_mask(bins):
    text = answer(bins, CODES, "circle")
    assert parse_segmentations(text, 100, 80, constant_decoder(1.0)) == []
    assert len(parse_detections(text, 100, 80)) == 1  # detection parsing reads what it always read


def test_a_box_under_one_pixel_has_an_empty_mask():
    [found] = parse_segmentations(answer((10, 10, 12, 12), CODES, "dot"), 20, 20, constant_decoder(1.0))
    assert found.mask.shape == (20, 20) and not found.mask.any()


def test_text_without_masks_decodes_nothing():
    class Refuses:
        def mask_logits(self, codes):
            raise AssertionError("no mask to decode")

    assert parse_segmentations("a red circle", 10, 10, Refuses()) == []


def test_detection_parsing_of_segmentation_answers_reads_the_boxes():
    text = answer((0, 0, 1023, 511), CODES, "red circle") + " ; " + answer((512, 0, 1023, 1023), CODES, "square")
    found = parse_detections(text, 1023, 1023)
    assert [(d.label, d.box) for d in found] == [("red circle", (0.0, 0.0, 511.0, 1023.0)),
                                                 ("square", (0.0, 512.0, 1023.0, 1023.0))]


def test_pipeline_has_the_checkpoint_mask_decoder(tmp_path):
    assert isinstance(paligemma.load().mask_decoder, MaskDecoder)  # the embedded model segments
    folder = tmp_path / "checkpoint"
    shutil.copytree(paligemma.DEMO_CHECKPOINT, folder)
    (folder / MASK_DECODER_NAME).unlink()
    assert paligemma.load(folder).mask_decoder is None
    random_decoder().save(folder / MASK_DECODER_NAME)
    pipe = paligemma.load(folder)
    assert isinstance(pipe.mask_decoder, MaskDecoder) and pipe.mask_decoder.config == TINY
    codes = np.array([CODES])
    np.testing.assert_array_equal(pipe.mask_decoder.mask_logits(codes), random_decoder().mask_logits(codes))


def test_mask_decoder_file_is_not_taken_for_a_weight_shard(tmp_path):
    from paligemma.checkpoint import weight_files

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model-00001-of-00001.safetensors").write_bytes(b"")
    (folder / MASK_DECODER_NAME).write_bytes(b"")
    assert [p.name for p in weight_files(folder)] == ["model-00001-of-00001.safetensors"]
