"""The processor against transformers' PaliGemmaProcessor, and detection parsing."""

import io

import numpy as np
import pytest
from PIL import Image
from tiny import reference_processor

import paligemma
from paligemma.processor import load_image, parse_detections


@pytest.fixture(scope="module")
def processors(reference_factory):
    folder, _ = reference_factory("pg2_more_image_tokens")
    pipe = paligemma.load(folder)
    return pipe.processor, reference_processor(folder, pipe.config.image_size, pipe.config.num_image_tokens)


def gradient(width, height):
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.broadcast_to((x + y) / 2, (height, width, 1))], -1).astype(np.uint8)


def exif_rotated():
    """A JPEG whose pixels are stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    image = Image.fromarray(gradient(60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return Image.open(io.BytesIO(buffer.getvalue()))


def cases():
    rgb = Image.fromarray(gradient(50, 40))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (40, 1))))
    return {
        "RGB": (rgb, rgb),
        "RGBA": (rgba, rgba),
        "P": (rgb.convert("P"), rgb.convert("P")),
        "L": (rgb.convert("L"), rgb.convert("L")),
        "CMYK": (rgb.convert("CMYK"), rgb.convert("CMYK")),
        "1x1": (Image.new("RGB", (1, 1), (200, 10, 30)),) * 2,
        "1x4000": (Image.fromarray(gradient(4000, 1)),) * 2,
    }


@pytest.mark.parametrize("mode", list(cases()))
def test_pixel_values_match_transformers(processors, mode):
    ours, theirs = processors
    image, reference_image = cases()[mode]
    got = ours([image], ["caption en"])["pixel_values"]
    expected = theirs(images=[reference_image], text=["caption en"], return_tensors="pt")["pixel_values"]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_exif_orientation_is_applied(processors):
    ours, theirs = processors
    image = exif_rotated()
    assert image.size == (60, 30)  # stored sideways
    upright = image.transpose(Image.Transpose.ROTATE_270)
    got = ours([image], ["caption en"])["pixel_values"]
    expected = theirs(images=[upright], text=["caption en"], return_tensors="pt")["pixel_values"]
    assert (got - expected).abs().max().item() <= 1e-5


def test_sixteen_bit_images_are_scaled_not_clipped(processors):
    """transformers' plain convert('RGB') clips 16-bit gray above 255 to white; we scale to 8 bits first and
    then match transformers on that 8-bit image."""
    ours, theirs = processors
    values = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    eight_bit = Image.fromarray(np.round(values / 65535 * 255).astype(np.uint8), "L")
    got = ours([image], ["caption en"])["pixel_values"]
    expected = theirs(images=[eight_bit], text=["caption en"], return_tensors="pt")["pixel_values"]
    assert (got - expected).abs().max().item() <= 1e-5
    assert got.min() < -0.9 and got.max() > 0.9  # the full range survives


@pytest.mark.parametrize("suffix", [None, "a red circle and a blue square"])
def test_input_ids_match_transformers(processors, suffix):
    ours, theirs = processors
    image = Image.fromarray(gradient(20, 20))
    prompts = ["caption en", "detect red car ; dog", ""]
    for prompt in prompts:
        got = ours([image], [prompt], None if suffix is None else [suffix])
        kwargs = {} if suffix is None else {"suffix": [suffix]}
        expected = theirs(images=[image], text=[prompt], return_tensors="pt", **kwargs)
        assert got["input_ids"].tolist() == expected["input_ids"].tolist()
        assert got["token_type_ids"].tolist() == expected["token_type_ids"].tolist()
        assert (got["input_ids"] == ours.bos_id).sum() == 1  # exactly one <bos>, after the image tokens


def test_decode_keeps_location_tokens_and_drops_control_tokens(processors):
    ours, _ = processors
    tok = ours.tokenizer
    ids = ([tok.token_to_id("<loc0012>"), tok.token_to_id("<loc1023>")]
           + tok.encode("▁dog", add_special_tokens=False).ids)
    ids += [ours.eos_id, ours.pad_id]
    text = ours.decode(ids)
    assert text.startswith("<loc0012><loc1023>")
    assert "<eos>" not in text and "<pad>" not in text


def test_parse_detections_to_pixel_boxes():
    text = "<loc0000><loc0000><loc1023><loc0511> red circle ; <loc0256><loc0512><loc0767><loc1023> dog"
    boxes = parse_detections(text, width=200, height=100)
    assert [b.label for b in boxes] == ["red circle", "dog"]
    assert boxes[0].box == pytest.approx((0.0, 0.0, 511 / 1023 * 200, 100.0))
    assert boxes[1].box == pytest.approx((512 / 1023 * 200, 256 / 1023 * 100, 200.0, 767 / 1023 * 100))
    assert parse_detections("no boxes here", 10, 10) == []


def test_load_image_accepts_paths_bytes_and_arrays(tmp_path):
    array = gradient(30, 20)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    for source in (path, str(path), path.read_bytes(), array):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (30, 20)
        assert np.array_equal(np.asarray(image), array)


def test_stream_decoding_handles_split_multibyte_characters(processors):
    ours, _ = processors
    tok = ours.tokenizer
    def byte(b):
        return tok.token_to_id(f"<0x{b:02X}>")

    def word(w):
        return tok.encode(w, add_special_tokens=False).ids

    complete = word("▁dog") + [byte(0xE6), byte(0x97), byte(0xA5)] + word("▁cat")  # E6 97 A5 is one character
    dangling = word("▁dog") + [byte(0xE6), byte(0x97)] + word("▁cat") + word("▁dog")  # a character that never ends
    for ids in (complete, dangling):
        stream = ours.stream_decoder()
        pieces = [stream.step(i) for i in ids]
        assert "".join(pieces) == ours.decode(ids)
        assert pieces[-1] != ""  # text after a broken character still streams
    assert "日" in ours.decode(complete)
