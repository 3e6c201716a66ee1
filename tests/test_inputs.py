"""Bad input gets a clear error; odd but valid input works."""

import io

import numpy as np
import pytest
from PIL import Image

import paligemma
from paligemma import InputError


@pytest.fixture(scope="module")
def pipe(reference_factory):
    folder, _ = reference_factory("pg1")
    return paligemma.load(folder)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_empty_prompt_works(pipe, images):
    result = pipe.generate(images[0], "", max_new_tokens=4)
    assert len(result.token_ids) == 4


def test_prompt_past_the_position_limit(pipe, images):
    with pytest.raises(InputError, match="over the model's limit of 512"):
        pipe.generate(images[0], "dog " * 600, max_new_tokens=4)
    with pytest.raises(InputError, match="exceeds the model's 512 positions"):
        pipe.generate(images[0], "dog " * 200, max_new_tokens=400)


def test_corrupt_and_truncated_images(pipe, images):
    with pytest.raises(InputError, match="not an image"):
        pipe.generate(b"this is not an image", "caption en")
    data = png_bytes(images[1])
    with pytest.raises(InputError, match="corrupt or truncated"):
        pipe.generate(data[: len(data) // 2], "caption en")


def test_decompression_bomb(pipe):
    # A 1-bit PNG of 20000 x 20000 pixels is a few kilobytes on disk and 400 megapixels decoded.
    bomb = png_bytes(Image.new("1", (20000, 20000)))
    assert len(bomb) < 200_000
    with pytest.raises(InputError, match="too large"):
        pipe.generate(bomb, "caption en")


def test_huge_dimensions_refused_before_decoding(pipe):
    with pytest.raises(InputError, match="pixel limit"):
        pipe.generate(Image.new("L", (9000, 9000)), "caption en")


def test_image_token_typed_in_prompt_cannot_shift_the_image(pipe, images):
    with pytest.raises(InputError, match="reserved token"):
        pipe.generate(images[0], "caption <image> en")
    with pytest.raises(InputError, match="reserved token"):
        pipe.generate(images[0], "<bos>caption en")


def test_mismatched_batch(pipe, images):
    with pytest.raises(InputError, match="2 images for 3 prompts"):
        pipe.generate(images[:2], ["a", "b", "c"])


def test_bad_image_types(pipe):
    with pytest.raises(InputError, match="cannot read an image from a int"):
        pipe.generate(5, "caption en")
    with pytest.raises(InputError, match="does not exist"):
        pipe.generate("/no/such/file.png", "caption en")
    with pytest.raises(InputError, match="must be uint8"):
        pipe.generate(np.zeros((4, 4), dtype=np.float64), "caption en")


def test_stream_yields_the_same_text_as_generate(pipe, images):
    updates = list(pipe.stream(images[2], "caption en", max_new_tokens=12))
    result = pipe.generate(images[2], "caption en", max_new_tokens=12)
    assert updates[-1].finished and updates[-1].text == result.text
    assert "".join(u.delta for u in updates) == result.text
    assert updates[-1].token_ids == result.token_ids


@pytest.mark.parametrize("shape", [(3, 40, 30), (40, 30, 5), (40, 30, 2), (2, 3, 4, 3)])
def test_image_arrays_of_a_wrong_layout_get_a_message(pipe, shape):
    with pytest.raises(InputError, match=r"channels last.*shape \(" + ", ".join(map(str, shape))):
        pipe.generate(np.zeros(shape, np.uint8), "caption en", max_new_tokens=2)


def test_an_array_with_one_channel_is_read_as_gray(pipe):
    gray = np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)
    expected = pipe.generate(gray, "caption en", max_new_tokens=4).token_ids
    assert pipe.generate(gray[..., None], "caption en", max_new_tokens=4).token_ids == expected


def test_a_prompt_with_a_lone_surrogate_gets_a_message(pipe, images):
    with pytest.raises(InputError, match="lone surrogate"):
        pipe.generate(images[0], "caption \ud800 en", max_new_tokens=2)


def test_a_folder_given_as_the_image_is_named_a_folder(pipe, tmp_path):
    with pytest.raises(InputError, match="is a folder, not an image file"):
        pipe.generate(str(tmp_path), "caption en", max_new_tokens=2)


def test_one_image_path_for_a_list_of_prompts_is_refused_not_split_into_characters(pipe, images, tmp_path):
    path = tmp_path / "image.png"
    images[0].save(path)
    with pytest.raises(InputError, match="2 prompts came with one image"):
        pipe.generate(str(path), ["caption en", "caption es"], max_new_tokens=2)


def test_numpy_integers_are_taken_as_numbers(pipe, images):
    expected = pipe.generate(images[0], "caption en", max_new_tokens=5, do_sample=True, seed=3).token_ids
    got = pipe.generate(images[0], "caption en", max_new_tokens=np.int64(5), do_sample=True, seed=np.uint32(3))
    assert got.token_ids == expected


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-40, 1e-7])
def test_a_tiny_temperature_samples_the_greedy_tokens(pipe, images, temperature):
    """As the temperature goes to 0, sampling goes to the argmax: defined for every value the checks accept."""
    greedy = pipe.generate(images[1], "caption en", max_new_tokens=8).token_ids
    sampled = pipe.generate(images[1], "caption en", max_new_tokens=8, do_sample=True, temperature=temperature, seed=0)
    assert sampled.token_ids == greedy


def test_a_huge_seed_is_refused_without_echoing_it(pipe, images):
    with pytest.raises(ValueError, match=r"seed=<an integer of 4001 digits> is out of range"):
        pipe.generate(images[0], "caption en", do_sample=True, seed=10**4000)
