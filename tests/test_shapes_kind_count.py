"""shapes.kind_count: the new question's examples and held-out records answer what the scenes show, in words the
shapes tokenizer has."""

import json

from paligemma.train import read_jsonl
from shapes import kind_count as K
from shapes import scenes as S
from shapes.tokenizer import build_shapes_tokenizer


def test_examples_count_the_kind_asked_about_and_use_known_words(tmp_path):
    K.write_data(tmp_path, examples=6, held_out=2, replay=0.0)
    train, held_out = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "held_out.jsonl")
    assert len(train) == 6 and len(held_out) == 2 * len(S.SHAPES)
    for i, record in enumerate(train):
        kind = S.SHAPES[i % 3]
        assert record["prefix"] == f"answer en how many {kind} shapes are there?"
        assert record["suffix"] == str(sum(s.shape == kind for s in S.render_scene(0, i).shapes))
    scene = S.render_scene(1, 1)
    assert [r["suffix"] for r in held_out[3:]] == [str(sum(s.shape == k for s in scene.shapes)) for k in S.SHAPES]
    tokenizer = build_shapes_tokenizer()
    unknown = tokenizer.token_to_id("<unk>")
    assert unknown not in tokenizer.encode(K.question("triangle")).ids
    assert json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])["image"].startswith("images/")
