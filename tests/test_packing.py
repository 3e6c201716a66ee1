"""shapes.packing: an image's questions packed into one training sequence are each scored as if asked alone,
except that the image tokens see the image only (the one approximation the module states)."""

import random

import pytest
import torch

from paligemma.config import PaliGemmaConfig
from paligemma.masks import TokenLayout, additive
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.processor import PaliGemmaProcessor
from paligemma.train import IGNORE
from shapes import scenes as S
from shapes import train as R
from shapes.packing import packed_batch, packed_hidden
from shapes.tokenizer import build_shapes_tokenizer


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_shapes_tokenizer()
    config = PaliGemmaConfig.from_dict(R.model_config(tokenizer))
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config)
    R.initialize(model, tokenizer, 0)
    for p in model.parameters():  # random norms too, so that no term of the layers is trivially zero
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.1)
    scenes = [S.render_scene(3, i) for i in range(2)]
    asked = [R.questions(scene, random.Random(i)) for i, scene in enumerate(scenes)]
    return model.eval(), PaliGemmaProcessor(tokenizer, config), scenes, asked


def answer_states(hidden, batch, row, question):
    return hidden[row][batch["segments"][row] == question]


def test_each_question_is_scored_as_if_packed_alone(setup):
    model, processor, scenes, asked = setup
    with torch.no_grad():
        batch = packed_batch(processor, [s.image for s in scenes], asked)
        together = packed_hidden(model, batch, model.embed_image(batch["pixel_values"]))
        for row, scene in enumerate(scenes):
            for number, pair in enumerate(asked[row], 1):
                alone = packed_batch(processor, [scene.image], [[pair]])
                hidden = packed_hidden(model, alone, model.embed_image(alone["pixel_values"]))
                torch.testing.assert_close(answer_states(together, batch, row, number),
                                           answer_states(hidden, alone, 0, 1), atol=1e-5, rtol=0)


def test_a_packed_question_equals_the_unpacked_sequence_with_image_tokens_blind_to_the_prompt(setup):
    model, processor, scenes, asked = setup
    N = processor.num_image_tokens
    prefix, suffix = asked[0][3]
    with torch.no_grad():
        packed = packed_batch(processor, [scenes[0].image], [[(prefix, suffix)]])
        embeddings = model.embed_image(packed["pixel_values"])
        hidden = packed_hidden(model, packed, embeddings)[0]
        # The same question through the model's own prefix-LM mask, with one change: image queries skip the prompt.
        plain = processor([scenes[0].image], [prefix], [suffix])
        length = plain["input_ids"].shape[1]
        layout = TokenLayout.last(plain["attention_mask"], plain["token_type_ids"], length)
        allowed = layout.allowed()
        allowed[..., :N, N:] = False
        expected = model.decoder(model.embed(plain["input_ids"], embeddings), layout.positions(),
                                 {None: additive(allowed, torch.float32)})[0]
        torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)
        # Without that change the image tokens read the prompt, so the states differ: the approximation is real.
        full = model.hidden_states(plain["input_ids"], attention_mask=plain["attention_mask"],
                                   token_type_ids=plain["token_type_ids"], image_embeddings=embeddings)[0]
        assert (full[:N] - hidden[:N]).abs().max() > 1e-3


def test_a_question_packed_alone_is_the_inference_sequence(setup):
    """`alone` questions get their own row where the image tokens see the prompt: exactly the model's own
    prefix-LM forward of that question, every position included."""
    model, processor, scenes, asked = setup
    prefix, suffix = asked[0][3]
    with torch.no_grad():
        batch = packed_batch(processor, [scenes[0].image], [[(prefix, suffix)]], alone=lambda p: True)
        embeddings = model.embed_image(batch["pixel_values"])
        hidden = packed_hidden(model, batch, embeddings)[0]
        plain = processor([scenes[0].image], [prefix], [suffix])
        expected = model.hidden_states(plain["input_ids"], attention_mask=plain["attention_mask"],
                                       token_type_ids=plain["token_type_ids"], image_embeddings=embeddings)[0]
    assert batch["input_ids"][0].tolist() == plain["input_ids"][0].tolist()
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)


def test_mixed_rows_score_each_question_as_its_own_kind_of_row(setup):
    """Detections alone, the rest packed, for two images at once: each answer's states equal those of the
    question in a batch of its own, and each row embeds its own image."""
    model, processor, scenes, asked = setup
    detection = lambda prefix: prefix.startswith("detect ")  # noqa: E731
    with torch.no_grad():
        batch = packed_batch(processor, [s.image for s in scenes], asked, alone=detection)
        hidden = packed_hidden(model, batch, model.embed_image(batch["pixel_values"]))
        row = 0
        for image, scene in enumerate(scenes):
            packed = [pair for pair in asked[image] if not detection(pair[0])]
            single = [pair for pair in asked[image] if detection(pair[0])]
            assert batch["row_image"][row : row + 1 + len(single)].tolist() == [image] * (1 + len(single))
            assert batch["image_sees_prompt"][row : row + 1 + len(single)].tolist() == [False] + [True] * len(single)
            for number, pair in enumerate(packed, 1):
                own = packed_batch(processor, [scene.image], [[pair]])
                expected = packed_hidden(model, own, model.embed_image(own["pixel_values"]))
                torch.testing.assert_close(answer_states(hidden, batch, row, number),
                                           answer_states(expected, own, 0, 1), atol=1e-5, rtol=0)
            for offset, pair in enumerate(single, 1):
                own = packed_batch(processor, [scene.image], [[pair]], alone=detection)
                expected = packed_hidden(model, own, model.embed_image(own["pixel_values"]))
                length = int((batch["segments"][row + offset] != -1).sum())
                torch.testing.assert_close(hidden[row + offset, :length], expected[0, :length], atol=1e-5, rtol=0)
            row += 1 + len(single)
        assert row == batch["input_ids"].shape[0]


def test_labels_are_the_answers_in_order_and_nothing_else(setup):
    _, processor, scenes, asked = setup
    batch = packed_batch(processor, [s.image for s in scenes], asked)
    for row in range(len(scenes)):
        labels = batch["labels"][row]
        expected = []
        for _, suffix in asked[row]:
            expected += processor.encode_text(suffix, "suffix") + [processor.eos_id]
        assert labels[labels != IGNORE].tolist() == expected
    assert (batch["labels"][batch["segments"] < 0] == IGNORE).all()  # padding


def test_packing_refuses_sliding_window_decoders(setup):
    model, processor, scenes, asked = setup
    batch = packed_batch(processor, [scenes[0].image], [asked[0]])
    model.language_model.model.layers[0].window = 8
    try:
        with pytest.raises(ValueError, match="sliding windows"):
            packed_hidden(model, batch, model.embed_image(batch["pixel_values"]))
    finally:
        model.language_model.model.layers[0].window = None
