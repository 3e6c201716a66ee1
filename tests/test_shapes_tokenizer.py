"""The shapes tokenizer: PaliGemma's special-token layout, exact round trips, whole loc tokens,
transformers-loadable."""

import pytest

from shapes import scenes as S
from shapes.tokenizer import build_shapes_tokenizer, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_shapes_tokenizer()


def task_strings():
    for index in range(150):
        for prefix, suffix in S.task_pairs(S.render_scene(11, index)):
            yield prefix + "\n"
            yield suffix


def test_special_token_layout(tokenizer):
    ids = [tokenizer.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>")]
    assert ids == [0, 1, 2, 3]
    image = tokenizer.token_to_id("<image>")
    locs = [tokenizer.token_to_id(f"<loc{i:04d}>") for i in range(1024)]
    segs = [tokenizer.token_to_id(f"<seg{i:03d}>") for i in range(128)]
    assert locs == list(range(image + 1, image + 1025))
    assert segs == list(range(image + 1025, image + 1153))
    assert tokenizer.get_vocab_size() == image + 1153 + 2  # then the appended words: "segment", "▁segment"
    assert tokenizer.encode("caption en").ids[0] != tokenizer.token_to_id("<bos>")  # no automatic <bos>


def test_every_task_string_round_trips_without_unknowns(tokenizer):
    checked = 0
    for text in task_strings():
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.token_to_id("<unk>") not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        checked += 1
    assert checked > 1000


def test_each_loc_token_is_one_token(tokenizer):
    for text in task_strings():
        tokens = tokenizer.encode(text, add_special_tokens=False).tokens
        assert text.count("<loc") == sum(t.startswith("<loc") for t in tokens)
        assert all(len(t) == 9 for t in tokens if t.startswith("<loc"))
    assert tokenizer.encode("<loc0007><loc1023>").tokens == ["<loc0007>", "<loc1023>"]
    assert tokenizer.encode("<seg042>").tokens == ["<seg042>"]


def test_spaces_are_gemma_metaspace(tokenizer):
    assert tokenizer.encode("caption en\n").tokens == ["caption", "\u2581en", "\n"]
    assert tokenizer.encode("a red circle, a blue square").tokens == [
        "a", "\u2581red", "\u2581circle", ",", "\u2581a", "\u2581blue", "\u2581square"]


def test_build_tokenizer_for_other_words():
    tok = build_tokenizer(["hello", "world", "?"])
    ids = tok.encode("hello world? <loc0001>").ids
    assert tok.decode(ids, skip_special_tokens=False) == "hello world? <loc0001>"
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("<bos>") == 2
    assert tok.encode("goodbye").ids == [3]


def test_transformers_loads_it_and_its_processor_uses_it(tokenizer, tmp_path):
    from transformers import PaliGemmaProcessor, PreTrainedTokenizerFast, SiglipImageProcessor

    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    for text in list(task_strings())[:200]:
        ids = fast(text, add_special_tokens=False).input_ids
        assert ids == tokenizer.encode(text, add_special_tokens=False).ids
        assert fast.decode(ids) == text
    image_processor = SiglipImageProcessor(size={"height": 112, "width": 112}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=fast)
    processor.image_seq_length = 64
    scene = S.render_scene(11, 0)
    inputs = processor(images=scene.image, text="caption en", suffix=S.caption(scene), return_tensors="pt")
    image = tokenizer.token_to_id("<image>")
    expected = ([image] * 64 + [2] + tokenizer.encode("caption en\n").ids
                + tokenizer.encode(S.caption(scene)).ids + [1])
    assert inputs["input_ids"][0].tolist() == expected


def test_appended_words_come_last_and_leave_every_shipped_id_where_it_was(tokenizer, tmp_path):
    from tokenizers import Tokenizer

    import paligemma
    from shapes.tokenizer import APPENDED_WORDS

    shipped = Tokenizer.from_file(str(paligemma.DEMO_CHECKPOINT / "tokenizer.json"))
    assert shipped.get_vocab() == tokenizer.get_vocab()  # the shipped checkpoint has the segmentation words
    first = build_shapes_tokenizer(appended=())  # the first checkpoint's vocabulary, 1,210 tokens
    size = first.get_vocab_size()
    assert size == 1210 and all(tokenizer.token_to_id(t) == i for t, i in first.get_vocab().items())
    assert APPENDED_WORDS == ("segment",)
    assert [tokenizer.id_to_token(i) for i in range(size, tokenizer.get_vocab_size())] == ["segment", "\u2581segment"]
    text = S.segment_prompt(["circle", "square"]) + "\n"
    assert tokenizer.encode(text).tokens == ["segment", "\u2581circle", "\u2581;", "\u2581square", "\n"]
    assert tokenizer.encode("<loc0001><seg127> circle").tokens == ["<loc0001>", "<seg127>", "\u2581circle"]
    path = tmp_path / "tokenizer.json"  # the ids survive a save, and transformers reads them alike
    tokenizer.save(str(path))
    assert Tokenizer.from_file(str(path)).get_vocab() == tokenizer.get_vocab()
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(path))
    answer = "<loc0010><loc0020><loc0300><loc0400><seg001><seg127> circle"
    assert fast(text + answer, add_special_tokens=False).input_ids == tokenizer.encode(text + answer).ids
    assert fast.decode(tokenizer.encode(text + answer).ids) == text + answer


def test_an_appended_word_already_in_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="'circle' is in the vocabulary already"):
        build_tokenizer(["circle"], appended=("circle",))
