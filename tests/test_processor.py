"""The processor against transformers' PaliGemmaProcessor, and detection parsing."""

import io

import numpy as np
import pytest
from PIL import Image
from tiny import reference_processor

import paligemma
from paligemma.processor import load_image, load_image_and_size, parse_detections, preprocess_image


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


# Reduced decoding: a file is decoded at a size that keeps every side >= REDUCING_GAP x the model's input side.
# The bounds below are in the model's [-1, 1] pixel values (2/255 a level of 255): measured on photos, a screenshot
# and scenes of 1000 to 3100 pixels (bench/reduced_decoding.py, docs/security.md), a value moved by at most 9 levels
# (JPEG's scaled decoding; 3 for PNG) and 0.25 of a level on average.
MAX_REDUCED_DISTANCE = 10 * 2 / 255
MEAN_REDUCED_DISTANCE = 0.5 * 2 / 255


@pytest.fixture(scope="module")
def real_files():
    from bench.reduced_decoding import encoded, gradio_images
    from shapes.scenes import Style, render_scene

    folder = gradio_images()
    scene = render_scene(0, 3, lambda rng, count: Style(canvas=2000, antialias=True, noise=2.0)).image
    photo = Image.open(folder / "groot.jpeg").convert("RGB")
    photo = photo.resize((photo.width * 4, photo.height * 4), Image.Resampling.BICUBIC)
    return {"screenshot GIF": (folder / "screenshot.gif").read_bytes(),
            "photo JPEG": (folder / "groot.jpeg").read_bytes(), "scene PNG": encoded(scene, format="PNG"),
            "scene JPEG": encoded(scene, format="JPEG", quality=90),
            "enlarged photo JPEG": encoded(photo, format="JPEG", quality=90)}


@pytest.mark.parametrize("size", [112, 224])
def test_reduced_decoding_stays_close_to_resizing_the_full_image(real_files, size):
    for name, data in real_files.items():
        full = load_image(data)
        reduced = load_image(data, size)
        assert reduced.width >= min(full.width, 4 * size) and reduced.height >= min(full.height, 4 * size), name
        difference = (preprocess_image(full, size) - preprocess_image(reduced, size)).abs()
        assert difference.max().item() <= MAX_REDUCED_DISTANCE, name
        assert difference.mean().item() <= MEAN_REDUCED_DISTANCE, name
    assert load_image(real_files["scene PNG"], 112).size == (500, 500)  # reduced 4 times: 500 >= 4 x 112


def test_a_reduced_jpeg_is_upright_and_reports_its_stored_size():
    image = Image.fromarray(gradient(2400, 600))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    data = encode(image, "JPEG", exif=exif.tobytes())
    reduced, size = load_image_and_size(data, 56)
    assert size == (600, 2400)  # upright: the boxes of an answer are measured in it
    assert reduced.size == (300, 240)  # JPEG decoded at 1/2 (1200 x 300), reduced 5 times across, upright
    full = load_image(data)
    assert full.size == (600, 2400)
    difference = (preprocess_image(full, 56) - preprocess_image(reduced, 56)).abs()
    assert difference.max().item() <= MAX_REDUCED_DISTANCE


def test_a_large_sixteen_bit_file_is_scaled_not_clipped():
    values = np.tile(np.linspace(0, 65535, 2000).astype(np.uint16), (1000, 1))
    data = encode(Image.fromarray(values), "PNG")
    reduced = np.asarray(load_image(data, 56))
    assert reduced.shape == (250, 250, 3)  # reduced 8 times across, 4 times down: each side >= 4 x 56
    assert reduced.min() <= 1 and reduced.max() >= 254  # the full range survives
    eight_bit = np.round(values.astype(np.float64) / 65535 * 255)
    expected = eight_bit.reshape(250, 4, 250, 8).mean(axis=(1, 3))
    assert np.abs(reduced[..., 0] - expected).max() <= 1


def encode(image: Image.Image, format: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("name,data", [
    ("EPS", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),
    ("ICO", encode(Image.new("RGB", (16, 16)), "ICO")),
    ("PCX", encode(Image.new("RGB", (16, 16)), "PCX")),
])
def test_formats_outside_the_allow_list_are_refused_by_their_content(name, data):
    with pytest.raises(paligemma.InputError, match="PNG, JPEG, WEBP, GIF, BMP, TIFF"):
        load_image(data)


@pytest.mark.parametrize("format,side,save", [
    ("WEBP", 3600, {}),  # libwebp holds 16 bytes a pixel
    ("JPEG", 5800, {"progressive": True, "subsampling": 0}),  # every coefficient held: 6 bytes a pixel
    ("PNG", 7200, {}),  # RGB is stored as 4 bytes a pixel
])
def test_a_file_over_the_decoding_budget_is_refused_before_decoding(format, side, save):
    data = encode(Image.new("RGB", (side, side), (10, 200, 30)), format, **save)
    with pytest.raises(paligemma.InputError, match="over this reader's 192 MB"):
        load_image(data, 112)
    small = encode(Image.new("RGB", (side // 2, side // 2), (10, 200, 30)), format, **save)
    assert load_image(small, 112).getpixel((0, 0))[1] > 190
